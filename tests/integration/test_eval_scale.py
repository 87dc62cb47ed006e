"""Evaluation as a stream over the ranks (issue 18): the figures of 2 ranks equal those of one
process; a CLIP_benchmark-layout set (written here with tarfile, not our writers) evaluated as
it is; evaluation during training (``eval.every``) logged to metrics.jsonl and wandb without
disturbing the losses, and the same after a resume."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
from PIL import Image
from test_cli_errors import _one_clear_line
from test_wandb import _records
from wandb.proto import wandb_internal_pb2

from dist_contrast.config import DIGIT_NAMES, EvalConfig

from conftest import ROOT, run_cli, run_torchrun

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


def test_a_clip_benchmark_set_is_evaluated_as_it_is(clip_run, digits_dir, tmp_path):
    templates = EvalConfig().zeroshot_templates
    bench = tmp_path / "wds_digits"
    _clip_benchmark_set(digits_dir, bench, templates)
    proc = run_cli("export", "--run", str(clip_run), "--out", str(tmp_path / "exp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _eval_export(tmp_path / "exp", bench)
    # the same images (lossless webp) in the same order, labels, class names and templates
    # (from the set's files) as our own validation shards with the config's lists
    ours = _eval_export(tmp_path / "exp", f"{digits_dir}/val-*.tar")
    for key in ("knn_top1", "linear_top1", "zeroshot_top1", "val_samples"):
        assert result[key] == ours[key], key
    assert result["knn_top1"] > 0.5  # the kNN of the image tower tells digits apart
    assert "i2t_r1" not in result and "i2t_r1" in ours  # no captions there: no retrieval


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
