# -*- test-case-name: tests.test_hello -*-
"""ClientHello and ServerHello parsing and encoding, sans-IO (RFC 8446 §4.1).

A :class:`ClientHello` keeps the exact body it was parsed from and the offset
of every extension's data in it: the ECH AAD is computed over the bytes as
received (RFC 9849 §5.2) and the payload is located by its parsed offset,
never by searching for its value (checklist AAD-2, AAD-3).

Why this module is long: it is the one place the hello wire format is
written down, parsed (both hellos share the extension index) and encoded
(the probe and the tests build hellos with the same helpers); splitting the
encoders from the parser would put the two halves of each structure in
different files.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from echfront.errors import DecodeError, IllegalParameter, UnexpectedMessage

__all__ = [
    "EXT_ALPN",
    "EXT_ECH",
    "EXT_ECH_OUTER_EXTENSIONS",
    "EXT_KEY_SHARE",
    "EXT_PRE_SHARED_KEY",
    "EXT_SERVER_NAME",
    "EXT_SUPPORTED_VERSIONS",
    "HANDSHAKE_CLIENT_HELLO",
    "HANDSHAKE_SERVER_HELLO",
    "HRR_RANDOM",
    "TLS13",
    "ClientHello",
    "Extension",
    "ServerHello",
    "encode_alpn",
    "encode_client_hello_body",
    "encode_extensions",
    "encode_server_name",
    "encode_supported_versions",
    "handshake_message",
    "is_grease",
    "normalize_server_name",
]

HANDSHAKE_CLIENT_HELLO = 1
HANDSHAKE_SERVER_HELLO = 2

EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
EXT_PRE_SHARED_KEY = 0x0029
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_KEY_SHARE = 0x0033
#: RFC 9849 §5.1: ech_outer_extensions, only ever inside an EncodedClientHelloInner.
EXT_ECH_OUTER_EXTENSIONS = 0xFD00
#: RFC 9849 §5: encrypted_client_hello.
EXT_ECH = 0xFE0D

TLS13 = 0x0304

#: RFC 8446 §4.1.3: a HelloRetryRequest is a ServerHello with this random,
#: SHA-256("HelloRetryRequest").
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

#: The bytes a lower-cased host name may hold; bytes.translate deletes them
#: (what is left, if anything, is not a host name).
_HOSTNAME_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-_."


def is_grease(value: int) -> bool:
    """Whether a 16-bit codepoint is a GREASE value 0x?A?A (RFC 8701)."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


#: Every 16-bit GREASE value (RFC 8701 §2): 0x0A0A, 0x1A1A, ... 0xFAFA.
_GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))


class Extension(NamedTuple):
    """One extension as received.

    :ivar type: the ExtensionType.
    :ivar data: the extension_data bytes.
    :ivar offset: where ``data`` starts in the message body it came from.
    :ivar raw: the whole extension, type and length included, as received.
    """

    type: int
    data: bytes
    offset: int
    raw: bytes


_TYPE_AND_LENGTH = struct.Struct(">HH").unpack_from
#: server_name data read as one entry: (list length, name_type, name length).
_ONE_HOST_NAME = struct.Struct(">HBH").unpack_from


@functools.lru_cache(maxsize=128)
def _U16S(count: int) -> struct.Struct:
    """A Struct reading ``count`` big-endian uint16 values."""
    return struct.Struct(f">{count}H")


def _scan_extensions(body: bytes, pos: int) -> tuple[list[int], list[int]]:
    """Index the extension block ``body[pos:]`` (RFC 8446 §4.2) without copying it.

    The block ends the body (in both hellos).  This runs for every hello on
    the per-connection path, so it records only where each extension
    starts; :class:`Extension` values are built on demand.

    :returns: the types in wire order, and the start of each extension plus
        the block end.
    :raises DecodeError: on bad lengths.
    """
    types: list[int] = []
    bounds: list[int] = []
    add_type = types.append
    add_bound = bounds.append
    end = len(body)
    try:
        while pos < end:
            # A header cut short by the end of the body makes unpack_from
            # raise: one check fewer per extension than testing pos first.
            ext_type, length = _TYPE_AND_LENGTH(body, pos)
            add_type(ext_type)
            add_bound(pos)
            pos += 4 + length
    except struct.error:
        raise DecodeError("truncated extension header") from None
    if pos != end:
        raise DecodeError("the last extension overruns its block")
    bounds.append(end)
    return types, bounds


