"""The manifest of a checkpoint folder: the size and SHA-256 of every file it holds.

Written into a step directory (``manifest.json``) after every rank has written its part and
before the folder is renamed into place and ``latest`` moved to it; written the same way into a
universal conversion. Whoever reads the folder checks it first:

- :func:`check_sizes`: every listed file is there, a regular file of the listed size, and no
  other file is (cheap: ``stat`` only; catches truncated, missing, added and swapped files);
- :func:`verify`: the same, then the SHA-256 of every file (or of this rank's share of them:
  the ranks of a job hash different files and agree on the result, see
  :func:`dist_contrast.train.checkpoint.verify_step`).

A damaged file is named in the :class:`Damage` found; nothing is trusted before it passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dist_contrast.errors import CheckpointError
from dist_contrast.files import NotRegularFile, open_regular

MANIFEST = "manifest.json"
FORMAT = "dist-contrast-checkpoint-manifest"
VERSION = 1
CHUNK = 8 << 20  # bytes hashed per read
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few hundred bytes per file


@dataclass(frozen=True)
class Damage:
    """What is wrong with one file of a checkpoint folder."""

    file: str  # relative to the folder
    what: str  # "missing", "sha256 differs", "size 10 (listed 20)", ...

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


def files_of(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, sorted), the manifest left out. A
    symbolic link or any other non-regular entry is listed too (as a file): :func:`check_sizes`
    then refuses it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        base = Path(dirpath)
        # a link to a folder is not walked into: it is an entry of its own
        for d in list(dirnames):
            if (base / d).is_symlink():
                dirnames.remove(d)
                filenames.append(d)
        for name in filenames:
            rel = (base / name).relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            out.append(rel)
    return sorted(out)


def hash_file(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a regular file, read in 8 MB chunks; never follows a link."""
    try:
        f = open_regular(path, follow_links=False)
    except NotRegularFile:
        raise CheckpointError(f"{path}: not a regular file") from None
    with f:
        digest = hashlib.sha256()
        while chunk := f.read(CHUNK):
            digest.update(chunk)
        return os.fstat(f.fileno()).st_size, digest.hexdigest()


def shares(folder: Path, names: list[str], world: int) -> list[list[str]]:
    """``names`` dealt to ``world`` hashers, largest first to the least loaded: the same split
    on every rank (it depends on the names and sizes only)."""
    sized = sorted(((_size(folder / n), n) for n in names), key=lambda t: (-t[0], t[1]))
    load, out = [0] * world, [[] for _ in range(world)]
    for size, name in sized:
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += size
        out[r].append(name)
    return out


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def hash_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` of ``names`` under ``folder``."""
    out = {}
    for name in names:
        size, digest = hash_file(folder / name)
        out[name] = {"size": size, "sha256": digest}
    return out


def write(folder: Path, entries: dict[str, dict], step: int | None = None) -> None:
    """``folder/manifest.json`` (through a temporary file, synced)."""
    doc = {"format": FORMAT, "version": VERSION, "files": dict(sorted(entries.items()))}
    if step is not None:
        doc["step"] = step
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def read(folder: Path) -> dict[str, dict] | None:
    """The files listed by ``folder/manifest.json``; None if there is none (a checkpoint of an
    earlier version). A manifest that is not one is a :class:`CheckpointError`."""
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            raise ValueError("not a regular file of a manifest's size")
        doc = json.loads(path.read_text())
        files = doc["files"]
        if doc.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a checkpoint manifest")
        for name, entry in files.items():
            _check_entry(name, entry)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc})") from None
    return files


def _check_entry(name: str, entry: object) -> None:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise ValueError(f"path {name!r} leaves the folder")
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    )
    if not ok:
        raise ValueError(f"entry of {name!r} is not {{size, sha256}}")


def check_sizes(folder: Path, listed: dict[str, dict]) -> list[Damage]:
    """Missing, extra, non-regular and wrongly sized files of ``folder`` (``stat`` only)."""
    damage = []
    present = set(files_of(folder))
    for name in sorted(present - set(listed)):
        damage.append(Damage(name, "not listed in the manifest"))
    for name, entry in sorted(listed.items()):
        if name not in present:
            damage.append(Damage(name, "missing"))
            continue
        st = (folder / name).lstat()
        if not stat.S_ISREG(st.st_mode):
            damage.append(Damage(name, "not a regular file"))
        elif st.st_size != entry["size"]:
            damage.append(Damage(name, f"size {st.st_size:,} bytes, listed {entry['size']:,}"))
    return damage


def verify_hashes(folder: Path, listed: dict[str, dict], names: list[str]) -> list[Damage]:
    """The files ``names`` (listed, present, of the right size) hashed against the manifest."""
    damage = []
    for name in names:
        try:
            _, digest = hash_file(folder / name)
        except (OSError, CheckpointError) as exc:
            damage.append(Damage(name, f"cannot be read ({getattr(exc, 'strerror', exc)})"))
            continue
        if digest != listed[name]["sha256"]:
            damage.append(Damage(name, "content differs from the manifest (sha256)"))
    return damage


def verify_folder(folder: Path, listed: dict[str, dict]) -> list[Damage]:
    """:func:`check_sizes`, then the SHA-256 of every file. Under a process group a
    collective: each rank hashes its share (:func:`shares`) and every rank gets the whole
    answer; call it on every rank at the same point."""
    from dist_contrast import distributed

    damage = check_sizes(folder, listed)
    mine: list[Damage] = []
    if not damage:
        split = shares(folder, sorted(listed), distributed.world_size())
        mine = verify_hashes(folder, listed, split[distributed.rank()])
    found = distributed.all_gather_object([(d.file, d.what) for d in mine])
    return damage + sorted(Damage(f, w) for part in found for f, w in part)
