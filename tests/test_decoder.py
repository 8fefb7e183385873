"""Checklist tests for the split-mode ECH decoder (echfront.ech.decoder).

One test, or one parametrized case, per row of
``/work/shared/docs/ech-spec-checklist.md`` that binds a client-facing
server, named after the row.  ClientHellos are built by :mod:`tests.echhello`,
a client written independently of the decoder; the Go-client vector in
``tests/vectors/`` pins the result to a real implementation (DEC-4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echfront.ech.decoder import (
    ClientHelloInfo,
    ECHDecoder,
    ECHStatus,
    RejectReason,
    SecondHelloDecoder,
    parse_outer_ech,
    rebuild_inner,
)
from echfront.ech.echconfig import ECHConfig, SymmetricSuite
from echfront.ech.hpke import RecipientKey
from echfront.ech.keyset import ECHKey, KeySet, generate_key
from echfront.errors import (
    AlertError,
    ConfigError,
    DecodeError,
    DecryptError,
    IllegalParameter,
    MissingExtension,
    UnexpectedMessage,
)
from echfront.keys.keyfile import dump_pem, load_pem
from echfront.tls.hello import EXT_ECH, ClientHello, handshake_message
from echfront.tls.records import HandshakeReader
from tests.echhello import (
    DEFAULT_EXTENSIONS,
    EXT_ALPN,
    EXT_GROUPS,
    EXT_KEY_SHARE,
    EXT_OUTER_EXTENSIONS,
    EXT_SIGALGS,
    EXT_SNI,
    EXT_VERSIONS,
    InnerSpec,
    OuterItem,
    SealedHello,
    frame,
    grease_extension,
    key_share,
    read_flight,
    seal_hello,
    sni,
    u16_list,
    versions,
)

VECTOR = json.loads((Path(__file__).parent / "vectors" / "ech-kat-go-client.json").read_text())
PUBLIC_NAME = "public.example"
SECRET_NAME = "secret.example.org"
KEY = generate_key(PUBLIC_NAME, config_id=0x42, maximum_name_length=32)
OTHER = generate_key(PUBLIC_NAME, config_id=0x17)
CONFIG = KEY.config
SPEC = InnerSpec()
CCS = bytes.fromhex("140303000101")
EARLY_DATA = b"\x17\x03\x03\x00\x05" + b"early"


def decode(
    source: SealedHello | bytes, keys: tuple[ECHKey, ...] = (KEY,), **options: bool
) -> ClientHelloInfo:
    """Decode a sealed hello (or raw records) with a decoder over ``keys``."""
    data = source.records if isinstance(source, SealedHello) else source
    return ECHDecoder(KeySet(keys), **options).decode(read_flight(data))


def accepted(
    hello: SealedHello, keys: tuple[ECHKey, ...] = (KEY,), **opts: bool
) -> ClientHelloInfo:
    """Decode and check ECH was accepted with the exact expected inner bytes."""
    info = decode(hello, keys, **opts)
    assert info.status is ECHStatus.ACCEPTED
    assert info.reject_reason is None
    assert info.inner is not None
    assert info.inner.message == hello.inner_message
    assert info.forward == frame(hello.inner_message, int.from_bytes(hello.records[1:3], "big"))
    return info


def rejected(source: SealedHello | bytes, reason: RejectReason, **opts: Any) -> ClientHelloInfo:
    """Decode and check ECH was rejected: the outer hello routes, records go unchanged."""
    info = decode(source, **opts)
    records = source.records if isinstance(source, SealedHello) else source
    assert (info.status, info.reject_reason) == (ECHStatus.REJECTED, reason)
    assert (info.inner, info.key, info.second_hello) == (None, None, None)
    assert info.forward == records
    assert info.server_name == info.outer.server_name()
    return info


def raises(alert_type: type[AlertError], alert: int, source: SealedHello | bytes) -> None:
    """Decoding must raise exactly ``alert_type`` carrying ``alert``."""
    with pytest.raises(alert_type) as caught:
        decode(source)
    assert type(caught.value) is alert_type
    assert caught.value.alert == alert


def reframed(body: bytes) -> bytes:
    """Records carrying a modified outer body."""
    return frame(handshake_message(1, body))


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    """``data`` with one bit flipped."""
    return data[:index] + bytes((data[index] ^ mask,)) + data[index + 1 :]


def count_setups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count RecipientKey.setup calls (HPKE SetupBaseR) from now on."""
    calls: list[int] = []
    original = RecipientKey.setup

    def counting(self: RecipientKey, *args: Any) -> Any:
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(RecipientKey, "setup", counting)
    return calls


def second_decoder(hello: SealedHello) -> SecondHelloDecoder:
    """The SecondHelloDecoder for an accepted first hello."""
    info = accepted(hello)
    assert info.second_hello is not None
    return info.second_hello


# --- DEC-4: the Go-client known-answer vector ------------------------------------------------


def kat_key() -> ECHKey:
    config = ECHConfig.decode(bytes.fromhex(VECTOR["echconfig"]))
    return ECHKey(config, RecipientKey(0x0020, bytes.fromhex(VECTOR["sk"])))


def test_DEC_4_kat_decrypts_to_the_go_client_inner() -> None:
    derived = VECTOR["derived"]
    record = bytes.fromhex(VECTOR["record"])
    info = decode(record, (kat_key(),))
    assert info.status is ECHStatus.ACCEPTED
    assert info.inner is not None
    message = bytes.fromhex(derived["client_hello_inner_message"])
    assert info.inner.message == message
    assert len(message) == VECTOR["expected"]["client_hello_inner_message_len"] == 1493
    assert hashlib.sha256(message).hexdigest() == derived["client_hello_inner_message_sha256"]
    assert info.server_name == "secret.example.org"
    assert info.alpn == (b"h2", b"http/1.1")
    assert info.config_id == 66
    # REC-12: the forward is the message, framed with the client's record version 0x0301.
    assert info.forward == b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
    assert info.rest == b""


