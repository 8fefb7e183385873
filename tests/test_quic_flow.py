"""A client's Initial packets through the front: hold, decide, rewrite, relay (echfront.quic.flow).

The client side is built independently of the code under test: ClientHellos
by :mod:`tests.echhello` (an ECH client sealing with pyhpke), Initial
packets by :func:`client_datagram` here (headers by hand, protection by
aioquic's ``CryptoPair`` in the client role), and the backend's view is read
back with aioquic in the server role.  The shapes follow what real clients
send (shared/docs/quic-facts.md): hellos over two packets, CRYPTO frames out
of order and interleaved with PING and PADDING, datagrams of 1200-1252 bytes.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from hypothesis import given, settings
from hypothesis import strategies as st

from echfront.app.certs import TestCA
from echfront.ech.decoder import ECHDecoder, ECHStatus
from echfront.ech.keyset import KeySet, generate_key
from echfront.errors import AlertDescription, AlertError
from echfront.quic.admission import admit
from echfront.quic.errors import (
    CryptoBufferExceeded,
    ProtocolViolation,
    QuicError,
    TransportErrorCode,
)
from echfront.quic.flow import FlowLimits, FlowOutput, FlowPhase, InitialFlow
from echfront.quic.frames import (
    FRAME_CONNECTION_CLOSE,
    FRAME_CRYPTO,
    FRAME_PING,
    encode_connection_close,
    encode_crypto,
    parse_initial_frames,
)
from echfront.quic.hello import decode_first_hello, release
from echfront.quic.packets import (
    VERSION_1,
    VERSION_2,
    LongHeader,
    PacketType,
    QuicVersion,
    decode_varint,
    encode_varint,
    parse_long_header,
    split_datagram,
)
from echfront.quic.protection import build_retry
from tests.echhello import DEFAULT_EXTENSIONS, InnerSpec, SealedHello, grease_extension, seal_hello

PUBLIC_NAME = "public.example"
KEY = generate_key(PUBLIC_NAME, config_id=0x42, maximum_name_length=32)
KEYS = KeySet((KEY,))
DCID = bytes.fromhex("c5e0f1a2b3c4d5e6f708")
SCID = bytes.fromhex("5c1d")
#: quic_transport_parameters (RFC 9001 §8.2, RFC 9000 §18.2):
#: initial_max_data 1 MiB and initial_source_connection_id; Firefox-style,
#: only in the inner hello (quic-facts.md item 3).
TRANSPORT_PARAMETERS = (
    0x39,
    bytes.fromhex("0404") + encode_varint(1 << 20, 4) + b"\x0f" + bytes((len(SCID),)) + SCID,
)
SPEC = InnerSpec(alpn=(b"h3",), extensions=(*DEFAULT_EXTENSIONS, TRANSPORT_PARAMETERS))


# -- a test-side QUIC client ---------------------------------------------------


def header_bytes(
    version: QuicVersion, dcid: bytes, scid: bytes, token: bytes, length: int, pn: int
) -> bytes:
    """An Initial long header with a 4-byte packet number, written out by hand."""
    first = 0xC0 | (version.type_bits[0] << 4) | 0x03
    return b"".join(
        (
            bytes((first,)),
            version.number.to_bytes(4, "big"),
            bytes((len(dcid),)),
            dcid,
            bytes((len(scid),)),
            scid,
            encode_varint(len(token)),
            token,
            encode_varint(length + 4 + 16, 2),
            pn.to_bytes(4, "big"),
        )
    )


@dataclass
class Client:
    """A QUIC client's Initial packet number space, protected by aioquic."""

    version: QuicVersion = VERSION_1
    dcid: bytes = DCID
    scid: bytes = SCID
    token: bytes = b""
    next_pn: int = 0
    size: int = 1252
    sent: list[int] = field(default_factory=list)
    crypto_key_dcid: bytes | None = None

    def packet(self, frames: bytes, *, pad_to: int | None = None) -> bytes:
        pair = CryptoPair()
        pair.setup_initial(
            self.crypto_key_dcid or self.dcid, is_client=True, version=self.version.number
        )
        overhead = len(header_bytes(self.version, self.dcid, self.scid, self.token, 0, 0)) + 16
        if pad_to is not None and overhead + len(frames) < pad_to:
            frames += bytes(pad_to - overhead - len(frames))
        pn = self.next_pn
        self.next_pn += 1
        self.sent.append(pn)
        header = header_bytes(self.version, self.dcid, self.scid, self.token, len(frames), pn)
        return pair.encrypt_packet(header, frames, pn)

    def datagram(self, frames: bytes) -> bytes:
        return self.packet(frames, pad_to=self.size)

    def hello(
        self, message: bytes, *, start: int = 0, pieces: int = 2, shuffle: int | None = None
    ) -> list[bytes]:
        """Datagrams carrying ``message`` at ``start``: ``pieces`` packets, CRYPTO
        frames cut small and optionally shuffled across packets, with PING and PADDING."""
        cuts = [len(message) * i // (pieces * 3) for i in range(pieces * 3 + 1)]
        frames = [encode_crypto(start + a, message[a:b]) for a, b in itertools.pairwise(cuts)]
        if shuffle is not None:
            random.Random(shuffle).shuffle(frames)
        datagrams = []
        for i in range(pieces):
            body = b"\x01" + b"\x00" * 3 + b"".join(frames[i * 3 : i * 3 + 3])
            datagrams.append(self.datagram(body))
        return datagrams


def open_backend(
    datagrams: Sequence[bytes],
    version: QuicVersion = VERSION_1,
    key_dcid: bytes = DCID,
    largest: int = 0,
) -> list[tuple[LongHeader, int, bytes]]:
    """What a backend reads: (header, packet number, payload) of each Initial."""
    pair = CryptoPair()
    pair.setup_initial(key_dcid, is_client=False, version=version.number)
    opened = []
    for datagram in datagrams:
        assert len(datagram) >= 1200, "RFC 9000 §14.1: Initial datagrams are padded"
        packets, _rest = split_datagram(datagram)
        for header in packets:
            if header.packet_type is not PacketType.INITIAL:
                continue
            _plain, payload, number = pair.decrypt_packet(
                datagram[header.start : header.end], header.pn_offset - header.start, largest
            )
            opened.append((header, number, payload))
    return opened


def crypto_stream(opened: Sequence[tuple[LongHeader, int, bytes]]) -> bytes:
    """The backend's CRYPTO stream from its packets, which must be gap-free."""
    stream: dict[int, int] = {}
    for _h, _n, payload in opened:
        for frame in parse_initial_frames(payload).crypto:
            for i, byte in enumerate(frame.data):
                assert stream.setdefault(frame.offset + i, byte) == byte
    assert sorted(stream) == list(range(len(stream)))
    return bytes(stream[i] for i in range(len(stream)))


def start(
    datagrams: Sequence[bytes], limits: FlowLimits | None = None, now: float = 0.0
) -> tuple[InitialFlow, FlowOutput]:
    """Admit the first datagram and feed them all; return the flow and the last output."""
    admission = admit(datagrams[0])
    assert admission.header is not None, admission.reason
    flow = InitialFlow(admission.header, now=now, limits=limits)
    out = FlowOutput()
    for datagram in datagrams:
        out = flow.client_datagram(datagram, now)
        assert out.error is None, out.error
        assert not out.to_backend
    return flow, out


def phase(flow: InitialFlow) -> FlowPhase:
    """The flow's phase, read through a call so a type checker does not pin it."""
    return flow.phase


def decide(flow: InitialFlow, hello: bytes) -> FlowOutput:
    info = decode_first_hello(ECHDecoder(KEYS), hello)
    return release(flow, info)


def sealed(spec: InnerSpec = SPEC) -> SealedHello:
    # RFC 9001 §8.4: a QUIC ClientHello has an empty legacy_session_id.
    return seal_hello(KEY.config, spec, session_id=b"")


# -- the end-to-end proof ------------------------------------------------------


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2], ids=["v1", "v2"])
@pytest.mark.parametrize(("pieces", "shuffle"), [(1, None), (2, None), (2, 7), (3, 11)])
@pytest.mark.parametrize("token", [b"", b"new-token-from-an-earlier-connection"])
def test_ech_hello_is_rewritten(
    version: QuicVersion, pieces: int, shuffle: int | None, token: bytes
) -> None:
    """A real ECH ClientHelloOuter in client Initials comes out as the inner hello, re-protected."""
    hello = sealed()
    client = Client(version=version, token=token)
    datagrams = client.hello(hello.outer_message, pieces=pieces, shuffle=shuffle)
    flow, out = start(datagrams)
    assert out.hello == hello.outer_message
    assert phase(flow) is FlowPhase.DECIDING
    info = decode_first_hello(ECHDecoder(KEYS), out.hello)
    assert info.status is ECHStatus.ACCEPTED
    assert info.inner is not None and info.inner.message == hello.inner_message
    out = release(flow, info)
    assert flow.phase is FlowPhase.TRANSLATING
    assert not out.to_client and out.error is None
    opened = open_backend(out.to_backend, version)
    assert crypto_stream(opened) == hello.inner_message
    # Same connection IDs and token; the client's own packet numbers.
    for header, number, _payload in opened:
        assert (header.dcid, header.scid, header.token) == (DCID, SCID, token)
        assert number in client.sent
    numbers = [n for _h, n, _p in opened]
    assert numbers == sorted(set(numbers))
    assert all(len(d) <= 1252 for d in out.to_backend)
    # Each client packet asked for an acknowledgement; so does each that stands for it.
    kinds = [{f.type for f in parse_initial_frames(p).frames} for _h, _n, p in opened]
    assert all(k & {FRAME_CRYPTO, FRAME_PING} for k in kinds)


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2], ids=["v1", "v2"])
def test_a_quic_server_accepts_the_rewritten_initials(version: QuicVersion, tmp_path: Path) -> None:
    """aioquic as the backend reads the rewritten Initials and answers the inner hello.

    It reassembles the CRYPTO stream, runs TLS on the ClientHelloInner
    (ALPN h3, the inner transport parameters) and sends its ServerHello in
    an Initial coalesced with Handshake packets, to the client's SCID.
    """
    issued = TestCA(tmp_path).issue(["secret.example.org"])
    hello = sealed()
    client = Client(version=version)
    flow, out = start(client.hello(hello.outer_message, pieces=2, shuffle=3))
    out = decide(flow, out.hello or b"")
    config = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    config.supported_versions = [version.number]
    config.load_cert_chain(issued.chain, issued.key)
    server = QuicConnection(configuration=config, original_destination_connection_id=DCID)
    for datagram in out.to_backend:
        server.receive_datagram(datagram, ("127.0.0.1", 4433), now=0.0)
    events = list(iter(server.next_event, None))
    assert [type(e).__name__ for e in events] == ["ProtocolNegotiated"]
    (reply, _addr), *_more = server.datagrams_to_send(now=0.0)
    packets, _rest = split_datagram(reply)
    assert [p.packet_type for p in packets][:2] == [PacketType.INITIAL, PacketType.HANDSHAKE]
    assert packets[0].dcid == SCID
    flow.server_datagram(reply)
    # The front's own refusal now follows the server's packet numbers.
    refusal = flow.refuse(ProtocolViolation("test")).to_client[0]
    pair = CryptoPair()
    pair.setup_initial(DCID, is_client=True, version=version.number)
    _h, _p, first_number = pair.decrypt_packet(reply[: packets[0].end], packets[0].pn_offset, 0)
    header = parse_long_header(refusal)
    _h, _p, number = pair.decrypt_packet(refusal, header.pn_offset, first_number)
    assert number == first_number + 1


