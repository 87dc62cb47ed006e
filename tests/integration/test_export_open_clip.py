"""``dist-contrast export --format open_clip``. A digits ViT CLIP run (grey images, the run's BPE)
trained, evaluated and exported, the folder moved; then, in open_clip's own environment
(marker open_clip) and without importing dist_contrast, ``create_model_and_transforms`` and
``get_tokenizer`` on ``local-dir:`` give our features on the same PNG images and captions
(within 1e-5), and zero-shot top-1 over the validation shards, computed there from the raw
shards with the run's class names and templates, equals our eval.json's, as does
``clip_benchmark eval`` on the shards laid out as a CLIP_benchmark set. Here: the name tables
turn around exactly, and what open_clip cannot hold is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dist_contrast.export import ExportError, ExportOptions, export_run, load_clip
from dist_contrast.models.open_clip import from_open_clip, to_open_clip

from conftest import needs_open_clip, run_cli, run_open_clip

# In open_clip's environment: argv = folder, images dir, captions json, eval json, val shards
# json, out .pt. Prints zero-shot top-1 as JSON.
OPEN_CLIP_SIDE = r"""
import io, json, sys, tarfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

folder, images, captions, ev, shards, out = sys.argv[1:]
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
model.eval()
pngs = sorted(Path(images).glob("*.png"))
with torch.no_grad():
    x = torch.stack([preprocess(Image.open(p)) for p in pngs])
    text = tokenizer(json.loads(captions))
    feats = {"image": model.encode_image(x), "text": model.encode_text(text)}
    ev = json.loads(ev)
    classes = []
    for name in ev["classes"]:
        prompts = tokenizer([t.format(name) for t in ev["templates"]])
        classes.append(F.normalize(F.normalize(model.encode_text(prompts), dim=1).mean(0), dim=0))
    classes = torch.stack(classes)
    correct = total = 0
    for shard in json.loads(shards):
        samples = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key in sorted(samples):
            s = samples[key]
            image = preprocess(Image.open(io.BytesIO(s["png"])))[None]
            pred = (F.normalize(model.encode_image(image), dim=1) @ classes.T).argmax(1)
            correct += int(pred.item() == int(s["cls"]))
            total += 1
