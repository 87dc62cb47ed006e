"""``load_encoder`` builds only the tower asked for: in a process where importing DeepSpeed,
WebDataset, wandb and kornia fails, the export of every method loads and embeds exactly what
the method's own towers give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_contrast.export.write import ExportOptions, write_method
from dist_contrast.methods import METHODS, build_method
from dist_contrast.train.runs import resolve

from conftest import cli_env, config_from_dict

LOSS = {
    "simclr": "ntxent",
    "dcl": "dcl",
    "moco_v2": "infonce",
    "moco_v3": "infonce",
    "byol": "byol",
    "instdisc": "nce",
    "supcon": "supcon",
    "metric": "triplet",
    "clip": "clip",
}
BLOCKED = ("deepspeed", "webdataset", "wandb", "kornia")

# Runs in a fresh interpreter: imports of BLOCKED raise; every tower of the export is loaded and
# embeds the inputs saved beside it; the outputs go to out.pt, the modules imported to stdout.
CHILD = """
import builtins, json, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in {blocked!r}:
        raise ImportError("blocked in this test: " + name)
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
import torch
from dist_contrast.export import load_encoder
folder, inputs = sys.argv[1], torch.load(sys.argv[2])
out = {{}}
for tower, x in inputs.items():
    enc = load_encoder(folder, tower)
    with torch.no_grad():
        out[tower] = enc.module(x)
heads = load_encoder(folder, "heads").module
out["heads"] = {{k: v.clone() for k, v in heads.state_dict().items()}}
torch.save(out, sys.argv[3])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})))
"""


def _method(name: str, digits: Path, tokenizer: Path):
    tree = {
        "method": {"name": name},
        "loss": {"name": LOSS[name]},
        "data": {"train_shards": f"{digits}/train-*.tar", "val_shards": f"{digits}/val-*.tar"},
    }
    if name == "clip":
        tree["data"].update(
            views=1, tokenizer="bpe", tokenizer_path=str(tokenizer), require_caption=True
        )
    cfg = resolve(config_from_dict(tree))
    torch.manual_seed(7)
    method = build_method(cfg)
    with torch.no_grad():  # weights unlike a fresh build's: a load must really read them
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return cfg, method.eval()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_exports_towers_that_load_alone(name, digits_dir, digits_tokenizer, tmp_path):
    cfg, method = _method(name, digits_dir, digits_tokenizer)
    folder = tmp_path / "export"
    folder.mkdir()
    source = {"run": "test", "checkpoint": "step_00000001", "step": 1, "world_size": 1}
    write_method(method, cfg, folder, ExportOptions(), source, tmp_path)
    towers = method.towers()
    inputs = {"image": torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))}
    if "text" in towers:
        inputs["text"] = torch.randint(1, 50, (3, cfg.data.context_length))
        inputs["text"][:, -1] = towers["text"].eot_id
    torch.save(inputs, tmp_path / "in.pt")
    script = CHILD.format(blocked=BLOCKED)
    run = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path / "in.pt"), str(tmp_path / "o")],
        env=cli_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    got = torch.load(tmp_path / "o")
    with torch.no_grad():
        for tower, x in inputs.items():
            assert torch.equal(got[tower], towers[tower](x)), tower
    want = towers["heads"].state_dict()
    assert got["heads"].keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got["heads"][key], value), key
