"""Fuzz target: a first flight, raw bytes to ClientHelloInner (RFC 8446 §5.1, RFC 9849 §5-7).

What a client-facing server does with the bytes of a new connection, with
real keys: :class:`~echfront.tls.records.HandshakeReader` reassembles the
ClientHello as :class:`~echfront.front.protocol.FrontProtocol` configures it,
:class:`~echfront.ech.decoder.ECHDecoder` decides and decrypts, and after a
HelloRetryRequest the second ClientHello goes through
:class:`~echfront.ech.decoder.SecondHelloDecoder` as the relay does.

The first input byte picks what the rest is (so one corpus covers every stage;
libFuzzer learns the prefixes from the seeds):

* ``0``: a byte stream from the client, cut into reads whose size the second
  byte gives, decoded by one of three decoders (default, trial decryption,
  ``require_public_name``);
* ``1``: a ClientHello body, framed into one record;
* ``2``: an EncodedClientHelloInner, sealed to the Go-client KAT key inside
  the KAT's ClientHelloOuter with a fixed HPKE ephemeral key (deterministic),
  so the rebuild and inner checks (§5.1, §7.1) see arbitrary *decrypted* bytes;
* ``3``: after an accepted first hello, a second ClientHello stream: its
  EncodedClientHelloInner sealed at sequence 1 with an empty enc (second byte
  odd), or raw records (even).

A finding is any exception other than an :class:`~echfront.errors.AlertError`
subclass, or a broken invariant (AssertionError): nothing dropped or invented
by the reader, its buffer bounded by ``max_first_flight`` plus one record, an
accepted inner never larger than the outer plus the payload (checklist
SEC-2), a payload that opened never taking the rejection path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pyhpke

from tests.fuzz.harness import fuzz_main, instrumented

with instrumented():
    from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus, parse_outer_ech
    from echfront.ech.echconfig import ECHConfig
    from echfront.ech.hpke import RecipientKey
    from echfront.ech.keyset import ECHKey, KeySet, generate_key
    from echfront.errors import AlertError
    from echfront.tls.hello import EXT_ECH, ClientHello, encode_client_hello_body
    from echfront.tls.records import (
        CONTENT_ALERT,
        CONTENT_APPLICATION_DATA,
        CONTENT_CHANGE_CIPHER_SPEC,
        CONTENT_HANDSHAKE,
        DEFAULT_MAX_FLIGHT,
        MAX_CIPHERTEXT,
        HandshakeFlight,
        HandshakeReader,
        frame_records,
    )
    from tests.katouter import seal_into_outer

__all__ = ["seeds", "test_one_input"]

_VECTOR: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "ech-kat-go-client.json").read_text()
)
KAT_RECORD = bytes.fromhex(_VECTOR["record"])
KAT_BODY = KAT_RECORD[9:]
KAT_OUTER = ClientHello.parse(KAT_BODY)
KAT_CONFIG = ECHConfig.decode(bytes.fromhex(_VECTOR["echconfig"]))
KAT_KEY = ECHKey(KAT_CONFIG, RecipientKey(KAT_CONFIG.kem_id, bytes.fromhex(_VECTOR["sk"])))
KAT_ENCODED_INNER = bytes.fromhex(_VECTOR["derived"]["encoded_client_hello_inner"])

#: A key sharing the KAT's config_id that never decrypts it: every hello
#: naming 0x42 tries it first (a failed candidate, DEC-5), then the KAT key.
DECOY = ECHKey(
    ECHConfig(
        KAT_CONFIG.config_id,
        0x0020,
        RecipientKey(0x0020, bytes(range(1, 33))).public_key,
        KAT_CONFIG.cipher_suites,
        0,
        "public.example",
    ),
    RecipientKey(0x0020, bytes(range(1, 33))),
)
#: A post-quantum key under another id, so the X-Wing decapsulation sees
#: arbitrary enc bytes too.
PQ_KEY = generate_key("public.example", kem_id=0x647A, config_id=7)
KEYS = KeySet([DECOY, KAT_KEY, PQ_KEY])
DECODERS = (
    ECHDecoder(KEYS),
    ECHDecoder(KEYS, trial_decryption=True),
    ECHDecoder(KEYS, require_public_name=True),
)

_SUITE = pyhpke.CipherSuite.new(
    pyhpke.KEMId.DHKEM_X25519_HKDF_SHA256, pyhpke.KDFId.HKDF_SHA256, pyhpke.AEADId.AES128_GCM
)
_KAT_PUBLIC = _SUITE.kem.deserialize_public_key(KAT_CONFIG.public_key)
#: A fixed ephemeral key: the same input always seals to the same bytes.
_EPHEMERAL = _SUITE.kem.derive_key_pair(b"echfront fuzz ephemeral key, fixed")

#: The first-flight reader as the front builds it, and the second-hello
#: reader as the relay builds it (CCS, early data and alerts may precede CH2).
FIRST_FLIGHT_LIMIT = DEFAULT_MAX_FLIGHT
SECOND_PASS_TYPES = frozenset((CONTENT_CHANGE_CIPHER_SPEC, CONTENT_APPLICATION_DATA, CONTENT_ALERT))
#: Bound for re-reading what the decoder forwards: a rebuilt inner may be
#: larger than the client's flight (at most outer plus payload, SEC-2).
FORWARD_LIMIT = 3 * FIRST_FLIGHT_LIMIT

MODE_STREAM, MODE_BODY, MODE_INNER, MODE_SECOND = range(4)


def _sender() -> tuple[bytes, Any]:
    enc, context = _SUITE.create_sender_context(_KAT_PUBLIC, info=KAT_KEY.info, eks=_EPHEMERAL)
    return bytes(enc), context


def _records(body: bytes, version: int = 0x0301) -> bytes:
    return frame_records(CONTENT_HANDSHAKE, version, b"\x01" + len(body).to_bytes(3, "big") + body)


def _read(
    data: bytes,
    read_size: int,
    pass_types: frozenset[int] = frozenset(),
    max_bytes: int = FIRST_FLIGHT_LIMIT,
) -> HandshakeFlight | None:
    """Feed ``data`` in reads of ``read_size``; check the reader's invariants."""
    reader = HandshakeReader(1, max_bytes=max_bytes, pass_types=pass_types)
    passed = b""
    for start in range(0, len(data), read_size):
        flight = reader.feed(data[start : start + read_size])
        passed += reader.take_passed()
        fed = data[: start + read_size]
        if flight is not None:
            # Nothing dropped or invented: passed + records + rest is the input.
            assert passed + flight.records + flight.rest == fed
            assert len(flight.records) <= max_bytes
            return flight
        assert len(passed) + reader.buffered == len(fed)
        assert reader.buffered <= max_bytes + 5 + MAX_CIPHERTEXT, reader.buffered
    return None


