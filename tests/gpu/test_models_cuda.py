"""Encoders on CUDA: activation checkpointing gives the plain forward and backward, and
SyncBatchNorm in a process group of one rank is batch norm.

Tolerances: against the CPU in fp32 (another convolution / matmul kernel; TF32 off) outputs
``rtol 1e-4, atol 1e-5``, gradients ``rtol 1e-3, atol 1e-5``; checkpointing against no
checkpointing on the same device (the same kernels, recomputed) ``rtol 1e-5, atol 1e-6`` in fp32
and ``rtol 1e-2, atol 1e-2`` under bf16 autocast; batch-norm running statistics updated once.
"""

from __future__ import annotations

import pytest
import torch
from gpu_device import DEVICE, MARKS, cuda_only, one_rank
from torch import nn

from dist_contrast.models import build_encoder

from conftest import config_from_dict

pytestmark = MARKS

CPU_TOL = {"rtol": 1e-4, "atol": 1e-5}
CPU_GRAD_TOL = {"rtol": 1e-3, "atol": 1e-5}
SAME_TOL = {"fp32": {"rtol": 1e-5, "atol": 1e-6}, "bf16": {"rtol": 1e-2, "atol": 1e-2}}


def encoder(name: str, norm: str = "batch", checkpointing: bool = False, seed: int = 0):
    cfg = config_from_dict(
        {
            "model": {
                "encoder": name,
                "width": 8,
                "norm": norm,
                "activation_checkpointing": checkpointing,
            }
        }
    )
    torch.manual_seed(seed)
    return build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)


def forward_backward(module: nn.Module, x: torch.Tensor, precision: str = "fp32"):
    """Output, parameter gradients and buffers (running statistics) after one training-mode
    forward and backward of ``(output ** 2).sum()``."""
    module.train().zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = module(x)
    out.float().square().sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in module.named_parameters()}
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}
    return out.detach(), grads, buffers


def assert_close(got: dict | torch.Tensor, want: dict | torch.Tensor, tol: dict) -> None:
    if isinstance(got, torch.Tensor):
        got, want = {"": got}, {"": want}
    assert got.keys() == want.keys()
    for k, g in got.items():
        g, w = g.cpu().float(), want[k].cpu().float()
        assert torch.allclose(g, w, **tol), (k, (g - w).abs().max().item(), tol)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["resnet_tiny", "vit_nano"])
def test_activation_checkpointing_equals_plain(name, precision):
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = encoder(name).to(DEVICE)
    ckpt = encoder(name, checkpointing=True).to(DEVICE)
    ckpt.load_state_dict(plain.state_dict())
    out_p, grads_p, bufs_p = forward_backward(plain, x.to(DEVICE), precision)
    out_c, grads_c, bufs_c = forward_backward(ckpt, x.to(DEVICE), precision)
    assert out_p.device.type == DEVICE.type
    assert_close(out_c, out_p, SAME_TOL[precision])
    assert_close(grads_c, grads_p, SAME_TOL[precision])
    assert_close(bufs_c, bufs_p, SAME_TOL["fp32"])  # BN statistics: updated once, not twice
    if precision == "fp32":  # and both are the CPU's
        cpu = encoder(name)
        out, grads, bufs = forward_backward(cpu, x)
        assert_close(out_c, out, CPU_TOL)
        assert_close(grads_c, grads, CPU_GRAD_TOL)
        assert_close(bufs_c, bufs, CPU_TOL)


@cuda_only
def test_sync_batch_norm_on_one_rank_is_batch_norm():
    """model.norm=sync_batch (refused on CPU) on one rank: the statistics of the global batch
    are this rank's, so it equals model.norm=batch on the same weights, on CUDA and CPU."""
    one_rank()
    plain = encoder("resnet_tiny", "batch")
    sync = encoder("resnet_tiny", "sync_batch").to(DEVICE)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    sync.load_state_dict(plain.state_dict())
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    out_s, grads_s, bufs_s = forward_backward(sync, x.to(DEVICE))
    out_g, grads_g, bufs_g = forward_backward(plain.to(DEVICE), x.to(DEVICE))
    assert_close(out_s, out_g, SAME_TOL["fp32"] | {"atol": 1e-5})
    assert_close(grads_s, grads_g, CPU_GRAD_TOL)
    assert_close(bufs_s, bufs_g, CPU_TOL)
    out_c, grads_c, _ = forward_backward(encoder("resnet_tiny", "batch"), x)
    assert_close(out_s, out_c, CPU_TOL)
    assert_close(grads_s, grads_c, CPU_GRAD_TOL)
