"""The conformance matrix (docs/conformance.toml -> docs/conformance.rst) stays complete and true.

CI fails when a row of the ECH spec checklist has neither tests, nor a
not-applicable reason, nor a named gap; when the matrix names a test that
does not exist (read with ``ast``, then confirmed by ``pytest --collect-only``);
when docs/conformance.rst is not what docs/conformance.py writes; and when the
vendored checklist drifts from the project's shared copy (where a clone has it,
at ``../shared/docs/``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_generator() -> ModuleType:
    """docs/conformance.py, imported by path (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "echfront_docs_conformance", ROOT / "docs" / "conformance.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


conformance = _load_generator()
CHECKLIST_TEXT = conformance.CHECKLIST.read_text(encoding="utf-8")
ROWS = conformance.parse_checklist(CHECKLIST_TEXT)
MAPPING = conformance.load_mapping()


def test_checklist_rows_are_found() -> None:
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))
    # Part 1 of the checklist: 10 sections, 86 rows when this test was written.
    assert len({row.group for row in ROWS}) == 10
    assert len(ids) >= 86
    for expected in ("CFG-1", "PAR-10", "DEC-8", "AAD-3", "REC-12", "FWD-7", "REJ-7", "HRR-11"):
        assert expected in ids
    assert all(row.requirement and row.section for row in ROWS)
    assert conformance.alert_names(CHECKLIST_TEXT)[47] == "illegal_parameter"


def test_every_row_has_tests_a_reason_or_a_gap() -> None:
    assert conformance.problems(ROWS, MAPPING, conformance.defined_tests(ROOT)) == []


def test_named_tests_are_collected_by_pytest() -> None:
    named = sorted({n for entry in MAPPING.values() for n in entry.get("tests", [])})
    files = sorted({name.split("::", 1)[0] for name in named})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    collected = {line.split("[", 1)[0] for line in result.stdout.splitlines() if "::" in line}
    # A module that skips itself at import (no Go toolchain, say) collects
    # nothing; its names were checked with ast above.
    collecting = {node.split("::", 1)[0] for node in collected}
    missing = [n for n in named if n.split("::", 1)[0] in collecting and n not in collected]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert missing == []


def test_page_is_up_to_date() -> None:
    found, page = conformance.build()
    assert found == []
    assert conformance.OUTPUT.read_text(encoding="utf-8") == page, (
        "docs/conformance.rst is stale: run python docs/conformance.py"
    )


@pytest.mark.skipif(
    not conformance.SHARED_CHECKLIST.is_file(), reason="no ../shared/docs/ beside this clone"
)
def test_vendored_checklist_matches_the_shared_one() -> None:
    assert conformance.SHARED_CHECKLIST.read_text(encoding="utf-8") == CHECKLIST_TEXT, (
        "docs/ech-spec-checklist.md differs from ../shared/docs/: "
        "run python docs/conformance.py --sync, then map any new rows"
    )


# -- the checker itself catches what it must ------------------------------------------------


def test_checker_reports_each_kind_of_problem() -> None:
    rows = [conformance.Row(f"X-{i}", "§1", "rule", "1.A Test") for i in range(1, 8)]
    known = {"tests/test_a.py::test_one", "tests/test_a.py::Case::test_two"}
    mapping = {
        "X-1": {"tests": ["tests/test_a.py::test_one", "tests/test_a.py::Case::test_two[p]"]},
        "X-2": {"not_applicable": "a backend's duty"},
        "X-3": {"gap": "not done", "proof": "a misspelt key"},
        "X-4": {"note": "only a note"},
        "X-5": {"tests": ["tests/test_a.py::test_gone"]},
        "X-6": {"tests": [], "not_applicable": "  "},
        # X-7 is missing altogether.
        "X-9": {"tests": ["tests/test_a.py::test_one"]},
    }
    found = conformance.problems(rows, mapping, known)
    assert found == [
        "X-3: unknown keys ['proof']",
        "X-4: neither tests, nor not_applicable, nor gap",
        "X-5: no such test tests/test_a.py::test_gone",
        "X-6: not_applicable must be a non-empty string",
        "X-6: neither tests, nor not_applicable, nor gap",
        "X-7: no entry in conformance.toml",
        "X-9: in conformance.toml but not a checklist row",
    ]


def test_defined_tests_reads_functions_and_methods(tmp_path: Path) -> None:
    (tmp_path / "tests" / "sub").mkdir(parents=True)
    (tmp_path / "tests" / "test_x.py").write_text(
        "def test_a(): pass\n"
        "def helper(): pass\n"
        "class Case:\n"
        "    def test_b(self): pass\n"
        "    def setUp(self): pass\n"
        "async def test_c(): pass\n"
    )
    (tmp_path / "tests" / "sub" / "test_y.py").write_text("def test_d(): pass\n")
    (tmp_path / "tests" / "helpers.py").write_text("def test_not_a_test_module(): pass\n")
    assert conformance.defined_tests(tmp_path) == {
        "tests/test_x.py::test_a",
        "tests/test_x.py::Case::test_b",
        "tests/test_x.py::test_c",
        "tests/sub/test_y.py::test_d",
    }


def test_alert_column_reads_the_arrows() -> None:
    names = conformance.alert_names(CHECKLIST_TEXT)
    assert conformance.checklist_alert("bad → 47; worse → 50", names) == (
        "illegal_parameter (47); decode_error (50)"
    )
    assert conformance.checklist_alert("pick one (default, or → 40/112)", names) == (
        "handshake_failure (40); unrecognized_name (112)"
    )
    assert conformance.checklist_alert("no alert here", names) == ""


def test_rendered_rows_carry_their_proof() -> None:
    page = conformance.OUTPUT.read_text(encoding="utf-8")
    for row in ROWS:
        assert f".. _{row.id}:" in page
        entry = MAPPING[row.id]
        for name in entry.get("tests", []):
            assert f"``{name}``" in page
    assert page.count("**Gap:**") == sum(1 for e in MAPPING.values() if e.get("gap"))
