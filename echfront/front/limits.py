# -*- test-case-name: tests.test_limits -*-
"""Per-address limits that bite only under contention (RFC 9849 §10.4, checklist PAR-10, SEC-1).

Two things a client can do cheaply cost the front something: open
connections and dribble a partial ClientHello (slowloris: a socket and a
buffer each, until the first-flight timeout), and send ClientHellos naming
a config_id the front holds (one X25519 operation each).  A fixed
per-address allowance protects against both, but also refuses any single
busy source (a load test, a CGNAT address, a balancer without PROXY) while
the front is idle otherwise.  So by default nothing is capped per address;
the front sheds load only when it is saturated, and then from the
heaviest addresses first.

**The saturation signal: unfinished first flights.**  The front counts
connections accepted whose ClientHello is not complete yet (it keeps this
count anyway).  It is the queue in front of the front's one expensive
step: it grows when connections arrive faster than the front reads and
decodes them (CPU, the resource HPKE spends), and when clients hold
sockets without finishing (memory and descriptors, the resource a
slowloris spends, which costs no CPU and so would never show as reactor
lag).  Twisted's listening port drains the kernel's accept queue in
batches that grow by 20 per turn while it stays non-empty, so a backlog in
the kernel turns into unfinished first flights within a few turns.  The
count is exact, costs nothing, needs no timer (an idle front runs none)
and is deterministic under a test clock.  Reactor lag, the other candidate,
was rejected: measuring it needs a timer firing while the front is busy,
it only sees the length of reactor turns (it rises with bulk relaying that
no per-address limit would relieve), and it is blind to slowloris.  The
front is *saturated* while more than ``saturation_first_flights`` first
flights are unfinished; the further past it, the deeper the cut (below).

**Fair shares.**  Each address's *demand* is its connection arrivals,
decayed exponentially (time constant :data:`DEMAND_SECONDS`).  While the
front is saturated, a new connection (and, after its ClientHello, its HPKE
decryption) from address ``a`` is shed when both hold:

* ``a`` asks more than :data:`SHARE_MARGIN` times the mean demand of the
  *other* active addresses: so a single address is never shed (it is
  using the whole front fairly), nor are addresses asking alike;
* ``a``'s demand is at least ``threshold / unfinished`` of the heaviest
  address's: just past the threshold only the heaviest is shed; at twice
  it, every address asking half as much as the heaviest too, and so on.

Demand counts shed attempts as well, so a flooding address stays the
heaviest while it floods, and light addresses keep their full service.
Shedding at accept closes the socket before the front reads a byte, far
cheaper than refusing the ClientHello later; a connection admitted just
before saturation is still checked before its HPKE decryption.

Hard caps remain available as options: ``max_first_flights_per_address``
(unfinished first flights per address) and ``hpke_rate``/``hpke_burst``
(a token bucket of HPKE decryptions per address); both are off by default.

Addresses are grouped: IPv4 by the full address, IPv6 by its /64 (one
subscriber usually holds a whole /64).  Memory is bounded: an address's
demand is forgotten once it has been quiet for :data:`DEMAND_HORIZON`
seconds, at most :data:`MAX_TRACKED` are kept (the least recently seen go
first), first-flight counts exist only while non-zero, and
:meth:`AddressLimits.sweep` forgets full token buckets.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "DEMAND_HORIZON",
    "DEMAND_SECONDS",
    "MAX_TRACKED",
    "SHARE_MARGIN",
    "AddressLimits",
    "address_key",
]

#: Time constant (seconds) of the exponential decay of an address's demand.
DEMAND_SECONDS = 2.0
#: An address quiet for this long (seconds) is no longer an active address.
DEMAND_HORIZON = 4 * DEMAND_SECONDS
#: How many times the others' mean demand an address may ask before it can be shed.
SHARE_MARGIN = 2.0
#: The most addresses whose demand is remembered at once.
MAX_TRACKED = 65536
#: Rebase the decay's epoch after this many time constants (bounds the floats).
_REBASE_AFTER = 20.0


@functools.lru_cache(maxsize=4096)  # parsed once per address, not per connection
def address_key(host: str) -> str:
    """The accounting key of a client address: IPv4 as is, IPv6 by /64.

    An empty key (a peer with no IP address, e.g. on a UNIX socket behind a
    local proxy) means "not limited per address": all such clients would
    otherwise share one budget.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class _Demand:
    #: Decayed arrivals, in units of the current epoch (see AddressLimits._weight).
    value: float
    #: When the address last arrived.
    seen: float


