"""Encoders and heads: shapes, parameter counts against published figures and an independent
arithmetic count, activation checkpointing against the unchecked model, the ViT block against
torch's own TransformerEncoderLayer, the norm choices and the error messages; the ViT and text
initialisations against their references (statistics, spread of the initial features), the ViT
size keys."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dist_contrast.config import ModelConfig, load_config
from dist_contrast.errors import ConfigError
from dist_contrast.models import MLPHead, build_encoder, build_head, build_predictor, layers
from dist_contrast.models.text import TextTransformer
from dist_contrast.models.towers import Tower
from dist_contrast.models.vit import Block, ViTSize, vit_size

from multiproc import run_ranks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is many times faster than several on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"width": 8, "norm": "batch", **kw})


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


SHAPES = [  # encoder, extra config, channels, image size, out_dim
    ("resnet_tiny", {}, 1, 16, 32),
    ("resnet_small", {"norm": "group"}, 1, 16, 32),
    ("resnet18", {"stem": "small"}, 3, 32, 64),
    ("resnet18", {"stem": "imagenet", "norm": "group"}, 3, 32, 64),
    ("resnet50", {"stem": "small", "norm": "none"}, 3, 32, 256),
    ("resnet50", {"stem": "imagenet"}, 3, 32, 256),
    ("vit_tiny", {"patch_size": 8}, 3, 32, 192),
    ("vit_small", {"patch_size": 16}, 1, 32, 384),
]


@pytest.mark.parametrize("name,extra,channels,size,out_dim", SHAPES)
def test_output_shape_and_out_dim(name, extra, channels, size, out_dim):
    torch.manual_seed(0)
    enc = build_encoder(_cfg(encoder=name, **extra), channels, size)
    y = enc(torch.randn(2, channels, size, size))
    assert enc.out_dim == out_dim
    assert y.shape == (2, out_dim) and torch.isfinite(y).all()


def _resnet_count(bottleneck: bool, layers: tuple[int, ...], width: int = 64) -> int:
    """Parameters of a batch-norm ResNet without classifier, counted from the architecture
    tables of He et al. 2016 (Table 1): conv k x k: k*k*c_in*c_out (no bias), batch norm: 2*c."""

    def conv(k: int, c_in: int, c_out: int) -> int:
        return k * k * c_in * c_out

    total = conv(7, 3, width) + 2 * width  # stem
    c = width
    for i, n in enumerate(layers):
        mid = width * 2**i
        out = 4 * mid if bottleneck else mid
        for j in range(n):
            if bottleneck:
                total += conv(1, c, mid) + conv(3, mid, mid) + conv(1, mid, out) + 2 * (2 * mid)
            else:
                total += conv(3, c, mid) + conv(3, mid, mid) + 2 * mid
            total += 2 * out  # last norm of the block
            if j == 0 and (i > 0 or c != out):
                total += conv(1, c, out) + 2 * out  # projection shortcut
            c = out
    return total


def test_resnet_parameter_counts():
    # Published totals with the 1000-class fc (torchvision model cards): ResNet-18 11,689,512,
    # ResNet-50 25,557,032; the fc holds 512*1000+1000 and 2048*1000+1000 of them.
    with torch.device("meta"):
        r18 = build_encoder(_cfg(encoder="resnet18", width=64, stem="imagenet"), 3, 224)
        r50 = build_encoder(_cfg(encoder="resnet50", width=64, stem="imagenet"), 3, 224)
    assert _count(r18) == 11_689_512 - (512 * 1000 + 1000) == 11_176_512
    assert _count(r50) == 25_557_032 - (2048 * 1000 + 1000) == 23_508_032
    assert _count(r18) == _resnet_count(False, (2, 2, 2, 2))
    assert _count(r50) == _resnet_count(True, (3, 4, 6, 3))
    assert (r18.out_dim, r50.out_dim) == (512, 2048)


def test_vit_base_parameter_count():
    # Published: ViT-B/16 at 224 has 86,567,656 parameters with its 1000-class head
    # (768*1000+1000). By hand: patch embedding 16*16*3*768 + 768; class token 768; position
    # embedding (1 + 14*14)*768; per block two LayerNorms 4*768, qkv 768*2304 + 2304,
    # projection 768*768 + 768, MLP 768*3072 + 3072 + 3072*768 + 768; final LayerNorm 2*768.
    d, n = 768, 14 * 14
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    by_hand = (16 * 16 * 3 * d + d) + d + (1 + n) * d + 12 * block + 2 * d
    with torch.device("meta"):
        vit = build_encoder(_cfg(encoder="vit_base", patch_size=16), 3, 224)
    assert _count(vit) == by_hand == 86_567_656 - (768 * 1000 + 1000) == 85_798_656
    assert vit.out_dim == 768


def test_vit_block_matches_torch_transformer_layer():
    """A pre-norm block with SDPA attention equals torch.nn.TransformerEncoderLayer
    (norm_first, GELU, no dropout) carrying the same weights."""
    torch.manual_seed(0)
    dim, heads = 32, 4
    ours = Block(dim, heads, 4)
    ref = nn.TransformerEncoderLayer(
        dim, heads, 4 * dim, dropout=0.0, activation="gelu", layer_norm_eps=1e-6,
        batch_first=True, norm_first=True,
    )  # fmt: skip
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.attn.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(ours.attn.proj.weight)
        ref.self_attn.out_proj.bias.copy_(ours.attn.proj.bias)
        ref.linear1.load_state_dict(ours.mlp[0].state_dict())
        ref.linear2.load_state_dict(ours.mlp[2].state_dict())
        ref.norm1.load_state_dict(ours.norm1.state_dict())
        ref.norm2.load_state_dict(ours.norm2.state_dict())
    x = torch.randn(3, 5, dim)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_vit_position_embedding_interpolates_for_other_sizes():
    torch.manual_seed(0)
    vit = build_encoder(_cfg(encoder="vit_tiny", patch_size=8), 3, 32)
    assert vit.pos_embed.shape == (1, 1 + 16, 192)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 192)  # a 2x2 grid: a smaller crop
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        vit(torch.randn(2, 3, 20, 20))


def _perturbed(model: nn.Module) -> nn.Module:
    """Norm scales away from their zero/one init, so every path carries a gradient."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "name,extra,channels,size",
    [
        ("resnet_tiny", {}, 1, 16),
        ("resnet18", {"stem": "small"}, 3, 16),
        ("resnet50", {"stem": "small", "norm": "group"}, 3, 16),
        ("vit_tiny", {"patch_size": 8}, 3, 16),
    ],
)
def test_activation_checkpointing_gives_equal_gradients(name, extra, channels, size):
    torch.manual_seed(0)
    plain = _perturbed(build_encoder(_cfg(encoder=name, **extra), channels, size))
    ckpt = build_encoder(_cfg(encoder=name, activation_checkpointing=True, **extra), channels, size)
    ckpt.load_state_dict(plain.state_dict())
    blocks = getattr(ckpt, "blocks", None) or ckpt.stages
    calls = []
    blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(4, channels, size, size)
    for model in (plain, ckpt):
        model(x).pow(2).sum().backward()
    assert len(calls) == 2, "the checkpointed block must run again in the backward"
    for (k, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=k)
    for (k, b), c in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=k)  # running stats updated once
    ckpt.eval()
    calls.clear()
    ckpt(x).sum().backward()
    assert len(calls) == 1, "no checkpointing in eval mode"


