"""Smoke test of benchmarks/quicbench.py: a ``--quick`` run, then its JSON and output.

The run (1 repeat, 40 handshakes at concurrency 8, 4 MiB) goes through a
real ``twistd echfront`` with curl_cffi over HTTP/3 and ECH to the aioquic
backend of tests/quicbackend.py, plus the reference ways; the test checks
that the figures are there and sane, and that every handshake succeeded
with ECH accepted, as the client, the backend and the front's metrics each
saw it.  No timing thresholds: the figures depend on the machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.boringssl import curl_available
from tests.gotools import find_go, go_binary
from tests.processes import stop_process

pytestmark = pytest.mark.interop

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "quicbench.py"
#: Bound on the whole run: about 20 s on an idle 2-core machine, but several times
#: that in a fresh CI run next to other suites; Go is built before.
RUN_TIMEOUT = 180.0
#: --quick: handshakes per repeat, the warm-up's, and the download sizes.
HANDSHAKES, WARM_UP, BULK = 40, 16, 4 << 20


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The quick benchmark, once for the module: its JSON report and its stdout."""
    reason = curl_available("chrome136")
    if reason is not None:
        pytest.skip(reason)
    if find_go() is not None:
        go_binary()  # the tcp way's backend, built outside the bounded run
    out = tmp_path_factory.mktemp("quicbench")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the script stop the front and backends it started.
        stop_process(proc, 15)
        stdout, stderr = proc.communicate()
        pytest.fail(f"quicbench --quick took over {RUN_TIMEOUT} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr[-4000:]}"
    (path,) = out.glob("quicbench-*.json")
    report: dict[str, Any] = json.loads(path.read_text())
    return report, stdout


def test_every_handshake_accepted_ech(run: tuple[dict[str, Any], str]) -> None:
    report, _stdout = run
    assert report["params"]["repeats"] == 1 and report["params"]["handshakes"] == HANDSHAKES
    (quic,) = report["samples"]["quic"]
    assert quic["handshakes"] == quic["ech_accepted"] == HANDSHAKES
    assert quic["bulk_bytes"] == BULK
    (direct,) = report["samples"]["direct"]
    assert direct["handshakes"] == HANDSHAKES and direct["ech_accepted"] == 0
    # The front's own count: every QUIC connection through it, warm-up and
    # downloads included, ended as ECH accepted, and nothing else.
    counted = report["front_connections_by_ech"]
    expected = WARM_UP + 1 + HANDSHAKES + 1
    assert counted["requests"]["quic"] == expected
    assert counted["quic"] == {"accepted": expected}
    if "tcp" in report["samples"]:
        assert counted["tcp"] == {"accepted": WARM_UP + HANDSHAKES}


def test_figures(run: tuple[dict[str, Any], str]) -> None:
    report, stdout = run
    quic = report["summary"]["quic"]
    for label in (
        "front CPU ms/handshake",
        "backend CPU ms/handshake",
        "p50 handshake ms",
        "front CPU s/GB",
        "backend CPU s/GB",
        "download MB/s",
    ):
        figure = quic[label]
        assert _positive(figure["median"]), (label, figure)
        assert figure["min"] <= figure["median"] <= figure["max"]
        assert label in stdout
    assert "front CPU ms/handshake" not in report["summary"]["direct"]
    assert _positive(report["summary"]["direct"]["backend CPU ms/handshake"]["median"])
    assert _positive(report["ratios"]["quic front / quic backend, CPU per handshake"])
    assert report["noise"]["others_cpus_max"] >= 0 and report["noise"]["loadavg_start"]
    if "tcp" in report["samples"]:
        assert _positive(report["ratios"]["quic front / tcp front, CPU per handshake"])


def test_the_checks_catch_a_rejected_or_missing_ech() -> None:
    """Negative control of the benchmark's per-request checks, with results as curl reports them."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import quicbench  # noqa: PLC0415 - a script beside frontbench_proc, not a package
    finally:
        sys.path.remove(str(SCRIPT.parent))
    way = quicbench.Way("quic", 443, http3=True, ech=True, pids={})
    good = {"code": 0, "status": 200, "http_version": quicbench.HTTP3}
    inner = {**good, "head": "name=secret.example sni=secret.example ech=inner hrr=0\n"}
    assert quicbench.problems(way, [inner], count=1, size=None) == []
    rejected = {"code": 101, "error": "ECH_REJECTED", "status": 0, "http_version": 0}
    outer = {**good, "head": "name=secret.example sni=secret.example ech=outer hrr=0\n"}
    over_h2 = {**inner, "http_version": quicbench.HTTP2}
    for result in (rejected, outer, over_h2):
        assert len(quicbench.problems(way, [result], count=1, size=None)) == 1, result
    assert quicbench.problems(way, [inner], count=2, size=None) == ["1 results for 2 requests"]
    short = {**good, "size": BULK - 1, "sha256": ""}
    assert quicbench.problems(way, [short], count=1, size=BULK)
