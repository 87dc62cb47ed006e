"""Softmax / sigmoid / regression objectives against naive loops (and pytorch-metric-learning
where it defines the same loss): values and input gradients, float64, one process."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from dist_contrast.losses import (
    BYOLLoss,
    ClipLoss,
    DCLLoss,
    InfoNCELoss,
    NCELoss,
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
    byol_loss,
    clip_loss,
    dcl_loss,
    estimate_nce_z,
    info_nce,
    nce_loss,
    nt_xent,
    siglip_loss,
    supcon_loss,
)

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _grads(fn, *inputs):
    """(value, input grads) of fn(*inputs), inputs cloned as leaves."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]
    return loss.detach(), grads


def _assert_same(fn_a, fn_b, *inputs, rtol=1e-10):
    va, ga = _grads(fn_a, *inputs)
    vb, gb = _grads(fn_b, *inputs)
    assert torch.allclose(va, vb, rtol=rtol, atol=1e-12), (float(va), float(vb))
    for a, b in zip(ga, gb, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def _unit(v):
    return v / v.norm()


def _lse(values):
    return torch.log(sum(torch.exp(v) for v in values))


# --------------------------------------------------------------------------------------------
# naive references


def naive_ntxent(z1, z2, t):
    views = [_unit(v) for v in list(z1) + list(z2)]
    n = len(z1)
    total = 0
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        others = [views[a] @ views[c] / t for c in range(2 * n) if c != a]
        total = total - views[a] @ views[p] / t + _lse(others)
    return total / (2 * n)


def naive_dcl(z1, z2, t, sigma=None):
    views = [_unit(v) for v in list(z1) + list(z2)]
    n = len(z1)
    if sigma is None:
        w = [1.0] * n
    else:
        sims = [views[i] @ views[i + n] / sigma for i in range(n)]
        denom = sum(torch.exp(s) for s in sims)
        w = [2 - n * torch.exp(s) / denom for s in sims]
    total = 0
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        negs = [views[a] @ views[c] / t for c in range(2 * n) if c not in (a, p)]
        if negs:
            total = total - w[a % n] * (views[a] @ views[p]) / t + _lse(negs)
    return total / (2 * n) + z1.sum() * 0


def naive_info_nce(q, k, negatives, t, in_batch):
    total = 0
    for i in range(len(q)):
        qi = _unit(q[i])
        pos = qi @ _unit(k[i]) / t
        logits = [pos]
        if in_batch:
            logits += [qi @ _unit(k[j]) / t for j in range(len(k)) if j != i]
        if negatives is not None:
            logits += [qi @ _unit(v) / t for v in negatives]
        total = total - pos + _lse(logits)
    return total / len(q)


def naive_supcon(features, labels, t, base_t, mode="all"):
    n, views, _ = features.shape
    ids = labels.tolist() if labels is not None else list(range(n))
    samples = [(s, v) for s in range(n) for v in range(views)]
    anchors = [(s, v) for (s, v) in samples if mode == "all" or v == 0]
    total = 0
    for s, v in anchors:
        a = _unit(features[s, v])
        others = [(c, _unit(features[c[0], c[1]])) for c in samples if c != (s, v)]
        if not others:
            continue
        log_denom = _lse([a @ f / t for _, f in others])
        pos = [a @ f / t - log_denom for c, f in others if ids[c[0]] == ids[s]]
        if pos:
            total = total - (t / base_t) * sum(pos) / len(pos)
    return total / len(anchors) + features.sum() * 0


def naive_clip(image, text, logit_scale, max_scale=100.0):
    scale = torch.clamp(torch.exp(logit_scale), max=max_scale)
    n = len(image)
    img = [_unit(v) for v in image]
    txt = [_unit(v) for v in text]
    total = 0
    for i in range(n):
        total = total - scale * img[i] @ txt[i] + _lse([scale * img[i] @ tj for tj in txt])
        total = total - scale * txt[i] @ img[i] + _lse([scale * txt[i] @ ij for ij in img])
    return total / (2 * n)


def naive_siglip(image, text, logit_scale, logit_bias):
    n = len(image)
    total = 0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = torch.exp(logit_scale) * _unit(image[i]) @ _unit(text[j]) + logit_bias
            total = total - torch.log(torch.sigmoid(z * logit))
    return total / n


def naive_nce(features, positives, negatives, t, n_data, z=None):
    """The InstDisc reference computation (NCEAverage + NCECriterion), without its 1e-7."""
    b = len(features)
    rows = []
    for i in range(b):
        f = _unit(features[i])
        negs = negatives if negatives.dim() == 2 else negatives[i]
        rows.append([f @ _unit(positives[i]) / t] + [f @ _unit(v) / t for v in negs])
    k = len(rows[0]) - 1
    out = [[torch.exp(s) for s in row] for row in rows]
    if z is None:
        z = float(sum(sum(r) for r in out).detach()) / (b * (k + 1)) * n_data
    pn = 1.0 / n_data
    total = 0
    for row in out:
        p = [v / z for v in row]
        total = total + torch.log(p[0] / (p[0] + k * pn))
        total = total + sum(torch.log(k * pn / (v + k * pn)) for v in p[1:])
    return -total / b


def naive_nce_softmax(features, positives, negatives, t):
    total = 0
    for i in range(len(features)):
        f = _unit(features[i])
        negs = negatives if negatives.dim() == 2 else negatives[i]
        pos = f @ _unit(positives[i]) / t
        total = total - pos + _lse([pos] + [f @ _unit(v) / t for v in negs])
    return total / len(features)


def naive_byol(p, z):
    return sum(2 - 2 * _unit(p[i]) @ _unit(z[i].detach()) for i in range(len(p))) / len(p)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 6])
