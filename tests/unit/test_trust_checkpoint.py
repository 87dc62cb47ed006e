"""Untrusted checkpoints: files that would run code are refused, damaged files are found by the
manifest and named, a run dir is never started over, readers pin what they read. Step
directories here are real files (torch.save'd tensors, sealed as a save seals them); the runs
of DeepSpeed are in tests/integration/test_trust_checkpoint.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_contrast.errors import CheckpointError, ConfigError
from dist_contrast.train import checkpoint, deepspeed_api, integrity, manifest, pins

from conftest import config_from_dict
from hostile import flip, plant


def make_step(root: Path, step: int, seal: bool = True) -> Path:
    """A step directory of real files, as a 1-rank ZeRO-0 save lays them out."""
    d = root / checkpoint.step_tag(step)
    d.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((64,), float(step))}}, d / "mp_rank_00_model_states.pt")
    torch.save({"world": 1, "data": {}, "method": {}}, d / "rank_00000.pt")
    if seal:
        checkpoint.seal(d, step)
    return d


def make_run(root: Path, steps=(2, 4, 6)) -> list[Path]:
    dirs = [make_step(root, s) for s in steps]
    (root / "latest").write_text(dirs[-1].name + "\n")
    return dirs


# ---- loading without running code -----------------------------------------------------------


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "MARKER", tmp_path / "rank_00000.pt"
    plant(path, marker)
    with pytest.raises(deepspeed_api.UnsafeFileError, match="posix.system") as err:
        deepspeed_api.load(path)
    assert str(path) in str(err.value) and not marker.exists()


def test_deepspeeds_own_loads_are_forced_to_weights_only(tmp_path):
    """Inside safe_loads a torch.load that asks for weights_only=False (as DeepSpeed's loaders
    do) is a weights_only load: refused, marker untouched; plain data still loads."""
    marker, path = tmp_path / "MARKER", tmp_path / "f.pt"
    plant(path, marker)
    with deepspeed_api.safe_loads(), pytest.raises(CheckpointError, match="refused"):
        torch.load(path, weights_only=False)
    assert not marker.exists()
    torch.save({"a": torch.ones(3), "b": [1, "x"]}, path)
    with deepspeed_api.safe_loads():
        assert torch.equal(torch.load(path, weights_only=False)["a"], torch.ones(3))
    assert torch.load is not None and "safe" not in getattr(torch.load, "__name__", "")


def test_rank_files_hold_no_numpy_objects(tmp_path):
    """The RNG state is plain data and tensors: a weights_only load needs no allow-list, and
    restoring it gives the same draws."""
    import numpy as np

    state = checkpoint.rng_state()
    torch.save(state, tmp_path / "r.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "r.pt")) == []
    want = np.random.rand(3)
    checkpoint.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    assert np.array_equal(np.random.rand(3), want)


def test_a_fifo_or_truncated_file_is_one_line_and_never_blocks(tmp_path):
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="not a regular file"):
        deepspeed_api.load(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        manifest.hash_file(fifo)
    assert time.monotonic() - t0 < 5
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    good.write_bytes(good.read_bytes()[:700])
    with pytest.raises(CheckpointError, match="cannot be read") as err:
        deepspeed_api.load(good)
    assert str(good) in str(err.value)


# ---- manifests ------------------------------------------------------------------------------


def test_manifest_names_flipped_truncated_added_and_swapped_files(tmp_path):
    d = make_step(tmp_path, 2)
    listed = manifest.read(d)
    assert set(listed) == {"mp_rank_00_model_states.pt", "rank_00000.pt"}
    assert manifest.verify_folder(d, listed) == []
    flip(d / "rank_00000.pt")
    assert [str(x) for x in manifest.verify_folder(d, listed)] == [
        "rank_00000.pt: content differs from the manifest (sha256)"
    ]
    model = d / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])
    (d / "extra.pt").write_bytes(b"x")
    damage = {x.file: x.what for x in manifest.check_sizes(d, listed)}
    assert damage["extra.pt"] == "not listed in the manifest"
    assert damage["mp_rank_00_model_states.pt"].startswith("size 100 bytes")
    (d / "extra.pt").unlink()
    (d / "rank_00000.pt").unlink()
    os.symlink("/etc/hostname", d / "rank_00000.pt")  # a link out of the folder
    damage = {x.file: x.what for x in manifest.check_sizes(d, listed)}
    assert damage["rank_00000.pt"] == "not a regular file"


@pytest.mark.parametrize(
    "doc",
    [
        "not json",
        json.dumps({"format": "x", "files": {}}),
        json.dumps({"format": manifest.FORMAT, "files": {"../../etc/passwd": {}}}),
        json.dumps({"format": manifest.FORMAT, "files": {"/abs": {"size": 1, "sha256": "0"}}}),
    ],
)
def test_a_damaged_manifest_is_damage_not_a_crash(tmp_path, doc):
    d = make_step(tmp_path, 2)
    (d / manifest.MANIFEST).write_text(doc)
    with pytest.raises(CheckpointError, match="manifest.json is damaged"):
        manifest.read(d)
    assert [x.file for x in integrity.structural_damage(d)] == [manifest.MANIFEST]


def test_hash_shares_are_the_same_on_every_rank_and_balanced(tmp_path):
    for i, size in enumerate([900, 500, 400, 300, 100]):
        (tmp_path / f"f{i}").write_bytes(b"x" * size)
    names = manifest.files_of(tmp_path)
    split = manifest.shares(tmp_path, names, 2)
    assert split == manifest.shares(tmp_path, list(reversed(names)), 2)
    assert sorted(sum(split, [])) == names
    loads = [sum((tmp_path / n).stat().st_size for n in part) for part in split]
    assert loads == [1200, 1000]


def test_a_step_without_manifest_is_damaged_only_beside_sealed_ones(tmp_path):
    """An earlier version's run (no manifest anywhere) still resumes; in a sealed run a
    removed manifest is damage."""
    old = make_step(tmp_path / "old", 2, seal=False)
    assert integrity.verify(old) == []
    new = make_run(tmp_path / "new")
    (new[1] / manifest.MANIFEST).unlink()
    assert [str(x) for x in integrity.verify(new[1])] == ["manifest.json: missing"]


# ---- choosing the step ----------------------------------------------------------------------


def test_missing_latest_with_steps_is_refused_not_a_fresh_start(tmp_path):
    make_run(tmp_path)
    (tmp_path / "latest").unlink()
    for spec in ("latest",):
        with pytest.raises(CheckpointError, match="latest is missing but 3 step directories"):
            integrity.resolve_resume(tmp_path, spec)
    assert integrity.resolve_resume(tmp_path, "latest_intact").name == "step_00000006"
    assert integrity.resolve_resume(tmp_path / "none", "latest") is None  # a new run


def test_latest_damaged_is_refused_naming_file_and_newest_intact(tmp_path):
    dirs = make_run(tmp_path)
    flip(dirs[2] / "mp_rank_00_model_states.pt")
    assert integrity.resolve_resume(tmp_path, "latest") == dirs[2]  # stat sees nothing
    for fn in (integrity.choose, lambda r, s: integrity.resolve_resume(r, s, full=True)):
        with pytest.raises(CheckpointError) as err:
            fn(tmp_path, "latest")
        line = str(err.value)
        assert "step_00000006 is damaged (mp_rank_00_model_states.pt: content differs" in line
        assert "newest intact step is step_00000004" in line
        assert "checkpoint.resume=latest_intact" in line
    (dirs[1] / "rank_00000.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="newest intact step is step_00000002"):
        integrity.choose(tmp_path, "latest")


def test_latest_intact_sets_damaged_steps_aside_and_keeps_them(tmp_path, capsys):
    dirs = make_run(tmp_path)
    flip(dirs[2] / "rank_00000.pt")
    (dirs[1] / "rank_00000.pt").unlink()
    assert integrity.choose(tmp_path, "latest_intact") == dirs[0]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "latest",
        "step_00000002",
        "step_00000004.damaged",
        "step_00000006.damaged",
    ]
    err = capsys.readouterr().err
    assert "step_00000006 is damaged (rank_00000.pt: content differs" in err
    assert "set aside as step_00000004.damaged" in err
    flip(dirs[0] / "rank_00000.pt")
    with pytest.raises(CheckpointError, match="all damaged"):
        integrity.choose(tmp_path, "latest_intact")


def test_a_path_to_a_damaged_step_names_the_intact_path(tmp_path):
    dirs = make_run(tmp_path)
    flip(dirs[1] / "rank_00000.pt")
    with pytest.raises(CheckpointError) as err:
        integrity.choose(tmp_path, str(dirs[1]))
    assert f"checkpoint.resume={dirs[0]}" in str(err.value)


def test_readers_pin_the_step_they_read_against_pruning(tmp_path):
    """A reader in another process holds the pin of step 2: pruning (keep 1) leaves it; once
    the reader has gone, the next prune removes it."""
    dirs = make_run(tmp_path)
    code = (
        "import sys, time; from pathlib import Path; from dist_contrast.train import pins\n"
        "with pins.pinned(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n"
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", code, str(dirs[0])], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline().strip() == "held"
        assert pins.is_pinned(dirs[0]) and not pins.is_pinned(dirs[1])
        checkpoint._prune(tmp_path, keep=1)
        assert [p.name for p in checkpoint.step_dirs(tmp_path)] == [
            "step_00000002",
            "step_00000006",
        ]
    finally:
        reader.kill()
        reader.wait()
    checkpoint._prune(tmp_path, keep=1)
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step_00000006"]
    assert not (tmp_path / pins.PINS / "step_00000002").exists()


def test_reading_verifies_and_says_how_to_take_the_intact_step(tmp_path):
    dirs = make_run(tmp_path)
    with integrity.reading(tmp_path) as step_dir:
        assert step_dir == dirs[2] and pins.is_pinned(dirs[2])
    assert not pins.is_pinned(dirs[2])
    flip(dirs[2] / "rank_00000.pt")
    with pytest.raises(CheckpointError, match="newest intact step is step_00000004: read it "
                       "with --step 4"):  # fmt: skip
        with integrity.reading(tmp_path):
            pass
    with integrity.reading(tmp_path, step=4) as step_dir:
        assert step_dir == dirs[1]
    with pytest.raises(CheckpointError, match=r"has no step 5 \(steps: 2, 4, 6\)"):
        with integrity.reading(tmp_path, step=5):
            pass
    (tmp_path / "latest").unlink()
    with pytest.raises(CheckpointError, match="choose one with --step N"):
        with integrity.reading(tmp_path):
            pass


def test_a_step_dir_linked_from_elsewhere_is_not_a_step(tmp_path):
    outside = make_step(tmp_path / "elsewhere", 8)
    root = tmp_path / "ckpt"
    make_run(root)
    os.symlink(outside, root / "step_00000008")
    assert [p.name for p in checkpoint.step_dirs(root)][-1] == "step_00000006"
    (root / "latest").write_text("step_00000008\n")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        checkpoint.read_latest(root)


# ---- the run dir is never started over ------------------------------------------------------


def _cfg(run_dir: Path, **extra) -> object:
    tree: dict = {"run": {"dir": str(run_dir.parent), "name": run_dir.name}}
    for key, value in extra.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    return config_from_dict(tree)


def test_a_fresh_start_over_earlier_work_is_refused(tmp_path):
    from dist_contrast.train.runs import check_run_dir

    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(CheckpointError, match="metrics of an earlier run.*run.overwrite=true"):
        check_run_dir(_cfg(run))
    make_run(run / "checkpoints")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        check_run_dir(_cfg(run))
    older = str(run / "checkpoints" / "step_00000002")
    with pytest.raises(CheckpointError, match="older step of this run.*up to step_00000006"):
        check_run_dir(_cfg(run, checkpoint__resume=older))
    check_run_dir(_cfg(run, checkpoint__resume=str(run / "checkpoints" / "step_00000006")))
    check_run_dir(_cfg(run, checkpoint__resume="latest"))
    check_run_dir(_cfg(run, run__overwrite=True))


def test_overwrite_deletes_only_when_asked(tmp_path):
    from dist_contrast.train.runs import clear_for_overwrite

    run = tmp_path / "r"
    dirs = make_run(run / "checkpoints")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "config.yaml").write_text("run: {}\n")
    assert clear_for_overwrite(_cfg(run), None) == []
    gone = clear_for_overwrite(_cfg(run, run__overwrite=True), dirs[0])
    assert gone == ["checkpoints/step_00000004", "checkpoints/step_00000006"]
    assert clear_for_overwrite(_cfg(run, run__overwrite=True), None) == [
        "checkpoints",
        "metrics.jsonl",
    ]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


# ---- DeepSpeed's config and version ---------------------------------------------------------


def test_deepspeed_version_is_the_one_this_adapter_was_checked_with():
    """An upgrade of DeepSpeed fails here first: check deepspeed_api.py against it (the
    universal checkpoint's private flag, zero_to_fp32, the classes its files hold), then
    widen CHECKED."""
    deepspeed_api.check_version()
    names = [g.__name__ for g in deepspeed_api.safe_globals()]
    assert {"fragment_address", "LossScaler", "ZeroStageEnum"} <= set(names)


def test_the_planners_zero_defaults_are_deepspeeds():
    """``plan`` counts with these when ``deepspeed.raw`` leaves them out: a DeepSpeed that
    changes a default fails here (the reduce bucket alone is 0.93 GiB in bf16)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig()
    for key, value in deepspeed_api.ZERO_DEFAULTS.items():
        assert getattr(zero, key.removeprefix("stage3_")) == value, key


def test_the_engines_flatten_is_read_only_until_copied_back():
    """keep_flat_buffer lets the next flatten overwrite the last one's result: safe while the
    engine flattens in ``allreduce_bucket`` alone, whose one caller copies the result back into
    the gradients before it returns. A DeepSpeed that flattens elsewhere fails here."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine

    source = inspect.getsource(DeepSpeedEngine)
    assert source.count("self.flatten(") == 1
    assert "tensor = self.flatten(bucket)" in inspect.getsource(DeepSpeedEngine.allreduce_bucket)
    assert source.count("self.allreduce_bucket(") == 1
    copy_back = inspect.getsource(DeepSpeedEngine.allreduce_and_copy)
    assert "self.allreduce_bucket(" in copy_back and "buf.copy_(synced)" in copy_back


def test_zeros_allreduce_bucket_results_are_copied_out_at_once():
    """keep_flat_buffer gives ZeRO-1/2/3's ``allreduce_bucket`` a kept flat buffer: safe while
    every caller unflattens the result into the gradients before the next call."""
    import inspect

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls, callers in ((DeepSpeedZeroOptimizer, 3), (DeepSpeedZeroOptimizer_Stage3, 1)):
        assert "tensor = self.flatten(bucket)" in inspect.getsource(cls.allreduce_bucket)
        found = []
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            text = inspect.getsource(fn)
            if "self.allreduce_bucket(" in text:
                found.append(name)
                assert "self.unflatten(allreduced" in text, name
        assert len(found) == callers, found


def test_zeros_weight_gather_goes_through_the_backends_gather_function():
    """gather_by_broadcast_on_gloo swaps ``TorchBackend.all_gather_function``: it reaches
    ZeRO-1/2's weight all-gather while that calls ``all_gather_into_tensor`` of deepspeed.comm,
    which calls the backend's method, which calls the function."""
    import importlib
    import inspect

    from deepspeed.comm import comm
    from deepspeed.runtime import utils

    backend = importlib.import_module("deepspeed.comm.torch")  # the attribute is torch itself
    gather = inspect.getsource(utils.all_gather_into_tensor_dp_groups)
    assert "dist.all_gather_into_tensor(" in gather
    # the two methods are wrapped (timed_op, stage_on_cpu): their modules' text
    assert "return cdb.all_gather_into_tensor(" in inspect.getsource(comm)
    assert "return self.all_gather_function(output_tensor=" in inspect.getsource(backend)


def _second_world_in_one_process(rank: int, world: int) -> list[bool]:
    """In a rank of run_ranks: DeepSpeed's world clone, the default group destroyed and made
    again (another port), then what drop_stale_groups keeps."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    from dist_contrast.distributed import free_port

    deepspeed.init_distributed("gloo")  # over the group run_ranks made, as initialize does
    first = groups._clone_world_group()
    groups._WORLD_GROUP = first
    deepspeed_api.drop_stale_groups()
    kept_live = groups._WORLD_GROUP is first
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    with pytest.raises(ValueError, match="not registered"):
        dist.get_rank(first)  # what deepspeed.initialize would meet
    deepspeed_api.drop_stale_groups()
    dropped = groups._WORLD_GROUP is None
    fresh = groups._clone_world_group()  # DeepSpeed clones the live world again
    return [kept_live, dropped, dist.get_rank(fresh) == 0]


def test_deepspeeds_world_clone_is_dropped_once_stale():
    """A second run in one process (bench train in both orders, a notebook) must not meet the
    world group DeepSpeed cloned in the first: stale clones are dropped, a live one kept."""
    from multiproc import run_ranks

    assert run_ranks(_second_world_in_one_process, 1) == [[True, True, True]]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"zero_optimization": {"stag": 2}}, "stag: Extra inputs are not permitted"),
        ({"bf16": {"enabled": "maybe"}}, "enabled: Input should be a valid boolean"),
        ({"train_batch_size": 7}, "train_batch_size 7 != train_micro_batch_size_per_gpu"),
    ],
)
def test_deepspeed_raw_is_checked_by_deepspeeds_config_model(raw, expected):
    from dist_contrast.train.setup import deepspeed_config

    cfg = config_from_dict({"train": {"batch_size": 8}, "deepspeed": {"raw": raw}})
    with pytest.raises(ConfigError, match="deepspeed.raw") as err:
        deepspeed_api.check_config(deepspeed_config(cfg, 2), 2)
    assert expected in str(err.value)
    good = config_from_dict({"train": {"batch_size": 8}})
    deepspeed_api.check_config(deepspeed_config(good, 4), 4)