def _check_info(info: ClientHelloInfo, flight: HandshakeFlight) -> None:
    """What any decoded first hello must satisfy."""
    assert info.rest == flight.rest
    if info.status is ECHStatus.ACCEPTED:
        inner, extension = info.inner, info.outer.get(EXT_ECH)
        assert inner is not None and info.second_hello is not None and extension is not None
        # SEC-2: no amplification toward the backend.
        assert len(inner.body) <= len(info.outer.body) + len(parse_outer_ech(extension).payload)
        # What goes to the backend is one valid ClientHello flight.
        forwarded = _read(info.forward, 2**14 + 5, max_bytes=FORWARD_LIMIT)
        assert forwarded is not None and forwarded.message == inner.message
    else:
        assert info.inner is None and info.second_hello is None
        assert info.forward == flight.records


def test_one_input(data: bytes) -> None:
    """Run one input; raise only on a finding (see the module docstring)."""
    if len(data) < 2:
        return
    mode, knob, rest = data[0] % 4, data[1], data[2:]
    try:
        if mode == MODE_STREAM:
            flight = _read(rest, knob % 97 + 1)
            if flight is not None:
                _check_info(DECODERS[knob % 3].decode(flight), flight)
        elif mode == MODE_BODY:
            flight = _read(_records(data[1:]), 2**14 + 5)
            if flight is not None:
                _check_info(DECODERS[0].decode(flight), flight)
        elif mode == MODE_INNER:
            enc, context = _sender()
            flight = _read(_records(seal_into_outer(context, enc, data[1:])), 2**14 + 5)
            assert flight is not None
            info = DECODERS[0].decode(flight)
            # The payload opened: an alert or acceptance, never the rejection path.
            assert info.status is ECHStatus.ACCEPTED, info.status
            _check_info(info, flight)
        else:
            _second_hello(knob, rest)
    except AlertError:
        pass


def _second_hello(knob: int, rest: bytes) -> None:
    """Mode 3: an accepted first hello, then ``rest`` as (or inside) the second one."""
    enc, context = _sender()
    first = _read(_records(seal_into_outer(context, enc, KAT_ENCODED_INNER)), 2**14 + 5)
    assert first is not None
    info = DECODERS[0].decode(first)
    assert info.status is ECHStatus.ACCEPTED and info.second_hello is not None
    stream = _records(seal_into_outer(context, b"", rest), 0x0303) if knob & 1 else rest
    flight = _read(stream, knob // 2 % 97 + 1, SECOND_PASS_TYPES)
    if flight is not None:
        second = info.second_hello.decode(flight)
        assert second.inner.raw_extension(EXT_ECH) == b"\xfe\x0d\x00\x01\x01"
        forwarded = _read(second.forward, 2**14 + 5, max_bytes=FORWARD_LIMIT)
        assert forwarded is not None and forwarded.message == second.inner.message


def seeds() -> list[bytes]:
    """A starting corpus: the KAT as records, as a body, as an inner; a second hello."""
    enc, context = _sender()
    seal_into_outer(context, enc, KAT_ENCODED_INNER)
    second_body = seal_into_outer(context, b"", KAT_ENCODED_INNER)
    plain = encode_client_hello_body(
        random=bytes(32),
        session_id=bytes(32),
        cipher_suites=[0x1301],
        extensions=[(0, b"\x00\x0e\x00\x00\x0bexample.com"), (0x2B, b"\x02\x03\x04")],
    )
    return [
        bytes((MODE_STREAM, 0)) + KAT_RECORD,
        bytes((MODE_STREAM, 6)) + KAT_RECORD + bytes.fromhex("140303000101"),
        bytes((MODE_STREAM, 1)) + _records(plain),
        bytes((MODE_BODY,)) + KAT_BODY,
        bytes((MODE_INNER,)) + KAT_ENCODED_INNER,
        bytes((MODE_SECOND, 1)) + KAT_ENCODED_INNER,
        bytes((MODE_SECOND, 40)) + bytes.fromhex("140303000101") + _records(second_body, 0x0303),
    ]


if __name__ == "__main__":
    fuzz_main("clienthello", test_one_input, seeds())
    sys.exit(0)
