"""The config reference, ``docs/configs.md``, generated from the schema's docstrings.

Each section of :class:`~dist_contrast.config.schema.Config` becomes a table of its keys: type
and default read from the dataclass, meaning from the field's docstring (the string right below
the field in :mod:`dist_contrast.config.schema`; the section's is its class docstring). After a
change to the schema, regenerate the page::

    python -m dist_contrast.config.reference docs/configs.md

A test compares the checked-in page with :func:`render` and fails when it is stale or when a key
has no docstring (:func:`undocumented`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dist_contrast.config.schema import Config

COMMAND = "python -m dist_contrast.config.reference docs/configs.md"

INTRO = """\
A run is one typed dataclass tree (`dist_contrast/config/schema.py`) with a default for every
key. A YAML file in `configs/` is a small diff over the defaults, and its first lines name the
command that runs it. `section.key=value` overrides on the command line go on top
(`dist_contrast/config/parse.py`); `dist_contrast/config/validate.py` checks the result, and
`train --check` checks config, shards and run directory without starting a process group:
the method/loss/label fit, the tokenizer, that the training shards can feed every loader
worker of the job (`--world N`: the job's ranks; the launcher's, else 1, by default;
`launch/local.sh` passes its NPROC), that a sharded queue's `method.queue_size` is a multiple of
those ranks (a resume on another number of ranks keeps the nearest multiple instead) and that
`data.val_shards` match files (`""`: none, and evaluation then refuses). An override value that
is not YAML is one line, except a `[...]` list of brace patterns, which is a list of those
patterns (`'data.train_shards=[a-{0..9}.tar,b-{0..3}.tar]'`). Anchors and aliases work, up to
10,000 values added by expanding them (more, an alias bomb, or an alias inside its own anchor is
one line, refused before anything is built); a config path that is not a regular file (a FIFO)
is refused, never waited on. `config.yaml` in a run directory holds the resolved tree. Back to
the [README](../README.md#configs).

```bash
dist-contrast train --config configs/simclr_digits.yaml train.steps=500 loss.temperature=0.1
dist-contrast train --config configs/simclr_digits.yaml --check   # validate config, shards, run dir
dist-contrast train --config configs/simclr_digits.yaml data.num_workers=8 --check --world 2
# dist-contrast: error: data.train_shards: 8 shard(s) for 2 rank(s) x 8 worker(s); ...
```
"""

OUTRO = """\
## Mistakes

Mistakes are one line and a non-zero exit, never a traceback:

```
$ dist-contrast train --config configs/simclr_digits.yaml train.stpes=10
dist-contrast: error: unknown config key 'train.stpes' (did you mean 'train.steps'?)
$ dist-contrast train --config configs/simclr_digits.yaml train.batch_size=big
dist-contrast: error: config key 'train.batch_size' must be int, got str 'big'
$ dist-contrast train --config configs/simclr_digits.yaml data.train_shards='x-{0..9}.tar'
dist-contrast: error: data.train_shards: shard pattern 'x-{0..9}.tar' matched no file
```

A run directory that already holds checkpoints or metrics is never overwritten: the command
asks for `checkpoint.resume=latest`, another `run.name`, or `run.overwrite=true`.
"""


@dataclass(frozen=True)
class Key:
    """One leaf of the tree: its dotted name, annotated type, default and docstring."""

    dotted: str
    type: Any
    default: Any
    doc: str


@dataclass(frozen=True)
class Section:
    """The leaves of one dataclass of the tree (``dotted`` its key) and its class docstring."""

    dotted: str
    doc: str
    keys: list[Key]


@functools.cache
def _module_tree(module: str) -> ast.Module:
    return ast.parse(inspect.getsource(sys.modules[module]))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of the dataclass ``cls`` by field name (a field without one
    is absent), and the class docstring under ``""``: read from the module's source, since
    Python keeps no attribute docstrings."""
    tree = _module_tree(cls.__module__)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs = {"": ast.get_docstring(node) or ""}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def sections(root: type = Config) -> list[Section]:
    """The dataclasses of the tree ``root`` in declaration order, depth first, each with its
    leaves (the leaves of ``root`` itself, if any, first, as the section ``""``)."""
    return _walk(root, root(), "", "")


def _walk(cls: type, value: Any, dotted: str, doc: str) -> list[Section]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        name = f"{dotted}.{f.name}" if dotted else f.name
        child = getattr(value, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            nested += _walk(hints[f.name], child, name, field_docs(hints[f.name])[""])
        else:
            keys.append(Key(name, hints[f.name], child, docs.get(f.name, "")))
    here = [Section(dotted, doc, keys)] if keys or dotted else []
    return here + nested


def undocumented(root: type = Config) -> list[str]:
    """The dotted keys of ``root``'s tree, sections included, that have no docstring."""
    out = []
    for section in sections(root):
        if section.dotted and not section.doc.strip():
            out.append(section.dotted)
        out += [key.dotted for key in section.keys if not key.doc.strip()]
    return out


DOC_LINK = re.compile(r"(?<![\w/`])docs/([\w.-]+\.md(?:#[\w-]+)?)")


def _link(match: re.Match) -> str:
    target = match.group(1)
    page, _, anchor = target.partition("#")
    label = anchor.replace("-", " ") if anchor else page.removesuffix(".md")
    return f"[{label}]({target})"


def _prose(text: str) -> str:
    """A docstring as one markdown paragraph: ``docs/NAME.md#anchor`` becomes a link there,
    labelled with the anchor's words (the page's name without one)."""
    return DOC_LINK.sub(_link, " ".join(text.split()))


def type_text(tp: Any) -> str:
    """``tp`` for the table: a Literal as its choices, a union as its arms."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (typing.Union, type(int | str)):
        return " or ".join(type_text(arm) for arm in typing.get_args(tp))
    name = tp.__name__ if origin is None and isinstance(tp, type) else str(tp)
    return f"`{name.replace('typing.', '')}`"


def default_text(value: Any) -> str:
    """A default as a YAML file would write it (JSON for lists and mappings)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value if value else '""'
    elif isinstance(value, list | dict):
        text = json.dumps(value)
    else:
        text = repr(value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(section: Section) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key in section.keys:
        cells = (f"`{key.dotted}`", type_text(key.type), default_text(key.default), key.doc)
        rows.append("| " + " | ".join(_cell(_prose(c)) for c in cells) + " |")
    return rows


def render(root: type = Config) -> str:
    """The whole page: title, introduction, one table per section, the closing notes."""
    parts = sections(root)
    index = ", ".join(f"[{s.dotted}](#{s.dotted.replace('.', '')})" for s in parts if s.dotted)
    lines = [
        "# Configs: every key",
        "",
        f"Generated by `{COMMAND}` from the docstrings of",
        "`dist_contrast/config/schema.py`; do not edit by hand: a test fails when this page and",
        "the schema differ.",
        "",
        INTRO,
        f"Sections: {index}.",
        "",
    ]
    for section in parts:
        if section.dotted:
            lines += [f"## {section.dotted}", "", _prose(section.doc), ""]
        if section.keys:
            lines += [*_table(section), ""]
    lines.append(OUTRO)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m dist_contrast.config.reference [PATH]``: the page to PATH, else stdout."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(f"usage: {COMMAND.replace('docs/configs.md', '[PATH]')}", file=sys.stderr)
        return 2
    missing = undocumented()
    if missing:
        print(f"keys without a docstring in the schema: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = render()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