def test_DEC_4_kat_payload_offset_and_aad() -> None:
    derived = VECTOR["derived"]
    outer = ClientHello.from_message(read_flight(bytes.fromhex(VECTOR["record"])).message)
    assert len(outer.body) == derived["client_hello_outer_body_len"] == 1670
    extension = outer.get(EXT_ECH)
    assert extension is not None
    ech = parse_outer_ech(extension)
    assert ech.payload_offset == derived["payload_offset_in_client_hello_outer_body"] == 152
    assert ech.enc.hex() == derived["ech_client_hello"]["enc"]
    assert ech.payload.hex() == derived["ech_client_hello"]["payload"]
    assert (ech.kdf_id, ech.aead_id, ech.config_id) == (1, 1, 66)
    aad = ech.aad(outer.body)
    assert hashlib.sha256(aad).hexdigest() == derived["client_hello_outer_aad_sha256"]
    encoded = bytes.fromhex(derived["encoded_client_hello_inner"])
    assert len(encoded) == 128
    assert rebuild_inner(outer, encoded).message.hex() == derived["client_hello_inner_message"]


def test_REC_3_kat_outer_extensions_replaced_in_place() -> None:
    info = decode(bytes.fromhex(VECTOR["record"]), (kat_key(),))
    assert info.inner is not None
    # AAD-2: the ECH extension is the outer's 3rd; REC-3: fd00 (last, 7 refs) expands in place.
    assert [f"{t:04x}" for t in info.outer.extension_types] == VECTOR["derived"][
        "outer_extension_order"
    ]
    refs = VECTOR["expected"]["ech_outer_extensions"]
    assert [f"{t:04x}" for t in info.inner.extension_types] == ["0000", "0012", "fe0d", *refs]
    for ref in refs:
        inner_ext, outer_ext = info.inner.get(int(ref, 16)), info.outer.get(int(ref, 16))
        assert inner_ext is not None and outer_ext is not None
        assert inner_ext.raw == outer_ext.raw


def test_DEC_4_client_and_front_agree_on_every_default_suite() -> None:
    """The test client round-trips through the decoder (sanity for every other test)."""
    for suite in CONFIG.cipher_suites:
        hello = seal_hello(CONFIG, suite=(suite.kdf_id, suite.aead_id))
        info = accepted(hello)
        assert info.server_name == SECRET_NAME
        assert info.alpn == (b"h2", b"http/1.1")
        assert info.key is KEY


# --- CFG ------------------------------------------------------------------------------------


def test_CFG_6_config_ids_distinct_until_exhausted() -> None:
    taken: list[int] = []
    for _ in range(256):
        taken.append(generate_key(PUBLIC_NAME, taken_ids=taken).config_id)
    assert sorted(taken) == list(range(256))
    with pytest.raises(ConfigError):
        generate_key(PUBLIC_NAME, taken_ids=taken)


def test_CFG_6_shared_config_id_tries_every_key() -> None:
    twin = generate_key(PUBLIC_NAME, config_id=KEY.config_id)
    hello = seal_hello(twin.config)
    assert accepted(hello, (KEY, twin)).key is twin


@pytest.mark.parametrize(
    ("config_lists_it", "reason"),
    [(False, RejectReason.UNSUPPORTED_SUITE), (True, RejectReason.DECRYPT_FAILED)],
)
def test_CFG_8_export_only_aead_offered_by_client_is_rejected(
    config_lists_it: bool, reason: RejectReason
) -> None:
    key = KEY
    if config_lists_it:
        suites = (*KEY.config.cipher_suites, SymmetricSuite(1, 0xFFFF))
        key = ECHKey(dataclasses.replace(KEY.config, cipher_suites=suites), KEY.recipient)
    hello = seal_hello(key.config, wire_suite=(1, 0xFFFF))
    rejected(hello, reason, keys=(key,))


def test_CFG_8_key_file_advertising_export_only_is_refused() -> None:
    """A loaded config listing AEAD 0xFFFF would be published as a retry config."""
    suites = (SymmetricSuite(1, 1), SymmetricSuite(1, 0xFFFF))
    key = ECHKey(dataclasses.replace(KEY.config, cipher_suites=suites), KEY.recipient)
    with pytest.raises(ConfigError):
        load_pem(dump_pem([key]))


# --- PAR: receiving and parsing the ClientHelloOuter ----------------------------------------


@pytest.mark.parametrize("sizes", [(1,) * 400, (100, 100), (3, 1, 2)])
def test_PAR_1_hello_split_over_records_is_accepted(sizes: tuple[int, ...]) -> None:
    hello = seal_hello(CONFIG, record_sizes=sizes)
    lengths, pos = [], 0
    while pos < len(hello.records):
        lengths.append(int.from_bytes(hello.records[pos + 3 : pos + 5], "big"))
        pos += 5 + lengths[-1]
    assert lengths[:-1] == list(sizes)[: len(lengths) - 1]  # the client's split, as asked
    assert len(lengths) > 1
    accepted(hello)
    assert read_flight(hello.records).records == hello.records


@pytest.mark.parametrize(
    "first",
    [
        b"\x17\x03\x03\x00\x05hello",  # application_data
        b"\x15\x03\x03\x00\x02\x02\x28",  # alert
        CCS,
        b"\x16\x03\x03\x00\x06\x02\x00\x00\x02\x03\x03",  # a ServerHello
    ],
)
def test_PAR_2_first_record_not_a_client_hello_is_unexpected_message(first: bytes) -> None:
    with pytest.raises(UnexpectedMessage) as caught:
        HandshakeReader(1).feed(first + seal_hello(CONFIG).records)
    assert caught.value.alert == 10


def _outer_body_cases() -> Iterator[Any]:
    body = seal_hello(CONFIG).outer_body
    ech = seal_hello(CONFIG, outer=[(EXT_SNI, sni(PUBLIC_NAME)), EXT_ECH, (EXT_ECH, b"\x00")])
    yield pytest.param(ech.outer_body, id="two-ech-extensions")
    dup = seal_hello(
        CONFIG, outer=[(EXT_SNI, sni(PUBLIC_NAME)), (0x0A0A, b""), (0x0A0A, b""), EXT_ECH]
    )
    yield pytest.param(dup.outer_body, id="duplicate-grease-type")
    yield pytest.param(body + b"\x00", id="trailing-byte")
    yield pytest.param(body[:-1], id="truncated")
    yield pytest.param(body[:34] + b"\x21" + body[35:], id="session-id-33")
    sid_end = 35 + body[34]
    yield pytest.param(body[:sid_end] + b"\x00\x07" + body[sid_end + 2 :], id="odd-cipher-suites")
    yield pytest.param(body[:34], id="no-session-id")


@pytest.mark.parametrize("body", list(_outer_body_cases()))
def test_PAR_3_malformed_outer_is_decode_error(body: bytes) -> None:
    raises(DecodeError, 50, frame(handshake_message(1, body)))


