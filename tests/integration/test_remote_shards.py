"""Shards that are not local files, as webdataset users write them: ``http://`` from a real HTTP
server on the loopback (webdataset opens it with curl), ``pipe:`` commands, and ``s3://``
through the documented route (``DIST_CONTRAST_S3_COMMAND``, here a ``cat`` of a local mirror,
since nothing can reach S3 from the test machine). Each trains and resumes exactly like the
local files; a source none of whose shards can be read ends the run with one line."""

from __future__ import annotations

import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

CONFIG = "configs/simclr_digits.yaml"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line per request on the test's stderr
        pass


@pytest.fixture(scope="module")
def http_root(digits_dir):
    """``http://127.0.0.1:PORT`` serving the digits shards, for the module."""
    handler = functools.partial(_Quiet, directory=str(digits_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _train(run_dir: Path, name: str, shards: str, *extra: str, env: dict | None = None):
    args = [
        f"run.dir={run_dir}",
        f"run.name={name}",
        f"data.train_shards={shards}",
        "data.val_shards=",  # trained only, never evaluated
        "data.num_workers=2",
        "model.width=4",
        "train.batch_size=16",
        "train.steps=6",
        "train.log_every=1",
        "checkpoint.every=3",
        "logging.wandb=false",
        "logging.progress=false",
        "logging.plots=false",
        *extra,
    ]
    return subprocess.run(
        [sys.executable, "-m", "dist_contrast.cli", "train", "--config", CONFIG, *args],
        cwd=ROOT,
        env={**cli_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _names(digits_dir: Path) -> list[str]:
    return [p.name for p in sorted(digits_dir.glob("train-*.tar"))]


def test_http_pipe_and_s3_shards_train_and_resume_like_local_files(digits_dir, http_root, tmp_path):
    local = _train(tmp_path, "local", f"{digits_dir}/train-*.tar")
    assert local.returncode == 0, local.stderr[-3000:]
    reference = _losses(tmp_path / "local")
    mirror = tmp_path / "mirror" / "bucket"
    mirror.mkdir(parents=True)
    for name in _names(digits_dir):
        (mirror / name).symlink_to(digits_dir / name)
    routes = {
        "http": (",".join(f"{http_root}/{n}" for n in _names(digits_dir)), {}),
        "pipe": (",".join(f"pipe:cat {digits_dir}/{n}" for n in _names(digits_dir)), {}),
        "s3": (
            ",".join(f"s3://bucket/{n}" for n in _names(digits_dir)),
            {"DIST_CONTRAST_S3_COMMAND": f"cat {tmp_path}/mirror/{{path}}"},
        ),
    }
    for route, (shards, env) in routes.items():
        half = _train(tmp_path, route, shards, "train.stop_at=3", env=env)
        assert half.returncode == 0, f"{route}: {half.stderr[-3000:]}"
        rest = _train(tmp_path, route, shards, "checkpoint.resume=latest", env=env)
        assert rest.returncode == 0, f"{route}: {rest.stderr[-3000:]}"
        assert "skipped" not in half.stderr + rest.stderr, route
        assert _losses(tmp_path / route) == reference, route


@pytest.mark.parametrize("resampled", [False, True])
def test_a_source_that_cannot_be_read_ends_the_run_in_one_line(
    digits_dir, http_root, tmp_path, resampled
):
    """Every shard of the second source is missing (HTTP 404): one line naming that source,
    not an endless loop of skipped shards (resampled) or a run on the first source alone."""
    good = f"{digits_dir}/train-*.tar"
    missing = f"{http_root}/gone-{{0..3}}.tar"
    extra = ["data.train_weights=[1, 1]", f"data.resampled={str(resampled).lower()}"]
    if resampled:
        extra.append("data.epoch_samples=512")
    proc = _train(tmp_path, "bad", f"[{good}, {missing}]", *extra)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "data.train_shards[1]: none of" in errors[0] and "could be read" in errors[0]
    assert "Traceback" not in proc.stderr
