"""Errors a user can cause: one line on stderr, a non-zero exit, no traceback."""

import shutil

import pytest

from conftest import run_cli


def _one_clear_line(proc, expected):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dist-contrast: error: ")
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
        (["train.batch_size=big"], "config key 'train.batch_size' must be int"),
        (["data.train_shards=/nonexistent/x-{000..009}.tar"], "matched no file"),
    ],
)
def test_train_bad_input(overrides, expected, digits_dir, tmp_path):
    proc = run_cli(
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
        *overrides,
    )
    _one_clear_line(proc, expected)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # 15 train shards cannot feed 2 ranks x 8 workers (used to fail after the ranks started)
        (["data.num_workers=8"], "shard(s) for 2 rank(s) x 8 worker(s); every reader needs"),
        # evaluation reads them only after training (used to fail then)
        (["data.val_shards=/nonexistent/val-*.tar"], "data.val_shards: shard pattern"),
        # a YAML error in an override (used to be a yaml ParserError traceback)
        (["model.width={3"], "override model.width: value '{3' is not valid YAML"),
        (["train.lr=[1e-3"], "override train.lr: value '[1e-3' is not valid YAML"),
        # DeepSpeed's own config model (used to pass --check, then a traceback on every rank)
        (
            ["deepspeed.raw={zero_optimization: {stag: 2}}"],
            "deepspeed.raw: DeepSpeed refuses the config: DeepSpeedZeroConfig stag: Extra inputs",
        ),
        (["deepspeed.raw={train_batch_size: 7}"], "train_batch_size 7 != "),
    ],
)
def test_check_refuses_before_any_rank_starts(overrides, expected, digits_dir, tmp_path):
    proc = run_cli(
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
        *overrides,
        "--check",
        "--world",
        "2",
    )
    _one_clear_line(proc, expected)


def test_check_refuses_a_world_of_zero(digits_dir, tmp_path):
    proc = run_cli(
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
        "--check",
        "--world",
        "0",
    )
    _one_clear_line(proc, "--world must be at least 1, got 0")


def test_check_accepts_the_readme_mixing_syntax(digits_dir, tmp_path):
    """``[a/{0..3}.tar, b/{4..7}.tar]`` is not YAML (braces), but it is how shard lists are
    written: a list of two patterns, mixed by data.train_weights."""
    proc = run_cli(
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        f"run.dir={tmp_path}",
        f"data.train_shards=[{digits_dir}/train-00000{{0..3}}.tar, "
        f"{digits_dir}/train-00000{{4..7}}.tar]",
        "data.train_weights=[3, 1]",
        f"data.val_shards={digits_dir}/val-*.tar",
        "data.num_workers=1",
        "--check",
        "--world",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "config ok for 2 rank(s)" in proc.stdout


def test_run_dir_that_is_a_file(digits_dir, tmp_path):
    (tmp_path / "simclr_digits").write_text("not a directory")
    proc = run_cli(
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
    )
    _one_clear_line(proc, "exists and is a file")


def test_missing_config_file():
    _one_clear_line(run_cli("train", "--config", "configs/nope.yaml"), "config file not found")


def test_eval_of_a_directory_that_is_no_run(tmp_path):
    _one_clear_line(run_cli("eval", "--run", str(tmp_path)), "has no config.yaml")
    _one_clear_line(run_cli("eval", "--run", str(tmp_path / "x")), "does not exist")


def test_resume_from_a_path_that_is_no_checkpoint(digits_dir, tmp_path):
    proc = run_cli(
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
        f"checkpoint.resume={tmp_path}/nowhere",
    )
    _one_clear_line(proc, "is not a checkpoint step directory")


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) not found")
def test_out_of_memory_is_one_line_with_the_remedy(digits_dir, tmp_path):
    """A batch that does not fit: the process's address space capped at 2.5 GB (prlimit), a
    step of 700 images of 64 px asks the allocator for more. One line naming the batch and
    what to change, not the allocator's traceback."""
    import sys

    from conftest import run_group

    args = [
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
        "data.val_shards=",
        "data.image_size=64",
        "data.num_workers=0",
        "train.steps=2",
        "train.batch_size=700",
        "logging.wandb=false",
        "logging.progress=false",
    ]
    cmd = ["prlimit", "--as=2500000000", sys.executable, "-m", "dist_contrast.cli", "train"]
    proc = run_group([*cmd, "--config", "configs/simclr_digits.yaml", *args], None, 300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "out of memory at step 1 on this machine with train.batch_size=700" in line
    assert "lower train.batch_size" in line
