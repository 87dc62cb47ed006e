"""The tiled softmax (dist_contrast.losses.kernels.tiled) equals the full one.

Checked in float64: the Function against torch.logsumexp over a dense masked matrix and by
torch.autograd.gradcheck; tiled_cross_entropy against F.cross_entropy and a naive SupCon loop;
every loss with ``memory_efficient=True`` against its full-matrix path (values and gradients,
odd tiles that divide neither the rows nor the columns); and W = 2 ranks of the tiled losses
against one process of the full ones (the gather's exact backward reaching the tiled columns).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_contrast import losses as L
from dist_contrast.losses.kernels import tiled as T

from multiproc import run_ranks

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _dense_lse(a, c, exclude):
    s = a @ c.T
    mask = torch.zeros_like(s, dtype=torch.bool)
    for r, e in enumerate(exclude.tolist()):
        if 0 <= e < c.shape[0]:
            mask[r, e] = True
    return torch.logsumexp(s.masked_fill(mask, -1e30), dim=1)


def _value_and_grads(fn, *inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]
    return out.detach(), grads


def _assert_same(fn_a, fn_b, *inputs):
    va, ga = _value_and_grads(fn_a, *inputs)
    vb, gb = _value_and_grads(fn_b, *inputs)
    assert torch.allclose(va, vb, rtol=1e-10, atol=1e-12), (va, vb)
    for i, (x, y) in enumerate(zip(ga, gb, strict=True)):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12), (i, (x - y).abs().max())
    assert any(g.abs().sum() > 0 for g in ga), "no gradient checks nothing"


# --------------------------------------------------------------------------------------------
# The Function


@pytest.mark.parametrize("tile", [1, 3, 4, 64])
def test_logsumexp_equals_dense(tile):
    a, c = _randn(7, 5, seed=1), _randn(11, 5, seed=2)
    exclude = torch.tensor([0, 3, -1, 10, 5, 5, 2])
    _assert_same(
        lambda a, c: T.tiled_logsumexp(a, c, exclude, tile=tile),
        lambda a, c: _dense_lse(a, c, exclude),
        a,
        c,
    )


def test_function_gradcheck():
    a = _randn(6, 4, seed=3).requires_grad_(True)
    c = _randn(9, 4, seed=4).requires_grad_(True)
    scale = torch.tensor(1.3, dtype=F64, requires_grad=True)
    targets = torch.tensor([0, 8, 3, 3, 4, 1])
    exclude = torch.tensor([1, -1, 8, 0, 4, 2])
    for t, ex, tile in ((None, exclude, 4), (targets, exclude, 4), (targets, None, 2)):

        def fn(a, c, s, t=t, ex=ex, tile=tile):
            return T.TiledCrossEntropy.apply(a, c, s, t, ex, tile)

        assert torch.autograd.gradcheck(fn, (a, c, scale))


def test_cross_entropy_gradcheck_every_form():
    a = _randn(6, 3, seed=5).requires_grad_(True)
    c = _randn(8, 3, seed=6).requires_grad_(True)
    scale = torch.tensor(1.7, dtype=F64, requires_grad=True)
    targets = torch.tensor([0, 7, 3, 3, 5, 1])
    exclude = torch.tensor([1, 0, -1, 2, 4, 7])
    rows, cols = torch.tensor([0, 1, 1, 2, 9, 0]), torch.tensor([0, 1, 2, 0, 1, 5, 1, 0])
    forms = [
        lambda a, c, s: T.tiled_cross_entropy(a, c, targets, scale=s, tile=3),
        lambda a, c, s: T.tiled_cross_entropy(a, c, targets, exclude=exclude, scale=s, tile=5),
        lambda a, c, s: T.tiled_cross_entropy(
            a, c, row_labels=rows, col_labels=cols, exclude=exclude, scale=s, tile=3
        ),
    ]
    for fn in forms:
        assert torch.autograd.gradcheck(fn, (a, c, scale))


def test_cross_entropy_targets_equal_f_cross_entropy():
    a, c = _randn(9, 4, seed=7), _randn(13, 4, seed=8)
    targets = torch.tensor([0, 12, 5, 5, 1, 2, 3, 9, 11])
    _assert_same(
        lambda a, c: T.tiled_cross_entropy(a, c, targets, scale=2.5, tile=4),
        lambda a, c: F.cross_entropy(2.5 * a @ c.T, targets, reduction="none"),
        a,
        c,
    )


def _naive_supcon_rows(a, c, rows, cols, exclude, scale):
    """Per row: -mean over positives of log softmax, by loops (0 without positives)."""
    out = []
    for r in range(a.shape[0]):
        keep = [j for j in range(c.shape[0]) if j != int(exclude[r])]
        logits = torch.stack([scale * a[r] @ c[j] for j in keep])
        log_prob = logits - torch.logsumexp(logits, 0)
        pos = [i for i, j in enumerate(keep) if int(cols[j]) == int(rows[r])]
        out.append(-log_prob[pos].mean() if pos else a.new_zeros(()) * a.sum())
    return torch.stack(out)


def test_cross_entropy_labels_equal_naive_loop():
    a, c = _randn(8, 4, seed=9), _randn(10, 4, seed=10)
    # label 7 has no column (no positive); row 3's only positive is its excluded column
    rows = torch.tensor([0, 1, 2, 3, 0, 1, 7, 2])
    cols = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 5])
    exclude = torch.tensor([0, 1, -1, 3, 4, 9, 6, 2])
    _assert_same(
        lambda a, c: T.tiled_cross_entropy(
            a, c, row_labels=rows, col_labels=cols, exclude=exclude, scale=3.0, tile=3
        ),
        lambda a, c: _naive_supcon_rows(a, c, rows, cols, exclude, 3.0),
        a,
        c,
    )


def test_logsumexp_never_holds_the_whole_matrix():
    """What the forward saves for backward is the inputs and an [R] vector, nothing [R, N]."""
    a = _randn(40, 3).requires_grad_(True)
    c = _randn(50, 3).requires_grad_(True)
    lse = T.tiled_logsumexp(a, c, tile=8)
    saved = [t for t in lse.grad_fn.saved_tensors if t is not None]
    assert max(t.numel() for t in saved) == 50 * 3
    assert all(t.numel() != 40 * 50 for t in saved)


def test_fp32_inputs_stay_fp32_and_half_is_upcast():
    a, c = torch.randn(5, 4, dtype=torch.bfloat16), torch.randn(6, 4, dtype=torch.bfloat16)
    lse = T.tiled_logsumexp(a, c, tile=4)
    assert lse.dtype == torch.float32
    ref = torch.logsumexp(a.float() @ c.float().T, dim=1)
    assert torch.allclose(lse, ref, rtol=1e-5)


def test_bad_arguments_are_clear_errors():
    a, c = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="tile"):
        T.tiled_logsumexp(a, c, tile=0)
    with pytest.raises(ValueError, match="same D"):
        T.tiled_logsumexp(a, torch.randn(5, 3))
    with pytest.raises(ValueError, match="targets"):
        T.tiled_cross_entropy(a, c, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="both"):
        T.tiled_cross_entropy(a, c, row_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="memory_efficient"):
        L.InfoNCELoss(memory_efficient=1)
    with pytest.raises(ValueError, match="tile"):
        L.NTXentLoss(memory_efficient=True, tile=-3)


# --------------------------------------------------------------------------------------------
# Every loss: memory_efficient=True == the full path, one process

B = 8
LABELS = torch.tensor([0, 1, 2, 0, 1, 3, 2, 0])  # label 3: an anchor without positives


def make_inputs():
    return {
        "q": _randn(B, 5, seed=11),
        "k": _randn(B, 5, seed=12),
        "queue": _randn(6, 5, seed=13),
        "views": _randn(B, 3, 5, seed=14),
        "scale": torch.tensor(math.log(1 / 0.2), dtype=F64),
        "labels": LABELS,
    }


def _loss_cases(tile):
    """name -> (fn(memory_efficient, batch tensors..., shared tensors..., gather), batch, shared)"""

    def ce(fn):
        return lambda eff, *args, gather="all": fn(eff, *args, gather)

    return {
        "infonce_in_batch": (
            ce(lambda e, q, k, g: L.info_nce(q, k, None, 0.2, g, memory_efficient=e, tile=tile)),
            ("q", "k"),
            (),
        ),
        "infonce_in_batch_queue": (
            ce(
                lambda e, q, k, n, g: L.info_nce(
                    q, k, n, 0.2, g, in_batch=True, memory_efficient=e, tile=tile
                )
            ),
            ("q", "k"),
            ("queue",),
        ),
        "infonce_queue": (
            ce(lambda e, q, k, n, g: L.info_nce(q, k, n, 0.2, g, memory_efficient=e, tile=tile)),
            ("q", "k"),
            ("queue",),
        ),
        "ntxent": (
            ce(lambda e, a, b, g: L.nt_xent(a, b, 0.3, g, memory_efficient=e, tile=tile)),
            ("q", "k"),
            (),
        ),
        "clip": (
            ce(lambda e, i, t, s, g: L.clip_loss(i, t, s, 100.0, g, memory_efficient=e, tile=tile)),
            ("q", "k"),
            ("scale",),
        ),
        "supcon_labels": (
            ce(
                lambda e, f, y, g: L.supcon_loss(
                    f, y, 0.2, 0.1, "all", g, memory_efficient=e, tile=tile
                )
            ),
            ("views", "labels"),
            (),
        ),
        "supcon_simclr": (
            ce(
                lambda e, f, g: L.supcon_loss(
                    f, None, 0.2, 0.1, "all", g, memory_efficient=e, tile=tile
                )
            ),
            ("views",),
            (),
        ),
        "supcon_one": (
            ce(
                lambda e, f, y, g: L.supcon_loss(
                    f, y, 0.2, 0.2, "one", g, memory_efficient=e, tile=tile
                )
            ),
            ("views", "labels"),
            (),
        ),
    }


def evaluate(name, rows, memory_efficient, tile=3, gather="all"):
    fn, batch_names, shared_names = _loss_cases(tile)[name]
    inputs = make_inputs()
    batch = [inputs[k][rows].clone() for k in batch_names]
    shared = [inputs[k].clone().requires_grad_(True) for k in shared_names]
    leaves = [t.requires_grad_(True) for t in batch if t.is_floating_point()]
    loss = fn(memory_efficient, *batch, *shared, gather=gather)
    grads = torch.autograd.grad(loss, leaves + shared)
    return float(loss.detach()), list(grads[: len(leaves)]), list(grads[len(leaves) :])


NAMES = list(_loss_cases(3))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tile", [1, 3, 5, 1024])
def test_memory_efficient_equals_full(name, tile):
    full = evaluate(name, slice(None), False)
    eff = evaluate(name, slice(None), True, tile=tile)
    assert eff[0] == pytest.approx(full[0], rel=1e-10, abs=1e-12), name
    assert abs(full[0]) > 1e-3
    for got, want in zip(eff[1] + eff[2], full[1] + full[2], strict=True):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (name, (got - want).abs().max())
    assert any(g.abs().sum() > 0 for g in full[1])


# --------------------------------------------------------------------------------------------
# bf16: the tiled path under CPU autocast, backward included

# Against fp64 on the same bf16-rounded inputs. The kernels compute in fp32 whatever the
# autocast (relative error ~1e-7) and the gradient of a bf16 leaf is that fp32 value rounded
# once to bf16: within half a bf16 ulp, 2^-8 of its magnitude (measured: 3.8e-3 < 3.9e-3);
# atol covers the fp32 error of entries near 0. The full path, with backward() called inside
# autocast too, runs the backward of its matmuls in bf16 (autocast applies to whatever runs
# under it): its gradients are off by up to 2^-6 of the largest entry (measured: 6.8e-3).
BF16_EXACT = {"rtol": 2**-8, "atol": 1e-5}  # atol times the largest |gradient|
BF16_FULL_UNDER_AUTOCAST = 2**-6  # times the largest |gradient|


def _bf16_case(name, memory_efficient, low=True):
    """Loss and gradients of case ``name`` on bf16-rounded inputs (48 rows, 32 dims, a queue
    of 40, tile 7): ``low``: bf16 leaves, forward and backward() inside CPU bf16 autocast, as
    a loop that calls backward inside ``with torch.autocast`` does; else fp64, no autocast."""
    g = torch.Generator().manual_seed(5)
    n, d = 48, 32
    inputs = {
        "q": torch.randn(n, d, generator=g),
        "k": torch.randn(n, d, generator=g),
        "queue": torch.randn(40, d, generator=g),
        "views": torch.randn(n, 2, d, generator=g),
        "scale": torch.tensor(2.0),
        "labels": torch.randint(0, 5, (n,), generator=g),
    }
    dtype = torch.bfloat16 if low else F64
    fn, batch_names, shared_names = _loss_cases(7)[name]

    def leaf(t):
        return t.bfloat16().to(dtype).requires_grad_(True) if t.is_floating_point() else t

    batch = [leaf(inputs[k]) for k in batch_names]
    shared = [leaf(inputs[k]) for k in shared_names]
    leaves = [t for t in batch + shared if t.is_floating_point()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        loss = fn(memory_efficient, *batch, *shared, gather="all")
        grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), list(grads)


@pytest.mark.parametrize("name", NAMES)
def test_tiled_backward_under_cpu_bf16_autocast(name):
    """The tiled backward under autocast used to fail ("mat1 and mat2 must have the same
    dtype": bf16 block matmuls against fp32 accumulators); now it is fp32 as the forward."""
    want, want_grads = _bf16_case(name, False, low=False)
    got, got_grads = _bf16_case(name, True)
    full, full_grads = _bf16_case(name, False)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-5)
    assert full.item() == pytest.approx(want.item(), rel=1e-5)
    for i, (g, f, w) in enumerate(zip(got_grads, full_grads, want_grads, strict=True)):
        assert g.dtype == torch.bfloat16 and f.dtype == torch.bfloat16
        top = float(w.abs().max())
        assert top > 0, (name, i)
        rtol, atol = BF16_EXACT["rtol"], BF16_EXACT["atol"] * top
        assert torch.allclose(g.double(), w, rtol=rtol, atol=atol), (name, i, (g - w).abs().max())
        err = float((g.double() - f.double()).abs().max())
        assert err <= BF16_FULL_UNDER_AUTOCAST * top, (name, i, err / top)


