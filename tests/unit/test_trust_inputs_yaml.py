"""The YAML reader on hostile input: an alias bomb is one line in under a second (nothing is
expanded), a recursive alias and a config that is not a regular file are one line, and the
small anchors and aliases people write keep working."""

from __future__ import annotations

import os
import time

import pytest

from dist_contrast.config import load_config
from dist_contrast.config.parse import MAX_ALIAS_VALUES
from dist_contrast.errors import ConfigError

from conftest import run_cli


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """A flow mapping of ``levels`` lists of ``width`` aliases of the level below: a few
    hundred bytes that expand to ``width ** levels`` values (10**9 for 9 levels of 10)."""
    names = "abcdefghijklmnopqrstuvwxyz"
    items = [f"a: &a [{','.join(['x'] * width)}]"]
    for k in range(1, levels):
        below = ",".join([f"*{names[k - 1]}"] * width)
        items.append(f"{names[k]}: &{names[k]} [{below}]")
    return "{" + ", ".join(items) + "}"


def test_an_alias_bomb_is_refused_in_one_line_without_expanding_it(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"deepspeed:\n  raw: {alias_bomb()}\n")
    assert len(path.read_bytes()) < 600
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - start < 5  # 10**9 values are never built
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and f"expand past {MAX_ALIAS_VALUES:,} values" in message
    # as an override value too (the same reader)
    with pytest.raises(ConfigError, match=r"override deepspeed\.raw: YAML aliases expand past"):
        load_config(None, [f"deepspeed.raw={alias_bomb(6)}"])


def test_the_alias_bomb_through_the_cli_is_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"deepspeed:\n  raw: {alias_bomb()}\n")
    proc = run_cli("train", "--config", str(path), "--check", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-contrast: error: "), proc.stderr
    assert "aliases expand past" in lines[0] and str(path) in lines[0]


def test_small_anchors_and_aliases_keep_working(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "deepspeed:\n"
        "  raw:\n"
        "    base: &base {overlap_comm: true, reduce_bucket_size: 500000}\n"
        "    zero_optimization:\n"
        "      <<: *base\n"
        "      contiguous_gradients: true\n"
        "    copies: [*base, *base, *base]\n"
        "train:\n"
        "  steps: &n 12\n"
        "  warmup_steps: *n\n"
    )
    cfg = load_config(path)
    raw = cfg.deepspeed.raw
    assert raw["zero_optimization"] == {
        "overlap_comm": True,
        "reduce_bucket_size": 500000,
        "contiguous_gradients": True,
    }
    assert raw["copies"] == [raw["base"]] * 3
    assert cfg.train.steps == cfg.train.warmup_steps == 12
    listed = load_config(None, ["deepspeed.raw={a: &a [1, 2], b: [*a, *a]}"]).deepspeed.raw
    assert listed == {"a": [1, 2], "b": [[1, 2], [1, 2]]}


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("deepspeed:\n  raw: &loop\n    again: *loop\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml: a YAML alias refers to a value that"):
        load_config(path)


def test_a_config_that_is_not_a_regular_file_does_not_block(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    proc = run_cli("train", "--config", str(fifo), "--check", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == f"dist-contrast: error: config file {fifo} is not a regular file"
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
