"""``model.init_from``: a run that starts from pretrained weights instead of random ones.

- ``hf:DIR``: a Hugging Face ``transformers`` folder (``config.json`` + ``model.safetensors``,
  or its sharded index): ``CLIPModel`` gives an image-text run both towers, both projections and
  the logit scale (a vision run its image tower); ``CLIPVisionModel``, ``ViTModel`` and
  ``ResNetModel`` give the image encoder.
- ``export:DIR``: a dist-contrast export (``dist-contrast export``): the towers of the same
  names (``image``, and for image-text runs ``text`` and ``heads`` when the export has them).

An image-text run started from a vision-only source (LiT from a ViT, Zhai et al. 2022) gets the
image encoder; its projections and text tower keep their fresh weights. Every tower is loaded
with strict key and shape checks (:func:`dist_contrast.models.weights.load_exact`); what the
shapes cannot show (the activation, the LayerNorm eps, the layout of the ViT, the end-of-text
id the text tower pools at) is compared with the config first. Each failure is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dist_contrast.config import Config
from dist_contrast.data.tokenizer import tokenizer_for
from dist_contrast.errors import ConfigError
from dist_contrast.methods import registry
from dist_contrast.models import hf, hf_resnet
from dist_contrast.models.vit import VisionTransformer
from dist_contrast.models.weights import load_exact

KINDS = ("hf", "export")
VISION_TYPES = {"clip_vision_model": "CLIPVisionModel", "vit": "ViTModel", "resnet": "ResNetModel"}


class InitError(ConfigError):
    """``model.init_from`` names weights this run cannot start from."""


def parse(spec: str) -> tuple[str, Path]:
    """``hf:DIR`` / ``export:DIR`` -> (kind, folder); a folder that is not there is an error."""
    kind, sep, where = spec.partition(":")
    if not sep or kind not in KINDS or not where:
        raise InitError(
            f"model.init_from={spec!r}: expected hf:DIR (a transformers folder) or export:DIR "
            "(a dist-contrast export)"
        )
    folder = Path(where)
    if not folder.is_dir():
        raise InitError(f"model.init_from: '{folder}' is not a directory")
    return kind, folder


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise InitError(
            f"model.init_from: '{folder}' has no model.safetensors (only safetensors are read; "
            "save with model.save_pretrained(DIR), the default)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def _expect(what: str, theirs, ours, fix: str) -> None:
    if theirs is not None and theirs != ours:
        raise InitError(
            f"model.init_from: the source's {what} is {theirs!r}, this run's {ours!r}: {fix}"
        )


def _check_vit(vit: nn.Module, sub: dict, layout: str, where: str) -> None:
    if not isinstance(vit, VisionTransformer) or vit.layout != layout:
        raise InitError(
            f"model.init_from: {where} holds a ViT in the {layout} layout: set "
            f"model.encoder=vit_* and model.vit_layout={layout}"
        )
    _check_blocks(vit, sub)


def _check_blocks(module: nn.Module, sub: dict) -> None:
    _expect(
        "hidden_act",
        sub.get("hidden_act"),
        module.act,
        f"set model.activation={sub.get('hidden_act')}",
    )
    eps = sub.get("layer_norm_eps")
    _expect("layer_norm_eps", eps, module.norm.eps, f"set model.norm_eps={eps}")


def _hf_clip(folder: Path, towers: dict, config: dict, cfg: Config, image_text: bool) -> dict:
    tensors = _safetensors(folder)
    vit = towers["image"]
    _check_vit(vit, config.get("vision_config", {}), "clip", f"'{folder}' (CLIPModel)")
    if not image_text:
        return {"image": hf.from_hf(tensors, hf.clip_vision_pairs(vit))}
    text_cfg = config.get("text_config", {})
    _check_blocks(towers["text"], text_cfg)
    eot = tokenizer_for(cfg.data).eot_id
    _expect(
        "end-of-text id", text_cfg.get("eos_token_id"), eot, "use the tokenizer it was trained with"
    )
    state = hf.from_hf(tensors, hf.clip_pairs(vit, towers["text"]))
    out: dict[str, dict] = {"image": {}, "text": {}, "heads": {}}
    for key, t in state.items():
        name, _, rest = key.partition(".")
        out[name][rest] = t
    heads = towers["heads"].state_dict()
    for key in heads:  # SigLIP's logit bias: not in a CLIPModel, keeps its initial value
        if key.startswith("criterion.") and key not in out["heads"]:
            out["heads"][key] = heads[key]
    return out


def _hf_vision(folder: Path, image: nn.Module, model_type: str, config: dict) -> dict:
    tensors = _safetensors(folder)
    where = f"'{folder}' ({VISION_TYPES[model_type]})"
    if model_type == "resnet":
        try:
            return {"image": hf_resnet.resnet_from_hf(image, tensors)}
        except ValueError as exc:
            raise InitError(f"model.init_from: {where}: {exc}") from None
    if model_type == "vit":
        _check_vit(image, config, "timm", where)
        tensors = {k.removeprefix("vit."): v for k, v in tensors.items()}
        return {"image": hf.from_hf(tensors, hf.vit_model_pairs(image))}
    _check_vit(image, config, "clip", where)
    return {"image": hf.from_hf(tensors, hf.clip_vision_pairs(image))}


def _from_hf(folder: Path, towers: dict, cfg: Config, image_text: bool) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise InitError(
            f"model.init_from: '{folder}' has no config.json (not a transformers folder)"
        )
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type == "clip":
        return _hf_clip(folder, towers, config, cfg, image_text)
    if model_type in VISION_TYPES:
        return _hf_vision(folder, towers["image"], model_type, config)
    known = ", ".join(["clip", *VISION_TYPES])
    raise InitError(f"model.init_from: '{folder}' holds model_type {model_type!r}; read: {known}")


def _from_export(folder: Path, towers: dict, image_text: bool) -> dict:
    from safetensors.torch import load_file

    path = folder / "export.json"
    if not path.is_file():
        raise InitError(
            f"model.init_from: '{folder}' is not a dist-contrast export (no export.json)"
        )
    manifest = json.loads(path.read_text())
    names = ["image", "text", "heads"] if image_text else ["image"]
    return {
        n: load_file(str(folder / manifest["towers"][n]["weights"]))
        for n in names
        if n in manifest["towers"]
    }


def apply(method: nn.Module, cfg: Config) -> str:
    """Load ``cfg.model.init_from`` into ``method``'s towers (in place); return a line saying
    what was loaded. The momentum copies are then set to the loaded weights."""
    kind, folder = parse(cfg.model.init_from)
    image_text = registry.spec(cfg.method.name).image_text
    towers = method.towers()
    if kind == "hf":
        states = _from_hf(folder, towers, cfg, image_text)
    else:
        states = _from_export(folder, towers, image_text)
    for name, state in states.items():
        where = f"model.init_from {kind}:{folder} (tower '{name}')"
        load_exact(towers[name], state, where, InitError)
    method.sync_targets()
    what = {"image": "image encoder", "text": "text encoder", "heads": "heads"}
    return f"started from {kind}:{folder}: " + ", ".join(what[n] for n in states)
