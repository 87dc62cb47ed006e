"""The benchmarks of dist-contrast, installed as ``dist_contrast_bench`` (the folder ``bench/``).

    dist-contrast bench NAME [ARGS]      (or: python -m dist_contrast_bench.NAME [ARGS])

A benchmark is a module of this package with ``main(argv) -> int``: it prints a table and
writes JSON (default ``bench/results/NAME.json`` under the current folder, created when
missing). The other modules (``common``, ``loader_data``, ``loader_pipelines``,
``negatives_report``, ``train_phases``) are helpers of the benchmarks, not a public API.
"""
