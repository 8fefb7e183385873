"""PROXY protocol headers (haproxy proxy-protocol.txt): the ECH TLVs sent, and the reader.

The outgoing headers are checked byte for byte; the incoming reader is fed
byte vectors in every fragmentation, v1 and v2, with each refusal it must
make (a connection behind a balancer is dropped rather than taken for TLS
when its header is bad), and reads back what the outgoing builder writes.
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from echfront.ech.decoder import ClientHelloInfo, ECHStatus
from echfront.front.proxyproto import (
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_ECH_CONFIG_ID,
    PP2_TYPE_ECH_STATUS,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    proxy_header,
    v1_header,
    v2_header,
)

SRC4 = IPv4Address("TCP", "192.0.2.7", 40000)
DST4 = IPv4Address("TCP", "198.51.100.1", 443)
SRC6 = IPv6Address("TCP", "2001:db8::7", 40000)
DST6 = IPv6Address("TCP", "2001:db8::1", 443)


def info(name: str | None, status: ECHStatus, config_id: int | None) -> ClientHelloInfo:
    fields: dict[str, Any] = dict.fromkeys(ClientHelloInfo.__dataclass_fields__)
    fields.update(server_name=name, status=status, config_id=config_id, alpn=())
    return ClientHelloInfo(**fields)


def parse_tlvs(data: bytes) -> dict[int, bytes]:
    tlvs = {}
    while data:
        kind, length = struct.unpack("!BH", data[:3])
        tlvs[kind] = data[3 : 3 + length]
        data = data[3 + length :]
    return tlvs


def test_v1() -> None:
    assert v1_header(SRC4, DST4) == b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n"
    assert v1_header(SRC6, DST6) == b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n"
    assert v1_header(UNIXAddress(b"/x"), UNIXAddress(b"/y")) == b"PROXY UNKNOWN\r\n"


def test_v2_ipv4_with_ech_tlvs() -> None:
    header = v2_header(SRC4, DST4, info("secret.example", ECHStatus.ACCEPTED, 7))
    assert header.startswith(V2_SIGNATURE)
    ver_cmd, family, length = struct.unpack("!BBH", header[12:16])
    assert (ver_cmd, family, length) == (0x21, 0x11, len(header) - 16)
    assert header[16:28] == bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 40000, 443)
    assert parse_tlvs(header[28:]) == {
        PP2_TYPE_AUTHORITY: b"secret.example",
        PP2_TYPE_ECH_STATUS: b"\x02",
        PP2_TYPE_ECH_CONFIG_ID: b"\x07",
    }


def test_v2_ipv6_not_offered_has_no_config_id() -> None:
    header = v2_header(SRC6, DST6, info("plain.example", ECHStatus.NOT_OFFERED, None))
    ver_cmd, family, _ = struct.unpack("!BBH", header[12:16])
    assert (ver_cmd, family) == (0x21, 0x21)
    assert parse_tlvs(header[16 + 36 :]) == {
        PP2_TYPE_AUTHORITY: b"plain.example",
        PP2_TYPE_ECH_STATUS: b"\x00",
    }


def test_v2_non_ip_peer_is_local_command_with_tlvs() -> None:
    header = v2_header(UNIXAddress(b"/x"), UNIXAddress(b"/y"), info(None, ECHStatus.REJECTED, 9))
    ver_cmd, family, _ = struct.unpack("!BBH", header[12:16])
    assert (ver_cmd, family) == (0x20, 0x00)
    assert parse_tlvs(header[16:]) == {
        PP2_TYPE_ECH_STATUS: b"\x01",
        PP2_TYPE_ECH_CONFIG_ID: b"\x09",
    }


def test_outgoing_v1_keeps_the_client_port_and_drops_a_scope() -> None:
    scoped = IPv6Address("TCP", "fe80::7%eth0", 40000)
    assert v1_header(scoped, IPv6Address("TCP", "fe80::1%eth0", 443)) == (
        b"PROXY TCP6 fe80::7 fe80::1 40000 443\r\n"
    )
    # Mixed families cannot be said in one header.
    assert v1_header(SRC4, DST6) == b"PROXY UNKNOWN\r\n"


# -- incoming: the sans-IO reader ---------------------------------------------------

TLS = bytes.fromhex("160301")  # what a ClientHello record starts with


def read(
    data: bytes, *, chunk: int | None = None, max_bytes: int = 4096
) -> tuple[ProxyHeader, bytes]:
    """Feed ``data`` in ``chunk``-byte reads; the header and the rest."""
    reader = ProxyHeaderReader(max_bytes)
    size = chunk or len(data)
    for start in range(0, len(data), size):
        done = reader.feed(data[start : start + size])
        if done is not None:
            header, rest = done
            # Whatever came in later reads belongs to the rest as well.
            return header, rest + data[start + size :]
    raise AssertionError("header never completed")


def v2(
    command: int, family: int, body: bytes, *, version: int = 2, length: int | None = None
) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", version << 4 | command, family, size) + body


IPV4_BODY = bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 40000, 443)


def test_v1_tcp4_and_the_bytes_after_it() -> None:
    header, rest = read(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n" + TLS)
    assert header == ProxyHeader(
        1,
        (ipaddress.IPv4Address("192.0.2.7"), 40000),
        (ipaddress.IPv4Address("198.51.100.1"), 443),
    )
    assert rest == TLS


def test_v1_tcp6_byte_at_a_time() -> None:
    line = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n"
    header, rest = read(line + TLS, chunk=1)
    assert header.source == (ipaddress.IPv6Address("2001:db8::7"), 65535)
    assert header.destination == (ipaddress.IPv6Address("2001:db8::1"), 0)
    assert rest == TLS


def test_v1_longest_header_is_accepted() -> None:
    address = "ffff:" * 7 + "ffff"
    line = f"PROXY UNKNOWN {address} {address} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX_LENGTH
    assert read(line + TLS) == (ProxyHeader(1), TLS)
    line = f"PROXY TCP6 {address} {address} 65535 65535\r\n".encode()
    header, rest = read(line, chunk=1)
    assert header.source == (ipaddress.IPv6Address(address), 65535)
    assert rest == b""


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_keeps_the_connection_endpoints(line: bytes) -> None:
    header, rest = read(line + TLS)
    assert header == ProxyHeader(1)
    assert rest == TLS


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (TLS + bytes(200), "no PROXY protocol header"),
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"proxy TCP4 192.0.2.7 198.51.100.1 1 2\r\n", "no PROXY protocol header"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2" + b" " * 80, "longer than 107"),
        (b"PROXY TCP4 2001:db8::7 2001:db8::1 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP4 192.000.2.7 198.51.100.1 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 080 2\r\n", "bad port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n", "bad port"),
        (b"PROXY TCP4 192.0.2.7  198.51.100.1 1 2\r\n", "unknown protocol"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 3\r\n", "unknown protocol"),
        (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n", "unknown protocol"),
        (b"PROXY\r\n", "no PROXY protocol header"),
    ],
)
def test_v1_refusals(data: bytes, problem: str) -> None:
    with pytest.raises(ProxyHeaderError, match=problem):
        read(data, chunk=1)


def test_v1_refused_as_soon_as_the_prefix_differs() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(b"PRO") is None
    with pytest.raises(ProxyHeaderError):
        reader.feed(b"X\x16")


def test_v2_ipv4_with_tlvs_in_every_split() -> None:
    tlvs = b"\x02\x00\x03a.b" + b"\x04\x00\x00"  # AUTHORITY "a.b", then an empty NOOP
    data = v2(1, 0x11, IPV4_BODY + tlvs) + TLS
    for cut in range(1, len(data)):
        reader = ProxyHeaderReader()
        first = reader.feed(data[:cut])
        done = first if first is not None else reader.feed(data[cut:])
        assert done is not None, cut
        header, rest = done
        if first is not None:
            rest += data[cut:]
        assert header.source == (ipaddress.IPv4Address("192.0.2.7"), 40000)
        assert header.destination == (ipaddress.IPv4Address("198.51.100.1"), 443)
        assert header.tlvs == ((0x02, b"a.b"), (0x04, b""))
        assert rest == TLS


def test_v2_ipv6() -> None:
    body = (
        ipaddress.IPv6Address("2001:db8::7").packed
        + ipaddress.IPv6Address("2001:db8::1").packed
        + struct.pack("!HH", 1, 2)
    )
    header, _rest = read(v2(1, 0x21, body))
    assert header.source == (ipaddress.IPv6Address("2001:db8::7"), 1)
    assert header.destination == (ipaddress.IPv6Address("2001:db8::1"), 2)


@pytest.mark.parametrize(
    ("command", "family", "body"),
    [
        (0, 0x11, IPV4_BODY),  # LOCAL: a health check, addresses ignored
        (0, 0x00, b""),
        (1, 0x00, b""),  # PROXY with AF_UNSPEC
        (1, 0x12, IPV4_BODY),  # UDP over IPv4: not this front's
        (1, 0x31, bytes(216)),  # AF_UNIX
    ],
)
def test_v2_that_keeps_the_connection_endpoints(command: int, family: int, body: bytes) -> None:
    header, rest = read(v2(command, family, body) + TLS)
    assert header.source is None and header.destination is None
    assert header.version == 2
    assert rest == TLS


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (v2(1, 0x11, IPV4_BODY, version=1), "version 1"),
        (v2(2, 0x11, IPV4_BODY), "unknown command 2"),
        (v2(1, 0x11, IPV4_BODY[:11]), "address block too short"),
        (v2(1, 0x21, IPV4_BODY), "address block too short"),
        (v2(1, 0x11, IPV4_BODY + b"\x02\x00"), "truncated TLV"),
        (v2(1, 0x11, IPV4_BODY + b"\x02\x00\x09abc"), "TLV longer than the header"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(20), "no PROXY protocol header"),
    ],
)
def test_v2_refusals(data: bytes, problem: str) -> None:
    with pytest.raises(ProxyHeaderError, match=problem):
        read(data, chunk=3)


def test_v2_longer_than_the_bound_is_refused_without_waiting_for_it() -> None:
    reader = ProxyHeaderReader(max_bytes=512)
    # The declared length alone says it is too long; nothing more is read.
    with pytest.raises(ProxyHeaderError, match="too long"):
        reader.feed(v2(1, 0x11, b"", length=600 - 16)[:16])
    # A NOOP TLV filling the header up to exactly the bound.
    noop = b"\x04" + struct.pack("!H", 512 - 16 - 12 - 3)
    longest = v2(1, 0x11, IPV4_BODY + noop + bytes(512 - 16 - 12 - 3))
    assert len(longest) == 512
    assert read(longest, max_bytes=512)[0].source is not None


def test_what_the_front_sends_the_reader_reads() -> None:
    hello = info("secret.example", ECHStatus.ACCEPTED, 7)
    for source, destination in ((SRC4, DST4), (SRC6, DST6)):
        header, rest = read(proxy_header(2, source, destination, hello) + TLS)
        assert rest == TLS
        assert header.source == (ipaddress.ip_address(source.host), source.port)
        assert header.destination == (ipaddress.ip_address(destination.host), destination.port)
        assert dict(header.tlvs)[PP2_TYPE_AUTHORITY] == b"secret.example"
        header, rest = read(proxy_header(1, source, destination, hello) + TLS)
        assert header.source == (ipaddress.ip_address(source.host), source.port)
        assert rest == TLS


def test_the_module_loads_no_twisted() -> None:
    script = (
        "import sys, echfront.front.proxyproto\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
