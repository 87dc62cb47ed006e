"""Numerics and input checks: fp32 under bf16/fp16, degenerate batches, ValueErrors,
gradcheck in float64."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from dist_contrast import losses as L

D = 6


def _batch(n: int, dtype=torch.float32, seed: int = 0, labels=None, identical=False, zero=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        if zero:
            return torch.zeros(*shape, dtype=dtype)
        t = torch.randn(*shape, generator=g).to(dtype)
        if identical:
            t = t[:1].expand_as(t).clone() if t.dim() > 1 else t
        return t

    lab = torch.arange(n) % 3 if labels is None else torch.as_tensor(labels)
    return {
        "x": r(n, D),
        "labels": lab,
        "a": r(n, D),
        "b": r(n, D),
        "views": r(n, 2, D),
        "queue": torch.randn(5, D, generator=g).to(dtype),
        "neg": r(n, 4, D),
    }


# every objective as a function of one input dict
CALLS: dict[str, Callable[[dict], torch.Tensor]] = {
    "contrastive": lambda t: L.ContrastiveLoss()(t["x"], t["labels"]),
    "triplet_all": lambda t: L.TripletLoss(mining="all")(t["x"], t["labels"]),
    "triplet_batch_hard": lambda t: L.TripletLoss(mining="batch-hard")(t["x"], t["labels"]),
    "triplet_semi_hard": lambda t: L.TripletLoss(mining="semi-hard")(t["x"], t["labels"]),
    "npair": lambda t: L.NPairLoss()(t["x"], t["labels"]),
    "angular": lambda t: L.AngularLoss()(t["x"], t["labels"]),
    "infonce_in_batch": lambda t: L.InfoNCELoss()(t["a"], t["b"]),
    "infonce_queue": lambda t: L.InfoNCELoss()(t["a"], t["b"], t["queue"]),
    "ntxent": lambda t: L.NTXentLoss()(t["a"], t["b"]),
    "supcon_labels": lambda t: L.SupConLoss()(t["views"], t["labels"]),
    "supcon_simclr": lambda t: L.SupConLoss()(t["views"]),
    "supcon_one_view": lambda t: L.SupConLoss()(t["views"][:, :1], t["labels"]),
    "clip": lambda t: L.ClipLoss()(t["a"], t["b"]),
    "siglip": lambda t: L.SigLipLoss()(t["a"], t["b"]),
    "dcl": lambda t: L.DCLLoss()(t["a"], t["b"]),
    "dclw": lambda t: L.DCLLoss(sigma=0.5)(t["a"], t["b"]),
    "nce": lambda t: L.NCELoss(n_data=1000)(t["a"], t["b"], t["neg"]),
    "nce_softmax": lambda t: L.NCELoss(mode="softmax")(t["a"], t["b"], t["queue"]),
    "byol": lambda t: L.BYOLLoss()(t["a"], t["b"], t["b"], t["a"]),
}


def test_every_public_class_is_exported():
    classes = {
        "ContrastiveLoss",
        "TripletLoss",
        "NPairLoss",
        "AngularLoss",
        "InfoNCELoss",
        "NTXentLoss",
        "SupConLoss",
        "ClipLoss",
        "SigLipLoss",
        "DCLLoss",
        "NCELoss",
        "BYOLLoss",
    }
    assert classes <= set(L.__all__)


def _finite_loss_and_grads(call, inputs):
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items() if v.is_floating_point()}
    loss = call(inputs)
    loss.backward()
    assert torch.isfinite(loss), float(loss)
    for k, v in leaves.items():
        if v.grad is not None:
            assert torch.isfinite(v.grad).all(), k
    return loss


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_fp32(name, dtype):
    """bf16/fp16 inputs, inside and outside autocast, give the fp32 loss of the same values."""
    low = _batch(6, dtype)
    as_fp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in low.items()}
    ref = CALLS[name](as_fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = CALLS[name](low)
        got_fp32_inputs = CALLS[name](as_fp32)
    assert got.dtype == torch.float32 and got_fp32_inputs.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6), (float(got), float(ref))
    assert torch.allclose(got_fp32_inputs, ref, rtol=1e-6, atol=1e-6)
    _finite_loss_and_grads(CALLS[name], _batch(6, dtype))


DEGENERATE = {
    "one_class": dict(n=6, labels=[2] * 6),
    "no_positive": dict(n=6, labels=list(range(6))),
    "identical_embeddings": dict(n=6, identical=True),
    "zero_embeddings": dict(n=6, zero=True),
    "single_sample": dict(n=1, labels=[0]),
    "two_samples": dict(n=2, labels=[0, 0]),
}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_batches_are_finite(name, case):
    _finite_loss_and_grads(CALLS[name], _batch(**DEGENERATE[case]))


def test_degenerate_values_follow_the_conventions():
    one = _batch(1, labels=[0])
    assert float(L.NTXentLoss()(one["a"], one["b"])) == 0.0  # only the positive: CE = 0
    assert float(L.DCLLoss()(one["a"], one["b"])) == 0.0  # no negative: contributes 0
    assert float(L.TripletLoss()(one["x"], one["labels"])) == 0.0
    # SupCon: anchors without positives contribute 0 and still count in the mean
    f = torch.nn.functional.normalize(torch.randn(4, D, dtype=torch.float64), dim=1)
    got = L.supcon_loss(f[:, None], torch.tensor([0, 0, 1, 2]), 0.5, 0.5)
    logits = f @ f.T / 0.5
    lse = [torch.logsumexp(logits[i][torch.arange(4) != i], 0) for i in range(2)]
    anchor0, anchor1 = lse[0] - logits[0, 1], lse[1] - logits[1, 0]
    assert torch.allclose(got, (anchor0 + anchor1) / 4)
    assert float(L.supcon_loss(f[:, None], torch.arange(4))) == 0.0


# --------------------------------------------------------------------------------------------
# input errors

X = torch.randn(4, D)
Y = torch.tensor([0, 1, 0, 1])


ERRORS = [
    (lambda: L.contrastive_loss(X[0], Y), r"embeddings must have shape \[N, D\]"),
    (lambda: L.contrastive_loss(X, Y[:3]), r"labels has 3 entries but the batch has 4"),
    (lambda: L.triplet_loss(X, Y.float()), r"labels must be an integer tensor"),
    (lambda: L.triplet_loss(X, Y, mining="hardest"), r"mining must be one of"),
    (lambda: L.angular_loss(X, Y, alpha=95), r"alpha .* \(0, 90\)"),
    (lambda: L.contrastive_loss(X[:0], Y[:0]), r"empty batch"),
    (lambda: L.contrastive_loss(X, Y, gather_mode="some"), r"gather must be 'all' or 'off'"),
    (lambda: L.nt_xent(X, X[:3]), r"z1 and z2 must have the same shape"),
    (lambda: L.nt_xent(X, X, temperature=0), r"temperature must be > 0"),
    (lambda: L.NTXentLoss(temperature=-1.0), r"temperature must be > 0"),
    (lambda: L.dcl_loss(X, X, sigma=0.0), r"sigma must be > 0"),
    (lambda: L.info_nce(X, X, None, in_batch=False), r"no negatives"),
    (lambda: L.info_nce(X, X, torch.randn(3, D + 1)), r"negatives must have shape \[K, 6\]"),
    (lambda: L.info_nce(X, X, temperature=float("nan")), r"temperature must be > 0"),
    (lambda: L.info_nce(X, X, None, 0.1, "all", in_batch="yes"), r"in_batch must be"),
    (lambda: L.InfoNCELoss(0.1, "all"), r"in_batch must be"),
    (lambda: L.supcon_loss(X), r"features must have shape \[N, V, D\]"),
    (lambda: L.supcon_loss(X[:, None], Y[:2]), r"labels has 2 entries"),
    (lambda: L.supcon_loss(X[:, None], Y, base_temperature=0), r"base_temperature must be > 0"),
    (lambda: L.SupConLoss(contrast_mode="both"), r"contrast_mode must be one of"),
    (lambda: L.clip_loss(X, X[:, :3]), r"image and text must have the same shape"),
    (lambda: L.clip_loss(X, X, float("inf")), r"logit_scale must be finite"),
    (lambda: L.ClipLoss(init_temperature=0.0), r"init_temperature must be > 0"),
    (lambda: L.SigLipLoss(init_scale=-1.0), r"init_scale must be > 0"),
    (lambda: L.nce_loss(X, X, torch.randn(3, D)), r"needs n_data"),
    (lambda: L.nce_loss(X, X, torch.randn(5, 3, D), n_data=10), r"negatives must have shape"),
    (lambda: L.nce_loss(X, X, torch.randn(3, D), mode="full"), r"mode must be one of"),
    (lambda: L.NCELoss(n_data=0), r"needs n_data"),
    (lambda: L.nce_loss(X, X, torch.randn(3, D), n_data=10, z=-1.0), r"z must be > 0"),
    (lambda: L.byol_loss(X, X, X), r"needs both p2 and z1"),
    (lambda: L.byol_loss(X, X[:2]), r"p1 and z2 must have the same shape"),
    (lambda: L.contrastive_loss(X.long(), Y), r"floating-point"),
    (lambda: L.ContrastiveLoss(neg_margin=float("nan")), r"neg_margin must be finite"),
]


@pytest.mark.parametrize(("call", "message"), ERRORS)
def test_errors_say_what_is_wrong(call: Callable, message: str):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------
# non-finite values: the step guard's business, not the losses'

SCALE, BIAS = torch.tensor(2.0), torch.tensor(-1.0)
EVERY_LOSS = {
    "contrastive": lambda x: L.contrastive_loss(x, Y),
    "triplet_all": lambda x: L.triplet_loss(x, Y, 0.3, "all"),
    "triplet_batch_hard": lambda x: L.triplet_loss(x, Y, 0.3, "batch-hard"),
    "npair": lambda x: L.n_pair_loss(x, Y),
    "angular": lambda x: L.angular_loss(x, Y),
    "ntxent": lambda x: L.nt_xent(x, X),
    "dcl": lambda x: L.dcl_loss(X, x),
    "infonce": lambda x: L.info_nce(x, X),
    "infonce_queue": lambda x: L.info_nce(X, X, x),
    "supcon": lambda x: L.supcon_loss(torch.stack([x, X], 1), Y),
    "clip": lambda x: L.clip_loss(x, X, SCALE),
    "siglip": lambda x: L.siglip_loss(x, X, SCALE, BIAS),
    "nce": lambda x: L.nce_loss(X, X, x, n_data=100),
    "byol": lambda x: L.byol_loss(x, X),
}
# Mining by label needs label-dependent sizes (a host read of the labels, not of embeddings).
READS_LABELS = {"triplet_all", "angular"}


@pytest.mark.parametrize("name", list(EVERY_LOSS))
def test_a_nan_embedding_gives_a_nan_loss_not_an_error(name):
    """One rank's NaN must reach the step guard as a non-finite loss (skipped on every rank),
    not raise on that rank alone while its peers wait in a collective."""
    bad = X.clone()
    bad[1, 2] = float("nan")
    assert not torch.isfinite(EVERY_LOSS[name](bad))


@pytest.mark.parametrize("name", sorted(set(EVERY_LOSS) - READS_LABELS))
def test_losses_read_no_tensor_value_on_the_host(name, monkeypatch):
    """No per-call host sync (an isfinite check, a float() of a learned scale): on a GPU each
    one stalls the step. Every way a tensor's value reaches Python raises here."""

    def host_read(*args, **kwargs):
        raise AssertionError(f"{name} read a tensor value on the host")

    for method in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    EVERY_LOSS[name](X.clone())


