"""The method registry: the one place a method is declared.

An entry names the module of ``dist_contrast.methods`` that builds the method (its
``build(cfg) -> Method``), the losses it trains with, and the fields every sample must carry.
Adding a method is its module plus one entry here. :func:`check` refuses a method/loss mismatch
in one line before anything is built; ``train --check`` runs it with :func:`check_samples` on
the first sample of the training shards, before any process group starts.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from dist_contrast.config import Config
from dist_contrast.errors import ConfigError, DataError
from dist_contrast.models import MLPHead, build_head, build_predictor
from dist_contrast.models.towers import image_projection, text_projection

# What a field of :func:`check_samples` means, for the error message.
FIELDS = {
    "label": "a class label (a cls entry or a json label)",
    "index": "its data set index (a json index, as dist-contrast shards writes it)",
    "caption": "a caption (a txt entry or a json caption)",
}


@dataclass(frozen=True)
class MethodSpec:
    module: str  # dist_contrast.methods.<module> builds it
    losses: tuple[str, ...]  # loss.name values it trains with
    needs: tuple[str, ...] = ()  # sample fields (keys of FIELDS) every sample must carry
    tiled: bool = True  # loss.memory_efficient (tiled softmax) is available
    image_text: bool = False  # an image tower and a text tower (captions -> tokens)


METHODS: dict[str, MethodSpec] = {
    "simclr": MethodSpec("simclr", ("ntxent",)),
    "dcl": MethodSpec("simclr", ("dcl",), tiled=False),
    "moco_v2": MethodSpec("moco", ("infonce",)),
    "moco_v3": MethodSpec("moco", ("infonce",)),
    "byol": MethodSpec("byol", ("byol",)),
    "instdisc": MethodSpec("instdisc", ("nce", "infonce"), needs=("index",)),
    "supcon": MethodSpec("supcon", ("supcon",), needs=("label",)),
    "metric": MethodSpec("metric", ("contrastive", "triplet", "npair", "angular"), ("label",)),
    "clip": MethodSpec("clip", ("clip", "siglip"), needs=("caption",), image_text=True),
}


class LossChoiceError(ConfigError, ValueError):
    """``loss.name`` does not fit ``method.name`` (a ValueError, printed as one line by the CLI)."""


def spec(name: str) -> MethodSpec:
    """The entry of ``name``; an unknown name is one line with the closest known one."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"config key 'method.name' must be one of {', '.join(METHODS)}, got {name!r}{hint}"
        )
    return METHODS[name]


def check(cfg: Config) -> MethodSpec:
    """The entry of ``cfg.method.name`` once the config fits it: the loss is one the method
    trains with, and the options asked for exist for it."""
    entry, name, loss = spec(cfg.method.name), cfg.method.name, cfg.loss.name
    if loss not in entry.losses:
        choices = " or ".join(f"loss.name={a}" for a in entry.losses)
        users = [m for m, s in METHODS.items() if loss in s.losses]
        other = f" ({loss} goes with method.name={' or '.join(users)})" if users else ""
        raise LossChoiceError(
            f"method '{name}' does not train with loss.name={loss!r}; set {choices}{other}"
        )
    if cfg.loss.memory_efficient and not entry.tiled:
        raise LossChoiceError(
            f"loss.memory_efficient (tiled softmax) is not available for method '{name}'"
        )
    if cfg.model.lock_image and not entry.image_text:
        raise ConfigError(
            f"model.lock_image (LiT) is for image-text methods; method '{name}' trains the image "
            "encoder itself"
        )
    if cfg.model.lock_image and not cfg.model.init_from:
        raise ConfigError(
            "model.lock_image=true needs model.init_from=hf:DIR, export:DIR or open_clip:DIR "
            "(a locked image tower at random weights would never learn)"
        )
    if entry.image_text and cfg.data.tokenizer == "none":
        raise ConfigError(
            f"config key 'data.tokenizer' must be bytes or bpe for method {name} (its text "
            "tower reads token ids)"
        )
    return entry


def check_world(cfg: Config, world: int) -> None:
    """Refuse a sharded queue (MoCo v2; CLIP with ``method.queues``) that ``world`` ranks
    cannot share: each rank holds ``method.queue_size / world`` keys. A run resumed on another
    number of ranks has had its size fitted before (:func:`dist_contrast.train.elastic.
    fit_queue_size`) and passes."""
    m = cfg.method
    queued = m.name == "moco_v2" or (spec(m.name).image_text and m.queues)
    if not queued or m.queue_size % world == 0:
        return
    lower = m.queue_size - m.queue_size % world
    sizes = f"{lower:,} or {lower + world:,}" if lower else f"{world:,}"
    raise ConfigError(
        f"config key 'method.queue_size' is {m.queue_size:,}, not a multiple of the {world} "
        f"ranks that share the queue (each holds queue_size / ranks keys): set "
        f"method.queue_size={sizes}"
    )


def check_samples(cfg: Config, fields: Mapping[str, bool], where: str) -> None:
    """Refuse data whose samples lack a field the method needs; ``fields`` says which fields
    a sample of ``where`` carries (see :data:`FIELDS`)."""
    for field in spec(cfg.method.name).needs:
        if not fields.get(field, False):
            raise DataError(
                f"method '{cfg.method.name}' needs {FIELDS[field]} in every sample; the first "
                f"sample of {where} has none"
            )


def build_method(cfg: Config):
    """The method of ``cfg``, with freshly initialised weights (seed them before calling)."""
    entry = check(cfg)
    module = importlib.import_module(f"dist_contrast.methods.{entry.module}")
    return module.build(cfg)


def build_heads(cfg: Config, image_dim: int, text_dim: int | None = None) -> nn.ModuleDict:
    """The ``heads`` tower of ``cfg``'s method (what :meth:`Method.towers` exports under that
    name) at fresh weights, built alone: for an encoder of ``image_dim`` outputs (and a text
    encoder of ``text_dim``), without the encoders, momentum copies, queues or bank."""
    name, model = cfg.method.name, cfg.model
    if spec(name).image_text:
        from dist_contrast.methods.clip import objective

        return nn.ModuleDict(
            {
                "image_proj": image_projection(cfg, image_dim),
                "text_proj": text_projection(cfg, text_dim or 0),
                "criterion": objective(cfg.loss),
            }
        )
    if name == "instdisc":
        heads = {"projector": MLPHead(image_dim, model.proj_hidden_dim, model.proj_dim, 1)}
    else:
        heads = {"projector": build_head(image_dim, model)}
    if name in ("moco_v3", "byol"):
        heads["predictor"] = build_predictor(model)
    return nn.ModuleDict(heads)