def test_resnet_zero_init_of_last_norm():
    torch.manual_seed(0)
    for name in ("resnet18", "resnet50"):
        for norm in ("batch", "group"):
            enc = build_encoder(_cfg(encoder=name, norm=norm), 3, 16)
            assert all(b.last_norm.weight.abs().sum() == 0 for b in enc.blocks)
            assert all(b.norm1.weight.abs().sum() > 0 for b in enc.blocks)


def test_norm_choices_build_the_named_layers():
    kinds = {"batch": nn.BatchNorm2d, "group": nn.GroupNorm}
    for norm, kind in kinds.items():
        enc = build_encoder(_cfg(encoder="resnet18", norm=norm, width=12), 3, 16)
        assert sum(isinstance(m, kind) for m in enc.modules()) == 1 + 8 * 2 + 3
    enc = build_encoder(_cfg(encoder="resnet18", norm="none"), 3, 16)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in enc.modules())
    # group norm: gcd(32, channels) groups in ResNet-18/50 (width 12: 4, 8, 16, 32 groups)
    enc = build_encoder(_cfg(encoder="resnet18", norm="group", width=12), 3, 16)
    assert {m.num_groups for m in enc.modules() if isinstance(m, nn.GroupNorm)} == {4, 8, 16, 32}


def test_sync_batch_norm_needs_cuda():
    cfg = _cfg(encoder="resnet18", norm="sync_batch")
    if torch.cuda.is_available():
        enc = build_encoder(cfg, 3, 16)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in enc.modules())
    else:
        with pytest.raises(ValueError, match="needs CUDA.*model.norm=batch.*shuffle_bn.*group"):
            build_encoder(cfg, 3, 16)
        with pytest.raises(ValueError, match="needs CUDA"):
            build_encoder(_cfg(encoder="resnet_tiny", norm="sync_batch"), 1, 16)
    # ViTs use LayerNorm: the norm key does not apply to them
    assert build_encoder(_cfg(encoder="vit_tiny", norm="sync_batch", patch_size=8), 3, 16)


