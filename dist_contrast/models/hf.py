"""Our towers in the layouts of Hugging Face ``transformers``, and back: ``CLIPModel`` (a
``clip``-layout ViT image tower, the causal text tower, both projections and the logit scale),
``SiglipModel`` (a ``siglip``-layout ViT with its attention-pooling head, the ``siglip`` text
tower with its biased projection, the logit scale and bias), ``ViTModel`` (a ``timm``-layout
ViT encoder) and ``SiglipVisionModel``. Pure state-dict work: key names, tensor shapes
and the ``config.json`` content; nothing here imports ``transformers`` (the tests load what is
written with the real library).

The key names are those ``save_pretrained`` writes (and the Hub's checkpoints hold), which
``from_pretrained`` of transformers 4.x and 5.x reads. Our fused ``qkv`` projection is split
into ``q``, ``k``, ``v`` (rows ``[0:d]``, ``[d:2d]``, ``[2d:3d]``), our ``[1, n, d]``
position embedding is an ``[n, d]`` embedding table in CLIP, and our ``[1, 1, d]`` class token
is CLIP's ``[d]`` ``class_embedding``. LayerNorm eps and activation are the towers' own
(``model.norm_eps``, ``model.activation``; our ``gelu_tanh`` is transformers'
``gelu_pytorch_tanh``), written into the config.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dist_contrast.models.text import TextTransformer
from dist_contrast.models.vit import VisionTransformer

# How a tensor changes between our layout and Hugging Face's.
SAME, TABLE, VECTOR, SCALAR = "same", "table", "vector", "scalar"


@dataclass(frozen=True)
class Pair:
    ours: str
    hf: tuple[str, ...]  # three names for a fused qkv (split on dim 0), else one
    kind: str = SAME


# Per-block names: (norm1, qkv names, attention out, norm2, fc1, fc2) under each layout.
CLIP_BLOCK = (
    "layer_norm1",
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.out_proj",
    "layer_norm2",
    "mlp.fc1",
    "mlp.fc2",
)
VIT_BLOCK = (
    "layernorm_before",
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "attention.output.dense",
    "layernorm_after",
    "intermediate.dense",
    "output.dense",
)


def _wb(ours: str, hf: str, bias: bool = True) -> list[Pair]:
    pairs = [Pair(f"{ours}.weight", (f"{hf}.weight",))]
    return pairs + [Pair(f"{ours}.bias", (f"{hf}.bias",))] if bias else pairs


def _blocks(depth: int, ours: str, hf: str, names: tuple) -> Iterator[Pair]:
    norm1, qkv, out, norm2, fc1, fc2 = names
    for i in range(depth):
        o, h = f"{ours}.{i}", f"{hf}.{i}"
        yield from _wb(f"{o}.norm1", f"{h}.{norm1}")
        for suffix in ("weight", "bias"):
            yield Pair(f"{o}.attn.qkv.{suffix}", tuple(f"{h}.{q}.{suffix}" for q in qkv))
        yield from _wb(f"{o}.attn.proj", f"{h}.{out}")
        yield from _wb(f"{o}.norm2", f"{h}.{norm2}")
        yield from _wb(f"{o}.mlp.0", f"{h}.{fc1}")
        yield from _wb(f"{o}.mlp.2", f"{h}.{fc2}")


def clip_vision_pairs(vit: VisionTransformer, ours: str = "", hf: str = "vision_model.") -> list:
    """Our ``clip``-layout ViT <-> ``CLIPVisionModel`` keys."""
    e = f"{hf}embeddings."
    return [
        Pair(f"{ours}patch_embed.weight", (f"{e}patch_embedding.weight",)),
        Pair(f"{ours}cls_token", (f"{e}class_embedding",), VECTOR),
        Pair(f"{ours}pos_embed", (f"{e}position_embedding.weight",), TABLE),
        *_wb(f"{ours}norm_pre", f"{hf}pre_layrnorm"),
        *_blocks(len(vit.blocks), f"{ours}blocks", f"{hf}encoder.layers", CLIP_BLOCK),
        *_wb(f"{ours}norm", f"{hf}post_layernorm"),
    ]


def clip_text_pairs(text: TextTransformer, ours: str = "", hf: str = "text_model.") -> list:
    """Our text transformer <-> ``CLIPTextModel`` keys."""
    e = f"{hf}embeddings."
    return [
        Pair(f"{ours}token_embed.weight", (f"{e}token_embedding.weight",)),
        Pair(f"{ours}pos_embed", (f"{e}position_embedding.weight",), TABLE),
        *_blocks(len(text.blocks), f"{ours}blocks", f"{hf}encoder.layers", CLIP_BLOCK),
        *_wb(f"{ours}norm", f"{hf}final_layer_norm"),
    ]


def siglip_vision_pairs(vit: VisionTransformer, ours: str = "", hf: str = "vision_model.") -> list:
    """Our ``siglip``-layout ViT <-> ``SiglipVisionModel`` keys (with its pooling head: our
    :class:`dist_contrast.models.vit.MAPHead`'s ``in_proj`` is ``nn.MultiheadAttention``'s
    stacked ``in_proj_weight``)."""
    e, p, h = f"{hf}embeddings.", f"{ours}pool.", f"{hf}head."
    return [
        *_wb(f"{ours}patch_embed", f"{e}patch_embedding"),
        Pair(f"{ours}pos_embed", (f"{e}position_embedding.weight",), TABLE),
        *_blocks(len(vit.blocks), f"{ours}blocks", f"{hf}encoder.layers", CLIP_BLOCK),
        *_wb(f"{ours}norm", f"{hf}post_layernorm"),
        Pair(f"{p}probe", (f"{h}probe",)),
        Pair(f"{p}in_proj.weight", (f"{h}attention.in_proj_weight",)),
        Pair(f"{p}in_proj.bias", (f"{h}attention.in_proj_bias",)),
        *_wb(f"{p}out_proj", f"{h}attention.out_proj"),
        *_wb(f"{p}norm", f"{h}layernorm"),
        *_wb(f"{p}mlp.0", f"{h}mlp.fc1"),
        *_wb(f"{p}mlp.2", f"{h}mlp.fc2"),
    ]


def siglip_text_pairs(text: TextTransformer, ours: str = "", hf: str = "text_model.") -> list:
    """Our ``siglip``-layout text transformer <-> ``SiglipTextModel`` keys, without its head
    (the text projection, which :func:`siglip_pairs` maps from our heads)."""
    return clip_text_pairs(text, ours, hf)


def vit_model_pairs(vit: VisionTransformer, ours: str = "", hf: str = "") -> list[Pair]:
    """Our ``timm``-layout ViT <-> ``ViTModel`` keys (without its pooler)."""
    e = f"{hf}embeddings."
    return [
        *_wb(f"{ours}patch_embed", f"{e}patch_embeddings.projection"),
        Pair(f"{ours}cls_token", (f"{e}cls_token",)),
        Pair(f"{ours}pos_embed", (f"{e}position_embeddings",)),
        *_blocks(len(vit.blocks), f"{ours}blocks", f"{hf}encoder.layer", VIT_BLOCK),
        *_wb(f"{ours}norm", f"{hf}layernorm"),
    ]


def clip_pairs(image: VisionTransformer, text: TextTransformer) -> list[Pair]:
    """A CLIP method's towers as we export them (``image`` encoder, ``text`` encoder, and the
    heads ``image_proj``, ``text_proj``, ``criterion.logit_scale``) <-> ``CLIPModel`` keys."""
    return [
        *clip_vision_pairs(image, "image."),
        *clip_text_pairs(text, "text."),
        Pair("heads.image_proj.weight", ("visual_projection.weight",)),
        Pair("heads.text_proj.weight", ("text_projection.weight",)),
        Pair("heads.criterion.logit_scale", ("logit_scale",), SCALAR),
    ]


def siglip_pairs(image: VisionTransformer, text: TextTransformer) -> list[Pair]:
    """A SigLIP-layout image-text method's towers as we export them <-> ``SiglipModel`` keys:
    the text projection (with its bias) is the text model's ``head``; the image tower has no
    projection; the logit scale (log) and bias are ``[1]`` tensors on both sides."""
    return [
        *siglip_vision_pairs(image, "image."),
        *siglip_text_pairs(text, "text."),
        *_wb("heads.text_proj", "text_model.head"),
        Pair("heads.criterion.logit_scale", ("logit_scale",)),
        Pair("heads.criterion.logit_bias", ("logit_bias",)),
    ]


def to_hf(state: dict[str, torch.Tensor], pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """``state`` (our keys) -> fp32 tensors under Hugging Face's keys."""
    out: dict[str, torch.Tensor] = {}
    for p in pairs:
        t = state[p.ours].detach().float()
        if len(p.hf) == 3:
            parts = t.chunk(3, dim=0)
        elif p.kind == TABLE:
            parts = (t[0],)
        elif p.kind == VECTOR:
            parts = (t.reshape(-1),)
        elif p.kind == SCALAR:
            parts = (t.reshape(()),)
        else:
            parts = (t,)
        out.update({k: v.contiguous().clone() for k, v in zip(p.hf, parts, strict=True)})
    return out


