"""Real runs through every layer: digits shards -> SimCLR -> DeepSpeed -> checkpoint -> kNN.

One process and torchrun with 2 ranks, the same config file unchanged."""

import json
import subprocess
import sys

import pytest

from dist_contrast.distributed import free_port

from conftest import ROOT, cli_env, run_cli, run_torchrun

CONFIG = "configs/simclr_digits.yaml"


def _overrides(digits_dir, run_dir, **extra):
    base = {
        "run.dir": str(run_dir),
        "data.train_shards": f"{digits_dir}/train-*.tar",
        "data.val_shards": f"{digits_dir}/val-*.tar",
        "train.batch_size": 32,
        "train.log_every": 2,
        "train.warmup_steps": 2,
        "checkpoint.every": 4,
        "checkpoint.keep": 2,
        "logging.wandb": "false",
        "logging.progress": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_process_train_resume_eval(digits_dir, tmp_path):
    args = _overrides(digits_dir, tmp_path, **{"train.steps": 24, "logging.wandb": "true"})
    proc = run_cli("train", "--config", CONFIG, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "simclr_digits"
    assert (run / "config.yaml").is_file()
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(2, 25, 2))
    for key in ("loss", "lr", "samples_per_sec", "negatives_per_query"):
        assert all(key in r for r in rows)
    assert rows[0]["negatives_per_query"] == 2 * 32 - 2
    assert rows[-1]["loss"] < rows[0]["loss"]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000024"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000020", "step_00000024"]
    assert list((run / "wandb").glob("offline-run-*"))

    # Starting again over existing checkpoints without asking to resume is refused...
    again = run_cli("train", "--config", CONFIG, *args)
    assert again.returncode == 2 and "checkpoint.resume=latest" in again.stderr
    # ...and resuming continues from step 24 to 28.
    more = _overrides(digits_dir, tmp_path, **{"train.steps": 28, "checkpoint.resume": "latest"})
    proc = run_cli("train", "--config", CONFIG, *more)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _metrics(run)][-2:] == [26, 28]
    assert (ckpts / "latest").read_text().strip() == "step_00000028"

    proc = run_cli("eval", "--run", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())
    assert result["checkpoint"] == "step_00000028"
    assert 0.0 <= result["knn_top1_random_init"] <= 1.0 and 0.0 <= result["knn_top1"] <= 1.0
    assert "kNN top-1" in proc.stdout


def test_torchrun_two_ranks_resume_is_exact(digits_dir, tmp_path):
    """The same config under torchrun (2 ranks); 8 steps straight equal 4 steps, a resume
    from the checkpoint and 4 more steps: the same losses, bit for bit (model, optimizer,
    LR schedule and the data position restored)."""
    common = {"train.log_every": 1, "data.num_workers": 2}
    straight = _overrides(digits_dir, tmp_path, **common, **{"train.steps": 8, "run.name": "a"})
    proc = run_torchrun(2, "train", "--config", CONFIG, *straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(tmp_path / "a")
    assert rows[0]["negatives_per_query"] == 2 * 32 * 2 - 2  # gathered from both ranks
    step_dir = tmp_path / "a" / "checkpoints" / "step_00000008"
    assert len(list(step_dir.glob("*optim_states.pt"))) == 2  # ZeRO-2: one shard per rank

    half = _overrides(
        digits_dir, tmp_path, **common, **{"train.steps": 8, "train.stop_at": 4, "run.name": "b"}
    )
    assert run_torchrun(2, "train", "--config", CONFIG, *half).returncode == 0
    rest = _overrides(
        digits_dir,
        tmp_path,
        **common,
        **{"train.steps": 8, "run.name": "b", "checkpoint.resume": "latest"},
    )
    proc = run_torchrun(2, "train", "--config", CONFIG, *rest)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = _metrics(tmp_path / "b")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in rows]

    proc = run_cli("eval", "--run", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_deepspeed_launcher_two_ranks(digits_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "dist_contrast.cli",
        "train",
        "--config",
        CONFIG,
        *_overrides(digits_dir, tmp_path, **{"train.steps": 4}),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(tmp_path / "simclr_digits")
    assert rows[-1]["step"] == 4
    assert rows[0]["negatives_per_query"] == 2 * 32 * 2 - 2


def test_cached_accumulation_under_deepspeed_matches_one_batch(digits_dir, tmp_path):
    """DeepSpeed with 4 accumulation steps of 8 (cached) follows the run with batches of 32."""
    losses = {}
    for acc in (1, 4):
        args = _overrides(
            digits_dir,
            tmp_path,
            **{
                "train.steps": 4,
                "train.log_every": 1,
                "train.accumulation": acc,
                "run.name": f"acc{acc}",
                # SGD: Adam's first steps turn rounding-level differences of tiny gradients
                # into whole steps of the learning rate.
                "train.optimizer": "sgd",
            },
        )
        proc = run_cli("train", "--config", CONFIG, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = _metrics(tmp_path / f"acc{acc}")
        assert rows[0]["negatives_per_query"] == 2 * 32 - 2  # the whole batch, not 8
        losses[acc] = [r["loss"] for r in rows]
    assert losses[4] == pytest.approx(losses[1], rel=1e-5)
