"""Instructions per ECH handshake, counted by callgrind: the figures that noise cannot move.

Usage::

    python benchmarks/instrbench.py [--handshakes 300] [--fronts split,workers2,bare]
                                    [--json FILE] [--keep DIR]

frontbench.py times fronts in CPU seconds, which on a small shared machine
move with everything else running (haproxy's own figure by a factor of
three in a day).  This benchmark runs the same fronts, with the same
configuration, Go ECH client and Go backend as frontbench, under
``valgrind --tool=callgrind`` and counts the user-space instructions each
front process executes for a fixed number of handshakes: the same count
whatever the machine is doing.  It answers two questions frontbench cannot
answer on two vCPUs:

* ``split`` against ``bare`` (benchmarks/barefront.py, the smallest Python
  front on echfront's decoder): what the engine, API, limits, metrics and
  log cost on top of the floor, in instructions;
* ``workers2`` against ``split``: whether a worker does more work per
  handshake than a single process.  Each worker's count over the
  handshakes gives the *instruction capacity* ratio, ``split``'s
  instructions for all handshakes over the busier worker's: the scaling
  ``--workers 2`` reaches when each worker has a core of its own (the
  kernel's share of the work, not counted here, is the same per
  connection in both).  frontbench's ``workers2`` figure on a machine with
  fewer cores than workers plus load measures the sharing of CPUs as well.

Method, per front: start it under ``valgrind --tool=callgrind
--instr-atstart=no --trace-children=yes`` (the children: ``--workers``'
processes, and the re-exec that sets up record padding), warm up unmeasured
(``--warmup`` handshakes), switch instrumentation on in every front process
(``callgrind_control -i on``), run ``--handshakes`` handshakes at
``--concurrency``, wait for the front to close them, switch it off and dump
(``callgrind_control -i off``, ``-d``), and read each dump's ``totals``.
Every handshake must be ECH-accepted, or the run stops with the client's
summary.  Under callgrind a front runs some 50 times slower, so the sizes
are small; the counts per handshake are stable to about 1% from run to
run.

Output: a table on stdout, and ``--json`` for the raw counts.  Needs
valgrind (``callgrind_control``) and Go; every wait is bounded; only
processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
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

from frontbench import ECHFRONT_LOGGER, SECRET, echfront_config  # noqa: E402
from frontbench_proc import (  # noqa: E402
    children,
    fd_count,
    listening_inodes,
    listens,
    start_time,
    stop_pid,
    wait_fds,
)

from tests.frontproc import Pki, free_port, make_pki, to_toml, twistd_command  # noqa: E402
from tests.gotools import GoBackend, client_args, parse_json_lines  # noqa: E402
from tests.processes import stop_process  # noqa: E402

FRONTS = ("split", "workers2", "bare")
#: Seconds a front may take to start under callgrind (imports run ~50x slower).
START_TIMEOUT = 600.0
_TOTALS = re.compile(rb"^totals:\s+(\d+)", re.MULTILINE)


@dataclass
class Counted:
    """One front's counts: instructions per front process over the measured handshakes."""

    front: str
    handshakes: int
    accepted: int
    instructions: dict[int, int] = field(default_factory=dict)

    @property
    def per_handshake(self) -> float:
        """All front processes' instructions over the handshakes."""
        return sum(self.instructions.values()) / self.handshakes

    @property
    def busiest(self) -> int:
        """The largest count of one process (the one that bounds capacity)."""
        return max(self.instructions.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "front": self.front,
            "handshakes": self.handshakes,
            "ech_accepted": self.accepted,
            "instructions_by_process": {str(k): v for k, v in self.instructions.items()},
            "instructions_per_handshake": self.per_handshake,
        }


