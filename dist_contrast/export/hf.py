"""``dist-contrast export --format hf``: a folder Hugging Face ``transformers`` loads as it is.

- image-text runs (CLIP, SigLIP) with a ``clip``-layout ViT image tower and the ``clip`` text
  tower -> ``CLIPModel``: ``config.json``, ``model.safetensors`` (both towers, both
  projections, the logit scale; a SigLIP run's bias has no place there and is left out),
  tokenizer files for ``AutoTokenizer`` (the run's BPE with start- and end-of-text added by its
  post-processor, padding id and context length) and ``preprocessor_config.json``;
- image-text runs with SigLIP's layouts (``model.vit_layout=siglip``, ``text.layout=siglip``)
  -> ``SiglipModel``: both towers, the text head, the logit scale and bias (0 for a CLIP loss),
  the same tokenizer files (``model_input_names`` only ``input_ids``: SigLIP's text tower reads
  the padding, as ours does) and preprocessor;
- vision runs with a ViT encoder -> ``ViTModel`` (``timm`` layout), ``CLIPVisionModel``
  (``clip``) or ``SiglipVisionModel`` (``siglip``); with a batch-norm ResNet-18/50 on the
  ImageNet stem -> ``ResNetModel``.

What has no exact layout there (a ResNet CLIP image tower, mixed CLIP and SigLIP layouts,
GroupNorm ResNets, the byte tokenizer, a tokenizer whose end-of-text id is 2 for CLIPModel) is
refused in one line that says what would export. The tensor mapping itself is
:mod:`dist_contrast.models.hf`; tests load the folder with the real ``transformers`` and
compare features with ours.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from dist_contrast.config import Config
from dist_contrast.data.tokenizer import EOT, PAD, SOT, BPETokenizer, tokenizer_for
from dist_contrast.export.layout import ExportError
from dist_contrast.methods import registry
from dist_contrast.models import hf, hf_resnet
from dist_contrast.models.resnet import ResNet, SmallResNet
from dist_contrast.models.vit import VisionTransformer

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESSOR_JSON = "preprocessor_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"


def _state(towers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, m in towers.items() for k, v in m.state_dict().items()}


def _save(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    config["dist_contrast_parameters"] = sum(t.numel() for t in tensors.values())
    (folder / CONFIG_JSON).write_text(json.dumps(config, indent=1) + "\n")


def bpe_tokenizer(cfg: Config, fmt: str = "hf", pools_at_eot: bool = False) -> BPETokenizer:
    """The run's BPE tokenizer for ``export --format fmt``; one line for the byte tokenizer,
    which neither transformers nor open_clip reads, and for an end-of-text id of 2 where
    transformers' CLIP pools the text tower (``pools_at_eot``)."""
    tok = tokenizer_for(cfg.data)
    if not isinstance(tok, BPETokenizer):
        library = "transformers" if fmt == "hf" else fmt
        raise ExportError(
            f"export --format {fmt} needs a BPE tokenizer (data.tokenizer=bpe): {library} has "
            "no tokenizer of this package's byte ids"
        )
    if pools_at_eot and tok.eot_id == 2:
        raise ExportError(
            f"the tokenizer '{cfg.data.tokenizer_path}' gives end-of-text id 2, which "
            "transformers' CLIP reads as its legacy argmax pooling: train the tokenizer again "
            "with this version (`dist-contrast tokenizer train`, end-of-text becomes id 1) and "
            "the model with it"
        )
    return tok


def write_tokenizer(tok: BPETokenizer, folder: Path, ids_only: bool = False) -> None:
    """``tokenizer.json`` whose post-processor wraps a caption in start- and end-of-text, and
    ``tokenizer_config.json`` with the special tokens and the context length, so that
    ``AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", truncation=True)``
    gives the ids of :meth:`BPETokenizer.encode`. ``ids_only``: the tokenizer returns the ids
    without an attention mask (SigLIP's text tower attends to the padding)."""
    from tokenizers import Tokenizer, processors

    fast = Tokenizer.from_str(tok.tokenizer.to_str())  # a copy: ours adds the specials itself
    fast.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, tok.sot_id), (EOT, tok.eot_id)]
    )
    fast.save(str(folder / TOKENIZER_JSON))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": tok.context_length,
        "bos_token": SOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    if ids_only:
        config["model_input_names"] = ["input_ids"]
    (folder / TOKENIZER_CONFIG_JSON).write_text(json.dumps(config, indent=1) + "\n")


