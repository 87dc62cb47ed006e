"""Finding shards: brace patterns, globs and comma-separated lists -> shard URLs.

The writers of shards are in :mod:`dist_contrast.data.write`."""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

import braceexpand

from dist_contrast.config.parse import split_top_level
from dist_contrast.data.tario import REMOTE_PREFIXES
from dist_contrast.errors import DataError
from dist_contrast.files import kind_of

__all__ = ["REMOTE_PREFIXES", "dataset_size", "file_kind", "resolve_shards"]


def resolve_shards(spec: str | list[str], what: str = "shards") -> list[str]:
    """Expand brace patterns, globs and comma-separated lists into shard URLs.

    Local paths must exist and be regular files (following links): a FIFO, a device, a
    directory or a missing path, matched by a glob or given literally, is left out and named
    in one warning line (reading a FIFO or a device would block or never end). Remote URLs are
    passed through. A pattern matching no regular file is an error that names it."""
    items = spec if isinstance(spec, list) else split_top_level(spec)
    if not items:
        raise DataError(f"{what}: empty shard pattern")
    urls: list[str] = []
    skipped: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(item):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
                continue
            for path in sorted(glob.glob(url)) if glob.has_magic(url) else [url]:
                kind = file_kind(path)
                if kind == "regular file":
                    urls.append(path)
                else:
                    skipped.append(f"{path} ({kind})")
    if not urls:
        shown = spec if isinstance(spec, str) else ",".join(spec)
        odd = [s for s in skipped if not s.endswith("(missing)")]
        found = f" (only {', '.join(odd[:SHOWN])})" if odd else ""
        what_matched = "no regular file" if odd else "no file"
        raise DataError(f"{what}: shard pattern '{shown}' matched {what_matched}{found}")
    if skipped:
        _warn_once(what, skipped)
    return urls


def file_kind(path: str) -> str:
    """What ``path`` is, links followed: "regular file", "directory", "FIFO", ... or
    "missing" (also a dangling link); nothing is opened."""
    try:
        return kind_of(os.stat(path).st_mode)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"not readable: {exc.strerror or exc}"


_WARNED: set[str] = set()  # each line once per process (the shards are resolved more than once)
SHOWN = 10  # paths named in the warning; the rest counted


def _warn_once(what: str, skipped: list[str]) -> None:
    more = f", and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
    line = (
        f"dist-contrast: warning: {what}: skipped {len(skipped)} path(s) that are not regular "
        f"files: {', '.join(skipped[:SHOWN])}{more}"
    )
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr, flush=True)


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
