"""The figures of one method on a run's evaluation sets, on every rank of the job.

The training set (``data.train_shards``) is the kNN bank and the linear probe's training data,
embedded as a stream and kept sharded over the ranks; the validation set (``data.val_shards``,
or ``eval.zeroshot_data`` for zero-shot: a CLIP_benchmark folder, a folder of class folders or
shards, :mod:`dist_contrast.data.evalsets`) is embedded the same way and gathered. From them:
kNN and linear-probe top-1 of the image encoder (:mod:`dist_contrast.eval.probes`) and, for
image-text methods, zero-shot top-1 and retrieval recall in the joint space
(:mod:`dist_contrast.eval.image_text`). Used by ``dist-contrast eval`` and, every
``eval.every`` steps, by training (``--eval``-style callback given to the engine by the CLI).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from dist_contrast import distributed
from dist_contrast.config import Config
from dist_contrast.data.evalsets import EvalSet, Unit, open_eval_set
from dist_contrast.data.sources import build_sources
from dist_contrast.data.tokenizer import tokenizer_for
from dist_contrast.errors import DataError
from dist_contrast.eval.image_text import method_scores
from dist_contrast.eval.memory import DiskRows
from dist_contrast.eval.probes import sharded_scores
from dist_contrast.eval.stream import Embedded, check_nonempty, embed_set
from dist_contrast.methods import registry


@dataclass
class Sets:
    """What a run is evaluated on."""

    train: list[Unit]
    val: EvalSet
    zeroshot: EvalSet | None = None  # eval.zeroshot_data, when it differs from val


def run_sets(cfg: Config) -> Sets:
    d = cfg.data
    train = [
        Unit("shard", url=u)
        for src in build_sources(d.train_shards, d.train_weights, "data.train_shards")
        for u in src.urls
    ]
    if not d.val_shards:
        raise DataError("evaluation needs validation shards: set data.val_shards")
    val = open_eval_set(d.val_shards, "data.val_shards")
    zs = (
        open_eval_set(cfg.eval.zeroshot_data, "eval.zeroshot_data")
        if cfg.eval.zeroshot_data
        else None
    )
    return Sets(train, val, zs)


def _image_fn(method: nn.Module, image_text: bool):
    """Images -> the encoder's representation (kNN, linear) and, for image-text methods, its
    projection into the joint space (zero-shot, retrieval), the encoder run once."""
    encoder = method.encoder
    if not image_text:
        return lambda x: {"encoder": encoder(x)}

    def both(x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = encoder(x)
        return {"encoder": f, "image": method.image.proj(f)}

    return both


def _text_fn(cfg: Config, method: nn.Module, device):
    tok = tokenizer_for(cfg.data)
    return lambda captions: method.text(tok(captions).to(device))


def method_figures(
    cfg: Config, method: nn.Module, sets: Sets, *, max_samples: int = 0, desc: str = ""
) -> dict:
    """kNN / linear (and zero-shot / retrieval) figures of ``method``, the same on every
    rank; ``train_samples`` and ``val_samples`` count what was embedded."""
    image_text = registry.spec(cfg.method.name).image_text
    was_training = method.training
    method.eval()
    device = distributed.device() if distributed.is_dist() else torch.device("cpu")
    kw = dict(
        batch_size=cfg.eval.batch_size,
        max_samples=max_samples,
        precision=cfg.deepspeed.precision,
        feature_dtype=cfg.eval.feature_dtype,
        device=device,
    )
    image = _image_fn(method, image_text)
    try:
        with torch.no_grad():
            train = embed_set(
                sets.train,
                image,
                cfg.data,
                desc=desc and f"{desc} train",
                memory_mb=cfg.eval.bank_memory_mb,
                spill_dir=cfg.eval.spill_dir,
                **kw,
            )
            text = _text_fn(cfg, method, device) if image_text else None
            val = embed_set(
                sets.val.units,
                image,
                cfg.data,
                text=text,
                require_caption=image_text,
                desc=desc and f"{desc} val",
                **kw,
            )
            _say_on_disk(cfg, train)
            check_nonempty(train, "data.train_shards")
            check_nonempty(val, "data.val_shards")
            val = val.gathered()
            out = {"train_samples": _count(train), "val_samples": len(val)}
            out.update(sharded_scores(cfg, train, val))
            if image_text:
                out.update(_image_text(cfg, method, sets, val, image, kw, desc))
    finally:
        method.train(was_training)
    return out


def _image_text(cfg, method, sets: Sets, val: Embedded, image, kw, desc) -> dict:
    zs_set = sets.zeroshot or sets.val
    if sets.zeroshot is None:
        return method_scores(cfg, method, val, zs_set.classnames, zs_set.templates)
    figures = method_scores(cfg, method, val, zeroshot=False)  # retrieval on val
    zs = embed_set(zs_set.units, image, cfg.data, desc=desc and f"{desc} zero-shot", **kw)
    zs = zs.gathered()
    figures.update(
        method_scores(cfg, method, zs, zs_set.classnames, zs_set.templates, retrieval=False)
    )
    figures["zeroshot_samples"] = len(zs)
    return figures


def _say_on_disk(cfg: Config, train: Embedded) -> None:
    """One line (rank 0) when the training features passed ``eval.bank_memory_mb``."""
    disk = [v for v in train.feats.values() if isinstance(v, DiskRows)]
    if disk and distributed.is_main():
        mb = sum(len(v) * v.row_bytes for v in disk) / 1e6
        print(
            f"dist-contrast: eval: training features past eval.bank_memory_mb="
            f"{cfg.eval.bank_memory_mb:g} MB: {mb:,.1f} MB on rank 0 read from a temporary "
            f"file in {disk[0].where}",
            file=sys.stderr,
            flush=True,
        )


def _count(e: Embedded) -> int:
    n = float(len(e))
    return int(distributed.all_reduce_sum([n])[0]) if distributed.multi_rank() else int(n)


def periodic(cfg: Config):
    """The evaluator training calls every ``eval.every`` steps (on every rank): the figures of
    the method as it is, on at most ``eval.max_samples`` samples of each set, no baseline."""
    sets = run_sets(cfg)

    def evaluate(method: nn.Module, step: int) -> dict:
        out = method_figures(cfg, method, sets, max_samples=cfg.eval.max_samples)
        out.pop("retrieval_match", None)
        return out

    return evaluate
