"""Pairwise label-based losses against naive loops and against pytorch-metric-learning
(values and input gradients, float64, one process)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from dist_contrast.losses import (
    AngularLoss,
    ContrastiveLoss,
    NPairLoss,
    TripletLoss,
    angular_loss,
    contrastive_loss,
    n_pair_loss,
    triplet_loss,
)

# label patterns: several classes, pairs, singletons mixed in, one class, all distinct
LABELS = {
    "three_classes": [0, 1, 2, 0, 1, 2, 0, 1, 2, 0],
    "pairs": [4, 4, 7, 7, 1, 1, 9, 9],
    "singletons": [0, 0, 0, 1, 2, 3, 3, 5, 6],
    "one_class": [3] * 6,
    "all_distinct": list(range(7)),
    "single": [0],
}


def _data(pattern: str, dim: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(LABELS[pattern])
    x = torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return x, labels


def _value_and_grad(fn, x, labels):
    x = x.clone().requires_grad_(True)
    loss = fn(x, labels)
    loss.backward()
    return loss.detach(), x.grad


def _assert_same(fn_a, fn_b, x, labels):
    va, ga = _value_and_grad(fn_a, x, labels)
    vb, gb = _value_and_grad(fn_b, x, labels)
    assert torch.allclose(va, vb, rtol=1e-10, atol=1e-12), (float(va), float(vb))
    assert torch.allclose(ga, gb, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------
# naive references: explicit python loops over pairs and triplets


def _unit(v):
    return v / v.norm()


def _dist(x, i, j):
    return (_unit(x[i]) - _unit(x[j])).norm()


def _mean_nonzero(values):
    nonzero = [v for v in values if v > 0]
    return sum(nonzero) / len(nonzero) if nonzero else torch.zeros((), dtype=torch.float64)


def naive_contrastive(x, labels, pos_margin=0.0, neg_margin=1.0):
    pos, neg = [], []
    for i, j in itertools.permutations(range(len(labels)), 2):
        d = _dist(x, i, j)
        if labels[i] == labels[j]:
            pos.append(torch.relu(d - pos_margin))
        else:
            neg.append(torch.relu(neg_margin - d))
    return _mean_nonzero(pos) + _mean_nonzero(neg) + x.sum() * 0


def _triplets(labels):
    n = len(labels)
    for a, p, q in itertools.product(range(n), repeat=3):
        if a != p and labels[a] == labels[p] and labels[q] != labels[a]:
            yield a, p, q


def naive_triplet_all(x, labels, margin):
    losses = [torch.relu(_dist(x, a, p) - _dist(x, a, q) + margin) for a, p, q in _triplets(labels)]
    return _mean_nonzero(losses) + x.sum() * 0


def naive_triplet_semihard(x, labels, margin, window):
    losses = []
    for a, p, q in _triplets(labels):
        gap = float((_dist(x, a, q) - _dist(x, a, p)).detach())
        if 0 < gap <= window:
            losses.append(torch.relu(_dist(x, a, p) - _dist(x, a, q) + margin))
    return _mean_nonzero(losses) + x.sum() * 0


def naive_triplet_batch_hard(x, labels, margin):
    n = len(labels)
    losses = []
    for a in range(n):
        pos = [_dist(x, a, p) for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [_dist(x, a, q) for q in range(n) if labels[q] != labels[a]]
        if pos and neg:
            losses.append(torch.relu(max(pos) - min(neg) + margin))
    return _mean_nonzero(losses) + x.sum() * 0


def naive_npair(x, labels):
    seen: dict[int, list[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        seen.setdefault(lab, []).append(i)
    pairs = [(idx[0], idx[1]) for _, idx in sorted(seen.items()) if len(idx) >= 2]
    if not pairs:
        return x.sum() * 0
    total = 0
    for a, p in pairs:
        logits = torch.stack([_unit(x[a]) @ _unit(x[q]) for _, q in pairs])
        own = _unit(x[a]) @ _unit(x[p])
        total = total - own + torch.log(torch.exp(logits).sum())
    return total / len(pairs)


def naive_angular(x, labels, alpha_deg=40.0):
    n = len(labels)
    if len(set(labels.tolist())) < 2:
        return x.sum() * 0
    t2 = math.tan(math.radians(alpha_deg)) ** 2
    losses = []
    for a, p in itertools.permutations(range(n), 2):
        if labels[a] != labels[p]:
            continue
        xa, xp = _unit(x[a]), _unit(x[p])
        s = 1.0
        for q in range(n):
            if labels[q] != labels[a]:  # the negative enters raw, as in pml
                s = s + torch.exp(4 * t2 * (xa + xp) @ x[q] - 2 * (1 + t2) * (xa @ xp))
        losses.append(torch.log(s))
    if not losses:
        return x.sum() * 0
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", list(LABELS))
def test_contrastive_matches_naive_and_pml(pattern):
    x, y = _data(pattern)
    ours = ContrastiveLoss(pos_margin=0.3, neg_margin=1.2)
    _assert_same(ours, lambda e, lab: naive_contrastive(e, lab, 0.3, 1.2), x, y)
    pml = pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=1.2)
    _assert_same(ours, pml, x, y)
    # the defaults are pml's defaults
    _assert_same(lambda e, lab: contrastive_loss(e, lab), pml_losses.ContrastiveLoss(), x, y)


@pytest.mark.parametrize("pattern", list(LABELS))
def test_triplet_all_matches_naive_and_pml(pattern):
    x, y = _data(pattern)
    ours = TripletLoss(margin=0.3, mining="all")
    _assert_same(ours, lambda e, lab: naive_triplet_all(e, lab, 0.3), x, y)
    _assert_same(ours, pml_losses.TripletMarginLoss(margin=0.3), x, y)
    _assert_same(lambda e, lab: triplet_loss(e, lab), pml_losses.TripletMarginLoss(), x, y)


@pytest.mark.parametrize("pattern", list(LABELS))
def test_triplet_batch_hard_matches_naive_and_pml(pattern):
    x, y = _data(pattern)
    ours = TripletLoss(margin=0.3, mining="batch-hard")
    _assert_same(ours, lambda e, lab: naive_triplet_batch_hard(e, lab, 0.3), x, y)

    def pml(e, lab):
        return pml_losses.TripletMarginLoss(margin=0.3)(e, lab, pml_miners.BatchHardMiner()(e, lab))

    _assert_same(ours, pml, x, y)


@pytest.mark.parametrize("pattern", list(LABELS))
@pytest.mark.parametrize(("margin", "window"), [(0.3, None), (0.1, 0.4), (0.5, 0.2)])
def test_triplet_semihard_matches_naive_and_pml(pattern, margin, window):
    x, y = _data(pattern)
    w = margin if window is None else window
    ours = TripletLoss(margin=margin, mining="semi-hard", semihard_margin=window)
    _assert_same(ours, lambda e, lab: naive_triplet_semihard(e, lab, margin, w), x, y)

    def pml(e, lab):
        miner = pml_miners.TripletMarginMiner(margin=w, type_of_triplets="semihard")
        return pml_losses.TripletMarginLoss(margin=margin)(e, lab, miner(e, lab))

    _assert_same(ours, pml, x, y)


def test_triplet_larger_batch_against_pml():
    """More anchors than cdist's direct path (> 25 rows) and many ties in label structure."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (40,), generator=g)
    for mining, miner in [
        ("all", None),
        ("batch-hard", pml_miners.BatchHardMiner()),
        ("semi-hard", pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")),
    ]:

        def pml(e, lab, miner=miner):
            idx = miner(e, lab) if miner is not None else None
            return pml_losses.TripletMarginLoss(margin=0.2)(e, lab, idx)

        _assert_same(TripletLoss(margin=0.2, mining=mining), pml, x, y)


@pytest.mark.parametrize("pattern", list(LABELS))
def test_npair_matches_naive_and_pml(pattern):
    x, y = _data(pattern)
    _assert_same(NPairLoss(), naive_npair, x, y)
    _assert_same(lambda e, lab: n_pair_loss(e, lab), pml_losses.NPairsLoss(), x, y)


@pytest.mark.parametrize("pattern", list(LABELS))
def test_angular_matches_naive_and_pml(pattern):
    x, y = _data(pattern)
    _assert_same(AngularLoss(alpha=35), lambda e, lab: naive_angular(e, lab, 35), x, y)
    _assert_same(AngularLoss(alpha=35), pml_losses.AngularLoss(alpha=35), x, y)
    _assert_same(lambda e, lab: angular_loss(e, lab), pml_losses.AngularLoss(), x, y)


def test_losses_are_not_trivially_zero():
    """The label patterns above exercise non-zero losses (a test that cannot fail is a defect)."""
    x, y = _data("three_classes")
    for fn in [
        ContrastiveLoss(),
        TripletLoss(margin=0.3),
        TripletLoss(margin=0.3, mining="batch-hard"),
        TripletLoss(margin=0.3, mining="semi-hard"),
        NPairLoss(),
        AngularLoss(),
    ]:
        assert float(fn(x, y)) > 0.01
