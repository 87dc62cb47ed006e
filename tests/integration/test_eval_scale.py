"""Evaluation as a stream over the ranks: the figures of 2 ranks equal those of one
process; a CLIP_benchmark-layout set (written here with tarfile, not our writers) evaluated as
it is; ``eval --export`` on a run's export gives the figures ``eval --run`` gave the run, and
both keep their peak memory flat in the size of the bank; evaluation during training
(``eval.every``) logged to metrics.jsonl and wandb without disturbing the losses, and the same
after a resume."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from test_cli_errors import _one_clear_line
from test_wandb import _records
from wandb.proto import wandb_internal_pb2

from dist_contrast.config import DIGIT_NAMES, EvalConfig

from conftest import ROOT, cli_env, run_cli, run_torchrun

pytestmark = pytest.mark.slow

QUIET = ["logging.progress=false", "logging.plots=true"]


def _clip_overrides(tmp, digits_dir, digits_tokenizer, *extra) -> list[str]:
    return [
        f"run.dir={tmp}",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
        f"data.tokenizer_path={digits_tokenizer}",
        "data.context_length=24",
        "train.batch_size=16",
        "train.warmup_steps=0",
        "train.log_every=1",
        "method.queue_size=64",
        "deepspeed.zero_stage=0",
        *QUIET,
        *extra,
    ]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, digits_dir, digits_tokenizer):
    tmp = tmp_path_factory.mktemp("eval_scale")
    args = _clip_overrides(
        tmp, digits_dir, digits_tokenizer, "train.steps=3", "logging.wandb=false"
    )
    proc = run_cli("train", "--config", "configs/clip_digits.yaml", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "clip_digits"


@pytest.fixture(scope="module")
def clip_export(clip_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_scale_export") / "exp"
    proc = run_cli("export", "--run", str(clip_run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_ranks_give_the_figures_of_one_process(clip_run):
    """... also with each rank's bank (training features) on disk rather than in memory."""
    one = run_cli("eval", "--run", str(clip_run), "--brief")
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads((clip_run / "eval.json").read_text())
    on_disk = "eval.bank_memory_mb=0"
    two = run_torchrun(2, "eval", "--run-dir", str(clip_run), "--brief", on_disk)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "training features past eval.bank_memory_mb=0 MB" in two.stderr  # on disk
    assert two.stdout.count("kNN top-1") == 1  # rank 0 reports
    double = json.loads((clip_run / "eval.json").read_text())
    assert double == single
    assert single["val_samples"] == 360 and single["train_samples"] == 1437
    assert {"zeroshot_top1", "i2t_r10", "t2i_r1", "knn_top1", "linear_top1"} <= set(single)
    # only the evaluation's own settings change at evaluation time
    _one_clear_line(
        run_cli("eval", "--run", str(clip_run), "train.steps=9"),
        "override 'train.steps=9': only eval.* settings change for an evaluation",
    )


