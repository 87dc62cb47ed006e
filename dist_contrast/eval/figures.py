"""The figures of one model on its evaluation sets, on every rank of the job: the one
evaluation path of ``dist-contrast eval --run`` (a run's method), ``eval --export`` (an export's
towers) and training's ``eval.every``.

The training set (``data.train_shards``, or ``--data``) is the kNN bank and the linear probe's
training data, embedded as a stream and kept sharded over the ranks (past
``eval.bank_memory_mb``, on disk); the validation set (``data.val_shards``, ``--val-data``, or a
held-out part of the training set; ``eval.zeroshot_data`` for zero-shot: a CLIP_benchmark
folder, a folder of class folders or shards, :mod:`dist_contrast.data.evalsets`) is embedded the
same way and gathered. From them: kNN and linear-probe top-1 of the image encoder
(:mod:`dist_contrast.eval.probes`) where the samples carry class labels and, for image-text
models, zero-shot top-1 and retrieval recall in the joint space
(:mod:`dist_contrast.eval.image_text`). What is evaluated is given as :class:`Towers`, built
from a method (:func:`method_towers`) or from an export (:mod:`dist_contrast.eval.export`).
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
from dist_contrast.data.tokenizer import Tokenizer, tokenizer_for
from dist_contrast.errors import DataError
from dist_contrast.eval.holdout import hold_out, in_memory
from dist_contrast.eval.image_text import joint_scores
from dist_contrast.eval.memory import DiskRows
from dist_contrast.eval.probes import sharded_scores
from dist_contrast.eval.stream import Embedded, ImageFn, TextFn, check_nonempty, embed_set
from dist_contrast.methods import registry


@dataclass
class Sets:
    """What a model is evaluated on. ``train``: the kNN bank and the linear probe's data;
    ``val``: the probes' queries and the set of zero-shot and retrieval; ``zeroshot``: zero-shot's
    own set, when it differs. ``holdout`` > 0: ``val`` is the training set itself, not embedded
    again: that fraction of it (:func:`~dist_contrast.eval.holdout.hold_out`) is the probes'
    queries and the rest their training data; zero-shot and retrieval see all of it.
    ``names``: the two sets in messages, ``tags``: in progress bars. ``require_caption``:
    validation samples without a caption are skipped (image-text models: retrieval needs every
    caption); else kept, and retrieval is left out where a caption is missing."""

    train: list[Unit]
    val: EvalSet
    zeroshot: EvalSet | None = None  # eval.zeroshot_data, when it differs from val
    holdout: float = 0.0
    names: tuple[str, str] = ("data.train_shards", "data.val_shards")
    tags: tuple[str, str] = ("train", "val")
    require_caption: bool = True


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


@dataclass
class Towers:
    """What is evaluated. ``image``: images -> ``{"encoder": the representation kNN and the
    linear probe see}``, for image-text models also ``"image"``: its projection into the joint
    space (the encoder run once); ``text``: captions -> joint-space features (image-text models
    only); ``text_tower`` and ``tokenizer``: prompts -> zero-shot's class embeddings."""

    image: ImageFn
    text: TextFn | None = None
    text_tower: nn.Module | None = None
    tokenizer: Tokenizer | None = None

    @property
    def image_text(self) -> bool:
        return self.text is not None


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


def method_towers(cfg: Config, method: nn.Module, device) -> Towers:
    """The :class:`Towers` of a training method (its image encoder; for image-text methods its
    projections and text tower, over the run's tokenizer)."""
    if not registry.spec(cfg.method.name).image_text:
        return Towers(_image_fn(method, False))
    tok = tokenizer_for(cfg.data)
    text = lambda captions: method.text(tok(captions).to(device))  # noqa: E731
    return Towers(_image_fn(method, True), text, method.text, tok)


def eval_device() -> torch.device:
    """Where evaluation runs: the rank's device under a process group, else the CPU."""
    return distributed.device() if distributed.is_dist() else torch.device("cpu")


def method_figures(
    cfg: Config, method: nn.Module, sets: Sets, *, max_samples: int = 0, desc: str = ""
) -> dict:
    """kNN / linear (and zero-shot / retrieval) figures of ``method`` (:func:`evaluate`), in
    eval mode, the method's mode restored after."""
    was_training = method.training
    method.eval()
    try:
        towers = method_towers(cfg, method, eval_device())
        return evaluate(cfg, towers, sets, max_samples=max_samples, desc=desc)
    finally:
        method.train(was_training)


