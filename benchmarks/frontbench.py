"""Front benchmark: echfront next to a direct connection and haproxy, on loopback.

Usage::

    python benchmarks/frontbench.py [--quick] [--repeats 3] [--out benchmarks/results]
                                    [--fronts direct,split,split-twisted,haproxy,...]

Fronts compared in one run (every one in front of the same kind of Go
``crypto/tls`` backend, ``echtest backend``, a fresh one per front and repeat):

* ``direct``: Go client (no ECH, SNI secret.example) straight to the backend;
  there is no front, so only the backend's and the client's figures exist;
* ``split``: Go ECH client, echfront decrypts the ClientHello and relays the
  connection to the backend (split mode), on the lean engine (the default,
  ``[front] engine = "lean"``);
* ``split-twisted``: the same on Twisted's TCP transports
  (``[front] engine = "twisted"``);
* ``local``: Go ECH client, echfront terminates TLS itself for an ECH name
  (``tests.localapp:echo_factory``, which speaks the backend's echo
  protocol); the lean engine reads the first flight and hands the
  connection to Twisted's TLS;
* ``local-twisted``: the same on Twisted's TCP transports throughout;
* ``haproxy``: Go client (no ECH) through haproxy 2.6 in ``mode tcp`` with
  ``nbthread 1``, routing by ``req.ssl_sni`` (the cost floor of an SNI
  passthrough front: it cannot decrypt ECH).  Installed with apt-get when
  missing and possible, otherwise skipped with a message;
* ``twisted``: Go client (no ECH) through Twisted's own TCP port forwarder
  (``twistd portforward``, no SNI routing, no parsing): the cost floor of
  any relay built on Twisted's TCP transports, for reading the ratios of
  the echfront fronts to haproxy;
* ``twisted-quiet``: the same without the two "Starting factory"/"Stopping
  factory" log lines its client factory writes per connection;
* ``workers2``: as split, with ``--workers 2``, its workers free to run on
  every CPU (beside the client and the backend);
* ``workers2-onecpu``: the same with both workers pinned to the front's
  CPU, where nothing else runs (not in the default set): what two workers
  sharing one core cost per handshake, next to ``workers2``'s sharing of
  both cores with the load;
* ``bare``: Go ECH client through benchmarks/barefront.py, the smallest
  split-mode front on echfront's decoder and router (one epoll loop, no
  Twisted, no metrics, logs, limits or deadlines): the floor of a Python
  front, for reading ``split``'s ratio to haproxy;
* ``go-split``: Go ECH client through ``echtest split-front``
  (tests/go/splitfront.go), a minimal split-mode front in compiled Go
  (crypto/hpke, a goroutine and a 16 KiB buffer per direction, copying
  as frontbench's haproxy does; one backend, no routing table, logs,
  limits or alerts): the reference for "a per-connection cost near the
  compiled fronts".

The echfront fronts log connections with echfront's buffered text observer
(``--logger=echfront.logs.text_observer``).

Method.  Repeats are the outer loop and fronts the inner one, so a noisy
moment of the shared machine spreads over all fronts instead of hitting one.
For each front and repeat: start the backend and the front, warm up (a few
handshakes and a 1 MiB echo), then measure

1. idle memory: ``echtest idle`` (tests/go/load.go) opens ``--idle-conns``
   connections (handshake + the backend's report line, 128 attempts in flight)
   and holds them; with all of them open the front's VmRSS (/proc/PID/status,
   summed over the workers) minus its VmRSS just before, divided by the
   number open, is the resident memory per idle connection.  This runs first,
   after the warm-up, so that memory freed by earlier phases cannot hide it;
2. handshakes: ``echtest client -count N -concurrency C -quiet`` (each
   connection: handshake, report line, close); the client's summary gives
   p50/p99 handshake latency, its wall time handshakes/s, and the front's CPU
   time over the run gives CPU seconds per 1,000 handshakes.  The CPU-bound
   capacity of the front is handshakes / max(CPU seconds of one front
   process): the handshakes per second it could sustain with every process
   busy (for workers2 the busier worker bounds it);
3. bulk: ``echtest client -send`` echoes ``--bulk-mib`` MiB through the
   front; MB/s is the bytes uploaded (each is echoed back) over the wall time,
   and CPU per GB is per 10^9 bytes uploaded (each byte crosses the front
   once in each direction).

CPU time is read from /proc before and after each phase (after the front and
backend closed the phase's connections): the sum of the schedstat run time
of the process's threads, in nanoseconds, when no thread exited in between,
else utime+stime of /proc/PID/stat in clock ticks (both are recorded).  The
client's CPU comes from its rusage.  With two or more CPUs the front runs on
CPU 1 and the client and backend on CPU 0 (the benchmark pins itself to CPU
0 and its children inherit that; fronts are spawned while it is pinned to CPU
1).  workers2 cannot be isolated on one CPU: its processes may use both CPUs,
and its CPU-bound capacity (not its handshakes/s) is what is compared with
one worker's.

Targets (issue 6, with issue 11's bounds) reported from the medians, and per
repeat: split CPU per handshake / haproxy's <= 2.5; split bulk CPU per GB /
haproxy's <= 0.5; split RSS per idle relayed connection <= 8 KiB; workers2
capacity / split capacity >= 1.7; and, from benchmarks/bench_decoder.py,
decoding a Chrome-shaped ClientHello <= 2.5 X25519 exchanges.  Beside them,
every front's CPU per handshake against haproxy's and each engine's against
the other's (``references`` in the JSON).

Output: tables on stdout (progress on stderr), ``frontbench-<time>.json``
with every raw sample and the summary, and ``frontbench-<time>.png``
(matplotlib, the ``bench`` extra) in ``--out``.  Every subprocess run is
bounded in time; only processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO_ROOT))

from frontbench_proc import (  # noqa: E402
    CLK_TCK,
    Pinning,
    children,
    cpu_seconds,
    fd_count,
    listening_inodes,
    listens,
    read_cpu,
    rss_kib,
    slab_kib,
    start_time,
    stop_pid,
    tick_seconds,
    wait_fds,
)
from frontbench_report import chart, ratios, references, render, summarize  # noqa: E402

from tests.frontproc import (  # noqa: E402
    FrontProcess,
    Pki,
    free_port,
    make_pki,
    to_toml,
    twistd_command,
)
from tests.gotools import (  # noqa: E402
    ClientOptions,
    GoBackend,
    GoToolsError,
    GoUnavailableError,
    client_args,
    find_go,
    go_binary,
    parse_json_lines,
)
from tests.processes import stop_process  # noqa: E402

JSON = dict[str, Any]

FRONTS = (
    "direct",
    "split",
    "split-twisted",
    "local",
    "local-twisted",
    "haproxy",
    "twisted",
    "twisted-quiet",
    "workers2",
    "bare",
    "go-split",
)
#: Fronts run only when named in ``--fronts``.
EXTRA_FRONTS = ("workers2-onecpu",)
#: The echfront fronts run on Twisted's transports (``[front] engine = "twisted"``);
#: the others on the default, the lean engine.
TWISTED_ENGINE = frozenset(("split-twisted", "local-twisted"))
#: How echfront fronts log: echfront's buffered text observer (one write per
#: batch), as docs/operations.rst recommends, rather than twistd's default,
#: which writes and flushes every line.
ECHFRONT_LOGGER = "--logger=echfront.logs.text_observer"
SECRET = "secret.example"  # relayed to the backend
PRIVATE = "private.example"  # terminated by echfront (local)
PUBLIC = "public.example"

#: File descriptors the benchmark processes need besides the idle connections.
FD_MARGIN = 256
#: Connection attempts in flight while opening the idle connections: enough to
#: hide the cross-CPU latency of each handshake, below every listen backlog.
IDLE_CONCURRENCY = 128
#: Listen backlog of the echfront fronts (Twisted's default is 50).
BACKLOG = 1024
#: Every phase, in the order they run (``--phases`` picks a subset).
PHASES = ("idle", "handshake", "bulk")
#: Pause with all idle connections open before reading VmRSS.
IDLE_SETTLE = 1.0
SERVER_START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Params:
    """Sizes of one run."""

    handshakes: int
    concurrency: int
    bulk_bytes: int
    bulk_conns: int
    idle_conns: int
    warmup: int
    repeats: int

    def as_json(self) -> JSON:
        return {
            "handshakes": self.handshakes,
            "concurrency": self.concurrency,
            "bulk_bytes": self.bulk_bytes,
            "bulk_conns": self.bulk_conns,
            "idle_conns": self.idle_conns,
            "idle_concurrency": IDLE_CONCURRENCY,
            "warmup_handshakes": self.warmup,
            "repeats": self.repeats,
        }


def log(message: str) -> None:
    """Progress, on stderr (stdout holds the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- running the Go tools -----------------------------------------------------------


@dataclass
class ToolRun:
    """One finished ``echtest`` run."""

    lines: list[JSON]
    wall_s: float
    cpu_s: float
    returncode: int
    stderr: str


def run_tool(args: Sequence[str], timeout: float) -> ToolRun:
    """Run a tool to completion (bounded), with its wall time and rusage CPU time.

    A thread reaps the process with ``wait4`` (for its rusage); if it does
    not finish in time it is killed by its PID.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        reaped: list[tuple[int, resource.struct_rusage]] = []
        done = threading.Event()

        def reap() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            reaped.append((status, usage))
            done.set()

        threading.Thread(target=reap, daemon=True).start()
        finished = done.wait(timeout)
        wall = time.monotonic() - start
        if not finished:
            proc.kill()  # by PID; the thread reaps it
            done.wait(STOP_TIMEOUT)
        status, usage = reaped[0] if reaped else (-1, None)
        proc.returncode = os.waitstatus_to_exitcode(status) if status >= 0 else -9
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if not finished:
        raise GoToolsError(f"{args[1]} timed out after {timeout:.0f}s: {' '.join(args)}")
    try:
        lines = parse_json_lines(text)
    except GoToolsError as error:
        raise GoToolsError(f"{error}\nstderr: {stderr[-2000:]}") from None
    cpu = usage.ru_utime + usage.ru_stime if usage is not None else 0.0
    return ToolRun(lines, wall, cpu, proc.returncode, stderr)


def summary_line(run: ToolRun) -> JSON:
    """The client's ``{"summary": true}`` line."""
    for line in run.lines:
        if line.get("summary"):
            return line
    raise GoToolsError(f"client printed no summary (exit {run.returncode}): {run.stderr[-2000:]}")


# -- fronts -------------------------------------------------------------------------


@dataclass
class Target:
    """A running front (or none, for direct) and how clients reach it."""

    name: str
    address: str
    server_name: str
    ech: bytes | None
    front_pids: list[int]
    backend: GoBackend
    extra: JSON = field(default_factory=dict)

    @property
    def backend_pid(self) -> int:
        pid = self.backend.pid
        assert pid is not None
        return pid

    def client_options(self, ca: Path) -> ClientOptions:
        options = ClientOptions(name=self.server_name, ca=ca)
        if self.ech is not None:
            options["ech"] = self.ech
        return options


def echfront_config(
    pki: Pki, port: int, backend_port: int, local_app: str, engine: str = "lean"
) -> JSON:
    """The front's configuration: secret.example relayed, private.example local.

    Per-address limits are off: every connection comes from 127.0.0.1.
    """
    private = pki.certs[PRIVATE]
    return {
        "listen": [f"tcp:{port}:interface=127.0.0.1:backlog={BACKLOG}"],
        "public_name": PUBLIC,
        "default": "reject",
        "ech": {"keys": [{"file": str(pki.ech_key)}]},
        "public": {"cert": str(pki.certs[PUBLIC].combined)},
        "limits": {
            "hpke_rate": 0,
            "max_first_flights_per_address": 0,
            "max_connections": 0,
            "shutdown_grace": 2,
        },
        "backends": {"b1": {"endpoint": f"tcp:host=127.0.0.1:port={backend_port}"}},
        "locals": {
            "app": {"cert": str(private.chain), "key": str(private.key), "factory": local_app}
        },
        "routes": [
            {"name": SECRET, "backend": "b1"},
            {"name": PRIVATE, "local": "app"},
        ],
        "front": {"engine": engine},
    }


def haproxy_config(port: int, backend_port: int, maxconn: int, splice: bool) -> str:
    """haproxy 2.6, TCP mode, one thread, routing by the SNI of the ClientHello."""
    return "\n".join(
        [
            "global",
            "    nbthread 1",
            f"    maxconn {maxconn}",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 5m",
            "    timeout server 5m",
            *(["    option splice-auto"] if splice else []),
            "frontend fe",
            f"    bind 127.0.0.1:{port}",
            "    tcp-request inspect-delay 5s",
            "    tcp-request content accept if { req_ssl_hello_type 1 }",
            f"    use_backend be_secret if {{ req.ssl_sni -i {SECRET} }}",
            "backend be_secret",
            f"    server b1 127.0.0.1:{backend_port}",
            "",
        ]
    )


class ListeningProcess:
    """A server in the foreground (``argv``), stopped by its PID; ready once it listens."""

    def __init__(self, argv: list[str], workdir: Path, port: int, log_name: str) -> None:
        self.argv = argv
        self.workdir = workdir
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / log_name

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> ListeningProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        wait_listening(self.proc, self.port, SERVER_START_TIMEOUT, self.log_text)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, STOP_TIMEOUT)


