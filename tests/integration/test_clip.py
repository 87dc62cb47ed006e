"""CLIP / SigLIP: the three loss forms (gathered full matrix, local, tiled) agree in value and
gradients on 1 and 2 ranks and match an explicit loop; the form with queues on 2 ranks equals
one process with the concatenated queue shards and an explicit loop; the logit scale's gradient
is counted once under cached accumulation; the text tower pools at end-of-text and is causal."""

from __future__ import annotations

import math

import pytest
import torch
from test_accumulate import TorchEngine

from dist_contrast.data.tokenizer import ByteTokenizer
from dist_contrast.losses import clip_loss, siglip_loss
from dist_contrast.methods import build_method
from dist_contrast.models.text import TextTransformer
from dist_contrast.negatives.queue import queue_clip_loss
from dist_contrast.train.accumulate import cached_step

from conftest import config_from_dict
from multiproc import run_ranks

F64 = torch.float64
N, D, K = 8, 6, 10  # global batch, embedding dim, queue rows in all

CLIP_FORMS = {
    "local": dict(local=True),
    "full": dict(local=False),
    "tiled": dict(local=True, memory_efficient=True, tile=3),
}


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(N, D, generator=g, dtype=F64),
        "text": torch.randn(N, D, generator=g, dtype=F64),
        "image_queue": torch.nn.functional.normalize(torch.randn(K, D, generator=g, dtype=F64)),
        "text_queue": torch.nn.functional.normalize(torch.randn(K, D, generator=g, dtype=F64)),
    }


def naive_clip(image, text, log_scale) -> torch.Tensor:
    """Explicit loop: mean over pairs of the two cross-entropies."""
    scale = log_scale.exp().clamp(max=100.0)
    img = image / image.norm(dim=1, keepdim=True)
    txt = text / text.norm(dim=1, keepdim=True)
    total = image.new_zeros(())
    n = image.shape[0]
    for i in range(n):
        i2t = torch.stack([scale * (img[i] @ txt[j]) for j in range(n)])
        t2i = torch.stack([scale * (txt[i] @ img[j]) for j in range(n)])
        total = total + (torch.logsumexp(i2t, 0) - i2t[i]) + (torch.logsumexp(t2i, 0) - t2i[i])
    return total / (2 * n)


def naive_queue_clip(image, text, image_queue, text_queue, log_scale):
    """Explicit loop: each image against every text of the batch and the text queue, each text
    against every image and the image queue; the positive is its own pair."""
    scale = log_scale.exp()

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    total = image.new_zeros(())
    n = image.shape[0]
    for q, keys, queue in ((image, text, text_queue), (text, image, image_queue)):
        for i in range(n):
            cands = torch.cat([unit(keys), unit(queue)])
            logits = torch.stack([scale * (unit(q[i]) @ c) for c in cands])
            total = total + torch.logsumexp(logits, 0) - logits[i]
    return total / (2 * n)


def _leaves(x: dict, names) -> dict[str, torch.Tensor]:
    return {k: x[k].clone().requires_grad_(True) for k in names}


def _clip_value_and_grads(inp, log_scale, form, rank=0, world=1, gather="all"):
    n = inp["image"].shape[0] // world
    leaves = _leaves({k: v[rank * n : (rank + 1) * n] for k, v in inp.items()}, ("image", "text"))
    s = log_scale.clone().requires_grad_(True)
    loss = clip_loss(leaves["image"], leaves["text"], s, 100.0, gather, **CLIP_FORMS[form])
    loss.backward()
    return loss.detach(), leaves["image"].grad, leaves["text"].grad, s.grad


def _siglip_value_and_grads(inp, s0, b0, local, rank=0, world=1):
    n = inp["image"].shape[0] // world
    leaves = _leaves({k: v[rank * n : (rank + 1) * n] for k, v in inp.items()}, ("image", "text"))
    s, b = s0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    loss = siglip_loss(leaves["image"], leaves["text"], s, b, "all", local)
    loss.backward()
    return loss.detach(), leaves["image"].grad, leaves["text"].grad, s.grad, b.grad


LOG_SCALE = torch.tensor(math.log(1 / 0.07), dtype=F64)
SIG_SCALE, SIG_BIAS = torch.tensor(math.log(10.0), dtype=F64), torch.tensor(-3.0, dtype=F64)


def _assert_close(a, b, tol=1e-10):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_clip_forms_agree_with_a_naive_loop_on_one_process():
    inp = _inputs()
    img = inp["image"].clone().requires_grad_(True)
    txt = inp["text"].clone().requires_grad_(True)
    s = LOG_SCALE.clone().requires_grad_(True)
    ref = naive_clip(img, txt, s)
    ref.backward()
    want = (ref.detach(), img.grad, txt.grad, s.grad)
    for form in CLIP_FORMS:
        _assert_close(_clip_value_and_grads(inp, LOG_SCALE, form), want)


def test_siglip_full_and_local_agree_on_one_process():
    inp = _inputs()
    _assert_close(
        _siglip_value_and_grads(inp, SIG_SCALE, SIG_BIAS, True),
        _siglip_value_and_grads(inp, SIG_SCALE, SIG_BIAS, False),
    )


def _two_rank_forms(rank, world, inp):
    out = {form: _clip_value_and_grads(inp, LOG_SCALE, form, rank, world) for form in CLIP_FORMS}
    for local in (True, False):
        out[f"siglip_{local}"] = _siglip_value_and_grads(
            inp, SIG_SCALE, SIG_BIAS, local, rank, world
        )
    out["queue"] = _queue_value_and_grads(inp, rank, world)
    return out


