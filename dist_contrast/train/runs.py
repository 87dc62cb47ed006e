"""A run directory: checks before a run starts, and what a finished (or running) run holds."""

from __future__ import annotations

from pathlib import Path

from dist_contrast.config import Config, load_config
from dist_contrast.data.decode import sample_fields
from dist_contrast.data.shards import dataset_size
from dist_contrast.data.sources import Source, first_sample
from dist_contrast.errors import CheckpointError, ConfigError, DataError
from dist_contrast.methods import registry
from dist_contrast.train import checkpoint


def check_run_dir(cfg: Config) -> None:
    """Refuse a run dir that cannot be used, before any process group starts."""
    run_dir = cfg.run_dir
    for path in (Path(cfg.run.dir), run_dir):
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"run dir '{path}' exists and is a file")
    if cfg.checkpoint.resume == "" and checkpoint.step_dirs(run_dir / "checkpoints"):
        raise CheckpointError(
            f"run dir '{run_dir}' already holds checkpoints: continue it with "
            f"checkpoint.resume=latest, or start another with run.name=NEW_NAME"
        )


def load_run(run_dir: Path) -> tuple[Config, Path]:
    """The resolved config of a run and its latest checkpoint directory."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir '{run_dir}' does not exist or is not a directory")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"'{run_dir}' has no config.yaml: is it a run directory?")
    cfg = resolve(load_config(run_dir / "config.yaml"))  # a config.yaml of an older version
    step_dir = checkpoint.read_latest(run_dir / "checkpoints")
    if step_dir is None:
        raise CheckpointError(f"run dir '{run_dir}' has no checkpoint yet")
    return cfg, step_dir


def resolve(cfg: Config) -> Config:
    """Fill in what the config leaves to the data: InstDisc's ``method.bank_size`` (0: the
    samples of every split in the ``counts.json`` beside the training shards). The method is then
    built from the config alone, and the saved ``config.yaml`` says the size it used."""
    if registry.spec(cfg.method.name).module == "instdisc" and cfg.method.bank_size == 0:
        try:
            cfg.method.bank_size = dataset_size(cfg.data.train_shards, "data.train_shards")
        except DataError as exc:
            raise ConfigError(
                f"method 'instdisc' needs the data set size ({exc}); set method.bank_size to "
                "the number of sample indices"
            ) from None
    return cfg


def check_method_data(cfg: Config, sources: list[Source]) -> None:
    """The method registry's checks: the loss fits the method, and the first sample of the
    training shards carries the fields the method needs (local shards only)."""
    registry.check(cfg)
    first = first_sample([u for src in sources for u in src.urls])
    if first is not None:
        sample, url = first
        registry.check_samples(cfg, sample_fields(sample), f"'{url}'")