class HaproxyProcess(ListeningProcess):
    """``haproxy -db -f FILE``, after ``haproxy -c`` accepted the file."""

    def __init__(self, binary: str, workdir: Path, config: str, port: int) -> None:
        self.binary = binary
        self.config = config
        self.path = workdir / "haproxy.cfg"
        super().__init__([binary, "-db", "-f", str(self.path)], workdir, port, "haproxy.log")

    def __enter__(self) -> HaproxyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.config)
        check = subprocess.run(
            [self.binary, "-c", "-q", "-f", str(self.path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c failed:\n{check.stdout}{check.stderr}")
        super().__enter__()
        return self


def portforward_command(port: int, backend_port: int, *, quiet: bool = False) -> list[str]:
    """Twisted's own TCP forwarder from ``port`` to the backend (the ``twisted`` front).

    ``quiet`` (the ``twisted-quiet`` front): without the two "Starting
    factory"/"Stopping factory" log lines its client factory writes per
    connection (``ProxyClientFactory.noisy`` set to False before twistd
    starts), which are most of what it spends beyond the transports.
    """
    listen = f"tcp:{port}:interface=127.0.0.1:backlog={BACKLOG}"
    forward = ["portforward", "-p", listen, "-h", "127.0.0.1", "-d", str(backend_port)]
    command = twistd_command("--logfile=-", *forward)
    if quiet:
        launcher = (
            "from twisted.protocols import portforward; "
            "portforward.ProxyClientFactory.noisy = False; "
            "from twisted.scripts.twistd import run; run()"
        )
        command = [sys.executable, "-c", launcher, *command[command.index("-n") :]]
    return command


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, timeout: float, diagnostics: Callable[[], str]
) -> None:
    """Wait (bounded) until a process listens on a port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{diagnostics()}")
        if listens(proc.pid, listening_inodes(port)):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {timeout}s:\n{diagnostics()}")


def haproxy_version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30, check=False)
    first = (result.stdout or result.stderr).splitlines()
    return first[0] if first else "unknown"


def ensure_haproxy() -> tuple[str | None, str]:
    """Find haproxy, or install it from Debian packages; (path or None, message)."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )
    if found:
        return found, haproxy_version(found)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, (
            "haproxy is not installed and cannot be (needs root and apt-get): "
            "skipping the haproxy front; install it with `apt-get install haproxy`"
        )
    log("haproxy not found: apt-get install -y haproxy")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Keep the package's init script from starting a haproxy of its own.
    policy = Path("/usr/sbin/policy-rc.d")
    guard = not policy.exists()
    try:
        if guard:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        install = ["apt-get", "install", "-y", "--no-install-recommends", "haproxy"]
        result = subprocess.run(
            install, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if result.returncode != 0:
            subprocess.run(
                ["apt-get", "update"], env=env, capture_output=True, timeout=600, check=False
            )
            result = subprocess.run(
                install, env=env, capture_output=True, text=True, timeout=600, check=False
            )
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"installing haproxy failed ({error}): skipping the haproxy front"
    finally:
        if guard:
            policy.unlink(missing_ok=True)
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
    )
    if result.returncode != 0 or found is None:
        return None, (
            f"apt-get install haproxy failed ({result.returncode}): skipping the haproxy "
            f"front\n{result.stderr[-1000:]}"
        )
    return found, haproxy_version(found) + " (installed by this run)"


@dataclass
class Context:
    """What every front and repeat shares."""

    params: Params
    pki: Pki
    workdir: Path
    pinning: Pinning
    binary: Path
    haproxy: str | None
    haproxy_splice: bool
    local_app: str
    #: The phases to run, in the usual order (``--phases``).
    phases: tuple[str, ...] = PHASES


@contextlib.contextmanager
def start_target(ctx: Context, front: str, repeat: int) -> Iterator[Target]:
    """Start a fresh backend and the front; stop both (by PID) afterwards.

    A fresh backend (and port) per front keeps TIME_WAIT sockets of earlier
    phases out of the way of the next one's ephemeral ports.
    """
    pki = ctx.pki
    workdir = ctx.workdir / f"{front}-{repeat}"
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(GoBackend([pki.pair(SECRET)], ident=f"{front}{repeat}"))
        if front == "direct":
            yield Target(front, backend.address, SECRET, None, [], backend)
            return
        if front == "haproxy":
            assert ctx.haproxy is not None
            port = free_port()
            maxconn = ctx.params.idle_conns + 1000
            text = haproxy_config(port, backend.port, maxconn, ctx.haproxy_splice)
            with ctx.pinning.spawning(ctx.pinning.front):
                proxy = stack.enter_context(HaproxyProcess(ctx.haproxy, workdir, text, port))
            assert proxy.proc is not None
            yield Target(front, f"127.0.0.1:{port}", SECRET, None, [proxy.proc.pid], backend)
            return

        def pinned(argv: list[str], port: int, log_name: str, ech: bytes | None) -> Target:
            """Start a one-process front on the front's CPU; its target."""
            with ctx.pinning.spawning(ctx.pinning.front):
                process = stack.enter_context(ListeningProcess(argv, workdir, port, log_name))
            assert process.proc is not None
            address = f"127.0.0.1:{port}"
            return Target(front, address, SECRET, ech, [process.proc.pid], backend)

        if front in ("twisted", "twisted-quiet"):
            port = free_port()
            argv = portforward_command(port, backend.port, quiet=front == "twisted-quiet")
            yield pinned(argv, port, "twistd.log", None)
            return
        if front == "bare":
            port = free_port()
            config = echfront_config(pki, port, backend.port, ctx.local_app)
            del config["front"]
            config_path = workdir / "bare.toml"
            workdir.mkdir(parents=True, exist_ok=True)
            config_path.write_text(to_toml(config))
            script = str(Path(__file__).resolve().parent / "barefront.py")
            argv = [sys.executable, script, str(config_path), str(port)]
            yield pinned(argv, port, "bare.log", pki.ech_config_list)
            return
        if front == "go-split":
            port = free_port()
            argv = [str(go_binary()), "split-front", "-listen", f"127.0.0.1:{port}"]
            argv += ["-backend", backend.address, "-ech-key", str(pki.ech_key)]
            yield pinned(argv, port, "go.log", pki.ech_config_list)
            return

        port = free_port()
        engine = "twisted" if front in TWISTED_ENGINE else "lean"
        config = echfront_config(pki, port, backend.port, ctx.local_app, engine)
        workers = front.startswith("workers2")
        args = ["--workers", "2"] if workers else []
        cpus = None if front == "workers2" else ctx.pinning.front
        proc = FrontProcess(workdir, config, args=args, port=port, twistd_args=[ECHFRONT_LOGGER])
        workers_seen: dict[int, int] = {}

        def stop_front() -> None:
            proc.stop()
            # Should the supervisor have been killed, its workers must not outlive it.
            for pid, when in workers_seen.items():
                stop_pid(pid, when)

        with ctx.pinning.spawning(cpus):
            proc.start()
        stack.callback(stop_front)
        name = PRIVATE if front.startswith("local") else SECRET
        target = Target(front, proc.address, name, pki.ech_config_list, [proc.pid], backend)
        if workers:
            target.front_pids = wait_workers(proc, 2, workers_seen)
            target.extra["supervisor_pid"] = proc.pid
        yield target


def wait_workers(
    proc: FrontProcess, count: int, seen: dict[int, int], timeout: float = 30.0
) -> list[int]:
    """Wait (bounded) until ``count`` children of the supervisor listen; their PIDs.

    Every child seen is added to ``seen`` (PID to start time), for the cleanup.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inodes = listening_inodes(proc.port)
        ready = []
        for pid in children(proc.pid):
            with contextlib.suppress(OSError, ValueError):
                seen.setdefault(pid, start_time(pid))
            if listens(pid, inodes):
                ready.append(pid)
        if len(ready) >= count:
            return ready[:count]
        if not proc.running():
            break
        time.sleep(0.1)
    raise RuntimeError(f"{count} workers did not listen within {timeout}s:\n{proc.log_text()}")


# -- measurements ---------------------------------------------------------------------


def per(value: float, count: float, scale: float) -> float | None:
    """``value / count * scale``, None when nothing was counted."""
    return value / count * scale if count > 0 else None


def user_system_ticks(pid: int) -> tuple[int, int]:
    """utime and stime of a process (fields 14 and 15 of proc(5)), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])


