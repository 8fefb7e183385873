# -*- test-case-name: tests.test_quic_packets -*-
"""What can go wrong with a client's Initial packets, and what the front does about it.

Two outcomes, never a traceback:

* :class:`QuicDrop`: the datagram or packet is discarded without a word.
  RFC 9000 tells a server to drop what it cannot attribute or authenticate:
  short datagrams (§14.1), unknown fixed fields, packets that fail packet
  protection (RFC 9001 §5.2 last paragraph, §9.5).
* :class:`QuicError`: a connection error (RFC 9000 §11.1) the front answers
  with a CONNECTION_CLOSE frame of type 0x1c carrying :attr:`QuicError.code`
  (RFC 9000 §20.1); a TLS alert becomes CRYPTO_ERROR 0x100 + alert
  (RFC 9001 §4.8) through :meth:`QuicError.from_alert`.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from echfront.errors import AlertError

__all__ = [
    "CryptoBufferExceeded",
    "FrameEncodingError",
    "ProtocolViolation",
    "QuicDrop",
    "QuicError",
    "TransportErrorCode",
    "crypto_error_code",
]


class TransportErrorCode(enum.IntEnum):
    """QUIC transport error codes used by the front (RFC 9000 §20.1)."""

    NO_ERROR = 0x00
    INTERNAL_ERROR = 0x01
    CONNECTION_REFUSED = 0x02
    FRAME_ENCODING_ERROR = 0x07
    PROTOCOL_VIOLATION = 0x0A
    CRYPTO_BUFFER_EXCEEDED = 0x0D
    #: The first of the CRYPTO_ERROR range 0x0100-0x01ff (RFC 9001 §4.8).
    CRYPTO_ERROR = 0x100


def crypto_error_code(alert: int) -> int:
    """The transport error code for a TLS alert: 0x100 + alert (RFC 9001 §4.8)."""
    if not 0 <= alert <= 0xFF:
        raise ValueError(f"TLS alert {alert} out of range")
    return TransportErrorCode.CRYPTO_ERROR + alert


class QuicDrop(Exception):
    """Discard the datagram or packet silently; the message is for logs only."""


class QuicError(Exception):
    """A connection error: the front closes the flow with :attr:`code`.

    :ivar code: the transport error code for the CONNECTION_CLOSE frame.
    :ivar frame_type: the frame type that triggered it, 0 when unknown
        (RFC 9000 §19.19).
    """

    default_code: ClassVar[int] = TransportErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: int | None = None, frame_type: int = 0) -> None:
        """Record the message (logs only, never sent) and the codes."""
        super().__init__(message)
        self.code = self.default_code if code is None else code
        self.frame_type = frame_type

    @classmethod
    def from_alert(cls, error: AlertError) -> QuicError:
        """Carry a TLS alert as CRYPTO_ERROR (RFC 9001 §4.8)."""
        return cls(str(error), code=crypto_error_code(int(error.alert)))

    @property
    def name(self) -> str:
        """A short public name for the code, e.g. ``protocol_violation`` or ``crypto_error_47``.

        This, not the message, is what may go on the wire as a reason phrase:
        messages may describe a ClientHelloInner (RFC 9849 §10.5).
        """
        code = self.code
        if TransportErrorCode.CRYPTO_ERROR <= code <= 0x1FF:
            return f"crypto_error_{code - TransportErrorCode.CRYPTO_ERROR}"
        try:
            return TransportErrorCode(code).name.lower()
        except ValueError:
            return f"error_0x{code:x}"


class FrameEncodingError(QuicError):
    """A frame that cannot be parsed (RFC 9000 §20.1, FRAME_ENCODING_ERROR)."""

    default_code = TransportErrorCode.FRAME_ENCODING_ERROR


class ProtocolViolation(QuicError):
    """A frame or field an Initial packet must not carry (PROTOCOL_VIOLATION)."""

    default_code = TransportErrorCode.PROTOCOL_VIOLATION


class CryptoBufferExceeded(QuicError):
    """More CRYPTO data, or more packets, than the front buffers for a hello."""

    default_code = TransportErrorCode.CRYPTO_BUFFER_EXCEEDED
