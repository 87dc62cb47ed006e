import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from dist_contrast.config import DIGIT_NAMES, AugmentConfig, DataConfig
from dist_contrast.data.loader import train_loader
from dist_contrast.data.pipeline import _read, read_captioned
from dist_contrast.data.shards import resolve_shards
from dist_contrast.data.tario import Faults
from dist_contrast.errors import DataError
from dist_contrast.train import preempt


def test_digits_shards_counts_split_and_content(digits_dir):
    counts = json.loads((digits_dir / "counts.json").read_text())
    assert counts["train"]["samples"] + counts["val"]["samples"] == 1797
    for split in ("train", "val"):
        total = 0
        for name, n in counts[split]["shards"].items():
            with tarfile.open(digits_dir / name) as tar:
                keys = {m.name.split(".")[0] for m in tar.getmembers()}
                exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
            assert len(keys) == n and exts == {"png", "cls", "txt", "json"}
            total += n
        assert total == counts[split]["samples"]
        images, labels = read_captioned(
            resolve_shards(str(digits_dir / f"{split}-*.tar")), DataConfig(), require_caption=False
        )[:2]
        assert images.shape == (total, 1, 16, 16)
        assert set(labels.tolist()) == set(range(10))  # stratified: every class in both


def test_resolve_shards_patterns(digits_dir, tmp_path):
    d = str(digits_dir)
    assert len(resolve_shards(f"{d}/train-*.tar")) == 15
    assert len(resolve_shards(f"{d}/train-{{000000..000004}}.tar")) == 5
    both = resolve_shards(f"{d}/train-000000.tar,{d}/val-{{000000,000001}}.tar")
    assert [p.rsplit("/", 1)[1] for p in both] == [
        "train-000000.tar",
        "val-000000.tar",
        "val-000001.tar",
    ]
    assert resolve_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]
    with pytest.raises(DataError, match=r"shard pattern '.*nothing-\*\.tar' matched no file"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))


def _loader(shards, rank=0, world=1, workers=0, batch=1, seed=0, **data):
    cfg = DataConfig(
        train_shards=shards,
        num_workers=workers,
        image_size=8,
        shuffle_buffer=data.pop("shuffle_buffer", 16),
        **data,
    )
    return train_loader(cfg, AugmentConfig(), batch, seed, rank, world)


def test_split_by_rank_and_worker_covers_each_sample_once(digits_dir):
    shards = str(digits_dir / "train-*.tar")
    seen = []
    for rank in range(2):
        seen += [int(i) for b in _loader(shards, rank, 2, 2).iter_epoch() for i in b["index"]]
    assert len(seen) == len(set(seen)) == 1437


