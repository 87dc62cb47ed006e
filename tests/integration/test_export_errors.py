"""Export and load_encoder on bad input: one clear line each, nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_export import CONFIG, run_for

from dist_contrast.config import load_config, save_config
from dist_contrast.export import ExportError, ExportOptions, export_run, load_encoder

from conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_dir) -> Path:
    return run_for(tmp_path_factory, digits_dir, 2)  # shared with test_export


@pytest.fixture(scope="module")
def export_dir(run, tmp_path_factory) -> Path:
    return export_run(run, tmp_path_factory.mktemp("errors") / "export")[0]


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-contrast: error: "), proc.stderr
    return lines[0]


def _with_config(src: Path, dst: Path, *overrides: str) -> Path:
    """A copy of the run or export ``src`` whose config.yaml says ``overrides``."""
    shutil.copytree(src, dst)
    save_config(load_config(dst / "config.yaml", list(overrides)), dst / "config.yaml")
    return dst


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_run_without_checkpoint(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    save_config(load_config(CONFIG), run / "config.yaml")
    line = _one_error_line(run_cli("export", "--run", str(run), "--out", str(tmp_path / "x")))
    assert line.endswith(f"nothing to export: run dir '{run}' has no checkpoint yet")
    with pytest.raises(ExportError, match="does not exist"):
        export_run(tmp_path / "missing")
    assert not (tmp_path / "x").exists() and _leftovers(tmp_path) == []


def test_truncated_or_corrupt_safetensors(export_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    weights = broken / "image" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"model\.safetensors is truncated or not a safetensors"):
        load_encoder(broken)
    line = _one_error_line(run_cli("eval", "--export", str(broken), "--data", "unused-*.tar"))
    assert f"{weights} is truncated or not a safetensors file (" in line
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ExportError, match="truncated or not a safetensors"):
        load_encoder(broken)
    with pytest.raises(ExportError, match="not an export directory"):
        load_encoder(tmp_path)


def test_checkpoint_of_another_architecture(run, tmp_path):
    """A run whose config builds another network than its checkpoint holds: the first key
    that does not fit is named, with both shapes; no export directory is left behind."""
    wider = _with_config(run, tmp_path / "wider", "model.width=16")
    out = tmp_path / "out"
    line = _one_error_line(run_cli("export", "--run", str(wider), "--out", str(out)))
    assert line.endswith(
        "holds weights of another architecture: 'encoder.stem.0.weight' has shape (8, 1, 3, 3) "
        "there, the config's model expects (16, 1, 3, 3)"
    )
    deeper = _with_config(run, tmp_path / "deeper", "model.encoder=resnet_small")
    with pytest.raises(ExportError, match=r"'encoder\.stages\.1\.conv1\.weight' has shape"):
        export_run(deeper, out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_export_loaded_with_another_config(export_dir, tmp_path):
    other = _with_config(export_dir, tmp_path / "other", "model.proj_dim=24")
    assert load_encoder(other).module is not None  # the image tower does not depend on it
    with pytest.raises(
        ExportError, match=r"'projector\.\S+' has shape \(16, 32\) there, .* \(24, 32\)"
    ):
        load_encoder(other, tower="heads")
    byol = _with_config(export_dir, tmp_path / "byol", "method.name=byol", "loss.name=byol")
    with pytest.raises(ExportError, match=r"it lacks key 'predictor\.\S+' \(and \d+ more\)"):
        load_encoder(byol, tower="heads")
    with pytest.raises(ExportError, match="has no tower 'text'"):
        load_encoder(export_dir, tower="text")


def test_existing_output_is_kept_unless_forced(run, export_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists; choose another --out or pass --force"):
        export_run(run, out)
    with pytest.raises(ExportError, match="replaces only an export directory"):
        export_run(run, out, ExportOptions(force=True))
    assert (out / "notes.txt").read_text() == "mine"
    again = tmp_path / "again"
    shutil.copytree(export_dir, again)
    (again / "stale.txt").write_text("old")
    export_run(run, again, ExportOptions(force=True))
    assert not (again / "stale.txt").exists() and (again / "image" / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_the_byte_tokenizer_is_refused_by_both_libraries_formats(fmt, tmp_path):
    """Neither transformers nor open_clip has a tokenizer of our byte ids: one line naming it."""
    from dist_contrast.export.hf import write_hf
    from dist_contrast.export.open_clip import write_open_clip
    from dist_contrast.methods import build_method

    over = ["data.tokenizer=bytes", "data.tokenizer_path=", f"run.dir={tmp_path}"]
    cfg = load_config(ROOT / "configs/clip_vit_digits.yaml", over)
    write = write_hf if fmt == "hf" else write_open_clip
    library = "transformers" if fmt == "hf" else "open_clip"
    match = f"--format {fmt} needs a BPE tokenizer .*: {library} has no tokenizer"
    with pytest.raises(ExportError, match=match):
        write(build_method(cfg), cfg, tmp_path)
    assert not list(tmp_path.iterdir())
