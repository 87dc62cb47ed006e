"""bench quality: a real 2-step run of one digits config through launch/local.sh and eval, its
table and JSON; config selection errors."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT


def _bench():
    from dist_contrast_bench import quality

    return quality


def test_config_selection():
    q = _bench()
    every = q.find_configs("", ROOT)
    assert ROOT / "configs" / "simclr_digits.yaml" in every
    assert all(p.name.endswith("_digits.yaml") for p in every)
    assert q.find_configs("supcon,simclr_digits", ROOT) == [
        ROOT / "configs" / "supcon_digits.yaml",
        ROOT / "configs" / "simclr_digits.yaml",
    ]
    with pytest.raises(SystemExit, match="no config 'nope' \\(known: .*simclr"):
        q.find_configs("nope", ROOT)
    with pytest.raises(SystemExit):  # no checkout there: no launch/local.sh to train with
        q.main(["--root", str(ROOT / "tests")])


def test_table_marks_failures():
    q = _bench()
    rows = [
        {
            "method": "simclr",
            "train_s": 12.4,
            "status": "ok",
            "knn_top1": 0.9876,
            "knn_top1_random_init": 0.5,
            "linear_top1": 1.0,
            "linear_top1_random_init": 0.25,
        },
        {"method": "metric (triplet)", "train_s": 3.0, "status": "training failed (exit 2): x"},
    ]
    lines = q.table(rows).splitlines()
    assert lines[0].split()[:3] == ["method", "kNN", "trained"]
    assert lines[1].split() == ["simclr", "98.8", "50.0", "100.0", "25.0", "12"]
    assert lines[2].split()[:7] == ["metric", "(triplet)", "-", "-", "-", "-", "3"]
    assert lines[2].endswith("training failed (exit 2): x")


@pytest.mark.slow
def test_two_step_run_writes_table_and_json(digits_dir, tmp_path, capsys):
    q = _bench()
    out = tmp_path / "quality.json"
    argv = [
        "--configs", "simclr", "--steps", "2", "--nproc", "1", "--progress-every", "1",
        "--run-dir", str(tmp_path / "runs"), "--out", str(out), "--root", str(ROOT),
        "--set", f"data.train_shards={digits_dir}/train-*.tar",
        "--set", f"data.val_shards={digits_dir}/val-*.tar",
        "--set", "train.batch_size=16", "--set", "data.num_workers=0",
        "--set", "logging.plots=false",
    ]  # fmt: skip
    assert q.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[1/1] simclr_digits.yaml: ok" in printed and "kNN trained" in printed
    result = json.loads(out.read_text())
    assert result["command"] == "dist-contrast bench quality " + " ".join(argv)
    assert "cores" in result["machine"]
    (row,) = result["results"]
    assert (row["method"], row["steps"], row["status"]) == ("simclr", 2, "ok")
    assert all(0.0 <= row[k] <= 1.0 for k in q.COLUMNS)
    run = tmp_path / "runs" / "simclr"
    assert (run / "eval.json").is_file() and (run / "train.log").is_file()
    assert json.loads((run / "eval.json").read_text())["linear_top1"] == row["linear_top1"]


def test_linear_probe_matches_sklearn_logistic_regression():
    """Our L-BFGS probe and sklearn's LogisticRegression reach the same optimum (mean
    cross-entropy + wd/2 ||W||^2 is sklearn's objective with C = 1 / (n wd)): the same
    validation predictions on overlapping classes, and the same accuracy twice over."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from dist_contrast.eval.probes import linear_probe_top1

    g = torch.Generator().manual_seed(0)
    centers = 1.5 * torch.randn(4, 10, generator=g)
    y = torch.randint(0, 4, (600,), generator=g)
    x = centers[y] + 2.0 * torch.randn(600, 10, generator=g) + 3.0
    train_x, train_y, val_x, val_y = x[:400], y[:400], x[400:], y[400:]
    wd = 1e-2
    ours = linear_probe_top1(train_x, train_y, val_x, val_y, weight_decay=wd)
    assert linear_probe_top1(train_x, train_y, val_x, val_y, weight_decay=wd) == ours

    a = train_x.double().numpy()
    mean, std = a.mean(0), a.std(0, ddof=1)
    ref = LogisticRegression(C=1 / (len(a) * wd), tol=1e-10, max_iter=10_000)
    ref.fit((a - mean) / std, train_y.numpy())
    pred = ref.predict((val_x.double().numpy() - mean) / std)
    want = float(np.mean(pred == val_y.numpy()))
    assert 0.4 < want < 0.95  # a problem where the boundary matters
    assert ours == pytest.approx(want, abs=1 / len(val_y) + 1e-12)
