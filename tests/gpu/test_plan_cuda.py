"""The planner (``dist-contrast plan``) against the CUDA allocator: what the first lent GPU
checks. On the CPU (tests/integration/test_plan.py) the planner's total is within 15% of the RSS
peak of real steps; here the same prediction, made from the CPU count of activations, is
compared with ``torch.cuda.max_memory_allocated`` over building the engine and two steps.

If this fails, the CPU's count is not the GPU's (attention kernels that save less, cuDNN
workspaces): the figures of docs/scaling.md then need a GPU count, and the note of the run
says by how much. ``reduce_bucket_size`` is set small (the planner reads it) so that the
activations, not DeepSpeed's 2 GB bucket, make the total.
"""

from __future__ import annotations

import pytest
import torch
from gpu_device import DEVICE, MARKS, cuda_only, one_rank

from dist_contrast.config import load_config
from dist_contrast.methods import build_method
from dist_contrast.train.engine import to_device
from dist_contrast.train.plan import example_batch, plan
from dist_contrast.train.setup import wrap

from conftest import ROOT

pytestmark = [*MARKS, cuda_only]

SMALL_BUCKET = "deepspeed.raw={zero_optimization: {reduce_bucket_size: 2000000}}"
CASES = {
    "simclr-resnet": ("configs/simclr_digits.yaml", ["train.batch_size=256"]),
    "clip-vit": (
        "configs/clip_vit_digits.yaml",
        ["train.batch_size=256", "data.tokenizer=bytes", "data.tokenizer_path="],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_within_15_percent_of_the_cuda_peak(case):
    config, overrides = CASES[case]
    cfg = load_config(ROOT / config, [*overrides, SMALL_BUCKET])
    predicted = plan(cfg, 1)["total_bytes"]
    one_rank()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(cfg.run.seed)
    engine, _, _ = wrap(build_method(cfg), cfg, 1)
    batch = to_device(example_batch(cfg, cfg.train.batch_size), DEVICE)
    for _ in range(2):
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    print(f"{case}: predicted {predicted / 2**20:.1f} MiB, CUDA peak {peak / 2**20:.1f} MiB")
    assert abs(predicted / peak - 1) <= 0.15, (predicted, peak)