def _sync_bn_on_cpu(rank: int, world: int) -> str:
    bn = nn.SyncBatchNorm(4)
    try:
        bn(torch.randn(4, 4, 2, 2))
    except ValueError as e:
        return str(e)
    return "ran"


def test_torch_sync_batch_norm_refuses_cpu_under_gloo():
    """Why ``sync_batch`` is refused without CUDA: torch's SyncBatchNorm raises for CPU inputs
    on an initialised gloo group. If a later torch runs it, the build-time error must go."""
    results = run_ranks(_sync_bn_on_cpu, 2)
    assert all("expected input tensor to be on GPU" in r for r in results), results


@pytest.mark.parametrize(
    "extra,size,match",
    [
        ({"encoder": "resnet99"}, 16, "unknown encoder 'resnet99'"),
        ({"encoder": "resnet18", "stem": "huge"}, 16, "unknown model.stem 'huge'"),
        ({"encoder": "resnet18", "norm": "layer"}, 16, "unknown model.norm 'layer'"),
        ({"encoder": "resnet_tiny", "norm": "layer"}, 16, "unknown model.norm 'layer'"),
        ({"encoder": "resnet50", "width": 0}, 16, "model.width must be >= 1"),
        ({"encoder": "vit_tiny", "patch_size": 8}, 30, "image size 30 is not divisible by"),
        ({"encoder": "vit_tiny", "patch_size": 0}, 16, "not divisible by model.patch_size 0"),
    ],
)
def test_bad_config_gives_value_error(extra, size, match):
    with pytest.raises(ValueError, match=match):
        build_encoder(_cfg(**extra), 3, size)


def _naive_head(head: MLPHead, x: torch.Tensor, norm: bool) -> torch.Tensor:
    """The head written out with functional ops on its own parameters (training-mode BN)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    for i, lin in enumerate(linears[:-1]):
        x = x @ lin.weight.T + (0 if lin.bias is None else lin.bias)
        if norm:
            mu, var = x.mean(0), x.var(0, unbiased=False)
            x = (x - mu) / torch.sqrt(var + bns[i].eps) * bns[i].weight + bns[i].bias
        x = x.clamp_min(0)
    return x @ linears[-1].weight.T + linears[-1].bias


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("norm", [False, True])
def test_mlp_head(layers, norm):
    torch.manual_seed(0)
    head = build_head(10, _cfg(proj_hidden_dim=16, proj_layers=layers, proj_norm=norm), 6)
    x = torch.randn(8, 10)
    ref = _naive_head(copy.deepcopy(head), x, norm)
    torch.testing.assert_close(head(x), ref, rtol=1e-5, atol=1e-5)
    n_lin = sum(isinstance(m, nn.Linear) for m in head.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert (n_lin, n_bn) == (layers, (layers - 1) if norm else 0)
    hidden = 10 if layers == 1 else 16
    expected = hidden * 6 + 6 + (layers > 1) * (10 * 16 + (layers - 2) * 16 * 16)
    expected += (layers - 1) * (2 * 16 if norm else 16)  # BN scale+shift, or linear biases
    assert _count(head) == expected


def test_predictor_and_head_defaults():
    cfg = _cfg(proj_dim=12, pred_hidden_dim=20)
    pred = build_predictor(cfg)
    assert pred(torch.randn(3, 12)).shape == (3, 12)
    assert build_head(7, cfg)(torch.randn(3, 7)).shape == (3, 12)
    with pytest.raises(ValueError, match="at least one layer"):
        MLPHead(4, 4, 4, layers=0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.patch_size=5"], r"'model.patch_size' \(5\) must divide data.image_size \(16\)"),
        (["model.patch_size=0"], "'model.patch_size' must be > 0"),
        (["model.patch_size=16", "augment.small_crops=2"], r"must divide augment.small_size \(8\)"),
    ],
)
def test_config_rejects_vit_patch_sizes(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.encoder=vit_tiny", *overrides])
    load_config(None, ["model.encoder=resnet18", *overrides])  # ResNets ignore the patch size


# --- initialisation: each layout's reference scheme, and the spread it gives the features ---


def _spread(x: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of rows of ``x``."""
    z = nn.functional.normalize(x, dim=1)
    c, n = z @ z.T, x.shape[0]
    return float((c.sum() - c.diagonal().sum()) / (n * (n - 1)))