def test_PAR_4_hello_without_ech_is_plain_tls_by_outer_name() -> None:
    hello = seal_hello(CONFIG, outer=[(EXT_SNI, sni("www.example")), EXT_KEY_SHARE])
    info = decode(hello)
    assert (info.status, info.reject_reason, info.config_id) == (ECHStatus.NOT_OFFERED, None, None)
    assert info.server_name == "www.example"
    assert (info.inner, info.second_hello, info.forward) == (None, None, hello.records)


def test_PAR_5_ech_of_type_inner_in_outer_is_illegal_parameter() -> None:
    raises(IllegalParameter, 47, seal_hello(CONFIG, ech_extension=b"\x01").records)


@pytest.mark.parametrize("ech_type", [2, 0x80, 0xFF])
def test_PAR_6_unknown_ech_type_is_illegal_parameter(ech_type: int) -> None:
    extension = bytes((ech_type,)) + b"\x00\x01\x00\x01\x42\x00\x20" + bytes(32) + b"\x00\x01\x00"
    raises(IllegalParameter, 47, seal_hello(CONFIG, ech_extension=extension).records)


def _truncated_ech() -> Iterator[Any]:
    head = b"\x00\x00\x01\x00\x01\x42\x00\x20" + bytes(32)
    good = head + b"\x00\x10" + bytes(16)
    yield pytest.param(good[:-1], id="payload-cut")
    yield pytest.param(good + b"\x00", id="trailing-byte")
    yield pytest.param(head + b"\x00\x00", id="empty-payload")
    yield pytest.param(head, id="no-payload-length")
    yield pytest.param(head[:20], id="enc-cut")
    yield pytest.param(b"\x00\x00\x01\x00\x01\x42\x00", id="no-enc-length")
    yield pytest.param(b"\x00", id="type-only")
    yield pytest.param(b"", id="empty-extension")


@pytest.mark.parametrize("extension", list(_truncated_ech()))
def test_PAR_7_malformed_outer_ech_is_decode_error(extension: bytes) -> None:
    raises(DecodeError, 50, seal_hello(CONFIG, ech_extension=extension).records)


@pytest.mark.parametrize("with_ech", [True, False])
def test_PAR_8_ech_outer_extensions_in_outer_is_illegal_parameter(with_ech: bool) -> None:
    outer: list[OuterItem] = [(EXT_SNI, sni(PUBLIC_NAME)), (EXT_OUTER_EXTENSIONS, u16_list([A]))]
    raises(IllegalParameter, 47, seal_hello(CONFIG, outer=outer + [EXT_ECH] * with_ech).records)


def test_PAR_9_outer_offering_only_tls12_is_still_decrypted() -> None:
    outer: list[OuterItem] = [
        (EXT_SNI, sni(PUBLIC_NAME)),
        (EXT_VERSIONS, versions([0x0303])),
        *SPEC.compress,
        EXT_ECH,
    ]
    hello = seal_hello(CONFIG, outer=outer, outer_legacy_version=0x0303)
    info = accepted(hello)
    assert info.outer.supported_versions() == (0x0303,)
    assert info.inner is not None and info.inner.supported_versions() == (0x0304,)


# --- DEC: candidate selection and decryption ------------------------------------------------


def test_DEC_1_right_key_wrong_config_id_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    setups = count_setups(monkeypatch)
    info = rejected(seal_hello(CONFIG, config_id=0x43), RejectReason.UNKNOWN_CONFIG_ID)
    assert info.config_id == 0x43
    assert setups == []  # an unknown config_id costs no HPKE operation (SEC-1)


def test_DEC_1_only_keys_with_the_config_id_are_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    setups = count_setups(monkeypatch)
    hello = seal_hello(OTHER.config, config_id=KEY.config_id)  # sealed to OTHER, claims KEY's id
    rejected(hello, RejectReason.DECRYPT_FAILED, keys=(KEY, OTHER))
    assert len(setups) == 1


def test_DEC_1_retry_only_config_is_no_candidate() -> None:
    retry_only = ECHKey(KEY.config, None)
    rejected(seal_hello(CONFIG), RejectReason.UNKNOWN_CONFIG_ID, keys=(retry_only,))


@pytest.mark.parametrize("trial", [False, True])
def test_DEC_2_trial_decryption_only_when_configured(trial: bool) -> None:
    hello = seal_hello(OTHER.config, config_id=0x99)
    keys = (KEY, OTHER)
    if trial:
        info = accepted(hello, keys, trial_decryption=True)
        assert (info.key, info.config_id) == (OTHER, 0x99)
    else:
        rejected(hello, RejectReason.UNKNOWN_CONFIG_ID, keys=keys)


def test_DEC_3_suite_the_config_lacks_is_rejected() -> None:
    aes_only = generate_key(PUBLIC_NAME, config_id=9, suites=[SymmetricSuite(1, 1)])
    hello = seal_hello(aes_only.config, suite=(1, 3))  # the client uses ChaCha20Poly1305 anyway
    rejected(hello, RejectReason.UNSUPPORTED_SUITE, keys=(aes_only,))
    accepted(seal_hello(aes_only.config), (aes_only,))


@pytest.mark.parametrize("where", [0, 1, 77, -17, -1])
def test_DEC_5_flipped_payload_bit_is_rejected_not_aborted(where: int) -> None:
    hello = seal_hello(CONFIG)
    index = hello.payload_offset + where % len(hello.payload)
    info = rejected(reframed(flip(hello.outer_body, index, 0x80)), RejectReason.DECRYPT_FAILED)
    assert info.server_name == PUBLIC_NAME


LOW_ORDER = [
    bytes(32),  # all zeros
    b"\x01" + bytes(31),  # u = 1
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),  # order 8
    b"\xec" + b"\xff" * 30 + b"\x7f",  # p - 1
]


@pytest.mark.parametrize(
    "enc", [b"", b"\x09" * 31, b"\x09" * 33, *LOW_ORDER], ids=lambda e: f"{len(e)}:{e[:2].hex()}"
)
def test_DEC_5_invalid_enc_is_rejected_not_aborted(enc: bytes) -> None:
    rejected(seal_hello(CONFIG, enc=enc), RejectReason.DECRYPT_FAILED)


