"""``dist-contrast export --format open_clip``: a folder open_clip (open-clip-torch 3.x) loads as
it is, ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
``open_clip.get_tokenizer("local-dir:DIR")``:

- ``open_clip_config.json``: ``model_cfg`` (its ``CLIP(**model_cfg)``: the ViT in OpenAI's CLIP
  layout, the causal text transformer pooled at end-of-text, the joint width, the logit scale
  and, for SigLIP, ``init_logit_bias``) and ``preprocess_cfg`` (our size, mean and std, the
  shorter side resized bilinearly, a centre crop);
- ``open_clip_model.safetensors``: both towers, both projections, the logit scale (clamped to
  ``loss.max_scale`` as the loss clamps it) and bias, in open_clip's names and shapes;
- the run's BPE as ``tokenizer.json`` + ``tokenizer_config.json`` (as ``--format hf`` writes
  them): open_clip's ``HFTokenizer`` reads them from the folder (``hf_tokenizer_name`` is set,
  and ``local-dir:`` points the tokenizer at the folder itself).

open_clip's patch embedding takes RGB: a grey run's (``data.channels=1``) is written as three
equal thirds, which on the grey image open_clip's preprocessing replicates into three channels
gives our features (to float rounding). What has no open_clip layout (a ResNet or ``timm``-layout
image tower, the byte tokenizer, a method without the two towers) is refused in one line.

The tensor mapping itself is :mod:`dist_contrast.models.open_clip` (also what
``model.init_from=open_clip:`` and ``dist-contrast bench vs_open_clip`` read open_clip's
checkpoints with).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from dist_contrast.config import Config
from dist_contrast.data.tokenizer import BPETokenizer
from dist_contrast.export.hf import bpe_tokenizer, write_tokenizer
from dist_contrast.export.layout import ExportError
from dist_contrast.models.open_clip import to_open_clip
from dist_contrast.models.vit import VisionTransformer, vit_size

CONFIG_JSON = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
METHODS = ("clip", "siglip")


def model_config(cfg: Config, vocab_size: int, eot_id: int, pad_id: int, tokenizer: str) -> dict:
    """open_clip's model config (``CLIP(**config)``) of the towers ``cfg`` builds; ``tokenizer``
    is its ``hf_tokenizer_name``."""
    m, t, d = cfg.model, cfg.text, cfg.data
    size = vit_size(m.encoder, m.vit_width, m.vit_depth, m.vit_heads, m.vit_mlp_ratio)
    norm = {"eps": m.norm_eps}
    config = {
        "embed_dim": m.proj_dim,
        "quick_gelu": m.activation == "quick_gelu",
        "init_logit_scale": math.log(1 / cfg.loss.temperature),
        "vision_cfg": {
            "image_size": d.image_size,
            "patch_size": m.patch_size,
            "width": size.dim,
            "layers": size.depth,
            "head_width": size.dim // size.heads,
            "mlp_ratio": size.mlp_ratio,
            "pool_type": "tok",
            "norm_kwargs": norm,
        },
        "text_cfg": {
            "context_length": d.context_length,
            "vocab_size": vocab_size,
            "hf_tokenizer_name": tokenizer,
            "width": t.width,
            "heads": t.heads,
            "layers": t.layers,
            "mlp_ratio": t.mlp_ratio,
            "pad_id": pad_id,
            "eos_id": eot_id,
            "pool_type": "eos",
            "norm_kwargs": norm,
        },
    }
    if cfg.loss.name == "siglip":
        config["init_logit_bias"] = cfg.loss.init_bias
    return config


def _checked(method: nn.Module, cfg: Config) -> BPETokenizer:
    if cfg.method.name not in METHODS:
        raise ExportError(
            f"export --format open_clip needs an image-text run (method.name in {METHODS}), "
            f"not {cfg.method.name!r}: open_clip holds CLIP models"
        )
    image = method.towers()["image"]
    if not isinstance(image, VisionTransformer) or image.layout != "clip":
        name = type(image).__name__
        if isinstance(image, VisionTransformer):
            name += f" ({image.layout} layout)"
        raise ExportError(
            f"export --format open_clip: the image tower {name} has no open_clip layout: train "
            "with a ViT in CLIP's layout (model.encoder=vit_*, model.vit_layout=clip; "
            "configs/clip_vit_digits.yaml); SigLIP's layouts export to transformers' "
            "SiglipModel (--format hf)"
        )
    if cfg.text.layout != "clip" or cfg.model.activation == "gelu_tanh":
        raise ExportError(
            "export --format open_clip writes open_clip's CLIP towers (a causal text tower, "
            "gelu or quick_gelu): this run has text.layout="
            f"{cfg.text.layout}, model.activation={cfg.model.activation}; SigLIP's layouts "
            "export to transformers' SiglipModel (--format hf)"
        )
    if cfg.data.channels not in (1, 3):
        raise ExportError(f"export --format open_clip: {cfg.data.channels} channels (1 or 3)")
    return bpe_tokenizer(cfg, "open_clip")


def preprocess_config(cfg: Config) -> dict:
    """open_clip's ``preprocess_cfg`` of our preprocessing (RGB: one mean and std, a grey
    run's or one for all channels, for each of the three)."""
    d = cfg.data
    mean, std = list(d.mean), list(d.std)
    mean, std = (mean * 3 if len(mean) == 1 else mean), (std * 3 if len(std) == 1 else std)
    return {
        "size": d.image_size,
        "mode": "RGB",
        "mean": mean,
        "std": std,
        "interpolation": "bilinear",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def write_open_clip(method: nn.Module, cfg: Config, folder: Path) -> dict:
    """Write ``method`` (an image-text run's) into ``folder`` as open_clip loads it; returns
    the model config."""
    from safetensors.torch import save_file

    tok = _checked(method, cfg)
    max_scale = cfg.loss.max_scale if cfg.loss.name == "clip" else None
    try:
        tensors = to_open_clip(method.state_dict(), max_scale)
    except KeyError as exc:
        raise ExportError(
            f"export --format open_clip: {exc} has no place in open_clip's CLIP"
        ) from None
    config = model_config(cfg, tok.vocab_size, tok.eot_id, tok.pad_id, "(this folder)")
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    doc = {"model_cfg": config, "preprocess_cfg": preprocess_config(cfg)}
    (folder / CONFIG_JSON).write_text(json.dumps(doc, indent=1) + "\n")
    write_tokenizer(tok, folder)
    config["parameters"] = sum(t.numel() for t in tensors.values())
    return config


def open_clip_usage() -> list[str]:
    """The model card's "Use" lines for an open_clip folder."""
    return [
        "```python",
        "import open_clip",
        "",
        "folder = 'local-dir:path/to/this/folder'",
        "model, _, preprocess = open_clip.create_model_and_transforms(folder)",
        "tokenizer = open_clip.get_tokenizer(folder)",
        "image_features = model.encode_image(torch.stack([preprocess(im) for im in images]))",
        "text_features = model.encode_text(tokenizer(texts))",
        "```",
        "",
        "Features are in the joint space, not normalised (`encode_image(..., normalize=True)` "
        "normalises them); `model.logit_scale.exp()` is the trained temperature's inverse.",
    ]