@pytest.mark.parametrize("tile", [None, 7])
def test_dlse_backward_under_cpu_bf16_autocast(tile):
    """The local log-sum-exp of the sharded queue (fused, tile=None, and tiled): backward()
    inside autocast keeps its matmul in fp32 (the fused one ran it in bf16 before)."""
    from dist_contrast.losses.kernels.dlse import local_logsumexp
    from dist_contrast.losses.kernels.numerics import fp32_region

    g = torch.Generator().manual_seed(6)
    x, keys = torch.randn(48, 32, generator=g).bfloat16(), torch.randn(40, 32, generator=g)
    ref = x.double().requires_grad_(True)
    (want,) = torch.autograd.grad(local_logsumexp(ref, keys.double(), 0.2).sum(), ref)
    low = x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fp32_region():  # as its callers (queue, bank) run it: inputs upcast, autocast off
            lse = local_logsumexp(low.float(), keys, 0.2, tile)
        (got,) = torch.autograd.grad(lse.sum(), low)
    assert lse.dtype == torch.float32 and got.dtype == torch.bfloat16
    rtol, atol = BF16_EXACT["rtol"], BF16_EXACT["atol"] * float(want.abs().max())
    assert torch.allclose(got.double(), want, rtol=rtol, atol=atol), (got - want).abs().max()


