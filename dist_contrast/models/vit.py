"""Vision Transformers (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"). No distributed
code.

Conventions: a ``patch_size`` x ``patch_size`` stride-``patch_size`` convolution embeds the
patches; a learnable class token is prepended and a learnable position embedding (one per token
of the ``image_size / patch_size`` grid, plus the class token) is added; inputs of another size
divisible by the patch size get it bicubically interpolated. Pre-norm blocks:
``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (GELU, hidden = 4 x dim); attention goes through
``torch.nn.functional.scaled_dot_product_attention``. A final LayerNorm; the representation is
the class token, ``out_dim`` = embedding dim. Normalisation is LayerNorm throughout:
``model.norm`` does not apply to ViTs.

Three layouts (``model.vit_layout``), each with the initialisation of its reference:

- ``timm`` as above (the patch convolution has a bias; Hugging Face's ``ViTModel``): truncated
  normal (std 0.02) for the linear layers, the class token and the position embedding, zero
  biases (DeiT, Touvron et al. 2021, and timm's ``init_weights_vit_timm``);
- ``clip``, OpenAI's CLIP image tower (and ``CLIPVisionModel``): a patch convolution without
  bias and a LayerNorm (``ln_pre``) on the token sequence before the first block; class token
  and position embedding ``width^-0.5 * randn``, the blocks at PyTorch's defaults (CLIP's
  ``VisionTransformer`` in ``model.py``, which open_clip follows);
- ``siglip``, SigLIP's image tower (Zhai et al. 2023; big_vision's ViT with ``pool_type=map``,
  transformers' ``SiglipVisionModel``): a patch convolution with bias, no class token (the
  position embedding covers the patches only), no norm before the blocks, and the final
  LayerNorm's tokens pooled by multihead attention pooling (:class:`MAPHead`) instead of read
  at a class token. The pooled feature is the joint space: image-text methods put no
  projection after it (:func:`dist_contrast.models.towers.image_projection`). Init:
  transformers' ``SiglipPreTrainedModel._init_weights`` (big_vision's; :func:`siglip_init`).

The size is a preset (``model.encoder``: :data:`VIT_SIZES`) whose width, depth, heads and MLP
ratio ``model.vit_width`` / ``vit_depth`` / ``vit_heads`` / ``vit_mlp_ratio`` may override
(:func:`vit_size`). The MLP's activation (``model.activation``) is ``gelu`` (exact, erf) or
``quick_gelu`` (``x * sigmoid(1.702 x)``, OpenAI's CLIP) or ``gelu_tanh`` (the tanh
approximation, SigLIP's; transformers' ``gelu_pytorch_tanh``). LayerNorm eps:
``model.norm_eps`` (1e-6, timm's and SigLIP's; OpenAI's CLIP and transformers' CLIP defaults
use 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.errors import ConfigError
from dist_contrast.models.layers import run_blocks


@dataclass(frozen=True)
class ViTSize:
    dim: int
    depth: int
    heads: int
    mlp_ratio: int = 4


VIT_SIZES = {
    "vit_nano": ViTSize(128, 4, 4),  # small runs on CPU (the digits)
    "vit_tiny": ViTSize(192, 12, 3),
    "vit_small": ViTSize(384, 12, 6),
    "vit_base": ViTSize(768, 12, 12),
}


VIT_KEYS = {
    "dim": "vit_width",
    "depth": "vit_depth",
    "heads": "vit_heads",
    "mlp_ratio": "vit_mlp_ratio",
}


def vit_size(
    preset: str, width: int = 0, depth: int = 0, heads: int = 0, mlp_ratio: int = 0
) -> ViTSize:
    """The size of the preset ``preset`` (a key of :data:`VIT_SIZES`) with each of ``width``,
    ``depth``, ``heads`` and ``mlp_ratio`` that is not 0 in place of the preset's (the keys
    ``model.vit_width`` ... of a run config). A :class:`ConfigError` names the key to fix."""
    if preset not in VIT_SIZES:
        raise ConfigError(f"unknown ViT preset {preset!r}; choose one of {', '.join(VIT_SIZES)}")
    base = VIT_SIZES[preset]
    given = {"dim": width, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio}
    for field, value in given.items():
        if value < 0:
            raise ConfigError(
                f"config key 'model.{VIT_KEYS[field]}' must be >= 0 (0: {preset}'s), got {value}"
            )
    size = ViTSize(**{f: v or getattr(base, f) for f, v in given.items()})
    if size.dim % size.heads:
        w = f"{size.dim}" if width else f"{size.dim}, {preset}'s"
        h = f"{size.heads}" if heads else f"{size.heads}, {preset}'s"
        raise ConfigError(
            f"config key 'model.vit_width' ({w}) must be divisible by model.vit_heads ({h})"
        )
    return size


VIT_LAYOUTS = ("timm", "clip", "siglip")
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    if name == "quick_gelu":
        return QuickGELU()
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


def lecun_normal_(weight: torch.Tensor) -> None:
    """Truncated normal (at +-2 std) of variance 1 / fan_in: JAX's ``lecun_normal``, the
    default of big_vision's dense and convolution layers (std corrected for the truncation)."""
    fan_in = weight[0].numel()
    std = math.sqrt(1 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def siglip_init(blocks: nn.Module) -> None:
    """SigLIP's initialisation of transformer ``blocks`` (transformers'
    ``SiglipPreTrainedModel._init_weights``, big_vision's ``Encoder1DBlock``): the q, k, v
    and out projections each Xavier-uniform with zero bias, the MLP's weights Xavier-uniform
    with biases normal std 1e-6, the LayerNorms at PyTorch's defaults."""
    for block in blocks:
        for w in block.attn.qkv.weight.data.chunk(3, dim=0):  # q, k, v: each its own fans
            nn.init.xavier_uniform_(w)
        nn.init.xavier_uniform_(block.attn.proj.weight)
        nn.init.zeros_(block.attn.qkv.bias)
        nn.init.zeros_(block.attn.proj.bias)
        for fc in (block.mlp[0], block.mlp[2]):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention; ``causal``: token i attends to tokens <= i (text)."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {heads} heads")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # unbind, not qkv[0], qkv[1], qkv[2]: each select's backward fills a zero tensor of all
        # of qkv and autograd adds the three (92 ms of 3 steps of the ViT 192 x 12 on a CPU);
        # unbind's backward stacks the three gradients.
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: int,
        causal: bool = False,
        act: str = "gelu",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), activation(act), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP's ``MAPHead``; the pooling by attention of Lee et
    al. 2019): one learnt probe query attends over the tokens, ``h = Attn(probe, x, x)``, then
    ``h + MLP(LN(h))``; ``[B, N, dim]`` -> ``[B, dim]``. The attention's q, k, v projections
    are one ``in_proj`` (the stacked rows of ``torch.nn.MultiheadAttention``'s
    ``in_proj_weight``, which transformers' ``SiglipMultiheadAttentionPoolingHead`` holds)."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: int, act: str = "gelu", eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), activation(act), nn.Linear(mlp_ratio * dim, dim)
        )

    def reset_parameters(self) -> None:
        """transformers' ``SiglipPreTrainedModel._init_weights`` for the head: probe and
        in-projection Xavier-uniform (zero bias), out-projection LeCun normal (zero bias), the
        MLP as the blocks'."""
        nn.init.xavier_uniform_(self.probe)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        lecun_normal_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        for fc in (self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        w_q, w_kv = self.in_proj.weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj.bias.split([d, 2 * d])
        q = F.linear(self.probe, w_q, b_q).reshape(1, 1, h, d // h).transpose(1, 2)
        kv = F.linear(x, w_kv, b_kv).reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        out = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k, v)
        out = self.out_proj(out.transpose(1, 2).reshape(b, 1, d))
        return (out + self.mlp(self.norm(out)))[:, 0]


class VisionTransformer(nn.Module):
    """ViT encoder without a classification head; ``forward`` returns the final class token
    (``siglip`` layout: the attention-pooled tokens)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int,
        size: ViTSize,
        checkpointing: bool = False,
        layout: str = "timm",
        act: str = "gelu",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if layout not in VIT_LAYOUTS:
            raise ValueError(f"unknown model.vit_layout {layout!r}; choose one of {VIT_LAYOUTS}")
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"image size {image_size} is not divisible by model.patch_size {patch_size}; "
                "choose a patch size that divides data.image_size"
            )
        self.grid = image_size // patch_size
        self.layout, self.act = layout, act
        clip, siglip = layout == "clip", layout == "siglip"
        self.patch_embed = nn.Conv2d(in_channels, size.dim, patch_size, patch_size, bias=not clip)
        # SigLIP pools by attention: no class token, a position per patch only
        self.cls_token = None if siglip else nn.Parameter(torch.zeros(1, 1, size.dim))
        self.prefix = 0 if siglip else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.prefix + self.grid**2, size.dim))
        self.norm_pre = nn.LayerNorm(size.dim, eps=eps) if clip else nn.Identity()
        self.blocks = nn.Sequential(
            *(
                Block(size.dim, size.heads, size.mlp_ratio, False, act, eps)
                for _ in range(size.depth)
            )
        )
        self.norm = nn.LayerNorm(size.dim, eps=eps)
        self.pool = MAPHead(size.dim, size.heads, size.mlp_ratio, act, eps) if siglip else None
        self.out_dim = size.dim
        self.checkpointing = checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        """The initialisation of the layout's reference (the patch convolution and the
        LayerNorms keep PyTorch's defaults in both).

        ``timm``: DeiT (Touvron et al. 2021) / timm's ``VisionTransformer``
        (``init_weights_vit_timm``): truncated normal std 0.02 for the class token, the
        position embedding and every linear layer of the blocks, zero biases (timm today
        starts the class token at std 1e-6; DeiT's 0.02 is kept).

        ``clip``: OpenAI CLIP's ``VisionTransformer`` (``clip/model.py``; open_clip's
        ``VisionTransformer`` the same): ``class_embedding`` and ``positional_embedding`` are
        ``width^-0.5 * randn``; ``initialize_parameters`` leaves the image blocks alone, so
        they keep the defaults of ``nn.MultiheadAttention`` (in-projection Xavier-uniform over
        the stacked q, k, v matrix, zero in-projection and out-projection biases, the
        out-projection weight at ``nn.Linear``'s default) and of ``nn.Linear`` for the MLP
        (weight and bias ``U(+-fan_in^-0.5)``). The projection to the joint space
        (``proj = width^-0.5 * randn``) is :class:`dist_contrast.models.towers.Tower`'s.

        ``siglip``: transformers' ``SiglipPreTrainedModel._init_weights`` (big_vision's): the
        patch convolution LeCun normal with zero bias, the position embedding normal std
        ``width^-0.5``, the blocks by :func:`siglip_init`, the pooling head by
        :meth:`MAPHead.reset_parameters`."""
        if self.layout == "siglip":
            lecun_normal_(self.patch_embed.weight)
            nn.init.zeros_(self.patch_embed.bias)
            nn.init.normal_(self.pos_embed, std=self.out_dim**-0.5)
            siglip_init(self.blocks)
            self.pool.reset_parameters()
            return
        if self.layout == "timm":
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            for m in self.blocks.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            return
        scale = self.out_dim**-0.5
        nn.init.normal_(self.cls_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        for block in self.blocks:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
            nn.init.xavier_uniform_(block.attn.qkv.weight)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.proj.bias)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The position embedding for an ``h`` x ``w`` patch grid: as learnt for the build-time
        grid, bicubically interpolated for another one (smaller multi-crop views, as in DINO)."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls, patches = self.pos_embed[:, : self.prefix], self.pos_embed[:, self.prefix :]
        grid = patches.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_embed.stride[0]
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(
                f"image of {tuple(x.shape[-2:])} px is not divisible by the patch size {p}"
            )
        x = self.patch_embed(x)
        pos = self._pos_embed(x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(x + pos)
        x = run_blocks(self.blocks, x, self.checkpointing and self.training)
        x = self.norm(x)
        return x[:, 0] if self.pool is None else self.pool(x)
