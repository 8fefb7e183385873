"""Bounded fuzzing of the sans-IO parsers with hypothesis.

The property everywhere: bytes from the network raise only
:class:`echfront.errors.AlertError` subclasses, bytes from local files only
:class:`echfront.errors.ConfigError`, never anything else, and no input
makes a parser hang (each example has a 2 s deadline).

Inputs are arbitrary bytes and mutations (bit flips, truncations, insertions,
deletions, corrupted length fields) of the Go-client known-answer ClientHello.
For the decoder, mutated EncodedClientHelloInner bytes are re-sealed to the
KAT key with a pyhpke sender context, so that :func:`rebuild_inner` and the
inner checks see arbitrary *decrypted* bytes, not only failed opens.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyhpke
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echfront.ech.decoder import ECHDecoder, ECHStatus, SecondHello, rebuild_inner
from echfront.ech.echconfig import ECHConfig, decode_config_list, parse_config_list_text
from echfront.ech.hpke import RecipientKey
from echfront.ech.keyset import ECHKey, KeySet, generate_key
from echfront.errors import AlertError, ConfigError
from echfront.keys.keyfile import dump_pem, load_pem
from echfront.tls.hello import (
    EXT_ALPN,
    EXT_ECH,
    EXT_ECH_OUTER_EXTENSIONS,
    EXT_KEY_SHARE,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_VERSIONS,
    ClientHello,
    encode_client_hello_body,
    handshake_message,
)
from echfront.tls.records import HandshakeFlight, HandshakeReader, frame_records
from tests.katouter import seal_into_outer

_KAT: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "ech-kat-go-client.json").read_text()
)
KAT_RECORD = bytes.fromhex(_KAT["record"])
KAT_MESSAGE = KAT_RECORD[5:]
KAT_BODY = KAT_MESSAGE[4:]
KAT_OUTER = ClientHello.parse(KAT_BODY)
KAT_SK = bytes.fromhex(_KAT["sk"])
KAT_CONFIG = ECHConfig.decode(bytes.fromhex(_KAT["echconfig"]))
KAT_ENCODED_INNER = bytes.fromhex(_KAT["derived"]["encoded_client_hello_inner"])
KAT_INNER_UNPADDED = KAT_ENCODED_INNER[
    : -_KAT["expected"]["encoded_client_hello_inner_padding_len"]
]
#: The KAT key, loaded through an RFC 9934 file as the front would load it.
(KAT_KEY,) = load_pem(
    dump_pem([ECHKey(KAT_CONFIG, RecipientKey(KAT_CONFIG.kem_id, KAT_SK))]), source="kat.pem"
)
#: A second key with the KAT's config_id that never decrypts: every decode
#: with config_id 0x42 tries it first (checklist DEC-5: failed candidate, go on).
DECOY = generate_key("public.example", config_id=KAT_CONFIG.config_id)
KEYS = KeySet([DECOY, KAT_KEY])
DECODERS = (
    ECHDecoder(KEYS),
    ECHDecoder(KEYS, trial_decryption=True),
    ECHDecoder(KEYS, require_public_name=True),
)

SUITE = pyhpke.CipherSuite.new(
    pyhpke.KEMId.DHKEM_X25519_HKDF_SHA256, pyhpke.KDFId.HKDF_SHA256, pyhpke.AEADId.AES128_GCM
)
KAT_PUBLIC = SUITE.kem.deserialize_public_key(KAT_CONFIG.public_key)

FUZZ = settings(
    max_examples=500,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SLOW = settings(FUZZ, max_examples=300)


# --- mutation strategies ----------------------------------------------------------------------


def length_fields(body: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every length field of a parsed ClientHello body."""
    ch = ClientHello.parse(body)
    cs_at = 35 + len(ch.session_id)
    fields = [(34, 1), (cs_at, 2), (cs_at + 2 + len(ch.cipher_suites), 1)]
    if ch.extensions:
        fields.append((ch.extensions_offset - 2, 2))
    for ext in ch.extensions:
        at = ext.offset
        fields.append((at - 2, 2))
        if ext.type == EXT_SERVER_NAME and len(ext.data) >= 5:
            fields += [(at, 2), (at + 3, 2)]
        elif ext.type == EXT_ALPN and len(ext.data) >= 3:
            fields += [(at, 2), (at + 2, 1)]
        elif ext.type in (EXT_SUPPORTED_VERSIONS, EXT_ECH_OUTER_EXTENSIONS) and ext.data:
            fields.append((at, 1))
        elif ext.type == EXT_ECH and len(ext.data) >= 10:
            enc_len = int.from_bytes(ext.data[6:8], "big")
            fields += [(at + 6, 2), (at + 8 + enc_len, 2)]
        elif ext.type == EXT_KEY_SHARE and len(ext.data) >= 2:
            fields.append((at, 2))
            pos = at + 2
            while pos + 4 <= at + len(ext.data):
                fields.append((pos + 2, 2))
                pos += 4 + int.from_bytes(body[pos + 2 : pos + 4], "big")
    return fields


