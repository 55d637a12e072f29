"""docs/reliability.md names, for every row of FAULTS-AND-ATTACKS, the tests that check it: each
test it names exists (a renamed or deleted test fails here), and its totals are its rows."""

from __future__ import annotations

import re

from tests.conftest import REPO

DOC = REPO / "docs" / "reliability.md"
NAMED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`|`::(\w+)`")


def test_every_test_the_table_names_exists() -> None:
    missing = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| "):
            continue
        current = None
        for m in NAMED.finditer(line):
            if m.group(1):
                current, name = m.group(1), m.group(2)
            else:
                name = m.group(3)
            assert current is not None, f"`::{name}` before any file: {line[:80]}"
            if not re.search(rf"^(async )?def {name}\(", (REPO / current).read_text(), re.M):
                missing.append(f"{current}::{name}")
    assert missing == []


def test_the_totals_count_the_rows() -> None:
    text = DOC.read_text()
    rows = [line.split(" | ") for line in text.splitlines() if re.match(r"\| (F\d+|A-)", line)]
    faults = [r for r in rows if re.match(r"\| F\d+", r[0])]
    open_ = [r for r in rows if r[2].startswith(("PARTLY", "NOT YET"))]
    tested, tested_faults = len(rows) - len(open_), len(faults) - sum(r in open_ for r in faults)
    assert f"rows tested: {tested} / {len(rows)} (F1-F15: {tested_faults} / {len(faults)}" in text
    assert len(faults) == 15
