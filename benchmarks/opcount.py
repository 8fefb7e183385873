"""Python bytecodes per ECH handshake, per function: where the lean path's work is.

Usage::

    python benchmarks/opcount.py [--handshakes 400] [--fronts split,bare] [--top 25]
                                 [--json FILE]

instrbench.py counts the instructions a front executes, but CPython's
instructions do not say which Python function ran them.  This benchmark
counts the bytecodes every Python function of the front executes over a
fixed number of handshakes, with ``sys.settrace`` and per-opcode events
(``benchmarks/opcount_site/sitecustomize.py``, put first on the front's
``PYTHONPATH``; the frames already running, an event loop's, are counted
from then on too): exact counts, the same whatever the machine is doing,
and a list of the functions that cost the most.  ``split`` against ``bare``
(benchmarks/barefront.py, the smallest front on echfront's decoder) shows
what the engine, the Protocol/Factory API, limits, deadlines, metrics and
the log line add on top of the floor, function by function.

Method, per front: start it with frontbench's configuration, Go ECH
client and Go backend; warm up (``--warmup`` handshakes, not counted);
switch counting on (a file the front's watcher thread looks for), run
``--handshakes`` handshakes at ``--concurrency``, wait for the front to
close them, switch counting off and read the counts the front writes.
Every handshake must be ECH-accepted, or the run stops.  A bytecode is
not a fixed cost (a call or a ``recv`` is one bytecode; so is a local
load), so the counts rank Python-level work; CPU time and instructions
are frontbench's and instrbench's.

Output: per front, bytecodes and function calls per handshake and its
most costly functions; ``--json`` writes every count.  Every wait is
bounded; only processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO_ROOT))

from frontbench import SECRET  # noqa: E402
from frontbench_proc import fd_count, wait_fds  # noqa: E402
from instrbench import front_command, run_load, wait_started  # noqa: E402

from tests.frontproc import Pki, free_port, make_pki  # noqa: E402
from tests.gotools import GoBackend  # noqa: E402
from tests.processes import stop_process  # noqa: E402

FRONTS = ("split", "bare")
SITE = Path(__file__).resolve().parent / "opcount_site"
#: Seconds a front may take to start (counting is off, but every call is traced).
START_TIMEOUT = 60.0
#: Seconds the front may take to write its counts once told to stop.
DUMP_TIMEOUT = 60.0


@dataclass
class Counted:
    """One front's counts over the measured handshakes: per function, [bytecodes, calls]."""

    front: str
    handshakes: int
    functions: dict[str, list[int]] = field(default_factory=dict)

    @property
    def opcodes_per_handshake(self) -> float:
        return sum(count for count, _calls in self.functions.values()) / self.handshakes

    @property
    def calls_per_handshake(self) -> float:
        return sum(calls for _count, calls in self.functions.values()) / self.handshakes

    def as_json(self) -> dict[str, Any]:
        return {
            "front": self.front,
            "handshakes": self.handshakes,
            "opcodes_per_handshake": self.opcodes_per_handshake,
            "calls_per_handshake": self.calls_per_handshake,
            "functions": self.functions,
        }


