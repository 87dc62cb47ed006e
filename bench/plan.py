"""``dist-contrast bench plan``: the planner (``dist-contrast plan``) against real engine steps.

For each case (a config, its overrides and a world size W) it starts W ranks with torchrun
(gloo, this CPU), each of which builds the DeepSpeed engine and runs three steps on in-memory
batches, and compares, per rank:

- **memory**: the RSS high-water mark over building the engine and its steps, above the RSS
  before the engine was built, against the planner's total. Run with glibc's mmap threshold at
  64 KiB (set for the ranks), so that a freed tensor leaves the RSS and the high-water mark
  follows the live tensors; without it the heap keeps freed blocks and the peak reads 20-45%
  above the tensors'. The libraries and kernels a first step loads are not the config's: a
  DeepSpeed engine over one linear layer and a 2-sample step of the method are run and dropped
  before the baseline.
- **communication**: every ``torch.distributed`` collective of the third step is counted (the
  bytes of the tensor each rank hands in), by call site, against the planner's terms. The step
  runs under ``distributed.equal_rows()`` as ``Trainer.train_step`` runs it.

    dist-contrast bench plan [--case NAME ...] [--out bench/results/plan.json]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from dist_contrast_bench.common import default_out, write_json

# the CLIP configs' BPE file is made by `make data`, not tracked: the byte tokenizer instead
BYTES = ["data.tokenizer=bytes", "data.tokenizer_path="]
CASES = {  # name: (world, config, overrides): ResNet and ViT, CLIP/SimCLR/MoCo, ZeRO 0/2/3
    "simclr-resnet-w1-zero2": (1, "configs/simclr_digits.yaml", ["train.batch_size=256"]),
    "clip-vit-w1-zero2": (1, "configs/clip_vit_digits.yaml", ["train.batch_size=256", *BYTES]),
    "moco-resnet-w2-zero2": (2, "configs/moco_v2_digits.yaml", []),
    "clip-vit-tiled-w2-zero0": (
        2,
        "configs/clip_vit_digits.yaml",
        ["deepspeed.zero_stage=0", "loss.memory_efficient=true", "loss.tile=64", *BYTES],
    ),
    "simclr-resnet-w2-zero3": (
        2,
        "configs/simclr_digits.yaml",
        # parameters above 10k elements partitioned and gathered (DeepSpeed's default, 100k,
        # would keep every tensor of this small ResNet whole)
        [
            "deepspeed.zero_stage=3",
            "deepspeed.raw={zero_optimization: {stage3_param_persistence_threshold: 10000}}",
        ],
    ),
    "clip-vit-cached-accumulation-w2-zero2": (
        2,
        "configs/clip_vit_digits.yaml",
        ["train.accumulation=4", *BYTES],
    ),
    "clip-resnet-queues-w4-zero2": (
        4,
        "configs/clip_digits.yaml",
        ["train.batch_size=64", *BYTES],
    ),
}
COLLECTIVES = [
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "all_to_all_single",
]
# which argument holds what a rank hands in: (position, keyword)
SENT_ARG = {"all_gather": 1, "all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}
SENT_ARG.update({n: 0 for n in ("all_reduce", "broadcast", "reduce")})
SENT_ARG.update(reduce_scatter=1, all_to_all_single=1)
KEYWORDS = {"all_gather": "tensor", "all_gather_into_tensor": "input_tensor"}
KEYWORDS.update(reduce_scatter_tensor="input", reduce_scatter="input_list")
KEYWORDS.update(all_reduce="tensor", broadcast="tensor", reduce="tensor")
KEYWORDS.update(all_to_all_single="input")
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MIB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


class Counter:
    """Counts the bytes a rank sends through ``torch.distributed`` collectives while ``on``, by
    call site: what it hands in, and of a broadcast only on its source (the others receive;
    ZeRO-1/2's weight all-gather is one broadcast per rank on gloo, the bytes of the gather)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes: collections.Counter = collections.Counter()
        self.on = False
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, call):
        import torch.distributed as dist

        def counted(*args, **kwargs):
            if self.on and name == "broadcast":
                src = args[1] if len(args) > 1 else kwargs.get("src")
                if src != dist.get_rank():
                    return call(*args, **kwargs)
            if self.on:
                at = SENT_ARG[name]
                t = args[at] if len(args) > at else kwargs[KEYWORDS[name]]
                parts = t if isinstance(t, list | tuple) else [t]
                sent = sum(x.numel() * x.element_size() for x in parts)
                self.bytes[f"{name} {_site()}"] += sent
            return call(*args, **kwargs)

        return counted


