"""Summary, targets, tables and chart for benchmarks/frontbench.py.

Turns the raw samples (one per front and repeat) into min/median/max per
metric, the target ratios (issue 6's, with issue 11's bounds), the
reference ratios (every front against haproxy, and each engine against the
other, medians of one run), the human-readable tables and the PNG chart
(matplotlib, Agg backend; skipped with a message when matplotlib is not
installed).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DECODER_KEY",
    "METRICS",
    "TARGETS",
    "chart",
    "ratios",
    "references",
    "render",
    "summarize",
]

JSON = dict[str, Any]

#: The targets of issue 6, with the bounds of issue 11: (unit, comparison, bound).
TARGETS: dict[str, tuple[str, str, float]] = {
    "split_cpu_per_handshake_vs_haproxy": ("ratio", "<=", 2.5),
    "bulk_cpu_per_gb_vs_haproxy": ("ratio", "<=", 0.5),
    "split_rss_kib_per_idle_conn": ("KiB", "<=", 8.0),
    "workers2_capacity_vs_one_worker": ("ratio", ">=", 1.7),
    "decoder_vs_x25519": ("ratio", "<=", 2.5),
}

#: Reference ratios (numerator front, denominator front) of front CPU per
#: handshake, reported when both ran: every front against haproxy, the lean
#: engine against Twisted's transports, and split mode against its floor
#: (``bare``, benchmarks/barefront.py) and a compiled front (``go-split``).
REFERENCES: tuple[tuple[str, str], ...] = (
    ("split", "haproxy"),
    ("split-twisted", "haproxy"),
    ("local", "haproxy"),
    ("local-twisted", "haproxy"),
    ("twisted", "haproxy"),
    ("twisted-quiet", "haproxy"),
    ("bare", "haproxy"),
    ("go-split", "haproxy"),
    ("split", "split-twisted"),
    ("local", "local-twisted"),
    ("split", "bare"),
    ("split", "go-split"),
)
#: The bench_decoder.py figure the decoder target is about.
DECODER_KEY = "full: reassemble + decode, X25519"


#: (summary key, phase, sample key).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("handshakes_per_s", "handshake", "handshakes_per_s"),
    ("p50_ms", "handshake", "p50_ms"),
    ("p99_ms", "handshake", "p99_ms"),
    ("front_cpu_s_per_1k", "handshake", "front_cpu_s_per_1k"),
    ("backend_cpu_s_per_1k", "handshake", "backend_cpu_s_per_1k"),
    ("client_cpu_s_per_1k", "handshake", "client_cpu_s_per_1k"),
    ("capacity_per_s", "handshake", "capacity_per_s"),
    ("bulk_mb_per_s", "bulk", "mb_per_s"),
    ("front_cpu_s_per_gb", "bulk", "front_cpu_s_per_gb"),
    ("backend_cpu_s_per_gb", "bulk", "backend_cpu_s_per_gb"),
    ("front_rss_kib_per_conn", "idle", "front_rss_kib_per_conn"),
    ("backend_rss_kib_per_conn", "idle", "backend_rss_kib_per_conn"),
    ("front_fds_per_conn", "idle", "front_fds_per_conn"),
    ("system_slab_kib_per_conn", "idle", "system_slab_kib_per_conn"),
)


def metric_values(samples: Sequence[JSON], phase: str, key: str) -> list[float | None]:
    """One value per repeat (None where the repeat has none or its phase is incomplete)."""
    out: list[float | None] = []
    for sample in samples:
        result = sample.get(phase) or {}
        value = None if result.get("problem") else result.get(key)
        out.append(float(value) if isinstance(value, int | float) else None)
    return out


def stats(values: Sequence[float | None]) -> JSON:
    """min/median/max of the values present."""
    present = [v for v in values if v is not None]
    if not present:
        return {"min": None, "median": None, "max": None, "n": 0, "values": list(values)}
    return {
        "min": min(present),
        "median": statistics.median(present),
        "max": max(present),
        "n": len(present),
        "values": list(values),
    }


def summarize(samples: dict[str, list[JSON]]) -> dict[str, JSON]:
    return {
        front: {name: stats(metric_values(runs, phase, key)) for name, phase, key in METRICS}
        for front, runs in samples.items()
    }


def _median(summary: dict[str, JSON], front: str, metric: str) -> float | None:
    value = summary.get(front, {}).get(metric, {}).get("median")
    return float(value) if value is not None else None


def _ratio_entry(
    name: str,
    summary: dict[str, JSON],
    num: tuple[str, str],
    den: tuple[str, str] | None,
    description: str,
) -> JSON:
    num_values = summary.get(num[0], {}).get(num[1], {}).get("values", [])
    if den is None:
        value = _median(summary, *num)
        per_repeat = list(num_values)
    else:
        top, bottom = _median(summary, *num), _median(summary, *den)
        value = top / bottom if top is not None and bottom else None
        den_values = summary.get(den[0], {}).get(den[1], {}).get("values", [])
        per_repeat = [
            a / b if a is not None and b else None
            for a, b in zip(num_values, den_values, strict=False)
        ]
    return target_entry(name, value, description, per_repeat)


def target_entry(
    name: str, value: float | None, description: str, per_repeat: Sequence[float | None] = ()
) -> JSON:
    unit, compare, bound = TARGETS[name]
    met = None
    if value is not None:
        met = value <= bound if compare == "<=" else value >= bound
    return {
        "value": value,
        "unit": unit,
        "compare": compare,
        "target": bound,
        "met": met,
        "per_repeat": list(per_repeat),
        "definition": description,
    }


def ratios(summary: dict[str, JSON], decoder: JSON | None) -> dict[str, JSON]:
    """The issue-6 targets, from the medians (and per repeat, pairing repeats)."""
    out = {
        "split_cpu_per_handshake_vs_haproxy": _ratio_entry(
            "split_cpu_per_handshake_vs_haproxy",
            summary,
            ("split", "front_cpu_s_per_1k"),
            ("haproxy", "front_cpu_s_per_1k"),
            "median split front CPU per handshake / median haproxy CPU per handshake",
        ),
        "bulk_cpu_per_gb_vs_haproxy": _ratio_entry(
            "bulk_cpu_per_gb_vs_haproxy",
            summary,
            ("split", "front_cpu_s_per_gb"),
            ("haproxy", "front_cpu_s_per_gb"),
            "median split front CPU per GB echoed / median haproxy CPU per GB",
        ),
        "split_rss_kib_per_idle_conn": _ratio_entry(
            "split_rss_kib_per_idle_conn",
            summary,
            ("split", "front_rss_kib_per_conn"),
            None,
            "median (VmRSS with the idle connections open - VmRSS before) / connections",
        ),
        "workers2_capacity_vs_one_worker": _ratio_entry(
            "workers2_capacity_vs_one_worker",
            summary,
            ("workers2", "capacity_per_s"),
            ("split", "capacity_per_s"),
            "median workers2 handshakes / max(per-worker CPU s) over median split "
            "handshakes / CPU s",
        ),
    }
    value = None
    if decoder is not None:
        value = (decoder.get("ratio_to_x25519") or {}).get(DECODER_KEY)
    out["decoder_vs_x25519"] = target_entry(
        "decoder_vs_x25519",
        value,
        f"benchmarks/bench_decoder.py: '{DECODER_KEY}' / one X25519 exchange "
        "(median of per-round ratios)",
    )
    return out


def references(summary: dict[str, JSON]) -> dict[str, JSON]:
    """CPU per handshake of each :data:`REFERENCES` pair: median over median, and per repeat."""
    out: dict[str, JSON] = {}
    key = "front_cpu_s_per_1k"
    for top, bottom in REFERENCES:
        a, b = _median(summary, top, key), _median(summary, bottom, key)
        if a is None or not b:
            continue
        tops = summary[top][key].get("values", [])
        bottoms = summary[bottom][key].get("values", [])
        out[f"{top}/{bottom}"] = {
            "value": a / b,
            "per_repeat": [
                x / y if x is not None and y else None for x, y in zip(tops, bottoms, strict=False)
            ],
        }
    return out


# -- output ------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    """Three significant digits or so."""
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cell(entry: JSON) -> str:
    """``median (min-max)``, with ``[n=K]`` when repeats are missing."""
    n = entry.get("n", 0)
    if not n:
        return "-"
    missing = f" [n={n}]" if n < len(entry["values"]) else ""
    if n == 1:
        return fmt(entry["median"]) + missing
    return f"{fmt(entry['median'])} ({fmt(entry['min'])}-{fmt(entry['max'])}){missing}"


TABLES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Handshakes",
        (
            ("handshakes_per_s", "hs/s"),
            ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"),
            ("front_cpu_s_per_1k", "front CPU s/1k"),
            ("capacity_per_s", "capacity hs/CPU-s"),
            ("backend_cpu_s_per_1k", "backend CPU s/1k"),
            ("client_cpu_s_per_1k", "client CPU s/1k"),
        ),
    ),
    (
        "Bulk echo",
        (
            ("bulk_mb_per_s", "MB/s"),
            ("front_cpu_s_per_gb", "front CPU s/GB"),
            ("backend_cpu_s_per_gb", "backend CPU s/GB"),
        ),
    ),
    (
        "Idle connections",
        (
            ("front_rss_kib_per_conn", "front KiB/conn"),
            ("front_fds_per_conn", "front fds/conn"),
            ("backend_rss_kib_per_conn", "backend KiB/conn"),
            ("system_slab_kib_per_conn", "kernel slab KiB/conn"),
        ),
    ),
)


def render(report: JSON) -> str:
    """The human-readable tables."""
    params = report["params"]
    meta = report["meta"]
    out = [
        f"frontbench: {params['handshakes']} handshakes at concurrency {params['concurrency']}; "
        f"bulk {params['bulk_bytes'] / 2**20:.0f} MiB echoed over {params['bulk_conns']} "
        f"connection(s); {params['idle_conns']} idle connections; "
        f"{params['repeats']} repeat(s), cells: median (min-max)",
        f"pinning: {meta['pinning']['note']}",
        f"haproxy: {meta['haproxy']}",
    ]
    summary: dict[str, JSON] = report["summary"]
    fronts = list(summary)
    for title, columns in TABLES:
        rows = [[front, *(cell(summary[front][key]) for key, _ in columns)] for front in fronts]
        header = [title, *(label for _, label in columns)]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        out.append("")
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        out.extend("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    out.append("")
    out.append("direct has no front: its front columns are empty, its backend columns are the")
    out.append("cost of the Go backend alone.  CPU per GB is per 10^9 bytes echoed.  Kernel")
    out.append("slab is system-wide (the sockets and pipes of client, front and backend).")
    out.append("")
    out.append("Targets (issue 6) with issue 11's bounds:")
    for name, entry in report["ratios"].items():
        status = {True: "met", False: "NOT met", None: "not measured"}[entry["met"]]
        repeats = ", ".join(fmt(v) for v in entry["per_repeat"])
        extra = f"  per repeat: {repeats}" if repeats else ""
        out.append(
            f"  {name:34} {fmt(entry['value']):>7} {entry['unit']:5} "
            f"(target {entry['compare']} {entry['target']}) {status}{extra}"
        )
    refs = report.get("references") or references(report["summary"])
    if refs:
        out.append("Front CPU per handshake, ratio of medians (per repeat):")
        for name, entry in refs.items():
            repeats = ", ".join(fmt(v) for v in entry["per_repeat"])
            out.append(f"  {name:28} {fmt(entry['value']):>7}  ({repeats})")
    for front, reason in report["skipped"].items():
        out.append(f"skipped {front}: {reason}")
    for sample in report["errors"]:
        out.append(
            f"error: {sample['front']} repeat {sample['repeat'] + 1}: {sample['error'][:300]}"
        )
    for item in report["incomplete"]:
        out.append(
            f"incomplete (left out of the summary): {item['front']} repeat "
            f"{item['repeat'] + 1} {item['phase']}: {item['problem']}"
        )
    return "\n".join(out)


def chart(report: JSON, path: Path) -> str | None:
    """A PNG comparing the fronts (median bars, min/max whiskers); None if no matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    summary: dict[str, JSON] = report["summary"]
    panels = (
        ("front_cpu_s_per_1k", "front CPU s per 1,000 handshakes", "haproxy", 2.5, "2.5x haproxy"),
        ("front_cpu_s_per_gb", "front CPU s per GB echoed", "haproxy", 0.5, "0.5x haproxy"),
        ("front_rss_kib_per_conn", "front KiB per idle connection", None, 8.0, "8 KiB"),
        ("capacity_per_s", "CPU-bound capacity, handshakes/s", "split", 1.7, "1.7x one worker"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {
        "split": "C0",
        "split-twisted": "C9",
        "local": "C1",
        "local-twisted": "C8",
        "haproxy": "C2",
        "workers2": "C3",
        "workers2-onecpu": "C7",
        "twisted": "C4",
        "twisted-quiet": "C6",
        "bare": "C5",
        "go-split": "tab:olive",
    }
    for ax, (key, title, reference, factor, label) in zip(axes.flat, panels, strict=True):
        fronts = [f for f in summary if summary[f][key]["n"]]
        medians = [summary[f][key]["median"] for f in fronts]
        low = [m - summary[f][key]["min"] for f, m in zip(fronts, medians, strict=True)]
        high = [summary[f][key]["max"] - m for f, m in zip(fronts, medians, strict=True)]
        ax.bar(
            fronts,
            medians,
            yerr=[low, high],
            capsize=5,
            color=[colors.get(f, "C7") for f in fronts],
        )
        for x, value in enumerate(medians):
            ax.annotate(
                fmt(value),
                (x, value),
                ha="left",
                va="bottom",
                fontsize=8,
                xytext=(9, 1),
                textcoords="offset points",
            )
        ref = _median(summary, reference, key) if reference else 1.0
        if ref is not None and (reference is None or reference in fronts):
            ax.axhline(
                ref * factor, color="k", linestyle="--", linewidth=1, label=f"target: {label}"
            )
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    params = report["params"]
    fig.suptitle(
        f"echfront vs haproxy ({report['meta']['haproxy'].split(' - ')[0]}): "
        f"{params['handshakes']} handshakes @ {params['concurrency']}, "
        f"{params['bulk_bytes'] >> 20} MiB, {params['idle_conns']} idle; "
        f"median of {params['repeats']}, whiskers min/max",
        fontsize=10,
    )
    fig.text(0.01, 0.005, report["meta"]["pinning"]["note"], fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
