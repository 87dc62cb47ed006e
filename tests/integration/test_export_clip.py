"""Export of an image-text (CLIP) run: image, text and heads towers, the BPE tokenizer copied in
(the export loads without the original file), TorchScript and ONNX of the text encoder (int64
token ids); compared with the trained method."""

from __future__ import annotations

import json

import torch
from test_export import assert_formats_match

from dist_contrast.export import ExportOptions, export_run, load_encoder
from dist_contrast.export.write import trained_method
from dist_contrast.train.runs import load_run

from conftest import run_cli


def test_clip_run_exports_image_text_and_heads(tmp_path):
    from dist_contrast.data.tokenizer import train_bpe_from_shards
    from dist_contrast.data.write.digits import write_digits

    digits = tmp_path / "digits"
    write_digits(digits, shard_size=200)  # with captions (the conftest shards may predate them)
    bpe = tmp_path / "bpe.json"
    train_bpe_from_shards(f"{digits}/train-*.tar", 300)[0].save(bpe)
    args = {
        "run.dir": tmp_path,
        "data.train_shards": f"{digits}/train-*.tar",
        "data.val_shards": f"{digits}/val-*.tar",
        "train.steps": 1,
        "train.batch_size": 16,
        "train.warmup_steps": 0,
        "data.views": 1,
        "data.tokenizer": "bpe",
        "data.tokenizer_path": bpe,
        "data.context_length": 32,
        "data.require_caption": "true",
        "method.name": "clip",
        "method.queues": "false",
        "loss.name": "clip",
        "text.width": 32,
        "text.layers": 1,
        "text.heads": 2,
        "deepspeed.zero_stage": 0,
        "logging.wandb": "false",
        "logging.progress": "false",
        "logging.plots": "false",
    }
    overrides = [f"{k}={v}" for k, v in args.items()]
    proc = run_cli("train", "--config", "configs/simclr_digits.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "simclr_digits"
    out, manifest = export_run(run, tmp_path / "export", ExportOptions(torchscript=True, onnx=True))
    assert list(manifest["towers"]) == ["image", "text", "heads"]
    assert manifest["tokenizer"] == {"kind": "bpe", "context_length": 32, "file": "tokenizer.json"}
    assert (out / "tokenizer.json").read_text() == bpe.read_text()
    assert set(manifest["towers"]["heads"]["modules"]) >= {"image_proj", "text_proj"}

    method = trained_method(*load_run(run))
    bpe.unlink()  # the export carries its own copy
    text = load_encoder(out, tower="text")
    assert text.preprocess is None and text.tokenizer.context_length == 32
    assert text.tokenizer.vocab_size == 300
    captions = ["a photo of the digit 3", "a handwritten seven", "9"]
    ids = text.tokenizer(captions)
    with torch.no_grad():
        want = method.text.encoder(ids)
        assert torch.equal(text.module(ids), want)
        assert torch.equal(text.embed(captions), want)
    assert_formats_match(out / "text", "tokens", ids, want)
    heads = load_encoder(out, tower="heads").module
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        image = load_encoder(out).module(x)
        assert torch.equal(heads["image_proj"](image), method.image.proj(method.image.encoder(x)))
    info = json.loads((out / "export.json").read_text())["towers"]["text"]
    assert info["input"] == {"dtype": "int64", "shape": ["batch", 32]}
