"""Running a script of ``benchmarks/`` from a test: bounded in time, its JSON back."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.gotools import go_binary

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(
    script: str, args: Sequence[str], *, out: Path, expect: str, timeout: float
) -> dict[str, Any]:
    """Run ``benchmarks/SCRIPT ARGS --json OUT``; it must succeed and print ``expect``.

    The Go client is built first, outside the bounded run.
    """
    go_binary()
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert expect in result.stdout, result.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    return data