def write_preprocessor(cfg: Config, folder: Path) -> None:
    """``preprocessor_config.json``: as :class:`dist_contrast.export.Preprocess` does it
    (shorter side to S, bilinear; centre crop; /255; (x - mean) / std)."""
    d = cfg.data
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": d.image_size},
        "resample": 2,  # PIL bilinear
        "do_center_crop": True,
        "crop_size": {"height": d.image_size, "width": d.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(d.mean),
        "image_std": list(d.std),
        "do_convert_rgb": d.channels == 3,
    }
    (folder / PREPROCESSOR_JSON).write_text(json.dumps(config, indent=1) + "\n")


def _clip_vit(encoder: nn.Module, what: str) -> VisionTransformer:
    if not isinstance(encoder, VisionTransformer) or encoder.layout != "clip":
        name = type(encoder).__name__
        layout = f" ({encoder.layout} layout)" if isinstance(encoder, VisionTransformer) else ""
        raise ExportError(
            f"{what} {name}{layout} has no transformers CLIPModel layout: train with a ViT "
            "image tower in CLIP's layout (model.encoder=vit_*, model.vit_layout=clip; "
            "configs/clip_vit_digits.yaml)"
        )
    return encoder


def _siglip_layouts(image: nn.Module, text: nn.Module) -> bool:
    """Whether the towers are SigLIP's (-> ``SiglipModel``) rather than CLIP's; one line for
    a mix, which neither class holds."""
    vit_siglip = isinstance(image, VisionTransformer) and image.layout == "siglip"
    if vit_siglip != (text.layout == "siglip"):
        raise ExportError(
            f"export --format hf: a {'siglip' if vit_siglip else 'non-siglip'} image tower with "
            f"the {text.layout} text tower has no transformers layout: CLIPModel needs "
            "model.vit_layout=clip and text.layout=clip, SiglipModel model.vit_layout=siglip "
            "and text.layout=siglip"
        )
    return vit_siglip


def _write_image_text(method: nn.Module, cfg: Config, folder: Path) -> str:
    towers = method.towers()
    siglip = _siglip_layouts(towers["image"], towers["text"])
    vit = towers["image"] if siglip else _clip_vit(towers["image"], "the image tower")
    text = towers["text"]
    tok = bpe_tokenizer(cfg, pools_at_eot=not siglip)
    state = _state(towers)
    scale = state["heads.criterion.logit_scale"]
    if cfg.loss.name == "clip":  # HF's logits use exp(logit_scale) unclamped
        state["heads.criterion.logit_scale"] = scale.clamp(max=math.log(cfg.loss.max_scale))
    ids = {"pad_token_id": tok.pad_id, "bos_token_id": tok.sot_id, "eos_token_id": tok.eot_id}
    d = cfg.data
    if siglip:
        state.setdefault("heads.criterion.logit_bias", torch.zeros(1))  # a CLIP loss: none
        config = hf.siglip_config(vit, text, d.channels, d.image_size, ids)
        tensors = hf.to_hf(state, hf.siglip_pairs(vit, text))
    else:
        config = hf.clip_config(
            vit, text, d.channels, d.image_size, cfg.model.proj_dim, float(scale[0]), ids
        )
        tensors = hf.to_hf(state, hf.clip_pairs(vit, text))
    _save(folder, config, tensors)
    write_tokenizer(tok, folder, ids_only=siglip)
    write_preprocessor(cfg, folder)
    return config["architectures"][0]