# --------------------------------------------------------------------------------------------
# gradcheck (float64). No loss has a custom backward; these check the autograd paths that are
# easy to get subtly wrong: the sorted-run triplet sums, masked log-sum-exp, the DCLW weights,
# the NCE log-space terms.


def _gradcheck(fn, *inputs):
    leaves = [t.double().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


def test_gradcheck():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 2, 0, 2])
    _gradcheck(lambda e: L.triplet_loss(e, y, 0.4, "all"), x)
    _gradcheck(lambda e: L.triplet_loss(e, y, 0.4, "semi-hard", 0.6), x)
    _gradcheck(lambda e: L.angular_loss(e, y), x)
    a, b = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    _gradcheck(lambda u, v: L.dcl_loss(u, v, 0.5, sigma=0.5), a, b)
    v3 = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    _gradcheck(lambda f: L.supcon_loss(f, torch.tensor([0, 1, 0, 2, 1]), 0.5, 0.5), v3)
    neg = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    _gradcheck(lambda f, p, n: L.nce_loss(f, p, n, 0.5, "nce", 50, z=20.0), a, b, neg)
    s = torch.tensor(math.log(5.0), dtype=torch.float64)
    _gradcheck(lambda i, t, sc: L.clip_loss(i, t, sc), a, b, s)
