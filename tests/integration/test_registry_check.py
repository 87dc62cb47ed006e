"""One registry: every method/loss mismatch, and a method whose samples lack what it needs, is
refused by ``train --check`` in one line before any process group starts."""

from __future__ import annotations

import io
import typing

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dist_contrast.config.schema import LossConfig
from dist_contrast.errors import ConfigError
from dist_contrast.methods import registry

from conftest import config_from_dict, run_cli


def _all_losses() -> list[str]:
    return list(typing.get_args(typing.get_type_hints(LossConfig)["name"]))


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_every_loss_a_method_does_not_train_with_is_refused(method):
    entry = registry.METHODS[method]
    for loss in _all_losses():
        tree = {"method": {"name": method}, "loss": {"name": loss}}
        if entry.image_text:
            tree["data"] = {"tokenizer": "bytes", "require_caption": True, "views": 1}
        cfg = config_from_dict(tree)
        if loss in entry.losses:
            assert registry.check(cfg) is entry
            continue
        with pytest.raises(ConfigError, match=f"method '{method}' does not train with"):
            registry.check(cfg)


def test_an_unknown_method_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'moco_v2'"):
        registry.check(config_from_dict({"method": {"name": "mocov2"}}))


@pytest.fixture(scope="module")
def bare_shards(tmp_path_factory):
    """Shards whose samples carry an image and a caption only: no label, no index."""
    out = tmp_path_factory.mktemp("bare")
    with wds.TarWriter(str(out / "train-000000.tar")) as w:
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(buf, format="PNG")
            w.write({"__key__": f"s{i:04d}", "png": buf.getvalue(), "txt": f"picture {i}"})
    return out


def _check(*overrides: str, cwd):
    return run_cli(
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        "--check",
        "run.dir=" + str(cwd),
        *overrides,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.name=moco_v2"], "method 'moco_v2' does not train with loss.name='ntxent'"),
        (["loss.name=byol"], "method 'simclr' does not train with loss.name='byol'"),
        (["loss.name=triplet"], "method 'simclr' does not train with loss.name='triplet'"),
        (["loss.name=supcon"], "method 'simclr' does not train with loss.name='supcon'"),
        (["method.name=clip", "loss.name=ntxent"], "method 'clip' does not train with"),
        (["method.name=dcl", "loss.name=dcl", "loss.memory_efficient=true"], "not available"),
    ],
)
def test_train_check_refuses_a_mismatch_in_one_line(overrides, message, digits_dir, tmp_path):
    data = [
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
    ]
    run = _check(*data, *overrides, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr


@pytest.mark.parametrize(
    ("overrides", "needs"),
    [
        (["method.name=supcon", "loss.name=supcon"], "a class label"),
        (["method.name=metric", "loss.name=triplet"], "a class label"),
        (["method.name=instdisc", "loss.name=nce", "method.bank_size=4"], "data set index"),
    ],
)
def test_train_check_refuses_samples_without_what_the_method_needs(
    overrides, needs, bare_shards, digits_dir, tmp_path
):
    data = [
        f"data.train_shards={bare_shards}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
    ]
    run = _check(*data, *overrides, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and needs in lines[0] and "first sample" in lines[0], run.stderr
    ok = _check(*data, "method.name=simclr", cwd=tmp_path)  # SimCLR needs neither
    assert ok.returncode == 0, ok.stderr
