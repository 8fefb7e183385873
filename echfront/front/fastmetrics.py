# -*- test-case-name: tests.test_metrics -*-
"""Metrics that cost a few attribute operations per event, read at scrape time.

prometheus_client's metric objects take a lock, validate and (with
``.labels()``) build a key on every call; per connection that came to tens
of microseconds.  The classes here keep the same constructor and the same
calls (``labels(...)``, ``inc``, ``dec``, ``set``, ``observe``) but count
into plain numbers and bucket arrays.  Each metric is a prometheus_client
*custom collector*: registered in a ``CollectorRegistry``, it turns its
numbers into metric families only when the registry is collected (a
scrape).  Names, types, labels, bucket bounds and the samples produced
(``_total``, ``_created``, ``_bucket``/``_count``/``_sum``) are exactly
those of the prometheus_client class of the same name.

With ``--workers`` (prometheus_client's multiprocess mode, the
``PROMETHEUS_MULTIPROC_DIR`` environment variable set) the supervisor reads
the workers' values from files that only prometheus_client's own metric
objects write.  Each metric here then keeps such an object as a *mirror*,
and :data:`MIRRORS` copies what changed into the mirrors at most every
:data:`SYNC_INTERVAL` seconds (a scrape may see a worker's values that
late) and at shutdown.  A copy writes what changed since the last one, as
one delta per series (per bucket for a histogram), so its cost does not
grow with the number of connections in between: copying once per reactor
turn instead, and histogram observations one by one, cost a worker 8% more
instructions per handshake (``benchmarks/instrbench.py``: 0.70 against
0.65 million).
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self, cast

import prometheus_client
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString
from twisted.internet.interfaces import IReactorCore

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = [
    "MIRRORS",
    "SYNC_INTERVAL",
    "Counter",
    "Gauge",
    "Histogram",
    "MirrorSync",
    "multiprocess_mode",
]

_INF = float("inf")
#: Seconds between copies into the multiprocess mirrors: short next to any
#: scrape interval, long next to a reactor turn under load.
SYNC_INTERVAL = 0.25
#: prometheus_client reads the same variable, the same way, at import.
_USE_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes metric values to a multiprocess directory."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    # prometheus_client still honours the old lower-case spelling too.
    return bool(directory or os.environ.get("prometheus_multiproc_dir"))  # noqa: SIM112


class MirrorSync:
    """Copies changed values into prometheus_client mirrors (multiprocess mode only).

    Without a clock (before :meth:`bind`) every change is copied at once;
    with one, changes are collected and copied in one go ``interval``
    seconds after the first of them, and at shutdown.
    """

    def __init__(self, interval: float = SYNC_INTERVAL) -> None:
        """Nothing to copy yet; once bound, copy ``interval`` seconds after a change."""
        self.interval = interval
        self._dirty: list[_Metric] = []
        self._clock: IReactorTime | None = None
        self._pending: IDelayedCall | None = None

    def bind(self, clock: IReactorTime) -> None:
        """Copy on ``clock``'s timer (and at its shutdown) from now on."""
        if self._clock is clock:
            return
        self._clock = clock
        if IReactorCore.providedBy(clock):
            clock.addSystemEventTrigger("after", "shutdown", self.sync)

    def mark(self, child: _Metric) -> None:
        """``child`` changed (it is marked dirty until the next copy)."""
        self._dirty.append(child)
        if self._clock is None:
            self.sync()
        elif self._pending is None:
            self._pending = self._clock.callLater(self.interval, self.sync)

    def sync(self) -> None:
        """Copy every changed value into its mirror now."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        dirty, self._dirty = self._dirty, []
        for child in dirty:
            child.push()


#: The process's mirror copier: multiprocess files are per process too.
MIRRORS = MirrorSync()


class _Metric:
    """A family and its series in one class, as in prometheus_client.

    The object the constructor returns is the family; ``labels(...)``
    returns a series of the same class (the family is its own one series
    when it has no labels), so both have the same type.
    """

    kind = ""
    _mirror_class: Any = None
    __slots__ = (
        "_children",
        "_mirror",
        "created",
        "dirty",
        "documentation",
        "labelnames",
        "mirror",
        "name",
    )

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry | None = None,
        mirror_options: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Self] = {}
        self._mirror: Any = None
        if multiprocess_mode():
            self._mirror = self._mirror_class(
                name, documentation, self.labelnames, registry=None, **(mirror_options or {})
            )
        self._start(self._mirror if not self.labelnames else None)
        if not self.labelnames:
            self._children[()] = cast(Self, self)
        if registry is not None:
            registry.register(self)

    def _start(self, mirror: Any) -> None:
        """Start a series at zero, copying into ``mirror`` (multiprocess mode)."""
        self.created = time.time()
        self.mirror = mirror
        self.dirty = False

    def _changed(self) -> None:
        if not self.dirty:
            self.dirty = True
            MIRRORS.mark(self)

    def push(self) -> None:
        """Copy into the mirror what changed since the last copy."""
        self.dirty = False

    def labels(self, *values: str, **named: str) -> Self:
        """The series of these label values (created on first use)."""
        if named:
            if values:
                raise ValueError("labels: positional or keyword label values, not both")
            try:
                values = tuple(named[label] for label in self.labelnames)
            except KeyError:
                raise ValueError(f"labels: expected {self.labelnames}") from None
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames) or not self.labelnames:
                raise ValueError(f"{self.name}: expected label values for {self.labelnames}")
            values = tuple(str(v) for v in values)  # as prometheus_client does
            child = self._children.get(values) or self._child(values)
        return child

    def _child(self, values: tuple[str, ...]) -> Self:
        child = object.__new__(type(self))
        child.name = self.name
        child.labelnames = ()
        child._children = {}
        self._copy_shape(child)
        child._start(None if self._mirror is None else self._mirror.labels(*values))
        self._children[values] = child
        return child

    def _copy_shape(self, child: Self) -> None:
        """Give a new series what it needs of its family before it starts."""

    def _family(self) -> Metric:
        name = self.name
        if self.kind == "counter" and name.endswith("_total"):
            name = name[:-6]
        return Metric(name, self.documentation, self.kind)

    def describe(self) -> list[Metric]:
        """The family this collector produces (for the registry's duplicate check)."""
        return [self._family()]

    def collect(self) -> list[Metric]:
        """The family with a sample set per series (a scrape)."""
        family = self._family()
        for values, child in list(self._children.items()):
            child._add_samples(family, dict(zip(self.labelnames, values, strict=True)))
        return [family]

    def _add_samples(self, family: Metric, labels: dict[str, str]) -> None:
        raise TypeError(f"{type(self).__name__} has no samples of its own")


class Counter(_Metric):
    """A counter (prometheus_client.Counter's calls and samples)."""

    kind = "counter"
    _mirror_class = prometheus_client.Counter
    __slots__ = ("pushed", "value")

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Register with ``registry``; a counter without labels starts at 0."""
        super().__init__(name, documentation, labelnames, registry=registry)

    def _start(self, mirror: Any) -> None:
        super()._start(mirror)
        self.value = 0.0
        self.pushed = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative: counters only go up)."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount
        if self.mirror is not None:
            self._changed()

    def push(self) -> None:
        """Add to the mirror what was counted since the last copy."""
        super().push()
        delta, self.pushed = self.value - self.pushed, self.value
        if delta:
            self.mirror.inc(delta)

    def _add_samples(self, family: Metric, labels: dict[str, str]) -> None:
        family.add_sample(family.name + "_total", labels, self.value)
        if _USE_CREATED:
            family.add_sample(family.name + "_created", labels, self.created)


class Gauge(_Metric):
    """A gauge (prometheus_client.Gauge's calls and samples)."""

    kind = "gauge"
    _mirror_class = prometheus_client.Gauge
    __slots__ = ("value",)

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry | None = None,
        multiprocess_mode: str = "all",
    ) -> None:
        """Register with ``registry``; ``multiprocess_mode`` is the mirror's (see module)."""
        options = {"multiprocess_mode": multiprocess_mode}
        super().__init__(name, documentation, labelnames, registry=registry, mirror_options=options)

    def _start(self, mirror: Any) -> None:
        super()._start(mirror)
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``."""
        self.value += amount
        if self.mirror is not None:
            self._changed()

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        self.value -= amount
        if self.mirror is not None:
            self._changed()

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = float(value)
        if self.mirror is not None:
            self._changed()

    def push(self) -> None:
        """Set the mirror to the value."""
        super().push()
        self.mirror.set(self.value)

    def _add_samples(self, family: Metric, labels: dict[str, str]) -> None:
        family.add_sample(family.name, labels, self.value)


def _has_value_cells(mirror: Any, buckets: int) -> bool:
    """Whether a prometheus_client histogram series has the cells :meth:`Histogram.push` adds to."""
    cells = getattr(mirror, "_buckets", None)
    total = getattr(mirror, "_sum", None)
    return (
        isinstance(cells, list)
        and len(cells) == buckets
        and all(callable(getattr(cell, "inc", None)) for cell in cells)
        and callable(getattr(total, "inc", None))
    )


class Histogram(_Metric):
    """A histogram (prometheus_client.Histogram's calls, buckets and samples)."""

    kind = "histogram"
    _mirror_class = prometheus_client.Histogram
    __slots__ = ("_le", "bounds", "counts", "observed", "pushed_counts", "pushed_sum", "sum")

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = prometheus_client.Histogram.DEFAULT_BUCKETS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Register with ``registry``; ``buckets`` are upper bounds (+Inf is added)."""
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != _INF:
            bounds.append(_INF)
        self.bounds = tuple(bounds)
        self._le = tuple(floatToGoString(b) for b in self.bounds)
        options = {"buckets": tuple(buckets)}
        super().__init__(name, documentation, labelnames, registry=registry, mirror_options=options)

    def _copy_shape(self, child: Histogram) -> None:
        child.bounds = self.bounds
        child._le = self._le

    def _start(self, mirror: Any) -> None:
        super()._start(mirror)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        #: What the mirror holds: bucket counts and sum at the last copy.
        self.pushed_counts = [0] * len(self.bounds)
        self.pushed_sum = 0.0
        #: Observations not yet copied, kept only for a mirror whose buckets
        #: cannot be added to directly (see :meth:`push`); None otherwise.
        self.observed: list[float] | None = None
        if mirror is not None and not _has_value_cells(mirror, len(self.bounds)):
            self.observed = []

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose bound is at least ``amount``."""
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount
        if self.mirror is not None:
            if self.observed is not None:
                self.observed.append(amount)
            self._changed()

    def push(self) -> None:
        """Add to the mirror what was observed since the last copy.

        prometheus_client's histogram keeps one value cell per bucket (not
        cumulative) and one for the sum, and ``observe`` adds to them: so
        adding each bucket's change and the sum's change to those cells
        leaves the multiprocess files as the same observations one by one
        would, for a few writes per copy whatever the number observed.
        Should a prometheus_client release lay its cells out otherwise,
        the observations are replayed through ``observe`` instead.
        """
        super().push()
        if self.observed is not None:
            observed, self.observed = self.observed, []
            for amount in observed:
                self.mirror.observe(amount)
            return
        cells = self.mirror._buckets
        for index, (count, pushed) in enumerate(zip(self.counts, self.pushed_counts, strict=True)):
            if count != pushed:
                cells[index].inc(count - pushed)
        self.pushed_counts = list(self.counts)
        delta, self.pushed_sum = self.sum - self.pushed_sum, self.sum
        if delta:
            self.mirror._sum.inc(delta)

    def _add_samples(self, family: Metric, labels: dict[str, str]) -> None:
        name = family.name
        total = 0
        for le, count in zip(self._le, self.counts, strict=True):
            total += count
            family.add_sample(name + "_bucket", {**labels, "le": le}, float(total))
        family.add_sample(name + "_count", labels, float(total))
        if self.bounds[0] >= 0:
            family.add_sample(name + "_sum", labels, self.sum)
        if _USE_CREATED:
            family.add_sample(name + "_created", labels, self.created)
