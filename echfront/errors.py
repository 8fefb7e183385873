# -*- test-case-name: tests.test_records -*-
"""Errors, each carrying the TLS alert the front sends for it.

Every problem found in bytes from the network is raised as a subclass of
:class:`AlertError`; the one place that turns an error into wire bytes is
:func:`alert_record`.  Problems in local files and settings (key files,
configuration, command-line arguments) are :class:`ConfigError`: they never
reach a peer and are reported as one line to the operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from types import MappingProxyType
from typing import ClassVar

__all__ = [
    "ALERT_NAMES",
    "AlertDescription",
    "AlertError",
    "ConfigError",
    "DecodeError",
    "DecryptError",
    "HandshakeFailure",
    "IllegalParameter",
    "InternalError",
    "MissingExtension",
    "RecordOverflow",
    "UnexpectedMessage",
    "UnrecognizedName",
    "alert_name",
    "alert_record",
]

#: Every TLS alert description by its registry name (RFC 8446 §6 and the IANA
#: "TLS Alerts" registry; ``ech_required`` from RFC 9849 §11.2).  The one
#: alert-name table: log fields, metric labels and messages name alerts
#: through it (:func:`alert_name`).
ALERT_NAMES: Mapping[int, str] = MappingProxyType(
    {
        0: "close_notify",
        10: "unexpected_message",
        20: "bad_record_mac",
        22: "record_overflow",
        40: "handshake_failure",
        42: "bad_certificate",
        43: "unsupported_certificate",
        44: "certificate_revoked",
        45: "certificate_expired",
        46: "certificate_unknown",
        47: "illegal_parameter",
        48: "unknown_ca",
        49: "access_denied",
        50: "decode_error",
        51: "decrypt_error",
        70: "protocol_version",
        71: "insufficient_security",
        80: "internal_error",
        86: "inappropriate_fallback",
        90: "user_canceled",
        109: "missing_extension",
        110: "unsupported_extension",
        112: "unrecognized_name",
        113: "bad_certificate_status_response",
        115: "unknown_psk_identity",
        116: "certificate_required",
        120: "no_application_protocol",
        121: "ech_required",
    }
)


def alert_name(alert: int) -> str:
    """The registry name of an alert description (``unrecognized_name``), or ``unknown``."""
    return ALERT_NAMES.get(int(alert), "unknown")


class AlertDescription(IntEnum):
    """The TLS alerts the front sends (RFC 8446 §6, RFC 9849 §11.2).

    Members are constants for code; their text is :func:`alert_name` (the
    member names agree with :data:`ALERT_NAMES`, tests.test_errors checks).
    """

    UNEXPECTED_MESSAGE = 10
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    ILLEGAL_PARAMETER = 47
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    INTERNAL_ERROR = 80
    MISSING_EXTENSION = 109
    UNRECOGNIZED_NAME = 112
    ECH_REQUIRED = 121


class AlertError(Exception):
    """A fatal protocol error: the front sends :attr:`alert` and closes.

    The message is for logs only.  It must never contain data that came from
    inside an encrypted ClientHelloInner (RFC 9849 §10.5 and SEC-3): callers
    describe *what* was wrong, not the private values involved.
    """

    alert: ClassVar[AlertDescription] = AlertDescription.INTERNAL_ERROR

    def __str__(self) -> str:
        """Return ``"<alert name>: <message>"``, one line."""
        text = super().__str__()
        name = alert_name(self.alert)
        return f"{name}: {text}" if text else name


class UnexpectedMessage(AlertError):
    """A record or handshake message of the wrong type (alert 10)."""

    alert = AlertDescription.UNEXPECTED_MESSAGE


class RecordOverflow(AlertError):
    """A TLS record longer than RFC 8446 §5.1 allows (alert 22)."""

    alert = AlertDescription.RECORD_OVERFLOW


class HandshakeFailure(AlertError):
    """No acceptable way to continue the handshake, e.g. no backend (alert 40)."""

    alert = AlertDescription.HANDSHAKE_FAILURE


class IllegalParameter(AlertError):
    """A syntactically valid field with a forbidden value (alert 47)."""

    alert = AlertDescription.ILLEGAL_PARAMETER


class DecodeError(AlertError):
    """A message that cannot be parsed: bad lengths, trailing bytes (alert 50)."""

    alert = AlertDescription.DECODE_ERROR


class DecryptError(AlertError):
    """The second ClientHello after a HelloRetryRequest did not decrypt (alert 51)."""

    alert = AlertDescription.DECRYPT_ERROR


class InternalError(AlertError):
    """The front itself failed, e.g. a backend could not be reached (alert 80)."""

    alert = AlertDescription.INTERNAL_ERROR


class MissingExtension(AlertError):
    """A required extension is absent, e.g. ECH in the second ClientHello (alert 109)."""

    alert = AlertDescription.MISSING_EXTENSION


class UnrecognizedName(AlertError):
    """The server name has no route (alert 112, RFC 6066 §3)."""

    alert = AlertDescription.UNRECOGNIZED_NAME


class ConfigError(Exception):
    """A local file, setting or argument is unusable; the message is one line."""


def alert_record(alert: AlertDescription | int) -> bytes:
    """Return a plaintext fatal alert record (RFC 8446 §6).

    The front only ever speaks before any keys are established, so its alerts
    are unencrypted: record type 21, version 0x0303, level 2 (fatal).
    """
    return b"\x15\x03\x03\x00\x02\x02" + bytes((int(alert),))
