"""The package's layering, enforced (issue 10, docs/architecture.rst).

* No import cycle among echfront's modules, counting every import statement
  (``TYPE_CHECKING`` blocks and function-local imports included): arrows run
  down.
* The sans-IO wings (``echfront.tls``, ``echfront.ech``, ``echfront.quic``)
  load no Twisted module when imported.
* Every wing's ``__init__`` has a docstring saying what it owns and what it may
  import; no module grows past ~500 lines without a written reason at its top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "echfront"
WINGS = ("tls", "ech", "quic", "front", "config", "keys", "dns", "app", "cli")
SANS_IO_WINGS = ("tls", "ech", "quic")
#: Lines past which a module must say at its top why it is that long.
LONG_MODULE = 550


def module_name(path: Path) -> str:
    """``echfront/front/relay.py`` -> ``echfront.front.relay``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The echfront modules a file imports, anywhere in it."""
    return imports_in_source(
        path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py", known
    )


def imports_in_source(source: str, here: str, is_package: bool, known: set[str]) -> set[str]:
    """The echfront modules some source imports, anywhere in it.

    ``from echfront.x import y`` counts as importing ``echfront.x.y`` when that
    is a module, else ``echfront.x``: importing through a package's
    ``__init__`` would hide an arrow, so the defining module is what counts.
    """
    package = here if is_package else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("echfront"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("echfront"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    found.discard(here)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    """Module -> the echfront modules it imports."""
    modules = all_modules()
    known = set(modules)
    return {name: imported_modules(path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    visiting: list[str] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*visiting[visiting.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        visiting.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_scanner_sees_type_checking_and_local_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from echfront.front.protocol import FrontProtocol\n"
        "def f():\n"
        "    import echfront.tap\n"
        "    from echfront.front import relay\n"
        "    from . import splice\n"
    )
    known = {
        "echfront.front.protocol",
        "echfront.tap",
        "echfront.front.relay",
        "echfront.front.splice",
        "echfront.front",
    }
    found = imports_in_source(source, "echfront.front.local", False, known)
    assert found == {
        "echfront.front.protocol",
        "echfront.tap",
        "echfront.front.relay",
        "echfront.front.splice",
    }


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("wing", SANS_IO_WINGS)
def test_sans_io_wing_loads_no_twisted(wing: str) -> None:
    modules = sorted(
        n for n in all_modules() if n == f"echfront.{wing}" or n.startswith(f"echfront.{wing}.")
    )
    script = (
        "import sys, importlib\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'twisted' or m.startswith('twisted.')\n"
        "                or m == 'zope' or m.startswith('zope.') or m.startswith('OpenSSL'))\n"
        "print(' '.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "", f"echfront.{wing} loads: {result.stdout.strip()}"


def test_the_sans_io_check_would_see_twisted() -> None:
    """The subprocess check above reports Twisted when a module does load it."""
    script = "import sys, twisted.internet.defer\nprint('twisted' in sys.modules)\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True"


@pytest.mark.parametrize("wing", WINGS)
def test_wing_docstring_says_what_it_owns_and_may_import(wing: str) -> None:
    init = PACKAGE / wing / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    assert "Owns:" in docstring, f"echfront/{wing}/__init__.py: say what the wing owns"
    assert "May import:" in docstring or "may import" in docstring, (
        f"echfront/{wing}/__init__.py: say what the wing may import"
    )


@pytest.mark.parametrize("name", sorted(all_modules()))
def test_long_modules_say_why(name: str) -> None:
    path = all_modules()[name]
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    if lines <= LONG_MODULE:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert "Why this module is long" in docstring, (
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines: split it, or say at its top "
        "(a 'Why this module is long:' paragraph in the module docstring) why it is one module"
    )