@pytest.mark.parametrize("mode", ["grease", "no-ech", "stale"])
def test_other_hellos_pass_unchanged(mode: str) -> None:
    """No ECH, GREASE or a stale config: the client's datagrams go as they came (RFC 9849 §7.1)."""
    if mode == "grease":
        hello = seal_hello(KEY.config, SPEC, ech_extension=grease_extension())
    elif mode == "no-ech":
        hello = seal_hello(KEY.config, SPEC, outer=[(0, b"\x00\x0f\x00\x00\x0cexample.test")])
    else:
        hello = seal_hello(generate_key(PUBLIC_NAME, config_id=0x42).config, SPEC)
    client = Client()
    datagrams = client.hello(hello.outer_message, pieces=2, shuffle=3)
    flow, out = start(datagrams)
    assert out.hello is not None
    info = decode_first_hello(ECHDecoder(KEYS), out.hello)
    assert info.status is not ECHStatus.ACCEPTED
    out = release(flow, info)
    assert out.to_backend == datagrams
    assert flow.phase is FlowPhase.PASSTHROUGH
    later = client.datagram(b"\x02\x00\x00\x00\x00")
    assert flow.client_datagram(later, 1.0).to_backend == [later]
    assert flow.client_datagram(b"\x40garbage", 1.0).to_backend == [b"\x40garbage"]


