"""Tests for :mod:`echfront.ech.echconfig`: ECHConfig and ECHConfigList (RFC 9849 §4)."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echfront.ech.echconfig import (
    ECH_VERSION,
    ECHConfig,
    ECHConfigDecodeError,
    ECHConfigExtension,
    SymmetricSuite,
    algorithm_name,
    decode_config_list,
    encode_config_list,
    hex_preview,
    kem_name,
    option_names,
    parse_config_list_text,
    validate_public_name,
)
from echfront.errors import ConfigError

_KAT: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "ech-kat-go-client.json").read_text()
)

#: Checklist §2.5, the parser vector (the PEM example of draft-farrell-tls-pemesni-12 §3),
#: rebuilt field by field from its textual description.
VECTOR_PUBLIC_KEY = bytes.fromhex(
    "3cc1537606db1c3a5def421794cc778891598a222c9d5210c29620388b24110b"
)
VECTOR = b"".join(
    (
        bytes.fromhex("003e"),  # ECHConfigList length
        bytes.fromhex("fe0d"),  # version
        bytes.fromhex("003a"),  # length
        bytes.fromhex("e7"),  # config_id
        bytes.fromhex("0020"),  # kem_id: DHKEM(X25519, HKDF-SHA256)
        bytes.fromhex("0020"),  # public_key length
        VECTOR_PUBLIC_KEY,
        bytes.fromhex("0004 0001 0001"),  # cipher_suites: HKDF-SHA256 / AES-128-GCM
        bytes.fromhex("00"),  # maximum_name_length
        bytes.fromhex("0b"),  # public_name length
        b"example.com",
        bytes.fromhex("0000"),  # extensions
    )
)
#: The same list as it appears, base64-encoded, in RFC 9934 files and DNS ``ech=``.
VECTOR_BASE64 = (
    "AD7+DQA65wAgACA8wVN2BtscOl3vQheUzHeIkVmKIiydUhDCliA4iyQRCwAEAAEAAQALZXhhbXBsZS5jb20AAA=="
)

KAT_CONFIG = bytes.fromhex(_KAT["echconfig"])
KAT_LIST = bytes.fromhex(_KAT["echconfiglist"])


def config_entry(version: int, contents: bytes) -> bytes:
    return version.to_bytes(2, "big") + len(contents).to_bytes(2, "big") + contents


def as_list(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return len(body).to_bytes(2, "big") + body


def contents(
    *,
    config_id: bytes = b"\x01",
    kem: bytes = b"\x00\x20",
    public_key: bytes = b"\x00\x20" + bytes(range(32)),
    suites: bytes = b"\x00\x04\x00\x01\x00\x01",
    max_name: bytes = b"\x00",
    name: bytes = b"\x0epublic.example",
    extensions: bytes = b"\x00\x00",
) -> bytes:
    """ECHConfigContents built from raw fields, so any field can be made malformed."""
    return config_id + kem + public_key + suites + max_name + name + extensions


# --- the §2.5 parser vector (CFG-1) -----------------------------------------------------------


def test_vector_text_reconstruction() -> None:
    assert len(VECTOR) == 2 + 0x3E
    assert base64.b64decode(VECTOR_BASE64) == VECTOR


def test_vector_decodes() -> None:
    decoded = decode_config_list(VECTOR)
    assert decoded.skipped_versions == ()
    (config,) = decoded.configs
    assert config.config_id == 0xE7
    assert config.kem_id == 0x0020
    assert config.public_key == VECTOR_PUBLIC_KEY
    assert config.cipher_suites == (SymmetricSuite(1, 1),)
    assert config.maximum_name_length == 0
    assert config.public_name == "example.com"
    assert config.extensions == ()
    assert not config.has_unknown_mandatory_extension
    assert config.supports(1, 1)
    assert not config.supports(1, 3)
    assert config.kem_name == "DHKEM(X25519)"


def test_vector_re_encodes_byte_exactly() -> None:
    (config,) = decode_config_list(VECTOR).configs
    assert config.encode() == VECTOR[2:]
    assert encode_config_list([config]) == VECTOR
    assert ECHConfig.decode(VECTOR[2:]) == config
    assert ECHConfig.decode_contents(VECTOR[6:]) == config


def test_vector_built_from_fields() -> None:
    config = ECHConfig(
        config_id=0xE7,
        kem_id=0x20,
        public_key=VECTOR_PUBLIC_KEY,
        cipher_suites=(SymmetricSuite(1, 1),),
        maximum_name_length=0,
        public_name="example.com",
    )
    assert encode_config_list([config]) == VECTOR


# --- the Go-client KAT ------------------------------------------------------------------------


def test_kat_config_and_list() -> None:
    fields = _KAT["echconfig_fields"]
    config = ECHConfig.decode(KAT_CONFIG)
    assert config.config_id == fields["config_id"] == 0x42
    assert config.kem_id == fields["kem_id"]
    assert config.public_key.hex() == fields["public_key"]
    assert config.cipher_suites == tuple(
        SymmetricSuite(s["kdf_id"], s["aead_id"]) for s in fields["cipher_suites"]
    )
    assert config.maximum_name_length == fields["maximum_name_length"] == 32
    assert config.public_name == fields["public_name"]
    assert config.extensions == ()
    assert config.encode() == KAT_CONFIG
    decoded = decode_config_list(KAT_LIST)
    assert decoded.configs == (config,)
    assert encode_config_list(decoded.configs) == KAT_LIST
    assert (b"tls ech\x00" + config.encode()).hex() == _KAT["derived"]["hpke_info"]


# --- versions, extensions (CFG-2) -----------------------------------------------------------


def test_unknown_versions_are_skipped_and_reported() -> None:
    data = as_list(
        config_entry(0xFE0A, b"\xde\xad"),
        VECTOR[2:],
        config_entry(0xFE09, b""),
        KAT_CONFIG,
        config_entry(0x0001, bytes(300)),
    )
    decoded = decode_config_list(data)
    assert [c.config_id for c in decoded.configs] == [0xE7, 0x42]
    assert decoded.skipped_versions == (0xFE0A, 0xFE09, 0x0001)


def test_only_unknown_versions() -> None:
    decoded = decode_config_list(as_list(config_entry(0xFE0C, b"\x00" * 10)))
    assert decoded.configs == ()
    assert decoded.skipped_versions == (0xFE0C,)


def test_single_config_of_unknown_version_is_refused() -> None:
    with pytest.raises(ECHConfigDecodeError):
        ECHConfig.decode(config_entry(0xFE0C, VECTOR[6:]))


def test_unknown_version_with_bad_length_is_refused() -> None:
    with pytest.raises(ECHConfigDecodeError):
        decode_config_list(as_list(b"\xfe\x0a\x00\x10\x00"))


def test_extensions_decoded_in_order() -> None:
    exts = b"\x00\x0f" + b"\x1a\x1a\x00\x00" + b"\x80\x01\x00\x02hi" + b"\x00\x05\x00\x01z"
    config = ECHConfig.decode_contents(contents(extensions=exts))
    assert config.extensions == (
        ECHConfigExtension(0x1A1A, b""),
        ECHConfigExtension(0x8001, b"hi"),
        ECHConfigExtension(0x0005, b"z"),
    )
    assert [e.mandatory for e in config.extensions] == [False, True, False]
    assert config.has_unknown_mandatory_extension
    assert config.encode()[4:] == contents(extensions=exts)
    assert "(mandatory)" in config.describe()


def test_duplicate_extension_types_are_refused() -> None:
    exts = b"\x00\x0a" + b"\x1a\x1a\x00\x01x" + b"\x1a\x1a\x00\x00"
    with pytest.raises(ECHConfigDecodeError):
        ECHConfig.decode_contents(contents(extensions=exts))
    with pytest.raises(ECHConfigDecodeError):
        decode_config_list(as_list(config_entry(ECH_VERSION, contents(extensions=exts))))
    with pytest.raises(ValueError, match="repeat"):
        ECHConfig(
            1,
            0x20,
            b"k",
            (SymmetricSuite(1, 1),),
            0,
            "a.example",
            (ECHConfigExtension(5, b""), ECHConfigExtension(5, b"x")),
        )


@pytest.mark.parametrize(
    ("ext_type", "mandatory"),
    [
        (0x0000, False),
        (0x7FFF, False),
        (0x1A1A, False),
        (0x8000, True),
        (0x8A8A, True),
        (0xFFFF, True),
    ],
)
def test_mandatory_flag(ext_type: int, mandatory: bool) -> None:
    ext = ECHConfigExtension(ext_type, b"")
    assert ext.mandatory is mandatory
    config = ECHConfig(1, 0x20, b"k", (SymmetricSuite(1, 1),), 0, "a.example", (ext,))
    assert config.has_unknown_mandatory_extension is mandatory


# --- length errors ----------------------------------------------------------------------------


def full_list() -> bytes:
    exts = b"\x00\x0b" + b"\x1a\x1a\x00\x00" + b"\x00\x05\x00\x03abc"
    two_suites = b"\x00\x08\x00\x01\x00\x01\x00\x01\x00\x03"
    return as_list(
        config_entry(0xFE0A, b"xyz"),
        config_entry(ECH_VERSION, contents(suites=two_suites, extensions=exts)),
        VECTOR[2:],
    )


def test_every_truncation_raises_config_error() -> None:
    data = full_list()
    decode_config_list(data)
    for cut in range(len(data)):
        with pytest.raises(ConfigError):
            decode_config_list(data[:cut])


def test_every_truncation_of_single_config_raises_config_error() -> None:
    for data, decode in (
        (KAT_CONFIG, ECHConfig.decode),
        (KAT_CONFIG[4:], ECHConfig.decode_contents),
    ):
        for cut in range(len(data)):
            with pytest.raises(ECHConfigDecodeError):
                decode(data[:cut])


def test_every_inner_length_corruption_raises_config_error_only() -> None:
    # Corrupt every byte in turn (all 256 values): only ConfigError may escape.
    data = full_list()
    for pos in range(len(data)):
        for value in range(256):
            mutated = data[:pos] + bytes((value,)) + data[pos + 1 :]
            with contextlib.suppress(ConfigError):
                decode_config_list(mutated)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x00\x00",  # empty list: ECHConfigList<4..2^16-1>
        b"\x00\x03\xfe\x0d\x00",
        as_list(VECTOR[2:]) + b"\x00",  # trailing bytes after the list
        b"\x00\x3f" + VECTOR[2:],  # list length too long
        b"\x00\x3d" + VECTOR[2:],  # list length too short
        as_list(b"\xfe\x0d\x00\x3b" + VECTOR[6:]),  # config length too long
        as_list(b"\xfe\x0d\x00\x39" + VECTOR[6:]),  # config length too short
        as_list(config_entry(ECH_VERSION, contents() + b"\x00")),  # trailing contents
        as_list(config_entry(ECH_VERSION, contents(public_key=b"\x00\x00"))),  # pk<1..>
        as_list(config_entry(ECH_VERSION, contents(public_key=b"\x00\x21" + bytes(32)))),
        as_list(config_entry(ECH_VERSION, contents(suites=b"\x00\x00"))),  # suites<4..>
        as_list(config_entry(ECH_VERSION, contents(suites=b"\x00\x02\x00\x01"))),
        as_list(config_entry(ECH_VERSION, contents(suites=b"\x00\x06\x00\x01\x00\x01\x00\x01"))),
        as_list(config_entry(ECH_VERSION, contents(name=b"\x00"))),  # public_name<1..255>
        as_list(config_entry(ECH_VERSION, contents(name=b"\x0fpublic.example"))),
        as_list(config_entry(ECH_VERSION, contents(name=b"\x05caf\xc3\xa9"))),  # not ASCII
        as_list(config_entry(ECH_VERSION, contents(extensions=b"\x00\x01"))),
        as_list(config_entry(ECH_VERSION, contents(extensions=b"\x00\x03\x00\x05\x00"))),
        as_list(config_entry(ECH_VERSION, contents(extensions=b"\x00\x04\x00\x05\x00\x01"))),
        as_list(config_entry(ECH_VERSION, contents(extensions=b"\x00\x06\x00\x05\x00\x03ab"))),
    ],
)
def test_length_errors(data: bytes) -> None:
    with pytest.raises(ECHConfigDecodeError) as info:
        decode_config_list(data)
    assert isinstance(info.value, ConfigError)


def test_constructor_range_checks() -> None:
    suite = (SymmetricSuite(1, 1),)
    for kwargs in (
        {"config_id": 256},
        {"config_id": -1},
        {"maximum_name_length": 256},
        {"public_key": b""},
        {"cipher_suites": ()},
        {"public_name": ""},
        {"public_name": "x" * 256},
        {"public_name": "café.example"},
    ):
        args: dict[str, Any] = {
            "config_id": 1,
            "kem_id": 0x20,
            "public_key": b"k",
            "cipher_suites": suite,
            "maximum_name_length": 0,
            "public_name": "a.example",
        }
        args.update(kwargs)
        with pytest.raises(ValueError):
            ECHConfig(**args)


def test_algorithm_names() -> None:
    """One table names KEMs, KDFs and AEADs for descriptions and for options."""
    assert kem_name(0x0020) == algorithm_name("KEM", 0x0020) == "DHKEM(X25519)"
    assert algorithm_name("KEM", 0x0011) == "KEM 0x0011"
    assert algorithm_name("AEAD", 0x0001) == "AES-128-GCM"
    assert algorithm_name("KDF", 0x0001) != algorithm_name("AEAD", 0x0001)
    assert str(SymmetricSuite(3, 0xFFFF)) == "HKDF-SHA512/export-only"
    assert str(SymmetricSuite(9, 9)) == "KDF 0x0009/AEAD 0x0009"
    assert option_names("KEM") == {"x25519": 0x0020, "mlkem768-x25519": 0x647A}
    # Export-only has a name for descriptions but none a user can choose.
    assert 0xFFFF not in option_names("AEAD").values()
    assert option_names("AEAD")["chacha20-poly1305"] == 0x0003


def test_hex_preview() -> None:
    assert hex_preview(bytes(range(32))) == bytes(range(32)).hex()
    assert hex_preview(bytes(64)) == "00" * 64
    key = bytes(range(256)) * 4 + bytes(range(192))  # 1216 bytes, like X-Wing's
    assert hex_preview(key) == ("000102030405060708090a0b0c0d0e0f...b8b9babbbcbdbebf (1216 bytes)")


def test_describe_shows_a_short_key_whole_and_a_long_one_abbreviated() -> None:
    suite = (SymmetricSuite(1, 1),)
    short = ECHConfig(1, 0x0020, bytes(range(32)), suite, 0, "a.example").describe()
    assert f"  public_key: {bytes(range(32)).hex()}" in short.splitlines()
    assert "  kem: DHKEM(X25519) (0x0020)" in short.splitlines()
    long = ECHConfig(2, 0x647A, bytes(1216), suite, 0, "a.example").describe()
    assert "  kem: MLKEM768-X25519 (0x647a)" in long.splitlines()
    assert f"  public_key: {'00' * 16}...{'00' * 8} (1216 bytes)" in long.splitlines()
    assert max(len(line) for line in long.splitlines()) < 100


def test_encode_config_list_bounds() -> None:
    with pytest.raises(ValueError):
        encode_config_list([])


# --- validate_public_name (CFG-3) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("public.example", "public.example"),
        ("Public.Example", "public.example"),
        ("a", "a"),
        ("a-b.c0m", "a-b.c0m"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("1.2.3.example", "1.2.3.example"),
        ("0x1f.example", "0x1f.example"),
        ("foo.0xzz", "foo.0xzz"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),
    ],
)
def test_validate_public_name_accepts(name: str, expected: str) -> None:
    assert validate_public_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "1.2.3.4",
        "192.168.0.1",
        "example.123",
        "a..b",
        "foo.0x1f",
        "foo.0X1F",
        "0x7f000001",
        "-a.com",
        "a-.com",
        "a.-b.com",
        "",
        "a" * 64 + ".com",
        "com." + "b" * 64,
        ".example.com",
        "example.com.",
        "bad name.example",
        "under_score.example",
        "café.example",
        ".".join(["a" * 63] * 4),  # 255 characters
    ],
)
def test_validate_public_name_refuses(name: str) -> None:
    with pytest.raises(ConfigError):
        validate_public_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "public.example\n",
        "1.2.3.4\n",  # would also slip past the IPv4 check
        "a\n.example",
    ],
)
def test_validate_public_name_refuses_newlines(name: str) -> None:
    # A public_name read from a file or a command line may carry a newline;
    # it is not an LDH label and must not end up in an ECHConfig.
    with pytest.raises(ConfigError):
        validate_public_name(name)


# --- parse_config_list_text ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        VECTOR_BASE64,
        f'"{VECTOR_BASE64}"',
        VECTOR_BASE64[:40] + "\n" + VECTOR_BASE64[40:] + "\n",
        "  " + VECTOR_BASE64 + "\t\n",
        VECTOR.hex(),
        VECTOR.hex().upper(),
        " ".join(VECTOR.hex()[i : i + 8] for i in range(0, len(VECTOR.hex()), 8)),
        VECTOR.hex()[:60] + "\n" + VECTOR.hex()[60:],
    ],
)
def test_parse_config_list_text(text: str) -> None:
    assert parse_config_list_text(text) == VECTOR


@pytest.mark.parametrize("text", ["AD7+DQ!!", "not base64 at all", "AD7", "abc", "zz"])
def test_parse_config_list_text_refuses(text: str) -> None:
    with pytest.raises(ECHConfigDecodeError):
        parse_config_list_text(text)


def test_parse_config_list_text_kat() -> None:
    text = base64.b64encode(KAT_LIST).decode()
    assert (
        decode_config_list(parse_config_list_text(text)).configs[0].public_name == "public.example"
    )


# --- property tests ---------------------------------------------------------------------------

suites_strategy = st.lists(
    st.builds(SymmetricSuite, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    min_size=1,
    max_size=6,
).map(tuple)

extensions_strategy = st.lists(
    st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)),
    max_size=5,
    unique_by=lambda pair: pair[0],
).map(lambda pairs: tuple(ECHConfigExtension(t, d) for t, d in pairs))

configs = st.builds(
    ECHConfig,
    config_id=st.integers(0, 255),
    kem_id=st.integers(0, 0xFFFF),
    public_key=st.binary(min_size=1, max_size=133),
    cipher_suites=suites_strategy,
    maximum_name_length=st.integers(0, 255),
    public_name=st.text(st.characters(max_codepoint=127), min_size=1, max_size=255),
    extensions=extensions_strategy,
)


@settings(max_examples=300, deadline=None)
@given(configs)
def test_config_round_trip(config: ECHConfig) -> None:
    encoded = config.encode()
    assert encoded[:2] == b"\xfe\x0d"
    assert int.from_bytes(encoded[2:4], "big") == len(encoded) - 4
    decoded = ECHConfig.decode(encoded)
    assert decoded == config
    assert decoded.encode() == encoded
    assert ECHConfig.decode_contents(encoded[4:]) == config


@settings(max_examples=200, deadline=None)
@given(st.lists(configs, min_size=1, max_size=4))
def test_list_round_trip(items: list[ECHConfig]) -> None:
    data = encode_config_list(items)
    decoded = decode_config_list(data)
    assert decoded.configs == tuple(items)
    assert decoded.skipped_versions == ()
    assert encode_config_list(decoded.configs) == data


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            configs,
            st.tuples(
                st.integers(0, 0xFFFF).filter(lambda v: v != ECH_VERSION), st.binary(max_size=30)
            ),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_list_with_unknown_versions_round_trip(
    items: list[ECHConfig | tuple[int, bytes]],
) -> None:
    entries = [
        item.encode() if isinstance(item, ECHConfig) else config_entry(item[0], item[1])
        for item in items
    ]
    data = as_list(*entries)
    if len(data) < 6:
        return  # below the ECHConfigList<4..> minimum
    decoded = decode_config_list(data)
    assert decoded.configs == tuple(i for i in items if isinstance(i, ECHConfig))
    assert decoded.skipped_versions == tuple(i[0] for i in items if not isinstance(i, ECHConfig))


@settings(max_examples=200, deadline=None)
@given(st.lists(configs, min_size=1, max_size=3), st.data())
def test_truncated_list_raises_config_error(items: list[ECHConfig], data: st.DataObject) -> None:
    encoded = encode_config_list(items)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(ECHConfigDecodeError):
        decode_config_list(encoded[:cut])
