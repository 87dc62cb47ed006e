"""Every objective and the tiled softmax on CUDA against the CPU.

fp32: the CUDA loss and its input gradients equal the CPU ones to fp32 rounding (another
summation order; TF32 off): values ``rtol 1e-5, atol 1e-6``, gradients ``rtol 1e-4, atol 1e-6``.
bf16 (bf16 inputs under bf16 autocast): the losses compute in fp32 whatever the autocast, so the
CUDA loss equals the CPU fp32 loss of the same bf16-rounded values to ``rtol 1e-4, atol 1e-5``
(gradients ``rtol 2e-2, atol 1e-4``: they are rounded back to bf16), and the fp32 loss of the
unrounded inputs to ``rtol 3e-2, atol 1e-2`` (bf16 keeps 8 significant bits of each input).
The loss cases are those of tests/unit/test_losses_numerics.py and tests/integration/test_tiled.py.
"""

from __future__ import annotations

import pytest
import torch
from gpu_device import DEVICE, MARKS, cuda_only, reuse, to

from dist_contrast import losses as L

numerics = reuse("unit", "test_losses_numerics")
tiled_cases = reuse("integration", "test_tiled")

pytestmark = MARKS

FP32 = {"rtol": 1e-5, "atol": 1e-6}
FP32_GRAD = {"rtol": 1e-4, "atol": 1e-6}
BF16_SAME = {"rtol": 1e-4, "atol": 1e-5}
BF16_SAME_GRAD = {"rtol": 2e-2, "atol": 1e-4}
BF16_ROUNDED = {"rtol": 3e-2, "atol": 1e-2}


def close(got: torch.Tensor, want: torch.Tensor, tol: dict, what: str = "") -> None:
    got, want = got.detach().cpu().float(), want.detach().cpu().float()
    assert torch.allclose(got, want, **tol), (what, (got - want).abs().max().item(), tol)


def loss_and_grads(call, inputs: dict, autocast: bool = False):
    """``call(inputs)`` (under bf16 autocast on the inputs' device if ``autocast``) and the
    gradients of every floating input (zeros where unused); the backward outside autocast, as
    training runs it."""
    leaves = {
        k: v.detach().clone().requires_grad_(True)
        for k, v in inputs.items()
        if v.is_floating_point()
    }
    device = next(iter(leaves.values())).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = call({**inputs, **leaves})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    zeros = [
        torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads, strict=True)
    ]
    return loss.detach(), dict(zip(leaves, zeros, strict=True))


@pytest.mark.parametrize("name", list(numerics.CALLS))
def test_loss_equals_cpu_in_fp32(name):
    call, inputs = numerics.CALLS[name], numerics._batch(12, seed=3)
    want, want_grads = loss_and_grads(call, inputs)
    got, got_grads = loss_and_grads(call, to(inputs, DEVICE))
    assert got.device.type == DEVICE.type and got.dtype == torch.float32
    close(got, want, FP32, name)
    for k, g in got_grads.items():
        assert g.device.type == DEVICE.type
        close(g, want_grads[k], FP32_GRAD, f"{name} d/d{k}")
    assert any(g.abs().sum() > 0 for g in want_grads.values()), "no gradient checks nothing"


@pytest.mark.parametrize("name", list(numerics.CALLS))
def test_loss_under_bf16_autocast(name):
    call, inputs = numerics.CALLS[name], numerics._batch(12, seed=4)
    low = to(inputs, DEVICE, torch.bfloat16)
    got, got_grads = loss_and_grads(call, low, autocast=True)
    assert got.dtype == torch.float32  # computed in fp32 whatever the autocast
    same, same_grads = loss_and_grads(call, to(low, "cpu", torch.float32))
    close(got, same, BF16_SAME, name)
    for k, g in got_grads.items():
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), k
        close(g, same_grads[k], BF16_SAME_GRAD, f"{name} d/d{k}")
    exact, _ = loss_and_grads(call, inputs)
    close(got, exact, BF16_ROUNDED, name)


# --------------------------------------------------------------------------------------------
# The tiled softmax: memory_efficient=True on the device against the full matrix on the CPU

TILED = list(tiled_cases._loss_cases(3))


