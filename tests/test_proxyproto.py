"""PROXY protocol headers (haproxy proxy-protocol.txt) with the ECH TLVs."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from echfront.ech.decoder import ClientHelloInfo, ECHStatus
from echfront.front.proxyproto import (
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_ECH_CONFIG_ID,
    PP2_TYPE_ECH_STATUS,
    V2_SIGNATURE,
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