def _clip_benchmark_set(digits_dir, root, templates: list[str]) -> None:
    """The digits validation images as a CLIP_benchmark webdataset folder: classnames.txt,
    zeroshot_classification_templates.txt ({c}), test/nshards.txt, test/{0,1}.tar with
    webp + cls, keys s0000000, ..."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in templates) + "\n"
    )
    n, shards = 0, sorted(digits_dir.glob("val-*.tar"))
    for i, shard in enumerate(shards):
        with tarfile.open(shard) as src, tarfile.open(root / "test" / f"{i}.tar", "w") as dst:
            members = {m.name: src.extractfile(m).read() for m in src if m.isfile()}
            for name, data in sorted(members.items()):
                if not name.endswith(".png"):
                    continue
                key = name[: -len(".png")]
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buf, format="WEBP", lossless=True)
                label = members[f"{key}.cls"]
                for ext, payload in (("webp", buf.getvalue()), ("cls", label)):
                    info = tarfile.TarInfo(f"s{n:07d}.{ext}")
                    info.size = len(payload)
                    dst.addfile(info, io.BytesIO(payload))
                n += 1
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")


def _eval_export(export, data) -> dict:
    proc = run_cli("eval", "--export", str(export), "--data", str(data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])


def test_a_clip_benchmark_set_is_evaluated_as_it_is(clip_export, digits_dir, tmp_path):
    templates = EvalConfig().zeroshot_templates
    bench = tmp_path / "wds_digits"
    _clip_benchmark_set(digits_dir, bench, templates)
    result = _eval_export(clip_export, bench)
    # the same images (lossless webp) in the same order, labels, class names and templates
    # (from the set's files) as our own validation shards with the config's lists
    ours = _eval_export(clip_export, f"{digits_dir}/val-*.tar")
    for key in ("knn_top1", "linear_top1", "zeroshot_top1", "val_samples"):
        assert result[key] == ours[key], key
    assert result["knn_top1"] > 0.5  # the kNN of the image tower tells digits apart
    assert "i2t_r1" not in result and "i2t_r1" in ours  # no captions there: no retrieval


def test_eval_export_gives_the_figures_of_eval_run(clip_run, clip_export, digits_dir):
    """One evaluation path: the export of a run, evaluated on the run's own training and
    validation shards, gives every figure of the run's eval.json (not the baseline's), exactly."""
    from dist_contrast.eval.run import evaluate_run

    run = evaluate_run(clip_run, progress=False)
    proc = run_cli(
        "eval",
        "--export",
        str(clip_export),
        "--data",
        f"{digits_dir}/train-*.tar",
        "--val-data",
        f"{digits_dir}/val-*.tar",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    figures = {k for k in run if not k.endswith("_random_init")} - {"initial_weights"}
    assert {"knn_top1", "linear_top1", "zeroshot_top1", "i2t_r1", "t2i_r10"} <= figures
    assert {k: export.get(k) for k in figures} == {k: run[k] for k in figures}
    assert export["split"] == "given" and export["val_samples"] == 360


# One process measures the peak resident memory of each evaluation (the peak reset before it,
# /proc/self/clear_refs), of `eval --run`'s sets (figures.evaluate on run_sets) and of
# `eval --export`'s (export_figures), with the export's image encoder widened to 8192-d
# features (a fixed random projection) so that the bank's features dominate what could grow:
# the digits' 128-d features of 1,437 samples are 0.7 MB. The linear probe's float64 blocks are
# made 4 MB (32 MB otherwise: the whole bank of this size in one block). A warm-up evaluation
# first (the first one allocates ~90 MB once); glibc's mmap threshold fixed (set by the test) so
# that freed blocks leave the resident set at once: the peaks then repeat to ~0.2 MB.
PEAK_CHILD = """
import json, sys
from pathlib import Path
import torch
from dist_contrast.eval import figures, probes
from dist_contrast.eval.export import export_figures
from dist_contrast.eval.memory import release_freed_memory
from dist_contrast.export import load_encoder

export, small, large, val = sys.argv[1:]
probes.PROBE_BLOCK_BYTES = 4 << 20
enc = load_encoder(export)
cfg = enc.config
cfg.eval.linear_max_iter = 3
widen = torch.randn(enc.info["output_dim"], 8192, generator=torch.Generator().manual_seed(0))
towers = figures.Towers(lambda x: {"encoder": enc.module(x) @ widen})

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

def rise(path, data, bank_mb):
    cfg.eval.bank_memory_mb = bank_mb
    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")
    start = status("VmRSS")
    if path == "run":
        cfg.data.train_shards, cfg.data.val_shards = data, val
        out = figures.evaluate(cfg, towers, figures.run_sets(cfg))
    else:
        out = export_figures(cfg, towers, data, val, desc="")
    return {"rise_mb": status("VmHWM") - start, "train_samples": out["train_samples"]}