torch.save(feats, out)
assert not any(m.startswith("dist_contrast") for m in sys.modules), "dist_contrast imported"
print(json.dumps({"zeroshot_top1": correct / total, "samples": total}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_dir, digits_tokenizer):
    tmp = tmp_path_factory.mktemp("oc_run")
    overrides = [
        f"run.dir={tmp}",
        "run.name=vit_clip",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
        f"data.tokenizer_path={digits_tokenizer}",
        "data.num_workers=0",
        "train.steps=150",
        "train.batch_size=64",
        "train.warmup_steps=20",
        "deepspeed.zero_stage=0",
        "logging.wandb=false",
        "logging.progress=false",
        "logging.plots=false",
    ]
    proc = run_cli("train", "--config", "configs/clip_vit_digits.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("eval", "--run", str(tmp / "vit_clip"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "vit_clip"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The run exported with --format open_clip, then moved: nothing in it points back."""
    tmp = tmp_path_factory.mktemp("oc_export")
    export_run(run, tmp / "written", ExportOptions(format="open_clip"))
    folder = tmp / "elsewhere" / "model"
    folder.parent.mkdir()
    shutil.move(tmp / "written", folder)
    return folder


@pytest.mark.open_clip
@needs_open_clip
def test_open_clip_alone_gives_our_features_and_zero_shot(run, exported, digits_dir, tmp_path):
    folder = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # ours: the native export's loader, on the same PNG files and captions
    native, _ = export_run(run, tmp_path / "native", ExportOptions())
    clip = load_clip(native)
    import tarfile

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(sorted(digits_dir.glob("val-*.tar"))[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".png")][:6]
        for i, m in enumerate(members):
            (images / f"{i}.png").write_bytes(tar.extractfile(m).read())
    pngs = [Image.open(p) for p in sorted(images.glob("*.png"))]
    captions = ["a sketch of a seven", "the digit 0", "a low resolution three", "9"]
    with torch.no_grad():
        # the joint space before normalising, as open_clip's encode_* give it
        ours = {
            "image": clip.image(clip.preprocess(pngs)),
            "text": clip.text(clip.tokenizer(captions)),
        }
    cfg = json.loads((run / "eval.json").read_text())
    from dist_contrast.config import load_config

    ev = load_config(run / "config.yaml").eval
    shards = sorted(str(p) for p in digits_dir.glob("val-*.tar"))
    out = tmp_path / "theirs.pt"
    stdout = run_open_clip(
        "-c",
        OPEN_CLIP_SIDE,
        str(folder),
        str(images),
        json.dumps(captions),
        json.dumps({"classes": ev.zeroshot_classes, "templates": ev.zeroshot_templates}),
        json.dumps(shards),
        str(out),
    )
    result = json.loads(stdout.strip().splitlines()[-1])
    theirs = torch.load(out, weights_only=True)
    for kind in ("image", "text"):
        scale = ours[kind].abs().max().item()
        assert (theirs[kind] - ours[kind]).abs().max().item() <= 1e-5 * max(1.0, scale), kind
    assert result["samples"] == cfg["val_samples"]
    assert result["zeroshot_top1"] == cfg["zeroshot_top1"]


@pytest.mark.open_clip
@needs_open_clip
def test_clip_benchmark_eval_gives_our_zero_shot(run, exported, digits_dir, tmp_path):
    """``clip_benchmark eval`` (the clip-benchmark package's command) on the export and the
    validation shards laid out as a CLIP_benchmark webdataset set, with the run's class names
    and templates: its top-1 is our eval.json's."""
    from dist_contrast.config import load_config

    ev = load_config(run / "config.yaml").eval
    root = tmp_path / "wds_digits"
    (root / "test").mkdir(parents=True)
    shards = sorted(digits_dir.glob("val-*.tar"))
    for i, shard in enumerate(shards):
        shutil.copyfile(shard, root / "test" / f"{i}.tar")
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    (root / "classnames.txt").write_text("\n".join(ev.zeroshot_classes) + "\n")
    templates = [t.replace("{}", "{c}") for t in ev.zeroshot_templates]
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp_path / "result.json"
    run_open_clip(
        "eval",
        "--model_type",
        "open_clip",
        "--model",
        f"local-dir:{exported}",
        "--pretrained",
        "none",
        "--dataset",
        "wds/digits",
        "--dataset_root",
        str(root),
        "--task",
        "zeroshot_classification",
        "--no_amp",
        "--num_workers",
        "0",
        "--output",
        str(out),
        program="clip_benchmark",
    )
    theirs = json.loads(out.read_text())["metrics"]["acc1"]
    ours = json.loads((run / "eval.json").read_text())
    n = ours["val_samples"]
    assert round(theirs * n) == round(ours["zeroshot_top1"] * n)
    assert theirs == pytest.approx(ours["zeroshot_top1"], abs=1e-6)


def test_names_turn_around_exactly(digits_tokenizer):
    from dist_contrast.config import load_config
    from dist_contrast.methods import build_method

    overrides = ["loss.name=siglip", f"data.tokenizer_path={digits_tokenizer}"]
    method = build_method(load_config("configs/clip_vit_digits.yaml", overrides))
    state = method.state_dict()
    theirs = to_open_clip(state, max_scale=None)
    assert theirs["visual.conv1.weight"].shape[1] == 3  # a grey run's, made RGB
    assert theirs["logit_scale"].shape == theirs["logit_bias"].shape == ()  # SigLIP's bias
    back = from_open_clip(theirs, channels=1)
    assert set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_what_open_clip_cannot_hold_is_refused(tmp_path, digits_dir):
    proc = run_cli(
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
        "data.val_shards=",
        "data.num_workers=0",
        "train.steps=1",
        "train.batch_size=8",
        "deepspeed.zero_stage=0",
        "logging.wandb=false",
        "logging.progress=false",
        "logging.plots=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.raises(ExportError, match="needs an image-text run"):
        export_run(tmp_path / "simclr_digits", tmp_path / "x", ExportOptions(format="open_clip"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="--torchscript and --onnx go with --format native"):
        ExportOptions(format="open_clip", onnx=True).check()


SIGLIP_SIDE = r"""
import sys

import open_clip
import torch

folder, inputs, out = sys.argv[1:]
model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
x = torch.load(inputs, weights_only=True)
with torch.no_grad():
    torch.save(
        {
            "image": model.encode_image(x["image"]),
            "text": model.encode_text(x["tokens"]),
            "logit_scale": model.logit_scale.detach(),
            "logit_bias": model.logit_bias.detach(),
        },
        out,
    )
"""


@pytest.mark.open_clip
@needs_open_clip
def test_siglip_keeps_its_logit_bias_in_open_clip(digits_tokenizer, tmp_path):
    from dist_contrast.config import load_config
    from dist_contrast.data.tokenizer import tokenizer_for
    from dist_contrast.export.open_clip import write_open_clip
    from dist_contrast.methods import build_method

    cfg = load_config(
        "configs/clip_vit_digits.yaml",
        ["loss.name=siglip", "loss.init_bias=-7.5", f"data.tokenizer_path={digits_tokenizer}"],
    )
    torch.manual_seed(0)
    method = build_method(cfg).eval()
    write_open_clip(method, cfg, tmp_path)
    tokens = tokenizer_for(cfg.data)(["a sketch of a seven", "the digit 0"])
    image = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(
        {"image": image.expand(-1, 3, -1, -1).contiguous(), "tokens": tokens}, tmp_path / "x.pt"
    )
    run_open_clip("-c", SIGLIP_SIDE, str(tmp_path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"))
    theirs = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        ours = {"image": method.image(image), "text": method.text(tokens)}
    for kind in ("image", "text"):
        assert (theirs[kind] - ours[kind]).abs().max().item() <= 1e-5, kind
    assert theirs["logit_bias"].item() == pytest.approx(-7.5)
    assert theirs["logit_scale"].item() == pytest.approx(method.criterion.logit_scale.item())
