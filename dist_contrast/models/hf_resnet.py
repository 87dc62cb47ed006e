"""Our ResNet encoders as Hugging Face ``transformers.ResNetModel`` (``export --format hf``).

Convention: ``ResNetModel`` is a 7x7/2 convolution + batch norm + ReLU + 3x3/2 max-pool stem,
stages of basic or bottleneck layers (the first layer of every stage after the first strides
by 2, a bottleneck in its 3x3 convolution), and a global average pool; ``pooler_output``
flattened is our encoder's output. That is exactly :class:`~dist_contrast.models.resnet.ResNet`
with ``stem="imagenet"`` and ``norm="batch"`` (or ``sync_batch``, the same parameters): stage
``i`` of ours is ``encoder.stages.i`` of theirs, block ``j`` of that stage is ``layers.j``,
``convK``/``normK`` are ``layer.(K-1).convolution``/``normalization``, ``shortcut.0``/``.1`` are
``shortcut.convolution``/``normalization`` and ``stem.0``/``stem.1`` are
``embedder.embedder.convolution``/``normalization``. The zero-initialised last norm of each
block is only an initialisation: trained weights carry over unchanged. Every other encoder
(group norm, no norm, the small 3x3 stem, :class:`SmallResNet`, ViTs) raises
:class:`NotMappable`, whose one-line message says what would map.

Only the layout is mapped here; ``transformers`` itself is imported by the exporter and tests.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.models.resnet import BasicBlock, Bottleneck, ResNet, SmallResNet

__all__ = ["NotMappable", "resnet_from_hf", "resnet_hf_config", "resnet_to_hf"]

_PREFIX = "cannot export as transformers ResNetModel: "
_STEM_FIX = (
    "ResNetModel's stem is a 7x7 stride-2 convolution with max-pool; "
    "use model.encoder=resnet18 or resnet50 with model.stem=imagenet"
)
_NORM_FIX = "ResNetModel uses batch norm; train with model.norm=batch"
_BN_EPS = 1e-5  # nn.BatchNorm2d's default, which ResNetModel's layers use


class NotMappable(ValueError):
    """The encoder has no exact ``ResNetModel`` layout; the message (one line) says why and
    which configuration would have one."""

    def __init__(self, why: str) -> None:
        super().__init__(_PREFIX + " ".join(why.split()))


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _check_kind(encoder: nn.Module) -> None:
    """Raise for the configurations that differ from ``ResNetModel`` as a whole: another
    encoder, the small stem, a norm other than batch norm (all reasons in one message)."""
    if isinstance(encoder, SmallResNet):
        raise NotMappable(
            "resnet_tiny/resnet_small have a 3x3 stride-1 stem without max-pool; "
            f"{_STEM_FIX} and model.norm=batch"
        )
    if not isinstance(encoder, ResNet):
        raise NotMappable(
            f"{type(encoder).__name__} is not a ResNet; only resnet18/resnet50 "
            "(model.stem=imagenet, model.norm=batch) have a ResNetModel layout"
        )
    reasons = []
    if not (len(encoder.stem) == 4 and isinstance(encoder.stem[3], nn.MaxPool2d)):
        reasons.append(f"the stem is model.stem=small (3x3 stride 1, no max-pool); {_STEM_FIX}")
    norms = [encoder.stem[1]] + [b.last_norm for b in encoder.blocks]
    other = next((m for m in norms if not _is_bn(m)), None)
    if other is not None:
        has = "has no norm" if isinstance(other, nn.Identity) else f"uses {type(other).__name__}"
        reasons.append(f"the encoder {has}; {_NORM_FIX}")
    if reasons:
        raise NotMappable("; also ".join(reasons))


def _check_conv(conv: nn.Module, c_in: int, c_out: int, kernel: int, stride: int, where: str):
    """``conv`` must be ResNetModel's ``Conv2d(c_in, c_out, kernel, stride, kernel // 2)``."""
    ok = (
        isinstance(conv, nn.Conv2d)
        and conv.in_channels == c_in
        and conv.out_channels == c_out
        and conv.kernel_size == (kernel, kernel)
        and conv.stride == (stride, stride)
        and conv.padding == (kernel // 2, kernel // 2)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
        and conv.padding_mode == "zeros"
    )
    if not ok:
        raise NotMappable(
            f"{where} is {conv!r}, ResNetModel has Conv2d({c_in}, {c_out}, kernel_size={kernel}, "
            f"stride={stride}, padding={kernel // 2}, bias=False) there"
        )


def _check_norm(norm: nn.Module, channels: int, where: str) -> None:
    """``norm`` must be ResNetModel's ``BatchNorm2d(channels)`` (eps 1e-5, affine, stats)."""
    if not _is_bn(norm):
        raise NotMappable(f"{where} is {type(norm).__name__}; {_NORM_FIX}")
    if not (
        norm.num_features == channels
        and norm.eps == _BN_EPS
        and norm.affine
        and norm.track_running_stats
    ):
        raise NotMappable(
            f"{where} is {norm!r}, ResNetModel has BatchNorm2d({channels}, eps={_BN_EPS}) "
            f"with affine parameters and running statistics; {_NORM_FIX}"
        )


def _stem_map(stem: nn.Sequential) -> dict[str, str]:
    """Check our ``imagenet`` stem against ``ResNetEmbeddings``; its module names mapped."""
    conv, norm, act, pool = stem
    _check_conv(conv, conv.in_channels, conv.out_channels, 7, 2, "stem.0")
    _check_norm(norm, conv.out_channels, "stem.1")
    pool_ok = (pool.kernel_size, pool.stride, pool.padding, pool.dilation) == (3, 2, 1, 1)
    if not (isinstance(act, nn.ReLU) and isinstance(pool, nn.MaxPool2d) and pool_ok):
        raise NotMappable(f"the stem ends {act!r}, {pool!r}; {_STEM_FIX}")
    if pool.ceil_mode:
        raise NotMappable(f"stem.3 is {pool!r} with ceil_mode; {_STEM_FIX}")
    emb = "embedder.embedder."
    return {"stem.0": emb + "convolution", "stem.1": emb + "normalization"}


def _block_convs(block: nn.Module, c_in: int, c_out: int, stride: int):
    """(conv, norm, expected in, out, kernel, stride) per residual-branch layer of ``block``."""
    if isinstance(block, BasicBlock):
        return [
            (block.conv1, block.norm1, c_in, c_out, 3, stride),
            (block.conv2, block.norm2, c_out, c_out, 3, 1),
        ]
    mid = c_out // 4  # ResNetBottleNeckLayer's fixed reduction; stride in the 3x3
    return [
        (block.conv1, block.norm1, c_in, mid, 1, 1),
        (block.conv2, block.norm2, mid, mid, 3, stride),
        (block.conv3, block.norm3, mid, c_out, 1, 1),
    ]


def _block_map(block: nn.Module, c_in: int, c_out: int, stride: int, ours: str, hf: str):
    """Check one block against ResNetModel's layer of the same shape; its module names."""
    names: dict[str, str] = {}
    for k, (conv, norm, ci, co, kernel, s) in enumerate(_block_convs(block, c_in, c_out, stride)):
        _check_conv(conv, ci, co, kernel, s, f"{ours}.conv{k + 1}")
        _check_norm(norm, co, f"{ours}.norm{k + 1}")
        names[f"{ours}.conv{k + 1}"] = f"{hf}.layer.{k}.convolution"
        names[f"{ours}.norm{k + 1}"] = f"{hf}.layer.{k}.normalization"
    if not isinstance(block.act, nn.ReLU):
        raise NotMappable(f"{ours}.act is {block.act!r}, ResNetModel uses ReLU")
    projects = c_in != c_out or stride != 1  # ResNetModel's rule for a projection shortcut
    sc = block.shortcut
    if not projects:
        if not isinstance(sc, nn.Identity):
            raise NotMappable(f"{ours}.shortcut projects where ResNetModel has an identity")
        return names
    if not (isinstance(sc, nn.Sequential) and len(sc) == 2):
        raise NotMappable(f"{ours}.shortcut is {sc!r}, ResNetModel has a 1x1 conv + batch norm")
    _check_conv(sc[0], c_in, c_out, 1, stride, f"{ours}.shortcut.0")
    _check_norm(sc[1], c_out, f"{ours}.shortcut.1")
    names[f"{ours}.shortcut.0"] = f"{hf}.shortcut.convolution"
    names[f"{ours}.shortcut.1"] = f"{hf}.shortcut.normalization"
    return names


def _block_out(block: nn.Module) -> int:
    return block.conv2.out_channels if isinstance(block, BasicBlock) else block.conv3.out_channels


def _stages(blocks: nn.Sequential) -> list[list[int]]:
    """Indices of ``blocks`` grouped into stages: a stage starts where the width changes."""
    stages: list[list[int]] = []
    for i, b in enumerate(blocks):
        if not stages or _block_out(b) != _block_out(blocks[i - 1]):
            stages.append([])
        stages[-1].append(i)
    return stages


def _layout(encoder: nn.Module) -> tuple[dict, dict[str, str]]:
    """The ResNetConfig fields of ``encoder`` and the map of its module names to
    ResNetModel's, after checking every layer; NotMappable where anything differs."""
    _check_kind(encoder)
    names = _stem_map(encoder.stem)
    kinds = {type(b) for b in encoder.blocks}
    if len(kinds) != 1 or not kinds <= {BasicBlock, Bottleneck}:
        raise NotMappable("ResNetModel's stages are all basic or all bottleneck blocks")
    embedding = encoder.stem[0].out_channels
    c_in, hidden_sizes, depths = embedding, [], []
    for s, idx in enumerate(_stages(encoder.blocks)):
        c_out = _block_out(encoder.blocks[idx[0]])
        for j, i in enumerate(idx):
            stride = 2 if (s > 0 and j == 0) else 1  # downsample_in_first_stage=False
            hf = f"encoder.stages.{s}.layers.{j}"
            names |= _block_map(encoder.blocks[i], c_in, c_out, stride, f"blocks.{i}", hf)
            c_in = c_out
        hidden_sizes.append(c_out)
        depths.append(len(idx))
    config = {
        "model_type": "resnet",
        "architectures": ["ResNetModel"],
        "num_channels": encoder.stem[0].in_channels,
        "embedding_size": embedding,
        "hidden_sizes": hidden_sizes,
        "depths": depths,
        "layer_type": "basic" if kinds == {BasicBlock} else "bottleneck",
        "hidden_act": "relu",
        "downsample_in_first_stage": False,
        "downsample_in_bottleneck": False,
    }
    return config, names


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU clone; floating tensors as fp32, integer ones (``num_batches_tracked``)
    keep their dtype."""
    dtype = torch.float32 if t.is_floating_point() else t.dtype
    return t.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)


def _rename(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state`` with the module part of every key renamed through ``names``."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        if module not in names:
            raise NotMappable(f"{key} has no place in ResNetModel")
        out[f"{names[module]}.{leaf}"] = _fp32(t)
    return out


def resnet_hf_config(encoder: nn.Module, in_channels: int) -> dict:
    """The ``config.json`` of the ``ResNetModel`` that is exactly ``encoder``:
    ``ResNetModel(ResNetConfig(**resnet_hf_config(enc, c)))`` has ``enc``'s layers, and its
    flattened ``pooler_output`` is ``enc(x)``. NotMappable where no such config exists;
    ValueError if ``in_channels`` is not the stem's input width."""
    config, _ = _layout(encoder)
    if config["num_channels"] != in_channels:
        raise ValueError(
            f"the encoder's stem takes {config['num_channels']} channels, not {in_channels}"
        )
    return config


def resnet_to_hf(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """``encoder``'s state dict (weights, batch-norm running statistics and
    ``num_batches_tracked``) under ``ResNetModel``'s keys (no ``resnet.`` prefix), as
    contiguous CPU clones, floating tensors in fp32. NotMappable where there is no layout."""
    _, names = _layout(encoder)
    return _rename(encoder.state_dict(), names)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``ResNetForImageClassification``-style state (``resnet.`` keys plus a classifier)
    reduced to the ``ResNetModel`` keys; a plain ``ResNetModel`` state unchanged."""
    if not any(k.startswith("resnet.") for k in state):
        return state
    return {k.removeprefix("resnet."): t for k, t in state.items() if k.startswith("resnet.")}


def resnet_from_hf(encoder: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`resnet_to_hf`: a ``ResNetModel`` state dict (keys optionally
    prefixed ``resnet.``, other keys then ignored) under ``encoder``'s keys, ready for
    ``encoder.load_state_dict(..., strict=True)``. NotMappable where ``encoder`` has no
    ResNetModel layout; ValueError if ``state`` is not that layout's (keys or shapes)."""
    _, names = _layout(encoder)
    state = _strip_prefix(state)
    ours = encoder.state_dict()
    back = {hf: mine for mine, hf in names.items()}
    expected = {f"{names[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": k for k in ours}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"not this encoder's ResNetModel state: missing {missing[:3]} ({len(missing)} in "
            f"all), unexpected {unexpected[:3]} ({len(unexpected)} in all)"
        )
    for hf_key, key in expected.items():
        if state[hf_key].shape != ours[key].shape:
            raise ValueError(
                f"{hf_key} has shape {tuple(state[hf_key].shape)}, "
                f"the encoder's {key} {tuple(ours[key].shape)}"
            )
    return _rename(state, back)
