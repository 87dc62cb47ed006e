"""CLIP trains on 2 ranks (torchrun, DeepSpeed ZeRO-2, gloo) with each loss form, SigLIP and the
momentum queues; the local, full-matrix and tiled forms give the same loss curve; the queues
advance by this rank's keys of each step; `dist-contrast eval` of a CLIP run writes zero-shot
and retrieval figures (the untrained model near chance)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli, run_torchrun

STEPS, BATCH, QUEUE = 3, 16, 64

FORMS = {
    "local": [],
    "full": ["loss.logits=full"],
    "tiled": ["loss.memory_efficient=true", "loss.tile=8"],
    "siglip": ["loss.name=siglip", "loss.temperature=0.1"],
    "queues": ["method.queues=true", "loss.memory_efficient=true", "train.accumulation=2"],
}


def _train(form: str, digits_dir, tokenizer, tmp_path) -> tuple:
    overrides = {
        "data.tokenizer_path": tokenizer,
        "run.dir": tmp_path,
        "run.name": form,
        "data.train_shards": f"{digits_dir}/train-*.tar",
        "data.val_shards": f"{digits_dir}/val-*.tar",
        "data.num_workers": 0,
        "train.steps": STEPS,
        "train.batch_size": BATCH,
        "train.warmup_steps": 0,
        "train.log_every": 1,
        "checkpoint.every": STEPS,
        "method.queues": "false",
        "method.queue_size": QUEUE,
        "logging.wandb": "false",
        "logging.progress": "false",
        "logging.plots": "false",
    }
    args = [f"{k}={v}" for k, v in overrides.items()] + FORMS[form]
    proc = run_torchrun(2, "train", "--config", "configs/clip_digits.yaml", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / form
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, rows


@pytest.fixture(scope="module")
def runs(digits_dir, digits_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip_runs")
    return {form: _train(form, digits_dir, digits_tokenizer, tmp) for form in FORMS}


@pytest.mark.parametrize("form", list(FORMS))
def test_clip_trains_on_two_ranks(runs, form):
    run, rows = runs[form]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["logit_scale"] > 0 for r in rows), rows
    assert (run / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    in_batch = 2 * BATCH - 1
    want = in_batch + (QUEUE if form == "queues" else 0)
    assert rows[-1]["negatives_per_query"] == want


def test_local_full_and_tiled_forms_give_the_same_loss_curve(runs):
    curves = {form: [r["loss"] for r in runs[form][1]] for form in ("local", "full", "tiled")}
    for form in ("full", "tiled"):
        assert curves[form] == pytest.approx(curves["local"], rel=1e-5), curves


def test_queues_hold_each_ranks_momentum_features_of_every_step(runs):
    run, _ = runs["queues"]
    step_dir = run / "checkpoints" / f"step_{STEPS:08d}"
    for rank in range(2):
        state = torch.load(step_dir / f"rank_{rank:05d}.pt", weights_only=False)["method"]
        for name in ("image_queue", "text_queue"):
            shard = state[name]
            assert shard["world"] == 2 and shard["keys"].shape == (QUEUE // 2, 64)
            assert shard["ptr"] == (STEPS * BATCH) % (QUEUE // 2)
            assert torch.allclose(shard["keys"].norm(dim=1), torch.ones(QUEUE // 2), atol=1e-5)


def test_eval_of_a_clip_run_writes_zero_shot_and_retrieval(runs):
    run, _ = runs["queues"]
    proc = run_cli("eval", "--run", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())
    for suffix in ("", "_random_init"):
        assert 0 <= result[f"zeroshot_top1{suffix}"] <= 1
        for d in ("i2t", "t2i"):
            r = [result[f"{d}_r{k}{suffix}"] for k in (1, 5, 10)]
            assert r == sorted(r) and 0 <= r[0] and r[-1] <= 1
    assert result["retrieval_match"] == "label"
    assert result["zeroshot_top1_random_init"] < 0.3  # ten classes: chance is 0.1
    assert "zero-shot" in proc.stdout