OUTER_LENGTH_FIELDS = length_fields(KAT_BODY)
INNER_LENGTH_FIELDS = length_fields(KAT_INNER_UNPADDED)


def mutations(data: bytes, fields: Sequence[tuple[int, int]]) -> st.SearchStrategy[bytes]:
    """Strategy: ``data`` with one to three random mutations applied."""

    @st.composite
    def one(draw: st.DrawFn, current: bytes) -> bytes:
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "length", "insert", "delete"]))
        if not current:
            return draw(st.binary(max_size=8))
        pos = draw(st.integers(0, len(current) - 1))
        if kind == "flip":
            bit = draw(st.integers(0, 7))
            return current[:pos] + bytes((current[pos] ^ (1 << bit),)) + current[pos + 1 :]
        if kind == "byte":
            return current[:pos] + bytes((draw(st.integers(0, 255)),)) + current[pos + 1 :]
        if kind == "truncate":
            return current[:pos]
        if kind == "insert":
            return current[:pos] + draw(st.binary(min_size=1, max_size=40)) + current[pos:]
        if kind == "delete":
            return current[:pos] + current[pos + draw(st.integers(1, 40)) :]
        at, width = draw(st.sampled_from(fields))
        if at + width > len(current):
            return current[:at]
        old = int.from_bytes(current[at : at + width], "big")
        top = (1 << (8 * width)) - 1
        new = draw(
            st.one_of(
                st.sampled_from([0, 1, top, max(old - 1, 0), min(old + 1, top)]),
                st.integers(0, top),
            )
        )
        return current[:at] + new.to_bytes(width, "big") + current[at + width :]

    @st.composite
    def several(draw: st.DrawFn) -> bytes:
        current = data
        for _ in range(draw(st.integers(1, 3))):
            current = draw(one(current))
        return current

    return several()


mutated_outer_bodies = mutations(KAT_BODY, OUTER_LENGTH_FIELDS)
mutated_inners = st.one_of(
    mutations(KAT_ENCODED_INNER, INNER_LENGTH_FIELDS),
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda tail: KAT_INNER_UNPADDED[:87] + tail),
)


def only(allowed: type[Exception], call: Callable[[], object]) -> None:
    """Run ``call``; an exception it raises must be an ``allowed``."""
    with contextlib.suppress(allowed):
        call()


# --- HandshakeReader ------------------------------------------------------------------------

reader_settings = st.fixed_dictionaries(
    {
        "message_type": st.sampled_from([1, 2]),
        "max_bytes": st.sampled_from([64, 1000, 2000, 65536]),
        "pass_types": st.sampled_from([frozenset(), frozenset((20,)), frozenset((20, 23))]),
        "require_boundary": st.booleans(),
    }
)


