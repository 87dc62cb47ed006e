"""docs/configs.md is generated from the schema's docstrings: every key has one, and the
checked-in page is what the generator writes now (a stale page or an undocumented key fails
here, with the command that regenerates it)."""

from __future__ import annotations

import dataclasses
import difflib
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from dist_contrast.config import Config
from dist_contrast.config.parse import dotted_keys, key_type
from dist_contrast.config.reference import COMMAND, field_docs, render, undocumented

from conftest import ROOT

PAGE = ROOT / "docs" / "configs.md"


def leaf_keys(cls: type) -> list[str]:
    """The dotted keys of the tree that are values, not sections, as the parser walks it."""
    return [k for k in dotted_keys(cls) if not dataclasses.is_dataclass(key_type(cls, k))]


def test_every_key_and_section_of_the_schema_has_a_docstring():
    assert undocumented(Config) == []


def test_the_checked_in_page_is_what_the_schema_generates():
    page, expected = PAGE.read_text(encoding="utf-8"), render(Config)
    if page != expected:
        diff = difflib.unified_diff(
            page.splitlines(), expected.splitlines(), "docs/configs.md", "generated", lineterm=""
        )
        shown = "\n".join(list(diff)[:40])
        pytest.fail(f"docs/configs.md is stale: regenerate it with `{COMMAND}`\n{shown}")


def test_the_page_has_a_row_for_every_key():
    page = PAGE.read_text(encoding="utf-8")
    missing = [k for k in leaf_keys(Config) if f"\n| `{k}` |" not in page]
    assert missing == [], f"undocumented in docs/configs.md: {missing}; regenerate: `{COMMAND}`"
    assert COMMAND in page.split("\n\n", 2)[1]  # the first lines say how it is made


def test_the_command_writes_the_page(tmp_path):
    out = tmp_path / "configs.md"
    args = COMMAND.split()[1:-1] + [str(out)]  # -m dist_contrast.config.reference PATH
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)
    assert out.read_text(encoding="utf-8") == render(Config)


# A small tree the checks must catch out: a key without a docstring, a section without one.


@dataclass
class _Documented:
    """A section with a docstring."""

    size: int = 3
    """A key with its docstring | a pipe; see docs/data.md#remote-shards."""
    bare: str = "x"


@dataclass
class _Bare:
    flag: bool = False
    """A key with a docstring in a section without one."""


@dataclass
class _Tree:
    one: _Documented = field(default_factory=_Documented)
    two: _Bare = field(default_factory=_Bare)


def test_the_checks_catch_a_missing_docstring():
    assert undocumented(_Tree) == ["one.bare", "two"]
    assert field_docs(_Documented) == {
        "": "A section with a docstring.",
        "size": "A key with its docstring | a pipe; see docs/data.md#remote-shards.",
    }


def test_a_row_holds_the_key_type_default_and_doc():
    text = render(_Tree)
    assert (
        "| `one.size` | `int` | `3` | A key with its docstring \\| a pipe; see "
        "[remote shards](data.md#remote-shards). |"
    ) in text
    assert "| `two.flag` | `bool` | `false` |" in text
    assert "\n## one\n\nA section with a docstring.\n" in text