cfg.data.train_shards = cfg.data.val_shards = val
figures.evaluate(cfg, towers, figures.run_sets(cfg), max_samples=100)
sets = {"small": small, "large": large}
runs = [(p, s, 0) for p in ("run", "export") for s in sets] + [("export", "large", 1024)]
print(json.dumps({f"{p} {s} {mb}": rise(p, sets[s], mb) for p, s, mb in runs}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak reset")
def test_peak_memory_is_flat_in_the_bank_size_for_runs_and_exports(clip_export, digits_dir):
    """With the bank on disk (eval.bank_memory_mb=0), growing it from 360 samples to 1,437
    (35 MB more features) raises the peak of neither path by a quarter of that; the same bank
    held in memory raises it by most of the bank's 47 MB (what is measured sees the bank)."""
    val = f"{digits_dir}/val-*.tar"
    args = [str(clip_export), val, f"{digits_dir}/train-*.tar", val]
    env = {**cli_env(), "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, "-c", PEAK_CHILD, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    row_mb = 8192 * 4 / 2**20
    n = {s: peaks[f"export {s} 0"]["train_samples"] for s in ("small", "large")}
    assert n == {"small": 360, "large": 1437}
    growth_mb = (n["large"] - n["small"]) * row_mb
    for path in ("run", "export"):
        rise = peaks[f"{path} large 0"]["rise_mb"] - peaks[f"{path} small 0"]["rise_mb"]
        assert rise < 0.25 * growth_mb, (path, peaks)
    in_memory = peaks["export large 1024"]["rise_mb"] - peaks["export large 0"]["rise_mb"]
    assert in_memory > 0.6 * n["large"] * row_mb, peaks


def _wandb_eval_steps(run) -> list[int]:
    steps = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        for raw in _records(next(folder.glob("run-*.wandb"))):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") != "history":
                continue
            keys = {item.key or "/".join(item.nested_key) for item in record.history.item}
            if "eval/zeroshot_top1" in keys:
                steps.append(record.history.step.num)
    return steps


def _rows(run) -> tuple[list[float], dict[int, dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = {r["step"]: r for r in rows if "eval/knn_top1" in r}
    return losses, evals


def test_eval_every_logs_figures_and_leaves_training_alone(tmp_path, digits_dir, digits_tokenizer):
    base = _clip_overrides(tmp_path, digits_dir, digits_tokenizer, "train.steps=8")
    every = ["eval.every=2", "eval.max_samples=200"]

    def train(name, *extra):
        proc = run_torchrun(
            2,
            "train",
            "--config",
            str(ROOT / "configs/clip_digits.yaml"),
            *base,
            f"run.name={name}",
            *extra,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return tmp_path / name

    with_eval = train("with_eval", *every, "checkpoint.every=4")
    without = train("without")
    losses, evals = _rows(with_eval)
    assert sorted(evals) == [2, 4, 6, 8]
    assert {"eval/zeroshot_top1", "eval/i2t_r1", "eval/linear_top1"} <= set(evals[8])
    assert evals[8]["eval/val_samples"] == 200
    assert losses == _rows(without)[0]  # bit-identical: the evaluation took nothing away
    assert _wandb_eval_steps(with_eval) == [2, 4, 6, 8]
    assert (with_eval / "plots" / "eval.png").is_file()
    # the run put back to its checkpoint of step 4 and resumed: the same figures at 6 and 8
    resumed = tmp_path / "resumed"
    shutil.copytree(with_eval, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    train("resumed", *every, "checkpoint.resume=latest")
    r_losses, r_evals = _rows(resumed)
    assert r_losses == losses
    assert {s: r_evals[s] for s in (6, 8)} == {s: evals[s] for s in (6, 8)}


def test_eval_every_under_zero3_with_uneven_shares_ends_with_the_final_figures(
    tmp_path, digits_dir, digits_tokenizer
):
    """ZeRO-3 partitions the parameters and gathers them in each module's forward: ranks with
    different numbers of evaluation batches (here 8 and 7: shards of 100 split 737 / 700) used
    to wait for each other forever. The periodic figures at the last step equal those of
    `dist-contrast eval` on the consolidated checkpoint of that step."""
    args = _clip_overrides(
        tmp_path,
        digits_dir,
        digits_tokenizer,
        "deepspeed.zero_stage=3",
        "train.steps=2",
        "eval.every=2",
        "eval.batch_size=100",
        "logging.wandb=false",
    )
    proc = run_torchrun(2, "train", "--config", "configs/clip_digits.yaml", *args, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "clip_digits"
    periodic = _rows(run)[1][2]
    assert periodic["eval/train_samples"] == 1437  # every sample, unevenly shared
    one = run_cli("eval", "--run", str(run), "--brief", "eval.batch_size=100")
    assert one.returncode == 0, one.stderr[-3000:]
    final = json.loads((run / "eval.json").read_text())
    figures = {k.removeprefix("eval/"): v for k, v in periodic.items() if k.startswith("eval/")}
    assert figures == {k: final[k] for k in figures}
