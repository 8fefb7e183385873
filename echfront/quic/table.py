# -*- test-case-name: tests.test_datagram -*-
"""A datagram relay's flows, by client address and connection ID, sans-IO (RFC 9000 §5.2).

A server tells connections apart by Destination Connection ID (RFC 9000
§5.2); a relay in front of one sees datagrams from client addresses, and
only the connection IDs in long headers have a length it can read (a short
header's DCID length is the backend's choice, RFC 9000 §17.3).  So
:class:`FlowTable` files flows by client address first:

* a long-header datagram belongs to the address's flow whose connection IDs
  hold its Destination Connection ID: the client's first DCID, or a Source
  Connection ID the backend used (the client answers with it, §7.2).  Any
  other DCID is a new connection from the same address and port;
* a short-header datagram belongs to the address's only flow or, when the
  address has several, to the one whose connection ID it starts with.

It also counts flows per client address key (IPv6: per /64, as
:func:`echfront.front.limits.address_key` groups them) for the per-address
bound.  What a flow is, is the caller's: anything with the
:class:`Entry` attributes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["MAX_CIDS", "Entry", "FlowTable", "long_header_cids"]

#: Connection IDs remembered per flow: the client's first DCID, the
#: backend's SCID, one more after a Retry; the bound only stops a
#: misbehaving backend from growing the set.
MAX_CIDS = 8


def long_header_cids(datagram: bytes) -> tuple[bytes, bytes] | None:
    """(DCID, SCID) of a long-header packet (RFC 8999 §5.1), None if truncated."""
    if len(datagram) < 7:
        return None
    dcid_end = 6 + datagram[5]
    if len(datagram) <= dcid_end:
        return None
    scid_end = dcid_end + 1 + datagram[dcid_end]
    if len(datagram) < scid_end:
        return None
    return datagram[6:dcid_end], datagram[dcid_end + 1 : scid_end]


class Entry(Protocol):
    """What the table reads of a flow.

    :ivar client: the client's (host, port).
    :ivar key: the client's address key, "" for none (not counted).
    :ivar cids: the flow's connection IDs; the table adds to it.
    """

    client: tuple[str, int]
    key: str
    cids: set[bytes]


E = TypeVar("E", bound=Entry)


class FlowTable(Generic[E]):
    """Flows by client address and connection ID (module docstring)."""

    def __init__(self) -> None:
        """An empty table."""
        self._by_client: dict[tuple[str, int], list[E]] = {}
        self._per_key: dict[str, int] = {}
        self._size = 0

    def __len__(self) -> int:
        """Flows in the table."""
        return self._size

    def __iter__(self) -> Iterator[E]:
        """Every flow; iterate over a copy to remove while iterating."""
        for flows in self._by_client.values():
            yield from flows

    def count(self, key: str) -> int:
        """Flows of the client address key ``key``."""
        return self._per_key.get(key, 0)

    def add(self, flow: E) -> None:
        """Put a new flow in."""
        self._by_client.setdefault(flow.client, []).append(flow)
        if flow.key:
            self._per_key[flow.key] = self._per_key.get(flow.key, 0) + 1
        self._size += 1

    def remove(self, flow: E) -> None:
        """Take a flow out (nothing if it is not in)."""
        flows = self._by_client.get(flow.client)
        if flows is None or flow not in flows:
            return
        flows.remove(flow)
        if not flows:
            del self._by_client[flow.client]
        if flow.key:
            count = self._per_key[flow.key] - 1
            if count:
                self._per_key[flow.key] = count
            else:
                del self._per_key[flow.key]
        self._size -= 1

    @staticmethod
    def add_cid(flow: E, cid: bytes) -> None:
        """Remember a connection ID the backend chose for ``flow`` (bounded)."""
        if cid and len(flow.cids) < MAX_CIDS:
            flow.cids.add(cid)

    def find(self, client: tuple[str, int], datagram: bytes) -> E | None:
        """The flow a datagram from ``client`` belongs to; None for a new one or a stray."""
        flows = self._by_client.get(client)
        if not flows or not datagram:
            return None
        if datagram[0] & 0x80:
            cids = long_header_cids(datagram)
            if cids is None:
                return None
            for flow in flows:
                if cids[0] in flow.cids:
                    return flow
            return None
        if len(flows) == 1:
            return flows[0]
        for flow in flows:
            if any(cid and datagram.startswith(cid, 1) for cid in flow.cids):
                return flow
        return None
