"""A test-side ECH client: builds ClientHelloOuter records as a client does.

It follows RFC 9849 §6.1 independently of :mod:`echfront.ech.decoder`: the
ClientHelloInner is described by an :class:`InnerSpec`, compressed into an
EncodedClientHelloInner (§5.1), padded (§6.1.3) and sealed with pyhpke's
*sender* context over the ClientHelloOuterAAD (§5.2).  The result carries
what the front should forward (the ClientHelloInner message) and the sender
context, so :meth:`SealedHello.second` seals a second ClientHello at
sequence 1 with an empty ``enc``, as after a HelloRetryRequest (§6.1.5).

Every field a negative test needs can be overridden: the outer extension
list and where the ECH extension sits, the ech_outer_extensions references,
the padding, the EncodedClientHelloInner itself, the wire config_id, suite
and enc, the whole ECH extension, the session id and the record split.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyhpke

from echfront.ech.echconfig import ECHConfig
from echfront.tls.hello import (
    encode_alpn,
    encode_client_hello_body,
    encode_extensions,
    encode_server_name,
    encode_supported_versions,
    handshake_message,
)
from echfront.tls.records import HandshakeFlight, HandshakeReader

EXT_SNI, EXT_GROUPS, EXT_SIGALGS, EXT_ALPN = 0x0000, 0x000A, 0x000D, 0x0010
EXT_PSK_MODES, EXT_VERSIONS, EXT_KEY_SHARE = 0x002D, 0x002B, 0x0033
EXT_OUTER_EXTENSIONS, EXT_ECH = 0xFD00, 0xFE0D
TAG_LENGTH = 16  # AES-128-GCM, AES-256-GCM and ChaCha20Poly1305 alike
INFO_PREFIX = b"tls ech\x00"

#: An outer extension item: a (type, data) pair, or an int naming an inner
#: extension to copy (what compression references), or EXT_ECH for "the ECH
#: extension goes here".
OuterItem = int | tuple[int, bytes]
Ext = tuple[int, bytes]


def sni(name: str) -> bytes:
    """server_name extension data with one host_name (RFC 6066 §3)."""
    return encode_server_name(name.encode("ascii"))


alpn = encode_alpn
versions = encode_supported_versions


def u16_list(values: Sequence[int]) -> bytes:
    """A u8-length-prefixed list of u16, as in OuterExtensions (§5.1)."""
    return bytes((2 * len(values),)) + b"".join(v.to_bytes(2, "big") for v in values)


def key_share(seed: int = 1) -> bytes:
    """A plausible X25519 key_share extension; ``seed`` varies the key."""
    entry = b"\x00\x1d\x00\x20" + bytes([seed]) * 32
    return len(entry).to_bytes(2, "big") + entry


DEFAULT_EXTENSIONS: tuple[tuple[int, bytes], ...] = (
    (EXT_GROUPS, bytes.fromhex("0004001d0017")),
    (EXT_SIGALGS, bytes.fromhex("0006040308040401")),
    (EXT_KEY_SHARE, key_share()),
    (EXT_PSK_MODES, b"\x01\x01"),
)


@dataclass(frozen=True)
class InnerSpec:
    """A ClientHelloInner, described the way a client configures one.

    Its extensions are, in order: server_name, ``extensions``, ALPN,
    supported_versions, then the inner ECH extension (each omitted when
    empty or None).  The types in ``compress`` are replaced by one
    ech_outer_extensions at the position of the first of them; in the
    ClientHelloInner the front rebuilds they therefore sit together there,
    in inner order (:meth:`rebuilt_extensions`).
    """

    server_name: str | None = "secret.example.org"
    alpn: tuple[bytes, ...] = (b"h2", b"http/1.1")
    versions: tuple[int, ...] = (0x0304,)
    extensions: tuple[tuple[int, bytes], ...] = DEFAULT_EXTENSIONS
    compress: tuple[int, ...] = (EXT_GROUPS, EXT_SIGALGS, EXT_KEY_SHARE)
    ech: bytes | None = b"\x01"
    random: bytes = bytes(range(0x40, 0x60))
    cipher_suites: tuple[int, ...] = (0x1301, 0x1302, 0x1303)

    def extension_list(self) -> list[Ext]:
        """Every inner extension, in client order, before compression."""
        exts = [(EXT_SNI, sni(self.server_name))] if self.server_name else []
        exts += self.extensions
        exts += [(EXT_ALPN, alpn(self.alpn))] if self.alpn else []
        exts += [(EXT_VERSIONS, versions(self.versions))] if self.versions else []
        return exts + ([(EXT_ECH, self.ech)] if self.ech is not None else [])

    def _split(self, refs: Sequence[int]) -> tuple[list[Ext], list[Ext]]:
        """The rebuilt and the encoded (0xfd00 listing ``refs``) extension lists."""
        rebuilt: list[Ext] = []
        encoded: list[Ext] = []
        exts = self.extension_list()
        compressed = [e for e in exts if e[0] in self.compress]
        for ext in exts:
            if ext[0] not in self.compress:
                rebuilt.append(ext)
                encoded.append(ext)
            elif ext is compressed[0]:
                rebuilt += compressed
                encoded.append((EXT_OUTER_EXTENSIONS, u16_list(refs)))
        return rebuilt, encoded

    def rebuilt_extensions(self) -> list[Ext]:
        """The ClientHelloInner's extensions once the front expanded 0xfd00."""
        return self._split(())[0]

    def encoded_body(self, refs: Sequence[int] | None, session_id: bytes = b"") -> bytes:
        """EncodedClientHelloInner without padding (legacy_session_id empty).

        ``refs`` replaces the 0xfd00 list; it has no effect when nothing is
        compressed (put an explicit 0xfd00 pair in ``extensions`` instead).
        """
        default = [t for t, _ in self.extension_list() if t in self.compress]
        encoded = self._split(default if refs is None else refs)[1]
        return encode_client_hello_body(
            random=self.random,
            session_id=session_id,
            cipher_suites=self.cipher_suites,
            extensions=encoded,
        )

    def inner_message(self, session_id: bytes) -> bytes:
        """The ClientHelloInner handshake message the front must forward (REC-12)."""
        body = encode_client_hello_body(
            random=self.random,
            session_id=session_id,
            cipher_suites=self.cipher_suites,
            extensions=self.rebuilt_extensions(),
        )
        return handshake_message(1, body)