def _write_vision(encoder: nn.Module, cfg: Config, folder: Path) -> str:
    d = cfg.data
    if isinstance(encoder, VisionTransformer):
        if encoder.layout == "siglip":
            config = {
                "architectures": ["SiglipVisionModel"],
                **hf.siglip_vision_config(encoder, d.channels, d.image_size),
                "torch_dtype": "float32",
            }
            tensors = hf.to_hf(encoder.state_dict(), hf.siglip_vision_pairs(encoder))
        elif encoder.layout == "clip":
            config = {
                "architectures": ["CLIPVisionModel"],
                "model_type": "clip_vision_model",
                **hf.vision_config(encoder, d.channels, d.image_size),
                "torch_dtype": "float32",
            }
            tensors = hf.to_hf(encoder.state_dict(), hf.clip_vision_pairs(encoder))
        else:
            config = hf.vit_model_config(encoder, d.channels, d.image_size)
            tensors = hf.to_hf(encoder.state_dict(), hf.vit_model_pairs(encoder))
    elif isinstance(encoder, ResNet | SmallResNet):
        try:
            config = hf_resnet.resnet_hf_config(encoder, d.channels)
            tensors = hf_resnet.resnet_to_hf(encoder)
        except hf_resnet.NotMappable as exc:
            raise ExportError(f"export --format hf: {exc}") from None
    else:
        raise ExportError(f"export --format hf: no transformers layout for {type(encoder)}")
    _save(folder, config, tensors)
    write_preprocessor(cfg, folder)
    return config["architectures"][0]


def hf_usage(cls: str) -> list[str]:
    """The model card's "Use" lines for a folder loaded by ``transformers.<cls>``."""
    if cls == "CLIPModel":
        return [
            "```python",
            "from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel",
            "",
            'model = CLIPModel.from_pretrained("path/to/this/folder").eval()',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            'processor = AutoImageProcessor.from_pretrained("path/to/this/folder")',
            'pixels = processor(images=images, return_tensors="pt")["pixel_values"]',
            'tokens = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")',
            "image_features = model.get_image_features(pixel_values=pixels).pooler_output",
            "text_features = model.get_text_features(**tokens).pooler_output",
            "```",
            "",
            "Features are in the joint space, not normalised; `model.logit_scale.exp()` is the "
            "trained temperature's inverse.",
        ]
    if cls == "SiglipModel":
        return [
            "```python",
            "from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel",
            "",
            'model = SiglipModel.from_pretrained("path/to/this/folder").eval()',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            'processor = AutoImageProcessor.from_pretrained("path/to/this/folder")',
            'pixels = processor(images=images, return_tensors="pt")["pixel_values"]',
            'tokens = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")',
            "out = model(pixel_values=pixels, **tokens)",
            "probabilities = out.logits_per_image.sigmoid()",
            "```",
            "",
            'Captions must be padded to the context length (`padding="max_length"`): the text '
            "tower reads the padding and pools at the last position, as in training. "
            "`out.image_embeds` and `out.text_embeds` are the normalised features; the logits "
            "are `exp(logit_scale)` times their cosine plus `logit_bias`.",
        ]
    pooled = {
        "ViTModel": "last_hidden_state[:, 0]",
        "CLIPVisionModel": "pooler_output",
        "SiglipVisionModel": "pooler_output",
        "ResNetModel": "pooler_output.flatten(1)",
    }[cls]
    extra = ", add_pooling_layer=False" if cls == "ViTModel" else ""
    return [
        "```python",
        f"from transformers import AutoImageProcessor, {cls}",
        "",
        f'model = {cls}.from_pretrained("path/to/this/folder"{extra}).eval()',
        'processor = AutoImageProcessor.from_pretrained("path/to/this/folder")',
        'pixels = processor(images=images, return_tensors="pt")["pixel_values"]',
        f"features = model(pixel_values=pixels).{pooled}",
        "```",
    ]


def write_hf(method: nn.Module, cfg: Config, folder: Path) -> str:
    """Write ``method``'s towers into ``folder`` in a transformers layout; return the class
    that loads it (``CLIPModel``, ``SiglipModel``, ``ViTModel``, ``CLIPVisionModel``,
    ``SiglipVisionModel`` or ``ResNetModel``)."""
    if registry.spec(cfg.method.name).image_text:
        return _write_image_text(method, cfg, folder)
    return _write_vision(method.towers()["image"], cfg, folder)