@torch.no_grad()
def evaluate(
    cfg: Config, towers: Towers, sets: Sets, *, max_samples: int = 0, desc: str = ""
) -> dict:
    """The figures of ``towers`` on ``sets``, the same on every rank: ``train_samples`` and
    ``val_samples`` (what was embedded), ``knn_top1`` and ``linear_top1`` where the samples are
    labelled (required unless the model is image-text), and for image-text models zero-shot
    top-1 (labelled samples) and retrieval recall (captioned ones). Settings: ``cfg.eval``
    (batch size, feature storage, probe settings), ``cfg.data`` (decoding) and the training
    precision (``deepspeed.precision``)."""
    kw = dict(
        batch_size=cfg.eval.batch_size,
        max_samples=max_samples,
        precision=cfg.deepspeed.precision,
        feature_dtype=cfg.eval.feature_dtype,
        device=eval_device(),
    )
    train = embed_set(
        sets.train,
        towers.image,
        cfg.data,
        text=towers.text if sets.holdout else None,
        desc=desc and f"{desc} {sets.tags[0]}",
        memory_mb=cfg.eval.bank_memory_mb,
        spill_dir=cfg.eval.spill_dir,
        **kw,
    )
    val = None
    if not sets.holdout:
        val = embed_set(
            sets.val.units,
            towers.image,
            cfg.data,
            text=towers.text,
            require_caption=towers.image_text and sets.require_caption,
            desc=desc and f"{desc} {sets.tags[1]}",
            **kw,
        )
    _say_on_disk(cfg, train)
    check_nonempty(train, sets.names[0])
    if val is None:
        return _held_out_figures(cfg, towers, sets, train, kw, desc)
    check_nonempty(val, sets.names[1])
    val = val.gathered()
    out = {"train_samples": _count(train), "val_samples": len(val)}
    if _probed(train, val, sets, towers.image_text):
        out.update(sharded_scores(cfg, train, val))
    del train
    if towers.image_text:
        out.update(_image_text(cfg, towers, sets, val, kw, desc))
    return out


def _held_out_figures(cfg, towers: Towers, sets: Sets, train: Embedded, kw, desc) -> dict:
    """:func:`evaluate` where the queries are a held-out part of ``train``; image-text figures
    on all of it."""
    joint = None
    if towers.image_text:
        names = [k for k in ("image", "text") if k in train.feats]
        joint = Embedded(
            {k: train.feats[k] for k in names}, train.labels, train.captions, train.order
        ).gathered()
        joint.feats = {k: in_memory(v) for k, v in joint.feats.items()}
        train.feats = {"encoder": train.feats["encoder"]}
    out: dict = {}
    if _probed(train, None, sets, towers.image_text):
        bank, val = hold_out(train, sets.holdout, sets.names[0], cfg.eval)
        train.feats = {}  # the set's own rows: copied out, freed
        out = {"train_samples": _count(bank), "val_samples": len(val)}
        out.update(sharded_scores(cfg, bank, val))
        del bank, val
    if joint is not None:
        out.update(_image_text(cfg, towers, sets, joint, kw, desc))
    return out


def _unlabelled(e: Embedded, gathered: bool) -> int:
    n = int((e.labels < 0).sum())
    if gathered or not distributed.multi_rank():
        return n
    return int(distributed.all_reduce_sum([float(n)])[0])


def _probed(train: Embedded, val: Embedded | None, sets: Sets, image_text: bool) -> bool:
    """Whether the probes run: every sample of both sets labelled (the same answer on every
    rank). An unlabelled training set skips them for an image-text model (zero-shot and
    retrieval remain) and is an error otherwise; an unlabelled validation set of a labelled
    training set is an error."""
    if _unlabelled(train, gathered=False):
        if image_text:
            return False
        raise DataError(
            f"{sets.names[0]} has unlabelled samples (no cls / json label): kNN and the linear "
            "probe need class labels"
        )
    if val is not None and _unlabelled(val, gathered=True):
        raise DataError(
            f"{sets.names[1]} has unlabelled samples (no cls / json label): kNN and the linear "
            "probe are measured on class labels"
        )
    return True


def _image_text(cfg, towers: Towers, sets: Sets, val: Embedded, kw, desc) -> dict:
    zs_set = sets.zeroshot or sets.val
    text, tok = towers.text_tower, towers.tokenizer
    if sets.zeroshot is None:
        return joint_scores(cfg, text, tok, val, zs_set.classnames, zs_set.templates)
    figures = joint_scores(cfg, text, tok, val, zeroshot=False)  # retrieval on val
    zs = embed_set(zs_set.units, towers.image, cfg.data, desc=desc and f"{desc} zero-shot", **kw)
    zs = zs.gathered()
    figures.update(
        joint_scores(cfg, text, tok, zs, zs_set.classnames, zs_set.templates, retrieval=False)
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

    def evaluate_now(method: nn.Module, step: int) -> dict:
        out = method_figures(cfg, method, sets, max_samples=cfg.eval.max_samples)
        out.pop("retrieval_match", None)
        return out

    return evaluate_now
