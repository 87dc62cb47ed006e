"""Evaluation sets as people keep them, cut into independently readable units.

:func:`open_eval_set` recognises, in this order:

1. The CLIP_benchmark webdataset layout (the ``wds_*`` sets of ``clip_benchmark`` on the
   Hugging Face hub): ``ROOT/classnames.txt`` (line i names label i), optionally
   ``ROOT/zeroshot_classification_templates.txt`` (``{c}`` marks the class name) and
   ``ROOT/dataset_type.txt``, shards ``ROOT/<split>/0.tar, 1.tar, ...`` with
   ``ROOT/<split>/nshards.txt`` giving their number. Samples carry an image (``webp`` by
   default) and ``cls`` (the label as text); retrieval sets carry ``txt`` and no classes.
2. A folder of class folders, ``ROOT/<class>/*.jpg`` (label = index of the sorted class
   folder name), as ImageNet's ``val/`` is kept; ``classnames.txt`` and the templates file
   in ROOT win over the folder names.
3. A shard pattern (:func:`~dist_contrast.data.shards.resolve_shards`), one unit per shard,
   with ``classnames.txt`` / the templates file beside the shards when they share a folder.

:func:`unit_samples` reads a unit as raw samples (extension -> bytes, ``__key__``), the way
:func:`~dist_contrast.data.tario.tar_samples` yields them, so
:func:`~dist_contrast.data.decode.decode_or_count` decodes both kinds unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dist_contrast.data.shards import REMOTE_PREFIXES, resolve_shards
from dist_contrast.data.tario import Faults, tar_samples
from dist_contrast.data.write.inputs import IMAGE_EXTS, _visible
from dist_contrast.errors import DataError

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
NSHARDS = "nshards.txt"
EVAL_IMAGE_EXTS = (*IMAGE_EXTS, "bmp")
FILES_PER_UNIT = 1000
# The sample key a file's bytes travel under. decode.py looks for jpg/jpeg/png/webp and PIL
# opens the bytes by their content, so a BMP travels under png (it has no key of its own).
_SAMPLE_KEY = {"jpeg": "jpg", "bmp": "png"}


@dataclass(frozen=True)
class Unit:
    """One independently readable piece of a set, in order."""

    kind: str  # "shard" (a WebDataset tar URL) or "files" (a list of image files)
    url: str = ""  # for "shard"
    files: tuple[tuple[str, int], ...] = ()  # for "files": (path, label) pairs


@dataclass
class EvalSet:
    spec: str  # what the user gave
    units: list[Unit]  # in a fixed, deterministic order
    classnames: list[str] | None  # by label index, when the set names its classes
    templates: list[str] | None  # zero-shot prompt templates with "{}" for the class name


def natural_key(name: str) -> list:
    """Sort key under which ``2.tar`` comes before ``10.tar``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _layouts() -> str:
    return (
        f"give a CLIP_benchmark folder (ROOT/{CLASSNAMES}, ROOT/<split>/*.tar), a folder of "
        "class folders (ROOT/<class>/*.jpg) or a shard pattern such as DIR/{000000..000009}.tar"
    )


# ---- class names and templates -------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"cannot read '{path}': {exc.strerror or exc}") from None


def read_classnames(path: Path) -> list[str]:
    """Line i names label i; trailing blank lines are dropped, an inner blank one is an error."""
    names = [line.strip() for line in _read_text(path).splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f"'{path}' is empty: write one class name per line (line i = label i)")
    if "" in names:
        line = names.index("") + 1
        raise DataError(f"'{path}' line {line} is empty: every label index needs a class name")
    return names


def read_templates(path: Path) -> list[str] | None:
    """One template a line, CLIP_benchmark's ``{c}`` turned into ``{}``; None if none."""
    lines = [line.strip() for line in _read_text(path).splitlines()]
    templates = [line.replace("{c}", "{}") for line in lines if line]
    return templates or None


def _names_in(folder: Path) -> tuple[list[str] | None, list[str] | None]:
    names = folder / CLASSNAMES
    templates = folder / TEMPLATES
    return (
        read_classnames(names) if names.is_file() else None,
        read_templates(templates) if templates.is_file() else None,
    )


def _names_near(folder: Path) -> tuple[list[str] | None, list[str] | None]:
    """Class names and templates in ``folder``, else in its parent when ``folder`` is a split
    folder of a CLIP_benchmark set (it holds nshards.txt)."""
    names, templates = _names_in(folder)
    if names is None and templates is None and (folder / NSHARDS).is_file():
        return _names_in(folder.parent)
    return names, templates


# ---- 1. CLIP_benchmark webdataset layout ---------------------------------------------------


def _tars_in(folder: Path) -> list[str]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    tars = [e.name for e in entries if e.name.endswith(".tar") and not e.name.startswith(".")]
    return sorted(tars, key=natural_key)


def _is_split(folder: Path) -> bool:
    return (folder / NSHARDS).is_file() or bool(_tars_in(folder))


def _splits(root: Path) -> list[str]:
    subdirs = [n for n in _visible(os.listdir(root)) if (root / n).is_dir()]
    return [n for n in subdirs if _is_split(root / n)]


def _nshards(split_dir: Path) -> int | None:
    path = split_dir / NSHARDS
    if not path.is_file():
        return None
    text = _read_text(path).strip()
    try:
        n = int(text)
    except ValueError:
        raise DataError(f"'{path}' holds '{text[:40]}', not a number of shards") from None
    if n < 0:
        raise DataError(f"'{path}' holds a negative number of shards ({n})")
    return n


