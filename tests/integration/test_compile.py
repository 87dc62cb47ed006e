"""``train.compile``: the towers' blocks under torch.compile (inductor on this CPU) inside the
DeepSpeed engine give the eager losses, with batch norm and activation checkpointing; a run
resumed with compile on is exact. (The compiled block against eager, ZeRO-3 refused:
tests/unit/test_compile_blocks.py.)"""

import json

import pytest

from conftest import run_torchrun

STEPS = 20
# Compiled kernels sum in another order than eager's (inductor's own batch-norm reductions, fused
# LayerNorm/GELU), so the losses differ by rounding: at most 6.4e-7 relative over the first 3
# steps of every config here. Training then amplifies it, most with batch norm over 16 samples
# per rank: measured over 20 steps on the AMD EPYC, CLIP ViT 1.3e-7, MoCo v2 1.1e-4, SimCLR
# 4.8e-3. Eager itself moves as much when only the convolution kernels change (mkldnn off:
# 3e-4 after 20 steps of a ResNet with batch norm, where compiled moved 7e-5; docs/training.md,
# "torch.compile"). Bounds: 1e-5 for the first steps, then per config.
FIRST, RTOL_FIRST = 3, 1e-5
RTOL = {"simclr": 2e-2, "moco_v2": 2e-2, "clip_vit": 1e-5}

# Each config with what makes it exercise compile: batch norm and activation checkpointing in
# the ResNet (SimCLR, MoCo v2 with shuffle-BN and its momentum twin), the ViT and the text
# transformer (CLIP); all tiny.
CASES = {
    "simclr": (
        "configs/simclr_digits.yaml",
        {"model.width": 8, "model.norm": "batch", "model.activation_checkpointing": "true"},
    ),
    "moco_v2": (
        "configs/moco_v2_digits.yaml",
        {
            "model.width": 8,
            "model.norm": "batch",
            "model.activation_checkpointing": "true",
            "method.shuffle_bn": "true",
            "method.queue_size": 64,
        },
    ),
    "clip_vit": (
        "configs/clip_vit_digits.yaml",
        {
            "model.vit_width": 32,
            "model.vit_depth": 2,
            "model.vit_heads": 2,
            "model.activation_checkpointing": "true",
            "text.width": 32,
            "text.layers": 1,
            "text.heads": 2,
        },
    ),
}


def _train(config, overrides, digits_dir, digits_tokenizer, run_dir, **extra):
    base = {
        **({"data.tokenizer_path": str(digits_tokenizer)} if "clip" in config else {}),
        "run.dir": str(run_dir.parent),
        "run.name": run_dir.name,
        "data.train_shards": f"{digits_dir}/train-*.tar",
        "data.val_shards": "",
        "data.num_workers": 1,
        "train.steps": STEPS,
        "train.batch_size": 16,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "checkpoint.every": 10,
        "logging.wandb": "false",
        "logging.progress": "false",
        "logging.plots": "false",
        **overrides,
        **extra,
    }
    args = [f"{k}={v}" for k, v in base.items()]
    proc = run_torchrun(2, "train", "--config", config, *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_losses_equal_eager_over_20_steps(case, digits_dir, digits_tokenizer, tmp_path):
    config, overrides = CASES[case]
    runs = {
        on: _train(
            config, overrides, digits_dir, digits_tokenizer, tmp_path / on, **{"train.compile": on}
        )
        for on in ("false", "true")
    }
    steps, eager = runs["false"]
    assert steps == list(range(1, STEPS + 1))
    assert runs["true"][0] == steps
    compiled = runs["true"][1]
    assert compiled[:FIRST] == pytest.approx(eager[:FIRST], rel=RTOL_FIRST)
    assert compiled == pytest.approx(eager, rel=RTOL[case])


@pytest.mark.slow
def test_a_compiled_run_resumes_exactly(digits_dir, digits_tokenizer, tmp_path):
    """MoCo v2 (batch norm, checkpointing, the momentum twin and the queue), compiled: 20 steps
    straight equal 10 steps, a resume in a fresh process (compiled anew) and 10 more, bit for
    bit."""
    config, overrides = CASES["moco_v2"]
    on = {"train.compile": "true"}
    args = (config, overrides, digits_dir, digits_tokenizer)
    straight = _train(*args, tmp_path / "a", **on)
    _train(*args, tmp_path / "b", **on, **{"train.stop_at": 10})
    resumed = _train(*args, tmp_path / "b", **on, **{"checkpoint.resume": "latest"})
    assert resumed == straight