def test_second_hello_after_hello_retry_request() -> None:
    """RFC 9849 §7.1.1: the second ClientHello is translated with the same HPKE context."""
    first = sealed()
    client = Client()
    flow, out = start(client.hello(first.outer_message, pieces=2))
    out = decide(flow, out.hello or b"")
    backend = list(out.to_backend)
    # The client acknowledges the server's HelloRetryRequest Initial: no CRYPTO.
    ack = client.datagram(bytes.fromhex("0200000000"))
    out = flow.client_datagram(ack, 0.1)
    assert out.to_backend == [ack]  # nothing to rewrite: relayed as it came
    backend += out.to_backend
    second = first.second(
        InnerSpec(
            alpn=(b"h3",), extensions=(*DEFAULT_EXTENSIONS, TRANSPORT_PARAMETERS), random=bytes(32)
        )
    )
    datagrams = client.hello(
        second.outer_message, start=len(first.outer_message), pieces=2, shuffle=5
    )
    out = flow.client_datagram(datagrams[0], 0.2)
    assert out.to_backend == [] and flow.deadline == pytest.approx(0.2 + 3.0)
    out = flow.client_datagram(datagrams[1], 0.2)
    assert out.error is None
    backend += out.to_backend
    stream = crypto_stream(open_backend(backend))
    assert stream == first.inner_message + second.inner_message
    assert flow.deadline is None


