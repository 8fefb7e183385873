"""The wheel holds the whole package: every wing, the plugin, no twisted/__init__.py.

The README's first command is ``pip install .``; an editable install (what the
other tests run on) would hide a subpackage missing from the wheel, so this
builds the real wheel, as ``pip install .`` does (in an isolated build
environment), and compares it with the source tree.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_files() -> set[str]:
    """Every module of the package and the plugin, as wheel paths."""
    found = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "echfront").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    found.add("twisted/plugins/echfront_plugin.py")
    return found


def test_the_wheel_holds_every_module(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("echfront-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = source_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "twisted/__init__.py" not in names, "a twisted/__init__.py would shadow Twisted"
    assert "twisted/plugins/__init__.py" not in names
    assert "echfront/py.typed" in names
    assert not any(name.startswith(("tests/", "docs/", "benchmarks/")) for name in names)