@st.composite
def record_streams(draw: st.DrawFn) -> bytes:
    """Sequences of plausible records: right or wrong types, versions, lengths."""
    out = b""
    for _ in range(draw(st.integers(1, 8))):
        content_type = draw(st.sampled_from([20, 21, 22, 22, 22, 23, 0, 24, 0x47]))
        version = draw(
            st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x00", b"\x02\x00", b"\xfe\xfd"])
        )
        payload = draw(
            st.one_of(
                st.binary(max_size=60),
                st.builds(
                    lambda t, n, tail: bytes((t,)) + n.to_bytes(3, "big") + tail,
                    st.sampled_from([1, 2, 11]),
                    st.integers(0, 300),
                    st.binary(max_size=60),
                ),
            )
        )
        length = draw(st.one_of(st.just(len(payload)), st.integers(0, 0xFFFF)))
        out += bytes((content_type,)) + version + length.to_bytes(2, "big") + payload
    return out


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def check_reader(options: dict[str, Any], data: bytes, points: list[int]) -> None:
    reader = HandshakeReader(**options)
    fed = b""
    passed = b""
    limit = options["max_bytes"] + 5 + 2**14 + 256
    try:
        for piece in cuts(data, points):
            fed += piece
            flight = reader.feed(piece)
            passed += reader.take_passed()
            if flight is not None:
                # Nothing is dropped or invented: passed + records + rest == input.
                assert passed + flight.records + flight.rest == fed
                assert len(flight.records) <= options["max_bytes"]
                assert flight.message[0] == options["message_type"]
                assert int.from_bytes(flight.message[1:4], "big") == len(flight.message) - 4
                return
            assert len(passed) + reader.buffered == len(fed)
            assert reader.buffered <= limit
    except AlertError:
        pass


@FUZZ
@given(reader_settings, st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=20))
def test_reader_arbitrary_bytes(options: dict[str, Any], data: bytes, points: list[int]) -> None:
    check_reader(options, data, points)


@FUZZ
@given(reader_settings, record_streams(), st.lists(st.integers(0, 3000), max_size=20))
def test_reader_record_streams(options: dict[str, Any], data: bytes, points: list[int]) -> None:
    check_reader(options, data, points)


mutated_kat_streams = st.one_of(
    # The KAT record as received, record and handshake lengths included.
    mutations(KAT_RECORD, [(3, 2), (6, 3)]),
    # A mutated ClientHello re-framed in records of various sizes.
    st.builds(
        lambda size, message: frame_records(22, 0x0301, message, size),
        st.sampled_from([1, 7, 100, 2**14]),
        mutations(KAT_MESSAGE, [(1, 3)]),
    ),
)


@FUZZ
@given(reader_settings, mutated_kat_streams, st.lists(st.integers(0, 3000), max_size=10))
def test_reader_mutated_kat(options: dict[str, Any], data: bytes, points: list[int]) -> None:
    check_reader(options | {"max_bytes": 65536}, data + bytes.fromhex("140303000101"), points)


# --- ClientHello ----------------------------------------------------------------------------


def exercise_client_hello(body: bytes) -> None:
    try:
        ch = ClientHello.parse(body)
    except AlertError:
        return
    assert ch.body == body
    for ext in ch.extensions:
        assert ext.data == body[ext.offset : ext.offset + len(ext.data)]
        assert ext.raw == body[ext.offset - 4 : ext.offset + len(ext.data)]
    for method in (ch.server_name, ch.alpn_protocols, ch.supported_versions, ch.offers_tls13_only):
        only(AlertError, method)
    only(AlertError, lambda: ClientHello.from_message(handshake_message(1, body)))


@FUZZ
@given(st.binary(max_size=2000))
def test_client_hello_arbitrary_bytes(body: bytes) -> None:
    exercise_client_hello(body)


