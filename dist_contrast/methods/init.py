"""``model.init_from``: a run that starts from pretrained weights instead of random ones.

- ``hf:DIR``: a Hugging Face ``transformers`` folder (``config.json`` + ``model.safetensors``,
  or its sharded index): ``CLIPModel`` gives an image-text run both towers, both projections and
  the logit scale, ``SiglipModel`` (into SigLIP's layouts) both towers, the text head, the
  logit scale and bias (a vision run their image tower); ``CLIPVisionModel``,
  ``SiglipVisionModel``, ``ViTModel`` and ``ResNetModel`` give the image encoder.
- ``export:DIR``: a dist-contrast export (``dist-contrast export``): the towers of the same
  names (``image``, and for image-text runs ``text`` and ``heads`` when the export has them).
- ``open_clip:DIR`` or ``open_clip:FILE``: an open_clip CLIP (open-clip-torch 3.x: a
  ``local-dir:`` folder, ``open_clip_config.json`` beside ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``, or one of those files with the config beside it): both
  towers, both projections, the logit scale (and SigLIP's bias); a vision run its image tower.
  A ``.bin`` is read with ``torch.load(weights_only=True)`` only: a pickle that would run code
  is refused.

An image-text run started from a vision-only source (LiT from a ViT, Zhai et al. 2022) gets the
image encoder; its projections and text tower keep their fresh weights. Every tower is loaded
with strict key and shape checks (:func:`dist_contrast.models.weights.load_exact`); what the
shapes cannot show (the activation, the LayerNorm eps, the attention heads of a transformers
source, the layout of the ViT, the end-of-text id the text tower pools at) is compared with the
config first. Each failure is one line.

The folder is untrusted: weights are read from safetensors only, JSON files must be mappings,
and no file named inside (an export's ``weights``, a sharded index's file names) may lead out
of the folder. The readers of those files (:func:`read_json_mapping`, :func:`export_towers`,
:func:`export_weights`, :func:`read_safetensors`) are shared with
:mod:`dist_contrast.export.load`, which may import this package (not the reverse).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dist_contrast.config import Config
from dist_contrast.data.tokenizer import tokenizer_for
from dist_contrast.errors import ConfigError
from dist_contrast.files import read_errors, require_regular
from dist_contrast.methods import registry
from dist_contrast.models import hf, hf_resnet, open_clip
from dist_contrast.models.vit import VisionTransformer
from dist_contrast.models.weights import load_exact

KINDS = ("hf", "export", "open_clip")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# our method's names (models/open_clip.py's) -> (tower, name in it)
OPEN_CLIP_TOWERS = {
    "image.encoder.": ("image", ""),
    "text.encoder.": ("text", ""),
    "image.proj.": ("heads", "image_proj."),
    "text.proj.": ("heads", "text_proj."),
    "criterion.": ("heads", "criterion."),
}
VISION_TYPES = {
    "clip_vision_model": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "vit": "ViTModel",
    "resnet": "ResNetModel",
}


class InitError(ConfigError):
    """``model.init_from`` names weights this run cannot start from."""


ErrorOf = Callable[[str], Exception]  # a message -> the exception to raise (an error class)


def _init_error(message: str) -> InitError:
    return InitError(f"model.init_from: {message}")


def _regular(path: Path, error: ErrorOf) -> None:
    """An error unless ``path`` is a regular file (a FIFO would block the read forever)."""
    with read_errors(path, error):
        require_regular(path)


def read_json_mapping(path: Path, error: ErrorOf) -> dict:
    """The JSON object in ``path``; ``error`` (one line naming the file) when it is not a
    regular file, not JSON, or not a mapping."""
    _regular(path, error)
    try:
        value = json.loads(path.read_bytes())
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise error(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise error(f"{path} is not a JSON mapping (it holds a {type(value).__name__})")
    return value


def read_safetensors(path: Path, error: ErrorOf, fix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; a missing, truncated or other file is
    ``error`` naming it (``fix`` is appended). Nothing else is read: no pickle."""
    from safetensors.torch import load_file

    _regular(path, error)
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ... for damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise error(f"{path} is truncated or not a safetensors file ({first}){fix}") from None


def _plain_name(folder: Path, name: object, where: str, error: ErrorOf) -> Path:
    """``folder / name`` for a relative path that stays in ``folder`` as written (no ``..``)."""
    if not isinstance(name, str) or not name:
        raise error(f"{where} names no file (got {name!r})")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise error(f"{where} names '{name}', outside the folder {folder}")
    return folder / rel