@contextmanager
def started(
    front: str, pki: Pki, work: Path, backend_port: int, control: Path
) -> Iterator[tuple[int, int]]:
    """Start ``front`` with the counting hook; yield its port and PID."""
    port = free_port()
    command = front_command(front, pki, work, port, backend_port)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SITE), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["ECHFRONT_OPCOUNT_DIR"] = str(control)
    log = (work / f"{front}.log").open("wb")
    proc = subprocess.Popen(
        command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        (pid,) = wait_started(front, proc, work, port, count=1, timeout=START_TIMEOUT)
        yield port, pid
    finally:
        stop_process(proc, timeout=60)
        log.close()


def read_counts(control: Path, timeout: float) -> dict[str, list[int]]:
    """The counts the front wrote (``counts.<pid>.json``), waiting at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        written = sorted(control.glob("counts.*.json"))
        if written:
            counts: dict[str, list[int]] = json.loads(written[-1].read_text())
            return counts
        time.sleep(0.1)
    raise RuntimeError(f"the front wrote no counts in {control} within {timeout:.0f}s")


def measure(front: str, pki: Pki, work: Path, params: argparse.Namespace) -> Counted:
    """Count one front's bytecodes over ``params.handshakes`` handshakes."""
    control = work / f"{front}-control"
    control.mkdir()
    with ExitStack() as stack:
        backend = stack.enter_context(GoBackend([pki.pair(SECRET)], ident=front))
        port, pid = stack.enter_context(started(front, pki, work, backend.port, control))
        warm = run_load(pki, port, params.warmup, params.concurrency)
        if warm["ok"] != params.warmup:
            raise RuntimeError(f"{front}: warm-up failed: {warm}")
        assert backend.pid is not None
        watched = [pid, backend.pid]
        baseline = {p: fd_count(p) for p in watched}
        (control / "on").touch()
        time.sleep(0.2)  # the watcher looks every 50 ms
        summary = run_load(pki, port, params.handshakes, params.concurrency)
        wait_fds(watched, baseline)
        (control / "off").touch()
        functions = read_counts(control, DUMP_TIMEOUT)
    ok, accepted = int(summary["ok"]), int(summary.get("ech_accepted", 0))
    if ok != params.handshakes or accepted != ok:
        raise RuntimeError(f"{front}: not every handshake was ECH-accepted: {summary}")
    return Counted(front, ok, functions)


def report(results: dict[str, Counted], top: int) -> list[str]:
    """Totals, the split/bare ratio, and each front's most costly functions."""
    lines = [f"{'front':8s} {'handshakes':>10s} {'bytecodes/hs':>13s} {'calls/hs':>9s}"]
    for name, counted in results.items():
        lines.append(
            f"{name:8s} {counted.handshakes:10d} {counted.opcodes_per_handshake:13.0f}"
            f" {counted.calls_per_handshake:9.1f}"
        )
    split, bare = results.get("split"), results.get("bare")
    if split and bare:
        ratio = split.opcodes_per_handshake / bare.opcodes_per_handshake
        lines.append(f"split / bare, bytecodes per handshake: {ratio:.3f}")
    for name, counted in results.items():
        lines.append("")
        lines.append(f"{name}: the {top} functions with the most bytecodes per handshake")
        lines.append(f"{'bytecodes':>9s} {'calls':>6s}  function")
        ranked = sorted(counted.functions.items(), key=lambda item: -item[1][0])
        for function, (count, calls) in ranked[:top]:
            per = counted.handshakes
            lines.append(f"{count / per:9.1f} {calls / per:6.2f}  {function}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fronts", default=",".join(FRONTS), help="comma-separated subset")
    parser.add_argument("--handshakes", type=int, default=400, help="counted handshakes")
    parser.add_argument("--warmup", type=int, default=40, help="uncounted handshakes first")
    parser.add_argument("--concurrency", type=int, default=8, help="handshakes in flight")
    parser.add_argument("--top", type=int, default=25, help="functions listed per front")
    parser.add_argument("--json", type=Path, help="write every count here")
    params = parser.parse_args(argv)
    fronts = [f for f in params.fronts.split(",") if f]
    unknown = sorted(set(fronts) - set(FRONTS))
    if unknown:
        parser.error(f"unknown fronts: {', '.join(unknown)} (choose from {', '.join(FRONTS)})")
    results: dict[str, Counted] = {}
    with tempfile.TemporaryDirectory(prefix="opcount-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        for front in fronts:
            print(f"[{time.strftime('%H:%M:%S')}] {front}: counting bytecodes", file=sys.stderr)
            results[front] = measure(front, pki, work, params)
    lines = report(results, params.top)
    print("\n".join(lines))
    if params.json:
        params.json.write_text(
            json.dumps(
                {
                    "params": vars(params) | {"json": str(params.json)},
                    "results": [r.as_json() for r in results.values()],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