def run_client(ctx: Context, target: Target, bound: float, **extra: Any) -> ToolRun:
    """Run ``echtest client`` against the target; ``bound``: seconds for the whole run."""
    options = target.client_options(ctx.pki.ca)
    options.update(extra)  # type: ignore[typeddict-item]
    return run_tool(client_args(target.address, **options), bound)


def warm_up(ctx: Context, target: Target) -> None:
    """Load the code paths once, unmeasured: a few handshakes and a 1 MiB echo."""
    count = ctx.params.warmup
    concurrency = min(ctx.params.concurrency, count)
    run = run_client(ctx, target, 120, count=count, concurrency=concurrency, quiet=True)
    summary = summary_line(run)
    if summary["ok"] == 0:
        raise RuntimeError(f"warm-up: no connection succeeded: {summary}")
    run_client(ctx, target, 120, send=1 << 20, timeout=60.0)


class Phase:
    """CPU and fd bookkeeping of the front and backend around one phase."""

    def __init__(self, target: Target) -> None:
        self.pids = [*target.front_pids, target.backend_pid]
        self.fds = {pid: fd_count(pid) for pid in self.pids}
        self.before = {pid: read_cpu(pid) for pid in self.pids}
        self.split_before = {pid: user_system_ticks(pid) for pid in target.front_pids}
        self.front_pids = target.front_pids
        self.backend_pid = target.backend_pid

    def finish(self) -> JSON:
        """Wait for the phase's connections to close, then read CPU times."""
        settled = wait_fds(self.pids, self.fds)
        after = {pid: read_cpu(pid) for pid in self.pids}
        split_after = {pid: user_system_ticks(pid) for pid in self.front_pids}
        front = [cpu_seconds(self.before[p], after[p]) for p in self.front_pids]
        user = sum(split_after[p][0] - self.split_before[p][0] for p in self.front_pids)
        system = sum(split_after[p][1] - self.split_before[p][1] for p in self.front_pids)
        front_ticks = [tick_seconds(self.before[p], after[p]) for p in self.front_pids]
        b = self.backend_pid
        return {
            "settled": settled,
            "front_cpu_s": sum(front) if front else None,
            "front_cpu_s_by_process": front,
            "front_cpu_s_ticks": sum(front_ticks) if front else None,
            # utime and stime of /proc/PID/stat (clock ticks): user space
            # against the kernel's share.
            "front_user_s": user / CLK_TCK if front else None,
            "front_system_s": system / CLK_TCK if front else None,
            "backend_cpu_s": cpu_seconds(self.before[b], after[b]),
        }