def from_hf(hf: dict[str, torch.Tensor], pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our keys, for the pairs whose every source key is in ``hf``
    (a missing one is then named by the strict load that follows)."""
    out: dict[str, torch.Tensor] = {}
    for p in pairs:
        if not all(k in hf for k in p.hf):
            continue
        parts = [hf[k].float() for k in p.hf]
        if len(parts) == 3:
            t = torch.cat(parts, dim=0)
        elif p.kind == TABLE:
            t = parts[0][None]
        elif p.kind == VECTOR:
            t = parts[0].reshape(1, 1, -1)
        elif p.kind == SCALAR:
            t = parts[0].reshape(1)
        else:
            t = parts[0]
        out[p.ours] = t.contiguous()
    return out


# our model.activation -> transformers' hidden_act
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _act(module: nn.Module) -> str:
    return HF_ACTIVATIONS[module.act]


def _eps(module: nn.Module) -> float:
    return module.norm.eps


def vision_config(vit: VisionTransformer, channels: int, image_size: int) -> dict:
    """The ViT's size as the fields shared by ``CLIPVisionConfig`` and ``ViTConfig``."""
    block = vit.blocks[0]
    return {
        "hidden_size": vit.out_dim,
        "intermediate_size": block.mlp[0].out_features,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": block.attn.heads,
        "image_size": image_size,
        "patch_size": vit.patch_embed.stride[0],
        "num_channels": channels,
        "hidden_act": _act(vit),
        "layer_norm_eps": _eps(vit),
    }


def text_config(text: TextTransformer, special_ids: dict[str, int]) -> dict:
    """The text tower's size as the fields shared by ``CLIPTextConfig`` and
    ``SiglipTextConfig``, with the tokenizer's ``special_ids``."""
    block = text.blocks[0]
    return {
        "vocab_size": text.vocab_size,
        "hidden_size": text.out_dim,
        "intermediate_size": block.mlp[0].out_features,
        "num_hidden_layers": len(text.blocks),
        "num_attention_heads": block.attn.heads,
        "max_position_embeddings": text.context_length,
        "hidden_act": _act(text),
        "layer_norm_eps": _eps(text),
        **special_ids,
    }


def clip_config(
    image: VisionTransformer,
    text: TextTransformer,
    channels: int,
    image_size: int,
    proj_dim: int,
    logit_scale: float,
    special_ids: dict[str, int],
) -> dict:
    """``config.json`` of a ``CLIPModel`` with our towers' sizes; ``special_ids``: the
    tokenizer's ``pad_token_id``, ``bos_token_id``, ``eos_token_id`` (HF pools the text at the
    first ``eos_token_id``; id 2 would select its legacy argmax pooling, refused here)."""
    if special_ids["eos_token_id"] == 2:
        raise ValueError("an end-of-text id of 2 makes transformers' CLIP pool at the argmax id")
    text_cfg = {**text_config(text, special_ids), "projection_dim": proj_dim}
    vision_cfg = {**vision_config(image, channels, image_size), "projection_dim": proj_dim}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": proj_dim,
        "logit_scale_init_value": logit_scale,
        "text_config": {"model_type": "clip_text_model", **text_cfg},
        "vision_config": {"model_type": "clip_vision_model", **vision_cfg},
        "torch_dtype": "float32",
    }


