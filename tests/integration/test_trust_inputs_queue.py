"""A queue size the ranks cannot share: refused by ``train --check --world N`` and so
by ``launch/local.sh`` in one line, before any rank starts; a run resumed on another number of
ranks still has its queue fitted instead of refused."""

from __future__ import annotations

import sys

import pytest

from dist_contrast.errors import ConfigError
from dist_contrast.methods import registry

from conftest import ROOT, config_from_dict, eight_step_digits_run, run_cli, run_group

MOCO = "configs/moco_v2_digits.yaml"


def test_check_world_names_the_key_the_world_and_the_nearest_sizes():
    cfg = config_from_dict({"method": {"name": "moco_v2", "queue_size": 255}})
    registry.check_world(cfg, 1)
    registry.check_world(cfg, 3)  # 255 = 3 x 85
    with pytest.raises(ConfigError) as err:
        registry.check_world(cfg, 2)
    assert str(err.value) == (
        "config key 'method.queue_size' is 255, not a multiple of the 2 ranks that share the "
        "queue (each holds queue_size / ranks keys): set method.queue_size=254 or 256"
    )
    small = config_from_dict({"method": {"name": "moco_v2", "queue_size": 3}})
    with pytest.raises(ConfigError, match=r"set method\.queue_size=4$"):
        registry.check_world(small, 4)
    clip = {"name": "clip", "queue_size": 100}
    data = {"tokenizer": "bytes", "require_caption": True, "views": 1}
    loss = {"name": "clip"}
    registry.check_world(config_from_dict({"method": clip, "data": data, "loss": loss}), 3)
    queued = {"method": {**clip, "queues": True}, "data": data, "loss": loss}
    with pytest.raises(ConfigError, match=r"is 100, not a multiple of the 3 ranks.*=99 or 102"):
        registry.check_world(config_from_dict(queued), 3)
    # methods without a queue: any size
    registry.check_world(config_from_dict({"method": {"name": "moco_v3", "queue_size": 7}}), 2)


def _one_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-contrast: error: "), proc.stderr
    return lines[0]


def test_train_check_and_the_launcher_refuse_it_in_one_line(digits_dir, tmp_path, monkeypatch):
    overrides = [
        f"data.train_shards={digits_dir}/train-*.tar",
        "data.val_shards=",
        f"run.dir={tmp_path}",
        "method.queue_size=255",
    ]
    check = ["train", "--config", MOCO, *overrides, "--check"]
    assert run_cli(*check, "--world", "3").returncode == 0
    line = _one_line(run_cli(*check, "--world", "2"))
    assert line.endswith("set method.queue_size=254 or 256") and "of the 2 ranks" in line
    # launch/local.sh runs that check before torchrun: no rank starts
    monkeypatch.setenv("PYTHON", sys.executable)
    proc = run_group(["bash", "launch/local.sh", "2", MOCO, *overrides], ROOT, timeout=120)
    assert "of the 2 ranks that share the queue" in _one_line(proc)
    assert not (tmp_path / "moco_v2_digits").exists()


@pytest.mark.slow
def test_a_resume_on_another_world_size_fits_the_queue_instead(digits_dir, tmp_path):
    """A one-rank run of a 256-key queue, then --check for a resume on 3 ranks: passes, and
    says the size it keeps (the training path itself is test_elastic_resume's)."""
    base = eight_step_digits_run(tmp_path, digits_dir)
    first = {**base, "train.stop_at": 4}
    args = ["train", "--config", MOCO]
    proc = run_cli(*args, *[f"{k}={v}" for k, v in first.items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rest = [f"{k}={v}" for k, v in {**base, "checkpoint.resume": "latest"}.items()]
    proc = run_cli(*args, *rest, "--check", "--world", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the resumed run keeps 255 keys (85 a rank)" in proc.stderr
    fresh = [f"{k}={v}" for k, v in {**base, "run.dir": tmp_path / "other"}.items()]
    line = _one_line(run_cli(*args, *fresh, "--check", "--world", "3"))
    assert line.endswith("set method.queue_size=255 or 258")
