"""No host synchronisation in the hot path: outside log steps, a training step reads at most one
value from the device to the host (the guard's all-reduced skip decision).

A host read is what blocks the CPU until the device's queue has run to that point (on a GPU it
stalls the launch queue): ``item()``, ``bool()``, ``float()``, ``int()``, ``tolist()``,
``numpy()`` of a tensor. On the CPU nothing stalls, but the calls are the same, so a
``TorchFunctionMode`` counts them, with where they came from, on 2 gloo ranks under DeepSpeed.
Two kinds are not ours and are listed apart: DeepSpeed's own checks of its gradient norm
(ZeRO 1-2 read it to decide overflow and clipping) and torch's optimizers reading their step
counts, which they keep on the host (not capturable), so no device is waited for.

The colour jitter takes a faster path on the CPU that reads (kornia's per-step ``.any()``
guards: free where there is no device; ``DeviceAugment.reads_free``); the runs here take the
path a GPU takes, so that what is counted is what a GPU step would read.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import config_from_dict
from multiproc import run_ranks

READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
}
NOT_OURS = {"deepspeed/": "deepspeed", "torch/optim/": "optimizer step counts (host tensors)"}


class CountReads(TorchFunctionMode):
    """Host reads by kind (ours, or one of NOT_OURS) and by the file:line that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.where: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.on and func in READS:
            frame = traceback.extract_stack(limit=2)[0]  # the caller of the read
            kind = next((k for p, k in NOT_OURS.items() if p in frame.filename), "ours")
            self.where[kind, f"{'/'.join(frame.filename.rsplit('/', 2)[-2:])}:{frame.lineno}"] += 1
        return func(*args, **(kwargs or {}))


def _paused(mode: CountReads, fn):
    def call(*args, **kwargs):
        before, mode.on = mode.on, False
        try:
            return fn(*args, **kwargs)
        finally:
            mode.on = before

    return call


def _count(rank: int, world: int, tree: dict) -> dict:
    """Host reads of the training steps of a short run (log steps' records, checkpoints and the
    loader's start not counted), by (kind, where)."""
    from dist_contrast.data.loader import train_loader
    from dist_contrast.methods import build_method
    from dist_contrast.train.engine import Trainer
    from dist_contrast.train.metrics import MetricsLogger
    from dist_contrast.train.setup import wrap

    cfg = config_from_dict(tree)
    torch.manual_seed(cfg.run.seed)
    engine, _, scheduler = wrap(build_method(cfg), cfg, world)
    loader = train_loader(cfg.data, cfg.augment, cfg.train.batch_size, 0, rank, world)
    trainer = Trainer(cfg, engine, scheduler, loader, rank, world)
    trainer.augment.reads_free = lambda x: False  # the GPU's jitter path (module docstring)
    trainer.ckpt_root.mkdir(parents=True, exist_ok=True)
    trainer.logger = MetricsLogger(cfg.run_dir, cfg, 0, enabled=rank == 0)
    mode = CountReads()
    augment = trainer.augment_batch

    def counted_augment(batch):  # counting starts with the first step's batch
        mode.on = True
        return augment(batch)

    trainer.augment_batch = counted_augment
    trainer.record, trainer.save = _paused(mode, trainer.record), _paused(mode, trainer.save)
    embedded, embed = [], trainer.engine.module.embed

    def recorded_embed(batch):  # every forward of the towers, with what it gave
        out = embed(batch)
        embedded.append({k: v.detach().clone() for k, v in out.items()})
        return out

    trainer.engine.module.embed = recorded_embed
    try:
        with mode:
            trainer.run()
    finally:
        trainer.logger.close()
        loader.close()
    return dict(mode.where), embedded


CASES = {
    # gathers of both modalities, sharded queues with momentum towers, learnable scale, ZeRO-2
    "clip_digits": {"data": {"tokenizer": "bytes", "tokenizer_path": ""}},
    # shuffled BatchNorm (gathers and a permutation), a queue, ZeRO-0
    "moco_v2_digits": {"model": {"width": 4}, "deepspeed": {"zero_stage": 0}},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_training_step_reads_the_device_at_most_once(name, digits_dir, tmp_path):
    import yaml

    from conftest import ROOT

    tree = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    steps = 6
    short = {
        "run": {"dir": str(tmp_path / "run")},
        "data": {"train_shards": f"{digits_dir}/train-*.tar", "val_shards": "", "num_workers": 0},
        "train": {"batch_size": 16, "steps": steps, "warmup_steps": 2, "log_every": 3},
        "checkpoint": {"every": 100},
        "logging": {"wandb": False, "progress": False, "plots": False},
    }
    for overrides in (short, CASES[name]):
        for section, values in overrides.items():
            tree.setdefault(section, {}).update(values)
    results = run_ranks(_count, 2, tree, timeout=300)
    for rank, (where, _) in enumerate(results):
        ours = {w: n for (kind, w), n in where.items() if kind == "ours"}
        assert sum(ours.values()) <= steps, f"rank {rank}: host reads in {steps} steps: {ours}"
        # and the counter sees them: the guard's decision, read once on every step
        assert sum(ours.values()) == steps, ours
    _check_log_steps_embed_once(results, steps, tmp_path / "run" / tree["run"]["name"])


def _check_log_steps_embed_once(results, steps: int, run_dir) -> None:
    """One forward of the towers per step, log steps included (the log line's alignment and
    uniformity come from the step's own embeddings: it used to embed the batch again, 2.9% of
    a step at log_every=10), and the logged figures are those embeddings' (mean over ranks)."""
    import json

    from dist_contrast.train.metrics import embedding_metrics

    for _, embedded in results:
        assert len(embedded) == steps
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "alignment" in x]
    assert [x["step"] for x in logged] == [3, 6]
    for line in logged:
        per_rank = [embedding_metrics(list(e[line["step"] - 1].values())) for _, e in results]
        for key in ("alignment", "uniformity"):
            want = sum(m[key] for m in per_rank) / len(per_rank)
            assert line[key] == pytest.approx(want, rel=1e-6, abs=1e-9), (line["step"], key)
