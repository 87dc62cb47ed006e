"""``dist-contrast bench vs_open_clip``'s pure parts in this environment (open_clip is not
importable here): the open_clip model config written from ours has our parameter count, the
log readers and the steady samples/s. Under the ``open_clip`` marker, in open_clip's own
environment (``make open-clip-env``): the model config builds a model of that count, its
HFTokenizer gives our ids, and torchvision imports there only thanks to the fix."""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest

from conftest import OPEN_CLIP_PYTHON, ROOT, needs_open_clip

CONFIG = str(ROOT / "configs" / "clip_vit_digits.yaml")


def _bench():
    from dist_contrast_bench import vs_open_clip

    return vs_open_clip


def _cfg(size: str, digits_dir, digits_tokenizer):
    from dist_contrast.config import load_config

    args = argparse.Namespace(size=size, overrides=[], steps=0)
    overrides = _bench().bench_overrides(args, f"{digits_dir}/train-*.tar", str(digits_tokenizer))
    return load_config(CONFIG, overrides)


def _model_config(cfg, digits_tokenizer, tok_dir: str = "unused"):
    from dist_contrast.data.tokenizer import BPETokenizer

    tok = BPETokenizer.load(digits_tokenizer, cfg.data.context_length)
    return _bench().open_clip_model_config(cfg, tok.vocab_size, tok.eot_id, tok.pad_id, tok_dir)


@pytest.mark.parametrize("size", ["small", "compute"])
def test_model_config_has_our_parameter_count(size, digits_dir, digits_tokenizer):
    bench = _bench()
    cfg = _cfg(size, digits_dir, digits_tokenizer)
    config = _model_config(cfg, digits_tokenizer)
    assert config["text_cfg"]["pool_type"] == "eos"
    assert bench.open_clip_parameters(config) == bench.our_parameters(cfg)


def test_compute_size_is_a_vit_of_12_layers_width_192_on_64_pixels(digits_dir, digits_tokenizer):
    config = _model_config(_cfg("compute", digits_dir, digits_tokenizer), digits_tokenizer)
    v, t = config["vision_cfg"], config["text_cfg"]
    assert (v["width"], v["layers"], v["patch_size"], v["image_size"]) == (192, 12, 8, 64)
    assert (t["width"], t["layers"]) == (256, 4)


def test_refuses_a_config_open_clip_cannot_mirror(digits_dir):
    from dist_contrast.config import load_config
    from dist_contrast.errors import ConfigError

    cfg = load_config(str(ROOT / "configs" / "simclr_digits.yaml"))
    with pytest.raises(ConfigError, match="bench vs_open_clip needs method.name"):
        _bench().check_comparable(cfg)


def test_steady_leaves_out_the_first_windows():
    # windows end at steps 1, 11, 21 (s/step 5.0, 0.5, 0.25): skip 5 keeps the last two
    steady = _bench().steady([(1, 5.0), (11, 0.5), (21, 0.25)], skip=5, global_batch=10)
    assert steady == pytest.approx(10 * 20 / (10 * 0.5 + 10 * 0.25))


def test_reads_open_clip_log_lines():
    log = (
        "2026-12-06,15:00:00 | INFO | Train Epoch: 0 [  256/25600 (1%)] Data (t): 0.100 "
        "Batch (t): 2.000, 128.000/s, 64.0000/s/gpu LR: 0.000067 Logit Scale: 20.000 "
        "Contrastive_loss: 5.5450 (5.5450) Loss: 5.5450 (5.5450)\n"
        "2026-12-06,15:00:09 | INFO | Train Epoch: 0 [ 2816/25600 (11%)] Data (t): 0.001 "
        "Batch (t): 0.500, 512.000/s, 256.000/s/gpu LR: 0.000733 Logit Scale: 20.100 "
        "Contrastive_loss: 4.1234 (4.8342) Loss: 4.1234 (4.8342)\n"
    )
    windows, loss = _bench().open_clip_windows(log, global_batch=256)
    assert windows == [(1, 2.0), (11, 0.5)]
    assert loss == pytest.approx(4.1234)