def measure_handshakes(ctx: Context, target: Target) -> JSON:
    n, c = ctx.params.handshakes, ctx.params.concurrency
    phase = Phase(target)
    run = run_client(ctx, target, 60 + n * 0.1, count=n, concurrency=c, quiet=True, timeout=30.0)
    cpu = phase.finish()
    summary = summary_line(run)
    ok = int(summary["ok"])
    front_cpu = cpu["front_cpu_s"]
    by_process = cpu["front_cpu_s_by_process"]
    return {
        "count": n,
        "concurrency": c,
        "ok": ok,
        "failed": int(summary["failed"]),
        "errors": summary.get("errors") or {},
        "ech_accepted": summary.get("ech_accepted", 0),
        "wall_s": run.wall_s,
        "handshakes_per_s": ok / run.wall_s if run.wall_s > 0 else None,
        "p50_ms": summary.get("p50_ms"),
        "p99_ms": summary.get("p99_ms"),
        **cpu,
        "client_cpu_s": run.cpu_s,
        "front_cpu_s_per_1k": None if front_cpu is None else per(front_cpu, ok, 1000),
        "backend_cpu_s_per_1k": per(cpu["backend_cpu_s"], ok, 1000),
        "client_cpu_s_per_1k": per(run.cpu_s, ok, 1000),
        # Handshakes per second the front could sustain, CPU-bound: its
        # busiest process is the limit.
        "capacity_per_s": per(ok, max(by_process), 1) if by_process and max(by_process) else None,
    }