def test_ntxent_matches_naive_and_pml(n):
    z1, z2 = _randn(n, 5, seed=1), _randn(n, 5, seed=2)
    _assert_same(NTXentLoss(temperature=0.3), lambda a, b: naive_ntxent(a, b, 0.3), z1, z2)

    def pml(a, b):
        labels = torch.arange(n).repeat(2)
        return pml_losses.NTXentLoss(temperature=0.3)(torch.cat([a, b]), labels)

    if n > 1:  # pml returns 0 without negatives; SimCLR's loss is then 0 too but by the CE
        _assert_same(lambda a, b: nt_xent(a, b, 0.3), pml, z1, z2)


@pytest.mark.parametrize("sigma", [None, 0.5])
@pytest.mark.parametrize("n", [1, 2, 6])
def test_dcl_matches_naive(n, sigma):
    z1, z2 = _randn(n, 5, seed=3), _randn(n, 5, seed=4)
    _assert_same(
        DCLLoss(temperature=0.2, sigma=sigma), lambda a, b: naive_dcl(a, b, 0.2, sigma), z1, z2
    )


def test_dcl_differs_from_ntxent_only_by_the_positive_in_the_denominator():
    z1, z2 = _randn(5, 4, seed=5), _randn(5, 4, seed=6)
    assert float(dcl_loss(z1, z2, 0.5)) < float(nt_xent(z1, z2, 0.5))


@pytest.mark.parametrize(("in_batch", "k_extra"), [(True, 0), (True, 7), (False, 7)])
def test_info_nce_matches_naive(in_batch, k_extra):
    q, k = _randn(5, 4, seed=7), _randn(5, 4, seed=8)
    neg = _randn(k_extra, 4, seed=9) if k_extra else None
    inputs = (q, k) if neg is None else (q, k, neg)

    def ours(*xs):
        return InfoNCELoss(temperature=0.2, in_batch=in_batch)(*xs)

    def naive(*xs):
        return naive_info_nce(xs[0], xs[1], xs[2] if len(xs) > 2 else None, 0.2, in_batch)

    _assert_same(ours, naive, *inputs)