def test_second_hello_that_does_not_decrypt_is_refused() -> None:
    """HRR-6: a second hello sealed under another context: CRYPTO_ERROR(decrypt_error) both ways."""
    first = sealed()
    client = Client()
    flow, out = start(client.hello(first.outer_message, pieces=1))
    decide(flow, out.hello or b"")
    other = sealed().second()
    datagrams = client.hello(other.outer_message, start=len(first.outer_message), pieces=1)
    out = flow.client_datagram(datagrams[0], 0.2)
    assert out.error is not None
    assert out.error.code == 0x100 + AlertDescription.DECRYPT_ERROR
    assert flow.closed
    assert close_frame(out.to_client[0], server=True) == (0x100 + 51, 0, b"crypto_error_51")
    # The backend is told too, in a client Initial.
    assert close_frame(out.to_backend[0], server=False)[0] == 0x100 + 51


def test_retransmitted_hello_covers_the_inner() -> None:
    """A client resending its whole hello makes the backend get the whole inner again."""
    hello = sealed()
    client = Client()
    flow, out = start(client.hello(hello.outer_message, pieces=2))
    first = decide(flow, out.hello or b"").to_backend
    resent: list[bytes] = []
    for datagram in client.hello(hello.outer_message, pieces=2, shuffle=1):
        resent += flow.client_datagram(datagram, 0.5).to_backend
    opened = open_backend(resent, largest=1)
    assert crypto_stream(opened) == hello.inner_message
    assert [n for _h, n, _p in opened] == [2, 3]  # the client's numbers for the resends
    # A partial resend maps to a proportional part, no more.
    part = flow.client_datagram(
        client.datagram(encode_crypto(100, hello.outer_message[100:200])), 0.6
    )
    ((_h, _n, payload),) = open_backend(part.to_backend, largest=3)
    (frame,) = parse_initial_frames(payload).crypto
    assert 0 < len(frame.data) <= 200
    assert hello.inner_message[frame.offset : frame.offset + len(frame.data)] == frame.data
    assert len(first) >= 1


def test_inner_larger_than_the_clients_packets() -> None:
    """Packet numbers past the client's are added, and later client packets shift above them."""
    hello = sealed()
    client = Client(size=1200)
    flow, out = start(client.hello(hello.outer_message, pieces=1))
    assert client.sent == [0]
    big_inner = b"\x01" + (5000).to_bytes(3, "big") + bytes(5000)
    out = flow.forward_rewritten(big_inner)
    opened = open_backend(out.to_backend)
    assert crypto_stream(opened) == big_inner
    numbers = [n for _h, n, _p in opened]
    assert numbers[0] == 0 and numbers == list(range(len(numbers))) and len(numbers) >= 5
    later = flow.client_datagram(client.datagram(b"\x01"), 1.0)
    ((_h, number, _p),) = open_backend(later.to_backend, largest=numbers[-1])
    assert number > numbers[-1]


