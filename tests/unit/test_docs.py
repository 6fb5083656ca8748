"""docs/reliability.md: every case names the test that shows it, and that test exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_ID = re.compile(r"`((?:tests/[\w/]+\.py::)?test_\w+)(\[[^\]]+\])?`")
CASE_ONLY = re.compile(r"`\[([^\]]+)\]`")


def _defined_tests() -> dict[str, tuple[set[str], str]]:
    """test file (repo-relative) -> (the test functions it defines, its source)."""
    found = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        source = path.read_text()
        names = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
        found[str(path.relative_to(REPO))] = (names, source)
    return found


def reliability_rows() -> list[tuple[int, str]]:
    """(line number, last cell) of every case row of docs/reliability.md's tables."""
    rows = []
    for number, line in enumerate((REPO / "docs" / "reliability.md").read_text().splitlines(), 1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[-1] not in ("test", "---"):
            rows.append((number, cells[-1]))
    return rows


def problems_of(rows: list[tuple[int, str]], defined: dict[str, tuple[set[str], str]]) -> list[str]:
    """Rows naming no test, or a test (or parametrized case) that does not exist."""
    all_tests = {name: file for file, (names, _) in defined.items() for name in names}
    problems, previous_file = [], None
    for number, cell in rows:
        ids = TEST_ID.findall(cell)
        cases = CASE_ONLY.findall(cell)
        if not ids and not cases and not cell.lower().startswith("same test"):
            problems.append(f"docs/reliability.md:{number}: names no test ({cell[:80]})")
            continue
        for test_id, case in ids:
            file, _, name = test_id.rpartition("::")
            file = file or all_tests.get(name)
            if file not in defined or name not in defined[file][0]:
                problems.append(f"docs/reliability.md:{number}: {test_id} does not exist")
                continue
            previous_file = file
            if case and f'"{case[1:-1]}"' not in defined[file][1] and f"'{case[1:-1]}'" not in defined[file][1]:
                problems.append(f"docs/reliability.md:{number}: case {case} is not in {file}")
        for case in cases:  # `[case]`: a case of the parametrized test named in an earlier row
            if previous_file is None or f'"{case}"' not in defined[previous_file][1]:
                problems.append(f"docs/reliability.md:{number}: case [{case}] is not in {previous_file}")
    return problems


def test_every_reliability_case_names_a_test_that_exists():
    rows = reliability_rows()
    assert len(rows) >= 55, f"{len(rows)} cases"
    problems = problems_of(rows, _defined_tests())
    assert not problems, "\n".join(problems)


def test_the_check_fails_on_a_row_naming_a_missing_test_or_none():
    defined = {"tests/unit/test_x.py": ({"test_real"}, 'CASES = {"ok-case": 1}')}
    rows = [
        (1, "`tests/unit/test_x.py::test_real`"),
        (2, "`[ok-case]`"),
        (3, "same test"),
        (4, "`tests/unit/test_x.py::test_gone`"),
        (5, "`test_real[no-such-case]`"),
        (6, "`[missing-case]`"),
        (7, "`ferflow/core/files.py::atomic_path`"),
    ]
    assert problems_of(rows, defined) == [
        "docs/reliability.md:4: tests/unit/test_x.py::test_gone does not exist",
        "docs/reliability.md:5: case [no-such-case] is not in tests/unit/test_x.py",
        "docs/reliability.md:6: case [missing-case] is not in tests/unit/test_x.py",
        "docs/reliability.md:7: names no test (`ferflow/core/files.py::atomic_path`)",
    ]
