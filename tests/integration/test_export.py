"""Export: 2-rank runs under ZeRO 0, 2 and 3 -> safetensors per tower -> load_encoder, TorchScript,
ONNX, and ``eval --export``; compared with the checkpoint files and the training-side encoder."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dist_contrast.config import load_config
from dist_contrast.data.pipeline import read_captioned
from dist_contrast.data.shards import resolve_shards
from dist_contrast.eval.run import evaluate_run
from dist_contrast.export import ExportOptions, export_run, load_encoder
from dist_contrast.export.write import trained_method
from dist_contrast.methods import build_method

from conftest import ROOT, cli_env, run_cli, run_torchrun

CONFIG = "configs/simclr_digits.yaml"
STEP = "step_00000002"


@functools.cache
def trained_run(root: str, digits: str, stage: int) -> Path:
    """A tiny SimCLR run on 2 ranks under ZeRO ``stage``: 2 steps, batches of 16, width 8.
    Cached per test session, so both export test modules share the runs."""

    args = {
        "run.dir": root,
        "run.name": f"zero{stage}",
        "data.train_shards": f"{digits}/train-*.tar",
        "data.val_shards": f"{digits}/val-*.tar",
        "train.steps": 2,
        "train.batch_size": 16,
        "train.warmup_steps": 1,
        "checkpoint.every": 2,
        "model.width": 8,
        "model.proj_hidden_dim": 32,
        "model.proj_dim": 16,
        "deepspeed.zero_stage": stage,
        "logging.wandb": "false",
        "logging.progress": "false",
        "logging.plots": "false",
    }
    proc = run_torchrun(2, "train", "--config", CONFIG, *[f"{k}={v}" for k, v in args.items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(root) / f"zero{stage}"


def run_for(tmp_path_factory, digits_dir, stage: int) -> Path:
    return trained_run(str(tmp_path_factory.getbasetemp() / "export_runs"), str(digits_dir), stage)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir) -> dict[int, Path]:
    return {s: run_for(tmp_path_factory, digits_dir, s) for s in (0, 2, 3)}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[int, Path]:
    """Each run exported once; ZeRO-3's with TorchScript and ONNX too."""
    out = tmp_path_factory.mktemp("exports")
    opts = {0: ExportOptions(), 2: ExportOptions(), 3: ExportOptions(torchscript=True, onnx=True)}
    return {s: export_run(runs[s], out / f"zero{s}", opts[s])[0] for s in runs}


def val_images(digits_dir: Path, n: int) -> list[Image.Image]:
    """The first ``n`` images of the first validation shard, decoded straight from the tar."""
    out = []
    with tarfile.open(sorted(digits_dir.glob("val-*.tar"))[0]) as tar:
        for member in tar:
            if member.name.endswith(".png") and len(out) < n:
                out.append(Image.open(tar.extractfile(member)).copy())
    return out


def test_zero_stages_export_the_same_weights(runs, exported):
    """ZeRO 0, 2 and 3 of the same 2-rank training export the same fp32 towers; for ZeRO 0
    and 2 they are the whole module DeepSpeed saved in mp_rank_00_model_states.pt; and they
    are the trained weights, not the initial ones."""
    towers = {
        s: {t: load_file(str(exported[s] / t / "model.safetensors")) for t in ("image", "heads")}
        for s in runs
    }
    for s in (2, 3):
        for tower, tensors in towers[s].items():
            assert tensors.keys() == towers[0][tower].keys()
            for key, value in tensors.items():
                assert value.dtype == torch.float32
                torch.testing.assert_close(value, towers[0][tower][key], rtol=0, atol=1e-6)
    for s in (0, 2):
        blob = torch.load(
            runs[s] / "checkpoints" / STEP / "mp_rank_00_model_states.pt", weights_only=False
        )
        module = blob["module"]
        assert {f"encoder.{k}" for k in towers[s]["image"]} | set(towers[s]["heads"]) == set(module)
        for key, value in towers[s]["image"].items():
            assert torch.equal(value, module[f"encoder.{key}"].float())
        for key, value in towers[s]["heads"].items():
            assert torch.equal(value, module[key].float())
    cfg = load_config(runs[0] / "config.yaml")
    torch.manual_seed(cfg.run.seed)
    init = build_method(cfg).encoder.state_dict()
    moved = [k for k, v in towers[3]["image"].items() if not torch.equal(v, init[k])]
    assert len(moved) == len(init)  # every tensor changed in 2 AdamW steps
    manifest = json.loads((exported[3] / "export.json").read_text())
    assert manifest["world_size"] == 2 and manifest["checkpoint"] == STEP
    assert manifest["towers"]["image"]["parameters"] == sum(v.numel() for v in init.values())
    assert manifest["towers"]["heads"]["modules"] == ["projector"]