def _clip_towers(seed: int = 0, layout: str = "clip") -> tuple[Tower, Tower]:
    """The towers of configs/clip_vit_digits.yaml (vit_nano in ``layout``, text 64 wide, 2
    layers) at their initial weights, over a 423-token vocabulary with end-of-text id 2."""
    torch.manual_seed(seed)
    vit = build_encoder(_cfg(encoder="vit_nano", vit_layout=layout, patch_size=4), 1, 16)
    text = TextTransformer(423, 24, 2, width=64, layers=2, heads=4)
    return Tower(vit, 64), Tower(text, 64)


def test_initial_features_spread_as_clips():
    """At initialisation the features of different inputs must point in different directions,
    or the contrastive loss sits at chance (ln N) until they separate. Measured, 64 random
    images / token rows, seeds 0-2: CLIP's init gives image 0.946-0.968 (open_clip's ViT:
    0.9686), text 0.21-0.28; the former trunc-normal 0.02 everywhere gave 0.999 and 0.73-0.78."""
    image, text = _clip_towers()
    g = torch.Generator().manual_seed(100)
    pixels = torch.randn(64, 1, 16, 16, generator=g)
    ids = torch.randint(3, 423, (64, 24), generator=g)
    ids[torch.arange(64), torch.randint(2, 24, (64,), generator=g)] = 2  # end of text
    with torch.no_grad():
        assert _spread(image(pixels)) < 0.98
        assert _spread(text(ids)) < 0.5


def _close_std(t: torch.Tensor, std: float, rel: float) -> bool:
    return abs(float(t.detach().std()) / std - 1) < rel


def _torch_attention(in_proj: nn.Linear, out_proj: nn.Linear, heads: int) -> nn.Module:
    """nn.MultiheadAttention (float64) holding copies of our stacked q, k, v projection
    ``in_proj`` and output projection ``out_proj``: the reference of our attentions."""
    ref = nn.MultiheadAttention(out_proj.in_features, heads, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(in_proj.weight)
        ref.in_proj_bias.copy_(in_proj.bias)
        ref.out_proj.weight.copy_(out_proj.weight)
        ref.out_proj.bias.copy_(out_proj.bias)
    return ref


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_torch_multihead_attention_without_select_backward(causal):
    """Our fused-qkv attention against nn.MultiheadAttention holding the same weights, forward
    and every gradient (float64); and its backward runs no select_backward (each fills a zero
    tensor of all of qkv)."""
    from torch.profiler import profile

    from dist_contrast.models.vit import Attention

    torch.manual_seed(0)
    dim, heads, n = 32, 4, 7
    ours = Attention(dim, heads, causal=causal).double()
    ref = _torch_attention(ours.qkv, ours.proj, heads)
    x = torch.randn(3, n, dim, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1) if causal else None
    want = ref(xb, xb, xb, attn_mask=mask, need_weights=False)[0]
    with profile() as prof:
        got = ours(xa)
        got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        ours.qkv.weight.grad, ref.in_proj_weight.grad, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        ours.proj.weight.grad, ref.out_proj.weight.grad, rtol=1e-10, atol=1e-12
    )
    ops = {e.key for e in prof.key_averages()}
    assert "aten::select_backward" not in ops and "aten::unbind" in ops