def test_resampled_epoch_has_the_set_length_and_repeats(digits_dir):
    shards = str(digits_dir / "val-*.tar")
    loader = _loader(shards, 0, 2, 2, batch=5, resampled=True, epoch_samples=400)
    batches = list(loader.iter_epoch())
    assert len(batches) == 2 * (100 // 5)  # 400 / (2 ranks x 2 workers) per reader, 2 workers
    idx = [int(i) for b in batches for i in b["index"]]
    assert len(set(idx)) < len(idx)  # drawn with replacement
    assert loader.epoch == 1


def test_stream_is_reproducible_and_reshuffles_per_epoch(digits_dir):
    shards = str(digits_dir / "train-00000[0-3].tar")
    a = [b["index"] for b in _loader(shards, seed=3).iter_epoch()]
    b = [b["index"] for b in _loader(shards, seed=3).iter_epoch()]
    loader = _loader(shards, seed=3)
    list(loader.iter_epoch())
    c = [b["index"] for b in loader.iter_epoch()]
    assert torch.equal(torch.cat(a), torch.cat(b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    assert sorted(torch.cat(a).tolist()) == sorted(torch.cat(c).tolist())


def test_started_workers_run_ahead_and_deliver_the_same_batches(digits_dir):
    shards = str(digits_dir / "train-00000[0-3].tar")
    want = [b["index"] for b in _loader(shards, workers=2, batch=5).iter_epoch()]
    loader = _loader(shards, workers=2, batch=5)
    loader.start()
    assert len(multiprocessing.active_children()) >= 2  # forked before a batch is asked for
    loader.start()  # a no-op once started
    got = [b["index"] for b in loader.iter_epoch()]
    assert torch.equal(torch.cat(want), torch.cat(got))


def test_close_ends_workers_that_hold_stop_signals(digits_dir):
    """Workers forked inside preempt.held() ignore SIGTERM (torch's shutdown and
    multiprocessing's exit handler send only that); close() ends them all the same, and the
    stream goes on from the same position afterwards."""
    shards = str(digits_dir / "train-00000[0-3].tar")
    want = [b["index"] for b in _loader(shards, workers=2, batch=5).iter_epoch()]
    loader = _loader(shards, workers=2, batch=5)
    with preempt.held():
        loader.start()
    batches = iter(loader)
    got = [next(batches)["index"] for _ in range(3)]
    workers = list(loader._it._workers)
    os.kill(workers[0].pid, signal.SIGTERM)
    workers[0].join(1.0)
    assert workers[0].is_alive()  # the stop signal is held: a plain terminate() cannot end it
    start = time.monotonic()
    loader.close(grace_s=2.0)
    assert time.monotonic() - start < 15
    assert not any(w.is_alive() for w in workers)
    loader.close()  # idempotent
    got += [b["index"] for b in loader.iter_epoch()]  # new workers, from the same position
    assert torch.equal(torch.cat(want), torch.cat(got))
    loader.close()


def test_workers_die_with_a_killed_training_process(digits_dir):
    """A rank killed outright cannot close its loader: its workers must not outlive it (they
    hold SIGTERM blocked; one used to block for ever flushing into a pipe nobody read)."""
    script = f"""
import sys
from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.loader import train_loader
from dist_contrast.train import preempt
cfg = DataConfig(train_shards="{digits_dir}/train-*.tar", num_workers=2, image_size=8)
loader = train_loader(cfg, AugmentConfig(), 5, 0, 0, 1)
with preempt.held():
    loader.start()
print(" ".join(str(w.pid) for w in loader._it._workers), flush=True)
sys.stdin.read()  # until killed
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2
        time.sleep(1.0)  # the workers fill their prefetch slots
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers), "workers outlived their process"
    finally:
        proc.kill()
        for pid in workers if "workers" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_views_are_uint8_crops_and_batches_full(digits_dir):
    loader = _loader(str(digits_dir / "train-*.tar"), batch=7)
    batch = next(iter(loader))
    assert batch["view1"].shape == (7, 1, 8, 8) and batch["view1"].dtype == torch.uint8
    assert not torch.equal(batch["view1"], batch["view2"])
    assert batch["label"].shape == (7,)
    for caption, label in zip(batch["caption"], batch["label"].tolist(), strict=True):
        assert DIGIT_NAMES[label] in caption.replace(",", "").split()  # "the number seven"


def test_caption_tokens_are_cut_after_the_batch_longest_caption(digits_dir):
    from dist_contrast.data.tokenizer import ByteTokenizer

    loader = _loader(str(digits_dir / "train-*.tar"), batch=9, tokenizer="bytes")
    tok = ByteTokenizer(DataConfig().context_length)
    for batch, _ in zip(loader.iter_epoch(), range(3), strict=False):
        full = tok(batch["caption"])
        longest = max(row.tolist().index(tok.eot_id) + 1 for row in full)
        assert batch["tokens"].shape == (9, longest) and longest < full.shape[1]
        assert torch.equal(batch["tokens"], full[:, :longest])


def test_too_few_shards_is_a_clear_error(digits_dir):
    with pytest.raises(DataError, match=r"4 shard\(s\) for 2 rank\(s\) x 3 worker\(s\)"):
        _loader(str(digits_dir / "val-*.tar"), 0, 2, 3)
    _loader(str(digits_dir / "val-*.tar"), 0, 2, 3, resampled=True, epoch_samples=100)


def test_mixed_sources_follow_their_weights(digits_dir):
    train, val = str(digits_dir / "train-*.tar"), str(digits_dir / "val-*.tar")
    loader = _loader(
        [train, val], batch=50, train_weights=[1.0, 3.0], resampled=True, epoch_samples=2000
    )
    idx = torch.cat([b["index"] for b in loader.iter_epoch()])
    val_set = {json.loads(s["json"])["index"] for s in _read(resolve_shards(val), Faults())}
    frac_val = sum(int(i) in val_set for i in idx) / len(idx)
    assert 0.68 < frac_val < 0.82  # weights 1:3 -> 0.75
