"""Tests for :mod:`echfront.tls.hello`: ClientHello and ServerHello parsing (RFC 8446 §4.1)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from echfront.errors import DecodeError, IllegalParameter, UnexpectedMessage
from echfront.tls.hello import (
    EXT_ALPN,
    EXT_ECH,
    EXT_KEY_SHARE,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_VERSIONS,
    HRR_RANDOM,
    ClientHello,
    ServerHello,
    encode_alpn,
    encode_client_hello_body,
    encode_extensions,
    encode_server_name,
    encode_supported_versions,
    handshake_message,
    is_grease,
    normalize_server_name,
)

_KAT: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "ech-kat-go-client.json").read_text()
)
KAT_MESSAGE = bytes.fromhex(_KAT["record"])[5:]
KAT_BODY = KAT_MESSAGE[4:]

RANDOM = bytes(range(32))


def sni(*entries: tuple[int, bytes]) -> bytes:
    """server_name extension data holding ``entries`` (name_type, name)."""
    body = b"".join(bytes((t,)) + len(n).to_bytes(2, "big") + n for t, n in entries)
    return len(body).to_bytes(2, "big") + body


def alpn(*names: bytes) -> bytes:
    body = b"".join(bytes((len(n),)) + n for n in names)
    return len(body).to_bytes(2, "big") + body


def versions(*values: int) -> bytes:
    body = b"".join(v.to_bytes(2, "big") for v in values)
    return bytes((len(body),)) + body


def hello(
    extensions: Sequence[tuple[int, bytes]] = (),
    *,
    session_id: bytes = bytes(32),
    suites: Sequence[int] = (0x1301, 0x1302),
) -> ClientHello:
    return ClientHello.parse(
        encode_client_hello_body(
            random=RANDOM, session_id=session_id, cipher_suites=suites, extensions=extensions
        )
    )


# --- the KAT ClientHelloOuter ---------------------------------------------------------------


def test_kat_fields() -> None:
    ch = ClientHello.from_message(KAT_MESSAGE)
    assert ch.body == KAT_BODY
    assert ch.message == KAT_MESSAGE
    assert ch.legacy_version == 0x0303
    assert ch.random == KAT_BODY[2:34]
    assert ch.session_id == bytes.fromhex(
        "6a3833dfd122ba8c59f26895f7e47effdf012cf4bdc710e4c09410d6bf158cee"
    )
    assert ch.cipher_suites == bytes.fromhex("130113021303")
    assert ch.compression_methods == b"\x00"
    assert ch.extensions_offset == 35 + 32 + 2 + 6 + 2 + 2


def test_kat_extension_order_and_offsets() -> None:
    ch = ClientHello.parse(KAT_BODY)
    assert [f"{t:04x}" for t in ch.extension_types] == _KAT["derived"]["outer_extension_order"]
    expected_offset = ch.extensions_offset
    for ext in ch.extensions:
        assert ext.offset == expected_offset + 4
        assert ext.data == KAT_BODY[ext.offset : ext.offset + len(ext.data)]
        assert ext.raw == KAT_BODY[ext.offset - 4 : ext.offset + len(ext.data)]
        assert int.from_bytes(ext.raw[:2], "big") == ext.type
        assert int.from_bytes(ext.raw[2:4], "big") == len(ext.data)
        expected_offset = ext.offset + len(ext.data)
    assert expected_offset == len(KAT_BODY)
    assert b"".join(e.raw for e in ch.extensions) == KAT_BODY[ch.extensions_offset :]


def test_kat_ech_payload_offset() -> None:
    ch = ClientHello.parse(KAT_BODY)
    ech = ch.get(EXT_ECH)
    assert ech is not None
    enc_len = int.from_bytes(ech.data[6:8], "big")
    payload_at = ech.offset + 8 + enc_len + 2
    assert payload_at == _KAT["derived"]["payload_offset_in_client_hello_outer_body"]
    assert KAT_BODY[payload_at:].startswith(
        bytes.fromhex(_KAT["derived"]["ech_client_hello"]["payload"])
    )


def test_kat_decoded_extensions() -> None:
    ch = ClientHello.parse(KAT_BODY)
    assert ch.server_name() == "public.example"
    assert ch.alpn_protocols() == (b"h2", b"http/1.1")
    assert ch.supported_versions() == (0x0304,)
    assert ch.offers_tls13_only()
    assert ch.has_key_share
    assert EXT_ECH in ch
    assert 0xFD00 not in ch
    assert ch.get(0xFD00) is None
    ks = ch.get(EXT_KEY_SHARE)
    assert ks is not None and len(ks.data) == 1258


def test_from_message_errors() -> None:
    with pytest.raises(UnexpectedMessage):
        ClientHello.from_message(b"\x02" + KAT_MESSAGE[1:])
    with pytest.raises(UnexpectedMessage):
        ClientHello.from_message(b"\x01\x00")
    with pytest.raises(DecodeError) as info:
        ClientHello.from_message(KAT_MESSAGE + b"\x00")
    assert info.value.alert == 50
    with pytest.raises(DecodeError):
        ClientHello.from_message(KAT_MESSAGE[:-1])


# --- structure ------------------------------------------------------------------------------


def test_no_extension_block_is_accepted() -> None:
    # A TLS 1.2-era hello may end after legacy_compression_methods.
    body = b"\x03\x03" + RANDOM + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    ch = ClientHello.parse(body)
    assert ch.extensions == ()
    assert ch.extension_types == ()
    assert ch.extensions_offset == len(body)
    assert ch.server_name() is None
    assert ch.alpn_protocols() == ()
    assert ch.supported_versions() is None
    assert not ch.offers_tls13_only()
    assert not ch.has_key_share


def test_empty_extension_block_is_accepted() -> None:
    ch = hello([])
    assert ch.extensions == ()
    assert ch.body.endswith(b"\x00\x00")


def test_every_truncation_is_a_decode_error() -> None:
    ext_block_at = ClientHello.parse(KAT_BODY).extensions_offset - 2
    for cut in range(len(KAT_BODY)):
        if cut == ext_block_at:
            # Ends right after compression methods: a valid extension-less hello.
            assert ClientHello.parse(KAT_BODY[:cut]).extensions == ()
            continue
        with pytest.raises(DecodeError):
            ClientHello.parse(KAT_BODY[:cut])


@pytest.mark.parametrize("trailer", [b"\x00", b"\x00\x00", b"\x00\x00\x00\x00", b"junk"])
def test_trailing_bytes_are_decode_error(trailer: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        ClientHello.parse(KAT_BODY + trailer)
    assert info.value.alert == 50


def test_trailing_bytes_after_compression_is_decode_error() -> None:
    body = b"\x03\x03" + RANDOM + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + b"\x00"
    with pytest.raises(DecodeError):
        ClientHello.parse(body)


@pytest.mark.parametrize("sid_len", [33, 64, 255])
def test_session_id_over_32_is_decode_error(sid_len: int) -> None:
    body = (
        b"\x03\x03"
        + RANDOM
        + bytes((sid_len,))
        + bytes(sid_len)
        + b"\x00\x02\x13\x01\x01\x00\x00\x00"
    )
    with pytest.raises(DecodeError) as info:
        ClientHello.parse(body)
    assert info.value.alert == 50


def test_session_id_of_32_and_0() -> None:
    assert hello(session_id=bytes(32)).session_id == bytes(32)
    assert hello(session_id=b"").session_id == b""


@pytest.mark.parametrize(
    "suites",
    [b"", b"\x13", b"\x13\x01\x13"],
)
def test_bad_cipher_suites_length(suites: bytes) -> None:
    body = (
        b"\x03\x03"
        + RANDOM
        + b"\x00"
        + len(suites).to_bytes(2, "big")
        + suites
        + b"\x01\x00\x00\x00"
    )
    with pytest.raises(DecodeError):
        ClientHello.parse(body)


def test_cipher_suites_length_overrun() -> None:
    body = b"\x03\x03" + RANDOM + b"\x00" + b"\x00\x40\x13\x01" + b"\x01\x00\x00\x00"
    with pytest.raises(DecodeError):
        ClientHello.parse(body)


@pytest.mark.parametrize("compression", [b"\x00", b"\x05\x00\x01"])
def test_bad_compression_methods(compression: bytes) -> None:
    body = b"\x03\x03" + RANDOM + b"\x00" + b"\x00\x02\x13\x01" + compression + b"\x00\x00"
    with pytest.raises(DecodeError):
        ClientHello.parse(body)


def test_extension_block_length_mismatch() -> None:
    body = encode_client_hello_body(
        random=RANDOM, session_id=b"", cipher_suites=[0x1301], extensions=[(0x0017, b"")]
    )
    too_long = body[:-6] + b"\x00\x05" + body[-4:]
    too_short = body[:-6] + b"\x00\x03" + body[-4:]
    for bad in (too_long, too_short):
        with pytest.raises(DecodeError):
            ClientHello.parse(bad)


def test_extension_overrunning_its_block() -> None:
    block = b"\x00\x17\x00\x05\x00"
    body = (
        b"\x03\x03"
        + RANDOM
        + b"\x00\x00\x02\x13\x01\x01\x00"
        + len(block).to_bytes(2, "big")
        + block
    )
    with pytest.raises(DecodeError):
        ClientHello.parse(body)


def test_truncated_extension_header() -> None:
    block = b"\x00\x17\x00\x00\x00\x2b\x00"
    body = (
        b"\x03\x03"
        + RANDOM
        + b"\x00\x00\x02\x13\x01\x01\x00"
        + len(block).to_bytes(2, "big")
        + block
    )
    with pytest.raises(DecodeError):
        ClientHello.parse(body)


@pytest.mark.parametrize("ext_type", [EXT_ECH, EXT_SERVER_NAME, 0x0A0A, EXT_KEY_SHARE])
def test_duplicate_extension_is_decode_error(ext_type: int) -> None:
    with pytest.raises(DecodeError) as info:
        hello([(ext_type, b""), (0x0017, b""), (ext_type, b"\x00")])
    assert info.value.alert == 50


def test_kat_with_a_second_ech_extension_is_decode_error() -> None:
    ch = ClientHello.parse(KAT_BODY)
    ech = ch.get(EXT_ECH)
    assert ech is not None
    exts = [(e.type, e.data) for e in ch.extensions] + [(EXT_ECH, ech.data)]
    with pytest.raises(DecodeError):
        hello(exts)


# --- server_name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"example.com", "example.com"),
        (b"WWW.Example.COM", "www.example.com"),
        (b"Secret.EXAMPLE.org", "secret.example.org"),
        (b"a", "a"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"_acme-challenge.example", "_acme-challenge.example"),
        (b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 61, None),
    ],
)
def test_server_name_lower_cased(raw: bytes, expected: str | None) -> None:
    ch = hello([(EXT_SERVER_NAME, sni((0, raw)))])
    assert ch.server_name() == (expected if expected is not None else raw.decode())


def test_server_name_missing() -> None:
    assert hello([(0x0017, b"")]).server_name() is None


def test_server_name_only_other_name_types() -> None:
    assert hello([(EXT_SERVER_NAME, sni((1, b"opaque")))]).server_name() is None


def test_server_name_with_other_name_type_first() -> None:
    ch = hello([(EXT_SERVER_NAME, sni((7, b"x"), (0, b"Host.Example")))])
    assert ch.server_name() == "host.example"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x00\x00",  # empty list
        b"\x00\x05\x00\x00\x01a",  # list length too long
        b"\x00\x03\x00\x00\x01a",  # list length too short
        b"\x00\x02\x00\x00",  # truncated entry header
        b"\x00\x03\x00\x00\x00",  # zero-length name
        b"\x00\x04\x00\x00\x05a",  # name overruns the list
        sni((0, b"example.com")) + b"\x00",  # trailing byte
    ],
)
def test_server_name_malformed_lengths(data: bytes) -> None:
    ch = hello([(EXT_SERVER_NAME, data)])
    with pytest.raises(DecodeError) as info:
        ch.server_name()
    assert info.value.alert == 50


def test_two_host_names_is_illegal_parameter() -> None:
    ch = hello([(EXT_SERVER_NAME, sni((0, b"a.example"), (0, b"b.example")))])
    with pytest.raises(IllegalParameter) as info:
        ch.server_name()
    assert info.value.alert == 47


@pytest.mark.parametrize(
    "raw",
    [
        b"a..b",
        b"x.",
        b".x",
        b".",
        b"bad name",
        "bücher.example".encode(),
        "例え.jp".encode(),
        b"a\x00b",
        b"a/b",
        b"a:443",
        b"a\nb",
        b"x" * 254,
    ],
)
def test_invalid_server_names_are_illegal_parameter(raw: bytes) -> None:
    ch = hello([(EXT_SERVER_NAME, sni((0, raw)))])
    with pytest.raises(IllegalParameter) as info:
        ch.server_name()
    assert info.value.alert == 47


def test_normalize_server_name_directly() -> None:
    assert normalize_server_name(b"EXAMPLE.com") == "example.com"
    assert normalize_server_name(b"x" * 253) == "x" * 253
    for bad in (b"", b"x" * 254, b"a..b", b"a.", b"\xff"):
        with pytest.raises(IllegalParameter):
            normalize_server_name(bad)


# --- ALPN -----------------------------------------------------------------------------------


def test_alpn_protocols() -> None:
    ch = hello([(EXT_ALPN, alpn(b"h2", b"http/1.1", b"\xff" * 255))])
    assert ch.alpn_protocols() == (b"h2", b"http/1.1", b"\xff" * 255)


def test_alpn_missing() -> None:
    assert hello().alpn_protocols() == ()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",  # empty list
        b"\x00\x01\x00",  # a zero-length name
        b"\x00\x03\x02h2\x00",  # list length too short
        b"\x00\x04\x02h2",  # list length too long
        b"\x00\x03\x05h2",  # name overruns
        alpn(b"h2") + b"\x00",
        b"\x00\x04\x02h2\x00",  # zero-length second name
    ],
)
def test_alpn_malformed(data: bytes) -> None:
    ch = hello([(EXT_ALPN, data)])
    with pytest.raises(DecodeError) as info:
        ch.alpn_protocols()
    assert info.value.alert == 50


# --- supported_versions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "tls13_only"),
    [
        ((0x0304,), True),
        ((0x0A0A, 0x0304), True),
        ((0x0304, 0xFAFA), True),
        ((0x3A3A, 0x0304, 0x0305), True),
        ((0x0304, 0x0303), False),
        ((0x0A0A, 0x0304, 0x0303), False),
        ((0x0303,), False),
        ((0x0A0A,), False),
        ((0x0A0A, 0x1A1A), False),
        ((0x0304, 0x0301), False),
        ((0x7F1C, 0x0304), True),  # draft version above 1.3 numerically
        ((0x0302, 0x0304), False),
    ],
)
def test_supported_versions_and_tls13_only(offered: tuple[int, ...], tls13_only: bool) -> None:
    ch = hello([(EXT_SUPPORTED_VERSIONS, versions(*offered))])
    assert ch.supported_versions() == offered
    assert ch.offers_tls13_only() is tls13_only


def test_supported_versions_absent() -> None:
    ch = hello([(EXT_KEY_SHARE, b"\x00\x00")])
    assert ch.supported_versions() is None
    assert not ch.offers_tls13_only()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x01\x03",
        b"\x02\x03\x04\x03",
        b"\x04\x03\x04",
        b"\x03\x03\x04\x03",
        b"\x02\x03",
    ],
)
def test_supported_versions_malformed(data: bytes) -> None:
    ch = hello([(EXT_SUPPORTED_VERSIONS, data)])
    with pytest.raises(DecodeError):
        ch.supported_versions()
    with pytest.raises(DecodeError):
        ch.offers_tls13_only()


# --- encoding -------------------------------------------------------------------------------


def test_encode_parse_round_trip() -> None:
    exts = [
        (EXT_SERVER_NAME, sni((0, b"example.com"))),
        (0x1A1A, b""),
        (EXT_ALPN, alpn(b"h2")),
        (EXT_SUPPORTED_VERSIONS, versions(0x0304)),
        (EXT_KEY_SHARE, bytes(38)),
    ]
    body = encode_client_hello_body(
        random=RANDOM,
        session_id=b"\x07" * 32,
        cipher_suites=[0x1301, 0x1303],
        extensions=exts,
        legacy_version=0x0303,
        compression_methods=b"\x00",
    )
    ch = ClientHello.parse(body)
    assert ch.body == body
    assert ch.random == RANDOM
    assert ch.session_id == b"\x07" * 32
    assert ch.cipher_suites == bytes.fromhex("13011303")
    assert [(e.type, e.data) for e in ch.extensions] == exts
    assert ch.message == handshake_message(1, body)
    again = encode_client_hello_body(
        random=ch.random,
        session_id=ch.session_id,
        cipher_suites=ch.cipher_suites,
        extensions=[(e.type, e.data) for e in ch.extensions],
        legacy_version=ch.legacy_version,
        compression_methods=ch.compression_methods,
    )
    assert again == body


def test_kat_re_encodes_byte_exactly() -> None:
    ch = ClientHello.parse(KAT_BODY)
    body = encode_client_hello_body(
        random=ch.random,
        session_id=ch.session_id,
        cipher_suites=ch.cipher_suites,
        extensions=[(e.type, e.data) for e in ch.extensions],
        legacy_version=ch.legacy_version,
        compression_methods=ch.compression_methods,
    )
    assert body == KAT_BODY


def test_encode_extensions_and_handshake_message() -> None:
    assert encode_extensions([]) == b"\x00\x00"
    assert encode_extensions([(0xFE0D, b"\x01"), (0, b"")]) == bytes.fromhex(
        "0009fe0d0001010000 0000".replace(" ", "")
    )
    assert handshake_message(2, b"abc") == b"\x02\x00\x00\x03abc"
    assert handshake_message(1, bytes(0x10000))[:4] == b"\x01\x01\x00\x00"


# --- ServerHello / HelloRetryRequest --------------------------------------------------------


def server_hello_body(
    random: bytes = RANDOM,
    exts: bytes | None = b"\x00\x06\x00\x2b\x00\x02\x03\x04",
    sid: bytes = bytes(32),
) -> bytes:
    body = b"\x03\x03" + random + bytes((len(sid),)) + sid + b"\x13\x01\x00"
    return body if exts is None else body + exts


def test_server_hello_fields() -> None:
    body = server_hello_body()
    sh = ServerHello.from_message(handshake_message(2, body))
    assert sh.body == body
    assert sh.legacy_version == 0x0303
    assert sh.random == RANDOM
    assert sh.session_id == bytes(32)
    assert sh.cipher_suite == 0x1301
    assert sh.extension_types == (EXT_SUPPORTED_VERSIONS,)
    assert EXT_SUPPORTED_VERSIONS in sh
    assert not sh.is_hello_retry_request


def test_hello_retry_request_detected() -> None:
    assert HRR_RANDOM.hex() == "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
    ech_hrr = b"\x00\x0c\xfe\x0d\x00\x08" + bytes(8)
    sh = ServerHello.from_message(handshake_message(2, server_hello_body(HRR_RANDOM, ech_hrr)))
    assert sh.is_hello_retry_request
    ext = sh.get(EXT_ECH)
    assert ext is not None and ext.data == bytes(8)
    # One bit away from the HRR random is an ordinary ServerHello.
    near = bytes((HRR_RANDOM[0] ^ 1,)) + HRR_RANDOM[1:]
    assert not ServerHello.from_message(
        handshake_message(2, server_hello_body(near))
    ).is_hello_retry_request


def test_server_hello_without_extensions() -> None:
    sh = ServerHello.from_message(handshake_message(2, server_hello_body(exts=None, sid=b"")))
    assert sh.extensions == ()
    assert sh.session_id == b""


@pytest.mark.parametrize(
    "message",
    [
        handshake_message(2, server_hello_body()[:37]),  # too short
        handshake_message(2, server_hello_body(sid=bytes(33))),  # session id > 32
        handshake_message(2, server_hello_body(exts=b"\x00")),  # truncated ext length
        handshake_message(2, server_hello_body(exts=b"\x00\x05\x00\x2b\x00\x02\x03\x04")),
        handshake_message(2, server_hello_body(exts=b"\x00\x08\x00\x2b\x00\x02\x03\x04\x00\x00")),
        handshake_message(2, server_hello_body(exts=b"\x00\x08\x00\x2b\x00\x00\x00\x2b\x00\x00")),
        handshake_message(2, server_hello_body()) + b"\x00",  # header length mismatch
    ],
)
def test_server_hello_decode_errors(message: bytes) -> None:
    with pytest.raises(DecodeError):
        ServerHello.from_message(message)


def test_server_hello_wrong_type() -> None:
    with pytest.raises(UnexpectedMessage):
        ServerHello.from_message(handshake_message(1, server_hello_body()))
    with pytest.raises(UnexpectedMessage):
        ServerHello.from_message(b"")


def test_every_server_hello_truncation_is_a_decode_error() -> None:
    body = server_hello_body()
    no_ext_end = len(body) - 8
    for cut in range(len(body)):
        message = handshake_message(2, body[:cut])
        if cut == no_ext_end:
            assert ServerHello.from_message(message).extensions == ()
            continue
        with pytest.raises(DecodeError):
            ServerHello.from_message(message)


# --- GREASE ---------------------------------------------------------------------------------


def test_is_grease_exhaustive() -> None:
    grease = {v for v in range(0x10000) if is_grease(v)}
    assert grease == {0x0A0A + 0x1010 * i for i in range(16)}


@pytest.mark.parametrize("value", [0x0A0A, 0x1A1A, 0x7A7A, 0x8A8A, 0xFAFA])
def test_is_grease_examples(value: int) -> None:
    assert is_grease(value)


@pytest.mark.parametrize("value", [0x0000, 0x0A1A, 0x1A0A, 0x0A0B, 0xFE0D, 0x0304, 0xABAB, 0x0B0B])
def test_is_not_grease(value: int) -> None:
    assert not is_grease(value)


def test_extension_encoders_are_what_the_parser_reads() -> None:
    """encode_server_name, encode_alpn and encode_supported_versions (RFC 6066, 7301, 8446)."""
    body = encode_client_hello_body(
        random=bytes(32),
        session_id=b"",
        cipher_suites=[0x1301],
        extensions=[
            (EXT_SERVER_NAME, encode_server_name(b"a.example")),
            (EXT_ALPN, encode_alpn([b"h2", b"http/1.1"])),
            (EXT_SUPPORTED_VERSIONS, encode_supported_versions([0x0304, 0x0303])),
        ],
    )
    hello = ClientHello.parse(body)
    assert hello.server_name() == "a.example"
    assert hello.alpn_protocols() == (b"h2", b"http/1.1")
    assert hello.supported_versions() == (0x0304, 0x0303)
    assert encode_server_name(b"a.example") == b"\x00\x0c\x00\x00\x09a.example"