def callgrind(out_dir: Path, command: Sequence[str]) -> list[str]:
    """``command`` under callgrind, instrumentation off until switched on."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--trace-children=yes",
        f"--callgrind-out-file={out_dir}/callgrind.%p",
        *command,
    ]


def control(pid: int, *args: str) -> None:
    """Run ``callgrind_control ARGS PID`` (bounded)."""
    subprocess.run(
        ["callgrind_control", *args, str(pid)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def dumped_totals(out_dir: Path, pid: int) -> int:
    """The instructions in ``pid``'s dumps (``callgrind.PID.N``)."""
    total = 0
    for dump in out_dir.glob(f"callgrind.{pid}.*"):
        found = _TOTALS.search(dump.read_bytes())
        if found:
            total += int(found.group(1))
    return total


def wait_for(proc: subprocess.Popen[bytes], port: int, count: int, timeout: float) -> list[int]:
    """PIDs listening on ``port``: the process itself, or ``count`` of its children."""
    pid = proc.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"front {pid} exited with status {proc.returncode} before listening")
        inodes = listening_inodes(port)
        candidates = [pid] if count == 1 else children(pid)
        ready = [p for p in candidates if listens(p, inodes)]
        if len(ready) >= count:
            return ready[:count]
        time.sleep(0.5)
    raise RuntimeError(f"front {pid} did not listen on {port} within {timeout:.0f}s")


def run_load(pki: Pki, port: int, count: int, concurrency: int) -> dict[str, Any]:
    """``echtest client`` with ECH against the front; its summary line."""
    args = client_args(
        f"127.0.0.1:{port}",
        name=SECRET,
        ech=pki.ech_config_list,
        ca=pki.ca,
        count=count,
        concurrency=concurrency,
        timeout=60.0,
        quiet=True,
    )
    result = subprocess.run(args, capture_output=True, text=True, timeout=60 + count, check=False)
    summaries = [line for line in parse_json_lines(result.stdout) if line.get("summary")]
    if not summaries:
        raise RuntimeError(f"echtest client printed no summary: {result.stderr[-2000:]}")
    summary: dict[str, Any] = summaries[-1]
    return summary


def front_command(front: str, pki: Pki, work: Path, port: int, backend_port: int) -> list[str]:
    """The argv of ``front`` (split, workers2 or bare) on ``port``, frontbench's configuration."""
    config = echfront_config(pki, port, backend_port, "tests.localapp:echo_factory")
    if front == "bare":
        del config["front"]
    path = work / f"{front}.toml"
    path.write_text(to_toml(config))
    if front == "bare":
        return [sys.executable, str(Path(__file__).with_name("barefront.py")), str(path), str(port)]
    args = ["echfront", "--config", str(path)]
    args += ["--workers", "2"] if front == "workers2" else []
    return twistd_command(ECHFRONT_LOGGER, *args)


def wait_started(
    front: str, proc: subprocess.Popen[bytes], work: Path, port: int, *, count: int, timeout: float
) -> list[int]:
    """:func:`wait_for`, failing with the end of the front's log (``work/FRONT.log``)."""
    try:
        return wait_for(proc, port, count, timeout)
    except RuntimeError as error:
        tail = (work / f"{front}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{front}: {error}\n{tail}") from None