@st.composite
def hello_like(draw: st.DrawFn) -> bytes:
    """Bodies with a valid prefix and a random extension block."""
    exts = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        EXT_SERVER_NAME,
                        EXT_ALPN,
                        EXT_SUPPORTED_VERSIONS,
                        EXT_KEY_SHARE,
                        EXT_ECH,
                        0x0A0A,
                    ]
                ),
                st.binary(max_size=40),
            ),
            max_size=6,
        )
    )
    return encode_client_hello_body(
        random=bytes(32),
        session_id=draw(st.binary(max_size=32)),
        cipher_suites=[0x1301],
        extensions=exts,
    )


@FUZZ
@given(hello_like())
def test_client_hello_random_extensions(body: bytes) -> None:
    exercise_client_hello(body)


@FUZZ
@given(mutated_outer_bodies)
def test_client_hello_mutated_kat(body: bytes) -> None:
    exercise_client_hello(body)


# --- ECHDecoder -----------------------------------------------------------------------------


def flight_of(message: bytes) -> HandshakeFlight:
    return HandshakeFlight(message, frame_records(22, 0x0301, message), 0x0301, b"")


def test_kat_is_accepted_by_every_decoder() -> None:
    for decoder in DECODERS:
        info = decoder.decode(flight_of(KAT_MESSAGE))
        assert info.status is ECHStatus.ACCEPTED
        assert info.server_name == "secret.example.org"
        assert info.key is KAT_KEY


@FUZZ_SLOW
@given(st.sampled_from(DECODERS), mutated_outer_bodies, st.booleans())
def test_decoder_mutated_outer(decoder: ECHDecoder, body: bytes, bad_header: bool) -> None:
    message = handshake_message(1, body)
    if bad_header:
        message = message[:3] + bytes((message[3] ^ 1,)) + message[4:]
    try:
        info = decoder.decode(flight_of(message))
    except AlertError:
        return
    assert info.status in (ECHStatus.ACCEPTED, ECHStatus.REJECTED, ECHStatus.NOT_OFFERED)
    if info.status is ECHStatus.ACCEPTED:
        # AAD-1: any change to the outer body makes the open fail.
        assert body == KAT_BODY
    else:
        assert info.forward == flight_of(message).records


@FUZZ_SLOW
@given(mutated_kat_streams, st.lists(st.integers(0, 3000), max_size=10))
def test_reader_then_decoder(data: bytes, points: list[int]) -> None:
    # The whole first-flight pipeline on mutated records: reassemble, then decode.
    reader = HandshakeReader(1, pass_types=frozenset((20, 23)))
    try:
        for piece in cuts(data + bytes.fromhex("140303000101"), points):
            flight = reader.feed(piece)
            if flight is not None:
                info = DECODERS[0].decode(flight)
                assert info.rest == flight.rest
                return
    except AlertError:
        pass


@FUZZ
@given(st.sampled_from(DECODERS), st.binary(max_size=1500))
def test_decoder_arbitrary_message(decoder: ECHDecoder, body: bytes) -> None:
    only(AlertError, lambda: decoder.decode(flight_of(handshake_message(1, body))))


def sender() -> tuple[bytes, Any]:
    enc, context = SUITE.create_sender_context(KAT_PUBLIC, info=KAT_KEY.info)
    return bytes(enc), context


def test_resealed_kat_inner_is_accepted() -> None:
    enc, context = sender()
    body = seal_into_outer(context, enc, KAT_ENCODED_INNER)
    info = ECHDecoder(KEYS).decode(flight_of(handshake_message(1, body)))
    assert info.status is ECHStatus.ACCEPTED
    assert info.inner is not None
    assert len(info.inner.message) == _KAT["expected"]["client_hello_inner_message_len"]


