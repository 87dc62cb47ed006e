"""The evaluation benchmark runs in quick mode (each measured run a fresh process) and writes
its three sections; the chunked recall equals the naive full-matrix reference. No timed
assertions."""

from __future__ import annotations

import json

import pytest
import torch


def _bench():
    from dist_contrast_bench import eval as bench

    return bench


def _runs():
    from dist_contrast_bench import eval_runs

    return eval_runs


def test_quick_bench_writes_three_sections(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "eval.json"
    argv = ["--quick", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cpu"] and result["date"] and "--quick" in result["command"]
    assert result["command"].startswith("dist-contrast bench eval")

    knn = result["knn"]
    assert [(r["feature_dtype"], r["bank_memory_mb"], r["N"]) for r in knn["rows"]] == [
        (dtype, mb, n) for dtype in ("fp32", "fp16") for mb in (1024, 0) for n in (2000, 5000)
    ]
    assert [r["bank_on_disk"] for r in knn["rows"]] == [
        r["bank_memory_mb"] == 0 for r in knn["rows"]
    ]
    for row in knn["rows"]:
        assert row["queries"] == 500 and 0.0 <= row["top1"] <= 1.0
        size = 4 if row["feature_dtype"] == "fp32" else 2
        assert row["feature_mb"] == row["N"] * 64 * size / 1e6
        assert row["peak_rss_mb"] > row["feature_mb"] > 0 and row["wall_seconds"] > 0
        assert set(row["phases"]) == {"embed_queries", "embed_bank", "knn"}
    assert {r["allocator"] for r in knn["rows"]} == {"glibc"}
    # fp16 features: the same neighbours up to rounding (the bank is small and well separated)
    top1 = {(r["feature_dtype"], r["N"]): r["top1"] for r in knn["rows"] if r["bank_memory_mb"]}
    assert abs(top1["fp16", 5000] - top1["fp32", 5000]) <= 0.01
    # the bank read back from disk: the same neighbours exactly
    by = {(r["feature_dtype"], r["bank_memory_mb"], r["N"]): r for r in knn["rows"]}
    for (dtype, mb, n), row in by.items():
        assert row["top1"] == by[dtype, 1024, n]["top1"]
        held = 0.0 if mb == 0 else row["feature_mb"]
        assert row["peak_minus_features_mb"] == row["peak_rss_mb"] - held
    summary = knn["summary"]
    assert summary["glibc, fp32 features, eval.bank_memory_mb=1024"]["peak_ratio_raw"] > 0
    assert (
        "minus_features_flat_within_10pct" in summary["glibc, fp16 features, eval.bank_memory_mb=0"]
    )

    zs = result["zeroshot"]
    assert zs["templates"] == zs["distinct_templates"] == 8
    _check_zeroshot_figures(zs, classes=50, templates=8, width=64, batch_size=512, seed=0)

    rt = result["retrieval"]
    assert (rt["images"], rt["captions"]) == (200, 1000)
    ref = rt["reference"]
    assert ref["equal"] and ref["chunked"] == ref["naive"]
    # --quick checks every image against the naive reference: the recall reported is the naive
    assert (ref["images"], ref["captions"]) == (200, 1000) and rt["recall"] == ref["naive"]
    assert set(ref["naive"]) == {"i2t", "t2i"} and set(ref["naive"]["i2t"]) == {"1", "5", "10"}
    assert rt["full_matrix_mb"] == 4 * 200 * 1000 / 1e6

    printed = capsys.readouterr().out
    assert "Streaming kNN" in printed and "Zero-shot" in printed and "Retrieval" in printed


def _check_zeroshot_figures(zs, classes, templates, width, batch_size, seed):
    """The zero-shot section against the class embeddings computed here with the library (the
    bench's seeded text tower rebuilt, on as many threads as its run had): their shape and
    largest norm error (to the fp32 spacing below 1.0), the prompt counts, and ``ok`` as the
    conjunction it stands for."""
    from dist_contrast.data.tokenizer import ByteTokenizer
    from dist_contrast.eval.image_text import class_embeddings
    from dist_contrast.models.text import TextTransformer
    from dist_contrast_bench.common import usable_cores

    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cores())  # the bench's default --threads
    try:
        torch.manual_seed(seed)
        tok = ByteTokenizer(32)
        tower = TextTransformer(tok.vocab_size, 32, tok.eot_id, width=width, layers=2, heads=4)
        names, tmpl = [f"class {c}" for c in range(classes)], _bench().CLIP_TEMPLATES[:templates]
        emb = class_embeddings(tower.eval(), tok, names, tmpl, batch_size)
    finally:
        torch.set_num_threads(threads)
    error = float((emb.norm(dim=1) - 1).abs().max())
    assert zs["shape"] == list(emb.shape) == [classes, width]
    assert zs["max_norm_error"] == pytest.approx(error, abs=6e-8) and error < 1e-5
    assert zs["unit_norms"] is True and zs["finite"] is bool(torch.isfinite(emb).all()) is True
    prompts = classes * templates
    assert (zs["classes"], zs["templates"], zs["prompts"]) == (classes, templates, prompts)
    assert zs["all_prompt_features_mb"] == pytest.approx(prompts * width * 4 / 1e6)
    assert zs["us_per_prompt"] == pytest.approx(zs["seconds"] / prompts * 1e6)
    assert zs["ok"] is True and [r["ok"] for r in zs["runs"]] == [True] * len(zs["runs"])


def test_zeroshot_ok_needs_shape_norms_and_finiteness(monkeypatch):
    """``ok`` of the zero-shot section, from made-up measured runs: false when any run (of any
    allocator) has the wrong shape, a norm off 1 or a non-finite value."""
    bench = _bench()
    good = {"shape": [50, 64], "unit_norms": True, "finite": True, "allocator": "glibc"}
    good.update(peak_rss_mb=1.0, baseline_rss_mb=1.0, wall_seconds=1.0)
    good["phases"] = {"class_embeddings": {"rise_mb": 0.0, "seconds": 1.0}}
    args = bench._parse(["--quick", "--parts", "zeroshot", "--allocators", "glibc,mmap128k"])
    runs = []
    monkeypatch.setattr(bench, "run_child", lambda kind, spec, timeout, a: dict(runs.pop(0)))
    for bad, want in [({}, True), ({"shape": [50, 63]}, False), ({"shape": [64, 50]}, False),
                      ({"unit_norms": False}, False), ({"finite": False}, False)]:  # fmt: skip
        runs[:] = [good, dict(good, allocator="mmap128k", **bad)]
        zs = bench._zeroshot(args)
        assert zs["ok"] is want and [r["ok"] for r in zs["runs"]] == [True, want], bad


def test_allocator_setting_reaches_the_measured_process(tmp_path):
    bench = _bench()
    out = tmp_path / "eval.json"
    argv = ["--quick", "--parts", "retrieval", "--allocators", "mmap128k", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert "knn" not in result and "zeroshot" not in result
    runs = result["retrieval"]["runs"]
    assert [r["allocator"] for r in runs] == ["mmap128k"] and runs[0]["equal"]
    assert bench.ALLOCATORS["mmap128k"] == {"MALLOC_MMAP_THRESHOLD_": "131072"}


def test_reference_recall_counts_the_first_relevant_rank():
    runs = _runs()
    query = torch.eye(3)
    items = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.4], [0.0, 0.0, 1.0]])
    # query 0's relevant item (key 5) ranks 2nd, query 1's (key 1) 1st, query 2 has none
    qk, ik = torch.tensor([5, 1, 9]), torch.tensor([1, 0, 5, 7])
    assert runs.reference_recall(query, items, qk, ik) == {1: 1 / 3, 5: 2 / 3, 10: 2 / 3}
    from dist_contrast.eval.image_text import recall_at

    assert recall_at(query, items, qk, ik, (1, 5, 10), chunk=2) == {1: 1 / 3, 5: 2 / 3, 10: 2 / 3}


def test_eighty_distinct_templates():
    templates = _bench().CLIP_TEMPLATES
    assert len(templates) == len(set(templates)) == 80
    assert all(t.count("{}") == 1 for t in templates)


def test_cli_lists_and_helps_the_eval_bench(capsys):
    from dist_contrast.cli import _benchmarks, main

    assert "eval" in _benchmarks()
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "eval", "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "dist-contrast bench eval" in printed and "--quick" in printed
    assert "--child" not in printed


def test_bench_rejects_bad_arguments(tmp_path):
    bench = _bench()
    out = str(tmp_path / "x.json")
    bad = (["--sizes", "a,b"], ["--parts", "nope"], ["--zs-templates", "81"])
    for argv in (*bad, ["--allocators", "tcmalloc"]):
        with pytest.raises(SystemExit):
            bench.main([*argv, "--out", out])
