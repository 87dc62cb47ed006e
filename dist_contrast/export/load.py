"""Exported encoders: write them (:func:`export_run`, ``dist-contrast export``) and load them
(:func:`load_encoder`) without DeepSpeed.

>>> enc = load_encoder("runs/simclr_digits/export")            # tower="image", device="cpu"
>>> feats = enc.embed([pil_image_1, pil_image_2])               # [2, D], no grad
>>> enc.module(enc.preprocess(uint8_hwc_array))                 # the same, by hand

:func:`load_encoder` builds only the tower asked for from the export's ``config.yaml``
(:func:`build_tower`: no training method, momentum copies, queues or memory bank), then loads
the tower's ``model.safetensors`` with strict key and shape checks. Nothing on that path
imports DeepSpeed, WebDataset, wandb or kornia. The directory layout is
described in :mod:`dist_contrast.export.layout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dist_contrast.config import Config, DataConfig, load_config
from dist_contrast.data.augment import Normalize, resize_view
from dist_contrast.data.tokenizer import tokenizer_for
from dist_contrast.export.layout import (
    CONFIG_YAML,
    EXPORT_JSON,
    FORMAT,
    IMAGE,
    TEXT,
    TOKENIZER_JSON,
    ExportError,
    check_state,
    tower_kind,
)
from dist_contrast.methods import registry
from dist_contrast.methods.init import (
    export_towers,
    export_weights,
    read_json_mapping,
    read_safetensors,
)
from dist_contrast.models import towers


class Preprocess:
    """Images -> the normalised float tensor [N, C, S, S] the image encoder expects, made as
    evaluation makes it (:mod:`dist_contrast.eval.stream`):

    - a PIL image, or a NumPy array HW / HWC (uint8 0-255, or float in [0, 1], rounded to
      uint8): shorter side resized to S (bilinear), centre crop, converted to the trained
      channel count, then ``(x / 255 - mean) / std``;
    - a torch tensor [C, S, S] or [N, C, S, S] (uint8 0-255 or float in [0, 1]) already of the
      encoder's size: only normalised;
    - a list or tuple of single images: one batch.
    """

    def __init__(self, data: DataConfig, device: str | torch.device = "cpu") -> None:
        self.image_size, self.channels = data.image_size, data.channels
        self.normalize = Normalize(data.mean, data.std).to(device)
        self.device = torch.device(device)

    def _pixels(self, image: Any) -> torch.Tensor:
        """One image as uint8 [C, S, S] (PIL / NumPy) or as given (a tensor)."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                image = np.clip(np.rint(image.astype(np.float64) * 255.0), 0, 255)
            arr = image.astype(np.uint8)
            image = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        if isinstance(image, Image.Image):
            return resize_view(image, self.image_size, self.channels).contiguous()[None]
        if isinstance(image, torch.Tensor):
            return image[None] if image.dim() == 3 else image
        raise TypeError(f"cannot preprocess {type(image).__name__}: PIL, NumPy or torch image")

    def __call__(self, images: Any) -> torch.Tensor:
        many = isinstance(images, Sequence) and not isinstance(images, str)
        parts = [self._pixels(im) for im in (images if many else [images])]
        x = torch.cat([p.float() / 255.0 if p.dtype == torch.uint8 else p.float() for p in parts])
        want = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"images must be [N, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}"
            )
        return self.normalize(x.to(self.device))


@dataclass
class LoadedEncoder:
    """One tower of an export, ready to use.

    ``module``: the network in eval mode on the requested device (image: float [N, C, S, S]
    -> [N, D]; text: int64 token ids [N, L] -> [N, D]; ``heads``: a ModuleDict of the
    projector / predictor). ``preprocess``: images -> the encoder's input (image tower only).
    ``tokenizer``: captions -> token ids (text tower only). ``config``: the training config.
    ``info``: the tower's entry of ``export.json`` (input spec, output size, parameters)."""

    module: nn.Module
    tower: str
    config: Config
    info: dict
    preprocess: Preprocess | None = None
    tokenizer: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def embed(self, inputs: Any) -> torch.Tensor:
        """Features of images (through ``preprocess``) or captions (through ``tokenizer``)."""
        if self.preprocess is not None:
            x = self.preprocess(inputs)
        elif self.tokenizer is not None:
            x = inputs if isinstance(inputs, torch.Tensor) else self.tokenizer.encode(inputs)
        else:
            raise ExportError(f"tower '{self.tower}' is not an encoder (it holds heads only)")
        return self.module(x.to(self.device))


def read_manifest(folder: Path) -> dict:
    """``export.json`` of the export ``folder``, once it is a mapping of this format whose
    towers each name a weights file; else one :class:`ExportError` naming the file."""
    path = folder / EXPORT_JSON
    if not path.exists():
        raise ExportError(f"'{folder}' is not an export directory (no {EXPORT_JSON})")
    manifest = read_json_mapping(path, ExportError)
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not a dist-contrast export manifest")
    export_towers(manifest, path, ExportError)
    if "checkpoint" not in manifest:  # evaluation reports it
        raise ExportError(f"{path} does not name the checkpoint it was exported from")
    return manifest


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A tower's safetensors file; a damaged one is one :class:`ExportError`."""
    return read_safetensors(path, ExportError, ": export again")


def weights_of(folder: Path, manifest: dict, tower: str) -> Path:
    """The weights file of ``tower``, checked to lie inside the export ``folder``."""
    return export_weights(folder, manifest["towers"], tower, ExportError)


