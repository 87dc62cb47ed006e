"""Evaluation of image-text models: zero-shot classification and retrieval.

- Zero-shot top-1 (Radford et al. 2021): each class's text embedding is the mean over the
  prompt templates (``eval.zeroshot_templates``, "{}" -> the class name) of the L2-normalised
  embeddings of its prompts, normalised again (a prompt ensemble); an image is assigned the
  class of highest cosine similarity. Labels index ``eval.zeroshot_classes``. On digits the
  templates are held out from the captions the model was trained on.
- Retrieval R@1/5/10, image->text and text->image, over all validation pairs: a query counts as
  found at K when a relevant item is among its K most similar. Relevant: the item of its own
  pair and, where every sample carries a class label, every item of the same class (digits
  captions describe the class, so a caption of another image of the same digit describes it
  as well); without labels, items with the identical caption (duplicates cannot be told
  apart). eval.json says which (``retrieval_match``: "label" or "caption").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.config import Config, EvalConfig
from dist_contrast.data.tokenizer import Tokenizer, tokenizer_for
from dist_contrast.errors import DataError
from dist_contrast.eval.probes import embed

RECALL_AT = (1, 5, 10)


def class_embeddings(
    text_tower: nn.Module,
    tokenizer: Tokenizer,
    classes: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 512,
) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of the normalised prompt embeddings."""
    prompts = [t.format(c) for c in classes for t in templates]
    emb = embed(text_tower, tokenizer(prompts), batch_size)
    return F.normalize(emb.view(len(classes), len(templates), -1).mean(dim=1), dim=1)


def zeroshot_top1(
    image_feats: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor
) -> float:
    pred = (image_feats @ class_emb.T).argmax(dim=1)
    return float((pred == labels).double().mean())


def relevance(labels: torch.Tensor, captions: Sequence[str | None]) -> tuple[torch.Tensor, str]:
    """[N, N] bool: item j is relevant to query i (see the module doc), and the rule used."""
    if bool((labels >= 0).all()):
        return labels[:, None] == labels[None, :], "label"
    ids: dict[str | None, int] = {}
    codes = torch.tensor([ids.setdefault(c, len(ids)) for c in captions])
    return codes[:, None] == codes[None, :], "caption"


def recall_at(
    query: torch.Tensor, items: torch.Tensor, relevant: torch.Tensor, ks=RECALL_AT, chunk=1024
) -> dict[int, float]:
    """Fraction of queries with a relevant item among their k most similar, per k."""
    kmax = min(max(ks), items.shape[0])
    hits = {k: 0 for k in ks}
    for i in range(0, len(query), chunk):
        top = (query[i : i + chunk] @ items.T).topk(kmax, dim=1).indices
        found = relevant[i : i + chunk].gather(1, top)  # [n, kmax]: relevant at rank r?
        for k in ks:
            hits[k] += int(found[:, :k].any(dim=1).sum())
    return {k: hits[k] / len(query) for k in ks}


def clip_scores(
    image_tower: nn.Module,
    text_tower: nn.Module,
    tokenizer: Tokenizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    captions: Sequence[str | None],
    ev: EvalConfig,
) -> dict:
    """Zero-shot top-1 (when the samples carry labels) and retrieval recall (when they carry
    captions) of one model on one labelled / captioned set."""
    img = embed(image_tower, images, ev.batch_size)
    out: dict = {}
    if bool((labels >= 0).all()):
        if int(labels.max()) >= len(ev.zeroshot_classes):
            raise DataError(
                f"label {int(labels.max())} has no name: eval.zeroshot_classes lists "
                f"{len(ev.zeroshot_classes)} classes"
            )
        emb = class_embeddings(
            text_tower, tokenizer, ev.zeroshot_classes, ev.zeroshot_templates, ev.batch_size
        )
        out["zeroshot_top1"] = zeroshot_top1(img, labels, emb)
    if all(c is not None for c in captions):
        txt = embed(text_tower, tokenizer(list(captions)), ev.batch_size)
        rel, rule = relevance(labels, captions)
        out["retrieval_match"] = rule
        for name, (q, items, r) in {"i2t": (img, txt, rel), "t2i": (txt, img, rel.T)}.items():
            for k, v in recall_at(q, items, r).items():
                out[f"{name}_r{k}"] = v
    return out


def summary(result: dict) -> str:
    """The image-text figures of an eval result in words (trained vs random init if both)."""

    def pct(key: str) -> str:
        v = f"{100 * result[key]:.1f}%"
        init = result.get(f"{key}_random_init")
        return v if init is None else f"{v} (random init {100 * init:.1f}%)"

    lines = []
    if "zeroshot_top1" in result:
        lines.append(f"zero-shot top-1 (held-out prompt templates): {pct('zeroshot_top1')}")
    if "i2t_r1" in result:
        for name, words in (("i2t", "image->text"), ("t2i", "text->image")):
            recalls = " ".join(f"R@{k} {pct(f'{name}_r{k}')}" for k in RECALL_AT)
            lines.append(f"retrieval {words}: {recalls}")
        lines.append(f"(a retrieved item counts when it matches by {result['retrieval_match']})")
    return "\n".join(lines)


def method_scores(cfg: Config, method, images, labels, captions) -> dict:
    """:func:`clip_scores` of a CLIP method (its image and text towers, projections included)."""
    return clip_scores(
        method.image,
        method.text,
        tokenizer_for(cfg.data),
        images,
        labels,
        captions,
        cfg.eval,
    )