def test_clip_layout_vit_init_follows_openai_clip():
    """OpenAI CLIP's VisionTransformer: class and position embedding width^-0.5 * randn, the
    blocks at nn.MultiheadAttention's / nn.Linear's defaults, the projection width^-0.5."""
    torch.manual_seed(0)
    m = _cfg(encoder="vit_nano", vit_layout="clip", vit_width=256, vit_depth=2)
    vit = build_encoder(m, 1, 16)
    w = 256
    assert _close_std(vit.cls_token, w**-0.5, 0.2)  # 256 samples
    assert _close_std(vit.pos_embed, w**-0.5, 0.05)  # 17 x 256
    for block in vit.blocks:
        qkv = block.attn.qkv.weight.detach()  # Xavier-uniform over the stacked [3w, w] matrix
        bound = (6 / (w + 3 * w)) ** 0.5
        assert float(qkv.abs().max()) <= bound and _close_std(qkv, bound / 3**0.5, 0.02)
        assert not block.attn.qkv.bias.any() and not block.attn.proj.bias.any()
        for lin in (block.attn.proj, block.mlp[0], block.mlp[2]):  # nn.Linear's default
            bound = lin.in_features**-0.5
            assert float(lin.weight.detach().abs().max()) <= bound
            assert _close_std(lin.weight, bound / 3**0.5, 0.03)
        assert block.mlp[0].bias.any()
    assert vit.patch_embed.bias is None
    proj = Tower(vit, 64).proj.weight
    assert _close_std(proj, w**-0.5, 0.03)


def test_timm_layout_vit_init_stays_truncated_normal():
    """DeiT / timm: truncated normal 0.02 for class token, position embedding and linears."""
    torch.manual_seed(0)
    vit = build_encoder(_cfg(encoder="vit_nano", vit_width=256, vit_depth=2), 1, 16)
    assert _close_std(vit.cls_token, 0.02, 0.2) and _close_std(vit.pos_embed, 0.02, 0.05)
    for lin in (m for m in vit.blocks.modules() if isinstance(m, nn.Linear)):
        assert _close_std(lin.weight, 0.02, 0.05) and not lin.bias.any()


def test_text_init_follows_openai_clip():
    """CLIP.initialize_parameters for the text transformer (width w, L layers)."""
    torch.manual_seed(0)
    w, layers = 128, 3
    text = TextTransformer(300, 24, 2, width=w, layers=layers, heads=4)
    proj_std = w**-0.5 * (2 * layers) ** -0.5
    assert _close_std(text.token_embed.weight, 0.02, 0.02)
    assert _close_std(text.pos_embed, 0.01, 0.05)
    for block in text.blocks:
        assert _close_std(block.attn.qkv.weight, w**-0.5, 0.03)
        assert _close_std(block.attn.proj.weight, proj_std, 0.03)
        assert _close_std(block.mlp[0].weight, (2 * w) ** -0.5, 0.03)
        assert _close_std(block.mlp[2].weight, proj_std, 0.03)
        assert not block.attn.qkv.bias.any() and not block.attn.proj.bias.any()
        assert float(block.mlp[2].bias.detach().abs().max()) <= (4 * w) ** -0.5  # nn.Linear's
    assert _close_std(Tower(text, 64).proj.weight, w**-0.5, 0.03)


