# -*- test-case-name: tests.test_echconfig -*-
"""ECHConfig and ECHConfigList encoding and decoding (RFC 9849 §4).

Decoding is strict about every length, so that decoding then encoding
yields the same bytes: the HPKE ``info`` string is built from the encoding
and must equal what clients hashed (RFC 9849 §7.1, checklist DEC-4).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from echfront.errors import ConfigError

__all__ = [
    "AEAD_AES_128_GCM",
    "AEAD_AES_256_GCM",
    "AEAD_CHACHA20_POLY1305",
    "AEAD_EXPORT_ONLY",
    "ECH_VERSION",
    "GREASE_EXTENSION_TYPES",
    "HPKE_ALGORITHMS",
    "KDF_HKDF_SHA256",
    "KDF_HKDF_SHA384",
    "KDF_HKDF_SHA512",
    "KEM_DHKEM_P256",
    "KEM_MLKEM768_X25519",
    "KEM_X25519_HKDF_SHA256",
    "POST_QUANTUM_KEMS",
    "ECHConfig",
    "ECHConfigExtension",
    "HPKEAlgorithm",
    "SymmetricSuite",
    "algorithm_name",
    "decode_config_list",
    "encode_config_list",
    "hex_preview",
    "kem_name",
    "option_names",
    "parse_config_list_text",
    "validate_public_name",
]

#: RFC 9849 §4: the ECHConfig version this front speaks.
ECH_VERSION = 0xFE0D

#: HPKE identifiers (RFC 9180 §7.1-§7.3).
KEM_DHKEM_P256 = 0x0010
KEM_X25519_HKDF_SHA256 = 0x0020
#: MLKEM768-X25519, a.k.a. X-Wing (draft-ietf-hpke-pq §3; IANA HPKE KEM 0x647a).
KEM_MLKEM768_X25519 = 0x647A
#: KEMs whose shared secret stays secret if X25519 falls to a quantum computer.
POST_QUANTUM_KEMS = frozenset((KEM_MLKEM768_X25519,))
KDF_HKDF_SHA256 = 0x0001
KDF_HKDF_SHA384 = 0x0002
KDF_HKDF_SHA512 = 0x0003
AEAD_AES_128_GCM = 0x0001
AEAD_AES_256_GCM = 0x0002
AEAD_CHACHA20_POLY1305 = 0x0003
#: An export-only AEAD cannot open ciphertext; it is never accepted (checklist CFG-8).
AEAD_EXPORT_ONLY = 0xFFFF

#: RFC 9849 §11.3: the reserved ECHConfig extension types, never to be
#: registered, for GREASE (§6.2.2): 0x0000 ... 0x7A7A have the high bit
#: clear (clients ignore them), 0x8A8A ... 0xFAFA set (clients skip the config).
GREASE_EXTENSION_TYPES = (
    0x0000, 0x1A1A, 0x2A2A, 0x3A3A, 0x4A4A, 0x5A5A, 0x6A6A, 0x7A7A,
    0x8A8A, 0x9A9A, 0xAAAA, 0xBABA, 0xCACA, 0xDADA, 0xEAEA, 0xFAFA,
)  # fmt: skip

#: Public keys longer than this many bytes are abbreviated in descriptions:
#: an X25519 key (32) is shown whole, an X-Wing key (1216) is not.
_SHOWN_KEY_BYTES = 64


@dataclass(frozen=True, slots=True)
class HPKEAlgorithm:
    """An HPKE algorithm identifier and its names (RFC 9180 §7.1-§7.3).

    :ivar kind: ``"KEM"``, ``"KDF"`` or ``"AEAD"``.
    :ivar id: the IANA identifier.
    :ivar name: the name in descriptions and logs, e.g. ``DHKEM(X25519)``.
    :ivar option: the name in configuration files and on the command line,
        e.g. ``x25519``; empty for an algorithm echfront cannot use.
    """

    kind: str
    id: int
    name: str
    option: str = ""


#: The one table of HPKE algorithm names: descriptions, ``[keys] kems``,
#: ``echfront keygen --kem/--suite`` and ``echfront keys --kem`` all read it.
HPKE_ALGORITHMS = (
    HPKEAlgorithm("KEM", KEM_DHKEM_P256, "DHKEM(P-256)"),
    HPKEAlgorithm("KEM", KEM_X25519_HKDF_SHA256, "DHKEM(X25519)", "x25519"),
    HPKEAlgorithm("KEM", KEM_MLKEM768_X25519, "MLKEM768-X25519", "mlkem768-x25519"),
    HPKEAlgorithm("KDF", KDF_HKDF_SHA256, "HKDF-SHA256", "hkdf-sha256"),
    HPKEAlgorithm("KDF", KDF_HKDF_SHA384, "HKDF-SHA384", "hkdf-sha384"),
    HPKEAlgorithm("KDF", KDF_HKDF_SHA512, "HKDF-SHA512", "hkdf-sha512"),
    HPKEAlgorithm("AEAD", AEAD_AES_128_GCM, "AES-128-GCM", "aes-128-gcm"),
    HPKEAlgorithm("AEAD", AEAD_AES_256_GCM, "AES-256-GCM", "aes-256-gcm"),
    HPKEAlgorithm("AEAD", AEAD_CHACHA20_POLY1305, "ChaCha20Poly1305", "chacha20-poly1305"),
    HPKEAlgorithm("AEAD", AEAD_EXPORT_ONLY, "export-only"),
)
_NAMES = {(a.kind, a.id): a.name for a in HPKE_ALGORITHMS}

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class ECHConfigDecodeError(ConfigError):
    """An ECHConfig or ECHConfigList that does not decode."""


def algorithm_name(kind: str, ident: int) -> str:
    """A readable name for an HPKE identifier of ``kind`` (``KEM 0x0011`` if unknown)."""
    return _NAMES.get((kind, ident), f"{kind} 0x{ident:04x}")


def kem_name(kem_id: int) -> str:
    """A readable name for an HPKE KEM identifier."""
    return algorithm_name("KEM", kem_id)


def option_names(kind: str) -> dict[str, int]:
    """Configuration and command-line names of the usable algorithms of ``kind``."""
    return {a.option: a.id for a in HPKE_ALGORITHMS if a.kind == kind and a.option}


@dataclass(frozen=True, slots=True)
class SymmetricSuite:
    """An HpkeSymmetricCipherSuite: a KDF and an AEAD (RFC 9849 §4)."""

    kdf_id: int
    aead_id: int

    def __str__(self) -> str:
        """Return a readable name such as ``HKDF-SHA256/AES-128-GCM``."""
        return f"{algorithm_name('KDF', self.kdf_id)}/{algorithm_name('AEAD', self.aead_id)}"


@dataclass(frozen=True, slots=True)
class ECHConfigExtension:
    """One ECHConfigExtension; bit 0x8000 of the type marks it mandatory (§4.2)."""

    type: int
    data: bytes

    @property
    def mandatory(self) -> bool:
        """Whether a client that does not know this type must skip the config."""
        return bool(self.type & 0x8000)


@dataclass(frozen=True, slots=True)
class ECHConfig:
    """An ECHConfig of version 0xfe0d (RFC 9849 §4).

    :ivar config_id: one byte that lets the server pick the key (§4.1).
    :ivar kem_id: the HPKE KEM of ``public_key``.
    :ivar public_key: the HPKE public key, KEM-encoded.
    :ivar cipher_suites: the (KDF, AEAD) pairs a client may use.
    :ivar maximum_name_length: longest inner name clients should pad to.
    :ivar public_name: the name in the ClientHelloOuter and the name whose
        certificate authenticates a rejection (§6.1.7).
    :ivar extensions: ECHConfigExtensions, in wire order.
    """

    config_id: int
    kem_id: int
    public_key: bytes
    cipher_suites: tuple[SymmetricSuite, ...]
    maximum_name_length: int
    public_name: str
    extensions: tuple[ECHConfigExtension, ...] = ()
    _encoded: bytes = field(init=False, repr=False, compare=False)
    _suite_pairs: frozenset[tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check field ranges and cache the encoding."""
        if not 0 <= self.config_id <= 255:
            raise ValueError("config_id must be 0..255")
        if not 0 <= self.maximum_name_length <= 255:
            raise ValueError("maximum_name_length must be 0..255")
        if not 1 <= len(self.public_key) <= 0xFFFF:
            raise ValueError("public_key must be 1..65535 bytes")
        if not 1 <= len(self.cipher_suites) <= 0x3FFF:
            raise ValueError("cipher_suites must hold 1..16383 suites")
        if not self.public_name.isascii():
            raise ValueError("public_name must be ASCII")
        name = self.public_name.encode("ascii")
        if not 1 <= len(name) <= 255:
            raise ValueError("public_name must be 1..255 bytes")
        types = [ext.type for ext in self.extensions]
        if len(types) != len(set(types)):
            raise ValueError("ECHConfig extension types must not repeat")
        object.__setattr__(self, "_encoded", self._encode(name))
        # Checked for every ClientHello that names this config (DEC-3).
        pairs = frozenset((s.kdf_id, s.aead_id) for s in self.cipher_suites)
        object.__setattr__(self, "_suite_pairs", pairs)

    def _encode(self, name: bytes) -> bytes:
        suites = b"".join(
            s.kdf_id.to_bytes(2, "big") + s.aead_id.to_bytes(2, "big") for s in self.cipher_suites
        )
        exts = b"".join(
            e.type.to_bytes(2, "big") + len(e.data).to_bytes(2, "big") + e.data
            for e in self.extensions
        )
        contents = b"".join(
            (
                bytes((self.config_id,)),
                self.kem_id.to_bytes(2, "big"),
                len(self.public_key).to_bytes(2, "big"),
                self.public_key,
                len(suites).to_bytes(2, "big"),
                suites,
                bytes((self.maximum_name_length, len(name))),
                name,
                len(exts).to_bytes(2, "big"),
                exts,
            )
        )
        if len(contents) > 0xFFFF:
            raise ValueError("ECHConfig longer than 65535 bytes")
        return ECH_VERSION.to_bytes(2, "big") + len(contents).to_bytes(2, "big") + contents

    def encode(self) -> bytes:
        """Return the ECHConfig: version, length and contents (§4)."""
        return self._encoded

    @property
    def has_unknown_mandatory_extension(self) -> bool:
        """Whether a mandatory extension is present; this front knows none (§4.2)."""
        return any(ext.mandatory for ext in self.extensions)

    def supports(self, kdf_id: int, aead_id: int) -> bool:
        """Whether the config lists this (KDF, AEAD) pair (checklist DEC-3)."""
        return (kdf_id, aead_id) in self._suite_pairs

    @property
    def kem_name(self) -> str:
        """A readable KEM name."""
        return kem_name(self.kem_id)

    @classmethod
    def decode_contents(cls, contents: bytes) -> ECHConfig:
        """Decode ECHConfigContents, the body of a version-0xfe0d ECHConfig.

        :raises ECHConfigDecodeError: on any length or range error.
        """
        reader = _Reader(contents)
        config_id = reader.u8()
        kem_id = reader.u16()
        public_key = reader.vector(2, minimum=1)
        suites_raw = reader.vector(2, minimum=4)
        if len(suites_raw) % 4:
            raise ECHConfigDecodeError("cipher_suites length is not a multiple of 4")
        suites = tuple(
            SymmetricSuite(
                int.from_bytes(suites_raw[i : i + 2], "big"),
                int.from_bytes(suites_raw[i + 2 : i + 4], "big"),
            )
            for i in range(0, len(suites_raw), 4)
        )
        maximum_name_length = reader.u8()
        raw_name = reader.vector(1, minimum=1)
        try:
            public_name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise ECHConfigDecodeError("public_name is not ASCII") from None
        ext_reader = _Reader(reader.vector(2))
        extensions = []
        seen = set()
        while ext_reader.remaining:
            ext_type = ext_reader.u16()
            if ext_type in seen:
                raise ECHConfigDecodeError(f"extension 0x{ext_type:04x} repeats")
            seen.add(ext_type)
            extensions.append(ECHConfigExtension(ext_type, ext_reader.vector(2)))
        if reader.remaining:
            raise ECHConfigDecodeError("trailing bytes after ECHConfig extensions")
        return cls(
            config_id,
            kem_id,
            public_key,
            suites,
            maximum_name_length,
            public_name,
            tuple(extensions),
        )

    @classmethod
    def decode(cls, data: bytes) -> ECHConfig:
        """Decode one whole ECHConfig of version 0xfe0d.

        :raises ECHConfigDecodeError: for another version or bad lengths.
        """
        reader = _Reader(data)
        version = reader.u16()
        contents = reader.vector(2)
        if reader.remaining:
            raise ECHConfigDecodeError("trailing bytes after ECHConfig")
        if version != ECH_VERSION:
            raise ECHConfigDecodeError(f"unsupported ECHConfig version 0x{version:04x}")
        return cls.decode_contents(contents)

    def describe(self) -> str:
        """A multi-line readable description (used by ``echfront inspect``)."""
        lines = [
            f"ECHConfig version 0x{ECH_VERSION:04x}",
            f"  config_id: {self.config_id}",
            f"  public_name: {self.public_name}",
            f"  kem: {self.kem_name} (0x{self.kem_id:04x})",
            f"  public_key: {hex_preview(self.public_key)}",
            "  cipher_suites: " + ", ".join(str(s) for s in self.cipher_suites),
            f"  maximum_name_length: {self.maximum_name_length}",
        ]
        if self.extensions:
            for ext in self.extensions:
                marks = ["mandatory"] if ext.mandatory else []
                if ext.type in GREASE_EXTENSION_TYPES:
                    marks.append("reserved: GREASE, RFC 9849 §6.2.2")
                flag = f" ({', '.join(marks)})" if marks else ""
                lines.append(f"  extension 0x{ext.type:04x}{flag}: {ext.data.hex() or '(empty)'}")
        else:
            lines.append("  extensions: none")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class DecodedConfigList:
    """Result of decoding an ECHConfigList.

    :ivar configs: the version-0xfe0d configs, in order.
    :ivar skipped_versions: versions of entries skipped as unknown (§4).
    """

    configs: tuple[ECHConfig, ...]
    skipped_versions: tuple[int, ...]


