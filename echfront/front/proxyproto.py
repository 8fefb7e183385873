# -*- test-case-name: tests.test_proxyproto -*-
"""PROXY protocol v1 and v2 (haproxy's proxy-protocol.txt): headers read and written.

Two directions, both on bytes only (no Twisted at run time; addresses are
read from any object with ``host`` and ``port``, as Twisted's are):

* **incoming**, from an L4 balancer in front of echfront
  (``[proxy] listen``): :class:`ProxyHeaderReader` parses a v1 or v2
  header at the start of a connection, whatever the fragmentation, and
  returns a :class:`ProxyHeader` with the client's real address plus the
  bytes after it (the TLS first flight).  It reads nothing past the
  header, bounds it in size (v1: 107 bytes, §2.1; v2: 16 bytes plus the
  declared length, at most the reader's bound) and raises
  :class:`ProxyHeaderError` for anything else, so a connection without a
  valid header is never taken for TLS;
* **outgoing**, to a backend (``proxy_protocol = 1 | 2``): a header before
  the first flight tells the backend the client's real address.  Version
  2 also carries, in TLVs:

  * ``PP2_TYPE_AUTHORITY`` (0x02): the effective server name, i.e. the
    inner name when ECH was accepted;
  * ``0xE0`` (custom range 0xE0-0xEF), one byte: the ECH outcome, 0 = not
    offered, 1 = rejected (GREASE, stale or unknown config), 2 = accepted;
  * ``0xE1``, one byte: the config_id the client used, when ECH was offered.

Whether a peer may send a header at all (only configured balancer
networks) is decided by the front (:mod:`echfront.front.protocol`), not
here.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from echfront.ech.decoder import ClientHelloInfo, ECHStatus

__all__ = [
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_ECH_CONFIG_ID",
    "PP2_TYPE_ECH_STATUS",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "proxy_header",
    "v1_header",
    "v2_header",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: The longest v1 header, CRLF included (proxy-protocol.txt §2.1).
V1_MAX_LENGTH = 107
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_ECH_STATUS = 0xE0
PP2_TYPE_ECH_CONFIG_ID = 0xE1
_ECH_STATUS_CODES = {ECHStatus.NOT_OFFERED: 0, ECHStatus.REJECTED: 1, ECHStatus.ACCEPTED: 2}
#: v2 address families (high nibble of byte 14) with their address block sizes.
_V2_INET, _V2_INET6 = 0x1, 0x2
_V2_ADDRESS_LENGTHS = {_V2_INET: 12, _V2_INET6: 36, 0x3: 216}
_V2_STREAM = 0x1

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- incoming ------------------------------------------------------------------


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header (the connection is dropped)."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a balancer's PROXY header says about the connection.

    :ivar version: 1 or 2.
    :ivar source: the client's address and port; None when the header says
        to keep the connection's own endpoints (v1 ``UNKNOWN``, v2 ``LOCAL``
        (the balancer's health checks), or a v2 family or transport other
        than TCP over IPv4/IPv6; §2.1, §2.2).
    :ivar destination: the address and port the client connected to (on
        the balancer), None with ``source``.
    :ivar tlvs: v2 type-length-value items, in order (empty for v1).
    """

    version: int
    source: tuple[_IP, int] | None = None
    destination: tuple[_IP, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()


class ProxyHeaderReader:
    """Reads one PROXY header (v1 or v2) from the start of a connection.

    Feed it what the connection receives; it answers None until the header
    is complete, then the header and the bytes after it.  It decides the
    version from the first bytes and refuses a connection that starts with
    anything else as soon as that is certain.

    :param max_bytes: the most a whole v2 header (TLVs included) may take;
        a longer one is refused without waiting for it.
    """

    def __init__(self, max_bytes: int = 4096) -> None:
        """Expect a header of at most ``max_bytes``."""
        self._max_bytes = max(max_bytes, V1_MAX_LENGTH)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """Add ``data``; the header and what follows it once complete.

        :raises ProxyHeaderError: for bytes that cannot start or be a header.
        """
        buffer = self._buffer
        buffer += data
        if buffer[:1] == V2_SIGNATURE[:1]:
            return self._v2()
        if buffer[:1] == V1_PREFIX[:1]:
            return self._v1()
        if buffer:
            raise ProxyHeaderError("no PROXY protocol header")
        return None

    def _v1(self) -> tuple[ProxyHeader, bytes] | None:
        buffer = self._buffer
        prefix = bytes(buffer[: len(V1_PREFIX)])
        if not V1_PREFIX.startswith(prefix):
            raise ProxyHeaderError("no PROXY protocol header")
        end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(buffer) >= V1_MAX_LENGTH:
                raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
            return None
        line, rest = bytes(buffer[:end]), bytes(buffer[end + 2 :])
        return parse_v1(line), rest

    def _v2(self) -> tuple[ProxyHeader, bytes] | None:
        buffer = self._buffer
        if not V2_SIGNATURE.startswith(bytes(buffer[: len(V2_SIGNATURE)])):
            raise ProxyHeaderError("no PROXY protocol header")
        if len(buffer) < 16:
            return None
        length = int.from_bytes(buffer[14:16], "big")
        if 16 + length > self._max_bytes:
            raise ProxyHeaderError(f"PROXY v2 header of {16 + length} bytes is too long")
        if len(buffer) < 16 + length:
            return None
        header, rest = bytes(buffer[: 16 + length]), bytes(buffer[16 + length :])
        return parse_v2(header), rest


def _port(text: bytes) -> int:
    """A v1 port: 1 to 5 decimal digits, 0 to 65535, no sign or leading zero."""
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyHeaderError(f"PROXY v1 header: bad port {text[:8]!r}")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyHeaderError(f"PROXY v1 header: bad port {port}")
    return port


def parse_v1(line: bytes) -> ProxyHeader:
    """Parse a v1 header without its CRLF (proxy-protocol.txt §2.1).

    :raises ProxyHeaderError: unless it is ``PROXY TCP4|TCP6 SRC DST SPORT
        DPORT`` with single spaces, or ``PROXY UNKNOWN`` and anything.
    """
    fields = line.split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise ProxyHeaderError("no PROXY protocol header")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        return ProxyHeader(1)  # the rest of the line is to be ignored
    if protocol not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ProxyHeaderError(f"PROXY v1 header: unknown protocol {protocol[:8]!r}")
    kind = ipaddress.IPv4Address if protocol == b"TCP4" else ipaddress.IPv6Address
    try:
        source = kind(fields[2].decode("ascii"))
        destination = kind(fields[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"PROXY v1 header: bad {protocol.decode()} address") from None
    return ProxyHeader(1, (source, _port(fields[4])), (destination, _port(fields[5])))


def parse_v2(header: bytes) -> ProxyHeader:
    """Parse a whole v2 header (proxy-protocol.txt §2.2), signature included.

    :raises ProxyHeaderError: for a bad version or command, an address block
        shorter than its family needs, or TLVs that overrun the header.
    """
    if not header.startswith(V2_SIGNATURE) or len(header) < 16:
        raise ProxyHeaderError("no PROXY protocol header")
    version_command, family_transport = header[12], header[13]
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header: version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2 header: unknown command {command}")
    body = header[16:]
    family, transport = family_transport >> 4, family_transport & 0x0F
    address_length = _V2_ADDRESS_LENGTHS.get(family, 0)
    if len(body) < address_length:
        raise ProxyHeaderError("PROXY v2 header: address block too short")
    tlvs = _tlvs(body[address_length:])
    if command == 0 or transport != _V2_STREAM or family not in (_V2_INET, _V2_INET6):
        # LOCAL (a health check), or something this TCP front cannot use:
        # keep the connection's own endpoints, as §2.2 says to.
        return ProxyHeader(2, tlvs=tlvs)
    size = 4 if family == _V2_INET else 16
    kind = ipaddress.IPv4Address if family == _V2_INET else ipaddress.IPv6Address
    source = kind(body[:size])
    destination = kind(body[size : 2 * size])
    source_port, destination_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return ProxyHeader(2, (source, source_port), (destination, destination_port), tlvs)


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """Split v2 TLVs (type: 1 byte, length: 2 bytes, value)."""
    items = []
    position = 0
    while position < len(data):
        if position + 3 > len(data):
            raise ProxyHeaderError("PROXY v2 header: truncated TLV")
        kind, length = struct.unpack_from("!BH", data, position)
        position += 3
        if position + length > len(data):
            raise ProxyHeaderError("PROXY v2 header: TLV longer than the header")
        items.append((kind, data[position : position + length]))
        position += length
    return tuple(items)


# -- outgoing ------------------------------------------------------------------


def _ip_endpoint(address: object) -> tuple[_IP, int] | None:
    """The IP address and port of a Twisted-like address, if it has them."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]), port
    except ValueError:
        return None


_Endpoint = tuple[_IP, int]


def _ip_pair(source: object, destination: object) -> tuple[_Endpoint, _Endpoint] | None:
    """Both endpoints when they are IP addresses of the same family."""
    src, dst = _ip_endpoint(source), _ip_endpoint(destination)
    if src is None or dst is None or src[0].version != dst[0].version:
        return None
    return src, dst


def v1_header(source: object, destination: object) -> bytes:
    """A human-readable v1 header; ``PROXY UNKNOWN`` for non-IP peers."""
    pair = _ip_pair(source, destination)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    (src, src_port), (dst, dst_port) = pair
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {src_port} {dst_port}\r\n".encode("ascii")


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
    (src, src_port), (dst, dst_port) = pair
    family = 0x11 if src.version == 4 else 0x21
    addresses = src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


def proxy_header(
    version: int, source: object, destination: object, info: ClientHelloInfo | None
) -> bytes:
    """The header for ``version`` (1 or 2): the client at ``source`` reached ``destination``."""
    if version == 1:
        return v1_header(source, destination)
    return v2_header(source, destination, info)
