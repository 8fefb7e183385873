"""A tiny local application for ``[locals.X] factory = "tests.localapp:echo_factory"``.

It speaks the Go ``echtest`` echo protocol, so ``echtest client`` can talk
to a name the front terminates itself, and answers HTTP/1.1 for browsers
(BoringSSL through curl_cffi):

* with no ALPN (the Go client) it sends one JSON report line shaped like the
  Go backend's, ``{"backend": "local", "sni": ..., "ech_status": ...,
  "config_id": ...}``, taken from :func:`echfront.front.local.hello_info_for`,
  then echoes every byte;
* when ALPN chose ``http/1.1`` (configure ``alpn = ["http/1.1"]``) it reads
  one request and answers ``200`` with the same report as a JSON body, then
  closes.

The report is sent once the TLS handshake is complete (``IHandshakeListener``),
which is when the negotiated ALPN is known; the Go client only reads it after
its handshake anyway.

The echo's end: the Go client half-closes with a TLS ``close_notify`` (Go's
``tls.Conn.CloseWrite`` sends the alert and no TCP FIN) and reads until
EOF.  Twisted answers a received ``close_notify`` with its own and closes
the transport after everything written so far.  This app writes with the
plain ``transport.write`` any application uses; the front's local TLS must
not lose a reply written just before such a close (it once did, with
Twisted's buffering TLS transport: tests.test_interop_front checks it).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IHandshakeListener, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from echfront.front.local import hello_info_for

if TYPE_CHECKING:
    from echfront.interfaces import ServiceContext

__all__ = ["EchoReportFactory", "EchoReportProtocol", "echo_factory"]

#: Bound on the HTTP request head read in HTTP mode.
_MAX_REQUEST = 16 * 1024


@implementer(IHandshakeListener)
class EchoReportProtocol(Protocol):
    """Report what the front decoded, then echo (or answer one HTTP request)."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"backend": "local"}
        self.mode = "pending"  # then "echo" or "http"
        self._early: list[bytes] = []
        self._request = b""

    def connectionMade(self) -> None:
        """Take the decoded ClientHello the front attached to our transport."""
        info = hello_info_for(self.transport)
        self.report.update(
            sni=None if info is None else info.server_name,
            ech_status=None if info is None else info.status.value,
            config_id=None if info is None else info.config_id,
        )

    def handshakeCompleted(self) -> None:
        """Choose the mode by the negotiated ALPN and start it."""
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        self.report["alpn"] = negotiated.decode() if negotiated else ""
        if negotiated == b"http/1.1":
            self.mode = "http"
        else:
            self.mode = "echo"
            assert self.transport is not None
            self.transport.write(json.dumps(self.report).encode() + b"\n")
        early, self._early = b"".join(self._early), []
        if early:
            self.dataReceived(early)

    def dataReceived(self, data: bytes) -> None:
        """Echo, or collect the HTTP request head."""
        assert self.transport is not None
        if self.mode == "echo":
            self.transport.write(data)
        elif self.mode == "pending":
            self._early.append(data)
        elif self.mode == "http":
            self._request += data
            if b"\r\n\r\n" in self._request:
                self._answer()
            elif len(self._request) > _MAX_REQUEST:
                self.transport.loseConnection()

    def _answer(self) -> None:
        assert self.transport is not None
        request_line = self._request.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        self.report["path"] = parts[1] if len(parts) > 1 else ""
        body = json.dumps(self.report).encode() + b"\n"
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.loseConnection()
        self.mode = "done"


class EchoReportFactory(Factory):
    """Builds :class:`EchoReportProtocol`."""

    noisy = False
    protocol = EchoReportProtocol


def echo_factory(context: ServiceContext) -> IProtocolFactory:
    """Build the factory (the ``[locals.X] factory`` entry point)."""
    return EchoReportFactory()
