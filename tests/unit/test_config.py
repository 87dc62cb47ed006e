import pytest
import yaml

from dist_contrast.config import Config, load_config, save_config
from dist_contrast.config.parse import dotted_keys
from dist_contrast.errors import ConfigError
from dist_contrast.train.setup import deepspeed_config

from conftest import ROOT, config_from_dict

# The keys users reach for most (DESIGN.md): renaming one breaks configs and commands out there.
PUBLIC_KEYS = [
    "run.name",
    "run.dir",
    "run.seed",
    "train.steps",
    "train.batch_size",
    "data.train_shards",
    "data.val_shards",
    "method.name",
    "loss.name",
    "deepspeed.zero_stage",
    "deepspeed.precision",
    "checkpoint.every",
    "checkpoint.resume",
    "eval.every",
    "model.init_from",
    "model.lock_image",
    "logging.wandb",
]


def test_defaults_validate_and_the_public_keys_exist_and_are_documented():
    """Every other key's row (and the page being current) is checked in test_config_docs.py."""
    cfg = load_config()
    assert isinstance(cfg, Config)
    missing = [key for key in PUBLIC_KEYS if key not in dotted_keys(Config)]
    assert missing == []
    page = (ROOT / "docs" / "configs.md").read_text(encoding="utf-8")
    assert [key for key in PUBLIC_KEYS if f"| `{key}` |" not in page] == []


def test_yaml_is_a_diff_and_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: a\ntrain:\n  steps: 7\n  lr: 1e-3\n")
    cfg = load_config(path, ["train.steps=9", "deepspeed.precision=bf16", "loss.temperature=0.5"])
    assert cfg.run.name == "a"
    assert cfg.train.steps == 9
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.deepspeed.precision == "bf16"
    assert cfg.loss.temperature == 0.5
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["run.name=x", "deepspeed.raw.zero_optimization.overlap_comm=true"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["run"]["name"] == "x"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.stpes=3", "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
        ("trian.steps=3", "unknown config key 'trian.steps' (did you mean 'train.steps'?)"),
        ("train.steps=abc", "config key 'train.steps' must be int, got str 'abc'"),
        ("train.steps=1.5", "config key 'train.steps' must be int, got float 1.5"),
        ("logging.wandb=3", "config key 'logging.wandb' must be bool"),
        ("deepspeed.precision=bf61", "(did you mean 'bf16'?)"),
        ("train.steps=0", "config key 'train.steps' must be > 0"),
        ("loss.temperature=-1", "config key 'loss.temperature' must be > 0"),
        ("deepspeed.zero_stage=5", "must be 0, 1, 2 or 3"),
        ("train=3", "config key 'train' is a section"),
        ("nosuchthing", "is not of the form section.key=value"),
    ],
)
def test_bad_input_names_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_deepspeed_config_is_derived_and_raw_keys_win():
    cfg = config_from_dict(
        {
            "train": {"batch_size": 32, "grad_clip": 0.5},
            "deepspeed": {
                "zero_stage": 3,
                "precision": "bf16",
                "raw": {"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 2.0},
            },
        }
    )
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["train_batch_size"] == 128
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 2.0


def test_every_config_file_in_the_repo_loads():
    from pathlib import Path

    files = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert files
    for path in files:
        load_config(path)
        assert path.read_text().startswith("#"), f"{path.name} should name its command"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("[a/{0..9}.tar, b/{0..3}.tar]", ["a/{0..9}.tar", "b/{0..3}.tar"]),
        (
            "[s3://x/{0..1}.tar,  pipe:cat c-{0..2}.tar ]",
            ["s3://x/{0..1}.tar", "pipe:cat c-{0..2}.tar"],
        ),
        ("[a.tar, b.tar]", ["a.tar", "b.tar"]),  # plain YAML
        ("a/{0..9}.tar", "a/{0..9}.tar"),  # one brace pattern is a string already
    ],
)
def test_shard_lists_with_brace_patterns_parse_as_lists(value, expected):
    cfg = load_config(None, [f"data.train_shards={value}"])
    assert cfg.data.train_shards == expected


@pytest.mark.parametrize("value", ["off", "yes", "2024", "1e3", "null-ish"])
def test_a_str_key_keeps_the_text_as_written(value):
    assert load_config(None, [f"run.name={value}"]).run.name == value
    assert load_config(None, ["train.steps=12"]).train.steps == 12  # typed keys still parse