def export_towers(manifest: dict, path: Path, error: ErrorOf) -> dict[str, dict]:
    """The ``towers`` of an export's manifest (read from ``path``), once each is a mapping
    that names its weights."""
    towers = manifest.get("towers")
    if not isinstance(towers, dict) or not towers:
        raise error(f"{path} has no 'towers' mapping (not a dist-contrast export manifest)")
    for name, entry in towers.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("weights"), str):
            raise error(f"{path}: tower '{name}' names no weights file")
    return towers


def export_weights(folder: Path, towers: dict[str, dict], name: str, error: ErrorOf) -> Path:
    """The weights file of tower ``name`` (see :func:`export_towers`), inside ``folder``: a
    relative path without ``..`` that, links resolved, still leads into ``folder``."""
    where = f"{folder / 'export.json'}: tower '{name}'"
    path = _plain_name(folder, towers[name]["weights"], where, error)
    try:
        real, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise error(f"{where}: cannot resolve {path}: {exc}") from None
    if not real.is_relative_to(root):
        raise error(f"{where}: {path} links to {real}, outside the export folder")
    return path


def parse(spec: str) -> tuple[str, Path]:
    """``hf:DIR`` / ``export:DIR`` / ``open_clip:DIR`` (or ``open_clip:FILE``) -> (kind, path);
    a folder that is not there is an error."""
    kind, sep, where = spec.partition(":")
    if not sep or kind not in KINDS or not where:
        raise InitError(
            f"model.init_from={spec!r}: expected hf:DIR (a transformers folder), export:DIR "
            "(a dist-contrast export) or open_clip:DIR (an open_clip local-dir folder)"
        )
    if kind == "open_clip":  # open_clip's own spelling of a folder is accepted too
        where = where.removeprefix("local-dir:")
    folder = Path(where)
    if kind == "open_clip" and folder.name in OPEN_CLIP_WEIGHTS and folder.exists():
        return kind, folder
    if not folder.is_dir():
        raise InitError(f"model.init_from: '{folder}' is not a directory")
    return kind, folder


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a transformers folder: ``model.safetensors`` or the files of its sharded
    index (plain names inside the folder; links are followed, as a hub cache's point into its
    blobs)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_mapping(index, _init_error).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _init_error(f"{index} has no 'weight_map' mapping")
        where = f"{index}: weight_map"
        files = [_plain_name(folder, n, where, _init_error) for n in set(weight_map.values())]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        raise InitError(
            f"model.init_from: '{folder}' has no model.safetensors (only safetensors are read; "
            "save with model.save_pretrained(DIR), the default)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(files):
        tensors.update(read_safetensors(path, _init_error))
    return tensors


def _section(config: dict, key: str, path: Path) -> dict:
    """The sub-config ``key`` of a transformers ``config.json`` (empty when absent)."""
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise _init_error(f"{path}: '{key}' is not a mapping")
    return value


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
    _check_blocks(vit, sub, "model.vit_heads")


def _check_blocks(module: nn.Module, sub: dict, heads_key: str) -> None:
    heads = sub.get("num_attention_heads")  # the shapes do not show it
    _expect("num_attention_heads", heads, module.blocks[0].attn.heads, f"set {heads_key}={heads}")
    act = sub.get("hidden_act")
    ours = {v: k for k, v in hf.HF_ACTIVATIONS.items()}.get(act, act)
    _expect("hidden_act", act, hf.HF_ACTIVATIONS[module.act], f"set model.activation={ours}")
    eps = sub.get("layer_norm_eps")
    _expect("layer_norm_eps", eps, module.norm.eps, f"set model.norm_eps={eps}")


def _hf_image_text(
    folder: Path, towers: dict, config: dict, cfg: Config, image_text: bool, layout: str
) -> dict:
    """A ``CLIPModel`` (``layout`` clip) or ``SiglipModel`` (siglip) into our towers."""
    tensors = _safetensors(folder)
    vit = towers["image"]
    path = folder / "config.json"
    where = f"'{folder}' ({'CLIPModel' if layout == 'clip' else 'SiglipModel'})"
    _check_vit(vit, _section(config, "vision_config", path), layout, where)
    vision_pairs = hf.clip_vision_pairs if layout == "clip" else hf.siglip_vision_pairs
    if not image_text:
        return {"image": hf.from_hf(tensors, vision_pairs(vit))}
    text = towers["text"]
    if text.layout != layout:
        raise InitError(
            f"model.init_from: {where} holds a text tower in the {layout} layout: "
            f"set text.layout={layout}"
        )
    text_cfg = _section(config, "text_config", path)
    _check_blocks(text, text_cfg, "text.heads")
    eot = tokenizer_for(cfg.data).eot_id
    _expect(
        "end-of-text id", text_cfg.get("eos_token_id"), eot, "use the tokenizer it was trained with"
    )
    pairs = hf.clip_pairs(vit, text) if layout == "clip" else hf.siglip_pairs(vit, text)
    state = hf.from_hf(tensors, pairs)
    out: dict[str, dict] = {"image": {}, "text": {}, "heads": {}}
    for key, t in state.items():
        name, _, rest = key.partition(".")
        out[name][rest] = t
    _keep_initial_criterion(out["heads"], towers["heads"])  # a CLIPModel has no logit bias
    if "logit_bias" not in towers["heads"].criterion.state_dict():
        out["heads"].pop("criterion.logit_bias", None)  # a CLIP loss from a SiglipModel
    return out


def _keep_initial_criterion(heads: dict, tower: nn.Module) -> None:
    """The loss's parameters the source lacks (SigLIP's logit bias, from a CLIP) keep their
    initial values."""
    for key, value in tower.state_dict().items():
        if key.startswith("criterion.") and key not in heads:
            heads[key] = value


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
    if model_type == "siglip_vision_model":
        _check_vit(image, config, "siglip", where)
        if not any(k.startswith("vision_model.") for k in tensors):  # transformers 5 saves
            tensors = {f"vision_model.{k}": v for k, v in tensors.items()}  # without it
        return {"image": hf.from_hf(tensors, hf.siglip_vision_pairs(image))}
    _check_vit(image, config, "clip", where)
    return {"image": hf.from_hf(tensors, hf.clip_vision_pairs(image))}


def _from_hf(folder: Path, towers: dict, cfg: Config, image_text: bool) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise InitError(
            f"model.init_from: '{folder}' has no config.json (not a transformers folder)"
        )
    config = read_json_mapping(path, _init_error)
    model_type = config.get("model_type")
    if model_type in ("clip", "siglip"):
        return _hf_image_text(folder, towers, config, cfg, image_text, model_type)
    if model_type in VISION_TYPES:
        return _hf_vision(folder, towers["image"], model_type, config)
    known = ", ".join(["clip", "siglip", *VISION_TYPES])
    raise InitError(f"model.init_from: '{folder}' holds model_type {model_type!r}; read: {known}")


def _from_export(folder: Path, towers: dict, image_text: bool) -> dict:
    path = folder / "export.json"
    if not path.exists():
        raise InitError(
            f"model.init_from: '{folder}' is not a dist-contrast export (no export.json)"
        )
    entries = export_towers(read_json_mapping(path, _init_error), path, _init_error)
    if "image" not in entries:
        raise _init_error(f"{path} has no 'image' tower ({', '.join(entries)})")
    names = ["image", "text", "heads"] if image_text else ["image"]
    return {
        n: read_safetensors(export_weights(folder, entries, n, _init_error), _init_error)
        for n in names
        if n in entries
    }


def _read_bin(path: Path) -> dict:
    """A ``.bin`` checkpoint through ``torch.load(weights_only=True)``: tensors and plain data
    only; anything that would run code when unpickled is refused, naming the file."""
    _regular(path, _init_error)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (a global refused), EOFError, RuntimeError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise _init_error(
            f"{path} is not a plain tensor checkpoint (read with weights_only=True: {first}); "
            "nothing in it was run"
        ) from None
    return state


def _open_clip_state(path: Path) -> tuple[dict, dict]:
    """(model_cfg, tensors) of an open_clip source: a folder, or a weights file in one."""
    folder = path if path.is_dir() else path.parent
    config_path = folder / OPEN_CLIP_CONFIG
    if not config_path.exists():
        raise _init_error(
            f"'{folder}' has no {OPEN_CLIP_CONFIG} (the model config open_clip keeps beside "
            "its weights: a local-dir folder)"
        )
    config = read_json_mapping(config_path, _init_error)
    model_cfg = config.get("model_cfg", config)
    if not isinstance(model_cfg, dict):
        raise _init_error(f"{config_path}: 'model_cfg' is not a mapping")
    if path.is_dir():
        found = [folder / n for n in OPEN_CLIP_WEIGHTS if (folder / n).exists()]
        if not found:
            raise _init_error(f"'{folder}' has none of {', '.join(OPEN_CLIP_WEIGHTS)}")
        path = found[0]
    if path.suffix == ".safetensors":
        state: object = read_safetensors(path, _init_error)
    else:
        state = _read_bin(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip_train's checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _init_error(f"{path} does not hold a mapping of names to tensors")
    return model_cfg, state


def _check_open_clip(model_cfg: dict, towers: dict, cfg: Config, image_text: bool) -> None:
    """What the shapes cannot show: heads, activation, LayerNorm eps, the pooling."""
    vision = model_cfg.get("vision_cfg") or {}
    text = model_cfg.get("text_cfg") or {}
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise _init_error("the open_clip config's vision_cfg / text_cfg are not mappings")
    vit = towers["image"]
    if not isinstance(vit, VisionTransformer) or vit.layout != "clip":
        raise _init_error(
            "an open_clip CLIP holds a ViT in the clip layout: set model.encoder=vit_* and "
            "model.vit_layout=clip"
        )
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    _expect("activation", act, vit.act, f"set model.activation={act}")
    width, head_width = vision.get("width"), vision.get("head_width", 64)  # open_clip's defaults
    heads = width // head_width if isinstance(width, int) and isinstance(head_width, int) else None
    checks = [("vision", vit, heads, "model.vit_heads", vision)]
    if image_text:
        checks.append(("text", towers["text"], text.get("heads", 8), "text.heads", text))
    for name, module, heads, key, sub in checks:
        _expect(f"{name} heads", heads, module.blocks[0].attn.heads, f"set {key}={heads}")
        eps = (sub.get("norm_kwargs") or {}).get("eps", 1e-5)
        _expect(f"{name} LayerNorm eps", eps, module.norm.eps, f"set model.norm_eps={eps}")
    if vision.get("pool_type", "tok") != "tok":
        raise _init_error(f"the open_clip ViT pools by {vision['pool_type']!r}; ours by 'tok'")
    if image_text:
        if towers["text"].layout != "clip":
            raise _init_error(
                "an open_clip CLIP's text tower is causal and pools at end-of-text: set "
                "text.layout=clip"
            )
        pool = text.get("pool_type", "argmax")
        eot = tokenizer_for(cfg.data).eot_id
        if pool != "eos":
            raise _init_error(
                f"the open_clip text tower pools by {pool!r}; this one at the end-of-text id "
                "(pool_type 'eos' with its eos_id)"
            )
        _expect("end-of-text id", text.get("eos_id"), eot, "use the tokenizer it was trained with")


def _from_open_clip(path: Path, towers: dict, cfg: Config, image_text: bool) -> dict:
    model_cfg, tensors = _open_clip_state(path)
    _check_open_clip(model_cfg, towers, cfg, image_text)
    try:
        state = open_clip.from_open_clip(tensors, channels=cfg.data.channels)
    except KeyError as exc:
        raise _init_error(
            f"'{path}' holds {exc}, which has no place in a CLIP of a CLIP-layout ViT and the "
            "causal text transformer"
        ) from None
    out: dict[str, dict] = {"image": {}, "text": {}, "heads": {}}
    for key, value in state.items():
        for ours, (tower, prefix) in OPEN_CLIP_TOWERS.items():
            if key.startswith(ours):
                out[tower][prefix + key.removeprefix(ours)] = value
                break
    if not image_text:
        return {"image": out["image"]}
    _keep_initial_criterion(out["heads"], towers["heads"])
    return out


def apply(method: nn.Module, cfg: Config) -> str:
    """Load ``cfg.model.init_from`` into ``method``'s towers (in place); return a line saying
    what was loaded. The momentum copies are then set to the loaded weights."""
    kind, folder = parse(cfg.model.init_from)
    image_text = registry.spec(cfg.method.name).image_text
    towers = method.towers()
    if kind == "hf":
        states = _from_hf(folder, towers, cfg, image_text)
    elif kind == "open_clip":
        states = _from_open_clip(folder, towers, cfg, image_text)
    else:
        states = _from_export(folder, towers, image_text)
    for name, state in states.items():
        where = f"model.init_from {kind}:{folder} (tower '{name}')"
        load_exact(towers[name], state, where, InitError)
    method.sync_targets()
    what = {"image": "image encoder", "text": "text encoder", "heads": "heads"}
    return f"started from {kind}:{folder}: " + ", ".join(what[n] for n in states)