def encode_config_list(configs: Iterable[ECHConfig]) -> bytes:
    """Encode an ECHConfigList: a 2-byte length and the configs (§4).

    :raises ValueError: for an empty list or one longer than 65535 bytes.
    """
    body = b"".join(config.encode() for config in configs)
    if not 4 <= len(body) <= 0xFFFF:
        raise ValueError("ECHConfigList must be 4..65535 bytes")
    return len(body).to_bytes(2, "big") + body


def decode_config_list(data: bytes) -> DecodedConfigList:
    """Decode an ECHConfigList, skipping versions other than 0xfe0d (§4).

    :raises ECHConfigDecodeError: on bad lengths, or if nothing is in the list.
    """
    reader = _Reader(data)
    body = _Reader(reader.vector(2, minimum=4))
    if reader.remaining:
        raise ECHConfigDecodeError("trailing bytes after ECHConfigList")
    configs = []
    skipped = []
    while body.remaining:
        version = body.u16()
        contents = body.vector(2)
        if version == ECH_VERSION:
            configs.append(ECHConfig.decode_contents(contents))
        else:
            skipped.append(version)
    return DecodedConfigList(tuple(configs), tuple(skipped))


def parse_config_list_text(text: str) -> bytes:
    """Turn base64 (as in DNS ``ech=``) or hex text into ECHConfigList bytes.

    :raises ECHConfigDecodeError: if the text is neither.
    """
    compact = "".join(text.split()).strip('"')
    if compact and all(c in "0123456789abcdefABCDEF" for c in compact) and len(compact) % 2 == 0:
        return bytes.fromhex(compact)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ECHConfigDecodeError("not base64 or hex") from None


