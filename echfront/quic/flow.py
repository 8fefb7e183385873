# -*- test-case-name: tests.test_quic_flow -*-
"""One client's QUIC Initial exchange through the front, as a sans-IO state object.

This is the API a datagram relay drives (a thin Twisted ``DatagramProtocol``
in ``front/datagram.py``, or anything else that moves bytes).  Time is
passed in; nothing here reads a clock, opens a socket or schedules a call::

    admission = admit(datagram)              # quic.admission, for a datagram of no flow
    if admission.reply:                      # Version Negotiation: send it to the client
        transport.write(admission.reply, client_address)
    if admission.header is None:
        return                               # dropped; admission.reason says why
    flow = InitialFlow(admission.header, now=now, limits=limits)

    out = flow.client_datagram(datagram, now)      # every client datagram, in order
    if out.hello is not None:                      # the first ClientHello is whole
        try:
            info = decode_first_hello(decoder, out.hello, may_decrypt=rate_ok)  # quic.hello
            route = router.route(info)             # as over TCP
            out = release(flow, info)              # rewrite (ECH accepted) or pass through
        except AlertError as error:
            out = flow.refuse(QuicError.from_alert(error))
    send out.to_backend on the flow's connected UDP socket, out.to_client to the client
    forget the flow once flow.closed; log out.error, count out.dropped

    flow.server_datagram(reply)        # each backend datagram, then relay it unchanged
    flow.expire(now)                   # from a timer at flow.deadline, when not None

Phases (:class:`FlowPhase`): COLLECTING holds the client's datagrams until
the CRYPTO stream holds a whole ClientHello (RFC 9001 §4.1.3), bounded by
:class:`FlowLimits` in bytes, packets and time; DECIDING waits for the
caller; then either PASSTHROUGH (no ECH, GREASE, rejected: every datagram
relayed unchanged, nothing parsed) or TRANSLATING (ECH accepted): client
Initial packets are decrypted, their CRYPTO data replaced by the matching
ClientHelloInner bytes (:mod:`echfront.quic.rewrite`) and re-protected;
a second ClientHello after a HelloRetryRequest is reassembled the same way
and translated by the callable the caller gave, which carries the HPKE
context (RFC 9849 §7.1.1).  CLOSED ends it.

Packet numbers: a rewritten packet keeps the client's number whenever it is
free, so the backend's acknowledgements, relayed unchanged, name packets the
client sent.  Only when the inner hello needs more packets than the client
used are numbers added past the client's, and later ones shifted by as much
(RFC 9000 §12.3 allows gaps; numbers stay unique and increase with the
client's own).

The Initial keys derive from the client's first Destination Connection ID;
a Retry from the backend, seen in :meth:`InitialFlow.server_datagram` and
verified (RFC 9001 §5.8), moves them to the Retry's Source Connection ID as
the client does (RFC 9000 §17.2.5.2).  Connection migration is not handled.

Why this module is long: it is one state object and its docstrings; its
pure parts already live in :mod:`~echfront.quic.admission`,
:mod:`~echfront.quic.incoming` and :mod:`~echfront.quic.rewrite`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from echfront.errors import AlertDescription, AlertError
from echfront.quic.crypto_stream import DEFAULT_MAX_CRYPTO_BYTES, CryptoReassembler
from echfront.quic.errors import CryptoBufferExceeded, QuicDrop, QuicError, crypto_error_code
from echfront.quic.frames import (
    FRAME_PING,
)
from echfront.quic.incoming import ClientDatagram, ClientInitial, read_client_datagram
from echfront.quic.packets import (
    MIN_INITIAL_DATAGRAM,
    LongHeader,
    PacketType,
    QuicVersion,
    split_datagram,
)
from echfront.quic.protection import (
    InitialKeys,
    initial_keys,
    unmask_packet_number,
    verify_retry,
)
from echfront.quic.rewrite import (
    OutgoingInitial,
    Segment,
    backend_ranges,
    close_datagram,
    merge_ranges,
    pack_initials,
)

__all__ = [
    "FlowLimits",
    "FlowOutput",
    "FlowPhase",
    "InitialFlow",
    "SecondHelloTranslator",
]

#: CRYPTO_ERROR carrying unexpected_message (RFC 9001 §4.8).
_UNEXPECTED = crypto_error_code(AlertDescription.UNEXPECTED_MESSAGE)

#: Rewrites a complete second ClientHelloOuter message into the inner one;
#: raises :class:`~echfront.errors.AlertError` when it must be refused.
SecondHelloTranslator = Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True)
class FlowLimits:
    """Per-flow bounds; the defaults fit every client measured (quic-facts.md).

    :ivar max_crypto_bytes: CRYPTO stream bytes (both ClientHellos).
    :ivar max_crypto_ranges: disjoint CRYPTO pieces held at once.
    :ivar max_held_packets: Initial packets held while a hello is incomplete.
    :ivar max_held_bytes: datagram bytes held while a hello is incomplete.
    :ivar hello_timeout: seconds a hello may take to complete.
    :ivar max_initial_packets: client Initial packets a flow translates in all.
    :ivar max_datagram: the largest datagram sent to the backend.
    """

    max_crypto_bytes: int = DEFAULT_MAX_CRYPTO_BYTES
    max_crypto_ranges: int = 64
    max_held_packets: int = 32
    max_held_bytes: int = 96 * 1024
    hello_timeout: float = 3.0
    max_initial_packets: int = 256
    max_datagram: int = 1500


class FlowPhase(enum.Enum):
    """Where a flow is (see the module docstring)."""

    COLLECTING = "collecting"
    DECIDING = "deciding"
    PASSTHROUGH = "passthrough"
    TRANSLATING = "translating"
    CLOSED = "closed"


@dataclass(slots=True)
class FlowOutput:
    """What one call produced.

    :ivar to_backend: datagrams for the backend, in order.
    :ivar to_client: datagrams for the client (a CONNECTION_CLOSE).
    :ivar hello: the first ClientHello message, once complete: decide now.
    :ivar error: the flow closed with this error (the close is in ``to_client``).
    :ivar timed_out: the flow closed silently because a hello took too long.
    :ivar dropped: packets or datagrams discarded in this call.
    """

    to_backend: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)
    hello: bytes | None = None
    error: QuicError | None = None
    timed_out: bool = False
    dropped: int = 0


class InitialFlow:
    """The Initial packet number space of one client connection (module docstring).

    :param header: the client's first Initial, from :func:`admit`.
    :param now: the time of its arrival, in seconds on the caller's clock.
    """

    def __init__(self, header: LongHeader, *, now: float, limits: FlowLimits | None = None) -> None:
        """Start COLLECTING for the connection ``header`` opens."""
        version = header.quic_version
        if version is None or header.packet_type is not PacketType.INITIAL:
            raise ValueError("a flow starts from an Initial packet of a supported version")
        self.limits = limits or FlowLimits()
        self.version = version
        #: The client's first Destination Connection ID (RFC 9000 §7.3).
        self.original_dcid = header.dcid
        #: The client's Source Connection ID: the DCID of packets to it.
        self.client_scid = header.scid
        self.phase = FlowPhase.COLLECTING
        self._key_dcid = header.dcid
        self._keys: dict[int, InitialKeys] = {}
        self._retried = False
        self._stream = CryptoReassembler(
            self.limits.max_crypto_bytes, self.limits.max_crypto_ranges
        )
        self._held: list[ClientDatagram] = []
        self._held_packets = 0
        self._held_bytes = 0
        self._hold_since = now
        self._largest_client_pn: int | None = None
        self._largest_server_pn: int | None = None
        self._segments: list[Segment] = []
        self._backend_stream = bytearray()
        self._second: SecondHelloTranslator | None = None
        self._used_pns: set[int] = set()
        self._max_pn = -1
        self._pn_shift = 0
        self._last_header = header

    # -- public ------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        """When :meth:`expire` closes the flow, if a hello is still incomplete then."""
        holding = self.phase in (FlowPhase.COLLECTING, FlowPhase.DECIDING) or (
            self.phase is FlowPhase.TRANSLATING and self._held
        )
        return self._hold_since + self.limits.hello_timeout if holding else None

    @property
    def hello_retried(self) -> bool:
        """Whether a second ClientHello, after a HelloRetryRequest, was translated."""
        return len(self._segments) > 1

    @property
    def closed(self) -> bool:
        """Whether the flow has ended; the relay forgets it."""
        return self.phase is FlowPhase.CLOSED

    def keys(self, version: QuicVersion | None = None) -> InitialKeys:
        """The Initial keys of ``version`` (default the flow's) for the current DCID."""
        version = version or self.version
        keys = self._keys.get(version.number)
        if keys is None:
            keys = self._keys[version.number] = initial_keys(self._key_dcid, version)
        return keys

    def expire(self, now: float) -> FlowOutput:
        """Close the flow silently if a hello has taken longer than ``hello_timeout``."""
        out = FlowOutput()
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            self._close()
            out.timed_out = True
        return out

    def client_datagram(self, datagram: bytes, now: float) -> FlowOutput:
        """Take one datagram from the client; see :class:`FlowOutput` for the result."""
        out = FlowOutput()
        phase = self.phase
        if phase is FlowPhase.PASSTHROUGH:
            out.to_backend.append(datagram)
            return out
        if phase is FlowPhase.CLOSED:
            out.dropped = 1
            return out
        expired = self.expire(now)
        if expired.timed_out:
            expired.dropped = 1
            return expired
        try:
            held = self._read(datagram, out)
            if held is not None:
                self._take(held, now, out)
        except AlertError as error:
            return self.refuse(QuicError.from_alert(error), out)
        except QuicError as error:
            return self.refuse(error, out)
        return out

    def forward_unchanged(self) -> FlowOutput:
        """The decision: relay everything unchanged (no ECH, GREASE, rejected)."""
        self._require(FlowPhase.DECIDING)
        out = FlowOutput(to_backend=[held.raw for held in self._held])
        self._clear_held()
        self.phase = FlowPhase.PASSTHROUGH
        return out

    def forward_rewritten(
        self, inner: bytes, second: SecondHelloTranslator | None = None
    ) -> FlowOutput:
        """The decision: ECH accepted; send ``inner`` in place of the first ClientHello.

        :param inner: the ClientHelloInner handshake message (4-byte header).
        :param second: translates a second ClientHello after a
            HelloRetryRequest (it holds the HPKE context, RFC 9849 §7.1.1).
        """
        self._require(FlowPhase.DECIDING)
        first = self._stream.message_at(0)
        assert first is not None  # DECIDING is only reached with it complete
        self._segments.append(Segment(0, len(first), 0, len(inner)))
        self._backend_stream += inner
        self._second = second
        self.phase = FlowPhase.TRANSLATING
        out = FlowOutput()
        try:
            self._flush([self._segments[0]], out)
        except AlertError as error:
            return self.refuse(QuicError.from_alert(error), out)
        except QuicError as error:
            return self.refuse(error, out)
        return out

    def refuse(self, error: QuicError, out: FlowOutput | None = None) -> FlowOutput:
        """Close the flow with CONNECTION_CLOSE ``error`` to the client (and the backend).

        The client gets it in a server Initial (RFC 9000 §10.2.3, RFC 9001
        §4.8 for CRYPTO_ERROR); once a backend is involved it gets one in a
        client Initial so it frees its state at once.
        """
        out = out or FlowOutput()
        if self.phase is FlowPhase.CLOSED:
            return out
        server_pn = 0 if self._largest_server_pn is None else self._largest_server_pn + 1
        out.to_client.append(
            close_datagram(
                self.version,
                self.keys(),
                from_server=True,
                dcid=self.client_scid,
                scid=self.original_dcid,
                packet_number=server_pn,
                error=error,
            )
        )
        if self.phase is FlowPhase.TRANSLATING:
            last = self._last_header
            out.to_backend.append(
                close_datagram(
                    self.version,
                    self.keys(),
                    from_server=False,
                    dcid=last.dcid,
                    scid=self.client_scid,
                    token=last.token,
                    packet_number=self._allocate(),
                    error=error,
                )
            )
        out.error = error
        self._close()
        return out

    def server_datagram(self, datagram: bytes) -> None:
        """Observe a backend datagram before it is relayed unchanged.

        Only while TRANSLATING: it learns the server's Initial packet numbers
        (so a refusal's number is fresh) and a Retry, which moves the Initial
        keys to the Retry's Source Connection ID (RFC 9000 §17.2.5.2).  It
        never raises: a backend's bytes are not the front's to judge.
        """
        if self.phase is not FlowPhase.TRANSLATING or not datagram or not datagram[0] & 0x80:
            return
        try:
            packets, _rest = split_datagram(datagram)
        except QuicDrop:
            return
        for header in packets:
            version = header.quic_version
            if version is None:
                return
            if header.packet_type is PacketType.RETRY:
                self._observe_retry(header, version, datagram)
            elif header.packet_type is PacketType.INITIAL:
                try:
                    _h, pn, _l = unmask_packet_number(
                        datagram, header, self.keys(version).server, self._largest_server_pn
                    )
                except QuicDrop:
                    continue
                if self._largest_server_pn is None or pn > self._largest_server_pn:
                    self._largest_server_pn = pn

    # -- reading -----------------------------------------------------------

    def _read(self, datagram: bytes, out: FlowOutput) -> ClientDatagram | None:
        """Take a client datagram apart; None if nothing in it is usable."""
        if not datagram or not datagram[0] & 0x80:
            # A short header: only possible once the handshake is under way.
            if self.phase is FlowPhase.TRANSLATING and not self._held:
                out.to_backend.append(datagram)
            else:
                out.dropped += 1
            return None
        try:
            held = read_client_datagram(
                datagram, lambda v: self.keys(v).client, self._largest_client_pn
            )
        except QuicDrop:
            out.dropped += 1
            return None
        out.dropped += held.dropped
        for initial in held.initials:
            number = initial.plain.packet_number
            if self._largest_client_pn is None or number > self._largest_client_pn:
                self._largest_client_pn = number
                self._last_header = initial.header
        return held if held.initials or held.tail else None

    def _take(self, held: ClientDatagram, now: float, out: FlowOutput) -> None:
        """Hold or translate a read datagram, by phase."""
        for initial in held.initials:
            if initial.frames.close is not None and self.phase is FlowPhase.COLLECTING:
                self._close()  # the client gave up before any backend was involved
                return
            for frame in initial.frames.crypto:
                self._stream.add(frame.offset, frame.data)
        if self.phase is FlowPhase.TRANSLATING:
            if held.initials and len(self._used_pns) >= self.limits.max_initial_packets:
                out.dropped += len(held.initials)
                return
            if not self._held:
                self._hold_since = now
            self._hold(held)
            self._flush([], out)
            return
        self._hold(held)
        if self.phase is FlowPhase.COLLECTING:
            hello = self._stream.message_at(0)
            if hello is not None:
                self.phase = FlowPhase.DECIDING
                out.hello = hello

    def _hold(self, held: ClientDatagram) -> None:
        self._held.append(held)
        self._held_packets += len(held.initials) + (1 if held.tail else 0)
        self._held_bytes += len(held.raw)
        limits = self.limits
        if self._held_packets > limits.max_held_packets or self._held_bytes > limits.max_held_bytes:
            raise CryptoBufferExceeded("too many packets before the ClientHello was complete")

    def _clear_held(self) -> list[ClientDatagram]:
        held = self._held
        self._held = []
        self._held_packets = self._held_bytes = 0
        return held

    # -- translating -------------------------------------------------------

    def _flush(self, fresh: list[Segment], out: FlowOutput) -> None:
        """Translate the held datagrams unless a later ClientHello is still incomplete."""
        next_start = self._segments[-1].client_end
        if self._stream.highest > next_start:
            hello = self._stream.message_at(next_start)
            if hello is None:
                return  # keep holding until the second ClientHello is whole
            if self._second is None:
                raise QuicError("a ClientHello after the second one", code=_UNEXPECTED)
            translate, self._second = self._second, None
            inner = translate(hello)
            start = len(self._backend_stream)
            segment = Segment(next_start, next_start + len(hello), start, start + len(inner))
            self._segments.append(segment)
            fresh.append(segment)
            self._backend_stream += inner
            if self._stream.highest > segment.client_end:
                raise QuicError("CRYPTO data after the second ClientHello", code=_UNEXPECTED)
        out.to_backend += self._translate(self._clear_held(), fresh)

    def _translate(self, batch: list[ClientDatagram], fresh: list[Segment]) -> list[bytes]:
        """Rewrite a batch of client datagrams for the backend."""
        initials = [i for held in batch for i in held.initials]
        tails = [held.tail for held in batch if held.tail]
        if not fresh and len(batch) == 1 and self._verbatim(initials):
            return [batch[0].raw]
        ranges = [(seg.backend_start, seg.backend_end) for seg in fresh]
        for initial in initials:
            for frame in initial.frames.crypto:
                end = frame.offset + len(frame.data)
                ranges += backend_ranges(self._segments, frame.offset, end, fresh)
        stream = self._backend_stream
        crypto = [(lo, bytes(stream[lo:hi])) for lo, hi in merge_ranges(ranges)]
        datagrams: list[bytes] = []
        if initials:
            initials.sort(key=lambda i: i.plain.packet_number)
            packets = [self._outgoing(i) for i in initials]
            size = max(MIN_INITIAL_DATAGRAM, *(len(held.raw) for held in batch))
            datagrams = pack_initials(
                packets,
                crypto,
                lambda version: self.keys(version).client,
                self._allocate,
                min(size, self.limits.max_datagram),
            )
            # Numbers added past the client's shift its later ones up, so
            # they stay unique and in the client's order.
            assert self._largest_client_pn is not None
            self._pn_shift = max(self._pn_shift, self._max_pn - self._largest_client_pn)
        return datagrams + tails

    def _verbatim(self, initials: list[ClientInitial]) -> bool:
        """Whether packets without CRYPTO data can go as they came (same numbers free)."""
        numbers = [i.plain.packet_number for i in initials]
        if any(i.frames.crypto for i in initials) or self._pn_shift:
            return False
        if any(n in self._used_pns for n in numbers):
            return False
        for number in numbers:
            self._use(number)
        return True

    def _outgoing(self, initial: ClientInitial) -> OutgoingInitial:
        header = initial.header
        frames = initial.frames
        return OutgoingInitial(
            version=initial.version,
            dcid=header.dcid,
            scid=header.scid,
            token=header.token,
            fixed_bit=bool(initial.plain.first_byte & 0x40),
            packet_number=self._map_pn(initial.plain.packet_number),
            kept=frames.kept,
            needs_ack=frames.ack_eliciting,
            has_ping=any(f.type == FRAME_PING for f in frames.frames),
        )

    def _map_pn(self, client_pn: int) -> int:
        candidate = client_pn + self._pn_shift
        if candidate in self._used_pns:
            candidate = self._max_pn + 1
        self._use(candidate)
        return candidate

    def _allocate(self) -> int:
        number = self._max_pn + 1
        self._use(number)
        return number

    def _use(self, number: int) -> None:
        self._used_pns.add(number)
        self._max_pn = max(self._max_pn, number)

    # -- state -------------------------------------------------------------

    def _observe_retry(self, header: LongHeader, version: QuicVersion, datagram: bytes) -> None:
        """Follow a backend Retry: new keys from its Source Connection ID (RFC 9001 §5.2)."""
        if self._retried or not header.token:
            return
        if not verify_retry(version, self._key_dcid, datagram[header.start : header.end]):
            return
        self._retried = True
        self._key_dcid = header.scid
        self._keys.clear()

    def _require(self, phase: FlowPhase) -> None:
        if self.phase is not phase:
            raise RuntimeError(f"flow is {self.phase.value}, not {phase.value}")

    def _close(self) -> None:
        self._clear_held()
        self.phase = FlowPhase.CLOSED