def test_info_nce_in_batch_with_queue_matches_pml_ntxent_with_ref():
    q, k, neg = _randn(6, 4, seed=10), _randn(6, 4, seed=11), _randn(9, 4, seed=12)

    def pml(q, k, neg):
        ref_labels = torch.arange(6 + 9)
        return pml_losses.NTXentLoss(temperature=0.1)(
            q, torch.arange(6), ref_emb=torch.cat([k, neg]), ref_labels=ref_labels
        )

    _assert_same(lambda a, b, c: info_nce(a, b, c, 0.1, in_batch=True), pml, q, k, neg)


def test_info_nce_default_in_batch_follows_negatives():
    q, k, neg = _randn(4, 3, seed=13), _randn(4, 3, seed=14), _randn(5, 3, seed=15)
    moco_v2 = naive_info_nce(q, k, neg, 0.07, in_batch=False)
    moco_v3 = naive_info_nce(q, k, None, 0.07, in_batch=True)
    assert torch.allclose(info_nce(q, k, neg), moco_v2)
    assert torch.allclose(info_nce(q, k), moco_v3)


SUPCON_LABELS = {
    "none": None,
    "classes": [0, 1, 0, 2, 1, 2],
    "singletons": [0, 0, 1, 2, 3, 4],
    "one_class": [5] * 6,
}


@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("pattern", list(SUPCON_LABELS))
@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcon_matches_naive(views, pattern, mode):
    labels = SUPCON_LABELS[pattern]
    labels = None if labels is None else torch.tensor(labels)
    f = _randn(6, views, 5, seed=16)

    def ours(x):
        return SupConLoss(temperature=0.2, base_temperature=0.1, contrast_mode=mode)(x, labels)

    _assert_same(ours, lambda x: naive_supcon(x, labels, 0.2, 0.1, mode), f)


@pytest.mark.parametrize("pattern", ["none", "classes", "singletons"])
def test_supcon_matches_pml_where_pml_defines_the_same_loss(pattern):
    """pml's SupConLoss averages over anchors with a non-zero loss: the same thing when every
    anchor has a positive (V = 2) and a negative (two labels or more)."""
    labels = SUPCON_LABELS[pattern]
    labels = torch.arange(6) if labels is None else torch.tensor(labels)
    f = _randn(6, 2, 5, seed=17)

    def pml(x):
        flat = torch.cat(torch.unbind(x, dim=1))
        return pml_losses.SupConLoss(temperature=0.2)(flat, labels.repeat(2))

    _assert_same(lambda x: supcon_loss(x, labels, 0.2, 0.2), pml, f)


def test_supcon_without_labels_is_ntxent():
    z1, z2 = _randn(5, 4, seed=18), _randn(5, 4, seed=19)
    f = torch.stack([z1, z2], dim=1)
    assert torch.allclose(supcon_loss(f, None, 0.3, 0.3), nt_xent(z1, z2, 0.3), rtol=1e-12)


@pytest.mark.parametrize("n", [1, 5])
def test_clip_matches_naive_including_logit_scale_grad(n):
    image, text = _randn(n, 4, seed=20), _randn(n, 4, seed=21)
    scale = torch.tensor(math.log(1 / 0.07), dtype=F64)
    _assert_same(
        lambda a, b, s: clip_loss(a, b, s), lambda a, b, s: naive_clip(a, b, s), image, text, scale
    )


def test_clip_module_parameter_and_clamp():
    loss = ClipLoss()
    assert float(loss.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    image, text = _randn(4, 3, seed=22), _randn(4, 3, seed=23)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))  # clamped at 100: no gradient
    loss(image, text).backward()
    assert float(loss.logit_scale.grad) == 0.0
    clamped = clip_loss(image, text, math.log(1000.0))
    assert torch.allclose(clamped, clip_loss(image, text, math.log(100.0)))