@FUZZ_SLOW
@given(mutated_inners)
def test_decoder_resealed_mutated_inner(encoded: bytes) -> None:
    # The payload always opens, so the outcome is ACCEPTED or an alert: never
    # REJECTED (that would hide a broken rebuild), never another exception.
    enc, context = sender()
    body = seal_into_outer(context, enc, encoded)
    message = handshake_message(1, body)
    try:
        info = ECHDecoder(KEYS).decode(flight_of(message))
    except AlertError:
        return
    assert info.status is ECHStatus.ACCEPTED
    inner = info.inner
    assert inner is not None
    ech = inner.get(EXT_ECH)
    assert ech is not None and ech.data == b"\x01"
    assert inner.offers_tls13_only()
    assert EXT_ECH_OUTER_EXTENSIONS not in inner
    # SEC-2: no amplification; the rebuilt hello fits in the outer plus payload.
    assert len(inner.body) <= len(body) + len(encoded)
    flight = HandshakeReader(1).feed(info.forward)
    assert flight is not None and flight.message == inner.message


@FUZZ
@given(mutated_inners)
def test_rebuild_inner_arbitrary(encoded: bytes) -> None:
    try:
        message, hello = rebuild_inner(KAT_OUTER, encoded)
    except AlertError:
        return
    # The index built during the rebuild is the one a fresh parse finds.
    reparsed = ClientHello.parse(message[4:])
    assert hello.extension_types == reparsed.extension_types
    assert hello.extension_bounds == reparsed.extension_bounds
    assert hello.extensions == reparsed.extensions
    assert message[0] == 1
    assert int.from_bytes(message[1:4], "big") == len(message) - 4
    assert message[4 + 35 : 4 + 35 + 32] == KAT_OUTER.session_id


@FUZZ_SLOW
@given(mutated_inners, st.booleans())
def test_second_hello_resealed_mutated_inner(encoded: bytes, keep_enc: bool) -> None:
    # CH1 is the KAT inner (accepted); CH2 carries arbitrary inner bytes sealed
    # at sequence 1 on the same context, as after a HelloRetryRequest.
    enc, context = sender()
    first = ECHDecoder(KEYS).decode(
        flight_of(handshake_message(1, seal_into_outer(context, enc, KAT_ENCODED_INNER)))
    )
    assert first.status is ECHStatus.ACCEPTED and first.second_hello is not None
    second_body = seal_into_outer(context, enc if keep_enc else b"", encoded)
    try:
        result = first.second_hello.decode(flight_of(handshake_message(1, second_body)))
    except AlertError:
        return
    assert not keep_enc
    assert isinstance(result, SecondHello)
    ech = result.inner.get(EXT_ECH)
    assert ech is not None and ech.data == b"\x01"


@FUZZ_SLOW
@given(st.data())
def test_second_hello_mutated_outer(data: st.DataObject) -> None:
    # A valid second ClientHelloOuter (empty enc, KAT inner sealed at
    # sequence 1), then mutated: only alerts, and any change is caught.
    enc, context = sender()
    first_body = seal_into_outer(context, enc, KAT_ENCODED_INNER)
    first = ECHDecoder(KEYS).decode(flight_of(handshake_message(1, first_body)))
    second = first.second_hello
    assert second is not None
    valid = seal_into_outer(context, b"", KAT_ENCODED_INNER)
    body = data.draw(mutations(valid, length_fields(valid)))
    try:
        result = second.decode(flight_of(handshake_message(1, body)))
    except AlertError:
        return
    assert body == valid
    assert result.inner.server_name() == "secret.example.org"


def test_second_hello_valid() -> None:
    enc, context = sender()
    first = ECHDecoder(KEYS).decode(
        flight_of(handshake_message(1, seal_into_outer(context, enc, KAT_ENCODED_INNER)))
    )
    assert first.second_hello is not None
    second = first.second_hello.decode(
        flight_of(handshake_message(1, seal_into_outer(context, b"", KAT_ENCODED_INNER)))
    )
    assert second.inner.server_name() == "secret.example.org"


# --- ECHConfigList and key files ------------------------------------------------------------

KAT_LIST = bytes.fromhex(_KAT["echconfiglist"])


@FUZZ
@given(st.binary(max_size=600))
def test_decode_config_list_arbitrary(data: bytes) -> None:
    only(ConfigError, lambda: decode_config_list(data))
    only(ConfigError, lambda: ECHConfig.decode(data))
    only(ConfigError, lambda: ECHConfig.decode_contents(data))