def tiled_inputs(size: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """test_tiled's inputs (8 rows, float32), or 1500 rows of 64 dims against a queue of 2100
    (blocks of 512 divide neither)."""
    if size == "small":
        return to(tiled_cases.make_inputs(), "cpu", torch.float32)
    g = torch.Generator().manual_seed(seed)
    n, d = 1500, 64
    return {
        "q": torch.randn(n, d, generator=g),
        "k": torch.randn(n, d, generator=g),
        "queue": torch.randn(2100, d, generator=g),
        "views": torch.randn(n, 2, d, generator=g),
        "scale": torch.tensor(2.0),
        "labels": torch.randint(0, 40, (n,), generator=g),
    }


def tiled_loss(
    name: str, memory_efficient: bool, tile: int, inputs: dict, autocast=False, inside=False
):
    """Loss and gradients (batch tensors, then shared ones) of test_tiled's case ``name``
    (the forward under bf16 autocast if ``autocast``, the backward too if ``inside``)."""
    fn, batch_names, shared_names = tiled_cases._loss_cases(tile)[name]
    batch = [inputs[k].detach().clone() for k in batch_names]
    shared = [inputs[k].detach().clone().requires_grad_(True) for k in shared_names]
    leaves = [t.requires_grad_(True) for t in batch if t.is_floating_point()]
    with torch.autocast(batch[0].device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(memory_efficient, *batch, *shared, gather="all")
        if inside:
            return loss.detach(), list(torch.autograd.grad(loss, leaves + shared))
    return loss.detach(), list(torch.autograd.grad(loss, leaves + shared))


@pytest.mark.parametrize("size,tile", [("small", 3), ("large", 512)])
@pytest.mark.parametrize("name", TILED)
def test_tiled_equals_full_cpu_in_fp32(name, size, tile):
    inputs = tiled_inputs(size)
    want, want_grads = tiled_loss(name, False, tile, inputs)
    got, got_grads = tiled_loss(name, True, tile, to(inputs, DEVICE))
    close(got, want, FP32, name)
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert g.device.type == DEVICE.type
        close(g, w, FP32_GRAD, f"{name} grad {i}")
    assert any(w.abs().sum() > 0 for w in want_grads)


@pytest.mark.parametrize("name", TILED)
def test_tiled_bf16_inputs(name):
    """bf16 inputs to the tiled path on the device: the CPU full loss of the same rounded
    values, in fp32."""
    low = to(tiled_inputs("large", seed=1), DEVICE, torch.bfloat16)
    got, got_grads = tiled_loss(name, True, 512, low, autocast=True)
    want, _ = tiled_loss(name, False, 512, to(low, "cpu", torch.float32))
    assert got.dtype == torch.float32
    close(got, want, BF16_SAME, name)
    assert all(torch.isfinite(g).all() for g in got_grads)


@pytest.mark.parametrize("name", TILED)
def test_tiled_backward_under_bf16_autocast(name):
    """backward() called inside bf16 autocast on the device (it failed with a dtype mismatch:
    autograd runs a backward in the autocast state of its caller): the CPU full loss of the
    same rounded values in fp32, gradients too (they are rounded back to bf16)."""
    low = to(tiled_inputs("large", seed=2), DEVICE, torch.bfloat16)
    got, got_grads = tiled_loss(name, True, 512, low, autocast=True, inside=True)
    want, want_grads = tiled_loss(name, False, 512, to(low, "cpu", torch.float32))
    close(got, want, BF16_SAME, name)
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert g.dtype == torch.bfloat16, (name, i)
        close(g, w, BF16_SAME_GRAD, f"{name} grad {i}")
    assert any(w.abs().sum() > 0 for w in want_grads)


@cuda_only
def test_tiled_clip_on_cuda_never_holds_the_logits():
    """CLIP at N = 16384: the tiled forward + backward peaks far below the [N, N] fp32 logits
    (1 GiB) the full form holds, and gives the full form's loss and gradients."""
    n, tile = 16384, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    img = torch.randn(n, 128, device="cuda", generator=g)
    txt = torch.randn(n, 128, device="cuda", generator=g)

    def run(memory_efficient: bool):
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = L.clip_loss(i, t, 2.0, memory_efficient=memory_efficient, tile=tile)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), i.grad, t.grad, torch.cuda.max_memory_allocated() - base

    tiled_loss_, gi, gt, peak = run(True)
    full_loss, fi, ft, full_peak = run(False)
    logits = n * n * 4
    assert peak < logits / 4, (peak, logits)
    assert full_peak > logits, (full_peak, logits)  # the full form does hold them
    close(tiled_loss_, full_loss, FP32)
    close(gi, fi, FP32_GRAD)
    close(gt, ft, FP32_GRAD)
