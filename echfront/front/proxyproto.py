# -*- test-case-name: tests.test_proxyproto -*-
"""PROXY protocol v1 and v2 headers toward backends (haproxy's proxy-protocol.txt).

A backend behind the front sees the front's address as its peer; a PROXY
header sent before the first flight tells it the client's real address.
Version 2 also carries, in TLVs:

* ``PP2_TYPE_AUTHORITY`` (0x02): the effective server name, i.e. the inner
  name when ECH was accepted;
* ``0xE0`` (custom range 0xE0-0xEF), one byte: the ECH outcome, 0 = not
  offered, 1 = rejected (GREASE, stale or unknown config), 2 = accepted;
* ``0xE1``, one byte: the config_id the client used, when ECH was offered.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address, IPv6Address

from echfront.ech.decoder import ClientHelloInfo, ECHStatus

if TYPE_CHECKING:
    from echfront.front.connection import StreamTransport

__all__ = [
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_ECH_CONFIG_ID",
    "PP2_TYPE_ECH_STATUS",
    "proxy_header",
    "v1_header",
    "v2_header",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_ECH_STATUS = 0xE0
PP2_TYPE_ECH_CONFIG_ID = 0xE1
_ECH_STATUS_CODES = {ECHStatus.NOT_OFFERED: 0, ECHStatus.REJECTED: 1, ECHStatus.ACCEPTED: 2}

_Address = IPv4Address | IPv6Address


def _ip_pair(source: object, destination: object) -> tuple[_Address, _Address] | None:
    """Both addresses when they are IP addresses of the same family."""
    if isinstance(source, IPv4Address) and isinstance(destination, IPv4Address):
        return source, destination
    if isinstance(source, IPv6Address) and isinstance(destination, IPv6Address):
        return source, destination
    return None


def v1_header(source: object, destination: object) -> bytes:
    """A human-readable v1 header; ``PROXY UNKNOWN`` for non-IP peers."""
    pair = _ip_pair(source, destination)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = pair
    family = "TCP4" if isinstance(src, IPv4Address) else "TCP6"
    src_host = src.host.split("%")[0]
    dst_host = dst.host.split("%")[0]
    return f"PROXY {family} {src_host} {dst_host} {src.port} {dst.port}\r\n".encode("ascii")


def v2_header(source: object, destination: object, info: ClientHelloInfo | None) -> bytes:
    """A binary v2 header with the ECH TLVs described in the module docstring."""
    tlvs = b""
    if info is not None:
        if info.server_name:
            name = info.server_name.encode("ascii")
            tlvs += struct.pack("!BH", PP2_TYPE_AUTHORITY, len(name)) + name
        tlvs += struct.pack("!BHB", PP2_TYPE_ECH_STATUS, 1, _ECH_STATUS_CODES[info.status])
        if info.config_id is not None:
            tlvs += struct.pack("!BHB", PP2_TYPE_ECH_CONFIG_ID, 1, info.config_id)
    pair = _ip_pair(source, destination)
    if pair is None:
        # LOCAL command, AF_UNSPEC: the backend keeps the real connection
        # endpoints, but still gets the TLVs.
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    src, dst = pair
    if isinstance(src, IPv4Address):
        family = 0x11
        addresses = (
            ipaddress.IPv4Address(src.host).packed
            + ipaddress.IPv4Address(dst.host).packed
            + struct.pack("!HH", src.port, dst.port)
        )
    else:
        family = 0x21
        addresses = (
            ipaddress.IPv6Address(src.host.split("%")[0]).packed
            + ipaddress.IPv6Address(dst.host.split("%")[0]).packed
            + struct.pack("!HH", src.port, dst.port)
        )
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


def proxy_header(version: int, client: StreamTransport, info: ClientHelloInfo | None) -> bytes:
    """The header for ``version`` (1 or 2) describing ``client``'s connection."""
    source = client.getPeer()
    destination = client.getHost()
    if version == 1:
        return v1_header(source, destination)
    return v2_header(source, destination, info)
