"""/proc readers and CPU pinning for benchmarks/frontbench.py.

CPU time, resident memory, file descriptors and listening sockets of the
processes a benchmark started, read from Linux /proc; stopping a process by
PID only while it is still the one that was started (its start time); and
pinning the benchmark and its children to CPUs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CLK_TCK",
    "Cpu",
    "Pinning",
    "children",
    "cpu_seconds",
    "fd_count",
    "listening_inodes",
    "listens",
    "read_cpu",
    "rss_kib",
    "slab_kib",
    "start_time",
    "stop_pid",
    "tick_seconds",
    "wait_fds",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Bound on waiting for a front's connections to close after a phase.
SETTLE_TIMEOUT = 10.0
#: Bound on each of SIGTERM and SIGKILL taking effect.
STOP_WAIT = 5.0


@dataclass(frozen=True)
class Cpu:
    """CPU time of one process at one moment."""

    ticks: int  # utime + stime of /proc/PID/stat (includes exited threads)
    runtime_ns: int | None  # sum of /proc/PID/task/*/schedstat run times
    tasks: frozenset[int]


def read_cpu(pid: int) -> Cpu:
    """Snapshot a process's CPU time."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    tasks = frozenset(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    total: int | None = 0
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text()
        except OSError:  # the thread exited, or no schedstat in this kernel
            total = None
            break
        assert total is not None
        total += int(text.split()[0])
    return Cpu(ticks, total, tasks)


def cpu_seconds(before: Cpu, after: Cpu) -> float:
    """CPU seconds between two snapshots, as precisely as /proc allows.

    The schedstat run times are exact but only cover live threads: they are
    used when every thread of the first snapshot is still there.
    """
    if (
        before.runtime_ns is not None
        and after.runtime_ns is not None
        and before.tasks <= after.tasks
    ):
        return (after.runtime_ns - before.runtime_ns) / 1e9
    return tick_seconds(before, after)


def tick_seconds(before: Cpu, after: Cpu) -> float:
    """utime+stime difference (resolution 1/CLK_TCK seconds)."""
    return (after.ticks - before.ticks) / CLK_TCK


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slab_kib() -> int:
    """Kernel slab memory of the whole system (/proc/meminfo Slab), in KiB.

    Sockets, pipes and their files live there, outside every VmRSS.
    """
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    raise RuntimeError("no Slab in /proc/meminfo")


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_time(pid: int) -> int:
    """Start time of a process (clock ticks after boot), to recognise it later."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on a TCP port (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    return inodes


def listens(pid: int, inodes: set[str]) -> bool:
    """Whether a process holds one of these sockets."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def wait_fds(
    pids: Sequence[int], baseline: dict[int, int], timeout: float = SETTLE_TIMEOUT
) -> bool:
    """Wait (bounded) until each process is back to its baseline fd count."""
    deadline = time.monotonic() + timeout
    while True:
        if all(fd_count(pid) <= baseline[pid] for pid in pids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def stop_pid(pid: int, started: int) -> None:
    """SIGTERM, then SIGKILL, a process we started (checked by its start time)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if start_time(pid) != started:
                return
            os.kill(pid, sig)
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + STOP_WAIT
        while time.monotonic() < deadline:
            try:
                if start_time(pid) != started or _zombie(pid):
                    return
            except (OSError, ValueError):
                return
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[0] == "Z"


# -- CPU pinning ------------------------------------------------------------------


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the front and the load (client, backend) run on."""

    front: frozenset[int] | None
    load: frozenset[int] | None
    note: str
    available: frozenset[int] = frozenset()

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        available = sorted(os.sched_getaffinity(0))
        if not enabled:
            return cls(None, None, "no pinning (--no-pin)")
        if len(available) < 2:
            return cls(None, None, f"no pinning (only CPU {available} available)")
        load, front = frozenset({available[0]}), frozenset({available[1]})
        os.sched_setaffinity(0, load)  # children (client, backend) inherit it
        return cls(
            front,
            load,
            f"front (twistd, haproxy) and bench_decoder.py on CPU {available[1]}; client and "
            f"backend on CPU {available[0]}; workers2 unpinned (CPUs "
            f"{','.join(map(str, available))})",
            frozenset(available),
        )

    @contextlib.contextmanager
    def spawning(self, cpus: frozenset[int] | None) -> Iterator[None]:
        """Run the block (which starts a process) pinned to ``cpus``; None: all CPUs."""
        if self.load is None:
            yield
            return
        os.sched_setaffinity(0, cpus if cpus is not None else self.available)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.load)

    def as_json(self) -> dict[str, Any]:
        return {
            "front_cpus": sorted(self.front) if self.front else None,
            "load_cpus": sorted(self.load) if self.load else None,
            "workers2": "unpinned" if self.front else None,
            "note": self.note,
        }