def hex_preview(data: bytes, limit: int = _SHOWN_KEY_BYTES) -> str:
    """Hex of ``data``, or for more than ``limit`` bytes its ends and length.

    A post-quantum public key is 1216 bytes (2432 hex digits): whole, it
    would bury everything else ``echfront inspect`` prints.  The first 16
    and last 8 bytes are enough to tell keys apart by eye.
    """
    if len(data) <= limit:
        return data.hex()
    return f"{data[:16].hex()}...{data[-8:].hex()} ({len(data)} bytes)"


def validate_public_name(name: str) -> str:
    """Check a public_name is a DNS name as RFC 9849 §6.1.7 requires, and return it.

    LDH labels of 1..63 octets, no leading or trailing dot, and a last label
    that is not all digits and not a ``0x`` hex number (so the name cannot be
    read as an IPv4 address; checklist CFG-3).

    :raises ConfigError: naming the problem.
    """
    if not name.isascii():
        # Checked before lower-casing: str.lower() maps some non-ASCII
        # letters (the Kelvin sign) to ASCII ones.
        raise ConfigError(f"public name {name!r} must be ASCII (use the A-label form)")
    lowered = name.lower()
    if not 1 <= len(lowered) <= 253:
        raise ConfigError(f"public name {name!r} must be 1..253 characters")
    labels = lowered.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ConfigError(f"public name {name!r} has an invalid label {label!r}")
    last = labels[-1]
    if last.isdigit() or re.fullmatch(r"0x[0-9a-f]*", last):
        raise ConfigError(f"public name {name!r} looks like an IP address")
    return lowered


class _Reader:
    """A bounds-checked cursor over bytes; every failure is an ECHConfigDecodeError."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, count: int) -> bytes:
        if count > self.remaining:
            raise ECHConfigDecodeError("truncated ECHConfig data")
        start = self._pos
        self._pos += count
        return self._data[start : self._pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_bytes: int, minimum: int = 0) -> bytes:
        length = int.from_bytes(self.take(length_bytes), "big")
        if length < minimum:
            raise ECHConfigDecodeError(f"vector of {length} bytes, at least {minimum} required")
        return self.take(length)