def _queue_value_and_grads(inp, rank, world):
    n, k = N // world, K // world
    part = {name: inp[name][rank * n : (rank + 1) * n] for name in ("image", "text")}
    leaves = _leaves(part, ("image", "text"))
    s = LOG_SCALE.clone().requires_grad_(True)
    loss = queue_clip_loss(
        leaves["image"],
        leaves["text"],
        inp["image_queue"][rank * k : (rank + 1) * k],
        inp["text_queue"][rank * k : (rank + 1) * k],
        s.exp(),
        tile=3 if rank % 2 else None,  # one rank tiled, the other not: both exact
    )
    loss.backward()
    return loss.detach(), leaves["image"].grad, leaves["text"].grad, s.grad


def _combine(per_rank: list[tuple], world: int) -> tuple:
    """Per-rank results as one process would see them: mean loss, input gradients / W stacked
    in rank order, shared-parameter gradients averaged (DeepSpeed's average)."""
    loss = torch.stack([r[0] for r in per_rank]).mean()
    inputs = [torch.cat([r[i] for r in per_rank]) / world for i in (1, 2)]
    shared = [torch.stack([r[i] for r in per_rank]).mean() for i in range(3, len(per_rank[0]))]
    return (loss, *inputs, *shared)


def test_loss_forms_on_two_ranks_equal_one_process():
    inp = _inputs()
    ranks = run_ranks(_two_rank_forms, 2, inp)
    one = _two_rank_forms(0, 1, inp)
    for name in one:
        _assert_close(_combine([r[name] for r in ranks], 2), one[name])
    # and the three CLIP forms agree with each other across ranks, rank by rank
    for r in ranks:
        _assert_close(r["local"], r["tiled"])


def test_queue_loss_matches_a_naive_loop():
    inp = _inputs(3)
    img = inp["image"].clone().requires_grad_(True)
    txt = inp["text"].clone().requires_grad_(True)
    s = LOG_SCALE.clone().requires_grad_(True)
    ref = naive_queue_clip(img, txt, inp["image_queue"], inp["text_queue"], s)
    ref.backward()
    got = _queue_value_and_grads(inp, 0, 1)
    _assert_close(got, (ref.detach(), img.grad, txt.grad, s.grad))


# --------------------------------------------------------------------------------------------
# The method


def _clip_method(**over):
    torch.manual_seed(0)
    tree = {
        "model": {"width": 4, "proj_dim": 8},
        "data": {"image_size": 8, "tokenizer": "bytes", "require_caption": True, "views": 1},
        "text": {"width": 16, "layers": 1, "heads": 2},
        "method": {"name": "clip"},
        "loss": {"name": "clip", "temperature": 0.07},
    }
    for key, value in over.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    return build_method(config_from_dict(tree)).double()


def _batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = ByteTokenizer(32)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    return {
        "view1": torch.randn(n, 1, 8, 8, generator=g, dtype=F64),
        "tokens": tok([f"a digit {words[i % 8]} number {i}" for i in range(n)]),
    }


@pytest.mark.parametrize("queues", [False, True])
def test_logit_scale_gradient_counted_once_under_cached_accumulation(queues):
    over = {"method__queues": True, "method__queue_size": 16} if queues else {}
    batch = _batch(8)
    grads = []
    for parts in (1, 4):
        m = _clip_method(**over)
        out = cached_step(TorchEngine(m, parts), batch, parts)
        got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        grads.append((out.loss, got))
    (loss1, g1), (loss4, g4) = grads
    torch.testing.assert_close(loss4, loss1, rtol=1e-10, atol=1e-12)
    assert g1.keys() == g4.keys() and "criterion.logit_scale" in g1
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-8, atol=1e-10, msg=name)


def test_text_tower_pools_at_end_of_text_and_is_causal():
    torch.manual_seed(0)
    tok = ByteTokenizer(16)
    model = TextTransformer(tok.vocab_size, 16, tok.eot_id, width=16, layers=2, heads=2).eval()
    ids = tok(["seven", "seven and more"])
    out = model(ids)
    # "seven" alone == the feature of the same tokens when pooled at its eot position
    assert torch.allclose(out[0], model(ids[:1, :7])[0], atol=1e-6)
    # changing tokens after the end-of-text (padding) does not change the feature (causal)
    ids2 = ids.clone()
    ids2[0, 8:] = 99
    assert torch.allclose(model(ids2)[0], out[0], atol=1e-6)
    # but a token before it does
    ids3 = ids.clone()
    ids3[0, 2] = 99
    assert not torch.allclose(model(ids3)[0], out[0], atol=1e-4)


def test_text_tower_on_trimmed_rows_gives_the_same_features_and_gradients():
    """The loader cuts a batch's token rows after its last end-of-text (Tokenizer.trim): the
    features and every parameter's gradient equal the full rows' (float64)."""
    torch.manual_seed(0)
    tok = ByteTokenizer(24)
    model = TextTransformer(tok.vocab_size, 24, tok.eot_id, width=16, layers=2, heads=2).double()
    ids = tok(["seven", "the digit nine", "0"])
    grads, feats = [], []
    for rows in (ids, tok.trim(ids)):
        model.zero_grad()
        out = model(rows)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        feats.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert tok.trim(ids).shape[1] == 16 < 24
    torch.testing.assert_close(feats[1], feats[0], rtol=1e-12, atol=1e-12)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-12, atol=1e-12, msg=name)
