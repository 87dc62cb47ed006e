"""``dist-contrast bench train`` on one process with a tiny CLIP (no timed assertions), in both
orders: the table and JSON, phases that never overlap and add up to the step, the amortised
checkpoint, the floor computing the engine's loss (same weights, same batch) at step 1, and the
interleaved order alternating the loops' steps. The timers' nesting, the summary's arithmetic,
the paired interval and the verdict on made-up steps."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from conftest import ROOT

CPU = "cpu:"

STEPS, WARMUP, EVERY, LOG_EVERY = 2, 1, 5, 4


def _bench():
    from dist_contrast_bench import train

    return train


@pytest.fixture(scope="module", params=["interleaved", "sequential"])
def result(request, digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train") / "train.json"
    argv = [
        str(ROOT / "configs" / "clip_vit_digits.yaml"),
        f"data.train_shards={digits_dir}/train-*.tar",
        "data.val_shards=",
        "data.tokenizer=bytes",
        "data.tokenizer_path=",
        "data.num_workers=0",
        "train.batch_size=8",
        "text.width=32",
        "text.layers=1",
        f"checkpoint.every={EVERY}",
        f"train.log_every={LOG_EVERY}",
        f"--steps={STEPS}",
        f"--warmup={WARMUP}",
        "--batches=2",
        f"--order={request.param}",
        f"--out={out}",
    ]
    assert _bench().main(argv) == 0
    return json.loads(out.read_text())


def test_floor_computes_the_engines_loss(result):
    """Same weights and batch at step 1: the plain loop's loss is the engine's."""
    engine, floor = result["loss_step1"]["engine"], result["loss_step1"]["floor"]
    assert len(engine) == len(floor) == 1
    assert torch.isfinite(torch.tensor(engine)).all()
    assert floor[0] == pytest.approx(engine[0], rel=1e-6, abs=1e-7)


def test_structure_and_phases(result, capsys):
    assert result["setup"]["world"] == 1 and result["setup"]["batch_size"] == 8
    assert result["steps"] == STEPS and result["warmup"] == WARMUP and result["command"]
    (rank,) = result["ranks"]
    rows = rank["rows"]
    assert len(rows["engine"]) == len(rows["floor"]) == STEPS + WARMUP
    bench = _bench()
    for loop, names in (("engine", bench.ENGINE_PHASES), ("floor", bench.FLOOR_PHASES)):
        for row in rows[loop]:
            for name in ("forward", "loss", "backward", "optimizer"):
                assert row[name] > 0, (loop, name, row)
            named = {k for n in (*names, "wall", "train_step") for k in (n, CPU + n)}
            assert set(row) <= named | {"start"}
            # phases never overlap: their sum is at most the step's wall (and CPU) time
            assert sum(row.get(n, 0.0) for n in names) <= row["wall"] + 1e-6
            assert sum(row.get(CPU + n, 0.0) for n in names) <= row[CPU + "wall"] + 1e-6
    for row in rows["engine"]:
        assert "data" in row and "augment" in row
        inner = sum(row[n] for n in ("forward", "loss", "backward", "optimizer"))
        assert inner <= row["train_step"] + 1e-6  # train_step contains them
    # one real save, at the last step (checkpoint.every > steps); logged at the last step too
    assert [("checkpoint" in r) for r in rows["engine"]] == [False] * (STEPS + WARMUP - 1) + [True]
    assert "log" in rows["engine"][-1]
    # the floor's loop is its four phases: what lies outside them is bookkeeping
    floor = rank["floor"]
    assert 0 <= floor["other"] <= 0.5 * floor["step"]


def test_order_of_the_loops(result):
    """Interleaved: engine step i, then floor step i, then engine step i + 1; sequential: every
    engine step before the first floor step. The interval only where the steps are paired."""
    rows = result["ranks"][0]["rows"]
    engine = [r["start"] for r in rows["engine"]]
    floor = [r["start"] for r in rows["floor"]]
    if result["order"] == "interleaved":
        for i, (e, f) in enumerate(zip(engine, floor, strict=True)):
            assert e < f, i
            if i + 1 < len(engine):
                assert f < engine[i + 1], i
        paired = result["paired"]
        assert paired["pairs"] == STEPS and paired["low"] <= paired["high"]
        assert "paired steps" in _bench().table(result)
    else:
        assert max(engine) < min(floor)
        assert "paired" not in result


def test_summary_figures(result):
    """The step is the steady wall time less the save and the log line, plus the save over
    checkpoint.every and the log line over train.log_every; samples/s follows from it."""
    rank = result["ranks"][0]
    rows = rank["rows"]["engine"]
    save, log = rows[-1]["checkpoint"], rows[-1]["log"]
    engine = result["engine"]
    assert engine["checkpoint"] == pytest.approx(1e3 * save / EVERY)
    assert engine["log"] == pytest.approx(1e3 * log / LOG_EVERY)
    steady = [r["wall"] - r.get("checkpoint", 0.0) - r.get("log", 0.0) for r in rows[WARMUP:]]
    amortised = 1e3 * (save / EVERY + log / LOG_EVERY)
    assert engine["step"] == pytest.approx(1e3 * statistics.fmean(steady) + amortised)
    assert engine["cpu"]["step"] > 0 and result["cpu_ratio"] > 0
    assert engine["samples_per_s"] == pytest.approx(8 / (engine["step"] / 1e3))
    named = sum(engine[p] for p in _bench().ENGINE_PHASES)
    assert engine["other"] == pytest.approx(engine["step"] - named)
    assert result["ratio"] == pytest.approx(
        engine["samples_per_s"] / result["floor"]["samples_per_s"]
    )
    for loop in ("engine", "floor"):
        assert result[loop]["peak_rss_mib"][0] > 0


def test_model_flops_per_sample(result):
    """The counted FLOPs of a step, per sample, against the ViT's own count (matrix products,
    2 per multiply-add; the backward twice the forward, but the patch embedding's once: the
    image needs no gradient): the text tower here (32 wide, 1 layer, a few tokens), the
    projections and the loss add well under 1%. On a CPU no peak is known: TFLOP/s, no MFU."""
    d, depth, patch, size, channels = 128, 4, 4, 16, 1  # vit_nano, the config's patch, grey 16 px
    tokens = (size // patch) ** 2 + 1
    block = 2 * 12 * d * d * tokens + 2 * 2 * tokens * tokens * d  # qkv, proj, 4x MLP; attention
    embed = 2 * channels * patch * patch * d * (tokens - 1)
    vision = 3 * depth * block + 2 * embed
    assert 1.0 <= result["flops_per_sample"] / vision <= 1.01
    for loop in ("engine", "floor"):
        tflops = result[loop]["tflops_per_device"]
        assert tflops == pytest.approx(
            result["flops_per_sample"] * result[loop]["samples_per_s"] / 1e12
        )
        assert result[loop]["mfu"] is None
    assert result["device"] == "cpu" and "(n/a)" in _bench().table(result)


def test_utilisation_reads_the_peak():
    result = {
        "setup": {"world": 2},
        "flops_per_sample": 2e9,
        "engine": {"samples_per_s": 1000.0},
        "floor": {"samples_per_s": 1250.0},
    }
    _bench().utilisation(result, 10.0)
    assert result["engine"]["tflops_per_device"] == pytest.approx(1.0)
    assert result["engine"]["mfu"] == pytest.approx(0.1)
    assert result["floor"]["mfu"] == pytest.approx(0.125)


def _rows(walls: list[float]) -> list[dict]:
    return [{"wall": w} for w in walls]


def test_paired_interval_cancels_a_shared_drift():
    """Pairs whose speed drifts by 30% together, the floor always 4% faster: the interval is
    the pairs' own ratio (0.96) to within the bootstrap's spread of a constant, and the save's
    amortised cost counts against the engine. Unpaired, the same steps' means would say
    nothing about it."""
    bench = _bench()
    drift = [1.0, 1.3, 0.9, 1.2, 1.0, 1.25, 0.95, 1.1]
    engine = _rows([9.0] + [1.0 * d for d in drift])  # the first is warm-up
    floor = _rows([9.0] + [0.96 * d for d in drift])
    ranks = [{"rows": {"engine": engine, "floor": floor}}]
    out = bench.paired_interval(ranks, 1, 0.0)
    assert out["pairs"] == len(drift)
    assert out["ratio"] == pytest.approx(0.96)
    assert 0.955 < out["low"] <= out["ratio"] <= out["high"] < 0.965
    # 100 ms of amortised saves against a 1,087.5 ms mean engine step
    slower = bench.paired_interval(ranks, 1, 100.0)
    mean = 1e3 * statistics.fmean(drift)
    assert slower["ratio"] == pytest.approx(0.96 * mean / (mean + 100.0))
    # the slowest rank of each step is the step
    other = [{"rows": {"engine": _rows([9.0] + [2.0] * 8), "floor": floor}}]
    assert bench.paired_interval([*ranks, *other], 1, 0.0)["ratio"] < 0.6


def test_verdict_reads_the_interval():
    bench = _bench()
    paired = {"ratio": 0.96, "low": 0.951, "high": 0.97, "pairs": 30}
    assert bench.verdict({"ratio": 0.96, "paired": paired}) == "within"
    paired = {"ratio": 0.96, "low": 0.94, "high": 0.98, "pairs": 30}
    assert bench.verdict({"ratio": 0.96, "paired": paired}).startswith("not settled")
    paired = {"ratio": 0.90, "low": 0.88, "high": 0.94, "pairs": 30}
    assert bench.verdict({"ratio": 0.90, "paired": paired}) == "NOT within"
    assert bench.verdict({"ratio": 0.96}) == "within"  # sequential: the ratio alone
    assert bench.verdict({"ratio": 0.94}) == "NOT within"


def test_table_is_printed(result):
    text = _bench().table(result)
    for label in ("data wait", "loss (incl. gathers)", "optimizer step", "samples/s", "RSS"):
        assert label in text
    assert f"{result['ratio']:.3f}" in text


def test_nested_timers_count_to_the_outer_phase():
    from dist_contrast_bench.train_phases import Phases

    phases = Phases(torch.device("cpu"))
    inner = phases.wrap("forward", lambda: 1)
    outer = phases.wrap("log", lambda: inner() + 1)
    total = phases.envelope("train_step", lambda: inner() + outer())
    assert inner() == 1  # outside a step: not recorded
    phases.begin_step()
    assert total() == 3
    phases.begin_step()
    phases.end()
    first, second = phases.rows
    named = {k for n in ("forward", "log", "train_step", "wall") for k in (n, CPU + n)}
    assert set(first) == named | {"start"}
    assert first["forward"] + first["log"] <= first["train_step"] <= first["wall"]
    assert set(second) == {"start", "wall", CPU + "wall"}
    assert first["start"] + first["wall"] <= second["start"]


def test_summarise_amortises_the_saves():
    from dist_contrast_bench.train_phases import summarise

    rows = [
        {"forward": 9.0, "wall": 10.0},  # warm-up
        {"forward": 0.5, "wall": 1.0},
        {"forward": 0.5, "checkpoint": 2.0, "wall": 3.0},
    ]
    out = summarise(rows, 1, ("forward", "checkpoint"), {"checkpoint": 4, "log": 2})
    assert out["forward"] == pytest.approx(500.0)
    assert out["checkpoint"] == pytest.approx(500.0) and out["checkpoint_call_ms"] == 2000.0
    assert "log" not in out  # not a phase of this loop
    assert out["step"] == pytest.approx(1000.0 + 500.0)
    assert out["other"] == pytest.approx(500.0) and out["steps"] == 2
    cpu = [{"cpu:forward": 0.25, "cpu:wall": 0.5}] * 2
    assert summarise(cpu, 0, ("forward",), key="cpu:")["step"] == pytest.approx(500.0)
    with pytest.raises(ValueError, match="no steady steps"):
        summarise(rows, 3, ("forward",))