def measure_bulk(ctx: Context, target: Target) -> JSON:
    conns = ctx.params.bulk_conns
    each = ctx.params.bulk_bytes // conns
    phase = Phase(target)
    bound = 60 + ctx.params.bulk_bytes / 2e6  # >= 2 MB/s
    run = run_client(
        ctx, target, bound, count=conns, concurrency=conns, send=each, quiet=True, timeout=bound
    )
    cpu = phase.finish()
    summary = summary_line(run)
    ok = int(summary["ok"])
    sent = ok * each
    gb = sent / 1e9
    front_cpu = cpu["front_cpu_s"]
    return {
        "connections": conns,
        "bytes_per_connection": each,
        "ok": ok,
        "failed": int(summary["failed"]),
        "errors": summary.get("errors") or {},
        "bytes_echoed": sent,
        "wall_s": run.wall_s,
        "mb_per_s": sent / 1e6 / run.wall_s if run.wall_s > 0 else None,
        **cpu,
        "client_cpu_s": run.cpu_s,
        "front_cpu_s_per_gb": None if front_cpu is None else per(front_cpu, gb, 1),
        "front_user_s_per_gb": None if front_cpu is None else per(cpu["front_user_s"], gb, 1),
        "front_system_s_per_gb": None if front_cpu is None else per(cpu["front_system_s"], gb, 1),
        "backend_cpu_s_per_gb": per(cpu["backend_cpu_s"], gb, 1),
    }


