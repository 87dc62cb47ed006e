"""``dist-contrast plan`` (dist_contrast/train/plan.py) against real engine steps and known
figures.

- memory: for seven configs (ResNet and ViT towers; CLIP, SimCLR, MoCo; ZeRO 0, 2, 3; the tiled
  loss on and off; cached accumulation; W = 1, 2, 4) the planner's per-rank total within 15% of
  the RSS peak of building the DeepSpeed engine and running its steps (``dist-contrast bench
  plan``, which the figures of docs/scaling.md come from);
- communication: the bytes the planner says a rank sends equal, to the byte, the bytes handed
  to ``torch.distributed`` collectives in a step (every call counted);
- the CLI: the README's command prints the table; CLIP ViT-B/16 with OpenAI's vocabulary has
  OpenAI's 149,620,737 parameters; bad input is one line, exit 2.
"""

from __future__ import annotations

import json

import pytest

from dist_contrast.train.plan import table as plan_table
from dist_contrast_bench.plan import CASES, measure

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow  # launches real training processes: make test-slow, CI


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_matches_a_real_step(case):
    r = measure(case)
    assert r["planned_sent_bytes"] == r["counted_sent_bytes"], (
        r["planned_comm"],
        r["counted_comm"],
    )
    peak = max(r["measured_peak_bytes"])
    assert abs(r["predicted_bytes"] / peak - 1) <= 0.15, (r["terms"], r["measured_peak_bytes"])


def test_plan_cli_vit_b16_on_64_gpus():
    run = run_cli(
        "plan", "configs/image_text/clip_vit_b16.yaml", "--gpus", "64", "--gpu-memory", "80",
        "--json", cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout)
    assert r["trainable"] == 149_620_737  # OpenAI's CLIP ViT-B/16, vocabulary 49,408
    assert r["global_batch"] == 64 * 256
    assert "vocabulary of 49,408 assumed" in r["note"]
    terms = {t["name"]: t["bytes"] for t in r["terms"]}
    # bf16 parameters whole, ZeRO-2: the optimizer's two fp32 states split 64 ways
    assert terms["parameters"] == 2 * 149_620_737
    assert terms["optimizer states"] == pytest.approx(8 * 149_620_737 / 64)
    # the tiled loss: [256, 4096] fp32 tiles and their gradient, per direction
    assert terms["loss tiles"] == 2 * 4 * 256 * 4096 * 2
    fits = r["max_batch_per_gpu"]
    assert r["total_bytes"] < 80e9 and fits > 256
    comm = {t["name"]: t["bytes"] for t in r["comm"]}
    assert comm["feature all-gathers"] == 2 * 256 * 512 * 4
    assert comm["gradient all-reduce"] == 2 * 149_620_737
    table = plan_table(r)  # what the command prints without --json
    assert f"largest batch per GPU in 80 GB: {fits:,}" in table
    assert "| **total** |" in table


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0"], "plan --gpus must be at least 1"),
        (["--gpus", "2", "--gpu-memory", "-1"], "plan --gpu-memory must be positive"),
    ],
)
def test_plan_refuses_bad_input(args, message):
    run = run_cli("plan", "configs/simclr_digits.yaml", *args, cwd=ROOT)
    assert run.returncode == 2
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_plan_refuses_a_method_it_has_not_checked():
    run = run_cli("plan", "configs/byol_digits.yaml", "--gpus", "8", cwd=ROOT)
    assert run.returncode == 2
    assert "not modelled" in run.stderr and len(run.stderr.strip().splitlines()) == 1
