"""Alignment and uniformity (Wang & Isola 2020) against explicit loops over pairs."""

from __future__ import annotations

import math

import torch

from dist_contrast.train.metrics import alignment, embedding_metrics, uniformity


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _sq(p: list[float], q: list[float]) -> float:
    return sum((a - b) ** 2 for a, b in zip(p, q, strict=True))


def _naive(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    xs, ys = [_unit(r) for r in x.tolist()], [_unit(r) for r in y.tolist()]
    align = sum(_sq(p, q) for p, q in zip(xs, ys, strict=True)) / len(xs)

    def unif(rows: list[list[float]]) -> float:
        terms = [
            math.exp(-2 * _sq(rows[i], rows[j]))
            for i in range(len(rows))
            for j in range(len(rows))
            if i != j
        ]
        return math.log(sum(terms) / len(terms))

    return align, (unif(xs) + unif(ys)) / 2


def test_alignment_and_uniformity_equal_explicit_loops():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    want_align, want_unif = _naive(x, y)
    got = embedding_metrics([x, y])
    assert math.isclose(got["alignment"], want_align, rel_tol=1e-12)
    assert math.isclose(got["uniformity"], want_unif, rel_tol=1e-12)


def test_extremes():
    x = torch.randn(6, 4)
    assert float(alignment(x, 3 * x)) < 1e-12  # same directions: perfectly aligned
    assert math.isclose(float(alignment(x, -x)), 4.0, rel_tol=1e-12)  # antipodal: the worst
    same = torch.ones(5, 3)
    assert abs(float(uniformity(same))) < 1e-12  # all in one point: log mean exp(0) = 0


def test_not_two_views_gives_nothing():
    assert embedding_metrics([torch.randn(4, 3)]) == {}
    assert embedding_metrics([torch.randn(1, 3), torch.randn(1, 3)]) == {}
    assert embedding_metrics([torch.randn(4, 3), torch.randn(5, 3)]) == {}