def _clip_benchmark(spec: str, root: Path, split: str, splits: list[str]) -> EvalSet:
    split_dir = root / split
    if split not in splits:
        raise DataError(
            f"CLIP_benchmark set '{root}' has no split '{split}' (no {split_dir}/*.tar); "
            f"choose one of its splits: {', '.join(splits)}"
        )
    tars = _tars_in(split_dir)
    n = _nshards(split_dir)
    if n is not None:  # what clip_benchmark reads: {0..n-1}.tar
        expected = [f"{i}.tar" for i in range(n)]
        present = set(tars)
        missing = [t for t in expected if t not in present]
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if missing[3:] else ""
            )
            raise DataError(
                f"'{split_dir}' lacks {shown} of the {n} shards {NSHARDS} lists: "
                "download the missing shards"
            )
        tars = expected
    if not tars:
        raise DataError(f"'{split_dir}' holds no shards (*.tar): download the split's shards")
    names, templates = _names_in(root)
    return EvalSet(spec, [Unit("shard", url=str(split_dir / t)) for t in tars], names, templates)


# ---- 2. class folders ----------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower().lstrip(".") in EVAL_IMAGE_EXTS


def _images_in(folder: Path) -> list[str]:
    try:
        found = [e.name for e in os.scandir(folder) if _is_image(e.name) and e.is_file()]
    except OSError as exc:
        raise DataError(f"cannot list class folder '{folder}': {exc.strerror or exc}") from None
    return _visible(found)


def _class_folders(spec: str, root: Path) -> EvalSet:
    classes = [n for n in _visible(os.listdir(root)) if (root / n).is_dir()]
    files = [(str(root / c / f), k) for k, c in enumerate(classes) for f in _images_in(root / c)]
    if not files:
        exts = "|".join(EVAL_IMAGE_EXTS)
        raise DataError(
            f"eval set '{root}' holds no image in a class folder: expected "
            f"{root}/<class>/*.{{{exts}}}, or a CLIP_benchmark folder with <split>/*.tar"
        )
    names, templates = _names_in(root)
    if names is not None and len(names) != len(classes):
        raise DataError(
            f"'{root / CLASSNAMES}' names {len(names)} classes but '{root}' holds "
            f"{len(classes)} class folders: make them match (line i = sorted folder i)"
        )
    if names is None:
        names = [c.replace("_", " ") for c in classes]
    units = [
        Unit("files", files=tuple(files[i : i + FILES_PER_UNIT]))
        for i in range(0, len(files), FILES_PER_UNIT)
    ]
    return EvalSet(spec, units, names, templates)


# ---- 3. shard patterns ---------------------------------------------------------------------


def _shard_pattern(spec: str, what: str) -> EvalSet:
    try:
        urls = resolve_shards(spec, what)
    except DataError:
        raise DataError(f"{what} '{spec}' matches nothing: {_layouts()}") from None
    urls = sorted(urls, key=natural_key)
    names = templates = None
    folders = {os.path.dirname(u) for u in urls}
    if len(folders) == 1 and not urls[0].startswith(REMOTE_PREFIXES):
        names, templates = _names_near(Path(folders.pop() or "."))
    return EvalSet(spec, [Unit("shard", url=u) for u in urls], names, templates)


# ---- the entry points ----------------------------------------------------------------------


def open_eval_set(spec: str, what: str = "eval set", split: str = "test") -> EvalSet:
    """The units, class names and templates of the eval set ``spec`` (see the module doc)."""
    spec = spec.strip()
    if not spec:
        raise DataError(f"{what}: empty; {_layouts()}")
    root = Path(spec)
    if not spec.startswith(REMOTE_PREFIXES) and root.is_dir():
        splits = _splits(root)
        if splits:
            return _clip_benchmark(spec, root, split, splits)
        if _tars_in(root):  # a folder of shards (a CLIP_benchmark split folder, say)
            units = [Unit("shard", url=str(root / t)) for t in _tars_in(root)]
            return EvalSet(spec, units, *_names_near(root))
        return _class_folders(spec, root)
    return _shard_pattern(spec, what)


def _file_sample(path: str, label: int, faults: Faults) -> dict | None:
    stem, ext = os.path.splitext(path)
    ext = ext.lower().lstrip(".")
    folder, name = os.path.split(stem)
    root, cls = os.path.split(folder)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        reason = "missing_image" if isinstance(exc, FileNotFoundError) else "corrupt_image"
        faults.add(reason, f"{path}: {exc.strerror or exc}")
        return None
    return {
        "__key__": f"{cls}/{name}",
        "__url__": root,
        _SAMPLE_KEY.get(ext, ext): data,
        "cls": str(label).encode(),
    }


def unit_samples(unit: Unit, faults: Faults) -> Iterator[dict]:
    """The raw samples of ``unit``, in order; an unreadable file or shard is counted in
    ``faults`` and skipped."""
    if unit.kind == "shard":
        yield from tar_samples(unit.url, faults)
        return
    if unit.kind != "files":
        raise ValueError(f"unknown unit kind {unit.kind!r}")
    for path, label in unit.files:
        sample = _file_sample(path, label, faults)
        if sample is not None:
            yield sample
