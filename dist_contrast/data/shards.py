"""Finding shards: brace patterns, globs and comma-separated lists -> shard URLs.

The writers of shards are in :mod:`dist_contrast.data.write`."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import braceexpand

from dist_contrast.config.parse import split_top_level
from dist_contrast.errors import DataError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


def resolve_shards(spec: str | list[str], what: str = "shards") -> list[str]:
    """Expand brace patterns, globs and comma-separated lists into shard URLs.

    Local paths must exist; remote URLs are passed through. A pattern matching no file is an
    error that names it."""
    items = spec if isinstance(spec, list) else split_top_level(spec)
    if not items:
        raise DataError(f"{what}: empty shard pattern")
    urls: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(item):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
            elif glob.has_magic(url):
                urls.extend(sorted(glob.glob(url)))
            elif os.path.isfile(url):
                urls.append(url)
    if not urls:
        shown = spec if isinstance(spec, str) else ",".join(spec)
        raise DataError(f"{what}: shard pattern '{shown}' matched no file")
    return urls


def dataset_size(spec: str | list[str], what: str = "shards") -> int:
    """Samples of every split in the one ``counts.json`` beside the shards of ``spec`` (what
    ``dist-contrast shards`` writes); a :class:`DataError` if there is no single one."""
    folders = {Path(u).parent for u in resolve_shards(spec, what)}
    counts = [d / "counts.json" for d in folders]
    if len(folders) != 1 or not counts[0].is_file():
        raise DataError(f"{what}: no single counts.json beside the shards")
    try:
        splits = json.loads(counts[0].read_text())
        return sum(int(s["samples"]) for s in splits.values())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise DataError(f"{counts[0]} is not a counts.json of dist-contrast shards") from None