def test_reads_our_metrics(tmp_path):
    rows = [
        {"step": 10, "loss": 5.0, "samples_per_sec": 100.0},
        {"step": 20, "loss": 4.0, "samples_per_sec": 200.0},
        {"event": "eval"},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    windows, loss = _bench().our_windows(path, global_batch=100)
    assert windows == [(10, 1.0), (20, 0.5)] and loss == 4.0


def test_maps_open_clip_names_and_shapes():
    import torch

    state = {
        "module.visual.class_embedding": torch.zeros(8),
        "module.visual.positional_embedding": torch.zeros(5, 8),
        "module.visual.proj": torch.zeros(8, 4),
        "module.logit_scale": torch.tensor(2.0),
        "module.visual.ln_pre.weight": torch.zeros(8),
        "module.transformer.resblocks.1.attn.in_proj_weight": torch.zeros(24, 8),
        "module.transformer.resblocks.1.attn.out_proj.bias": torch.zeros(8),
        "module.visual.transformer.resblocks.0.mlp.c_proj.weight": torch.zeros(8, 32),
        "module.ln_final.bias": torch.zeros(8),
    }
    shapes = {k: tuple(v.shape) for k, v in _bench().from_open_clip(state).items()}
    assert shapes == {
        "image.encoder.cls_token": (1, 1, 8),
        "image.encoder.pos_embed": (1, 5, 8),
        "image.proj.weight": (4, 8),
        "criterion.logit_scale": (1,),
        "image.encoder.norm_pre.weight": (8,),
        "text.encoder.blocks.1.attn.qkv.weight": (24, 8),
        "text.encoder.blocks.1.attn.proj.bias": (8,),
        "image.encoder.blocks.0.mlp.2.weight": (8, 32),
        "text.encoder.norm.bias": (8,),
    }
    with pytest.raises(KeyError, match="attn_pool"):
        _bench().from_open_clip({"visual.attn_pool.query": torch.zeros(1)})


@pytest.mark.open_clip
@needs_open_clip
def test_open_clip_builds_the_same_model_and_tokens(digits_dir, digits_tokenizer, tmp_path):
    from dist_contrast.data.tokenizer import BPETokenizer
    from dist_contrast.export.hf import write_tokenizer

    bench = _bench()
    cfg = _cfg("small", digits_dir, digits_tokenizer)
    tok = BPETokenizer.load(digits_tokenizer, cfg.data.context_length)
    write_tokenizer(tok, tmp_path)
    path = tmp_path / f"{bench.MODEL_NAME}.json"
    path.write_text(json.dumps(_model_config(cfg, digits_tokenizer, str(tmp_path))))
    captions = bench.first_captions(sorted(str(p) for p in digits_dir.glob("train-*.tar")))
    theirs = bench.probe(str(OPEN_CLIP_PYTHON), path, captions, tmp_path / "reference.pt")
    assert theirs["parameters"] == bench.our_parameters(cfg)
    assert len(captions) == bench.CHECKED_CAPTIONS
    assert theirs["tokens"] == tok.encode(captions).tolist()
    # its weights, mapped key by key, give its features in our model
    assert bench.same_features(cfg, tmp_path / "reference.pt") < 1e-5


@pytest.mark.open_clip
@needs_open_clip
def test_torchvision_imports_there_only_with_the_fix():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [str(OPEN_CLIP_PYTHON), "-c", "import torchvision.transforms"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    unhook = (
        "import sys, _dc_open_clip_fix as f\n"
        "sys.meta_path[:] = [h for h in sys.meta_path if not isinstance(h, f._BeforeTorchvision)]\n"
        "import torchvision\n"
    )
    broken = subprocess.run(
        [str(OPEN_CLIP_PYTHON), "-c", unhook], env=env, capture_output=True, text=True, timeout=300
    )
    if broken.returncode == 0:
        pytest.skip("torchvision's operators load here (a CUDA torch): the fix is not needed")
    assert "torchvision::nms" in broken.stderr


def test_load_processes_end_with_the_block():
    with _bench().Load(2) as load:
        procs = list(load.procs)
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_table_has_a_row_per_run():
    run = {"rc": 0, "samples_per_s": 200.0, "wall_s": 60.0, "peak_rss_mib": [600.0, 590.0]}
    result = {
        "setup": {
            "size": "small",
            "config": "c.yaml",
            "steps": 30,
            "nproc": 2,
            "batch_size": 128,
            "load": 0,
            "cpu": "cpu",
            "checks": {"parameters_ours": 9, "parameters_open_clip": 9},
        },
        "runs": [
            {
                **run,
                "system": "dist-contrast",
                "pair": 1,
                "final_loss": 5.5,
                "eval": {"zeroshot_top1": 0.397},
            },
            {**run, "system": "open_clip_train", "pair": 1, "final_loss": None, "rc": 1},
        ],
        "ratios": [],
    }
    lines = _bench().table(result).splitlines()
    assert "| dist-contrast | 1 | 200.0 | 60 | 600 / 590 | 5.500 | 39.7% |" in lines
    assert "| open_clip_train | 1 | failed | 60 | 600 / 590 | - | - |" in lines
    assert (
        "| c.yaml (small, 30 steps x 2 x 128) | dist-contrast | 200.0 | 590-600 | 5.500 "
        "| 39.7% |" in lines
    )
    assert "| same | open_clip_train | - | - | - | - |" in lines


def test_one_trainer_only_gives_its_row_and_the_seeds_mean():
    """--only ours: no ratio, no open_clip row, the zero-shot of each seed and their mean."""
    bench = _bench()
    runs = [
        {"system": "dist-contrast", "pair": p, "rc": 0, "samples_per_s": 500.0, "seed": p - 1}
        | {"peak_rss_mib": [620.0], "final_loss": 3.0, "eval": {"zeroshot_top1": z}}
        for p, z in ((1, 0.986), (2, 0.978), (3, 0.989))
    ]
    assert bench.pair_ratios(runs) == [] and bench.pooled_ratio(runs) is None
    setup = {"config": "c.yaml", "size": "small", "steps": 300, "nproc": 2, "batch_size": 128}
    lines = bench.summary({"setup": setup, "runs": runs})
    assert not any("open_clip_train" in line for line in lines)
    assert "98.6% / 97.8% / 98.9% (mean 98.43)" in lines[-1]


def test_pair_ratios_match_the_pairs_not_the_order():
    runs = [
        {"system": "dist-contrast", "pair": 1, "samples_per_s": 300.0},
        {"system": "open_clip_train", "pair": 2, "samples_per_s": 100.0},
        {"system": "open_clip_train", "pair": 1, "samples_per_s": 200.0},
        {"system": "dist-contrast", "pair": 2, "samples_per_s": 120.0},
        {"system": "dist-contrast", "pair": 3, "samples_per_s": 120.0},  # no partner
        {"system": "open_clip_train", "pair": 4, "samples_per_s": None},
        {"system": "dist-contrast", "pair": 4, "samples_per_s": 120.0},  # partner not timed
    ]
    assert _bench().pair_ratios(runs) == pytest.approx([1.5, 1.2])


def test_pooled_ratio_is_of_the_means():
    runs = [
        {"system": "dist-contrast", "samples_per_s": 300.0},
        {"system": "open_clip_train", "samples_per_s": 100.0},
        {"system": "dist-contrast", "samples_per_s": 100.0},
        {"system": "open_clip_train", "samples_per_s": None},
    ]
    assert _bench().pooled_ratio(runs) == pytest.approx(2.0)


def test_a_missing_environment_is_one_line(tmp_path):
    from dist_contrast.errors import UserError

    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(UserError, match="no open_clip environment at .*make open-clip-env"):
        _bench().main(["--open-clip-python", str(missing), "--out", str(tmp_path / "r.json")])


def test_no_shards_is_one_line(tmp_path):
    import sys

    from dist_contrast.errors import DataError

    argv = ["--open-clip-python", sys.executable, "--data", f"{tmp_path}/train-*.tar"]
    with pytest.raises(DataError, match="no shards match --data"):
        _bench().main([*argv, "--dir", str(tmp_path), "--out", str(tmp_path / "r.json")])


def test_open_clip_gets_our_recipe(digits_dir, digits_tokenizer, tmp_path):
    cfg = _cfg("small", digits_dir, digits_tokenizer)
    args = argparse.Namespace(nproc=2)
    argv = _bench().open_clip_args(args, cfg, "a.tar::b.tar", tmp_path, "run-1", seed=3)
    t = cfg.train
    assert "--local-loss" in argv and "--gather-with-grad" in argv
    assert "--dataset-resampled" in argv
    assert argv[argv.index("--train-num-samples") + 1] == str(t.steps * t.batch_size * 2)
    assert argv[argv.index("--seed") + 1] == "3"
    for flag, value in {
        "--lr": t.lr,
        "--wd": t.weight_decay,
        "--warmup": t.warmup_steps,
        "--batch-size": t.batch_size,
        "--grad-clip-norm": t.grad_clip,
    }.items():
        assert argv[argv.index(flag) + 1] == str(value)
    assert argv[argv.index("--eps") + 1] == "1e-8" and argv[argv.index("--beta2") + 1] == "0.999"
    assert argv[argv.index("--precision") + 1] == "fp32"