def _present(types: list[int]) -> frozenset[int]:
    """The set of types, refusing a repeated type.

    RFC 8446 §4.2: "There MUST NOT be more than one extension of the same type".
    """
    # A set, not a type -> position dict: on the benchmark machine a set of
    # 18 ints builds in under 1 µs, the dict in about 4, and a hello is
    # asked for only a handful of types (found by tuple.index, in C).
    present = frozenset(types)
    if len(present) != len(types):
        seen: set[int] = set()
        repeated = next(t for t in types if t in seen or seen.add(t))  # type: ignore[func-returns-value]
        raise DecodeError(f"extension 0x{repeated:04x} appears twice")
    return present


def normalize_server_name(raw: bytes) -> str:
    """Return a DNS host name from SNI bytes, lower-cased (RFC 6066 §3).

    Only A-labels are valid in SNI; a trailing dot, empty labels or bytes
    outside letters, digits, ``-``, ``_`` and ``.`` are refused.

    :raises IllegalParameter: for anything that is not a plausible host name.
    """
    name = raw.lower()
    if (
        not name
        or len(name) > 253
        or name.translate(None, _HOSTNAME_BYTES)
        or name[0] == 0x2E  # "."
        or name[-1] == 0x2E
        or b".." in name
    ):
        raise IllegalParameter("server_name is not a valid host name")
    return name.decode("ascii")


class _HelloBase:
    """Extension access shared by ClientHello and ServerHello.

    :ivar body: the message body as received.
    :ivar extension_types: extension types in the order the peer sent them.
    :ivar extension_bounds: where each extension starts in ``body``, then
        the end of the block: extension ``i`` is
        ``body[extension_bounds[i]:extension_bounds[i + 1]]``.
    """

    __slots__ = ("_present", "body", "extension_bounds", "extension_types")

    body: bytes
    extension_types: tuple[int, ...]
    extension_bounds: tuple[int, ...]
    _present: frozenset[int]

    def _index(self, body: bytes, pos: int) -> None:
        """Index the extension block that starts at ``pos`` and ends the body."""
        types, bounds = _scan_extensions(body, pos)
        self._present = _present(types)
        self.extension_types = tuple(types)
        self.extension_bounds = tuple(bounds)

    def _set_index(self, types: list[int], bounds: list[int]) -> None:
        self._present = _present(types)
        self.extension_types = tuple(types)
        self.extension_bounds = tuple(bounds)

    def _no_extensions(self) -> None:
        self.extension_types = self.extension_bounds = ()
        self._present = frozenset()

    def _extension(self, index: int) -> Extension:
        start = self.extension_bounds[index]
        end = self.extension_bounds[index + 1]
        body = self.body
        return Extension(
            self.extension_types[index], body[start + 4 : end], start + 4, body[start:end]
        )

    def get(self, ext_type: int) -> Extension | None:
        """Return the extension of ``ext_type``, or None."""
        if ext_type not in self._present:
            return None
        return self._extension(self.extension_types.index(ext_type))

    def extension_data(self, ext_type: int) -> bytes | None:
        """The extension_data of ``ext_type`` as received, or None (no Extension built)."""
        # These lookups are written out in each accessor (no shared helper):
        # they run several times per hello, and a call costs as much as the lookup.
        if ext_type not in self._present:
            return None
        index = self.extension_types.index(ext_type)
        bounds = self.extension_bounds
        return self.body[bounds[index] + 4 : bounds[index + 1]]

    def raw_extension(self, ext_type: int) -> bytes | None:
        """The whole extension of ``ext_type`` (type, length, data) as received, or None."""
        if ext_type not in self._present:
            return None
        index = self.extension_types.index(ext_type)
        return self.body[self.extension_bounds[index] : self.extension_bounds[index + 1]]

    def __contains__(self, ext_type: object) -> bool:
        """Whether an extension of that type is present."""
        return ext_type in self._present

    @property
    def extensions(self) -> tuple[Extension, ...]:
        """Every extension, in wire order (built on each access)."""
        return tuple(self._extension(i) for i in range(len(self.extension_types)))


