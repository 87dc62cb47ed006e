"""Every digits config trains on 2 ranks (torchrun, DeepSpeed, gloo) as its header says:
a couple of steps, a checkpoint, a finite loss in metrics.jsonl. Every ImageNet template
loads, builds its method and names its Slurm command.

The configs are globbed when the tests are collected, so a new configs/*_digits.yaml is covered
without touching this file. Each run is as small as the config allows (2 steps of 16 samples
per rank, no loader workers); the config's method, loss, model and DeepSpeed stage are kept.
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


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_digits_config_trains_on_two_ranks(config, digits_dir, digits_tokenizer, tmp_path):
    overrides = {
        "run.dir": tmp_path,
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
    }
    if load_config(ROOT / config).data.tokenizer == "bpe":  # the one `make train` learns
        overrides["data.tokenizer_path"] = digits_tokenizer
    args = [f"{k}={v}" for k, v in overrides.items()]
    proc = run_torchrun(2, "train", "--config", config, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:08d}" and (run / "checkpoints" / latest).is_dir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in rows), rows