def measure_idle(ctx: Context, target: Target) -> JSON:
    """Memory per idle connection, with ``idle_conns`` open at once."""
    count = ctx.params.idle_conns
    pids = [*target.front_pids, target.backend_pid]
    before = {pid: rss_kib(pid) for pid in pids}
    fds_before = {pid: fd_count(pid) for pid in pids}
    slab_before = slab_kib()
    args = [str(ctx.binary), "idle", "-addr", target.address, "-name", target.server_name]
    args += ["-ca", str(ctx.pki.ca), "-count", str(count)]
    args += ["-concurrency", str(IDLE_CONCURRENCY), "-timeout", "60s"]
    open_bound = 60 + count * 0.03
    args += ["-max-hold", f"{open_bound + 60:.0f}s"]
    if target.ech is not None:
        args += ["-ech", base64.b64encode(target.ech).decode()]
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()
    errors: list[str] = []

    def pump(stream: IO[str], into: Callable[[str], None]) -> None:
        for line in stream:
            into(line)
        if stream is proc.stdout:
            lines.put(None)

    threading.Thread(target=pump, args=(proc.stdout, lines.put), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr, errors.append), daemon=True).start()

    def next_line(timeout: float) -> JSON:
        line = lines.get(timeout=timeout)
        if line is None:
            raise GoToolsError(f"echtest idle exited early: {''.join(errors)[-2000:]}")
        value: JSON = json.loads(line)
        return value

    try:
        opened = next_line(open_bound)
        time.sleep(IDLE_SETTLE)
        during = {pid: rss_kib(pid) for pid in pids}
        fds_during = {pid: fd_count(pid) for pid in pids}
        slab_during = slab_kib()
        proc.stdin.write("release\n")
        proc.stdin.flush()
        closed = next_line(60)
        proc.wait(STOP_TIMEOUT)
    except (queue.Empty, subprocess.TimeoutExpired):
        raise GoToolsError(f"echtest idle timed out: {''.join(errors)[-2000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        proc.stdin.close()
    open_count = int(opened["open"])
    front_delta = sum(during[p] - before[p] for p in target.front_pids)
    backend_delta = during[target.backend_pid] - before[target.backend_pid]
    front_fds = sum(fds_during[p] - fds_before[p] for p in target.front_pids)
    wait_fds(pids, fds_before)
    return {
        "count": count,
        "open": open_count,
        "failed": int(opened["failed"]),
        "errors": opened.get("errors") or {},
        "alive_at_release": int(closed.get("alive", 0)),
        "open_s": opened.get("elapsed_s"),
        "front_rss_kib_before": sum(before[p] for p in target.front_pids) or None,
        "front_rss_kib_open": sum(during[p] for p in target.front_pids) or None,
        "front_fds_open": sum(fds_during[p] for p in target.front_pids) or None,
        "front_fds_per_conn": per(front_fds, open_count, 1) if target.front_pids else None,
        "backend_rss_kib_before": before[target.backend_pid],
        "backend_rss_kib_open": during[target.backend_pid],
        "front_rss_kib_per_conn": per(front_delta, open_count, 1) if target.front_pids else None,
        "backend_rss_kib_per_conn": per(backend_delta, open_count, 1),
        # System-wide kernel memory (all sockets and pipes of client, front
        # and backend): informative, not attributable to the front alone.
        "slab_kib_before": slab_before,
        "slab_kib_open": slab_during,
        "system_slab_kib_per_conn": per(slab_during - slab_before, open_count, 1),
    }


def phase_problem(result: JSON) -> str | None:
    """Why a phase is incomplete (failed connections), or None.

    An incomplete phase keeps its raw figures but is left out of the summary.
    """
    total, ok = result.get("count", result.get("connections", 0)), result.get("ok")
    if "open" in result:  # idle
        ok = result["open"]
    problems = []
    if ok != total:
        errors = sorted(result.get("errors", {}).items(), key=lambda item: -item[1])
        shown = "; ".join(f"{count}x {text[:120]}" for text, count in errors[:3])
        problems.append(f"{ok} of {total} connections succeeded ({shown})")
    if "alive_at_release" in result and result["alive_at_release"] != result["open"]:
        problems.append(f"only {result['alive_at_release']} still open at release")
    fds = result.get("front_fds_open")
    if problems and fds is not None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        problems.append(f"front processes held {fds} fds (RLIMIT_NOFILE {limit} each)")
    return "; ".join(problems) or None


def measure(ctx: Context, front: str, repeat: int) -> JSON:
    """All phases for one front and repeat; errors are recorded, not raised."""
    sample: JSON = {"front": front, "repeat": repeat}
    try:
        with start_target(ctx, front, repeat) as target:
            sample["front_pids"] = target.front_pids
            sample.update(target.extra)
            warm_up(ctx, target)
            for phase, run in (
                ("idle", measure_idle),
                ("handshake", measure_handshakes),
                ("bulk", measure_bulk),
            ):
                if phase not in ctx.phases:
                    continue
                started = time.monotonic()
                result = sample[phase] = run(ctx, target)
                result["phase_s"] = round(time.monotonic() - started, 3)
                result["problem"] = phase_problem(result)
                if result["problem"]:
                    log(f"{front} repeat {repeat + 1} {phase}: {result['problem']}")
    except Exception as error:  # one broken front must not end the run
        sample["error"] = f"{type(error).__name__}: {error}"[:4000]
        log(f"{front} repeat {repeat + 1}: {sample['error'][:500]}")
    return sample


# -- decoder ----------------------------------------------------------------------


def run_decoder(quick: bool, workdir: Path, pinning: Pinning) -> JSON:
    """Run benchmarks/bench_decoder.py (bounded) and return its JSON."""
    path = workdir / "decoder.json"
    script = Path(__file__).with_name("bench_decoder.py")
    cmd = [sys.executable, str(script), "--json", str(path)]
    if quick:
        cmd += ["--repeats", "7"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        with pinning.spawning(pinning.front):
            result = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=600,
                cwd=REPO_ROOT,
                env=env,
                check=False,
            )
    except subprocess.TimeoutExpired:
        return {"error": "bench_decoder.py timed out after 600s"}
    if result.returncode != 0 or not path.exists():
        return {"error": f"bench_decoder.py exited {result.returncode}: {result.stderr[-2000:]}"}
    data: JSON = json.loads(path.read_text())
    data["output"] = result.stdout
    return data


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare echfront with a direct connection and haproxy on loopback.",
        epilog="Defaults: 2000 handshakes at concurrency 16, 512 MiB bulk, 5000 idle "
        "connections; --quick: 100 at 4, 32 MiB, 500 idle.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every measurement")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results", help="output directory"
    )
    parser.add_argument("--fronts", default=",".join(FRONTS), help="comma-separated subset")
    parser.add_argument("--handshakes", type=int, help="handshakes per run (N)")
    parser.add_argument("--concurrency", type=int, help="handshakes in flight (C)")
    parser.add_argument("--bulk-mib", type=int, help="MiB echoed through each front")
    parser.add_argument("--bulk-conns", type=int, default=1, help="connections sharing the bulk")
    parser.add_argument("--idle-conns", type=int, help="idle connections held open at once")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--no-decoder", action="store_true", help="skip bench_decoder.py")
    parser.add_argument(
        "--haproxy-splice", action="store_true", help="haproxy with option splice-auto"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated subset of the phases to run (e.g. bulk)",
    )
    args = parser.parse_args(argv)
    fronts = [f.strip() for f in args.fronts.split(",") if f.strip()]
    known = (*FRONTS, *EXTRA_FRONTS)
    unknown = sorted(set(fronts) - set(known))
    if unknown or not fronts:
        parser.error(f"--fronts: unknown {unknown}; choose from {','.join(known)}")
    args.fronts = [f for f in known if f in fronts]
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not phases or phases - set(PHASES):
        parser.error(f"--phases: unknown {sorted(phases - set(PHASES))}; choose from {PHASES}")
    args.phases = tuple(p for p in PHASES if p in phases)
    if args.repeats < 1 or (args.bulk_conns or 1) < 1:
        parser.error("--repeats and --bulk-conns must be at least 1")
    return args