class ClientHello(_HelloBase):
    """A parsed ClientHello body (RFC 8446 §4.1.2).

    Fields are the wire values; nothing is normalised or reordered.  SNI,
    ALPN and supported_versions are decoded on request by the methods below,
    since which of them matter depends on whether ECH was accepted (RFC 9849
    §7.1: the outer supported_versions is irrelevant when the inner decides).
    """

    __slots__ = (
        "cipher_suites",
        "compression_methods",
        "extensions_offset",
        "legacy_version",
        "random",
        "session_id",
    )

    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: bytes
    compression_methods: bytes
    extensions_offset: int

    @classmethod
    def from_message(cls, message: bytes) -> ClientHello:
        """Parse a whole handshake message (4-byte header + body)."""
        if len(message) < 4 or message[0] != HANDSHAKE_CLIENT_HELLO:
            raise UnexpectedMessage("not a ClientHello")
        if int.from_bytes(message[1:4], "big") != len(message) - 4:
            raise DecodeError("ClientHello length does not match its header")
        return cls.parse(message[4:])

    @classmethod
    def parse(cls, body: bytes) -> ClientHello:
        """Parse a ClientHello body.

        A body without an extension block is valid (pre-TLS-1.3 clients);
        anything after the extension block is not.

        :raises DecodeError: on any length or structure error.
        """
        self = cls.__new__(cls)
        start = self._parse_fields(body)
        if start is None:
            self._no_extensions()
        else:
            self._index(body, start)
        return self

    @classmethod
    def from_parts(cls, body: bytes, types: list[int], bounds: list[int]) -> ClientHello:
        """A ClientHello whose extension index its builder already knows.

        The decoder assembles the ClientHelloInner extension by extension;
        scanning the result again would repeat that work on the
        per-connection path.  The fixed fields are still parsed and checked,
        the index must span the whole extension block, and a repeated type
        is refused exactly as :meth:`parse` refuses it.

        :raises DecodeError: if the body and the index disagree.
        """
        self = cls.__new__(cls)
        start = self._parse_fields(body)
        if start is None or not bounds or bounds[0] != start or bounds[-1] != len(body):
            raise DecodeError("ClientHello extension index does not match its body")
        self._set_index(types, bounds)
        return self

    @classmethod
    def assembled(
        cls,
        body: bytes,
        *,
        legacy_version: int,
        random: bytes,
        session_id: bytes,
        cipher_suites: bytes,
        compression_methods: bytes,
        types: list[int],
        bounds: list[int],
    ) -> ClientHello:
        """A ClientHello its builder assembled field by field (the ECH decoder's inner).

        The builder has checked the fixed fields as :meth:`parse` would
        (lengths, non-empty lists) while writing ``body``; only the
        extension index is checked here: a repeated type is refused exactly
        as :meth:`parse` refuses it.

        :raises DecodeError: for a repeated extension type.
        """
        self = cls.__new__(cls)
        self.body = body
        self.legacy_version = legacy_version
        self.random = random
        self.session_id = session_id
        self.cipher_suites = cipher_suites
        self.compression_methods = compression_methods
        self.extensions_offset = bounds[0]
        self._set_index(types, bounds)
        return self

    def _parse_fields(self, body: bytes) -> int | None:
        """Parse everything before the extensions; return where they start.

        :returns: the offset of the first extension, or None when the body
            has no extension block at all.
        """
        self.body = body
        end = len(body)
        if end < 35:
            raise DecodeError("ClientHello too short")
        self.legacy_version = (body[0] << 8) | body[1]
        self.random = body[2:34]
        sid_len = body[34]
        if sid_len > 32:
            raise DecodeError("legacy_session_id longer than 32 bytes")
        pos = 35 + sid_len
        if pos + 2 > end:
            raise DecodeError("ClientHello truncated in legacy_session_id")
        self.session_id = body[35:pos]
        cs_len = (body[pos] << 8) | body[pos + 1]
        pos += 2
        if cs_len < 2 or cs_len % 2 or pos + cs_len + 1 > end:
            raise DecodeError("bad cipher_suites length")
        self.cipher_suites = body[pos : pos + cs_len]
        pos += cs_len
        cm_len = body[pos]
        pos += 1
        if cm_len < 1 or pos + cm_len > end:
            raise DecodeError("bad legacy_compression_methods length")
        self.compression_methods = body[pos : pos + cm_len]
        pos += cm_len
        if pos == end:
            self.extensions_offset = pos
            return None
        if pos + 2 > end:
            raise DecodeError("truncated extensions length")
        ext_len = (body[pos] << 8) | body[pos + 1]
        pos += 2
        self.extensions_offset = pos
        if pos + ext_len != end:
            raise DecodeError("extensions length does not match the ClientHello")
        return pos

    @property
    def message(self) -> bytes:
        """The handshake message: 4-byte header and body."""
        return handshake_message(HANDSHAKE_CLIENT_HELLO, self.body)

    def server_name(self) -> str | None:
        """The host_name of server_name (RFC 6066 §3), lower-cased, or None.

        :raises DecodeError: for a malformed extension.
        :raises IllegalParameter: for a name that is not a host name.
        """
        data = self.extension_data(EXT_SERVER_NAME)
        if data is None:
            return None
        end = len(data)
        if end > 5 and _ONE_HOST_NAME(data) == (end - 2, 0, end - 5):
            # The usual list: one host_name entry that fills it.
            return normalize_server_name(data[5:])
        if end < 2 or (data[0] << 8) | data[1] != end - 2 or end == 2:
            raise DecodeError("bad server_name list length")
        pos = 2
        host_name: bytes | None = None
        while pos < end:
            if pos + 3 > end:
                raise DecodeError("truncated server_name entry")
            name_type = data[pos]
            length = (data[pos + 1] << 8) | data[pos + 2]
            pos += 3
            if length == 0 or pos + length > end:
                raise DecodeError("bad server_name entry length")
            if name_type == 0:
                if host_name is not None:
                    raise IllegalParameter("two host_name entries in server_name")
                host_name = data[pos : pos + length]
            pos += length
        return None if host_name is None else normalize_server_name(host_name)

    def alpn_protocols(self) -> tuple[bytes, ...]:
        """The offered ALPN protocol names (RFC 7301 §3.1), in order.

        :raises DecodeError: for a malformed extension or an empty name.
        """
        data = self.extension_data(EXT_ALPN)
        if data is None:
            return ()
        end = len(data)
        if end < 3 or (data[0] << 8) | data[1] != end - 2:
            raise DecodeError("bad ALPN list length")
        names = []
        pos = 2
        while pos < end:
            length = data[pos]
            pos += 1
            if length == 0 or pos + length > end:
                raise DecodeError("bad ALPN protocol name length")
            names.append(data[pos : pos + length])
            pos += length
        return tuple(names)

    def supported_versions(self) -> tuple[int, ...] | None:
        """The supported_versions list (RFC 8446 §4.2.1), or None if absent.

        :raises DecodeError: for a malformed extension.
        """
        data = self.extension_data(EXT_SUPPORTED_VERSIONS)
        if data is None:
            return None
        if len(data) < 3 or data[0] != len(data) - 1 or data[0] % 2:
            raise DecodeError("bad supported_versions length")
        return _U16S(data[0] // 2).unpack_from(data, 1)

    def offers_tls13_only(self) -> bool:
        """Whether supported_versions offers TLS 1.3 and nothing older.

        GREASE values are ignored.  This is the RFC 9849 §7.1 condition on a
        ClientHelloInner ("MUST NOT offer TLS 1.2 or below").
        """
        versions = self.supported_versions()
        if not versions:
            return False
        real = set(versions) - _GREASE
        return TLS13 in real and min(real) >= TLS13

    @property
    def has_key_share(self) -> bool:
        """Whether a key_share extension is present."""
        return EXT_KEY_SHARE in self._present


class ServerHello(_HelloBase):
    """A parsed ServerHello or HelloRetryRequest body (RFC 8446 §4.1.3)."""

    __slots__ = ("cipher_suite", "legacy_version", "random", "session_id")

    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suite: int

    @classmethod
    def from_message(cls, message: bytes) -> ServerHello:
        """Parse a whole handshake message (4-byte header + body)."""
        if len(message) < 4 or message[0] != HANDSHAKE_SERVER_HELLO:
            raise UnexpectedMessage("not a ServerHello")
        if int.from_bytes(message[1:4], "big") != len(message) - 4:
            raise DecodeError("ServerHello length does not match its header")
        body = message[4:]
        self = cls.__new__(cls)
        self.body = body
        end = len(body)
        if end < 38:
            raise DecodeError("ServerHello too short")
        self.legacy_version = (body[0] << 8) | body[1]
        self.random = body[2:34]
        sid_len = body[34]
        pos = 35 + sid_len
        if sid_len > 32 or pos + 3 > end:
            raise DecodeError("bad ServerHello legacy_session_id_echo")
        self.session_id = body[35:pos]
        self.cipher_suite = (body[pos] << 8) | body[pos + 1]
        pos += 3  # cipher_suite and legacy_compression_method
        if pos == end:
            self._no_extensions()
            return self
        if pos + 2 > end or pos + 2 + ((body[pos] << 8) | body[pos + 1]) != end:
            raise DecodeError("bad ServerHello extensions length")
        self._index(body, pos + 2)
        return self

    @property
    def is_hello_retry_request(self) -> bool:
        """Whether this is a HelloRetryRequest (RFC 8446 §4.1.3)."""
        return self.random == HRR_RANDOM


def handshake_message(msg_type: int, body: bytes) -> bytes:
    """Prefix ``body`` with a handshake header (RFC 8446 §4)."""
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


def encode_extensions(extensions: Iterable[tuple[int, bytes]]) -> bytes:
    """Encode (type, data) pairs as an extension block with its length."""
    block = b"".join(t.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d for t, d in extensions)
    return len(block).to_bytes(2, "big") + block


def encode_server_name(host: bytes) -> bytes:
    """server_name extension data with one host_name (RFC 6066 §3)."""
    entry = b"\x00" + len(host).to_bytes(2, "big") + host
    return len(entry).to_bytes(2, "big") + entry


def encode_alpn(protocols: Sequence[bytes]) -> bytes:
    """application_layer_protocol_negotiation extension data (RFC 7301 §3.1)."""
    names = b"".join(bytes((len(p),)) + p for p in protocols)
    return len(names).to_bytes(2, "big") + names


def encode_supported_versions(versions: Sequence[int]) -> bytes:
    """ClientHello supported_versions extension data (RFC 8446 §4.2.1)."""
    return bytes((2 * len(versions),)) + b"".join(v.to_bytes(2, "big") for v in versions)


def encode_client_hello_body(
    *,
    random: bytes,
    session_id: bytes,
    cipher_suites: Sequence[int] | bytes,
    extensions: Iterable[tuple[int, bytes]],
    legacy_version: int = 0x0303,
    compression_methods: bytes = b"\x00",
) -> bytes:
    """Encode a ClientHello body (RFC 8446 §4.1.2)."""
    suites = (
        cipher_suites
        if isinstance(cipher_suites, bytes)
        else b"".join(s.to_bytes(2, "big") for s in cipher_suites)
    )
    return b"".join(
        (
            legacy_version.to_bytes(2, "big"),
            random,
            bytes((len(session_id),)),
            session_id,
            len(suites).to_bytes(2, "big"),
            suites,
            bytes((len(compression_methods),)),
            compression_methods,
            encode_extensions(extensions),
        )
    )
