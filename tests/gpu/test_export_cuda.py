"""``load_encoder(device="cuda")`` and ``load_clip(device="cuda")`` equal the CPU load.

Every method's export (written as tests/integration/test_export_towers.py writes it) is loaded
on the CPU and on the device: the weights are the same bits, every parameter and the
preprocessing live on the device, and the device's features equal the CPU's to fp32 rounding of
another kernel (``rtol 1e-4, atol 1e-5``; TF32 off).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu_device import DEVICE, MARKS, reuse

from dist_contrast.export import load_clip, load_encoder
from dist_contrast.export.write import ExportOptions, write_method
from dist_contrast.methods import METHODS

export_tests = reuse("integration", "test_export_towers")

pytestmark = MARKS

TOL = {"rtol": 1e-4, "atol": 1e-5}


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.device.type == DEVICE.type, what
    got, want = got.cpu().float(), want.float()
    assert torch.allclose(got, want, **TOL), (what, (got - want).abs().max().item())


def exported(name: str, digits, tokenizer, tmp_path):
    cfg, method = export_tests._method(name, digits, tokenizer)
    folder = tmp_path / "export"
    folder.mkdir()
    source = {"run": "test", "checkpoint": "step_00000001", "step": 1, "world_size": 1}
    write_method(method, cfg, folder, ExportOptions(), source, tmp_path)
    return cfg, method, folder


@pytest.mark.parametrize("name", sorted(METHODS))
def test_load_encoder_on_the_device_equals_the_cpu_load(
    name, digits_dir, digits_tokenizer, tmp_path
):
    cfg, method, folder = exported(name, digits_dir, digits_tokenizer, tmp_path)
    g = torch.Generator().manual_seed(0)
    for tower in method.towers():
        cpu, dev = load_encoder(folder, tower), load_encoder(folder, tower, device=DEVICE)
        assert dev.device.type == DEVICE.type and not dev.module.training
        assert all(t.device.type == DEVICE.type for t in dev.module.state_dict().values())
        want = cpu.module.state_dict()
        for key, value in dev.module.state_dict().items():
            assert torch.equal(value.cpu(), want[key]), (tower, key)
        if tower == "image":
            images = [np.asarray(torch.randint(0, 256, (20, 18, 1), generator=g), np.uint8)]
            images.append(images[0][::-1].copy())
            x = torch.randn(3, cfg.data.channels, 16, 16, generator=g)
            with torch.no_grad():
                close(dev.module(x.to(DEVICE)), cpu.module(x), f"{name} image")
            close(dev.preprocess(images), cpu.preprocess(images), f"{name} preprocess")
            close(dev.embed(images), cpu.embed(images), f"{name} embed images")
        elif tower == "text":
            captions = ["a photo of the digit 3", "a handwritten seven"]
            close(dev.embed(captions), cpu.embed(captions), f"{name} embed text")


def test_load_clip_on_the_device_equals_the_cpu_load(digits_dir, digits_tokenizer, tmp_path):
    _, _, folder = exported("clip", digits_dir, digits_tokenizer, tmp_path)
    cpu, dev = load_clip(folder), load_clip(folder, device=DEVICE)
    assert dev.logit_scale == cpu.logit_scale
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    captions = ["zero", "a handwritten seven", "the digit 3", "nine"]
    close(dev.encode_image(images), cpu.encode_image(images), "clip image")
    close(dev.encode_text(captions), cpu.encode_text(captions), "clip text")
    logits = dev.logit_scale * dev.encode_image(images) @ dev.encode_text(captions).T
    want = cpu.logit_scale * cpu.encode_image(images) @ cpu.encode_text(captions).T
    close(logits, want, "clip logits")
