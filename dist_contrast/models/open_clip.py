"""Our CLIP method in open_clip's layout (open-clip-torch 3.x ``CLIP``: OpenAI's names), and
back: pure state-dict work, key names and tensor shapes; nothing here imports open_clip (the
tests load what is written with the real library, in its own environment).

open_clip's ``nn.MultiheadAttention`` stacks q, k, v as our ``qkv`` does; its class token is
``[W]`` where ours is ``[1, 1, W]``, its position embeddings ``[T, W]`` (ours ``[1, T, W]``),
its projections ``(in, out)`` matrices (ours ``nn.Linear`` weights, ``(out, in)``), its logit
scale and bias 0-d (ours ``[1]``). Its patch embedding takes RGB: a grey tower's is written as
three equal thirds (on a grey image replicated into three channels: our features, to float
rounding) and read back as the sum over colour.
"""

from __future__ import annotations

import math

import torch

# open_clip's names -> ours, per block (its nn.MultiheadAttention stacks q, k, v as ours does)
BLOCK_KEYS = {
    "ln_1": "norm1",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.0",
    "mlp.c_proj": "mlp.2",
}
# whole names (reshaped: open_clip's embeddings have no batch dimension, its projections are
# stored as (in, out) matrices: ours are nn.Linear weights, (out, in); its scalars are 0-d)
FLAT_KEYS = {
    "visual.class_embedding": ("image.encoder.cls_token", "embed"),
    "visual.positional_embedding": ("image.encoder.pos_embed", "embed"),
    "visual.conv1.weight": ("image.encoder.patch_embed.weight", None),
    "visual.proj": ("image.proj.weight", "transpose"),
    "positional_embedding": ("text.encoder.pos_embed", "embed"),
    "token_embedding.weight": ("text.encoder.token_embed.weight", None),
    "text_projection": ("text.proj.weight", "transpose"),
    "logit_scale": ("criterion.logit_scale", "vector"),
    "logit_bias": ("criterion.logit_bias", "vector"),
}
PREFIXES = {
    "visual.ln_pre.": "image.encoder.norm_pre.",
    "visual.ln_post.": "image.encoder.norm.",
    "ln_final.": "text.encoder.norm.",
}
BLOCKS = {
    "visual.transformer.resblocks.": "image.encoder.blocks.",
    "transformer.resblocks.": "text.encoder.blocks.",
}
OURS = ("image.", "text.", "criterion.")  # what open_clip's CLIP holds of our method


def from_open_clip(state: dict, channels: int = 3) -> dict:
    """open_clip CLIP's state dict (``module.`` of DDP stripped) as our CLIP method's; a key it
    does not know raises ``KeyError`` (loading checks the rest key by key). ``channels=1``: its
    RGB patch embedding summed over colour, for a grey tower (exact on grey images)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in FLAT_KEYS:
            name, how = FLAT_KEYS[key]
            if how == "embed":
                value = (
                    value.reshape(1, -1, value.shape[-1])
                    if value.dim() == 2
                    else value.reshape(1, 1, -1)
                )
            elif how == "transpose":
                value = value.t()
            elif how == "vector":
                value = value.reshape(1)
            elif key == "visual.conv1.weight" and channels == 1 and value.shape[1] == 3:
                value = value.sum(1, keepdim=True)
            out[name] = value.contiguous()
            continue
        out[_ours(key)] = value
    return out


def _renamed(key: str, to_ours: bool) -> str | None:
    """``key`` in the other layout's names through :data:`PREFIXES`, :data:`BLOCKS` and
    :data:`BLOCK_KEYS` (open_clip's -> ours, or back), None if they do not name it. A name
    matches whole or up to a dot: ``attn.proj.weight`` is not ``attn.proj_x``."""

    def pairs(table: dict) -> list[tuple[str, str]]:
        return list(table.items()) if to_ours else [(b, a) for a, b in table.items()]

    for src, dst in pairs(PREFIXES):
        if key.startswith(src):
            return dst + key.removeprefix(src)
    for src, dst in pairs(BLOCKS):
        if key.startswith(src):
            index, rest = key.removeprefix(src).split(".", 1)
            for a, b in pairs(BLOCK_KEYS):
                if rest == a or rest.startswith(a + "."):
                    return f"{dst}{index}.{b}{rest.removeprefix(a)}"
            return None
    return None


def _ours(key: str) -> str:
    name = _renamed(key, to_ours=True)
    if name is None:
        raise KeyError(key)
    return name


def _theirs(key: str) -> str | None:
    """open_clip's name of our ``key``, None if it has none."""
    for theirs, (ours, _) in FLAT_KEYS.items():
        if key == ours:
            return theirs
    return _renamed(key, to_ours=False)


def to_open_clip(state: dict[str, torch.Tensor], max_scale: float | None) -> dict:
    """Our CLIP method's state dict in open_clip's names and shapes (the inverse of
    :func:`from_open_clip`, a grey patch embedding made RGB); only the towers, projections and
    the loss's scale and bias (queues and momentum twins are training state); a key of those
    without a place there raises ``KeyError``. The logit scale is clamped to
    ``log(max_scale)`` where given, as the loss clamps it."""
    out = {}
    for key, value in state.items():
        if not key.startswith(OURS):
            continue
        theirs = _theirs(key)
        if theirs is None:
            raise KeyError(key)
        how = FLAT_KEYS.get(theirs, (None, None))[1]
        value = value.detach().float()
        if how == "embed":  # [1, 1, W] -> [W] (the class token), [1, T, W] -> [T, W]
            shape = (-1,) if theirs == "visual.class_embedding" else (-1, value.shape[-1])
            value = value.reshape(shape)
        elif how == "transpose":
            value = value.t()
        elif how == "vector":
            if theirs == "logit_scale" and max_scale is not None:
                value = value.clamp(max=math.log(max_scale))
            value = value.reshape(())
        elif theirs == "visual.conv1.weight" and value.shape[1] == 1:
            value = value.expand(-1, 3, -1, -1) / 3
        out[theirs] = value.contiguous()
    return out