def _site() -> str:
    """The innermost frame of dist_contrast or DeepSpeed that called the collective."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        for package in ("dist_contrast/", "deepspeed/"):
            if package in frame.filename:
                rel = package + frame.filename.rsplit(package, 1)[1]
                return f"{rel}:{frame.lineno}"
    return "?"


def _warm_up(cfg, world: int) -> None:
    """Load what a first engine step loads (DeepSpeed's modules, the kernels) and drop it."""
    import deepspeed
    import torch

    from dist_contrast.methods import build_method
    from dist_contrast.train import deepspeed_api
    from dist_contrast.train.plan import example_batch
    from dist_contrast.train.setup import deepspeed_config

    layer = torch.nn.Linear(4, 4)
    small = deepspeed_config(cfg, world)
    small.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    small["train_batch_size"] = world
    deepspeed_api.drop_stale_groups()
    engine, *_ = deepspeed.initialize(
        model=layer,
        optimizer=torch.optim.AdamW(layer.parameters()),
        config=small,
        dist_init_required=False,
    )
    engine.backward(engine(torch.ones(1, 4, dtype=_dtype(cfg))).sum())
    engine.step()
    method = build_method(cfg)
    method(example_batch(cfg, 2, _dtype(cfg))).loss.backward()
    del engine, method, layer
    gc.collect()


def _dtype(cfg):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.deepspeed.precision]


def one_step(engine, batch: dict, train):
    """One optimizer step as ``Trainer._optimizer_step`` takes it (accumulation included)."""
    from dist_contrast.train.accumulate import cached_step, plain_step

    if train.accumulation == 1:
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        return out
    accumulate = cached_step if train.accumulation_mode == "cached" else plain_step
    return accumulate(engine, batch, train.accumulation)


def probe(config: str, overrides: list[str]) -> None:
    """One rank of a case (under torchrun): measure, count, and print rank 0's JSON line."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from dist_contrast import distributed
    from dist_contrast.config import load_config
    from dist_contrast.methods import build_method
    from dist_contrast.train.plan import example_batch
    from dist_contrast.train.setup import wrap

    counter = Counter()
    env = distributed.init()
    cfg = load_config(config, overrides)
    _warm_up(cfg, env.world_size)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    torch.manual_seed(cfg.run.seed)
    engine, _, _ = wrap(build_method(cfg), cfg, env.world_size)
    batch = example_batch(cfg, cfg.train.batch_size, _dtype(cfg))
    for i in range(3):
        counter.on = i == 2
        with distributed.equal_rows():
            out = one_step(engine, batch, cfg.train)
        counter.on = False
        del out
    peak = _status("VmHWM") - base
    peaks = [None] * env.world_size
    dist.all_gather_object(peaks, peak)
    if env.rank == 0:
        sent = dict(counter.bytes)
        print(json.dumps({"peak_bytes": peaks, "sent_bytes": sent}), flush=True)
    # The engine and its groups go before the process group, as at the end of a run: left to
    # the interpreter's exit, a rank sometimes aborted there ("terminate called without an
    # active exception", SIGABRT) after its figures were printed (1 case in 7, twice, on a
    # loaded machine).
    del engine, batch
    gc.collect()
    distributed.shutdown()


def measure(name: str, timeout: float = 600) -> dict:
    """Run case ``name`` on its W ranks; the planner's figures beside the measured ones."""
    from dist_contrast.config import load_config
    from dist_contrast.train.plan import plan

    world, config, overrides = CASES[name]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, **MALLOC, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *(f"--nproc_per_node={world}", "-m", "dist_contrast_bench.plan", "--probe", config),
        *overrides,
    ]
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:  # a timeout or an interrupt: the ranks go too, not only torchrun
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    lines = [x for x in out.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        tail = (out + err)[-3000:]
        raise RuntimeError(f"bench plan: case {name} failed (exit {proc.returncode}):\n{tail}")
    measured = json.loads(lines[-1])
    predicted = plan(load_config(root / config, overrides), world)
    planned_sent = predicted["comm_bytes"]
    counted_sent = sum(measured["sent_bytes"].values())
    peak = max(measured["peak_bytes"])
    return {
        "case": name,
        "world": world,
        "config": config,
        "overrides": overrides,
        "predicted_bytes": predicted["resident_bytes"],
        "predicted_gpu_bytes": predicted["total_bytes"],
        "measured_peak_bytes": measured["peak_bytes"],
        "memory_ratio": predicted["resident_bytes"] / peak,
        "terms": {t["name"]: t["bytes"] for t in predicted["terms"]},
        "planned_sent_bytes": planned_sent,
        "counted_sent_bytes": counted_sent,
        "planned_comm": {t["name"]: t["bytes"] for t in predicted["comm"]},
        "counted_comm": measured["sent_bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-contrast bench plan", description=__doc__)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    parser.add_argument("--out", default=default_out("plan.json"))
    parser.add_argument("--probe", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(args.probe[0], args.probe[1:])
        return 0
    rows = []
    print(
        "| case | W | predicted MiB | measured MiB (max of ranks) | ratio | sent: plan / counted |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for name in args.case or CASES:
        r = measure(name)
        rows.append(r)
        same = "equal" if r["planned_sent_bytes"] == r["counted_sent_bytes"] else "DIFFERENT"
        print(
            f"| {name} | {r['world']} | {r['predicted_bytes'] / MIB:.1f} | "
            f"{max(r['measured_peak_bytes']) / MIB:.1f} | {r['memory_ratio']:.3f} | "
            f"{r['planned_sent_bytes']:,} / {r['counted_sent_bytes']:,} {same} |",
            flush=True,
        )
    print(f"wrote {write_json(args.out, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
