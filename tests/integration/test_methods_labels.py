"""Methods with labels or pairwise losses (supcon, metric) and DCL: their loss is the library
loss on the same embeddings, an independent N-pair reference, and 2 ranks equal one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_contrast.config import load_config
from dist_contrast.losses import (
    DCLLoss,
    NTXentLoss,
    SupConLoss,
    TripletLoss,
    dcl_loss,
    supcon_loss,
)
from dist_contrast.methods import build_method
from dist_contrast.methods.metric import interleave

from multiproc import run_ranks

SMALL = ["model.width=8", "model.proj_hidden_dim=16", "model.proj_dim=8"]
PAIRWISE = ["contrastive", "triplet", "npair", "angular"]


def _method(name: str, loss: str, *extra: str, seed: int = 0):
    cfg = load_config(None, [f"method.name={name}", f"loss.name={loss}", *SMALL, *extra])
    torch.manual_seed(seed)
    return cfg, build_method(cfg)


def _batch(n: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "view1": torch.randn(n, 1, 16, 16, generator=g),
        "view2": torch.randn(n, 1, 16, 16, generator=g),
        "label": torch.randint(0, 4, (n,), generator=g),
        "index": torch.arange(n),
    }


def test_supcon_method_is_supcon_loss_on_its_embeddings():
    cfg, method = _method("supcon", "supcon", "loss.temperature=0.1")
    batch = _batch()
    emb = method.embed(batch)
    got = method.loss(emb, batch).loss
    feats = torch.stack([emb["z1"], emb["z2"]], dim=1)
    want = supcon_loss(feats, batch["label"], 0.1, 0.1)
    assert isinstance(method.criterion, SupConLoss)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # labels matter: the same embeddings without labels give SimCLR's loss, a different value
    assert not torch.allclose(got, supcon_loss(feats, None, 0.1, 0.1))


def _npair_reference(z1, z2, labels):
    """One pair per class, the two views of the first sample of the class; cross-entropy of
    normalised dot products against the other pairs' positives."""
    first = [int((labels == c).nonzero()[0]) for c in sorted(set(labels.tolist()))]
    a, p = F.normalize(z1[first], dim=1), F.normalize(z2[first], dim=1)
    return F.cross_entropy(a @ p.T, torch.arange(len(first)))


@pytest.mark.parametrize("loss", PAIRWISE)
def test_metric_method_each_pairwise_loss(loss):
    cfg, method = _method("metric", loss)
    batch = _batch()
    emb = method.embed(batch)
    out = method.loss(emb, batch).loss
    assert torch.isfinite(out) and out > 0
    out.backward()
    grads = [p.grad for p in method.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    z, labels = interleave(emb["z1"].detach(), emb["z2"].detach(), batch["label"])
    direct = method.criterion(F.normalize(z, dim=1), labels)
    torch.testing.assert_close(out.detach(), direct)
    if loss == "npair":
        ref = _npair_reference(emb["z1"].detach(), emb["z2"].detach(), batch["label"])
        torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)


def test_metric_mining_names_and_bad_loss_name():
    _, method = _method("metric", "triplet", "loss.mining=hard", "loss.margin=0.3")
    assert isinstance(method.criterion, TripletLoss)
    assert (method.criterion.mining, method.criterion.margin) == ("batch-hard", 0.3)
    _, method = _method("metric", "triplet", "loss.mining=semihard")
    assert method.criterion.mining == "semi-hard"
    with pytest.raises(ValueError, match="method 'metric' does not train with loss.name='ntxent'"):
        _method("metric", "ntxent")
    with pytest.raises(ValueError, match="loss.name=supcon"):
        _method("supcon", "triplet")
    with pytest.raises(ValueError, match="loss.name=dcl"):
        _method("dcl", "ntxent")


def test_dcl_from_config_uses_dcl_loss_and_simclr_keeps_ntxent():
    _, dcl = _method("dcl", "dcl", "loss.temperature=0.3")
    _, simclr = _method("simclr", "ntxent", "loss.temperature=0.3")
    assert isinstance(dcl.criterion, DCLLoss) and dcl.criterion.temperature == 0.3
    assert isinstance(simclr.criterion, NTXentLoss)
    batch = _batch()
    emb = dcl.embed(batch)
    torch.testing.assert_close(dcl.loss(emb, batch).loss, dcl_loss(emb["z1"], emb["z2"], 0.3))
    # same weights (same seed): DCL's loss differs from NT-Xent's by the positive term
    assert not torch.allclose(dcl(batch).loss, simclr(batch).loss)


CASES = [("supcon", "supcon"), ("dcl", "dcl")] + [("metric", name) for name in PAIRWISE]


def _losses_and_grads(rank: int, world: int, n: int):
    """Each method's loss on this rank's slice of the batch and its parameter gradients."""
    batch = _batch(n)
    per = n // world
    part = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
    out = {}
    for name, loss in CASES:
        _, method = _method(name, loss)
        value = method(part).loss
        value.backward()
        out[f"{name}/{loss}"] = (value.detach(), [p.grad.clone() for p in method.parameters()])
    return out


def test_two_ranks_equal_one_process():
    """Rank-mean loss and rank-averaged gradients (DeepSpeed's average) on 2 ranks equal one
    process on the whole batch, for every labelled method and DCL."""
    n = 12
    one = _losses_and_grads(0, 1, n)
    ranks = run_ranks(_losses_and_grads, 2, n)
    for key, (loss, grads) in one.items():
        mean = (ranks[0][key][0] + ranks[1][key][0]) / 2
        torch.testing.assert_close(mean, loss, rtol=1e-5, atol=1e-6, msg=key)
        for g, g0, g1 in zip(grads, ranks[0][key][1], ranks[1][key][1], strict=True):
            torch.testing.assert_close((g0 + g1) / 2, g, rtol=1e-4, atol=1e-6, msg=key)
