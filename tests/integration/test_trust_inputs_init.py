"""Damaged ``model.init_from`` folders and exports: each is one line naming the file,
exit 2, through the real CLI (``train --check``, which runs init_from, and ``eval --export``),
never a traceback, never a hang, and no weights read from outside the folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from test_export import run_for

from dist_contrast.export import export_run

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

WEIGHTS = Path("image") / "model.safetensors"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, digits_dir) -> Path:
    run = run_for(tmp_path_factory, digits_dir, 2)  # shared with test_export(_errors)
    return export_run(run, tmp_path_factory.mktemp("trust_init") / "export")[0]


class Payload:
    """Unpickling it creates a marker file: the weights must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _manifest(folder: Path, change: Callable[[dict], object]) -> None:
    path = folder / "export.json"
    manifest = json.loads(path.read_text())
    changed = change(manifest)
    path.write_text(json.dumps(manifest if changed is None else changed))


def _outside_copy(folder: Path) -> Path:
    """A copy of the image weights outside the export: intact, so only the path is wrong."""
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(folder / WEIGHTS, outside / "model.safetensors")
    return outside / "model.safetensors"


def _truncate(f: Path) -> str:
    data = (f / WEIGHTS).read_bytes()
    (f / WEIGHTS).write_bytes(data[: len(data) // 2])
    return f"{f / WEIGHTS} is truncated or not a safetensors file ("


def _pickle(f: Path) -> str:
    torch.save({"weight": Payload(f.parent / "MARKER")}, f / WEIGHTS)
    return f"{f / WEIGHTS} is truncated or not a safetensors file ("


def _fifo(f: Path) -> str:
    (f / WEIGHTS).unlink()
    os.mkfifo(f / WEIGHTS)
    return f"file {f / WEIGHTS} is not a regular file"


def _not_json(f: Path) -> str:
    (f / "export.json").write_text('{"towers": {"image": ')
    return f"{f / 'export.json'} is not valid JSON ("


def _not_mapping(f: Path) -> str:
    _manifest(f, lambda m: [m])
    return f"{f / 'export.json'} is not a JSON mapping (it holds a list)"


def _no_towers(f: Path) -> str:
    _manifest(f, lambda m: m.pop("towers") and None)
    return f"{f / 'export.json'} has no 'towers' mapping"


def _no_weights(f: Path) -> str:
    _manifest(f, lambda m: m["towers"]["image"].pop("weights") and None)
    return f"{f / 'export.json'}: tower 'image' names no weights file"


def _absolute(f: Path) -> str:
    outside = str(_outside_copy(f))
    _manifest(f, lambda m: m["towers"]["image"].update(weights=outside))
    return f"{f / 'export.json'}: tower 'image' names '{outside}', outside the folder {f}"


def _dotdot(f: Path) -> str:
    _outside_copy(f)
    _manifest(f, lambda m: m["towers"]["image"].update(weights="../outside/model.safetensors"))
    return f"{f / 'export.json'}: tower 'image' names '../outside/model.safetensors', outside"


def _link_out(f: Path) -> str:
    outside = _outside_copy(f)
    (f / WEIGHTS).unlink()
    (f / WEIGHTS).symlink_to(outside)
    where = f"{f / 'export.json'}: tower 'image': {f / WEIGHTS}"
    return f"{where} links to {outside.resolve()}, outside the export folder"


DAMAGE = {
    "truncated weights": _truncate,
    "pickle as weights": _pickle,
    "fifo as weights": _fifo,
    "export.json not JSON": _not_json,
    "export.json a list": _not_mapping,
    "no towers key": _no_towers,
    "tower without weights": _no_weights,
    "absolute weights path": _absolute,
    "weights path with ..": _dotdot,
    "weights linked outside": _link_out,
}


def _one_line(proc, expected: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-contrast: error: "), proc.stderr[-3000:]
    assert expected in lines[0], lines[0]


def _check(config: Path, init_from: str, run_dir: Path, *extra: str):
    args = ["train", "--config", str(config), f"model.init_from={init_from}"]
    return run_cli(*args, f"run.dir={run_dir}", *extra, "--check", timeout=120)


def test_the_intact_export_starts_a_run(export_dir, tmp_path):
    proc = _check(export_dir / "config.yaml", f"export:{export_dir}", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_export_is_one_line_in_init_from_and_eval(export_dir, tmp_path, case):
    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder, symlinks=True)
    expected = DAMAGE[case](folder)
    config = tmp_path / "config.yaml"
    shutil.copy(export_dir / "config.yaml", config)
    _one_line(_check(config, f"export:{folder}", tmp_path / "runs"), f"model.init_from: {expected}")
    data = f"{export_dir.parent}/no-shards-*.tar"
    _one_line(run_cli("eval", "--export", str(folder), "--data", data, timeout=120), expected)
    assert not (tmp_path / "MARKER").exists()


def _tiny_vit(folder: Path) -> None:
    """A random transformers ViTModel of vit_nano's shape, saved with save_pretrained."""
    config = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4)
    config.update(num_attention_heads=4, image_size=16, patch_size=4, num_channels=1)
    config.update(layer_norm_eps=1e-6)
    model = transformers.ViTModel(transformers.ViTConfig(**config), add_pooling_layer=False)
    model.save_pretrained(folder)


def _hf_truncated(f: Path) -> str:
    data = (f / "model.safetensors").read_bytes()
    (f / "model.safetensors").write_bytes(data[:1000])
    return f"{f / 'model.safetensors'} is truncated or not a safetensors file ("


def _hf_pickle(f: Path) -> str:
    torch.save({"weight": Payload(f.parent / "MARKER")}, f / "model.safetensors")
    return f"{f / 'model.safetensors'} is truncated or not a safetensors file ("


def _hf_config_not_json(f: Path) -> str:
    (f / "config.json").write_text("model_type: vit\n")
    return f"{f / 'config.json'} is not valid JSON ("


def _hf_config_a_list(f: Path) -> str:
    (f / "config.json").write_text('["vit"]')
    return f"{f / 'config.json'} is not a JSON mapping (it holds a list)"


def _hf_index_out(f: Path) -> str:
    (f / "model.safetensors").rename(f.parent / "elsewhere.safetensors")
    weight_map = {"embeddings.cls_token": "../elsewhere.safetensors"}
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    index = f / "model.safetensors.index.json"
    return f"{index}: weight_map names '../elsewhere.safetensors', outside the folder {f}"


HF_DAMAGE = {
    "truncated weights": _hf_truncated,
    "pickle as weights": _hf_pickle,
    "config.json not JSON": _hf_config_not_json,
    "config.json a list": _hf_config_a_list,
    "index leading out": _hf_index_out,
}


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trust_hf") / "vit"
    _tiny_vit(folder)
    return folder


def _moco_vit(digits_dir: Path) -> list[str]:
    return [
        "model.encoder=vit_nano",
        f"data.train_shards={digits_dir}/train-*.tar",
        "data.val_shards=",
    ]


def test_the_intact_hf_folder_starts_a_run(hf_vit, digits_dir, tmp_path):
    config = ROOT / "configs/moco_v3_digits.yaml"
    proc = _check(config, f"hf:{hf_vit}", tmp_path, *_moco_vit(digits_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("case", list(HF_DAMAGE))
def test_a_damaged_hf_folder_is_one_line(hf_vit, digits_dir, tmp_path, case):
    folder = tmp_path / "vit"
    shutil.copytree(hf_vit, folder)
    expected = HF_DAMAGE[case](folder)
    config = ROOT / "configs/moco_v3_digits.yaml"
    proc = _check(config, f"hf:{folder}", tmp_path / "runs", *_moco_vit(digits_dir))
    _one_line(proc, f"model.init_from: {expected}")
    assert not (tmp_path / "MARKER").exists()


def test_pickle_payload_is_real(tmp_path):
    """The payload above does create its marker when unpickled (so its absence means
    something): checked with pickle itself, never with the code under test."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "MARKER")))
    assert (tmp_path / "MARKER").exists()
