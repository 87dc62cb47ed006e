"""Shards that are not local files, as webdataset users write them: ``http://`` from a real HTTP
server on the loopback (webdataset opens it with curl), ``pipe:`` commands, and ``s3://``
through the documented route (``DIST_CONTRAST_S3_COMMAND``, here a ``cat`` of a local mirror,
since nothing can reach S3 from the test machine). Each trains and resumes exactly like the
local files; a source none of whose shards can be read ends the run with one line. A server
that resets, closes or cuts off the first connections to each shard, or is not listening yet,
costs retries, not data."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow  # launches real training processes: make test-slow, CI

CONFIG = "configs/simclr_digits.yaml"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line per request on the test's stderr
        pass


class _Flaky(_Quiet):
    """Per path, the first connection is reset (RST, no reply), the second is cut after half of
    the body (a Content-Length the body never reaches), the third answers after a pause; the
    rest are served. ``hits`` counts the connections per path."""

    hits: dict[str, int]
    lock: threading.Lock

    def do_GET(self):
        with self.lock:
            n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if n == 1:  # curl: "Recv failure: Connection reset by peer" (56) or an empty reply (52)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if n == 2:  # curl: "partial file" (18)
            f = self.send_head()
            if f is not None:
                with f:
                    data = f.read()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
            self.close_connection = True
            return
        if n == 3:
            time.sleep(0.5)  # slow to answer
        super().do_GET()


def _serve(handler, port: int = 0):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def http_root(digits_dir):
    """``http://127.0.0.1:PORT`` serving the digits shards, for the module."""
    server = _serve(functools.partial(_Quiet, directory=str(digits_dir)))
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def flaky_root(digits_dir):
    """``(URL, hits)`` of a server of the digits shards that fails the first connections."""
    hits: dict[str, int] = {}
    handler = type("Flaky", (_Flaky,), {"hits": hits, "lock": threading.Lock()})
    server = _serve(functools.partial(handler, directory=str(digits_dir)))
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def local_losses(digits_dir, tmp_path_factory):
    """The losses of the 6-step run from the local shards: the reference of every route."""
    run_dir = tmp_path_factory.mktemp("local_runs")
    local = _train(run_dir, "local", f"{digits_dir}/train-*.tar")
    assert local.returncode == 0, local.stderr[-3000:]
    return _losses(run_dir / "local")


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


def test_http_pipe_and_s3_shards_train_and_resume_like_local_files(
    digits_dir, http_root, local_losses, tmp_path
):
    reference = local_losses
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


def test_a_server_that_drops_the_first_connections_costs_retries_not_data(
    digits_dir, flaky_root, local_losses, tmp_path
):
    """Each shard's first connection is reset, its second cut mid-body, its third slow: the run
    reads every shard again from where it broke off and trains on exactly the local samples."""
    root, hits = flaky_root
    shards = ",".join(f"{root}/{n}" for n in _names(digits_dir))
    run = _train(tmp_path, "flaky", shards, "data.remote_backoff_s=0.05", "data.warn_every_s=0")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped" not in run.stderr, run.stderr[-3000:]
    retries = [line for line in run.stderr.splitlines() if "retrying" in line]
    assert any("partial file" in line for line in retries), run.stderr[-3000:]
    assert any("reset" in line or "empty reply" in line for line in retries), run.stderr[-3000:]
    # the shards read to the end met both faults (the last ones may be cut by the run's end)
    assert sum(n >= 3 for n in hits.values()) >= 4, hits
    rows = [json.loads(r) for r in (tmp_path / "flaky" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_total"] == 0
    assert _losses(tmp_path / "flaky") == local_losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_not_listening_yet_is_waited_for(digits_dir, capfd):
    """Connections refused (curl exit 7) until the server starts: the shard is read whole."""
    from dist_contrast.data.tario import Faults, Retry, tar_samples

    port = _free_port()
    url = f"http://127.0.0.1:{port}/{_names(digits_dir)[0]}"
    handler = functools.partial(_Quiet, directory=str(digits_dir))
    later = threading.Timer(1.0, lambda: servers.append(_serve(handler, port)))
    servers: list = []
    later.start()
    try:
        faults = Faults(warn_every_s=0)
        got = [s["__key__"] for s in tar_samples(url, faults, Retry(6, 0.2))]
    finally:
        later.cancel()
        later.join()
        for server in servers:
            server.shutdown()
            server.server_close()
    local = [s["__key__"] for s in tar_samples(str(digits_dir / _names(digits_dir)[0]), Faults())]
    assert got == local and faults.total() == 0
    assert "exit status 7 (could not connect)" in capfd.readouterr().err


def test_a_shard_that_is_not_there_is_not_retried(http_root, capfd):
    """HTTP 404 is final (curl retried the transient HTTP statuses itself): counted at once."""
    from dist_contrast.data.tario import Faults, Retry, tar_samples

    faults = Faults()
    assert list(tar_samples(f"{http_root}/gone.tar", faults, Retry(5, 10.0))) == []
    assert faults.counts["unreadable_shard"] == 1
    assert "retrying" not in capfd.readouterr().err


def test_a_pipe_that_breaks_off_is_read_again_from_where_it_stopped(digits_dir, tmp_path, capfd):
    """The command prints half of the shard and fails the first time: the second read skips
    the samples delivered already; each sample comes once, in order, whole."""
    from dist_contrast.data.tario import Faults, Retry, tar_samples

    shard = digits_dir / _names(digits_dir)[0]
    mark, half = tmp_path / "tried", shard.stat().st_size // 2
    url = (
        f"pipe:if [ -e {mark} ]; then cat {shard}; "
        f"else touch {mark}; head -c {half} {shard}; exit 3; fi"
    )
    faults = Faults(warn_every_s=0)
    got = [(s["__key__"], s["png"], s["cls"]) for s in tar_samples(url, faults, Retry(2, 0.01))]
    local = [(s["__key__"], s["png"], s["cls"]) for s in tar_samples(str(shard), Faults())]
    assert got == local and faults.total() == 0
    err = capfd.readouterr().err
    assert "exit status 3" in err and "retry 1 of 2" in err