def test_modules_route_through_the_tiled_path(monkeypatch):
    calls = []
    real = T.tiled_cross_entropy

    def spy(*args, **kwargs):
        calls.append(kwargs.get("tile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "tiled_cross_entropy", spy)
    q, k, views = _randn(6, 4, seed=1), _randn(6, 4, seed=2), _randn(6, 2, 4, seed=3)
    for module, args in (
        (L.InfoNCELoss(memory_efficient=True, tile=2), (q, k)),
        (L.NTXentLoss(memory_efficient=True, tile=2), (q, k)),
        (L.ClipLoss(memory_efficient=True, tile=2), (q, k)),
        (L.SupConLoss(memory_efficient=True, tile=2), (views, torch.arange(6) % 2)),
    ):
        off = type(module)(**{"memory_efficient": False})
        if isinstance(module, L.ClipLoss):
            off.logit_scale = module.logit_scale
        assert float(module(*args).detach()) == pytest.approx(float(off(*args).detach()), rel=1e-6)
    assert calls == [2, 2, 2, 2, 2]  # CLIP: one call per direction


# --------------------------------------------------------------------------------------------
# W = 2: tiled per rank == full in one process


def _rank(rank, world, names):
    out = []
    per = B // world
    rows = slice(rank * per, (rank + 1) * per)
    for name in names:
        out.append(evaluate(name, rows, True, tile=3))
        out.append(evaluate(name, rows, True, tile=3, gather="off"))
    return out


def test_two_ranks_tiled_equal_one_process_full():
    world, per = 2, B // 2
    results = run_ranks(_rank, world, NAMES)
    for i, name in enumerate(NAMES):
        ref_loss, ref_batch, ref_shared = evaluate(name, slice(None), False)
        per_rank = [results[r][2 * i] for r in range(world)]
        assert sum(r[0] for r in per_rank) / world == pytest.approx(ref_loss, rel=1e-10), name
        for rank, (_, grads, _) in enumerate(per_rank):
            for got, ref in zip(grads, ref_batch, strict=True):
                want = ref[rank * per : (rank + 1) * per]
                assert torch.allclose(got / world, want, rtol=1e-9, atol=1e-12), (name, rank)
        for j, ref in enumerate(ref_shared):
            mean = sum(r[2][j] for r in per_rank) / world
            assert torch.allclose(mean, ref, rtol=1e-9, atol=1e-12), (name, "shared")
        for rank in range(world):  # gather "off": each rank alone, the full path on its rows
            loss, grads, _ = results[rank][2 * i + 1]
            rows = slice(rank * per, (rank + 1) * per)
            ref = evaluate(name, rows, False, gather="off")
            assert loss == pytest.approx(ref[0], rel=1e-10), (name, rank)
            for got, want in zip(grads, ref[1], strict=True):
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (name, rank)
