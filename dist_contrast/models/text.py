"""The text tower of image-text methods (CLIP, Radford et al. 2021). No distributed code.

Conventions (CLIP's text transformer, smaller): token embedding + learnable position embedding
(one per position of the context), pre-norm transformer blocks with a causal mask (the blocks
of :mod:`dist_contrast.models.vit`), a final LayerNorm, and the representation is the feature
at the end-of-text token (the first ``eot_id`` of each row; the tokenizers of
:mod:`dist_contrast.data.tokenizer` always keep one). With the causal mask the padding after
end-of-text never reaches that feature, so no padding mask is needed. Weights: CLIP's
``initialize_parameters`` (:meth:`TextTransformer._init_weights`). The MLP activation is ``gelu``
or ``quick_gelu`` (``model.activation``).
This is the layout of OpenAI's CLIP text tower and of Hugging Face's ``CLIPTextModel``
(``text.layout=clip``).

``text.layout=siglip`` is SigLIP's text tower (Zhai et al. 2023; transformers'
``SiglipTextModel``): the blocks attend both ways (no causal mask, no padding mask: the
captions are padded to the context length, and the padding is read) and the representation is
the feature at the last position of the row. Its projection to the joint space has a bias
(:func:`dist_contrast.models.towers.text_projection`). Init: transformers'
``SiglipPreTrainedModel._init_weights`` (:meth:`TextTransformer._init_weights`).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.models.layers import run_blocks
from dist_contrast.models.vit import Block, siglip_init

TEXT_LAYOUTS = ("clip", "siglip")


class TextTransformer(nn.Module):
    """int64 token ids [B, L] (L <= ``context_length``) -> [B, ``width``]."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        eot_id: int,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        checkpointing: bool = False,
        act: str = "gelu",
        eps: float = 1e-6,
        layout: str = "clip",
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        if layout not in TEXT_LAYOUTS:
            raise ValueError(f"unknown text.layout {layout!r}; choose one of {TEXT_LAYOUTS}")
        self.vocab_size, self.context_length, self.eot_id = vocab_size, context_length, eot_id
        self.layout = layout
        causal = layout == "clip"
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.Sequential(
            *(Block(width, heads, mlp_ratio, causal, act, eps) for _ in range(layers))
        )
        self.norm = nn.LayerNorm(width, eps=eps)
        self.out_dim, self.act = width, act
        self.checkpointing = checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        """OpenAI CLIP's ``CLIP.initialize_parameters`` (``clip/model.py``; open_clip's
        ``TextTransformer.init_parameters`` the same), for ``width`` w and ``layers`` L: token
        embedding normal std 0.02, position embedding std 0.01; in each block the attention
        in-projection (q, k, v stacked) std ``w^-0.5``, the out-projection std
        ``w^-0.5 (2L)^-0.5``, the MLP's first layer (``c_fc``) std ``(2w)^-0.5`` and its second
        (``c_proj``) std ``w^-0.5 (2L)^-0.5``; the attention biases zero (those of
        ``nn.MultiheadAttention``), the MLP biases at ``nn.Linear``'s default, LayerNorms at
        theirs. The text projection (``w^-0.5``) is
        :class:`dist_contrast.models.towers.Tower`'s.

        ``siglip``: transformers' ``SiglipPreTrainedModel._init_weights``: the token and
        position embeddings normal std ``w^-0.5`` (flax's default embedding init), the blocks
        by :func:`dist_contrast.models.vit.siglip_init`."""
        width, layers = self.out_dim, len(self.blocks)
        if self.layout == "siglip":
            nn.init.normal_(self.token_embed.weight, std=width**-0.5)
            nn.init.normal_(self.pos_embed, std=width**-0.5)
            siglip_init(self.blocks)
            return
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for block in self.blocks:
            fc, c_proj = block.mlp[0], block.mlp[2]
            fc.reset_parameters()
            c_proj.reset_parameters()
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(fc.weight, std=fc_std)
            nn.init.normal_(c_proj.weight, std=proj_std)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The position each row is pooled at: the first end-of-text token (``clip``; a row
        without one, cut by hand, pools at its last position) or the last position
        (``siglip``)."""
        last = torch.full_like(ids[:, 0], ids.shape[1] - 1)
        if self.layout == "siglip":
            return last
        is_eot = ids == self.eot_id
        first = is_eot.int().argmax(dim=1)
        return torch.where(is_eot.any(dim=1), first, last)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(f"token ids must be int64 [B, L], got {ids.dtype} {tuple(ids.shape)}")
        n = ids.shape[1]
        if n > self.context_length:
            raise ValueError(f"{n} tokens exceed the context length {self.context_length}")
        x = self.token_embed(ids) + self.pos_embed[:, :n]
        x = run_blocks(self.blocks, x, self.checkpointing and self.training)
        x = self.norm(x)
        return x[torch.arange(x.shape[0], device=x.device), self.eot_positions(ids)]
