"""Errors a user can cause: one line on stderr, a non-zero exit, no traceback."""

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


def test_run_dir_that_is_a_file(digits_dir, tmp_path):
    (tmp_path / "simclr_digits").write_text("not a directory")
    proc = run_cli(
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
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
        f"checkpoint.resume={tmp_path}/nowhere",
    )
    _one_clear_line(proc, "is not a checkpoint step directory")
