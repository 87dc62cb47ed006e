"""Our ResNets as transformers' ResNetModel: same outputs after save/load, exact round trip of
the state dict, and a one-line NotMappable naming the fix where no exact layout exists."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from dist_contrast.config import ModelConfig  # noqa: E402
from dist_contrast.models import build_encoder  # noqa: E402
from dist_contrast.models.hf_resnet import (  # noqa: E402
    NotMappable,
    resnet_from_hf,
    resnet_hf_config,
    resnet_to_hf,
)

IMAGE = 32


def _encoder(name: str, in_channels: int, **kw) -> nn.Module:
    spec = ModelConfig(**{"encoder": name, "width": 8, "stem": "imagenet", "norm": "batch", **kw})
    return build_encoder(spec, in_channels, IMAGE)


def _randomise(enc: nn.Module, in_channels: int) -> nn.Module:
    """Non-trivial batch-norm affine parameters and running statistics (the zero-initialised
    residual scales included), then eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    enc.train()
    with torch.no_grad():
        for _ in range(3):
            enc(torch.randn(4, in_channels, IMAGE, IMAGE) * 2 + 0.5)
    return enc.eval()


def _hf_model(cfg: dict):
    return transformers.ResNetModel(transformers.ResNetConfig(**cfg))


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_same_output_after_save_and_load(name, in_channels, tmp_path):
    enc = _randomise(_encoder(name, in_channels), in_channels)
    hf = _hf_model(resnet_hf_config(enc, in_channels))
    hf.load_state_dict(resnet_to_hf(enc), strict=True)
    hf.save_pretrained(tmp_path)
    loaded, info = transformers.ResNetModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    loaded.eval()
    x = torch.randn(2, in_channels, IMAGE, IMAGE)
    with torch.no_grad():
        ours = enc(x)
        theirs = loaded(pixel_values=x).pooler_output.flatten(1)
    assert theirs.shape == ours.shape == (2, enc.out_dim)
    assert (theirs - ours).abs().max().item() < 1e-5
    bn = loaded.embedder.embedder.normalization
    assert torch.equal(bn.running_mean, enc.stem[1].running_mean)
    assert bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_round_trip_and_init_from_hf(name):
    enc = _randomise(_encoder(name, 3), 3)
    original = enc.state_dict()
    back = resnet_from_hf(enc, resnet_to_hf(enc))
    assert back.keys() == original.keys()
    for k, t in original.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k

    # a ResNetForImageClassification's weights ("resnet." prefix, classifier ignored)
    cfg = resnet_hf_config(enc, 3)
    clf = transformers.ResNetForImageClassification(transformers.ResNetConfig(**cfg)).eval()
    fresh = _encoder(name, 3)
    fresh.load_state_dict(resnet_from_hf(fresh, clf.state_dict()), strict=True)
    fresh.eval()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = clf.resnet(pixel_values=x).pooler_output.flatten(1)
        assert (fresh(x) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("name", "kw", "fix"),
    [
        ("resnet18", {"norm": "group"}, "model.norm=batch"),
        ("resnet50", {"norm": "none"}, "model.norm=batch"),
        ("resnet18", {"stem": "small"}, "model.stem=imagenet"),
        ("resnet_tiny", {}, "model.stem=imagenet"),
    ],
)
def test_not_mappable_names_the_fix(name, kw, fix):
    enc = _encoder(name, 3, **kw)
    for call in (lambda: resnet_hf_config(enc, 3), lambda: resnet_to_hf(enc)):
        with pytest.raises(NotMappable) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and fix in message, message


def test_wrong_state_or_channels_refused():
    enc = _encoder("resnet18", 3)
    with pytest.raises(ValueError, match="channels"):
        resnet_hf_config(enc, 1)
    other = resnet_to_hf(_encoder("resnet50", 3))
    with pytest.raises(ValueError, match="not this encoder's ResNetModel state"):
        resnet_from_hf(enc, other)
