"""Limits benchmark (issue 12): one busy source, a flood among steady clients, a connect burst.

Usage::

    python benchmarks/limitsbench.py [--seconds 10] [--scenarios capacity,flood,...]
                                     [--flood 4096] [--flood-route refused|relayed]
                                     [--nice-flood] [--no-pin] [--json FILE]

A real ``twistd -n echfront`` (default settings unless a scenario says
otherwise) relays ECH connections for ``secret.example.org`` to a small
backend that answers each ClientHelloInner with a ServerHello record and
closes.  Clients are bare epoll loops in their own processes, sending
pre-sealed ECH ClientHellos (each costs the front a full HPKE decryption)
from chosen loopback source addresses; a connection *succeeds* when the
backend's ServerHello comes back through the front, and fails on an alert,
a reset, a close without it, or no answer within 5 s.

Scenarios:

* ``capacity``: one source (127.0.0.1), a closed loop of 512 connections in
  flight: the front runs at its full ECH capacity (its CPU busy figure
  shows it).  Target: >= 99 % success.
* ``capacity-saturated``: the same with ``saturation_first_flights = 16``,
  so that the front is saturated by its own measure nearly all the time,
  and the single source must still not be shed.
* ``capacity-old``: the same against the old defaults (64 unfinished first
  flights per address, 200 HPKE decryptions per second per address, burst
  400), for comparison.
* ``flood``: 20 steady sources (127.0.0.2 to 127.0.0.21) each pacing 15 ECH
  handshakes a second, while one address (127.0.0.1) floods with 4096
  connections in flight (``--flood``; ``--nice-flood`` runs it at nice 19).
  By default its ClientHellos name a route to ``reject``: each costs the
  front a decryption and the backend nothing, so the backend (a Python
  loop sharing the load CPU) cannot become what limits the steady sources;
  the flood's served outcome is then ``alert 112`` (``--flood-route
  relayed``: relayed like the steady ones).  Target: the steady sources >=
  99 % success.  A flood with more in flight than the listen backlog keeps
  the kernel's accept queue full, and the SYNs of every client are then
  dropped before the front sees them: no policy in the front changes that.
* ``flood-off``: the same with shedding off (``saturation_first_flights =
  0``), the control.
* ``burst``: 4000 connects opened at once against the front with the
  default backlog, then with ``backlog=50``; the time until all completed.

With two or more CPUs the front runs on one and everything else on the
other.  On a two-CPU machine the load side can barely outrun one front
process, so whether the front saturates in ``flood`` depends on the run:
read the front's CPU busy figure and the shed counts with the success
rates.  Figures are printed (and written as JSON with ``--json``); this is
not a timed test.  Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO_ROOT))

from tests.frontproc import FrontProcess, free_port  # noqa: E402
from tests.processes import stop_process  # noqa: E402

JSON = dict[str, Any]
SECRET = "secret.example.org"
#: The inner name of the flood's ClientHellos: decrypted, then refused.
FLOOD_NAME = "flood.example.org"
#: A connection that has not succeeded after this long counts as failed.
CLIENT_TIMEOUT = 5.0
SCENARIOS = ("capacity", "capacity-saturated", "capacity-old", "flood", "flood-off", "burst")
OLD_DEFAULTS = {"max_first_flights_per_address": 64, "hpke_rate": 200, "hpke_burst": 400}
STEADY_SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 22))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- roles run in child processes -------------------------------------------------


def server_hello_record() -> bytes:
    from tests.twistedhelpers import server_hello  # noqa: PLC0415 (child process only)

    return server_hello()


def backend_role(port: int) -> None:
    """Answer every connection with a ServerHello record after its first read, then close.

    A bare epoll loop: the load side shares one CPU with this, and must
    stay far cheaper than the front it measures.
    """
    answer = server_hello_record()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    while True:
        for fd, _event in poller.poll(1.0):
            if fd == listener.fileno():
                for _ in range(256):
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conns[conn.fileno()] = conn
                    poller.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns.pop(fd)
            poller.unregister(fd)
            with contextlib.suppress(OSError):
                if conn.recv(65536):
                    conn.send(answer)
            conn.close()


#: Which set of sealed hellos each load group sends (set by load_role).
hello_of: dict[str, str] = {}


class Attempt:
    """One ECH handshake attempt in flight."""

    __slots__ = ("data", "group", "hellos", "sock", "started", "then")

    def __init__(self, group: str, sock: socket.socket, then: Any) -> None:
        self.group, self.sock, self.then = group, sock, then
        self.hellos = hello_of[group]
        self.started = time.monotonic()
        self.data = b""


def load_role(spec: JSON) -> JSON:
    """Run the groups of ``spec`` until its deadline; per-group outcomes and latencies.

    A bare epoll loop (see backend_role).  ``closed`` groups keep
    ``concurrency`` attempts in flight per source; ``paced`` groups start
    one attempt per source every ``1 / rate`` seconds.
    """
    hello_sets = {
        name: [bytes.fromhex(h) for h in sealed] for name, sealed in spec["hellos"].items()
    }
    answer = server_hello_record()
    port, seconds = spec["port"], spec["seconds"]
    if spec.get("nice"):
        # The flood takes the load CPU's spare time only: the steady clients
        # and the backend beside it must not be what limits them.
        os.nice(spec["nice"])
    poller = select.epoll()
    flying: dict[int, Attempt] = {}
    timers: list[tuple[float, int, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    hello_of.update({group["name"]: group.get("hellos", "relayed") for group in spec["groups"]})
    counter = [0]
    started = time.monotonic()
    deadline = started + seconds

    def record(attempt: Attempt, outcome: str) -> None:
        stats = results[attempt.group]
        stats["outcomes"][outcome] = stats["outcomes"].get(outcome, 0) + 1
        if outcome == "ok":
            stats["latencies"].append(time.monotonic() - attempt.started)

    def start(group: str, source: str, then: Any) -> None:
        counter[0] += 1
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            sock.connect_ex(("127.0.0.1", port))
        except OSError as error:
            sock.close()
            record(Attempt(group, sock, then), f"error {error.errno}")
            heapq.heappush(timers, (time.monotonic() + 0.01, counter[0], then))
            return
        attempt = Attempt(group, sock, then)
        attempt.data = b""
        flying[sock.fileno()] = attempt
        poller.register(sock.fileno(), select.EPOLLOUT)

    def finish(fd: int, outcome: str) -> None:
        attempt = flying.pop(fd)
        poller.unregister(fd)
        attempt.sock.close()
        record(attempt, outcome)
        if attempt.then is not None:
            attempt.then()

    def closed_loop(group: str, source: str) -> Any:
        def again() -> None:
            if time.monotonic() < deadline:
                start(group, source, again)

        return again

    def paced(group: str, source: str, rate: float, offset: float) -> None:
        step = 1.0 / rate
        slot = [started + offset * step]

        def tick() -> None:
            if slot[0] < deadline:
                start(group, source, None)
                slot[0] += step
                heapq.heappush(timers, (slot[0], id(tick), tick))

        heapq.heappush(timers, (slot[0], id(tick), tick))

    for group in spec["groups"]:
        results[group["name"]] = {"outcomes": {}, "latencies": []}
        for n, source in enumerate(group["sources"]):
            if group["kind"] == "closed":
                for _ in range(group["concurrency"]):
                    closed_loop(group["name"], source)()
            else:
                paced(group["name"], source, group["rate"], n / len(group["sources"]))
    sent: set[int] = set()
    while flying or (timers and timers[0][0] < deadline):
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            heapq.heappop(timers)[2]()
        timeout = 0.05 if not timers else max(0.0, min(0.05, timers[0][0] - now))
        for fd, event in poller.poll(timeout):
            attempt = flying.get(fd)
            if attempt is None:
                continue
            if fd not in sent:
                if event & (select.EPOLLERR | select.EPOLLHUP):
                    finish(fd, "connect error")
                    continue
                sent.add(fd)
                try:
                    hellos = hello_sets[attempt.hellos]
                    attempt.sock.send(hellos[counter[0] % len(hellos)])
                except OSError:
                    sent.discard(fd)
                    finish(fd, "reset")
                    continue
                poller.modify(fd, select.EPOLLIN)
                continue
            try:
                chunk = attempt.sock.recv(65536)
            except ConnectionResetError:
                chunk = None
            except BlockingIOError:
                continue
            if chunk:
                attempt.data += chunk
                if len(attempt.data) < len(answer) and answer.startswith(attempt.data):
                    continue
            sent.discard(fd)
            data = attempt.data
            if data == answer:
                finish(fd, "ok")
            elif data[:1] == b"\x15":
                finish(fd, f"alert {data[6] if len(data) > 6 else '?'}")
            elif chunk is None:
                finish(fd, "reset")
            else:
                finish(fd, "closed" if not data else "garbled")
        now = time.monotonic()
        for fd in [fd for fd, a in flying.items() if now - a.started > CLIENT_TIMEOUT]:
            sent.discard(fd)
            finish(fd, "timeout")
    wall = time.monotonic() - started
    summary = {}
    for name, stats in results.items():
        latencies = sorted(stats["latencies"])
        attempts = sum(stats["outcomes"].values())
        ok = stats["outcomes"].get("ok", 0)
        summary[name] = {
            "attempts": attempts,
            "ok": ok,
            "success": ok / attempts if attempts else 0.0,
            "ok_per_second": ok / wall,
            "outcomes": stats["outcomes"],
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        }
    return {"wall": wall, "groups": summary}


# -- the parent ----------------------------------------------------------------------


class Pinning:
    """The front on one CPU, everything else on another (when there are two)."""

    def __init__(self, enabled: bool) -> None:
        available = sorted(os.sched_getaffinity(0))
        self.all = frozenset(available)
        if enabled and len(available) >= 2:
            self.load: frozenset[int] | None = frozenset({available[0]})
            self.front: frozenset[int] | None = frozenset({available[1]})
            os.sched_setaffinity(0, self.load)  # children inherit it
            self.note = f"front on CPU {available[1]}, clients and backend on CPU {available[0]}"
        else:
            self.load = self.front = None
            self.note = "no pinning"

    @contextlib.contextmanager
    def for_front(self) -> Iterator[None]:
        if self.front is None or self.load is None:
            yield
            return
        os.sched_setaffinity(0, self.front)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.load)


def child(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )


def wait_port(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def limited(metrics_port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as page:
        text = page.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("echfront_limited_connections_total{"):
            name = line.split('limit="', 1)[1].split('"', 1)[0]
            counts[name] = float(line.rsplit(" ", 1)[1])
    return counts


class Bench:
    """What every scenario shares: a working directory, a key, sealed hellos, a backend."""

    def __init__(self, workdir: Path, pinning: Pinning, seconds: float) -> None:
        from echfront.ech.keyset import generate_key  # noqa: PLC0415 (slow import)
        from echfront.keys.keyfile import write_key_file  # noqa: PLC0415
        from tests.echhello import InnerSpec, seal_hello  # noqa: PLC0415

        self.workdir, self.pinning, self.seconds = workdir, pinning, seconds
        #: Run the flood at nice 19 (--nice-flood).
        self.nice_flood = False
        key = generate_key("public.example", maximum_name_length=32)
        self.key_file = workdir / "ech.pem"
        write_key_file(self.key_file, [key], overwrite=True)
        # "relayed": the secret name, relayed to the backend; "refused": a
        # name routed to reject, so that a flood costs the front its HPKE
        # decryptions and not the backend anything.
        self.hellos = {
            label: [
                seal_hello(
                    key.config, InnerSpec(server_name=name), outer_random=os.urandom(32)
                ).records.hex()
                for _ in range(64)
            ]
            for label, name in (("relayed", SECRET), ("refused", FLOOD_NAME))
        }
        self.backend_port = free_port()
        self.backend = child("--role", "backend", "--port", str(self.backend_port))
        wait_port(self.backend_port)

    def close(self) -> None:
        stop_process(self.backend, 10.0)

    @contextlib.contextmanager
    def front(self, name: str, limits: JSON, listen_extra: str = "") -> Iterator[tuple[Any, int]]:
        metrics_port = free_port()
        config = {
            "ech": {"keys": [{"file": str(self.key_file)}]},
            "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
            "backends": {"app": f"tcp:host=127.0.0.1:port={self.backend_port}"},
            "routes": [
                {"name": SECRET, "backend": "app"},
                {"name": FLOOD_NAME, "reject": "unrecognized_name"},
            ],
            "limits": limits,
        }
        process = FrontProcess(self.workdir / name, config)
        if listen_extra:
            assert process.config_text is not None
            process.config_text = process.config_text.replace(
                process.listen, process.listen + listen_extra
            )
        with self.pinning.for_front():
            process.start()
        try:
            yield process, metrics_port
        finally:
            process.stop()

    def load(self, port: int, groups: list[JSON]) -> subprocess.Popen[bytes]:
        spec = {"port": port, "seconds": self.seconds, "hellos": self.hellos, "groups": groups}
        if any(g["name"] == "flood" for g in groups) and self.nice_flood:
            spec["nice"] = 19
        path = self.workdir / f"load-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(spec))
        return child("--role", "load", "--spec", str(path))

    def run(self, name: str, limits: JSON, loads: list[list[JSON]]) -> JSON:
        log(f"{name}: {self.seconds:g} s ...")
        with self.front(name, limits) as (front, metrics_port):
            before = cpu_seconds(front.pid)
            started = time.monotonic()
            procs = [self.load(front.port, groups) for groups in loads]
            outputs = []
            for proc in procs:
                out, _ = proc.communicate(timeout=self.seconds + 60)
                outputs.append(json.loads(out))
            wall = time.monotonic() - started
            busy = (cpu_seconds(front.pid) - before) / wall
            counts = limited(metrics_port)
        groups = {k: v for output in outputs for k, v in output["groups"].items()}
        return {"limits": limits, "front_cpu_busy": busy, "limited": counts, "groups": groups}


def burst(bench: Bench, backlog: str, count: int = 4000) -> JSON:
    """Open ``count`` connects at once; seconds until all completed (capped at 30)."""
    with bench.front(f"burst{backlog or '-default'}", {}, backlog) as (front, _metrics):
        sockets, pending = [], {}
        poller = select.poll()
        started = time.monotonic()
        try:
            for _ in range(count):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", front.port))
                sockets.append(sock)
                pending[sock.fileno()] = sock
                poller.register(sock.fileno(), select.POLLOUT)
            within_1s = 0
            while pending and time.monotonic() - started < 30:
                for fd, _event in poller.poll(100):
                    poller.unregister(fd)
                    pending.pop(fd)
                if time.monotonic() - started <= 1.0:
                    within_1s = count - len(pending)
            took = time.monotonic() - started
        finally:
            for sock in sockets:
                sock.close()
    return {"connects": count, "all_done_s": took, "done_within_1s": within_1s}


def group(name: str, kind: str, sources: list[str], **options: float | str) -> JSON:
    """A load group: ``closed`` (``concurrency`` in flight) or ``paced`` (``rate`` per second)."""
    return {"name": name, "kind": kind, "sources": sources, **options}


def percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def report(results: JSON) -> None:
    print(f"\nlimits benchmark ({results['pinning']}, {results['seconds']:g} s per scenario)\n")
    for name in SCENARIOS:
        result = results["scenarios"].get(name)
        if result is None:
            continue
        if name == "burst":
            for label, figures in result.items():
                print(
                    f"burst, {label}: {figures['connects']} connects, all completed after "
                    f"{figures['all_done_s']:.2f} s, {figures['done_within_1s']} within 1 s"
                )
            continue
        print(f"{name}: front CPU busy {percent(result['front_cpu_busy'])}")
        shed = {k: v for k, v in result["limited"].items() if v}
        print(f"  refused or closed by limits: {shed or 'none'}")
        for group, figures in result["groups"].items():
            failures = {k: v for k, v in figures["outcomes"].items() if k != "ok"}
            print(
                f"  {group}: {figures['ok']}/{figures['attempts']} ok = "
                f"{percent(figures['success'])}, {figures['ok_per_second']:.0f} ok/s, "
                f"p50 {figures['p50_ms'] or 0:.1f} ms, p99 {figures['p99_ms'] or 0:.1f} ms"
                + (f", failures {failures}" if failures else "")
            )
    print()
    checks = results["checks"]
    for label, (value, passed) in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {label}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--flood", type=int, default=4096, help="connections the flood keeps in flight"
    )
    parser.add_argument(
        "--flood-route",
        choices=("relayed", "refused"),
        default="refused",
        help="the flood's hellos are refused after decryption, or relayed to the backend",
    )
    parser.add_argument(
        "--nice-flood", action="store_true", help="run the flood at nice 19 on the load CPU"
    )
    parser.add_argument(
        "--steady-rate", type=float, default=15, help="ECH handshakes per second per steady source"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--role", choices=("backend", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "backend":
        backend_role(args.port)
        return 0
    if args.role == "load":
        print(json.dumps(load_role(json.loads(args.spec.read_text()))))
        return 0
    chosen = [s for s in args.scenarios.split(",") if s]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    pinning = Pinning(not args.no_pin)
    results: JSON = {"pinning": pinning.note, "seconds": args.seconds, "scenarios": {}}
    single = [group("single source", "closed", ["127.0.0.1"], concurrency=512)]
    steady = [group("20 steady sources", "paced", list(STEADY_SOURCES), rate=args.steady_rate)]
    flood = [
        group("flood", "closed", ["127.0.0.1"], concurrency=args.flood, hellos=args.flood_route)
    ]
    with tempfile.TemporaryDirectory(prefix="limitsbench-") as directory:
        bench = Bench(Path(directory), pinning, args.seconds)
        bench.nice_flood = args.nice_flood
        try:
            runs = {
                "capacity": ({}, [single]),
                "capacity-saturated": ({"saturation_first_flights": 16}, [single]),
                "capacity-old": (OLD_DEFAULTS, [single]),
                "flood": ({}, [steady, flood]),
                "flood-off": ({"saturation_first_flights": 0}, [steady, flood]),
            }
            for name in chosen:
                if name == "burst":
                    results["scenarios"]["burst"] = {
                        "default backlog": burst(bench, ""),
                        "backlog=50": burst(bench, ":backlog=50"),
                    }
                else:
                    limits, loads = runs[name]
                    results["scenarios"][name] = bench.run(name, limits, loads)
        finally:
            bench.close()
    scenarios = results["scenarios"]
    checks = {}
    if "capacity" in scenarios:
        value = scenarios["capacity"]["groups"]["single source"]["success"]
        checks["single source at full ECH capacity >= 99 %"] = (percent(value), value >= 0.99)
    if "flood" in scenarios:
        value = scenarios["flood"]["groups"]["20 steady sources"]["success"]
        checks["20 steady sources during a flood >= 99 %"] = (percent(value), value >= 0.99)
    results["checks"] = {k: [v, ok] for k, (v, ok) in checks.items()}
    report({**results, "checks": checks})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(ok for _v, ok in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