def test_map_head_equals_torch_multihead_attention_pooling():
    """SigLIP's MAPHead against the reference built from nn.MultiheadAttention (transformers'
    SiglipMultiheadAttentionPoolingHead: probe query, attention, h + MLP(LN(h))), forward and
    every gradient in float64."""
    from dist_contrast.models.vit import MAPHead

    torch.manual_seed(0)
    dim, heads, n = 32, 4, 9
    ours = MAPHead(dim, heads, 2, "gelu_tanh").double()
    ours.reset_parameters()
    attn = _torch_attention(ours.in_proj, ours.out_proj, heads)
    probe = ours.probe.detach().clone().requires_grad_()

    def reference(x: torch.Tensor) -> torch.Tensor:
        h = attn(probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
        mlp = ours.mlp[2](nn.functional.gelu(ours.mlp[0](ours.norm(h)), approximate="tanh"))
        return (h + mlp)[:, 0]

    x = torch.randn(3, n, dim, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = ours(xa), reference(xb)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.square().sum().backward()
    ours.mlp.zero_grad()
    ours.norm.zero_grad()
    want.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.probe.grad, probe.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.in_proj.weight.grad, attn.in_proj_weight.grad)
    torch.testing.assert_close(ours.out_proj.weight.grad, attn.out_proj.weight.grad)


def test_siglip_layout_vit_pools_by_attention_without_a_class_token():
    """No class token, a position per patch, a biased patch convolution; other image sizes
    interpolate the position grid; every token reaches the pooled feature."""
    torch.manual_seed(0)
    vit = build_encoder(_cfg(encoder="vit_nano", vit_layout="siglip", patch_size=4), 1, 16)
    assert vit.cls_token is None and "cls_token" not in vit.state_dict()
    assert vit.pos_embed.shape == (1, 16, 128) and vit.patch_embed.bias is not None
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    vit.eval()(x)[0].sum().backward()
    assert (x.grad[0].abs().sum(dim=0).reshape(4, 4, 4, 4).sum(dim=(1, 3)) > 0).all()
    assert vit(torch.randn(2, 1, 8, 8)).shape == (2, 128)


def test_siglip_text_tower_attends_both_ways_and_pools_the_last_position():
    """CLIP's causal tower ignores what follows end-of-text; SigLIP's reads the whole padded
    row and pools its last position."""
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 1, 0, 0, 0], [5, 6, 1, 0, 0, 7]])  # eot id 1, then padding
    for layout, same in (("clip", True), ("siglip", False)):
        text = TextTransformer(10, 6, 1, width=16, layers=1, heads=2, layout=layout).eval()
        with torch.no_grad():
            a, b = text(ids)
        assert torch.equal(a, b) == same, layout
    with torch.no_grad():  # shorter rows pool at their own last position
        assert text(ids[:, :4]).shape == (2, 16)


def test_siglip_layouts_init_follows_transformers_siglip():
    """transformers' SiglipPreTrainedModel._init_weights: position embeddings width^-0.5,
    q/k/v/out Xavier-uniform each, MLP biases ~1e-6, the probe and the head's in-projection
    Xavier-uniform, the patch convolution LeCun normal; the text head biased, at zero."""
    torch.manual_seed(0)
    w = 256
    vit = build_encoder(
        _cfg(encoder="vit_nano", vit_layout="siglip", vit_width=w, vit_depth=2), 1, 16
    )
    assert _close_std(vit.pos_embed, w**-0.5, 0.05)
    assert _close_std(vit.patch_embed.weight, 16**-0.5, 0.05) and not vit.patch_embed.bias.any()
    for block in vit.blocks:
        for q in block.attn.qkv.weight.detach().chunk(3):
            bound = (6 / (2 * w)) ** 0.5  # each [w, w] matrix its own fans
            assert float(q.abs().max()) <= bound and _close_std(q, bound / 3**0.5, 0.02)
        assert float(block.mlp[0].bias.detach().abs().max()) < 1e-5
    head = vit.pool
    assert _close_std(head.in_proj.weight, (6 / (4 * w)) ** 0.5 / 3**0.5, 0.02)
    assert float(head.probe.detach().abs().max()) <= (6 / (2 * w)) ** 0.5
    text = TextTransformer(300, 24, 1, width=128, layers=2, heads=4, layout="siglip")
    assert _close_std(text.token_embed.weight, 128**-0.5, 0.02)


def test_siglip_image_tower_has_no_projection_and_text_projection_a_bias():
    from types import SimpleNamespace

    from dist_contrast.models.towers import image_projection, text_projection

    cfg = SimpleNamespace(
        model=_cfg(encoder="vit_nano", vit_layout="siglip", proj_dim=128),
        text=SimpleNamespace(layout="siglip"),
    )
    assert isinstance(image_projection(cfg, 128), nn.Identity)
    proj = text_projection(cfg, 64)
    assert proj.bias is not None and not proj.bias.any() and proj.out_features == 128
    cfg.model.proj_dim = 64
    with pytest.raises(ConfigError, match=r"'model.proj_dim' \(64\) must equal the ViT width"):
        image_projection(cfg, 128)


# --- the ViT's size from the config ---