def test_coalesced_zero_rtt_is_kept() -> None:
    """0-RTT packets coalesced after the Initial reach the backend unchanged (after the hello)."""
    hello = sealed()
    client = Client()
    (datagram,) = client.hello(hello.outer_message, pieces=1)
    zero_rtt = (
        bytes.fromhex("d0")
        + VERSION_1.number.to_bytes(4, "big")
        + bytes((len(DCID),))
        + DCID
        + b"\x00"
        + encode_varint(30, 2)
        + bytes(30)
    )
    initial_only = client.packet(b"\x01" + encode_crypto(0, hello.outer_message), pad_to=900)
    flow, out = start([initial_only + zero_rtt + bytes(1252 - len(initial_only) - len(zero_rtt))])
    out = decide(flow, out.hello or b"")
    assert zero_rtt in out.to_backend
    assert (
        crypto_stream(open_backend([d for d in out.to_backend if d != zero_rtt]))
        == hello.inner_message
    )
    assert len(datagram) == 1252


# -- refusals and bounds -------------------------------------------------------


def close_frame(datagram: bytes, *, server: bool, key_dcid: bytes = DCID) -> tuple[int, int, bytes]:
    """Open a CONNECTION_CLOSE Initial: (error code, frame type, reason)."""
    pair = CryptoPair()
    pair.setup_initial(key_dcid, is_client=server, version=VERSION_1.number)
    header = parse_long_header(datagram)
    _plain, payload, _n = pair.decrypt_packet(datagram[: header.end], header.pn_offset, 0)
    close = parse_initial_frames(payload).close
    assert close is not None
    frame = close.raw
    code_and_type = parse_initial_frames(frame)
    assert code_and_type.frames[0].type == FRAME_CONNECTION_CLOSE
    code, pos = decode_varint(frame, 1)
    frame_type, pos = decode_varint(frame, pos)
    return code, frame_type, close.data


def test_refusal_after_decoding_is_a_crypto_error() -> None:
    """A TLS alert from the decoder closes with CRYPTO_ERROR 0x100+alert (RFC 9001 §4.8)."""
    hello = seal_hello(KEY.config, SPEC, padding=b"\x01" * 8)  # REC-1: non-zero padding
    flow, out = start(Client().hello(hello.outer_message))
    with pytest.raises(AlertError) as caught:
        decode_first_hello(ECHDecoder(KEYS), out.hello or b"")
    out = flow.refuse(QuicError.from_alert(caught.value))
    assert not out.to_backend
    (datagram,) = out.to_client
    header = parse_long_header(datagram)
    assert (header.dcid, header.scid) == (SCID, DCID)  # to the client's SCID
    assert close_frame(datagram, server=True) == (0x100 + 47, 0, b"crypto_error_47")
    assert flow.closed and flow.client_datagram(b"\xc0", 1.0).dropped == 1


@pytest.mark.parametrize(
    ("frames", "error", "code"),
    [
        (b"\x08\x00\x00", ProtocolViolation, TransportErrorCode.PROTOCOL_VIOLATION),  # STREAM
        (b"\x06\x00\x7f\xff", QuicError, TransportErrorCode.FRAME_ENCODING_ERROR),
        (
            encode_crypto(70_000, b"x"),
            CryptoBufferExceeded,
            TransportErrorCode.CRYPTO_BUFFER_EXCEEDED,
        ),
        (encode_crypto(0, b"\x02\x00\x00\x01"), QuicError, 0x100 + 10),  # not a ClientHello
    ],
)
def test_bad_initial_is_closed(frames: bytes, error: type[QuicError], code: int) -> None:
    client = Client()
    admission = admit(client.datagram(b"\x01"))
    assert admission.header is not None
    flow = InitialFlow(admission.header, now=0.0)
    out = flow.client_datagram(client.datagram(frames), 0.0)
    assert isinstance(out.error, error)
    assert out.error.code == code
    assert close_frame(out.to_client[0], server=True)[0] == code
    assert flow.closed