@pytest.mark.parametrize("n", [1, 5])
def test_siglip_matches_naive_including_scale_and_bias_grads(n):
    image, text = _randn(n, 4, seed=24), _randn(n, 4, seed=25)
    scale, bias = torch.tensor(math.log(10.0), dtype=F64), torch.tensor(-3.0, dtype=F64)
    _assert_same(siglip_loss, naive_siglip, image, text, scale, bias)


def test_siglip_module_init():
    loss = SigLipLoss()
    assert float(loss.logit_scale.detach()) == pytest.approx(math.log(10.0))
    assert float(loss.logit_bias.detach()) == pytest.approx(-10.0)
    image, text = _randn(3, 4, seed=26), _randn(3, 4, seed=27)
    loss(image, text).backward()
    assert loss.logit_scale.grad is not None and loss.logit_bias.grad is not None


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("z", [None, 50.0])
def test_nce_matches_instdisc_reference(shared, z):
    f, pos = _randn(4, 5, seed=28), _randn(4, 5, seed=29)
    neg = _randn(6, 5, seed=30) if shared else _randn(4, 6, 5, seed=30)

    def ours(a, b, c):
        return nce_loss(a, b, c, 0.1, "nce", n_data=1000, z=z)

    _assert_same(ours, lambda a, b, c: naive_nce(a, b, c, 0.1, 1000, z), f, pos, neg)


@pytest.mark.parametrize("shared", [True, False])
def test_nce_softmax_matches_naive(shared):
    f, pos = _randn(4, 5, seed=31), _randn(4, 5, seed=32)
    neg = _randn(6, 5, seed=33) if shared else _randn(4, 6, 5, seed=33)
    _assert_same(
        NCELoss(temperature=0.1, mode="softmax"),
        lambda a, b, c: naive_nce_softmax(a, b, c, 0.1),
        f,
        pos,
        neg,
    )


def test_nce_module_estimates_z_once_and_keeps_it():
    f, pos, neg = _randn(4, 5, seed=34), _randn(4, 5, seed=35), _randn(6, 5, seed=36)
    loss = NCELoss(n_data=500, temperature=0.1)
    first = loss(f, pos, neg)
    z = float(loss.z)
    assert z == pytest.approx(estimate_nce_z(f, pos, neg, 0.1, 500))
    assert torch.allclose(first, naive_nce(f, pos, neg, 0.1, 500))
    f2 = _randn(4, 5, seed=37)
    second = loss(f2, pos, neg)
    assert float(loss.z) == z  # fixed after the first batch
    assert torch.allclose(second, naive_nce(f2, pos, neg, 0.1, 500, z=z))
    assert "z" in loss.state_dict()


def test_byol_matches_naive_and_detaches_targets():
    p1, z2, p2, z1 = (_randn(5, 4, seed=s) for s in (38, 39, 40, 41))
    _assert_same(lambda p, z: BYOLLoss()(p, z), naive_byol, p1, z2)

    def naive_sym(a, b, c, d):
        return naive_byol(a, b) + naive_byol(c, d)

    _assert_same(byol_loss, naive_sym, p1, z2, p2, z1)
    _, grads = _grads(byol_loss, p1, z2, p2, z1)
    assert grads[1].abs().sum() == 0 and grads[3].abs().sum() == 0
    assert grads[0].abs().sum() > 0


def test_negatives_per_query():
    assert NTXentLoss().negatives_per_query(8, 4) == 62
    assert NTXentLoss(gather="off").negatives_per_query(8, 4) == 14
    assert DCLLoss().negatives_per_query(8, 2) == 30
    assert ClipLoss().negatives_per_query(8, 4) == 31
    assert SigLipLoss(gather="off").negatives_per_query(8, 4) == 7
    assert InfoNCELoss().negatives_per_query(8, 4) == 31  # MoCo v3: keys of every rank
    assert InfoNCELoss().negatives_per_query(8, 4, n_extra=100) == 100  # MoCo v2: the queue
    assert InfoNCELoss(in_batch=True).negatives_per_query(8, 2, n_extra=100) == 115
