# -*- test-case-name: tests.test_relay -*-
"""Watching a relayed ECH-accepted connection until the backend's first answer, sans-IO.

In split mode the front forwards the ClientHelloInner; if the backend
answers with a HelloRetryRequest, the client's second ClientHello is again
an outer hello that the front must decrypt with the first hello's HPKE
context and rewrite (RFC 9849 §7.1.1).  :class:`HelloRetryWatch` holds
that state for one connection, for any relay that moves the bytes (the
Twisted relay, :mod:`echfront.front.relay`, and the lean engine's):

* backend to client: bytes are forwarded as they come (by the caller), and
  parsed here until the ServerHello is known (checklist §1.H);
* client to backend: until then only whole records are released, so that
  if the ServerHello is a HelloRetryRequest the second ClientHello starts
  at a record boundary; the client may send CCS and 0-RTT data in between;
* after a HelloRetryRequest the second ClientHello is reassembled across
  records and reads (CCS, early data and alerts before it pass through,
  HRR-9), decrypted and rewritten.

Once the ServerHello is known the server direction needs no more watching
(:attr:`server_done`); once the client direction is settled too
(:attr:`client_done`) every byte passes unchanged and the caller may stop
calling in.  Bytes for the backend are handed to the ``forward`` callable
the caller passes, in order; an error in what the client sent raises an
:class:`~echfront.errors.AlertError` after everything before it went out.
"""

from __future__ import annotations

from collections.abc import Callable

from echfront.ech.decoder import SecondHelloDecoder
from echfront.errors import AlertError
from echfront.tls.hello import (
    HANDSHAKE_CLIENT_HELLO,
    HANDSHAKE_SERVER_HELLO,
    HRR_RANDOM,
    ServerHello,
)
from echfront.tls.records import (
    CONTENT_ALERT,
    CONTENT_APPLICATION_DATA,
    CONTENT_CHANGE_CIPHER_SPEC,
    CONTENT_HANDSHAKE,
    HEADER_LENGTH,
    HandshakeReader,
    RecordSplitter,
)

__all__ = ["HelloRetryWatch"]

#: Before the second ClientHello a client may still send CCS (middlebox
#: compatibility), 0-RTT application data sent after the first ClientHello,
#: or an alert; all pass through untouched (HRR-9).
_BEFORE_SECOND_HELLO = frozenset(
    (CONTENT_CHANGE_CIPHER_SPEC, CONTENT_APPLICATION_DATA, CONTENT_ALERT)
)


def _is_hello_retry(message: bytes) -> bool:
    """Whether a ServerHello message is a HelloRetryRequest (RFC 8446 §4.1.3).

    Only a message whose random is the HRR value can be one, and only a
    well-formed one counts; anything else (an ordinary ServerHello, or one
    too malformed to parse) needs nothing rewritten.  So the full parse runs
    only for a candidate: the common ServerHello costs a comparison.
    """
    if message[_RANDOM_AT:_RANDOM_END] != HRR_RANDOM:
        return False
    try:
        return ServerHello.from_message(message).is_hello_retry_request
    except AlertError:
        return False


#: Where the random is in a ServerHello message: after the 4-byte handshake
#: header and the 2-byte legacy_version.
_RANDOM_AT = 6
_RANDOM_END = _RANDOM_AT + len(HRR_RANDOM)
#: The same in the backend's first bytes, a record that starts with the ServerHello.
_FIRST_RANDOM_AT = HEADER_LENGTH + _RANDOM_AT
_FIRST_RANDOM_END = HEADER_LENGTH + _RANDOM_END


