"""The README.md model card of an export: what was trained, how, and how well."""

from __future__ import annotations

import json
from pathlib import Path

from dist_contrast.config import Config, ModelConfig
from dist_contrast.export.layout import README_MD
from dist_contrast.methods import registry
from dist_contrast.models import vit_size

EVAL_KEYS = (
    ("zeroshot_top1", "zero-shot top-1 (held-out prompt templates)"),
    *(
        (f"{d}_r{k}", f"retrieval {words} R@{k}")
        for d, words in (("i2t", "image->text"), ("t2i", "text->image"))
        for k in (1, 5, 10)
    ),
    ("knn_top1", "kNN top-1"),
    ("linear_top1", "linear probe top-1"),
)

NATIVE_USE = [
    "```python",
    "from dist_contrast.export import load_clip, load_encoder",
    "",
    'enc = load_encoder("path/to/this/folder")  # tower="image", device="cpu"',
    "features = enc.embed(images)  # PIL images, uint8 HWC arrays or [N, C, H, W] tensors",
    'clip = load_clip("path/to/this/folder")  # image-text runs: both towers, joint space',
    "```",
    "",
    "`dist-contrast eval --export path/to/this/folder --data 'shards-*.tar'` measures kNN "
    "and linear-probe top-1 on other labelled shards.",
]


def _encoder(m: ModelConfig) -> str:
    if not m.encoder.startswith("vit"):
        return f"`{m.encoder}` (width {m.width}, norm {m.norm})"
    s = vit_size(m.encoder, m.vit_width, m.vit_depth, m.vit_heads, m.vit_mlp_ratio)
    return (
        f"`{m.encoder}` ({m.vit_layout} layout, width {s.dim}, {s.depth} blocks, "
        f"{s.heads} heads, MLP ratio {s.mlp_ratio}, patch {m.patch_size})"
    )


def _training_rows(manifest: dict, cfg: Config) -> list[tuple[str, str]]:
    t, d, m = cfg.train, cfg.data, cfg.model
    ranks = manifest["world_size"]
    text = []
    if registry.spec(cfg.method.name).image_text:
        x = cfg.text
        text = [
            (
                "text tower",
                f"{x.layout} layout, width {x.width}, {x.layers} blocks, {x.heads} heads, "
                f"context {d.context_length}, tokenizer `{d.tokenizer}`",
            )
        ]
    return [
        ("method / loss", f"`{cfg.method.name}` / `{cfg.loss.name}` (T = {cfg.loss.temperature})"),
        ("encoder", _encoder(m)),
        *text,
        ("input", f"{d.channels} channel(s), {d.image_size} px, mean {d.mean}, std {d.std}"),
        ("steps", f"{manifest['step']} of {t.steps} (checkpoint `{manifest['checkpoint']}`)"),
        ("batch", f"{t.batch_size} per rank x {ranks} rank(s) = {t.batch_size * ranks}"),
        ("optimizer", f"{t.optimizer}, lr {t.lr}, weight decay {t.weight_decay}"),
        ("DeepSpeed", f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}"),
        ("data", f"`{d.train_shards}`"),
        ("seed", str(cfg.run.seed)),
    ]


def _eval_lines(run_dir: Path) -> list[str]:
    path = run_dir / "eval.json"
    if not path.is_file():
        return ["No `eval.json` in the run: `dist-contrast eval --run RUN` measures it."]
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return ["The run's `eval.json` is unreadable."]
    lines = [
        f"On {result.get('val_samples', '?')} validation samples "
        f"(checkpoint `{result.get('checkpoint', '?')}`):",
        "",
        "| metric | trained | same network at its initial weights |",
        "|---|---|---|",
    ]
    if "retrieval_match" in result:
        lines[0] += f" (a retrieved item counts when it matches by {result['retrieval_match']})"
    for key, label in EVAL_KEYS:
        if key in result:
            init = result.get(f"{key}_random_init")
            init_s = f"{100 * init:.1f}%" if isinstance(init, int | float) else "-"
            lines.append(f"| {label} | {100 * result[key]:.1f}% | {init_s} |")
    return lines


def _tower_rows(manifest: dict) -> list[str]:
    rows = ["| tower | file | parameters | output |", "|---|---|---|---|"]
    for name, t in manifest["towers"].items():
        out = f"{t['output_dim']}-d" if "output_dim" in t else ", ".join(t.get("modules", []))
        rows.append(f"| `{name}` | `{t['weights']}` | {t['parameters']:,} | {out} |")
    return rows


def write_card(
    folder: Path, manifest: dict, cfg: Config, run_dir: Path, use: list[str] | None = None
) -> None:
    """``README.md``: towers, training, every figure of the run's ``eval.json`` with its
    random-init baseline, and ``use`` (how to load the folder; the native loader's by default)."""
    lines = [
        f"# {cfg.run.name}",
        "",
        f"A `{cfg.method.name}` model trained with dist-contrast, exported from "
        f"`{manifest['run']}` ({manifest.get('layout', 'fp32 safetensors, one file per tower')}).",
        "",
        "## Towers",
        "",
        *_tower_rows(manifest),
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _training_rows(manifest, cfg)),
        "",
        "The whole resolved config is in `config.yaml`.",
        "",
        "## Evaluation",
        "",
        *_eval_lines(run_dir),
        "",
        "## Use",
        "",
        *(use or NATIVE_USE),
        "",
    ]
    (folder / README_MD).write_text("\n".join(lines))