@dataclass
class AddressLimits:
    """Unfinished first flights, demand and token buckets, keyed by :func:`address_key`.

    :param clock: seconds, monotonic (the reactor's ``seconds``).
    """

    clock: Callable[[], float]
    _first_flights: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    #: Unfinished first flights of every key, the empty one included.
    _pending: int = 0
    #: Demand by key, least recently seen first.
    _demand: OrderedDict[str, _Demand] = field(default_factory=OrderedDict)
    #: The sum of every tracked demand, and the heaviest one (same units).
    _demand_total: float = 0.0
    _heaviest: str = ""
    #: The epoch the demand values are expressed at (see _weight).
    _epoch: float | None = None

    # -- unfinished first flights --------------------------------------------

    @property
    def pending(self) -> int:
        """Unfinished first flights of all clients now: the saturation signal."""
        return self._pending

    def start_first_flight(self, key: str, limit: int) -> bool:
        """Count a new unfinished first flight; False if ``key`` is at ``limit``.

        A ``limit`` of 0 means unlimited.  An empty key is counted only in
        :attr:`pending` and never limited.
        """
        if key:
            count = self._first_flights.get(key, 0)
            if limit and count >= limit:
                return False
            self._first_flights[key] = count + 1
        self._pending += 1
        return True

    def end_first_flight(self, key: str) -> None:
        """A first flight finished (complete, refused or abandoned)."""
        if self._pending > 0:
            self._pending -= 1
        if not key:
            return
        count = self._first_flights.get(key, 0) - 1
        if count > 0:
            self._first_flights[key] = count
        else:
            self._first_flights.pop(key, None)

    def first_flights(self, key: str) -> int:
        """Unfinished first flights of ``key`` now."""
        return self._first_flights.get(key, 0)

    def admit(self, key: str, *, cap: int, saturation: int) -> str:
        """Decide on a new connection from ``key``: "" to admit it, else the limit that refuses it.

        The arrival counts toward ``key``'s demand either way.  An admitted
        connection is counted as an unfinished first flight.

        :param cap: ``max_first_flights_per_address`` (0: none).
        :param saturation: ``saturation_first_flights`` (0: never shed).
        :returns: "", ``"first_flights_per_address"`` or ``"fair_share"``.
        """
        self.arrive(key)
        if key and cap and self._first_flights.get(key, 0) >= cap:
            return "first_flights_per_address"
        if self.shed(key, saturation):
            return "fair_share"
        self.start_first_flight(key, 0)
        return ""

    # -- demand and fair shares ---------------------------------------------------

    def _weight(self, now: float) -> float:
        """The weight of an arrival at ``now``, relative to the epoch.

        Demand decays as ``exp(-age / DEMAND_SECONDS)``.  Rather than decaying
        every value at every arrival, arrivals are weighted up by
        ``exp((now - epoch) / DEMAND_SECONDS)``: all values share the epoch,
        so they compare (and sum) directly, and only the rare rebase touches
        them all.
        """
        if self._epoch is None:
            self._epoch = now
        elapsed = now - self._epoch
        if elapsed > _REBASE_AFTER * DEMAND_SECONDS:
            self._rebase(now)
            elapsed = 0.0
        return math.exp(elapsed / DEMAND_SECONDS)

    def _rebase(self, now: float) -> None:
        """Express every demand at the epoch ``now`` (and recompute the sums exactly)."""
        assert self._epoch is not None
        factor = math.exp(-(now - self._epoch) / DEMAND_SECONDS)
        self._epoch = now
        for entry in self._demand.values():
            entry.value *= factor
        self._recount()

    def _recount(self) -> None:
        self._demand_total = math.fsum(entry.value for entry in self._demand.values())
        self._heaviest = max(self._demand, key=lambda k: self._demand[k].value, default="")

    def arrive(self, key: str) -> None:
        """Count one arrival of ``key`` (a connection, shed or not)."""
        if not key:
            return
        now = self.clock()
        self._forget_quiet(now)
        weight = self._weight(now)
        entry = self._demand.get(key)
        if entry is None:
            entry = self._demand[key] = _Demand(0.0, now)
            if len(self._demand) > MAX_TRACKED:
                self._drop(next(iter(self._demand)))
        else:
            self._demand.move_to_end(key)
            entry.seen = now
        entry.value += weight
        self._demand_total += weight
        heaviest = self._demand.get(self._heaviest)
        if heaviest is None or entry.value >= heaviest.value:
            self._heaviest = key

    def _forget_quiet(self, now: float) -> None:
        """Drop addresses not seen for DEMAND_HORIZON (the oldest are first)."""
        demand = self._demand
        while demand:
            key, entry = next(iter(demand.items()))
            if now - entry.seen < DEMAND_HORIZON:
                return
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._demand.pop(key)
        self._demand_total -= entry.value
        if key == self._heaviest:
            self._recount()
        elif not self._demand:
            self._demand_total = 0.0

    def shed(self, key: str, saturation: int) -> bool:
        """Whether ``key`` is shed now (see the module docstring).

        Only while more than ``saturation`` first flights are unfinished
        (0: never), only an address with demand, never the only one.
        """
        pending = self._pending
        if not saturation or pending <= saturation or not key:
            return False
        entry = self._demand.get(key)
        others = len(self._demand) - 1
        if entry is None or others < 1:
            return False
        others_mean = (self._demand_total - entry.value) / others
        if entry.value <= SHARE_MARGIN * others_mean:
            return False
        heaviest = self._demand[self._heaviest].value
        return entry.value >= heaviest * saturation / pending

    def demand(self, key: str) -> float:
        """``key``'s decayed arrivals now (for tests and diagnostics)."""
        entry = self._demand.get(key)
        if entry is None or self._epoch is None:
            return 0.0
        return entry.value * math.exp(-(self.clock() - self._epoch) / DEMAND_SECONDS)

    # -- the hard HPKE cap ------------------------------------------------------

    def take_hpke(self, key: str, rate: float, burst: float) -> bool:
        """Spend one HPKE token of ``key``; False if its bucket is empty.

        The bucket holds up to ``burst`` tokens and refills at ``rate`` per
        second.  A ``rate`` of 0 means unlimited.
        """
        if not rate or not key:
            return True
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(burst, now)
        else:
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def sweep(self, rate: float, burst: float) -> None:
        """Forget buckets that have refilled completely, and quiet addresses' demand."""
        now = self.clock()
        self._forget_quiet(now)
        if not rate:
            self._buckets.clear()
            return
        full = [
            key
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * rate >= burst
        ]
        for key in full:
            del self._buckets[key]

    @property
    def tracked(self) -> int:
        """Addresses with first flights or token buckets (for tests and metrics)."""
        return len(self._first_flights.keys() | self._buckets.keys())

    @property
    def active(self) -> int:
        """Addresses whose demand is remembered (seen within DEMAND_HORIZON)."""
        return len(self._demand)