class HelloRetryWatch:
    """The watched start of one ECH-accepted relayed connection (see the module docstring).

    :param second: decrypts and rewrites the second ClientHello.
    :param max_second_hello: bound on the records of the second ClientHello.
    :ivar server_done: the backend's first handshake message is known.
    :ivar client_done: the client direction passes bytes unchanged from now on.
    :ivar hello_retry: the backend answered with a HelloRetryRequest.
    """

    __slots__ = (
        "_max_second_hello",
        "_second",
        "_second_reader",
        "_server_reader",
        "_splitter",
        "client_done",
        "hello_retry",
        "server_done",
    )

    def __init__(self, second: SecondHelloDecoder, max_second_hello: int) -> None:
        """Watch from the first ClientHello's hand-off to the backend."""
        self._second: SecondHelloDecoder | None = second
        self._max_second_hello = max_second_hello
        #: Made only if the first read from the backend does not settle it
        #: (see :meth:`from_server`).
        self._server_reader: HandshakeReader | None = None
        self._splitter: RecordSplitter | None = RecordSplitter()
        self._second_reader: HandshakeReader | None = None
        self.server_done = False
        self.client_done = False
        self.hello_retry = False

    def from_server(self, data: bytes, forward: Callable[[bytes], object]) -> bool:
        """Watch backend bytes; the caller forwards them to the client after this.

        The state is updated before the bytes leave, so the client direction
        is ready for a second ClientHello before the client can send one.
        When the ServerHello completes, client bytes held back are released
        through ``forward`` (or, after a HelloRetryRequest, taken as the
        start of the second ClientHello).

        :returns: whether the backend's first handshake message is known
            (:attr:`server_done`).
        :raises AlertError: for what the client sent (held bytes that cannot
            start a second ClientHello).
        """
        if self.server_done:
            return True
        reader = self._server_reader
        if reader is None:
            if (
                len(data) >= _FIRST_RANDOM_END
                and data[0] == CONTENT_HANDSHAKE
                and data[5] == HANDSHAKE_SERVER_HELLO
                and (data[3] << 8 | data[4]) >= _RANDOM_END
                and data[_FIRST_RANDOM_AT:_FIRST_RANDOM_END] != HRR_RANDOM
            ):
                # The usual first read: a record that starts a ServerHello
                # and holds its random, which is not the HelloRetryRequest
                # value; so it is not one, however the rest parses, and it
                # needs no reassembly (a candidate HRR, a ServerHello cut
                # short or split finely, anything else: the reader below).
                self._server_said(False, forward)
                return True
            reader = self._server_reader = HandshakeReader(
                HANDSHAKE_SERVER_HELLO, require_boundary=False
            )
        try:
            flight = reader.feed(data)
        except AlertError:
            # Not a ServerHello we understand (an alert, TLS 1.2 oddities):
            # nothing to rewrite, so step aside.
            self._server_said(False, forward)
            return True
        if flight is None:
            return False
        self._server_said(_is_hello_retry(flight.message), forward)
        return True

    def _server_said(self, retry: bool, forward: Callable[[bytes], object]) -> None:
        self._server_reader = None
        self.server_done = True
        splitter = self._splitter
        self._splitter = None
        held = splitter.pending() if splitter is not None else b""
        if not retry:
            self._second = None
            self.client_done = True
            if held:
                forward(held)
            return
        self.hello_retry = True
        self._second_reader = HandshakeReader(
            HANDSHAKE_CLIENT_HELLO,
            max_bytes=self._max_second_hello,
            pass_types=_BEFORE_SECOND_HELLO,
        )
        if held:
            self._await_second_hello(held, forward)

    def from_client(self, data: bytes, forward: Callable[[bytes], object]) -> None:
        """Pass on what the client sent, as far as it may go to the backend now.

        :raises AlertError: for a malformed record stream or second ClientHello.
        """
        splitter = self._splitter
        if splitter is not None:
            whole = splitter.feed(data)
            if whole:
                forward(whole)
        elif self._second_reader is not None:
            self._await_second_hello(data, forward)
        else:
            forward(data)

    def _await_second_hello(self, data: bytes, forward: Callable[[bytes], object]) -> None:
        """Reassemble and rewrite the second ClientHello (RFC 9849 §7.1.1)."""
        reader = self._second_reader
        second = self._second
        assert reader is not None and second is not None
        flight = reader.feed(data)
        passed = reader.take_passed()
        if passed:
            forward(passed)
        if flight is None:
            return
        rewritten = second.decode(flight)
        self._second_reader = None
        self._second = None
        self.client_done = True
        forward(rewritten.forward + flight.rest)

    def client_eof(self) -> bytes:
        """The client sent FIN: the partial record held back, to send before it.

        A partial record can never complete now; the backend may as well see
        exactly what the client sent.
        """
        splitter = self._splitter
        return splitter.pending() if splitter is not None else b""