@contextmanager
def started(front: str, pki: Pki, work: Path, backend_port: int) -> Iterator[tuple[int, list[int]]]:
    """Start ``front`` under callgrind; yield its port and its front processes."""
    port = free_port()
    command = front_command(front, pki, work, port, backend_port)
    out_dir = work / front
    out_dir.mkdir()
    log = (work / f"{front}.log").open("wb")
    proc = subprocess.Popen(
        callgrind(out_dir, command),
        cwd=work,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    workers: dict[int, int] = {}
    try:
        count = 2 if front == "workers2" else 1
        pids = wait_started(front, proc, work, port, count=count, timeout=START_TIMEOUT)
        if front == "workers2":
            workers = {pid: start_time(pid) for pid in pids}
        yield port, pids
    finally:
        stop_process(proc, timeout=120)
        for pid, started_at in workers.items():
            # The supervisor stops its workers; should it have been killed
            # instead, they must not outlive it.
            stop_pid(pid, started_at)
        log.close()


def measure(front: str, pki: Pki, work: Path, params: argparse.Namespace) -> Counted:
    """Count one front's instructions over ``params.handshakes`` handshakes."""
    with ExitStack() as stack:
        backend = stack.enter_context(GoBackend([pki.pair(SECRET)], ident=front))
        port, pids = stack.enter_context(started(front, pki, work, backend.port))
        warm = run_load(pki, port, params.warmup, params.concurrency)
        if warm["ok"] != params.warmup:
            raise RuntimeError(f"{front}: warm-up failed: {warm}")
        assert backend.pid is not None
        watched = [*pids, backend.pid]
        baseline = {pid: fd_count(pid) for pid in watched}
        for pid in pids:
            control(pid, "-i", "on")
        summary = run_load(pki, port, params.handshakes, params.concurrency)
        wait_fds(watched, baseline)
        for pid in pids:
            control(pid, "-i", "off")
            control(pid, "-d")
        counted = Counted(front, int(summary["ok"]), int(summary.get("ech_accepted", 0)))
        if counted.handshakes != params.handshakes or counted.accepted != counted.handshakes:
            raise RuntimeError(f"{front}: not every handshake was ECH-accepted: {summary}")
        for pid in pids:
            counted.instructions[pid] = dumped_totals(work / front, pid)
        return counted


def report(results: dict[str, Counted]) -> list[str]:
    """The table and the ratios."""
    lines = [f"{'front':10s} {'handshakes':>10s} {'instructions/handshake':>24s}  by process"]
    for name, counted in results.items():
        shares = ", ".join(
            f"{v / counted.handshakes / 1e6:.3f} M" for v in counted.instructions.values()
        )
        lines.append(
            f"{name:10s} {counted.handshakes:10d} {counted.per_handshake / 1e6:22.3f} M  {shares}"
        )
    split, bare, workers = (results.get(k) for k in ("split", "bare", "workers2"))
    if split and bare:
        ratio = split.per_handshake / bare.per_handshake
        lines.append(f"split / bare, instructions per handshake: {ratio:.3f}")
    if split and workers:
        work = workers.per_handshake / split.per_handshake
        capacity = (split.busiest / split.handshakes) / (workers.busiest / workers.handshakes)
        lines.append(f"workers2 / split, instructions per handshake (all workers): {work:.3f}")
        lines.append(
            f"workers2 instruction capacity / split (one core per worker): {capacity:.3f}"
            " (issue 11's bound: >= 1.7)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fronts", default=",".join(FRONTS), help="comma-separated subset")
    parser.add_argument("--handshakes", type=int, default=300, help="measured handshakes")
    parser.add_argument("--warmup", type=int, default=40, help="unmeasured handshakes first")
    parser.add_argument("--concurrency", type=int, default=8, help="handshakes in flight")
    parser.add_argument("--json", type=Path, help="write the raw counts here")
    parser.add_argument(
        "--keep",
        type=Path,
        help="copy each front's callgrind dumps into DIR/FRONT (read them with callgrind_annotate)",
    )
    params = parser.parse_args(argv)
    fronts = [f for f in params.fronts.split(",") if f]
    unknown = sorted(set(fronts) - set(FRONTS))
    if unknown:
        parser.error(f"unknown fronts: {', '.join(unknown)} (choose from {', '.join(FRONTS)})")
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(
            f"instrbench: {', '.join(missing)} not found (apt-get install valgrind)",
            file=sys.stderr,
        )
        return 2
    results: dict[str, Counted] = {}
    with tempfile.TemporaryDirectory(prefix="instrbench-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        for front in fronts:
            print(f"[{time.strftime('%H:%M:%S')}] {front} under callgrind", file=sys.stderr)
            results[front] = measure(front, pki, work, params)
            if params.keep:
                shutil.copytree(work / front, params.keep / front, dirs_exist_ok=True)
    lines = report(results)
    print("\n".join(lines))
    if params.json:
        params.json.write_text(
            json.dumps(
                {
                    "params": vars(params) | {"json": str(params.json)},
                    "results": [r.as_json() for r in results.values()],
                    "report": lines,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
