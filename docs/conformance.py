"""Check the conformance matrix and write docs/conformance.rst from it.

The matrix maps every row of the ECH spec checklist (docs/ech-spec-checklist.md,
a copy of the project's ../shared/docs/ech-spec-checklist.md, RFC 9849) to the
tests that prove it, or to the reason it does not apply, or names the gap
(docs/conformance.toml).  This script:

1. parses the checklist's rows (``| ID | § | Requirement | Test |``);
2. checks that every row has an entry with tests, a reason or a gap, and that
   the file names no row the checklist lacks;
3. checks that every named test exists (read with ``ast``: a module-level
   ``test*`` function, or a ``test*`` method defined in a class of that module);
4. writes docs/conformance.rst: per checklist section, a table of row, rule,
   alert and proof.

Usage, from anywhere::

    python docs/conformance.py            # check, then write docs/conformance.rst
    python docs/conformance.py --check    # check, and that the page is up to date
    python docs/conformance.py --sync     # first copy ../shared/docs/ech-spec-checklist.md

Exit status 1 with one line per problem.  tests/test_conformance.py runs the
same checks in CI.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CHECKLIST = DOCS / "ech-spec-checklist.md"
#: Where the project's shared copy lives, relative to a clone (CI has it too).
SHARED_CHECKLIST = ROOT.parent / "shared" / "docs" / "ech-spec-checklist.md"
MAPPING = DOCS / "conformance.toml"
OUTPUT = DOCS / "conformance.rst"

_ROW = re.compile(r"^\|\s*([A-Z]+-\d+)\s*\|(.*)\|\s*$")
_SECTION = re.compile(r"^###\s+(1\.[A-Z])\s+(.*?)\s*$")
_ALERTS = re.compile(r"^Alerts:\s*(.*?)(?:\.\s|\n\n)", re.MULTILINE | re.DOTALL)
_ALERT = re.compile(r"([a-z_]+) (\d+)")
_ARROW = re.compile(r"→\s*(\d+)((?:/\d+)*)")
_KEYS = frozenset(("tests", "not_applicable", "gap", "note", "alert"))


@dataclass(frozen=True)
class Row:
    """One checklist row: its ID, section sign, requirement and group heading."""

    id: str
    section: str
    requirement: str
    group: str


def parse_checklist(text: str) -> list[Row]:
    """Every ``| ID | § | Requirement | Test |`` row of the checklist's part 1, in order."""
    rows: list[Row] = []
    group = ""
    for line in text.splitlines():
        heading = _SECTION.match(line)
        if heading:
            group = f"{heading.group(1)} {heading.group(2)}"
            continue
        match = _ROW.match(line)
        if match is None:
            continue
        cells = [cell.strip() for cell in match.group(2).split("|")]
        if len(cells) != 3:
            raise ValueError(f"checklist row {match.group(1)} has {len(cells) + 1} cells, not 4")
        rows.append(Row(match.group(1), cells[0], cells[1], group))
    return rows


def alert_names(text: str) -> dict[int, str]:
    """The checklist's ``Alerts:`` legend, as {code: name}."""
    match = _ALERTS.search(text)
    if match is None:
        return {}
    return {int(code): name for name, code in _ALERT.findall(match.group(1))}


def defined_tests(root: Path) -> set[str]:
    """Node ids (``path::name``, ``path::Class::name``) of the tests under ``root/tests``.

    Read with ``ast``: nothing is imported.  Inherited methods are not
    listed; name a test by the class that defines it.
    """
    found: set[str] = set()
    for path in sorted((root / "tests").rglob("test*.py")):
        relative = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name.startswith("test"):
                    found.add(f"{relative}::{node.name}")
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and (
                        item.name.startswith("test")
                    ):
                        found.add(f"{relative}::{node.name}::{item.name}")
    return found