def config_list_length_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of the length fields of an ECHConfigList of KAT-shaped configs."""
    fields = [(0, 2)]
    pos = 2
    while pos < len(data):
        pk_at = pos + 4 + 1 + 2
        cs_at = pk_at + 2 + int.from_bytes(data[pk_at : pk_at + 2], "big")
        pn_at = cs_at + 2 + int.from_bytes(data[cs_at : cs_at + 2], "big") + 1
        ext_at = pn_at + 1 + data[pn_at]
        fields += [(pos, 2), (pos + 2, 2), (pk_at, 2), (cs_at, 2), (pn_at, 1), (ext_at, 2)]
        pos += 4 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return fields


TWO_CONFIGS = (2 * (len(KAT_LIST) - 2)).to_bytes(2, "big") + KAT_LIST[2:] + KAT_LIST[2:]


@FUZZ
@given(mutations(TWO_CONFIGS, config_list_length_fields(TWO_CONFIGS)), st.booleans())
def test_decode_config_list_mutated(data: bytes, fix_list_length: bool) -> None:
    if fix_list_length and len(data) >= 2:
        data = (len(data) - 2).to_bytes(2, "big") + data[2:]
    only(ConfigError, lambda: decode_config_list(data))


@FUZZ
@given(st.text(max_size=300))
def test_parse_config_list_text_arbitrary(text: str) -> None:
    only(ConfigError, lambda: parse_config_list_text(text))


GOOD_PEM = dump_pem([generate_key("public.example")])
LABELS = ["PRIVATE KEY", "ECHCONFIG", "ENCRYPTED PRIVATE KEY", "CERTIFICATE", "EC PRIVATE KEY", "X"]


@st.composite
def der_like(draw: st.DrawFn) -> bytes:
    """PKCS#8-shaped DER with a random algorithm OID and key."""
    oid = draw(
        st.one_of(
            st.just(bytes.fromhex("2b656e")),
            st.just(bytes.fromhex("2b6570")),
            st.binary(min_size=1, max_size=12),
        )
    )
    key = draw(st.binary(max_size=40))
    algorithm = b"\x06" + bytes((len(oid),)) + oid
    algorithm = b"\x30" + bytes((len(algorithm),)) + algorithm
    inner = b"\x04" + bytes((len(key),)) + key
    octet = b"\x04" + bytes((len(inner),)) + inner
    body = b"\x02\x01\x00" + algorithm + octet
    return b"\x30" + bytes((len(body),)) + body


@st.composite
def pem_files(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        label = draw(st.sampled_from(LABELS))
        end_label = label if draw(st.booleans()) else draw(st.sampled_from(LABELS))
        content = draw(
            st.one_of(
                st.binary(max_size=120).map(base64.b64encode),
                der_like().map(base64.b64encode),
                st.just(base64.b64encode(KAT_LIST)),
                st.binary(max_size=60),
            )
        )
        out += (
            f"-----BEGIN {label}-----\n".encode()
            + content
            + f"\n-----END {end_label}-----\n".encode()
        )
    return out


@FUZZ
@given(st.binary(max_size=1000))
def test_load_pem_arbitrary_bytes(data: bytes) -> None:
    only(ConfigError, lambda: load_pem(data, source="fuzz.pem"))


@FUZZ
@given(pem_files())
def test_load_pem_structured(data: bytes) -> None:
    only(ConfigError, lambda: load_pem(data, source="fuzz.pem"))


@FUZZ
@given(mutations(GOOD_PEM, [(0, 1)]))
def test_load_pem_mutated(data: bytes) -> None:
    only(ConfigError, lambda: load_pem(data, source="fuzz.pem"))


@pytest.mark.parametrize("data", [b"", GOOD_PEM])
def test_load_pem_examples(data: bytes) -> None:
    only(ConfigError, lambda: load_pem(data))
