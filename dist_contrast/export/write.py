"""``dist-contrast export``: a run's latest checkpoint -> fp32 safetensors per tower.

The checkpoint is consolidated whatever its ZeRO stage and world size
(:func:`dist_contrast.train.checkpoint.load_model_state`), loaded with strict shape checks into the
method its config builds, and each of :meth:`Method.towers` is written on its own. Everything
goes into a temporary directory beside ``out`` that is renamed at the end: a failed export
leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dist_contrast.config import Config, save_config
from dist_contrast.data.tokenizer import tokenizer_for
from dist_contrast.errors import CheckpointError
from dist_contrast.export.card import write_card
from dist_contrast.export.formats import write_onnx, write_torchscript
from dist_contrast.export.hf import CONFIG_JSON as HF_CONFIG_JSON
from dist_contrast.export.hf import hf_usage, write_hf
from dist_contrast.export.layout import (
    CONFIG_YAML,
    EXPORT_JSON,
    FORMAT,
    TOKENIZER_JSON,
    VERSION,
    WEIGHTS,
    ExportError,
    check_state,
    example_input,
    tower_kind,
)
from dist_contrast.export.open_clip import WEIGHTS as OPEN_CLIP_WEIGHTS
from dist_contrast.export.open_clip import open_clip_usage, write_open_clip
from dist_contrast.methods import build_method
from dist_contrast.train import checkpoint, integrity
from dist_contrast.train.runs import run_config

FORMATS = ("native", "hf", "open_clip")


@dataclass
class ExportOptions:
    torchscript: bool = False  # <tower>/model.pt (traced) for encoder towers
    onnx: bool = False  # <tower>/model.onnx for encoder towers
    force: bool = False  # replace an existing export at ``out``
    # "native": this package's layout (load_encoder, load_clip); "hf": a folder transformers
    # loads as it is (CLIPModel, SiglipModel, ViTModel, CLIPVisionModel, SiglipVisionModel,
    # ResNetModel; export/hf.py);
    # "open_clip": one open_clip loads as it is ("local-dir:"; export/open_clip.py)
    format: str = "native"
    step: int | None = None  # the checkpoint of this step (default: the run's latest)

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ExportError(f"unknown export format {self.format!r}; choose one of {FORMATS}")
        if self.format != "native" and (self.torchscript or self.onnx):
            raise ExportError("--torchscript and --onnx go with --format native")


def consolidated_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict of ``step_dir`` (any ZeRO stage); DeepSpeed's progress output is
    kept off the console, its failures become one line."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return checkpoint.load_model_state(step_dir)
    except CheckpointError:
        raise
    except Exception as exc:  # DeepSpeed / torch.load on damaged files raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"cannot read the checkpoint in {step_dir}: {first}") from None


def trained_method(cfg: Config, step_dir: Path) -> nn.Module:
    """The run's method with the checkpoint's weights, checked key by key."""
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    check_state(method, consolidated_state(step_dir), f"checkpoint {step_dir}")
    return method.eval()


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in module.state_dict().items()
    }


@torch.no_grad()
def _write_tower(name: str, module: nn.Module, cfg: Config, tok, folder: Path, opts) -> dict:
    from safetensors.torch import save_file

    folder.mkdir()
    tensors = _tensors(module)
    save_file(tensors, str(folder / WEIGHTS), metadata={"tower": name, "format": "pt"})
    kind = tower_kind(name)
    entry: dict = {
        "kind": kind,
        "weights": f"{name}/{WEIGHTS}",
        "parameters": sum(p.numel() for p in module.parameters()),
        "tensors": len(tensors),
        "class": type(module).__name__,
    }
    if kind == "weights":
        entry["modules"] = sorted(n for n, _ in module.named_children())
        return entry
    x = example_input(kind, cfg, tok)
    entry["output_dim"] = int(module(x).shape[-1])
    if kind == "image":
        d = cfg.data
        entry["input"] = {
            "dtype": "float32",
            "shape": ["batch", d.channels, d.image_size, d.image_size],
            "channels": d.channels,
            "image_size": d.image_size,
            "mean": list(d.mean),
            "std": list(d.std),
            "pixels": "uint8 / 255 (or float in [0, 1]), then (x - mean) / std per channel",
            "resize": "shorter side to image_size (bilinear), centre crop",
        }
    else:
        entry["input"] = {"dtype": "int64", "shape": ["batch", tok.context_length]}
    if opts.torchscript:
        entry["torchscript"] = write_torchscript(module, x, folder, name)
    if opts.onnx:
        entry["onnx"] = write_onnx(module, x, folder, name, kind)
    return entry


def _world_size(step_dir: Path) -> int:
    return len(list(step_dir.glob("rank_*.pt"))) or len(list(step_dir.glob("*optim_states.pt")))


def _write_all(run_dir: Path, cfg: Config, step_dir: Path, tmp: Path, opts) -> dict:
    source = {
        "run": str(run_dir.resolve()),
        "checkpoint": step_dir.name,
        "step": int(step_dir.name.split("_")[-1]),
        "world_size": _world_size(step_dir),
    }
    method = trained_method(cfg, step_dir)
    if opts.format == "hf":
        return write_hf_method(method, cfg, tmp, source, run_dir)
    if opts.format == "open_clip":
        return write_open_clip_method(method, cfg, tmp, source, run_dir)
    return write_method(method, cfg, tmp, opts, source, run_dir)


def write_hf_method(method: nn.Module, cfg: Config, folder: Path, source: dict, run_dir: Path):
    """:func:`write_hf` plus the model card; returns a manifest-like summary."""
    cls = write_hf(method, cfg, folder)
    params = json.loads((folder / HF_CONFIG_JSON).read_text())["dist_contrast_parameters"]
    summary = {
        **source,
        "format": "hf",
        "class": cls,
        "layout": f"a transformers `{cls}` folder",
        "towers": {"model": {"weights": WEIGHTS, "parameters": params, "class": cls}},
    }
    write_card(folder, summary, cfg, run_dir, use=hf_usage(cls))
    return summary


def write_open_clip_method(
    method: nn.Module, cfg: Config, folder: Path, source: dict, run_dir: Path
) -> dict:
    """:func:`write_open_clip` plus the model card; returns a manifest-like summary."""
    config = write_open_clip(method, cfg, folder)
    summary = {
        **source,
        "format": "open_clip",
        "layout": "an open_clip `local-dir:` folder",
        "towers": {"model": {"weights": OPEN_CLIP_WEIGHTS, "parameters": config["parameters"]}},
    }
    write_card(folder, summary, cfg, run_dir, use=open_clip_usage())
    return summary


def write_method(
    method: nn.Module, cfg: Config, folder: Path, opts, source: dict, run_dir: Path
) -> dict:
    """Write the towers of ``method`` (trained with ``cfg``) as an export into ``folder``;
    ``source`` names where the weights come from (run, checkpoint, step, world_size) and
    ``run_dir`` is where the model card finds ``eval.json``. Returns the manifest."""
    d = cfg.data
    if d.tokenizer == "bpe" and not Path(d.tokenizer_path).is_file():
        raise ExportError(
            f"the run's tokenizer file '{d.tokenizer_path}' (data.tokenizer_path) is missing: "
            "run the export where the training found it"
        )
    tok = tokenizer_for(d)
    manifest: dict = {
        "format": FORMAT,
        "version": VERSION,
        **source,
        "method": cfg.method.name,
        "encoder": cfg.model.encoder,
        "tokenizer": None,
        "towers": {},
    }
    if tok is not None:
        manifest["tokenizer"] = {"kind": d.tokenizer, "context_length": d.context_length}
        if d.tokenizer == "bpe":
            shutil.copyfile(d.tokenizer_path, folder / TOKENIZER_JSON)
            manifest["tokenizer"]["file"] = TOKENIZER_JSON
    for name, module in method.towers().items():
        if not module.state_dict():
            continue  # a method without heads
        manifest["towers"][name] = _write_tower(name, module, cfg, tok, folder / name, opts)
    save_config(cfg, folder / CONFIG_YAML)
    write_card(folder, manifest, cfg, run_dir)
    (folder / EXPORT_JSON).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ExportError(f"'{out}' already exists; choose another --out or pass --force")
        hf_folder = (out / HF_CONFIG_JSON).is_file() and (out / WEIGHTS).is_file()
        if not (out / EXPORT_JSON).is_file() and not hf_folder:
            raise ExportError(f"--force replaces only an export directory; '{out}' is not one")


def _move_into_place(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_run(
    run_dir: str | Path, out: str | Path | None = None, opts: ExportOptions | None = None
) -> tuple[Path, dict]:
    """Export the latest checkpoint of ``run_dir`` into ``out`` (default ``RUN/export``);
    return the directory and its ``export.json`` content."""
    opts = opts or ExportOptions()
    opts.check()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "export"
    with _checkpoint(run_dir, opts.step) as (cfg, step_dir):
        _check_out(out, opts.force)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            manifest = _write_all(run_dir, cfg, step_dir, tmp, opts)
            _move_into_place(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out, manifest


@contextlib.contextmanager
def _checkpoint(run_dir: Path, step: int | None) -> Iterator[tuple[Config, Path]]:
    """The run's config and its checkpoint (latest, or ``step``), verified and pinned while
    the export reads it; what cannot be exported is one :class:`ExportError`."""
    try:
        cfg = run_config(run_dir)
        with integrity.reading(run_dir / "checkpoints", step) as step_dir:
            yield cfg, step_dir
    except CheckpointError as exc:
        raise ExportError(f"nothing to export: {exc}") from None
