"""``--workers`` scaling in CPU time, under a load cheap enough to leave the front the CPUs.

Usage::

    python benchmarks/scalebench.py [--handshakes 6000] [--concurrency 32] [--rate 0]
                                    [--repeats 3] [--fronts split,workers2,bare,haproxy]
                                    [--json FILE]

frontbench.py's load is real: a Go ECH client and a Go TLS backend, which
together spend about 2.5 times the front's CPU on every handshake.  On a
machine with two vCPUs that leaves no core for a second worker, and its
``workers2`` figure measures the sharing of CPUs as much as the front.  This
benchmark keeps the front's work the same and makes the load cheap:

* the client (``echtest replay-client``, tests/go/replay.go) sends real
  ClientHelloOuter flights, captured from ``echtest client`` with ECH
  against frontbench's ECH configuration, so the front decrypts every one
  (HPKE, the same decoder work as a live client's);
* the backend (``echtest replay-backend``) reads the ClientHelloInner the
  front forwards and answers with canned records that start with a
  ServerHello (not a HelloRetryRequest); the two then exchange the records
  a TLS 1.3 handshake and a short request would (sizes as frontbench's
  Go peers send), and both close.

So the front accepts, decodes, routes, connects, watches for the
HelloRetryRequest, relays both ways and half-closes as for a live client,
while the load costs a few socket calls per connection.

The fronts are frontbench's: ``split`` (one process), ``workers2``
(``--workers 2``), ``bare`` (benchmarks/barefront.py, the floor prototype)
and ``haproxy`` (routing by clear SNI, so it is replayed plain ClientHellos
captured from the same client without ECH; it decrypts nothing).

``--rate R`` starts R connections a second whatever the front's speed (an
open loop, every front offered the same load, as a real front is); the
default is a closed loop of ``--concurrency`` connections, as fast as the
front and the load go.  Per-handshake CPU falls as the rate rises (more
events per reactor turn), haproxy's more than echfront's, so compare
fronts at one rate.

Method, per front and repeat: a fresh backend and front (frontbench's
configuration, the buffered text log), a warm-up of ``--warmup``
connections, then ``--handshakes`` connections at ``--concurrency``; the
front's CPU time per process (schedstat, as frontbench), the load's CPU
time, the wall time.  Every connection must be ECH-accepted by the front
(counted from its connection log) or the figures are withheld.  Pinning
as frontbench: ``split`` on one CPU, the load on the other, ``workers2``
unpinned.

It prints, per front, CPU per handshake and *capacity* (handshakes per
CPU-second of the busiest front process), and the ratio of ``workers2``'s
capacity to ``split``'s, the figure issue 11 asks to be at least 1.7 with a
core per worker; and the throughput ratio at the same concurrency, which on
two vCPUs is bounded by the load's share of the CPUs.

Every wait is bounded; only processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO_ROOT))

from frontbench import SECRET, HaproxyProcess, ensure_haproxy, haproxy_config  # noqa: E402
from frontbench_proc import (  # noqa: E402
    Pinning,
    cpu_seconds,
    fd_count,
    read_cpu,
    start_time,
    stop_pid,
    wait_fds,
)
from instrbench import front_command, wait_started  # noqa: E402

from tests.echhello import capture_first_flight  # noqa: E402
from tests.frontproc import Pki, free_port, make_pki  # noqa: E402
from tests.gotools import ClientOptions, GoBackend, client_args, go_binary, parse_json_lines  # noqa: E402
from tests.processes import stop_process  # noqa: E402

FRONTS = ("split", "workers2", "bare", "haproxy")
ECHFRONT_FRONTS = frozenset(("split", "workers2"))
START_TIMEOUT = 60.0
#: The ratios printed: label, numerator front, denominator front, sample key
#: (each a ratio of medians, then per repeat).
RATIOS = (
    ("workers2 capacity / split's (target >= 1.7)", "workers2", "split", "capacity_per_s"),
    ("workers2 handshakes/s / split's", "workers2", "split", "handshakes_per_s"),
    ("split CPU per handshake / haproxy's", "split", "haproxy", "front_ms_per_handshake"),
    ("bare CPU per handshake / haproxy's", "bare", "haproxy", "front_ms_per_handshake"),
    ("split CPU per handshake / bare's", "split", "bare", "front_ms_per_handshake"),
)
#: Bound on the front's connection log catching up after a run.
LOG_TIMEOUT = 10.0

JSON = dict[str, Any]


# -- the load ---------------------------------------------------------------------


def record(content_type: int, body: bytes) -> bytes:
    """One TLS record (RFC 8446 §5.1) with legacy_record_version 0x0303."""
    return bytes((content_type, 3, 3)) + len(body).to_bytes(2, "big") + body


def server_hello(session_id: bytes) -> bytes:
    """A TLS 1.3 ServerHello message (RFC 8446 §4.1.3): a fresh random, X25519 share."""
    extensions = b"\x00\x2b\x00\x02\x03\x04"  # supported_versions: TLS 1.3
    extensions += b"\x00\x33\x00\x24\x00\x1d\x00\x20" + secrets.token_bytes(32)  # key_share
    body = b"\x03\x03" + secrets.token_bytes(32)  # legacy_version, random
    body += bytes((len(session_id),)) + session_id + b"\x13\x01\x00"  # suite, compression
    body += len(extensions).to_bytes(2, "big") + extensions
    return b"\x02" + len(body).to_bytes(3, "big") + body


def opaque(size: int) -> bytes:
    """An application_data record of ``size`` bytes in all (ciphertext to a front)."""
    return record(23, secrets.token_bytes(size - 5))


def script() -> JSON:
    """The exchange after the ClientHello, sized as frontbench's Go peers' (tests/go/replay.go).

    The backend's first answer is ServerHello, ChangeCipherSpec and the
    encrypted rest of its flight (2,184 bytes); the client's Finished (64),
    the backend's tickets (189), one request and one answer (24 each).
    """
    first = record(22, server_hello(secrets.token_bytes(32))) + record(20, b"\x01")
    first += opaque(2184 - len(first))
    answers = [first, opaque(189), opaque(24)]
    client = [record(20, b"\x01") + opaque(58), opaque(24)]
    return {"answers": [a.hex() for a in answers], "client": [c.hex() for c in client]}


def capture_flights(pki: Pki, count: int, *, ech: bool) -> list[bytes]:
    """``count`` first flights of ``echtest client`` for the secret name (each its own keys).

    With ``ech`` they are ClientHelloOuters; without, plain ClientHellos
    that name the secret name in the clear, for haproxy (which routes by
    the SNI it reads), as frontbench's client sends it.
    """
    options: ClientOptions = {"name": SECRET, "ca": pki.ca, "raw_capture": True}
    if ech:
        options["ech"] = pki.ech_config_list

    def connect(port: int) -> None:
        args = client_args(f"127.0.0.1:{port}", **options)
        subprocess.run(args, capture_output=True, timeout=30, check=False)

    return [capture_first_flight(connect) for _ in range(count)]


class ReplayBackend(GoBackend):
    """``echtest replay-backend`` (a canned TLS peer) as a context manager."""

    def __init__(self, script_path: Path, ident: str) -> None:
        super().__init__([], ident=ident)
        self.args = ["replay-backend", "-listen", "127.0.0.1:0", "-script", str(script_path)]


def replay(
    work: Path, flights: str, port: int, count: int, concurrency: int, *, rate: float = 0.0
) -> tuple[JSON, float]:
    """Run ``echtest replay-client`` with ``work/FLIGHTS.json``; its summary and CPU seconds.

    ``rate``: connections started per second (0: a closed loop of ``concurrency``).
    """
    args = [str(go_binary()), "replay-client", "-addr", f"127.0.0.1:{port}"]
    args += ["-flights", str(work / f"{flights}.json"), "-script", str(work / "script.json")]
    args += ["-count", str(count), "-concurrency", str(concurrency), "-timeout", "30s"]
    args += ["-rate", str(rate)]
    before = os.times()
    bound = 60 + count * 0.05 + (count / rate if rate else 0.0)
    result = subprocess.run(args, capture_output=True, text=True, timeout=bound, check=False)
    after = os.times()
    summaries = [line for line in parse_json_lines(result.stdout) if line.get("summary")]
    if result.returncode != 0 or not summaries:
        raise RuntimeError(f"replay-client failed: {result.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return summaries[-1], cpu


# -- the fronts ---------------------------------------------------------------------


@contextmanager
def started(
    front: str, pki: Pki, work: Path, backend_port: int, params: argparse.Namespace
) -> Iterator[tuple[int, list[int]]]:
    """Start ``front`` (frontbench's configuration); yield its port and front processes."""
    pinning: Pinning = params.pinning
    port = free_port()
    if front == "haproxy":
        config = haproxy_config(port, backend_port, 2000, splice=False)
        with ExitStack() as stack:
            with pinning.spawning(pinning.front):
                haproxy = stack.enter_context(
                    HaproxyProcess(params.haproxy, work / "haproxy", config, port)
                )
            assert haproxy.proc is not None
            yield port, [haproxy.proc.pid]
        return
    command = front_command(front, pki, work, port, backend_port)
    log = (work / f"{front}.log").open("wb")
    with pinning.spawning(None if front == "workers2" else pinning.front):
        proc = subprocess.Popen(
            command, cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    workers: dict[int, int] = {}
    try:
        count = 2 if front == "workers2" else 1
        pids = wait_started(front, proc, work, port, count=count, timeout=START_TIMEOUT)
        if front == "workers2":
            workers = {pid: start_time(pid) for pid in pids}
        yield port, pids
    finally:
        stop_process(proc, timeout=30)
        for pid, started_at in workers.items():
            stop_pid(pid, started_at)  # should the supervisor have been killed
        log.close()


def accepted_lines(log: Path) -> int:
    """Connection log lines of ECH-accepted, relayed connections without an alert."""
    text = log.read_text(errors="replace")
    return sum(
        1
        for line in text.splitlines()
        if " route=b1 " in line and " ech=accepted " in line and " alert=None " in line
    )


def wait_accepted(log: Path, want: int) -> int:
    """Wait (bounded) until the log holds ``want`` such lines (it is written in batches)."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        seen = accepted_lines(log)
        if seen >= want or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def measure(front: str, repeat: int, pki: Pki, work: Path, params: argparse.Namespace) -> JSON:
    """One front, one repeat: warm up, then the measured run."""
    with ExitStack() as stack:
        backend = stack.enter_context(ReplayBackend(work / "script.json", f"{front}{repeat}"))
        port, pids = stack.enter_context(started(front, pki, work, backend.port, params))
        # Only echfront's connection log says ECH was accepted; haproxy does
        # not decrypt, and bare (benchmarks/barefront.py) logs nothing, but
        # routes only what it decrypted to the backend.
        log = work / f"{front}.log" if front in ECHFRONT_FRONTS else None
        flights = "plain" if front == "haproxy" else "ech"
        warm, _ = replay(work, flights, port, params.warmup, params.concurrency)
        if warm["ok"] != params.warmup:
            raise RuntimeError(f"{front}: warm-up failed: {warm}")
        assert backend.pid is not None
        watched = [*pids, backend.pid]
        baseline = {pid: fd_count(pid) for pid in watched}
        accepted_before = 0 if log is None else wait_accepted(log, params.warmup)
        cpu_before = {pid: read_cpu(pid) for pid in watched}
        summary, client_cpu = replay(
            work, flights, port, params.handshakes, params.concurrency, rate=params.rate
        )
        wait_fds(watched, baseline)
        cpu_after = {pid: read_cpu(pid) for pid in watched}
        ok = int(summary["ok"])
        accepted = ok if log is None else wait_accepted(log, accepted_before + ok) - accepted_before
        if ok != params.handshakes or accepted != ok:
            raise RuntimeError(
                f"{front}: {ok} of {params.handshakes} connections completed and "
                f"{accepted} were ECH-accepted by the front: {summary}"
            )
        by_process = [cpu_seconds(cpu_before[p], cpu_after[p]) for p in pids]
        load = client_cpu + cpu_seconds(cpu_before[backend.pid], cpu_after[backend.pid])
        return {
            "front": front,
            "repeat": repeat,
            "handshakes": ok,
            "wall_s": summary["wall_s"],
            "handshakes_per_s": ok / summary["wall_s"],
            "p50_ms": summary.get("p50_ms"),
            "front_cpu_s_by_process": by_process,
            "front_ms_per_handshake": sum(by_process) / ok * 1000,
            "capacity_per_s": ok / max(by_process),
            "load_ms_per_handshake": load / ok * 1000,
        }


# -- report ------------------------------------------------------------------------------


def median_of(samples: Sequence[JSON], key: str) -> float:
    """The median of ``key`` over ``samples``."""
    return statistics.median(float(s[key]) for s in samples)


def report(samples: dict[str, list[JSON]]) -> list[str]:
    lines = [
        f"{'front':9} {'front ms/hs':>12} {'capacity hs/CPU-s':>18} {'hs/s':>7} "
        f"{'load ms/hs':>11}  per-process CPU share"
    ]
    for front, runs in samples.items():
        shares = []
        for run in runs:
            cpus = run["front_cpu_s_by_process"]
            shares.append("/".join(f"{c / sum(cpus):.2f}" for c in cpus))
        lines.append(
            f"{front:9} {median_of(runs, 'front_ms_per_handshake'):12.3f} "
            f"{median_of(runs, 'capacity_per_s'):18.0f} {median_of(runs, 'handshakes_per_s'):7.0f} "
            f"{median_of(runs, 'load_ms_per_handshake'):11.3f}  {', '.join(shares)}"
        )
    for label, numerator, denominator, key in RATIOS:
        if numerator in samples and denominator in samples:
            top, bottom = samples[numerator], samples[denominator]
            per_repeat = [t[key] / b[key] for t, b in zip(top, bottom, strict=False)]
            lines.append(
                f"{label}: {median_of(top, key) / median_of(bottom, key):.2f} "
                f"(per repeat {', '.join(f'{r:.2f}' for r in per_repeat)})"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--fronts", default=",".join(FRONTS), help="comma-separated subset")
    parser.add_argument("--handshakes", type=int, default=6000, help="measured connections")
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured connections first")
    parser.add_argument("--concurrency", type=int, default=32, help="connections in flight")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="connections started per second (default: as fast as --concurrency allows)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every front")
    parser.add_argument("--flights", type=int, default=16, help="distinct ClientHellos replayed")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args(argv)
    fronts = [f.strip() for f in args.fronts.split(",") if f.strip()]
    if not fronts or set(fronts) - set(FRONTS):
        parser.error(f"--fronts: choose from {FRONTS}")
    if min(args.handshakes, args.warmup, args.concurrency, args.repeats, args.flights) < 1:
        parser.error("every size must be at least 1")
    if args.rate < 0:
        parser.error("--rate must not be negative")
    args.haproxy = None
    if "haproxy" in fronts:
        args.haproxy, note = ensure_haproxy()
        if args.haproxy is None:
            print(note, flush=True)
            fronts.remove("haproxy")
    args.pinning = Pinning.choose(not args.no_pin)
    print(f"pinning: {args.pinning.note}", flush=True)
    samples: dict[str, list[JSON]] = {front: [] for front in fronts}
    with tempfile.TemporaryDirectory(prefix="scalebench-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        kinds = [("ech", True)] if fronts != ["haproxy"] else []
        kinds += [("plain", False)] if "haproxy" in fronts else []
        for name, ech in kinds:
            flights = capture_flights(pki, args.flights, ech=ech)
            (work / f"{name}.json").write_text(json.dumps([f.hex() for f in flights]))
        (work / "script.json").write_text(json.dumps(script()))
        for repeat in range(args.repeats):
            for front in fronts:
                sample = measure(front, repeat, pki, work, args)
                samples[front].append(sample)
                print(
                    f"repeat {repeat + 1}/{args.repeats} {front}: "
                    f"{sample['front_ms_per_handshake']:.3f} ms/hs, "
                    f"{sample['handshakes_per_s']:.0f} hs/s",
                    flush=True,
                )
    print("\n".join(report(samples)))
    if args.json is not None:
        args.json.write_text(json.dumps(samples, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