def test_DEC_6_first_success_keeps_its_key_and_context() -> None:
    twin = generate_key(PUBLIC_NAME, config_id=KEY.config_id)
    same = ECHKey(twin.config, twin.recipient, source="copy")
    hello = seal_hello(twin.config)
    info = accepted(hello, (KEY, twin, same))
    assert info.key is twin
    assert info.second_hello is not None
    second = hello.second()
    assert info.second_hello.decode(second.flight()).inner.message == second.inner_message


@pytest.mark.parametrize(
    ("require", "outer_name", "config_id", "outcome"),
    [
        (False, "x.example", 0x42, "accepted"),
        (True, "x.example", 0x42, 47),
        (True, None, 0x42, 47),
        (True, PUBLIC_NAME, 0x42, "accepted"),
        (True, "other.example", 0x42, "accepted"),  # the same key and id serve two public_names
        (True, "real.example", 0x99, "rejected"),  # GREASE-like unknown id: never 47
    ],
)
def test_DEC_7_require_public_name(
    require: bool, outer_name: str | None, config_id: int, outcome: object
) -> None:
    other_name = ECHKey(dataclasses.replace(CONFIG, public_name="other.example"), KEY.recipient)
    config = other_name.config if outer_name == "other.example" else CONFIG
    outer = [(EXT_SNI, sni(outer_name))] if outer_name else []
    hello = seal_hello(config, outer=[*outer, *SPEC.compress, EXT_ECH], config_id=config_id)
    keys = (KEY, other_name)
    if outcome == 47:
        with pytest.raises(IllegalParameter) as caught:
            decode(hello, keys, require_public_name=require)
        assert caught.value.alert == 47
    elif outcome == "rejected":
        info = decode(hello, keys, require_public_name=require)
        assert (info.status, info.server_name) == (ECHStatus.REJECTED, outer_name)
    else:
        info = accepted(hello, keys, require_public_name=require)
        assert info.key is (other_name if config is other_name.config else KEY)


@pytest.mark.parametrize(
    ("grease_id", "trial"),
    [(0x99, False), (0x42, False), (0x99, True)],
    ids=["unknown-id", "id-collides", "trial-decryption"],
)
def test_DEC_7_require_public_name_never_aborts_grease(grease_id: int, trial: bool) -> None:
    """GREASE ECH carries the real name as outer SNI (§6.2) and must be ignored (REJ-1).

    Its config_id is random, so it matches a real one 1 time in 256 (always,
    with trial decryption); only a hello that *decrypts* under a config with
    another public_name may be refused with illegal_parameter.
    """
    outer: list[OuterItem] = [(EXT_SNI, sni("www.example")), *SPEC.compress, EXT_ECH]
    hello = seal_hello(CONFIG, outer=outer, ech_extension=grease_extension(grease_id))
    info = ECHDecoder(KeySet([KEY]), trial_decryption=trial, require_public_name=True).decode(
        hello.flight()
    )
    assert (info.status, info.server_name, info.forward) == (
        ECHStatus.REJECTED,
        "www.example",
        hello.records,
    )


# --- AAD ------------------------------------------------------------------------------------


def _aad_mutations() -> Iterator[Any]:
    hello = seal_hello(CONFIG)
    enc_at = hello.payload_offset - 2 - 32
    sni_at = hello.outer_body.index(PUBLIC_NAME.encode())
    ks_at = hello.outer_body.index(key_share()[6:])
    failed, unknown, suite = (
        RejectReason.DECRYPT_FAILED,
        RejectReason.UNKNOWN_CONFIG_ID,
        RejectReason.UNSUPPORTED_SUITE,
    )
    yield pytest.param(1, 0x01, failed, id="legacy_version")
    yield pytest.param(2, 0x01, failed, id="random-first")
    yield pytest.param(33, 0x80, failed, id="random-last")
    yield pytest.param(35, 0x01, failed, id="session_id")
    yield pytest.param(35 + 32 + 3, 0x04, failed, id="cipher_suite")
    yield pytest.param(sni_at, 0x20, failed, id="outer-sni-case")
    yield pytest.param(ks_at + 5, 0x01, failed, id="compressed-key_share")
    yield pytest.param(enc_at, 0x01, failed, id="enc-first")
    yield pytest.param(enc_at + 31, 0x40, failed, id="enc-last")
    yield pytest.param(enc_at - 3, 0x01, unknown, id="config_id")
    yield pytest.param(enc_at - 4, 0x04, suite, id="aead_id")
    yield pytest.param(enc_at - 6, 0x02, suite, id="kdf_id")


@pytest.mark.parametrize(("index", "mask", "reason"), list(_aad_mutations()))
def test_AAD_1_mutating_any_other_outer_byte_is_rejected(
    index: int, mask: int, reason: RejectReason
) -> None:
    hello = seal_hello(CONFIG)
    rejected(reframed(flip(hello.outer_body, index, mask)), reason)


def test_AAD_1_no_bit_flip_outside_the_payload_is_accepted() -> None:
    hello = seal_hello(CONFIG)
    body = hello.outer_body
    payload = range(hello.payload_offset, hello.payload_offset + len(hello.payload))
    outcomes: dict[str, int] = {}
    for index in (i for i in range(len(body)) if i not in payload):
        try:
            info = decode(reframed(flip(body, index)))
        except AlertError as error:  # nothing but an AlertError may escape
            outcome = f"alert {error.alert}"
        else:
            outcome = info.status.value
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert set(outcomes) <= {"rejected", "not_offered", "alert 47", "alert 50"}
    assert outcomes["rejected"] >= 3 * (len(body) - len(payload)) // 4


def _positions() -> Iterator[Any]:
    sni_item = (EXT_SNI, sni(PUBLIC_NAME))
    yield pytest.param([EXT_ECH, sni_item, *SPEC.compress], id="first")
    yield pytest.param([sni_item, (0x0012, b""), EXT_ECH, *SPEC.compress], id="third-like-go")
    yield pytest.param([sni_item, EXT_GROUPS, EXT_ECH, EXT_SIGALGS, EXT_KEY_SHARE], id="middle")
    yield pytest.param([sni_item, *SPEC.compress, EXT_ECH], id="last")


@pytest.mark.parametrize("outer", list(_positions()))
def test_AAD_2_ech_extension_anywhere_in_the_outer(outer: list[Any]) -> None:
    hello = seal_hello(CONFIG, outer=outer)
    accepted(hello)
    extension = ClientHello.parse(hello.outer_body).get(EXT_ECH)
    assert extension is not None
    assert parse_outer_ech(extension).payload_offset == hello.payload_offset


