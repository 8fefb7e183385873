# -*- test-case-name: tests.test_limits -*-
"""Per-address accounting that holds under abuse (RFC 9849 §10.4, checklist PAR-10, SEC-1).

Two things an attacker can do cheaply cost the front something:

* open connections and send a partial ClientHello (slowloris): each holds a
  socket and a buffer until the first-flight timeout.  The front bounds the
  number of unfinished first flights per client address;
* send ClientHellos that name a config_id the front holds, forcing one
  X25519 operation each.  The front bounds HPKE setups per second per
  client address with a token bucket.

Addresses are grouped: IPv4 by the full address, IPv6 by its /64 (one
subscriber usually holds a whole /64).  Memory is bounded: state exists only
for addresses with activity in flight or tokens spent recently, and
:meth:`AddressLimits.sweep` forgets the rest.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["AddressLimits", "address_key"]


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
class AddressLimits:
    """Counters and token buckets keyed by :func:`address_key`.

    :param clock: seconds, monotonic (the reactor's ``seconds``).
    """

    clock: Callable[[], float]
    _first_flights: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def start_first_flight(self, key: str, limit: int) -> bool:
        """Count a new unfinished first flight; False if ``key`` is at ``limit``.

        A ``limit`` of 0, or an empty key, means unlimited.
        """
        if not key:
            return True
        count = self._first_flights.get(key, 0)
        if limit and count >= limit:
            return False
        self._first_flights[key] = count + 1
        return True

    def end_first_flight(self, key: str) -> None:
        """A first flight finished (complete, refused or abandoned)."""
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
        """Forget buckets that have refilled completely (nothing to remember)."""
        now = self.clock()
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
        """Addresses with state (for tests and metrics)."""
        return len(self._first_flights.keys() | self._buckets.keys())