def test_held_packet_bound() -> None:
    """Bounded in packets: a hello that never completes cannot be held forever."""
    client = Client()
    message = sealed().outer_message
    limits = FlowLimits(max_held_packets=4)
    admission = admit(client.datagram(encode_crypto(0, message[:10])))
    assert admission.header is not None
    flow = InitialFlow(admission.header, now=0.0, limits=limits)
    outs = [
        flow.client_datagram(client.datagram(encode_crypto(0, message[:10])), 0.0) for _ in range(5)
    ]
    assert [o.error is None for o in outs] == [True] * 4 + [False]
    assert isinstance(outs[-1].error, CryptoBufferExceeded)


def test_timeout() -> None:
    """Bounded in time (the caller's clock): an incomplete hello expires silently."""
    client = Client()
    message = sealed().outer_message
    flow, _out = start([client.datagram(encode_crypto(0, message[:100]))], now=10.0)
    assert flow.deadline == 13.0
    assert not flow.expire(12.9).timed_out
    late = flow.client_datagram(client.datagram(encode_crypto(100, message[100:])), 13.5)
    assert late.timed_out and not late.to_client and flow.closed


def test_small_datagram_dropped() -> None:
    """RFC 9000 §14.1: an Initial in a datagram under 1200 bytes is discarded."""
    client = Client()
    flow, _out = start([client.datagram(b"\x01")])
    small = client.packet(encode_crypto(0, b"\x01\x00"), pad_to=600)
    assert flow.client_datagram(small, 0.0).dropped == 1


def test_client_gives_up() -> None:
    client = Client()
    flow, _out = start([client.datagram(b"\x01")])
    out = flow.client_datagram(client.datagram(encode_connection_close(0, 0, b"")), 0.0)
    assert flow.closed and not out.to_client and not out.to_backend


def test_backend_retry_moves_the_keys() -> None:
    """RFC 9000 §17.2.5.2: after a backend Retry the client's Initials use keys from its SCID."""
    hello = sealed()
    client = Client()
    flow, out = start(client.hello(hello.outer_message, pieces=2))
    decide(flow, out.hello or b"")
    new_cid = bytes.fromhex("b1b2b3b4b5b6b7b8")
    forged = build_retry(VERSION_1, odcid=b"\x00" * 8, dcid=SCID, scid=new_cid, token=b"t")
    flow.server_datagram(forged)  # a wrong tag is ignored
    assert (
        flow.keys().client.secret
        == InitialFlow(parse_long_header(client.hello(hello.outer_message)[0]), now=0)
        .keys()
        .client.secret
    )
    flow.server_datagram(
        build_retry(VERSION_1, odcid=DCID, dcid=SCID, scid=new_cid, token=b"retry-token")
    )
    client.dcid, client.token = new_cid, b"retry-token"
    resent = []
    for datagram in client.hello(hello.outer_message, pieces=2):
        out = flow.client_datagram(datagram, 0.3)
        assert out.dropped == 0
        resent += out.to_backend
    opened = open_backend(resent, key_dcid=new_cid, largest=1)
    assert crypto_stream(opened) == hello.inner_message
    for header, _n, _p in opened:
        assert (header.dcid, header.token) == (new_cid, b"retry-token")


def test_refusal_uses_a_fresh_server_packet_number() -> None:
    """Once the backend sent Initials, the front's close must not reuse their numbers."""
    hello = sealed()
    client = Client()
    flow, out = start(client.hello(hello.outer_message, pieces=1))
    decide(flow, out.hello or b"")
    server = CryptoPair()
    server.setup_initial(DCID, is_client=False, version=1)
    # A server Initial (packet number 7) to the client's SCID from the backend's own CID.
    header = header_bytes(VERSION_1, SCID, b"abcd", b"", 30, 7)
    flow.server_datagram(server.encrypt_packet(header, b"\x01" + bytes(29), 7))
    out = flow.refuse(ProtocolViolation("test"))
    pair = CryptoPair()
    pair.setup_initial(DCID, is_client=True, version=1)
    parsed = parse_long_header(out.to_client[0])
    _plain, _payload, number = pair.decrypt_packet(out.to_client[0], parsed.pn_offset, 7)
    assert number == 8