def pad(encoded: bytes, config: ECHConfig, server_name: str | None) -> bytes:
    """Return ``encoded`` with the RFC 9849 §6.1.3 padding appended."""
    maxlen = config.maximum_name_length
    extra = max(0, maxlen - len(server_name)) if server_name else maxlen + 9
    length = len(encoded) + extra
    return encoded + bytes(extra + 31 - ((length - 1) % 32))


def frame(message: bytes, version: int = 0x0301, sizes: Sequence[int] = ()) -> bytes:
    """Cut a handshake message into type-22 records: ``sizes`` first, then 2^14 each."""
    chunks, pos = [], 0
    for size in [*sizes, *[2**14] * (len(message) // 2**14 + 1)]:
        if pos < len(message):
            chunks.append(message[pos : pos + size])
            pos += size
    head = b"\x16" + version.to_bytes(2, "big")
    return b"".join(head + len(c).to_bytes(2, "big") + c for c in chunks)


def read_flight(data: bytes) -> HandshakeFlight:
    """Reassemble a first flight the way the front does; it must be complete."""
    flight = HandshakeReader(1).feed(data)
    assert flight is not None, "incomplete ClientHello flight"
    return flight


@dataclass(frozen=True)
class SealedHello:
    """One ClientHelloOuter as sent, and what a correct front makes of it.

    :ivar records: the client's records, ready to feed to the front.
    :ivar inner_message: the ClientHelloInner message (4-byte header and
        body) the front must forward; meaningful when the encoding was not
        overridden.
    :ivar context: the HPKE sender context (None with a verbatim ECH extension).
    """

    config: ECHConfig
    spec: InnerSpec
    suite: tuple[int, int]
    records: bytes
    outer_body: bytes
    encoded_inner: bytes
    inner_message: bytes
    aad: bytes
    enc: bytes
    payload: bytes
    payload_offset: int
    context: pyhpke.ContextInterface | None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def outer_message(self) -> bytes:
        """The ClientHelloOuter handshake message."""
        return handshake_message(1, self.outer_body)

    def flight(self, rest: bytes = b"") -> HandshakeFlight:
        """The reassembled flight of :attr:`records`, followed by ``rest``."""
        return read_flight(self.records + rest)

    def second(self, spec: InnerSpec | None = None, **options: Any) -> SealedHello:
        """Seal a second ClientHello on the same context: seq 1, empty enc (§6.1.5)."""
        merged = {"record_version": 0x0303, **self.options, **options}
        return seal_hello(
            self.config, spec or self.spec, context=self.context, suite=self.suite, **merged
        )


def seal_hello(
    config: ECHConfig,
    spec: InnerSpec | None = None,
    *,
    outer: Sequence[OuterItem] | None = None,
    references: Sequence[int] | None = None,
    padding: bytes | None = None,
    encoded_inner: bytes | None = None,
    encoded_session_id: bytes = b"",
    suite: tuple[int, int] | None = None,
    wire_suite: tuple[int, int] | None = None,
    config_id: int | None = None,
    enc: bytes | None = None,
    ech_extension: bytes | None = None,
    context: pyhpke.ContextInterface | None = None,
    session_id: bytes = bytes(range(0xE0, 0x100)),
    outer_random: bytes = bytes(range(32)),
    outer_legacy_version: int = 0x0303,
    outer_compression: bytes = b"\x00",
    record_version: int = 0x0301,
    record_sizes: Sequence[int] = (),
) -> SealedHello:
    """Build and seal a ClientHelloOuter for ``config`` (RFC 9849 §6.1).

    :param outer: the outer extensions (default: SNI public_name, the
        compressed types in inner order, ECH last); ints copy the inner extension of that
        type, EXT_ECH places the ECH extension, pairs are sent as given.
    :param references: ech_outer_extensions types, instead of ``spec.compress``.
    :param padding: padding bytes instead of §6.1.3 zeros.
    :param encoded_inner: the EncodedClientHelloInner to seal, verbatim.
    :param suite: (kdf, aead) to seal with; default the config's first.
    :param wire_suite, config_id, enc: values put in the ECH extension
        instead of the real ones (sealing is unchanged).
    :param ech_extension: the whole ECH extension data, sent unsealed.
    :param context: a sender context to reuse (CH2: ``enc`` is then empty).
    """
    spec = spec or InnerSpec()
    options = {"outer": outer, "session_id": session_id, "record_sizes": record_sizes}
    kdf, aead = suite or (config.cipher_suites[0].kdf_id, config.cipher_suites[0].aead_id)
    if encoded_inner is None:
        body = spec.encoded_body(references, encoded_session_id)
        encoded_inner = pad(body, config, spec.server_name) if padding is None else body + padding
    compressed = [t for t, _ in spec.extension_list() if t in spec.compress]
    default: list[OuterItem] = [(EXT_SNI, sni(config.public_name)), *compressed, EXT_ECH]
    items = default if outer is None else outer
    sealing = ech_extension is None and EXT_ECH in items
    real_enc = b""
    if sealing and context is None:
        hpke = pyhpke.CipherSuite.new(
            pyhpke.KEMId(config.kem_id), pyhpke.KDFId(kdf), pyhpke.AEADId(aead)
        )
        pk = hpke.kem.deserialize_public_key(config.public_key)
        real_enc, context = hpke.create_sender_context(pk, info=INFO_PREFIX + config.encode())
    enc = real_enc if enc is None else enc
    wire_kdf, wire_aead = wire_suite or (kdf, aead)
    head = b"".join((
        b"\x00", wire_kdf.to_bytes(2, "big"), wire_aead.to_bytes(2, "big"),
        bytes((config.config_id if config_id is None else config_id,)),
        len(enc).to_bytes(2, "big"), enc,
    ))  # fmt: skip
    payload_len = len(encoded_inner) + TAG_LENGTH
    ech = head + payload_len.to_bytes(2, "big") + bytes(payload_len)
    ech = ech if ech_extension is None else ech_extension

    inner_exts = dict(spec.extension_list())
    exts: list[tuple[int, bytes]] = []
    for item in items:
        if isinstance(item, tuple):
            exts.append(item)
        else:
            exts.append((item, ech if item == EXT_ECH else inner_exts[item]))
    prefix = encode_client_hello_body(
        random=outer_random,
        session_id=session_id,
        cipher_suites=spec.cipher_suites,
        extensions=(),
        legacy_version=outer_legacy_version,
        compression_methods=outer_compression,
    )[:-2]  # without the empty extension block
    aad = prefix + encode_extensions(exts)  # the payload is still all zeros here
    outer_body, payload, payload_offset = aad, b"", -1
    if sealing and context is not None:
        before = exts[: items.index(EXT_ECH)]
        payload_offset = len(prefix) + 2 + sum(4 + len(d) for _, d in before) + 4 + len(head) + 2
        payload = context.seal(encoded_inner, aad=aad)
        assert len(payload) == payload_len
        outer_body = aad[:payload_offset] + payload + aad[payload_offset + payload_len :]
    return SealedHello(
        config=config,
        spec=spec,
        suite=(kdf, aead),
        records=frame(handshake_message(1, outer_body), record_version, record_sizes),
        outer_body=outer_body,
        encoded_inner=encoded_inner,
        inner_message=spec.inner_message(session_id),
        aad=aad,
        enc=enc,
        payload=payload,
        payload_offset=payload_offset,
        context=context,
        options=options,
    )


def grease_extension(config_id: int = 0xA7, payload_length: int = 144) -> bytes:
    """A Chrome-style GREASE ECH extension (§6.2): random-looking, undecryptable."""
    enc = bytes((i * 37 + 11) % 256 for i in range(32))
    payload = bytes((i * 91 + 3) % 256 for i in range(payload_length))
    head = b"\x00\x00\x01\x00\x01" + bytes((config_id,)) + b"\x00\x20" + enc
    return head + payload_length.to_bytes(2, "big") + payload


def capture_first_flight(connect: Callable[[int], None]) -> bytes:
    """Run ``connect(port)`` against a loopback socket; the first flight it sent (records).

    A real client (Go, curl) connects to the port; the records of its first
    ClientHello are read, then the connection is dropped.  Bounded in time.
    """
    flight: list[bytes] = []

    def serve(server: socket.socket) -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            reader = HandshakeReader(1)
            while True:
                data = conn.recv(65536)
                assert data, "client closed before its ClientHello was complete"
                got = reader.feed(data)
                if got is not None:
                    flight.append(got.records)
                    return

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(15)
        thread = threading.Thread(target=serve, args=(server,), daemon=True)
        thread.start()
        connect(server.getsockname()[1])
        thread.join(15)
    assert flight, "no ClientHello captured"
    return flight[0]