def test_loaded_encoder_equals_training_encoder(runs, exported, digits_dir):
    """load_encoder's module gives the training-side encoder's outputs (the checkpoint loaded
    into the whole method) on the same images, and its preprocess makes the images exactly as
    evaluation reads them, from PIL images, uint8 HWC arrays and tensors alike."""
    cfg = load_config(runs[2] / "config.yaml")
    reference = trained_method(cfg, runs[2] / "checkpoints" / STEP).encoder.eval()
    enc = load_encoder(exported[2])
    assert not enc.module.training and enc.tokenizer is None
    urls = resolve_shards(str(digits_dir / "val-*.tar"))[:1]
    x, _ = read_captioned(urls, cfg.data, require_caption=False)[:2]
    with torch.no_grad():
        assert torch.equal(enc.module(x), reference(x))
    pil = val_images(digits_dir, 8)
    assert torch.equal(enc.preprocess(pil), x[:8])
    assert torch.equal(enc.preprocess([np.asarray(im) for im in pil]), x[:8])
    assert torch.equal(enc.preprocess(pil[0]), x[:1])
    unit = x[:8] * 0.5 + 0.5  # float pixels in [0, 1] at the encoder's size: normalised only
    torch.testing.assert_close(enc.preprocess(unit), x[:8])
    assert torch.equal(enc.embed(pil), reference(x[:8]).detach())


def assert_formats_match(tower_dir: Path, input_name: str, x: torch.Tensor, want: torch.Tensor):
    """The tower's TorchScript (1e-5) and ONNX Runtime (1e-4) outputs equal ``want`` on ``x``."""
    import onnxruntime as ort

    scripted = torch.jit.load(str(tower_dir / "model.pt"))
    torch.testing.assert_close(scripted(x), want, rtol=1e-5, atol=1e-5)
    sess = ort.InferenceSession(str(tower_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {input_name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


def test_torchscript_and_onnx_match_the_module(exported, digits_dir):
    folder = exported[3]
    enc = load_encoder(folder / "image")  # a tower folder names its tower
    x = enc.preprocess(val_images(digits_dir, 5))
    with torch.no_grad():
        want = enc.module(x)
    assert_formats_match(folder / "image", "images", x, want)
    info = json.loads((folder / "export.json").read_text())["towers"]["image"]
    assert info["torchscript"] == "image/model.pt" and info["onnx"] == "image/model.onnx"
    assert info["output_dim"] == want.shape[1]


NO_DEEPSPEED = """
import importlib.abc, sys, torch

class NoDeepSpeed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError("deepspeed is not installed here")

sys.meta_path.insert(0, NoDeepSpeed())
try:
    import deepspeed  # noqa: F401
    raise SystemExit("deepspeed imported")
except ImportError:
    pass
from dist_contrast.export import load_encoder

enc = load_encoder(sys.argv[1])
with torch.no_grad():
    torch.save(enc.module(torch.load(sys.argv[2])), sys.argv[3])
assert not any(m.split(".")[0] == "deepspeed" for m in sys.modules)
"""


def test_load_encoder_without_deepspeed(exported, tmp_path):
    x = torch.randn(4, 1, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    cmd = [
        sys.executable,
        "-c",
        NO_DEEPSPEED,
        str(exported[0]),
        str(tmp_path / "x.pt"),
        str(tmp_path / "y.pt"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        want = load_encoder(exported[0]).module(x)
    assert torch.equal(torch.load(tmp_path / "y.pt"), want)


def _json_head(stdout: str) -> dict:
    return json.loads(stdout[: stdout.rindex("}") + 1])


def test_cli_export_then_eval_reproduces_the_run_eval(runs, digits_dir, tmp_path):
    """``eval --export`` on the run's own train/val shards gives the figures ``eval --run``
    wrote to eval.json, and the export's README card carries them."""
    run = runs[2]
    result = evaluate_run(run)
    out = tmp_path / "export"
    proc = run_cli("export", "--run", str(run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image (" in proc.stdout and str(out) in proc.stdout
    card = (out / "README.md").read_text()
    assert f"| kNN top-1 | {100 * result['knn_top1']:.1f}% |" in card
    assert "ZeRO-2" in card and "16 per rank x 2 rank(s)" in card
    proc = run_cli(
        "eval",
        "--export",
        str(out),
        "--data",
        f"{digits_dir}/train-*.tar",
        "--val-data",
        f"{digits_dir}/val-*.tar",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _json_head(proc.stdout)
    assert (got["train_samples"], got["val_samples"]) == (
        result["train_samples"],
        result["val_samples"],
    )
    assert got["knn_top1"] == result["knn_top1"]
    assert got["linear_top1"] == pytest.approx(result["linear_top1"], abs=1e-9)
