"""Typed run configuration: defaults, YAML diff, ``section.key=value`` overrides, checks.

One dataclass tree holds every default (:mod:`dist_contrast.config.schema`). A YAML file is a
small diff over it, and overrides from the command line are applied on top
(:mod:`dist_contrast.config.parse`). Unknown keys and values of the wrong type are errors that
name the key and suggest the closest valid one; value checks are in
:mod:`dist_contrast.config.validate`. The resolved tree is saved as ``config.yaml`` in the run
directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from dist_contrast.config.parse import build, read_yaml, set_dotted, split_override, typed_override
from dist_contrast.config.schema import (
    DIGIT_NAMES,
    AugmentConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
)
from dist_contrast.config.validate import validate


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML diff at ``path``, then ``section.key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml(Path(path))
    for item in overrides:
        key, value = split_override(item)
        set_dotted(tree, key, typed_override(Config, key, value))
    cfg = build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; written to a temp file and renamed, never half-written."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


__all__ = [
    "DIGIT_NAMES",
    "AugmentConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "TextConfig",
    "TrainConfig",
    "load_config",
    "save_config",
    "to_dict",
]
