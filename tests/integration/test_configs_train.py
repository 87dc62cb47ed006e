"""Every digits config trains on 2 ranks (torchrun, DeepSpeed, gloo) as its header says:
a couple of steps, a checkpoint, a finite loss in metrics.jsonl. Every ImageNet template
loads, builds its method and names its Slurm command.

The configs are globbed when the tests are collected, so a new configs/*_digits.yaml is covered
without touching this file. Each run is as small as the config allows (2 steps of 16 samples
per rank, no loader workers); the config's method, loss, model and DeepSpeed stage are kept.
A cheap subset also trains in bf16 and is compared with its fp32 run (each run made once).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dist_contrast.config import load_config
from dist_contrast.methods import build_method

from conftest import ROOT, run_torchrun

CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*_digits.yaml"))
TEMPLATES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("imagenet/*"))
STEPS = 2


def test_configs_found():
    assert "configs/simclr_digits.yaml" in CONFIGS and len(CONFIGS) >= 2


@pytest.mark.parametrize("config", TEMPLATES)
def test_imagenet_template_builds(config):
    text = (ROOT / config).read_text()
    assert f"sbatch slurm/train.sbatch {config}" in text
    cfg = load_config(ROOT / config, ["model.norm=batch"])  # sync_batch needs CUDA
    assert cfg.data.image_size == 224 and cfg.model.encoder == "resnet50"
    method = build_method(cfg)
    assert method.encoder.out_dim == 2048  # ResNet-50's representation


IMAGE_TEXT = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("image_text/*.yaml")
)


@pytest.mark.parametrize("config", IMAGE_TEXT)
def test_image_text_template_builds(config):
    text = (ROOT / config).read_text()
    assert f"sbatch slurm/train.sbatch {config}" in text
    # its BPE tokenizer.json is trained on the user's shards; the byte tokenizer stands in
    cfg = load_config(ROOT / config, ["data.tokenizer=bytes", "data.tokenizer_path="])
    method = build_method(cfg)
    towers = method.towers()
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in towers.items()}
    assert cfg.model.encoder == "vit_base" and cfg.model.patch_size == 16
    assert abs(count["image"] - 85.8e6) < 0.2e6  # ViT-B/16 without a head
    # CLIP's text transformer (12 x width 512) less its 49,408 x 512 token table
    assert abs(count["text"] - 37.9e6) < 0.3e6
    assert method.encode_text(torch.zeros(2, 77, dtype=torch.int64)).shape == (2, 512)


_RUNS: dict[tuple, tuple[object, list[dict]]] = {}


def train_briefly(config, tmp_path_factory, digits_dir, tokenizer, **extra):
    """(the run folder, its metrics.jsonl rows) of ``config`` trained STEPS steps of 16 samples
    per rank on 2 ranks; once per session for each (config, extra overrides)."""
    key = (config, *sorted(extra.items()))
    if key in _RUNS:
        return _RUNS[key]
    run_dir = tmp_path_factory.mktemp("config_run")
    overrides = {
        "run.dir": run_dir,
        "run.name": "run",
        "data.train_shards": f"{digits_dir}/train-*.tar",
        "data.val_shards": f"{digits_dir}/val-*.tar",
        "data.num_workers": 0,
        "train.steps": STEPS,
        "train.batch_size": 16,
        "train.warmup_steps": 0,
        "train.log_every": 1,
        "checkpoint.every": STEPS,
        "logging.wandb": "false",
        "logging.progress": "false",
        "logging.plots": "false",
        **extra,
    }
    if load_config(ROOT / config).data.tokenizer == "bpe":  # the one `make train` learns
        overrides["data.tokenizer_path"] = tokenizer
    args = [f"{k}={v}" for k, v in overrides.items()]
    proc = run_torchrun(2, "train", "--config", config, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir / "run"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:08d}" and (run / "checkpoints" / latest).is_dir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    _RUNS[key] = run, rows
    return run, rows


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_digits_config_trains_on_two_ranks(config, digits_dir, digits_tokenizer, tmp_path_factory):
    train_briefly(config, tmp_path_factory, digits_dir, digits_tokenizer)


# bf16 (DeepSpeed: bf16 weights and activations, losses in fp32) on the paths the other
# configs share: batch norm in the encoder (InstDisc, with its memory bank), in the heads with
# momentum twins (MoCo v3), and the tiled softmax with the text tower and sharded queues (CLIP).
# Every digits config was run so on 2 ranks when this was written (docs/training.md#precision).
BF16 = [
    pytest.param("configs/instdisc_digits.yaml", {}, id="instdisc-bn-encoder"),
    pytest.param("configs/moco_v3_digits.yaml", {}, id="moco_v3-bn-heads"),
    pytest.param("configs/clip_digits.yaml", {"loss.memory_efficient": "true"}, id="clip-tiled"),
]
# Step 1 is the loss of the same initial weights on the same batch: bf16 keeps 8 significant
# bits of every weight and activation, so it matches fp32 to a few percent (the tolerance of
# tests/gpu/test_train_cuda.py); the step after one update drifts further.
STEP1_TOL, LATER_TOL = (0.05, 0.02), (0.15, 0.1)  # relative, absolute


@pytest.mark.slow
@pytest.mark.parametrize("config,extra", BF16)
def test_config_trains_in_bf16(config, extra, digits_dir, digits_tokenizer, tmp_path_factory):
    """A few bf16 steps: finite losses that follow the fp32 run of the same config."""
    args = (config, tmp_path_factory, digits_dir, digits_tokenizer)
    _, fp32 = train_briefly(*args, **extra)
    run, bf16 = train_briefly(*args, **extra, **{"deepspeed.precision": "bf16"})
    for row, want, (rel, ab) in zip(bf16, fp32, [STEP1_TOL] + [LATER_TOL] * STEPS, strict=False):
        got, ref = row["loss"], want["loss"]
        assert abs(got - ref) <= rel * abs(ref) + ab, (config, row["step"], got, ref)
    assert "precision: bf16" in (run / "config.yaml").read_text()