def test_AAD_2_chrome_like_permuted_order_with_grease_compressed() -> None:
    extras = (
        (0x2A2A, b""),
        (EXT_KEY_SHARE, b"\x04\xc4\x11\xec\x04\xc0" + bytes(range(256)) * 4 + bytes(0xC0)),
        (0x000D, DEFAULT_EXTENSIONS[1][1]),
        (0x0005, b"\x01\x00\x00\x00\x00"),
        (0x0012, b""),
        (0x000A, b"\x00\x06\x2a\x2a\x11\xec\x00\x1d"),
        (0x002D, b"\x01\x01"),
        (0x001B, b"\x02\x00\x02"),
        (0x44CD, b"\x00\x03\x02\x68\x32"),
        (0x8A8A, b"\x00"),
    )
    compress = tuple(t for t, _ in extras)
    spec = InnerSpec(extensions=extras, compress=compress)
    outer: list[Any] = [
        (0x1A1A, b""),
        *compress[:4],
        (EXT_ALPN, b"\x00\x09\x08http/1.1"),
        EXT_ECH,
        *compress[4:7],
        (EXT_SNI, sni(PUBLIC_NAME)),
        *compress[7:],
        (EXT_VERSIONS, versions([0x3A3A, 0x0304, 0x0303])),
        (0x5A5A, b"\x00"),
    ]
    hello = seal_hello(CONFIG, spec, outer=outer, suite=(1, 3))
    info = accepted(hello)
    assert info.inner is not None
    assert info.inner.extension_types[1 : 1 + len(compress)] == compress


def _unusual() -> Iterator[Any]:
    sni_item = (EXT_SNI, sni("PUBLIC.Example"))
    yield pytest.param({"outer": [sni_item, *SPEC.compress, EXT_ECH]}, id="upper-case-sni")
    yield pytest.param({"outer_legacy_version": 0x0301}, id="legacy_version-0301")
    yield pytest.param({"outer_compression": b"\x00\x01"}, id="two-compression-methods")
    yield pytest.param({"session_id": b""}, id="empty-session-id")
    yield pytest.param({"session_id": b"\x07"}, id="one-byte-session-id")
    two_names = sni(PUBLIC_NAME)[2:] + b"\x07\x00\x01x"
    other = (EXT_SNI, len(two_names).to_bytes(2, "big") + two_names)
    yield pytest.param({"outer": [other, *SPEC.compress, EXT_ECH]}, id="sni-two-entries")
    empty = [(0xAAAA, b""), (0xFFFF, bytes(300)), *SPEC.compress, EXT_ECH]
    yield pytest.param({"outer": [(EXT_SNI, sni(PUBLIC_NAME)), *empty]}, id="odd-extensions")


@pytest.mark.parametrize("options", list(_unusual()))
def test_AAD_3_unusual_valid_encodings_still_decrypt(options: dict[str, Any]) -> None:
    hello = seal_hello(CONFIG, **options)
    info = accepted(hello)
    assert info.inner is not None and info.inner.session_id == options.get(
        "session_id", bytes(range(0xE0, 0x100))
    )


# --- REC: rebuilding the ClientHelloInner ---------------------------------------------------


@pytest.mark.parametrize(
    ("padding", "outcome"),
    [(b"", None), (bytes(1), None), (bytes(500), None), (bytes(5) + b"\x01", 47), (b"\x80", 47)],
)
def test_REC_1_padding_must_be_zeros(padding: bytes, outcome: int | None) -> None:
    hello = seal_hello(CONFIG, padding=padding)
    if outcome is None:
        accepted(hello)
    else:
        raises(IllegalParameter, outcome, hello)


@pytest.mark.parametrize("session_id", [b"", b"\x01", bytes(range(32))])
def test_REC_2_outer_session_id_is_copied(session_id: bytes) -> None:
    info = accepted(seal_hello(CONFIG, session_id=session_id))
    assert info.inner is not None and info.inner.session_id == session_id


@pytest.mark.parametrize("length", [1, 32])
def test_REC_2_non_empty_encoded_session_id_is_illegal_parameter(length: int) -> None:
    raises(IllegalParameter, 47, seal_hello(CONFIG, encoded_session_id=bytes(length)))


@pytest.mark.parametrize(
    "compress",
    [
        (EXT_GROUPS,),
        (EXT_KEY_SHARE, 0x002D),
        (EXT_SNI, EXT_GROUPS),
        (EXT_VERSIONS,),
        (EXT_GROUPS, EXT_KEY_SHARE, EXT_ALPN),  # non-contiguous in the inner: gathered at fd00
    ],
)
def test_REC_3_references_replace_fd00_in_place(compress: tuple[int, ...]) -> None:
    spec = dataclasses.replace(SPEC, compress=compress)
    outer = [(EXT_SNI, sni(PUBLIC_NAME))] * (EXT_SNI not in compress)
    hello = seal_hello(CONFIG, spec, outer=[*outer, *compress, EXT_ECH])
    info = accepted(hello)
    assert info.inner is not None
    assert list(info.inner.extension_types) == [t for t, _ in spec.rebuilt_extensions()]


def test_REC_4_missing_reference_is_illegal_parameter() -> None:
    refs = [EXT_GROUPS, EXT_SIGALGS, EXT_KEY_SHARE, 0x0015]
    raises(IllegalParameter, 47, seal_hello(CONFIG, references=refs))


def test_REC_5_repeated_reference_is_illegal_parameter() -> None:
    raises(IllegalParameter, 47, seal_hello(CONFIG, references=[EXT_GROUPS, EXT_GROUPS]))


def test_REC_6_referencing_the_ech_extension_is_illegal_parameter() -> None:
    """REC-10 too: the unauthenticated ECH extension can never be imported."""
    raises(IllegalParameter, 47, seal_hello(CONFIG, references=[EXT_ECH]))
    raises(IllegalParameter, 47, seal_hello(CONFIG, references=[EXT_GROUPS, EXT_ECH]))


A, B, C, D = EXT_GROUPS, EXT_SIGALGS, EXT_KEY_SHARE, (0x0017, b"")