def make_params(args: argparse.Namespace) -> Params:
    quick = args.quick
    handshakes = args.handshakes or (100 if quick else 2000)
    concurrency = args.concurrency or (4 if quick else 16)
    return Params(
        handshakes=handshakes,
        concurrency=concurrency,
        bulk_bytes=(args.bulk_mib or (32 if quick else 512)) << 20,
        bulk_conns=args.bulk_conns,
        idle_conns=args.idle_conns or (500 if quick else 5000),
        warmup=max(2 * concurrency, 20),
        repeats=args.repeats,
    )


def raise_nofile(params: Params) -> tuple[Params, str]:
    """Raise RLIMIT_NOFILE to its hard limit (children inherit it); fit the idle count."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if limit > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    # A relaying front holds two descriptors per connection.
    fits = (limit - FD_MARGIN) // 2
    note = f"RLIMIT_NOFILE {limit}"
    if params.idle_conns > fits:
        note += f": idle connections lowered from {params.idle_conns} to {fits}"
        log(note)
        params = Params(**{**params.__dict__, "idle_conns": fits})
    return params, note


def git_state() -> JSON:
    """The commit and the uncommitted changes the fronts ran with."""

    def git(*args: str) -> str:
        try:
            result = subprocess.run(
                ["git", *args],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "echfront", "twisted")
    return {"commit": git("rev-parse", "HEAD"), "changed": changed.splitlines()}


def host_info() -> JSON:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    go = find_go()
    go_version = ""
    if go is not None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            go_version = subprocess.run(
                [str(go), "version"], capture_output=True, text=True, timeout=30, check=False
            ).stdout.strip()
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "go": go_version,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    params, nofile = raise_nofile(make_params(args))
    fronts: list[str] = args.fronts
    skipped: dict[str, str] = {}
    try:
        binary = go_binary()
    except GoUnavailableError as error:
        print(f"frontbench: {error}", file=sys.stderr)
        return 2
    haproxy, haproxy_note = None, "not requested"
    if "haproxy" in fronts:
        haproxy, haproxy_note = ensure_haproxy()
        if haproxy is None:
            log(haproxy_note)
            skipped["haproxy"] = haproxy_note
            fronts = [f for f in fronts if f != "haproxy"]
    pinning = Pinning.choose(enabled=not args.no_pin)
    log(f"pinning: {pinning.note}")
    log(f"haproxy: {haproxy_note}")
    started = time.time()
    samples: dict[str, list[JSON]] = {front: [] for front in fronts}
    work = Path(tempfile.mkdtemp(prefix="frontbench-"))
    decoder: JSON | None = None
    try:
        pki = make_pki(work / "pki")
        ctx = Context(
            params=params,
            pki=pki,
            workdir=work,
            pinning=pinning,
            binary=binary,
            haproxy=haproxy,
            haproxy_splice=args.haproxy_splice,
            local_app="tests.localapp:echo_factory",
            phases=args.phases,
        )
        for repeat in range(params.repeats):
            for front in fronts:
                log(f"repeat {repeat + 1}/{params.repeats}: {front}")
                t0 = time.monotonic()
                samples[front].append(measure(ctx, front, repeat))
                log(f"  {front} done in {time.monotonic() - t0:.1f}s")
        if not args.no_decoder:
            log("decoder: benchmarks/bench_decoder.py")
            decoder = run_decoder(args.quick, work, pinning)
            if "error" in decoder:
                log(decoder["error"])
    finally:
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(samples)
    report: JSON = {
        "version": 1,
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "quick": args.quick,
            "host": host_info(),
            "git": git_state(),
            "pinning": pinning.as_json(),
            "haproxy": haproxy_note,
            "haproxy_splice": args.haproxy_splice,
            "nofile": nofile,
            "cpu_time_source": "schedstat run time of the threads (ns) when none exited, "
            "else /proc/PID/stat utime+stime (front_cpu_s_ticks records the latter)",
        },
        "params": params.as_json(),
        "fronts": fronts,
        "skipped": skipped,
        "samples": samples,
        "summary": summary,
        "ratios": ratios(summary, decoder if decoder and "error" not in decoder else None),
        "references": references(summary),
        "decoder": decoder,
        "errors": [s for runs in samples.values() for s in runs if "error" in s],
        "incomplete": [
            {
                "front": s["front"],
                "repeat": s["repeat"],
                "phase": phase,
                "problem": s[phase]["problem"],
            }
            for runs in samples.values()
            for s in runs
            for phase in ("idle", "handshake", "bulk")
            if s.get(phase, {}).get("problem")
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    json_path = args.out / f"frontbench-{stamp}.json"
    png_path = args.out / f"frontbench-{stamp}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    problem = chart(report, png_path)
    print()
    print(f"JSON: {json_path}")
    print(f"PNG:  {png_path}" if problem is None else f"PNG:  none ({problem})")
    return 1 if report["errors"] or report["incomplete"] else 0


if __name__ == "__main__":
    sys.exit(main())
