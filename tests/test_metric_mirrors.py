"""Multiprocess mode (``--workers``): what the fast metrics copy into prometheus_client's files.

prometheus_client picks its multiprocess value class when it is imported,
so each case runs in a fresh interpreter with ``PROMETHEUS_MULTIPROC_DIR``
set, and reads the directory back with the supervisor's collector.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: Runs in the child.  argv: the directory, and "direct" or "replay" (the
#: histogram copy path to force).  Prints one JSON object per stage.
SCRIPT = r"""
import json, sys
from prometheus_client import CollectorRegistry, Histogram as ClientHistogram
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.internet.task import Clock
from echfront.front import fastmetrics
from echfront.front.fastmetrics import MIRRORS, SYNC_INTERVAL, Counter, Gauge, Histogram

directory, path = sys.argv[1], sys.argv[2]
if path == "replay":
    fastmetrics._has_value_cells = lambda mirror, buckets: False

clock = Clock()
MIRRORS.bind(clock)
buckets = (0.001, 0.01, 0.1, 1.0)
hist = Histogram("t_seconds", "h", ["kind"], buckets=buckets)
count = Counter("t_events_total", "c", ["kind"])
level = Gauge("t_level", "g", multiprocess_mode="livesum")
# The reference: prometheus_client's own histogram, observing one by one.
reference = ClientHistogram("r_seconds", "h", ["kind"], buckets=buckets, registry=None)

def files():
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out

def observe(amounts):
    for amount in amounts:
        hist.labels("a").observe(amount)
        reference.labels("a").observe(amount)
        count.labels("a").inc()
        level.inc()

def stage(name):
    pending = clock.getDelayedCalls() != []
    print(json.dumps({"stage": name, "files": files(), "pending": pending}))

observe([0.0005, 0.002, 0.002, 0.5, 3.0, 0.05])
stage("before the interval")
clock.advance(SYNC_INTERVAL)
stage("after the interval")
observe([0.0001, 7.5, 0.02])
level.dec(4)
clock.advance(SYNC_INTERVAL)
stage("second copy")
"""


def run(tmp_path: Path, path: str) -> list[dict[str, object]]:
    """The child's stages, in order."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), path],
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(Path.cwd())},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def pick(files: dict[str, float], prefix: str) -> dict[str, float]:
    """The samples whose name starts with ``prefix``, renamed without it."""
    return {key[len(prefix) :]: value for key, value in files.items() if key.startswith(prefix)}


@pytest.mark.parametrize("path", ["direct", "replay"])
def test_mirrors_hold_what_one_by_one_observation_would_after_each_interval(
    tmp_path: Path, path: str
) -> None:
    before, after, second = run(tmp_path, path)
    # Nothing reaches the files before the interval: one copy per interval, not per event.
    assert before["pending"] is True
    assert set(pick(before["files"], "t_").values()) == {0.0}  # type: ignore[arg-type]
    for stage, events, level in ((after, 6.0, 6.0), (second, 9.0, 5.0)):
        files: dict[str, float] = stage["files"]  # type: ignore[assignment]
        assert stage["pending"] is False, stage["stage"]
        ours, theirs = pick(files, "t_seconds"), pick(files, "r_seconds")
        assert theirs and set(ours) == set(theirs), stage["stage"]
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value), (stage["stage"], key)
        assert files["t_events_total{kind=a}"] == events
        assert files["t_level{}"] == level
    # The bucket counts themselves, cumulative: <=1ms 2, <=10ms 4, <=0.1 6, <=1 7, +Inf 9.
    assert pick(second["files"], "t_seconds_bucket{kind=a,le=") == {  # type: ignore[arg-type]
        "0.001}": 2.0,
        "0.01}": 4.0,
        "0.1}": 6.0,
        "1.0}": 7.0,
        "+Inf}": 9.0,
    }