@pytest.mark.parametrize(
    ("refs", "outcome"),
    [
        ([A, B, C], "ok"),
        ([A, C], "ok"),
        ([B, C], "ok"),
        ([B, A], 47),
        ([A, C, B], 47),
        ([C, A], 47),
    ],
)
def test_REC_7_references_must_follow_outer_order(refs: list[int], outcome: object) -> None:
    spec = dataclasses.replace(SPEC, compress=tuple(refs) if outcome == "ok" else (A, B, C))
    outer: list[OuterItem] = [(EXT_SNI, sni(PUBLIC_NAME)), A, D, B, C, EXT_ECH]  # CHO A, D, B, C
    hello = seal_hello(CONFIG, spec, outer=outer, references=refs)
    if outcome == "ok":
        accepted(hello)
    else:
        raises(IllegalParameter, 47, hello)


def test_REC_7_out_of_order_reference_is_illegal_parameter() -> None:
    outer: list[OuterItem] = [
        (EXT_SNI, sni(PUBLIC_NAME)),
        C,
        B,
        A,
        EXT_ECH,
    ]  # the outer reversed the inner order
    raises(IllegalParameter, 47, seal_hello(CONFIG, outer=outer))


def _fd00_cases() -> Iterator[Any]:
    ok = (EXT_OUTER_EXTENSIONS, u16_list([EXT_GROUPS]))
    yield pytest.param((EXT_OUTER_EXTENSIONS, u16_list([EXT_OUTER_EXTENSIONS])), 47, id="refs-fd00")
    yield pytest.param(
        (EXT_OUTER_EXTENSIONS, u16_list([A, EXT_OUTER_EXTENSIONS])), 47, id="refs-a-fd00"
    )
    yield pytest.param(ok, 47, id="fd00-twice")
    yield pytest.param((EXT_OUTER_EXTENSIONS, b"\x00"), 50, id="empty-list")
    yield pytest.param((EXT_OUTER_EXTENSIONS, b""), 50, id="empty-data")
    yield pytest.param((EXT_OUTER_EXTENSIONS, b"\x03\x00\x0a\x00"), 50, id="odd-length")
    yield pytest.param((EXT_OUTER_EXTENSIONS, b"\x01\x00"), 50, id="one-byte")
    yield pytest.param((EXT_OUTER_EXTENSIONS, b"\x02\x00\x0a\xff"), 50, id="trailing-byte")
    yield pytest.param((EXT_OUTER_EXTENSIONS, b"\x04\x00\x0a"), 50, id="list-overruns")


@pytest.mark.parametrize(("fd00", "alert"), list(_fd00_cases()))
def test_REC_8_malformed_outer_extensions(fd00: tuple[int, bytes], alert: int) -> None:
    ok = (EXT_OUTER_EXTENSIONS, u16_list([EXT_GROUPS]))
    extras = (ok, fd00) if fd00 == ok else (fd00,)
    spec = InnerSpec(extensions=(*extras, *DEFAULT_EXTENSIONS[1:]), compress=())
    hello = seal_hello(
        CONFIG, spec, outer=[(EXT_SNI, sni(PUBLIC_NAME)), (A, b"\x00\x02\x00\x1d"), EXT_ECH]
    )
    raises(IllegalParameter if alert == 47 else DecodeError, alert, hello)


class CountingTuple(tuple[int, ...]):
    """A tuple that counts element reads, to measure the rebuild's cursor work."""

    reads = 0

    def __getitem__(self, index: Any) -> Any:
        CountingTuple.reads += 1
        return super().__getitem__(index)

    def __iter__(self) -> Iterator[int]:
        for item in super().__iter__():
            CountingTuple.reads += 1
            yield item


def test_REC_9_many_outer_extensions_rebuild_linearly() -> None:
    filler = [(0x1000 + i, bytes((i % 7,))) for i in range(1200)]
    tail = tuple((0x3000 + i, bytes((i,))) for i in range(100))
    spec = InnerSpec(extensions=(*DEFAULT_EXTENSIONS, *tail), compress=tuple(t for t, _ in tail))
    outer: list[OuterItem] = [(EXT_SNI, sni(PUBLIC_NAME)), *filler, *(t for t, _ in tail), EXT_ECH]
    hello = seal_hello(CONFIG, spec, outer=outer)
    info = accepted(hello)
    assert len(info.outer.extensions) == 1302
    # Count the reads of the outer extension list: a forward cursor makes
    # about M + N of them; restarting the search per reference ~ M * N = 130 000.
    counting = ClientHello.parse(hello.outer_body)
    counting.extension_types = CountingTuple(counting.extension_types)
    CountingTuple.reads = 0
    assert rebuild_inner(counting, hello.encoded_inner).message == hello.inner_message
    assert CountingTuple.reads <= 2 * (1302 + 100)


def test_REC_11_duplicate_type_after_expansion_is_rejected() -> None:
    # The inner has its own key_share and also imports the outer one.
    extras = (
        (EXT_KEY_SHARE, key_share(3)),
        (0x002D, b"\x01\x01"),
        (EXT_OUTER_EXTENSIONS, u16_list([EXT_KEY_SHARE])),
    )
    outer: list[OuterItem] = [(EXT_SNI, sni(PUBLIC_NAME)), (EXT_KEY_SHARE, key_share(4)), EXT_ECH]
    raises(
        DecodeError, 50, seal_hello(CONFIG, InnerSpec(extensions=extras, compress=()), outer=outer)
    )


def test_REC_12_forward_is_header_plus_rebuilt_body_byte_exact() -> None:
    hello = seal_hello(CONFIG)
    info = accepted(hello)
    message = hello.inner_message
    assert message[0] == 1 and int.from_bytes(message[1:4], "big") == len(message) - 4
    assert info.forward == b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


# --- FWD: validating the ClientHelloInner and forwarding ------------------------------------


@pytest.mark.parametrize("ech", [None, b"", b"\x00", b"\x01\x00", b"\x02", b"\x00" + bytes(50)])
def test_FWD_1_inner_must_carry_ech_type_inner(ech: bytes | None) -> None:
    raises(IllegalParameter, 47, seal_hello(CONFIG, dataclasses.replace(SPEC, ech=ech)))


@pytest.mark.parametrize(
    ("offered", "ok"),
    [
        ((0x0304,), True),
        ((0x1A1A, 0x0304), True),
        ((0x0304, 0x0303), False),
        ((0x0303,), False),
        ((0x0304, 0x0302), False),
        ((0x7F1C,), False),
        ((), False),  # no supported_versions means TLS 1.2
    ],
)
def test_FWD_2_inner_must_offer_only_tls13(offered: tuple[int, ...], ok: bool) -> None:
    hello = seal_hello(CONFIG, dataclasses.replace(SPEC, versions=offered))
    if ok:
        accepted(hello)
    else:
        raises(IllegalParameter, 47, hello)