def siglip_vision_config(vit: VisionTransformer, channels: int, image_size: int) -> dict:
    """``SiglipVisionConfig`` fields of our ``siglip``-layout ViT (pooling head on)."""
    return {
        "model_type": "siglip_vision_model",
        **vision_config(vit, channels, image_size),
        "vision_use_head": True,
    }


def siglip_config(
    image: VisionTransformer,
    text: TextTransformer,
    channels: int,
    image_size: int,
    special_ids: dict[str, int],
) -> dict:
    """``config.json`` of a ``SiglipModel`` with our towers' sizes: the text head maps to the
    ViT's width, which is the joint space. ``special_ids`` as for :func:`clip_config` (SigLIP
    pools at the last position, whatever the ids)."""
    text_cfg = {
        "model_type": "siglip_text_model",
        **text_config(text, special_ids),
        "projection_size": image.out_dim,
    }
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": text_cfg,
        "vision_config": siglip_vision_config(image, channels, image_size),
        "torch_dtype": "float32",
    }


def vit_model_config(vit: VisionTransformer, channels: int, image_size: int) -> dict:
    """``config.json`` of a ``ViTModel`` with our encoder's size."""
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        **vision_config(vit, channels, image_size),
        "qkv_bias": True,
        "torch_dtype": "float32",
    }