def load_mapping(path: Path = MAPPING) -> dict[str, dict[str, Any]]:
    """The matrix file, as {row id: entry}."""
    with path.open("rb") as stream:
        return tomllib.load(stream)


def problems(
    rows: Sequence[Row], mapping: Mapping[str, Mapping[str, Any]], tests: Iterable[str]
) -> list[str]:
    """Everything wrong with the matrix, one line each (empty when it is sound)."""
    known = set(tests)
    ids = [row.id for row in rows]
    found: list[str] = []
    if len(set(ids)) != len(ids):
        found.append("the checklist repeats a row ID")
    for row_id in ids:
        entry = mapping.get(row_id)
        if entry is None:
            found.append(f"{row_id}: no entry in {MAPPING.name}")
            continue
        unknown = set(entry) - _KEYS
        if unknown:
            found.append(f"{row_id}: unknown keys {sorted(unknown)}")
        names = entry.get("tests", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            found.append(f"{row_id}: tests must be a list of node ids")
            names = []
        for key in ("not_applicable", "gap", "note", "alert"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                found.append(f"{row_id}: {key} must be a non-empty string")
        reason, gap = _text(entry.get("not_applicable")), _text(entry.get("gap"))
        if not names and not reason and not gap:
            found.append(f"{row_id}: neither tests, nor not_applicable, nor gap")
        if reason and gap:
            found.append(f"{row_id}: both not_applicable and gap")
        for name in names:
            if name.split("[", 1)[0] not in known:
                found.append(f"{row_id}: no such test {name}")
    for extra in sorted(set(mapping) - set(ids)):
        found.append(f"{extra}: in {MAPPING.name} but not a checklist row")
    return found


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


# -- reStructuredText --------------------------------------------------------------------------

_CODE = re.compile(r"`([^`]+)`")


def inline(markdown: str) -> str:
    """The checklist's inline Markdown as reStructuredText (code spans; the rest carries over)."""
    return _CODE.sub(lambda m: f"``{m.group(1)}``", markdown)


def checklist_alert(requirement: str, names: Mapping[int, str]) -> str:
    """The alerts a row's ``→ N`` arrows name, as ``name (N)``."""
    parts: list[str] = []
    for match in _ARROW.finditer(requirement):
        codes = [int(match.group(1)), *(int(c) for c in match.group(2).split("/") if c)]
        for code in codes:
            text = f"{names.get(code, 'alert')} ({code})"
            if text not in parts:
                parts.append(text)
    return "; ".join(parts)


def _cell(lines: Sequence[str], first: bool) -> list[str]:
    lead = "   * - " if first else "     - "
    body = list(lines) or [""]
    return [lead + body[0], *("       " + line if line else "" for line in body[1:])]


def _proof(entry: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if entry.get("not_applicable"):
        lines.append(f"*Not applicable:* {inline(entry['not_applicable'])}")
    if entry.get("gap"):
        lines.append(f"**Gap:** {inline(entry['gap'])}")
    tests = entry.get("tests", [])
    if tests:
        if lines:
            lines.append("")
        lines += [f"* ``{name}``" for name in tests]
    if entry.get("note"):
        lines += ["", inline(entry["note"])]
    return lines


def _status(entry: Mapping[str, Any]) -> str:
    if entry.get("gap"):
        return "gap"
    if entry.get("not_applicable"):
        return "not applicable"
    return "proven"


INTRO = """\
.. This page is generated by docs/conformance.py from docs/conformance.toml
   and docs/ech-spec-checklist.md.  Edit those, then run
   ``python docs/conformance.py``; tests/test_conformance.py fails when this
   file is stale.

Conformance matrix
==================

Every rule of RFC 9849 (with the RFC 8446 and RFC 9180 rules it relies on)
that binds a split-mode client-facing server, as listed in the project's ECH
checklist, and the tests that prove echfront follows it. A row is *proven*
when named tests fail if the rule is broken; *not applicable* when the rule
is another party's (a backend's, a client's) or a deployment decision, with
the reason; a *gap* when echfront does not (fully) implement it, with what is
missing. The test IDs are pytest node IDs: run one with
``.venv/bin/python -m pytest 'ID'``. Tests marked interop in the suite need
the Go toolchain and the other peers named in the README.

The alert column is what the front sends for a violation: a plaintext
``15 03 03 00 02 02 <code>`` record, then close (see :doc:`security`).

Beyond the named tests, the ClientHello parsers are fuzzed: bounded
hypothesis runs in CI (``tests/test_fuzz.py``), and a coverage-guided
atheris target (``tests/fuzz/clienthello.py``) that CI runs briefly and that
runs for minutes by hand; see :ref:`fuzzing` for how, and what it found.
"""


def _gaps(count: int, partly: int) -> str:
    """``no gaps``, ``1 gap (partly proven by tests)``, ``3 gaps (2 partly proven by tests)``."""
    if not count:
        return "no gaps"
    text = f"{count} gap" if count == 1 else f"{count} gaps"
    if not partly:
        return text
    if count == 1:
        return f"{text} (partly proven by tests)"
    return f"{text} ({partly} partly proven by tests)"


def render(rows: Sequence[Row], mapping: Mapping[str, Mapping[str, Any]], text: str) -> str:
    """The whole docs/conformance.rst page."""
    names = alert_names(text)
    counts = {"proven": 0, "not applicable": 0, "gap": 0}
    for row in rows:
        counts[_status(mapping[row.id])] += 1
    out = [INTRO]
    gaps = [row.id for row in rows if _status(mapping[row.id]) == "gap"]
    partly = sum(1 for g in gaps if mapping[g].get("tests"))
    out.append(
        f"{len(rows)} rows: {counts['proven']} proven by tests, "
        f"{counts['not applicable']} not applicable, {_gaps(len(gaps), partly)}."
    )
    if gaps:
        out.append("")
        out.append("Gaps: " + ", ".join(f"`{g}`_" for g in gaps) + ".")
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            out += ["", "", group, "-" * len(group), "", ".. list-table::"]
            out += ["   :header-rows: 1", "   :widths: 8 10 40 12 30", ""]
            out += _cell(["Row"], True)
            out += [*_cell(["§"], False), *_cell(["Requirement"], False)]
            out += [*_cell(["Alert"], False), *_cell(["Proof"], False)]
        entry = mapping[row.id]
        alert = entry.get("alert") or checklist_alert(row.requirement, names) or "none"
        out += _cell([f".. _{row.id}:", "", f"**{row.id}**"], True)
        out += _cell([inline(row.section)], False)
        out += _cell([inline(row.requirement)], False)
        out += _cell([inline(alert)], False)
        out += _cell(_proof(entry), False)
    return "\n".join(out) + "\n"


# -- command line ------------------------------------------------------------------------------


def build() -> tuple[list[str], str]:
    """Check everything; return the problems and the page as it should be."""
    text = CHECKLIST.read_text(encoding="utf-8")
    rows = parse_checklist(text)
    mapping = load_mapping()
    found = problems(rows, mapping, defined_tests(ROOT))
    if not rows:
        found.append(f"{CHECKLIST}: no checklist rows found")
    page = "" if found else render(rows, mapping, text)
    return found, page


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the page is stale")
    parser.add_argument("--sync", action="store_true", help="copy the shared checklist first")
    args = parser.parse_args(argv)
    if args.sync:
        shutil.copyfile(SHARED_CHECKLIST, CHECKLIST)
    found, page = build()
    if not found and args.check and OUTPUT.read_text(encoding="utf-8") != page:
        found.append(f"{OUTPUT.name} is stale: run python docs/conformance.py")
    for line in found:
        print(f"conformance: {line}", file=sys.stderr)
    if found:
        return 1
    if not args.check:
        OUTPUT.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
