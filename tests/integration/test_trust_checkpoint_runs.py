"""Untrusted checkpoints on real runs: a pickle payload planted in any file of a step directory,
of its universal conversion or of an export never runs (every reading path: resume on the same
and on another world size, eval, export, eval --export, init_from=export:), and each is one line,
exit 2; flipped bytes and truncation in any file of a step directory are named with the newest
intact step by every command; ``latest_intact`` resumes from it with the losses of an
uninterrupted run; a run dir is never started over. Runs: SimCLR on the digits (1 process, and
the 2-rank ZeRO-2 run test_export.py shares)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_export import CONFIG, run_for

from dist_contrast.errors import CheckpointError
from dist_contrast.train import checkpoint, integrity, manifest

from conftest import run_cli
from hostile import Payload, flip, plant_and_reseal
from multiproc import run_ranks

pytestmark = pytest.mark.slow
STEP = "step_00000004"


def _args(digits_dir: Path, run_dir: Path, name: str, **extra) -> list[str]:
    base = {
        "run.dir": str(run_dir),
        "run.name": name,
        "data.train_shards": f"{digits_dir}/train-*.tar",
        "data.val_shards": f"{digits_dir}/val-*.tar",
        "train.steps": 6,
        "train.batch_size": 16,
        "train.warmup_steps": 1,
        "train.log_every": 1,
        "checkpoint.every": 2,
        "checkpoint.keep": 10,
        "model.width": 8,
        "model.proj_hidden_dim": 32,
        "model.proj_dim": 16,
        "logging.wandb": "false",
        "logging.progress": "false",
        "logging.plots": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def one(tmp_path_factory, digits_dir) -> Path:
    """A 1-process run of 6 steps, checkpoints at 2, 4 and 6, stopped at 4 (`train.stop_at`):
    its `latest` is step 4."""
    root = tmp_path_factory.mktemp("trust")
    args = _args(digits_dir, root, "one", **{"train.stop_at": 4})
    proc = run_cli("train", "--config", CONFIG, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "one"


@pytest.fixture(scope="module")
def two(tmp_path_factory, digits_dir) -> Path:
    return run_for(tmp_path_factory, digits_dir, 2)  # 2 ranks, ZeRO-2, checkpoint at step 2


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, symlinks=True)
    cfg = (dst / "config.yaml").read_text().replace(str(run.parent), str(dst.parent))
    (dst / "config.yaml").write_text(cfg)
    return dst


def _one_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def _listing(run: Path) -> tuple[list[str], list[int]]:
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    rows = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    return steps, rows


# ---- a payload never runs -------------------------------------------------------------------


def _every_load(rank, world, one_step: str, two_step: str, marker: str) -> dict:
    """In one process with a DeepSpeed engine: plant the payload in each file in turn (the
    manifest rewritten to match, as an attacker would), then take every path that reads it.
    Returns, per file, the errors seen (a load that succeeded is a missing refusal)."""
    from dist_contrast.methods import build_method
    from dist_contrast.train.runs import run_config
    from dist_contrast.train.setup import wrap

    out: dict[str, list[str]] = {}
    for step in (Path(one_step), Path(two_step)):
        cfg = run_config(step.parent.parent)
        engine, _, _ = wrap(build_method(cfg), cfg, world)
        folders = [step]
        if step == Path(two_step):  # another world: through the universal conversion
            checkpoint.load(engine, step)  # a clean conversion first
            folders.append(checkpoint.universal_dir(step))
        for folder in folders:
            for name in _sample(manifest.files_of(folder)):
                out[f"{folder.name}/{name}"] = _planted(engine, step, folder / name, Path(marker))
    return out


def _planted(engine, step: Path, path: Path, marker: Path) -> list[str]:
    """The errors of every reader of ``step`` with the payload in ``path``; put back after."""
    from dist_contrast.train import elastic

    folder = next(p for p in (step, checkpoint.universal_dir(step)) if p in path.parents)
    saved = path.read_bytes(), (folder / manifest.MANIFEST).read_bytes()
    plant_and_reseal(path, marker, folder)
    readers = (
        lambda: integrity.choose(step.parent, str(step)),
        lambda: checkpoint.load(engine, step),
        lambda: elastic.saved_states(step),
        lambda: checkpoint.load_model_state(step),
    )
    errors = []
    for read in readers:
        try:
            read()
        except CheckpointError as exc:
            errors.append(str(exc))
    path.write_bytes(saved[0])
    (folder / manifest.MANIFEST).write_bytes(saved[1])
    assert not marker.exists(), f"{path}: the payload ran"
    return errors


def _sample(names: list[str]) -> list[str]:
    """Every file of a step directory; of a universal conversion the files of its first
    parameter (each kind: fp32, exp_avg, exp_avg_sq, step) and those outside ``zero/``."""
    params = sorted({n.split("/")[2] for n in names if n.count("/") >= 3})
    keep = params[:1]
    return [n for n in names if n.count("/") < 3 or n.split("/")[2] in keep]


def test_a_payload_in_any_file_of_a_checkpoint_never_runs(one, two, tmp_path):
    a, b = _copy(one, tmp_path / "one"), _copy(two, tmp_path / "two")
    marker = tmp_path / "MARKER"
    one_step, two_step = a / "checkpoints" / STEP, b / "checkpoints" / "step_00000002"
    seen = run_ranks(_every_load, 1, str(one_step), str(two_step), str(marker), timeout=600)[0]
    assert not marker.exists()
    assert len([k for k in seen if k.startswith("step_00000002_universal/")]) >= 6
    for name, errors in seen.items():
        base = name.rsplit("/", 1)[-1]
        if not base.endswith(".pt"):  # DeepSpeed's tag file, never unpickled
            continue
        assert errors, f"{name}: loaded without a refusal"
        assert all("refused" in e or "is damaged" in e for e in errors), (name, errors)
        assert any(base in e and "posix.system" in e for e in errors), (name, errors)


def test_a_payload_ends_every_command_in_one_line(one, two, digits_dir, tmp_path):
    """Through the real CLI: resume on the same world (1 process) and on another (the 2-rank
    checkpoint on 1 process), eval --run, export --run; an export's weights replaced by a
    pickle for eval --export and init_from=export:."""

    marker = tmp_path / "MARKER"
    a = _copy(one, tmp_path / "a")
    step = a / "checkpoints" / STEP
    plant_and_reseal(step / "rank_00000.pt", marker, step)
    more = _args(digits_dir, tmp_path, "a", **{"checkpoint.resume": "latest"})
    line = _one_line(run_cli("train", "--config", CONFIG, *more))
    assert "rank_00000.pt: refused to load: it holds the Python object posix.system" in line

    b = _copy(two, tmp_path / "b")
    step = b / "checkpoints" / "step_00000002"
    plant_and_reseal(step / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker, step)
    args = [*_args(digits_dir, tmp_path, "b", **{"checkpoint.resume": "latest"})]
    args += ["train.steps=4", "checkpoint.every=2"]
    line = _one_line(run_cli("train", "--config", CONFIG, *args))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: refused" in line

    c = _copy(one, tmp_path / "c")
    step = c / "checkpoints" / STEP
    clean = run_cli("export", "--run", str(c), "--out", str(tmp_path / "export"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    plant_and_reseal(step / "mp_rank_00_model_states.pt", marker, step)
    plant_and_reseal(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker, step)
    for cmd in (
        ["eval", "--run", str(c)],
        ["export", "--run", str(c), "--out", str(tmp_path / "x")],
    ):
        assert "refused to load" in _one_line(run_cli(*cmd)), cmd

    export = tmp_path / "export"
    torch.save({"x": Payload(marker)}, export / "image" / "model.safetensors")
    val = f"{digits_dir}/val-*.tar"
    line = _one_line(run_cli("eval", "--export", str(export), "--data", val))
    assert "model.safetensors" in line
    init = _args(digits_dir, tmp_path, "init", **{"model.init_from": f"export:{export}"})
    line = _one_line(run_cli("train", "--config", CONFIG, *init, "--check"))
    assert "model.safetensors" in line
    (export / "config.yaml").write_text(
        f"run: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    _one_line(run_cli("eval", "--export", str(export), "--data", val))
    assert not marker.exists()


# ---- damage is named, with the newest intact step -------------------------------------------


def _damage(path: Path, how: str) -> None:
    if how == "flip":
        flip(path)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damage_in_any_file_is_named_with_the_newest_intact_step(one, tmp_path, how):
    """Each file of step 4 damaged in turn: the choice a resume makes (``latest``, a path),
    what ``train --check`` checks, and what eval and export read, each refuse naming the file
    and step 2, the newest intact one."""
    run = _copy(one, tmp_path / "run")
    root = run / "checkpoints"
    step = root / STEP
    for name in [*manifest.files_of(step), manifest.MANIFEST]:
        saved = (step / name).read_bytes()
        _damage(step / name, how)
        for fn in (
            lambda: integrity.resolve_resume(root, "latest", full=True),
            lambda: integrity.choose(root, "latest"),
            lambda: integrity.choose(root, str(step)),
            lambda: integrity.reading(root).__enter__(),
        ):
            with pytest.raises(CheckpointError) as err:
                fn()
            line = str(err.value)
            assert f"{STEP} is damaged ({name}" in line, line
            assert "newest intact step is step_00000002" in line, line
        (step / name).write_bytes(saved)
    assert integrity.verify(step) == []


def test_every_command_names_the_damage(one, digits_dir, tmp_path):
    run = _copy(one, tmp_path / "run")
    step = run / "checkpoints" / STEP
    flip(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (step / "rank_00000.pt").write_bytes((step / "rank_00000.pt").read_bytes()[:100])
    before = _listing(run)
    more = _args(digits_dir, tmp_path, "run", **{"checkpoint.resume": "latest"})
    intact = "checkpoint.resume=latest_intact"
    for cmd, how in (
        (["train", "--config", CONFIG, *more, "--check"], f"continue from it with {intact}"),
        (["train", "--config", CONFIG, *more], f"continue from it with {intact}"),
        (["eval", "--run", str(run)], "read it with --step 2"),
        (["export", "--run", str(run), "--out", str(tmp_path / "x")], "read it with --step 2"),
    ):
        line = _one_line(run_cli(*cmd))
        assert f"{STEP} is damaged (rank_00000.pt: size 100 bytes" in line, line
        assert f"newest intact step is step_00000002: {how}" in line, line
    assert _listing(run) == before


def test_latest_intact_resumes_from_the_intact_step_with_the_uninterrupted_losses(
    one, digits_dir, tmp_path
):
    """Step 4 (latest) damaged: ``checkpoint.resume=latest_intact`` (what a requeued Slurm job
    passes) sets it aside, continues from step 2 and ends at step 6 with the losses of the
    same 6 steps run without a stop."""
    straight = run_cli("train", "--config", CONFIG, *_args(digits_dir, tmp_path, "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = _copy(one, tmp_path / "run")
    flip(run / "checkpoints" / STEP / "mp_rank_00_model_states.pt")
    steps_before, rows_before = _listing(run)
    more = _args(digits_dir, tmp_path, "run", **{"checkpoint.resume": "latest_intact"})
    proc = run_cli("train", "--config", CONFIG, *more)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "set aside as step_00000004.damaged" in proc.stderr
    steps, rows = _listing(run)
    assert set(steps_before) <= {s.removesuffix(".damaged") for s in steps}
    assert steps == [*steps_before[:1], *steps_before[1:], "step_00000004.damaged",
                     "step_00000006"]  # fmt: skip
    assert set(rows_before) <= set(rows) and rows == list(range(1, 7))
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    reference = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert losses == [json.loads(x)["loss"] for x in reference]


def test_a_missing_latest_is_refused_and_nothing_is_lost(one, digits_dir, tmp_path):
    """The tester's case: `latest` deleted, step directories present. A resume, a fresh start
    with train.stop_at and one with another seed: each refused, the listing unchanged."""
    run = _copy(one, tmp_path / "run")
    (run / "checkpoints" / "latest").unlink()
    before = _listing(run)
    for extra, check in (
        ({"checkpoint.resume": "latest"}, ["--check"]),
        ({"checkpoint.resume": "latest", "train.stop_at": 2}, []),
        ({"run.seed": 7}, []),
    ):
        args = _args(digits_dir, tmp_path, "run", **extra)
        line = _one_line(run_cli("train", "--config", CONFIG, *args, *check))
        assert "not started over" in line or "already holds checkpoints" in line, line
    line = _one_line(run_cli("eval", "--run", str(run)))
    assert "latest is missing but step directories are there" in line
    assert "choose one with --step N" in line
    assert _listing(run) == before
    assert not (run / "checkpoints" / "latest").exists()
