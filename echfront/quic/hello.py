# -*- test-case-name: tests.test_quic_flow -*-
"""The ECH decoder applied to a ClientHello that came over QUIC (RFC 9001 §4, RFC 9849 §7).

Over TCP a ClientHello arrives in TLS records; over QUIC it arrives as a bare
handshake message in CRYPTO frames, with no record layer (RFC 9001 §4.1.3).
:class:`~echfront.ech.decoder.ECHDecoder` reads a
:class:`~echfront.tls.records.HandshakeFlight`, whose ``message`` is all it
uses to decide; the functions here build a flight with no records around the
message, so the decoder needs no QUIC entry point.  The record-shaped fields
of the result (``ClientHelloInfo.forward``, ``rest``) are meaningless for
QUIC and never used: a QUIC flow forwards
``ClientHelloInfo.inner.message``, the exact ClientHelloInner (REC-12).
"""

from __future__ import annotations

from collections.abc import Callable

from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus, SecondHelloDecoder
from echfront.quic.flow import FlowOutput, InitialFlow, SecondHelloTranslator
from echfront.tls.records import HandshakeFlight

__all__ = ["bare_flight", "decode_first_hello", "release", "second_hello_translator"]

#: TLS 1.2's record version, as a client's first record carries; irrelevant
#: here, since nothing is framed, but a flight needs one.
_NO_RECORD_VERSION = 0x0303


def bare_flight(message: bytes) -> HandshakeFlight:
    """A handshake message as a flight without records (QUIC's CRYPTO stream)."""
    return HandshakeFlight(
        message=message, records=b"", record_version=_NO_RECORD_VERSION, rest=b""
    )


def decode_first_hello(
    decoder: ECHDecoder, message: bytes, *, may_decrypt: Callable[[], bool] | None = None
) -> ClientHelloInfo:
    """Decode the first ClientHello of a QUIC flow, exactly as over TCP.

    :raises AlertError: as :meth:`ECHDecoder.decode` does; the flow refuses
        with CRYPTO_ERROR 0x100 + alert (RFC 9001 §4.8).
    """
    return decoder.decode(bare_flight(message), may_decrypt=may_decrypt)


def second_hello_translator(decoder: SecondHelloDecoder) -> SecondHelloTranslator:
    """The ClientHelloOuter -> ClientHelloInner rewrite of a second hello (RFC 9849 §7.1.1)."""

    def translate(message: bytes) -> bytes:
        return decoder.decode(bare_flight(message)).inner.message

    return translate


def release(flow: InitialFlow, info: ClientHelloInfo) -> FlowOutput:
    """Apply a decoded first hello to ``flow``: rewrite if ECH was accepted, else relay."""
    if info.status is ECHStatus.ACCEPTED and info.inner is not None:
        second = None if info.second_hello is None else second_hello_translator(info.second_hello)
        return flow.forward_rewritten(info.inner.message, second)
    return flow.forward_unchanged()