# -- bounded fuzz of the whole flow -------------------------------------------


def _valid_initial(data: st.DataObject, client: Client) -> bytes:
    frames = data.draw(st.sampled_from([
        b"\x01", encode_crypto(data.draw(st.integers(0, 2**62 - 2)), b"xy"),
        b"\x02" + data.draw(st.binary(max_size=12)), b"\x1c" + data.draw(st.binary(max_size=6)),
        data.draw(st.binary(min_size=1, max_size=40)),
    ]))  # fmt: skip
    return client.datagram(frames)


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_fuzz_flow(data: st.DataObject) -> None:
    """Garbage, truncations, coalesced and hostile frames: a drop or a QUIC close, nothing else."""
    client = Client()
    first = client.datagram(b"\x01")
    admission = admit(first)
    assert admission.header is not None
    flow = InitialFlow(admission.header, now=0.0, limits=FlowLimits(max_held_packets=8))
    for step in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["garbage", "truncated", "coalesced", "frames"]))
        if kind == "garbage":
            datagram = data.draw(st.binary(max_size=1400))
        elif kind == "truncated":
            datagram = _valid_initial(data, client)[: data.draw(st.integers(0, 1251))]
        elif kind == "coalesced":
            one = client.packet(b"\x01", pad_to=400)
            datagram = one + data.draw(st.binary(max_size=900))
        else:
            datagram = _valid_initial(data, client)
        out = flow.client_datagram(datagram, float(step))
        assert isinstance(out, FlowOutput)
        if out.error is not None:
            assert out.to_client and flow.closed
            assert out.error.code in (0x07, 0x0A, 0x0D) or 0x100 <= out.error.code <= 0x1FF
        if out.hello is not None:
            break


@settings(max_examples=60, deadline=None)
@given(
    outer_length=st.integers(200, 4000),
    inner_length=st.integers(1, 6000),
    pieces=st.integers(1, 4),
    shuffle=st.none() | st.integers(0, 1000),
    size=st.integers(1200, 1400),
    version=st.sampled_from([VERSION_1, VERSION_2]),
)
def test_rewrite_property(
    outer_length: int,
    inner_length: int,
    pieces: int,
    shuffle: int | None,
    size: int,
    version: QuicVersion,
) -> None:
    """Whatever the sizes and split: the backend reads exactly the inner hello, in
    datagrams of 1200 bytes up to the client's size, with unique packet numbers
    that start as the client's."""
    outer = (
        b"\x01"
        + outer_length.to_bytes(3, "big")
        + bytes(range(256)) * (outer_length // 256)
        + bytes(outer_length % 256)
    )
    inner = b"\x01" + inner_length.to_bytes(3, "big") + bytes(inner_length)
    client = Client(version=version, size=size)
    datagrams = client.hello(outer, pieces=pieces, shuffle=shuffle)
    flow, out = start(datagrams)
    assert out.hello == outer
    out = flow.forward_rewritten(inner)
    largest = max(size, *(len(d) for d in datagrams))
    assert all(1200 <= len(d) <= largest for d in out.to_backend)
    opened = open_backend(out.to_backend, version)
    assert crypto_stream(opened) == inner
    numbers = [n for _h, n, _p in opened]
    assert len(numbers) == len(set(numbers))
    assert numbers[: len(client.sent)] == client.sent[: len(numbers)]


@pytest.mark.parametrize("mode", ["accepted", "grease"])
def test_bare_flight_decodes_like_records(mode: str) -> None:
    """The decoder gives the same outcome for a hello from QUIC as from TLS records."""
    hello = (
        sealed()
        if mode == "accepted"
        else seal_hello(KEY.config, SPEC, ech_extension=grease_extension())
    )
    decoder = ECHDecoder(KEYS)
    over_quic = decode_first_hello(decoder, hello.outer_message)
    over_tcp = decoder.decode(hello.flight())
    assert (over_quic.status, over_quic.server_name, over_quic.alpn) == (
        over_tcp.status,
        over_tcp.server_name,
        over_tcp.alpn,
    )
    if mode == "accepted":
        assert over_quic.inner is not None and over_tcp.inner is not None
        assert over_quic.inner.message == over_tcp.inner.message == hello.inner_message