@pytest.mark.parametrize("version", [0x0301, 0x0303])
def test_FWD_4_forward_keeps_the_client_record_version(version: int) -> None:
    hello = seal_hello(CONFIG, record_version=version)
    info = decode(hello)
    assert info.forward == frame(hello.inner_message, version)
    assert info.forward[1:3] == version.to_bytes(2, "big")


def test_FWD_4_large_inner_is_fragmented_at_2_14() -> None:
    big = (0x4444, bytes(range(256)) * 70)  # 17 920 bytes, compressed
    spec = InnerSpec(extensions=(*DEFAULT_EXTENSIONS, big), compress=(0x4444,))
    hello = seal_hello(CONFIG, spec)
    assert len(hello.records) > 2**14 + 5  # the client also needed two records
    info = accepted(hello)
    message = hello.inner_message
    assert len(message) > 2**14
    first, second = info.forward[: 5 + 2**14], info.forward[5 + 2**14 :]
    assert first[:5] == b"\x16\x03\x01\x40\x00"
    assert second[:5] == b"\x16\x03\x01" + (len(message) - 2**14).to_bytes(2, "big")
    assert first[5:] + second[5:] == message


@pytest.mark.parametrize("grease", [False, True])
def test_FWD_5_bytes_after_the_hello_are_untouched(grease: bool) -> None:
    rest = CCS + EARLY_DATA + b"\x17\x03\x03"  # and half a record header
    hello = seal_hello(CONFIG, ech_extension=grease_extension() if grease else None)
    info = ECHDecoder(KeySet([KEY])).decode(read_flight(hello.records + rest))
    assert info.rest == rest
    assert info.status is (ECHStatus.REJECTED if grease else ECHStatus.ACCEPTED)


# --- REJ: rejection path -------------------------------------------------------------------


@pytest.mark.parametrize("length", [144, 176, 208, 240])
def test_REJ_1_grease_ech_routes_by_outer_name_with_records_unchanged(length: int) -> None:
    hello = seal_hello(CONFIG, ech_extension=grease_extension(0xA7, length))
    info = rejected(hello, RejectReason.UNKNOWN_CONFIG_ID)
    assert (info.server_name, info.config_id) == (PUBLIC_NAME, 0xA7)


def test_REJ_1_random_payload_for_a_known_id_routes_by_outer_name() -> None:
    hello = seal_hello(CONFIG, ech_extension=grease_extension(KEY.config_id))
    info = rejected(hello, RejectReason.DECRYPT_FAILED)
    assert info.server_name == PUBLIC_NAME


@pytest.mark.parametrize("ech", ["grease", "stale", "absent"])
def test_REJ_4_no_second_hello_decoder_without_acceptance(ech: str) -> None:
    if ech == "grease":
        hello = seal_hello(CONFIG, ech_extension=grease_extension())
    elif ech == "stale":
        hello = seal_hello(generate_key(PUBLIC_NAME, config_id=KEY.config_id).config)
    else:
        hello = seal_hello(CONFIG, outer=[(EXT_SNI, sni(PUBLIC_NAME))])
    info = decode(hello)
    assert info.status is not ECHStatus.ACCEPTED
    assert info.second_hello is None


def test_REJ_7_grease_and_stale_key_look_identical() -> None:
    stale = generate_key(PUBLIC_NAME, config_id=KEY.config_id)
    spec = InnerSpec(random=bytes(32))
    real = seal_hello(stale.config, spec)
    grease = seal_hello(CONFIG, spec, ech_extension=grease_extension(0x99, len(real.payload)))
    infos = [decode(real), decode(grease)]

    def observable(info: ClientHelloInfo) -> tuple[Any, ...]:
        return (info.status, info.server_name, info.alpn, info.inner, info.key,
                info.second_hello, info.rest, len(info.forward))  # fmt: skip

    assert observable(infos[0]) == observable(infos[1])
    assert [i.forward for i in infos] == [real.records, grease.records]


# --- HRR: the second ClientHello ------------------------------------------------------------


def test_HRR_2_second_hello_opens_on_the_first_context() -> None:
    hello = seal_hello(CONFIG)
    second = hello.second()
    assert second.enc == b""
    result = second_decoder(hello).decode(second.flight())
    assert result.inner.message == second.inner_message
    assert result.forward == frame(second.inner_message, 0x0303)  # FWD-4: CH2's record version


def test_HRR_3_second_hello_without_ech_is_missing_extension() -> None:
    hello = seal_hello(CONFIG)
    second = hello.second(outer=[(EXT_SNI, sni(PUBLIC_NAME)), *SPEC.compress])
    with pytest.raises(MissingExtension) as caught:
        second_decoder(hello).decode(second.flight())
    assert caught.value.alert == 109


@pytest.mark.parametrize(
    "change",
    [
        {"config_id": 0x43},
        {"wire_suite": (1, 2)},
        {"wire_suite": (2, 1)},
        {"enc": bytes(range(32))},
        {"enc": b"\x00"},
    ],
    ids=["config_id", "aead", "kdf", "enc-32", "enc-1"],
)
def test_HRR_4_changed_config_suite_or_enc_is_illegal_parameter(change: dict[str, Any]) -> None:
    hello = seal_hello(CONFIG)
    with pytest.raises(IllegalParameter) as caught:
        second_decoder(hello).decode(hello.second(**change).flight())
    assert caught.value.alert == 47


def test_HRR_4_replayed_first_hello_as_second_is_illegal_parameter() -> None:
    hello = seal_hello(CONFIG)
    with pytest.raises(IllegalParameter) as caught:
        second_decoder(hello).decode(hello.flight())  # enc is not empty
    assert caught.value.alert == 47


@pytest.mark.parametrize(
    ("extension", "alert"),
    [(b"\x01", 50), (b"\x00\x00\x01\x00\x01\x42\x00\x00\x00\x00", 50), (b"\x00\x00\x01", 50)],
    ids=["type-inner", "empty-payload", "truncated"],
)
def test_HRR_5_second_hello_of_type_inner_or_malformed_is_decode_error(
    extension: bytes, alert: int
) -> None:
    hello = seal_hello(CONFIG)
    with pytest.raises(DecodeError) as caught:
        second_decoder(hello).decode(hello.second(ech_extension=extension).flight())
    assert caught.value.alert == alert