def _export_dir(path: Path) -> tuple[Path, str | None]:
    """An export directory, or one of its tower folders (which then names the tower)."""
    if path.is_file():
        path = path.parent
    if not (path / EXPORT_JSON).exists() and (path.parent / EXPORT_JSON).exists():
        return path.parent, path.name
    return path, None


def _config(folder: Path) -> Config:
    cfg = load_config(folder / CONFIG_YAML)
    if cfg.data.tokenizer == "bpe" and (folder / TOKENIZER_JSON).is_file():
        cfg.data.tokenizer_path = str(folder / TOKENIZER_JSON)  # the export's own copy
    return cfg


def build_tower(cfg: Config, tower: str, manifest: dict) -> nn.Module:
    """The network of one tower at fresh weights, built from the config alone (not the
    training method): the image encoder, the text encoder over the export's tokenizer, or the
    method's heads (sized by the encoders' outputs recorded in ``export.json``)."""
    if tower == IMAGE:
        return towers.image_encoder(cfg)
    if tower == TEXT:
        tok = tokenizer_for(cfg.data)
        return towers.text_encoder(cfg, tok.vocab_size, tok.eot_id)
    dims = {name: t.get("output_dim") for name, t in manifest["towers"].items()}
    for name in (IMAGE, TEXT) if TEXT in dims else (IMAGE,):
        if not isinstance(dims.get(name), int) or dims[name] <= 0:
            raise ExportError(f"{EXPORT_JSON} gives tower '{name}' no output_dim for the heads")
    return registry.build_heads(cfg, dims[IMAGE], dims.get(TEXT))


def load_encoder(
    path: str | Path, tower: str = "image", device: str | torch.device = "cpu"
) -> LoadedEncoder:
    """The ``tower`` (``image``, ``text`` or ``heads``) of the export at ``path`` (the export
    directory or one of its tower folders), on ``device``, in eval mode."""
    folder, named = _export_dir(Path(path))
    tower = named or tower
    manifest = read_manifest(folder)
    if tower not in manifest["towers"]:
        raise ExportError(
            f"export '{folder}' has no tower '{tower}' ({', '.join(manifest['towers'])})"
        )
    cfg = _config(folder)
    info = manifest["towers"][tower]
    weights = weights_of(folder, manifest, tower)
    module = build_tower(cfg, tower, manifest)
    check_state(module, read_weights(weights), f"{weights}")
    device = torch.device(device)
    module = module.to(device).eval()
    loaded = LoadedEncoder(module, tower, cfg, info, device=device)
    if info.get("kind", tower_kind(tower)) == "image":
        loaded.preprocess = Preprocess(cfg.data, device)
    elif tower == TEXT:
        loaded.tokenizer = tokenizer_for(cfg.data)
    return loaded


@dataclass
class LoadedCLIP:
    """Both towers of an image-text export in the joint space (encoder + projection each).

    ``encode_image(images)``: PIL / NumPy images, or a tensor of pixels (uint8, or float in
    [0, 1]) -> L2-normalised [N, D]; ``encode_text(texts)``: captions, or token ids [N, L]
    from ``tokenizer`` -> L2-normalised [N, D]. ``logit_scale``: the trained multiplier of the
    cosine similarities (CLIP's clamped at ``loss.max_scale``, as in training), and
    ``logit_bias`` SigLIP's trained bias (0 for CLIP), so
    ``logit_scale * encode_image(x) @ encode_text(t).T + logit_bias`` are the model's logits
    (SigLIP's: their sigmoid is the probability that image and text match)."""

    image: nn.Module
    text: nn.Module
    logit_scale: float
    preprocess: Preprocess
    tokenizer: Any
    config: Config
    device: torch.device
    logit_bias: float = 0.0

    @torch.no_grad()
    def encode_image(self, images: Any) -> torch.Tensor:
        return F.normalize(self.image(self.preprocess(images)).float(), dim=1)

    def text_fn(self):
        """Captions -> joint-space text features (not normalised), for streamed evaluation."""
        return lambda captions: self.text(self.tokenizer.encode(captions).to(self.device))

    @torch.no_grad()
    def encode_text(self, texts: Any) -> torch.Tensor:
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenizer.encode(texts)
        return F.normalize(self.text(ids.to(self.device)).float(), dim=1)


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> LoadedCLIP:
    """The image and text towers of the image-text export at ``path`` with their projections
    and logit scale (see :class:`LoadedCLIP`)."""
    folder, _ = _export_dir(Path(path))
    manifest = read_manifest(folder)
    if not {IMAGE, TEXT, "heads"} <= set(manifest["towers"]):
        raise ExportError(
            f"export '{folder}' is not of an image-text run (towers: "
            f"{', '.join(manifest['towers'])}); use load_encoder"
        )
    image, text = load_encoder(folder, IMAGE, device), load_encoder(folder, TEXT, device)
    heads = load_encoder(folder, "heads", device).module
    return LoadedCLIP(
        image=nn.Sequential(image.module, heads["image_proj"]).eval(),
        text=nn.Sequential(text.module, heads["text_proj"]).eval(),
        logit_scale=float(heads["criterion"].scale().detach()),
        logit_bias=float(getattr(heads["criterion"], "logit_bias", torch.zeros(1)).detach()[0]),
        preprocess=image.preprocess,
        tokenizer=text.tokenizer,
        config=image.config,
        device=image.device,
    )
