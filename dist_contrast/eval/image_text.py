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
from dist_contrast.data.tokenizer import Tokenizer
from dist_contrast.errors import DataError
from dist_contrast.eval.memory import release_freed_memory
from dist_contrast.eval.probes import bounded_chunk, embed

RECALL_AT = (1, 5, 10)


def class_embeddings(
    text_tower: nn.Module,
    tokenizer: Tokenizer,
    classes: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 512,
) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of the normalised prompt embeddings. Classes go
    through the text tower a few at a time (about ``batch_size`` prompts a batch), so 1,000
    classes x 80 templates never hold more than one batch of prompts."""
    per = max(1, batch_size // max(1, len(templates)))
    out = []
    for i in range(0, len(classes), per):
        names = classes[i : i + per]
        prompts = [t.format(c) for c in names for t in templates]
        emb = embed(text_tower, tokenizer(prompts), batch_size)
        out.append(F.normalize(emb.view(len(names), len(templates), -1).mean(dim=1), dim=1))
        del emb
        # the batch's activations, freed in the arenas of torch's threads: back to the system
        # (glibc kept them: 1,000 x 80 prompts peaked at 490-880 MB rather than ~300)
        release_freed_memory()
    return torch.cat(out)


def zeroshot_top1(
    image_feats: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor, chunk: int = 4096
) -> float:
    correct = 0
    for i in range(0, len(image_feats), chunk):
        pred = (image_feats[i : i + chunk] @ class_emb.T).argmax(dim=1)
        correct += int((pred == labels[i : i + chunk]).sum())
    return correct / len(image_feats)


def match_keys(labels: torch.Tensor, captions: Sequence[str | None]) -> tuple[torch.Tensor, str]:
    """What makes item j relevant to query i (see the module doc): equal keys. The labels
    where every sample has one (rule "label"), else a code per distinct caption ("caption")."""
    if bool((labels >= 0).all()):
        return labels, "label"
    ids: dict[str | None, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions]), "caption"


def recall_at(
    query: torch.Tensor,
    items: torch.Tensor,
    query_keys: torch.Tensor,
    item_keys: torch.Tensor,
    ks=RECALL_AT,
    chunk: int = 1024,
) -> dict[int, float]:
    """Fraction of queries with a relevant item (an equal key) among their k most similar, per
    k. Similarities and relevance are made one chunk of queries at a time: memory is
    ``chunk x len(items)``, whatever the number of queries."""
    kmax = min(max(ks), items.shape[0])
    chunk = bounded_chunk(chunk, items.shape[0])
    hits = {k: 0 for k in ks}
    for i in range(0, len(query), chunk):
        top = (query[i : i + chunk] @ items.T).topk(kmax, dim=1).indices
        found = item_keys[top] == query_keys[i : i + chunk, None]  # [n, kmax]
        for k in ks:
            hits[k] += int(found[:, :k].any(dim=1).sum())
    return {k: hits[k] / len(query) for k in ks}


def feature_scores(
    image: torch.Tensor,
    text: torch.Tensor | None,
    labels: torch.Tensor,
    captions: Sequence[str | None],
    class_emb: torch.Tensor | None,
) -> dict:
    """Zero-shot top-1 (given class embeddings and labels) and retrieval recall both ways
    (given caption features) from joint-space features of one set."""
    img = F.normalize(image.float(), dim=1)
    out: dict = {}
    if class_emb is not None:
        out["zeroshot_top1"] = zeroshot_top1(img, labels, class_emb)
    if text is not None:
        txt = F.normalize(text.float(), dim=1)
        keys, rule = match_keys(labels, captions)
        out["retrieval_match"] = rule
        for name, (q, items) in {"i2t": (img, txt), "t2i": (txt, img)}.items():
            for k, v in recall_at(q, items, keys, keys).items():
                out[f"{name}_r{k}"] = v
    return out


def zeroshot_classes(
    labels: torch.Tensor, ev: EvalConfig, classnames=None, templates=None
) -> tuple[list[str], list[str]] | None:
    """The class names and templates zero-shot uses (a set's own files win over the config),
    or None when the samples are not all labelled."""
    if not len(labels) or not bool((labels >= 0).all()):
        return None
    classes = list(classnames or ev.zeroshot_classes)
    if int(labels.max()) >= len(classes):
        raise DataError(
            f"label {int(labels.max())} has no name: {len(classes)} class names "
            "(eval.zeroshot_classes, or the set's classnames.txt)"
        )
    return classes, list(templates or ev.zeroshot_templates)


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


def joint_scores(
    cfg: Config,
    text_tower: nn.Module,
    tokenizer: Tokenizer,
    val,
    classnames=None,
    templates=None,
    zeroshot: bool = True,
    retrieval: bool = True,
) -> dict:
    """Zero-shot and retrieval of an image-text model from ``val``, an embedded set (gathered)
    with the image tower's joint-space features under ``image`` and the captions' under
    ``text``; class embeddings from ``text_tower`` (captions' ids -> joint space) over
    ``tokenizer``. Class names and templates of the set's own files win over the config's."""
    named = zeroshot_classes(val.labels, cfg.eval, classnames, templates) if zeroshot else None
    emb = None
    if named is not None:
        emb = class_embeddings(text_tower, tokenizer, *named, cfg.eval.batch_size)
    text = val.feats.get("text") if retrieval else None
    return feature_scores(val.feats["image"], text, val.labels, val.captions, emb)