def test_vit_size_keys_override_the_preset():
    m = _cfg(encoder="vit_tiny", vit_width=96, vit_depth=2, vit_heads=3, vit_mlp_ratio=2)
    vit = build_encoder(m, 3, 16)
    block = vit.blocks[0]
    assert (vit.out_dim, len(vit.blocks), block.attn.heads) == (96, 2, 3)
    assert block.mlp[0].out_features == 192
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 96)
    # each key left at 0 keeps the preset's: vit_small is 384 wide, 12 blocks, 6 heads
    vit = build_encoder(_cfg(encoder="vit_small", vit_depth=1, patch_size=8), 3, 16)
    assert (vit.out_dim, len(vit.blocks), vit.blocks[0].attn.heads) == (384, 1, 6)
    assert vit_size("vit_base") == ViTSize(768, 12, 12, 4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.vit_width=96", "model.vit_heads=5"], r"'model.vit_heads' \(5\) must divide"),
        (["model.vit_depth=-1"], r"'model.vit_depth' must be >= 0 \(0: the preset"),
        (
            ["model.encoder=resnet18", "model.vit_width=96"],
            r"'model.vit_width' applies to ViT encoders only \(model.encoder=resnet18\)",
        ),
    ],
)
def test_config_rejects_bad_vit_sizes(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.encoder=vit_nano", *overrides])


def test_vit_width_against_the_presets_heads_is_one_clear_error():
    cfg = load_config(None, ["model.encoder=vit_tiny", "model.vit_width=128"])  # 3 heads
    with pytest.raises(
        ConfigError,
        match=r"'model.vit_width' \(128\) must be divisible by model.vit_heads \(3, vit_tiny's\)",
    ):
        build_encoder(cfg.model, 1, 16)


def _params_to(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What DeepSpeed 0.19 does in bf16/fp16: parameters cast, buffers left as they are."""
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module


@pytest.mark.parametrize("encoder", ["resnet_tiny", "head"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_with_bf16_weights_and_fp32_statistics(encoder, momentum):
    """A bf16 model whose BN statistics stayed fp32 (DeepSpeed's cast) runs: before, torch's
    CPU batch norm raised "expected scalar type BFloat16 but found Float". Reference: torch's
    own BN in fp32 on the same bf16-rounded weights and input. Statistics stay fp32 and equal
    the reference's to 1% (they average bf16 activations); outputs within bf16 rounding of
    values up to ~4 (an ulp is 2^-6 there) plus the conv/linear's bf16 arithmetic; gradients
    reach the bf16 weights; in fp32 the forward is torch's, bit for bit."""
    torch.manual_seed(0)
    cfg = _cfg(encoder=encoder if encoder != "head" else "resnet_tiny", width=8, norm="batch")
    if encoder == "head":
        model, x = build_head(12, _cfg(proj_hidden_dim=16, proj_norm=True), 6), torch.randn(8, 12)
    else:
        model, x = build_encoder(cfg, 1, 16), torch.randn(4, 1, 16, 16)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    for m in bns:
        m.momentum = momentum
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())  # the reference starts from the same rounded weights
    ref = copy.deepcopy(model)
    _params_to(model, torch.bfloat16)
    x = x.bfloat16()
    for train in (True, True, False):  # two updates of the statistics, then evaluation
        model.train(train), ref.train(train)
        got, want = model(x), ref(x.float())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)
    for m, r in zip(bns, [m for m in ref.modules() if isinstance(m, type(bns[0]))], strict=True):
        assert m.running_mean.dtype == torch.float32 and int(m.num_batches_tracked) == 2
        torch.testing.assert_close(m.running_mean, r.running_mean, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(m.running_var, r.running_var, rtol=1e-2, atol=1e-3)
    model.train()
    model(x).float().square().sum().backward()
    assert all(m.weight.grad.dtype == torch.bfloat16 for m in bns)
    assert any(m.weight.grad.abs().sum() > 0 for m in bns)
    plain = copy.deepcopy(ref)  # fp32: the plain forward, as torch's
    torch_bn = {layers.BatchNorm1d: nn.BatchNorm1d, layers.BatchNorm2d: nn.BatchNorm2d}
    for m in plain.modules():
        m.__class__ = torch_bn.get(type(m), type(m))
    assert torch.equal(plain(x.float()), ref(x.float()))