def test_HRR_5_fd00_in_second_outer_is_illegal_parameter() -> None:
    hello = seal_hello(CONFIG)
    outer = [
        (EXT_SNI, sni(PUBLIC_NAME)),
        (EXT_OUTER_EXTENSIONS, u16_list([A])),
        *SPEC.compress,
        EXT_ECH,
    ]
    with pytest.raises(IllegalParameter) as caught:
        second_decoder(hello).decode(hello.second(outer=outer).flight())
    assert caught.value.alert == 47


def test_HRR_6_first_payload_reused_is_decrypt_error() -> None:
    hello = seal_hello(CONFIG)
    payload = hello.payload
    reused = b"\x00\x00\x01\x00\x01\x42\x00\x00" + len(payload).to_bytes(2, "big") + payload
    with pytest.raises(DecryptError) as caught:
        second_decoder(hello).decode(hello.second(ech_extension=reused).flight())
    assert caught.value.alert == 51


def test_HRR_6_fresh_context_ciphertext_is_decrypt_error() -> None:
    hello = seal_hello(CONFIG)
    fresh = seal_hello(CONFIG, enc=b"", record_version=0x0303)  # seq 0 of a new context
    with pytest.raises(DecryptError) as caught:
        second_decoder(hello).decode(fresh.flight())
    assert caught.value.alert == 51


def test_HRR_6_second_hello_at_the_wrong_sequence_is_decrypt_error() -> None:
    hello = seal_hello(CONFIG)
    decoder = second_decoder(hello)
    hello.second()  # the client wastes sequence 1; this CH2 is sealed at 2
    with pytest.raises(DecryptError) as caught:
        decoder.decode(hello.second().flight())
    assert caught.value.alert == 51


def test_HRR_7_second_hello_compressing_a_changed_key_share() -> None:
    hello = seal_hello(CONFIG)
    spec2 = InnerSpec(
        extensions=((EXT_GROUPS, b"\x00\x02\x00\x17"), DEFAULT_EXTENSIONS[1],
                    (EXT_KEY_SHARE, key_share(0x99)), DEFAULT_EXTENSIONS[3]),
        random=bytes(range(0x80, 0xA0)),
    )  # fmt: skip
    second = hello.second(spec2)
    result = second_decoder(hello).decode(second.flight())
    assert result.inner.message == second.inner_message
    ks = result.inner.get(EXT_KEY_SHARE)
    assert ks is not None and ks.data == key_share(0x99)  # CH2's, never CH1's (HRR-10)
    assert result.inner.session_id == bytes(range(0xE0, 0x100))


@pytest.mark.parametrize(
    ("options", "alert_type", "alert"),
    [
        ({"references": [EXT_SIGALGS, EXT_GROUPS]}, IllegalParameter, 47),  # REC-7
        ({"references": [EXT_ECH]}, IllegalParameter, 47),  # REC-6
        ({"padding": b"\x00\x01"}, IllegalParameter, 47),  # REC-1
        ({"encoded_session_id": bytes(32)}, IllegalParameter, 47),  # REC-2
        ({"spec": dataclasses.replace(SPEC, ech=None)}, IllegalParameter, 47),  # FWD-1
        ({"spec": dataclasses.replace(SPEC, versions=(0x0303,))}, IllegalParameter, 47),  # FWD-2
    ],
)
def test_HRR_7_second_hello_reruns_rebuild_and_inner_checks(
    options: dict[str, Any], alert_type: type[AlertError], alert: int
) -> None:
    hello = seal_hello(CONFIG)
    with pytest.raises(alert_type) as caught:
        second_decoder(hello).decode(hello.second(**options).flight())
    assert caught.value.alert == alert


# --- SEC ------------------------------------------------------------------------------------


def test_SEC_2_decompressed_size_is_bounded_by_outer_plus_payload() -> None:
    big = tuple((0x5000 + i, bytes(range(200))) for i in range(120))
    spec = InnerSpec(extensions=(*DEFAULT_EXTENSIONS, *big), compress=tuple(t for t, _ in big))
    hello = seal_hello(CONFIG, spec)
    info = accepted(hello)
    assert info.inner is not None
    assert len(info.inner.body) <= len(hello.outer_body) + len(hello.payload)
    assert len(info.inner.body) > len(hello.encoded_inner) + 120 * 200  # it did expand


def _inner_failures() -> list[Any]:
    spec = InnerSpec(server_name="hidden-name.example", alpn=(b"hidden-proto",))
    return [
        pytest.param({"references": [EXT_GROUPS, 0x0015]}, id="REC-4"),
        pytest.param({"padding": b"\x01"}, id="REC-1"),
        pytest.param({"encoded_session_id": b"\x01"}, id="REC-2"),
        pytest.param({"spec": dataclasses.replace(spec, ech=None)}, id="FWD-1"),
        pytest.param({"spec": dataclasses.replace(spec, versions=(0x0303,))}, id="FWD-2"),
        pytest.param({"spec": dataclasses.replace(spec, server_name="Hidden_Name..x")}, id="SNI"),
        pytest.param({"spec": dataclasses.replace(spec, alpn=(b"hidden-proto", b""))}, id="ALPN"),
    ]


@pytest.mark.parametrize("options", _inner_failures())
def test_SEC_3_errors_after_decryption_never_echo_inner_names(options: dict[str, Any]) -> None:
    options = dict(options)
    spec = options.pop(
        "spec", InnerSpec(server_name="hidden-name.example", alpn=(b"hidden-proto",))
    )
    with pytest.raises(AlertError) as caught:
        decode(seal_hello(CONFIG, spec, **options))
    text = f"{caught.value!s} {caught.value!r}".lower()
    assert "hidden" not in text


def test_SEC_4_replayed_hello_decodes_again_identically() -> None:
    hello = seal_hello(CONFIG)
    decoder = ECHDecoder(KeySet([KEY]))
    first, again = decoder.decode(hello.flight()), decoder.decode(hello.flight())
    assert first.status is again.status is ECHStatus.ACCEPTED
    assert first.forward == again.forward == frame(hello.inner_message, 0x0301)
    assert first.second_hello is not again.second_hello  # a fresh context each time
