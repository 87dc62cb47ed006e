"""docs/reliability.md's table of bad inputs and faults names, for each row, the tests that
show it: every one named must exist (a renamed or deleted test fails here, not in a reader's
hands)."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

SECTION = "## Every bad input and fault"
PREFIX = {"u/": "tests/unit/", "i/": "tests/integration/"}


def _named_tests() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "reliability.md").read_text()
    rows = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    found, current = [], None  # a `::name` goes with the file last named, in its row or above
    for line in rows.splitlines():
        if not line.startswith("| ") or line.startswith(("| bad input", "|---")):
            continue
        for ref in re.findall(r"`([^`]*::[^`]+)`", line.rsplit(" | ", 1)[-1]):
            path, name = ref.split("::")
            if path:
                current = PREFIX[path[:2]] + path[2:]
            found.append((current, name))
    return found


def _test_names(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_every_test_the_table_names_exists():
    named = _named_tests()
    assert len(named) >= 40
    missing = [f"{p}::{n}" for p, n in named if n not in _test_names(p)]
    assert missing == []
