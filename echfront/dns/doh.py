# -*- test-case-name: tests.test_publish,tests.test_check -*-
"""DNS over HTTPS (RFC 8484): the one DoH client, for the verifier and ``echfront check``.

A question goes as one POST (RFC 8484 §4.1) of the DNS message in wire
format with ID 0, which lets HTTP caches share answers; both directions use
the media type ``application/dns-message`` (§6).  An answer is usable when
its status is 200 (§4.2.1), its media type is that one, it is at most 65535
octets (no DNS message is longer, §6) and it answers the question asked.
The DNS encoding and decoding are dnspython's.

The client blocks.  ``echfront check`` calls it directly; the
:class:`~echfront.dns.verify.Verifier` runs it in the reactor's thread pool,
as it does its UDP and TCP queries, so the reactor never waits for it.

Why our own client and not ``dns.query.https``: dnspython's DoH needs
``httpx2`` (not a dependency of echfront), reads an answer of any size,
does not check its media type and reports an error status with the body in a
multi-line message.  This one needs only the standard library, bounds what
it reads and fails with one line.

Errors: :class:`OSError` when the server could not be asked (no connection,
TLS failure, :class:`TimeoutError`), :class:`ValueError` when it answered
but not with a usable DNS answer.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message as HeaderMessage
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rdatatype

__all__ = ["MAX_MESSAGE", "MEDIA_TYPE", "DoHClient", "DoHReply", "doh_query"]

#: RFC 8484 §6: the media type of a DoH request and answer.
MEDIA_TYPE = "application/dns-message"
#: A DNS message over TCP or DoH is at most 65535 octets (RFC 1035 §4.2.2,
#: RFC 8484 §6); a longer body is not a DNS answer.
MAX_MESSAGE = 65535


def _one_line(error: object) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def doh_query(name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
    """A recursive question for a DoH server, with ID 0 (RFC 8484 §4.1)."""
    query = dns.message.make_query(name, rdtype)
    query.id = 0
    return query


@dataclass(frozen=True, slots=True)
class DoHReply:
    """What a DoH server sent back, before it is read as DNS.

    :ivar status: the HTTP status.
    :ivar media_type: the Content-Type without parameters, lower case; ``""``
        when there is none.
    :ivar body: the body (empty for a status other than 2xx).
    """

    status: int
    media_type: str
    body: bytes

    def message(self, query: dns.message.Message) -> dns.message.Message:
        """The DNS answer to ``query`` this reply carries (RFC 8484 §4.2).

        :raises ValueError: one line: a status other than 200, another media
            type, a body that does not parse or answers another question.
        """
        if self.status != 200:
            raise ValueError(f"HTTP status {self.status}")
        if self.media_type != MEDIA_TYPE:
            kind = self.media_type or "of no media type"
            raise ValueError(f"the answer is {kind}, not {MEDIA_TYPE}")
        try:
            answer = dns.message.from_wire(self.body)
        except dns.exception.DNSException as error:
            raise ValueError(f"the answer does not parse ({_one_line(error)})") from None
        if not query.is_response(answer):
            raise ValueError("the answer does not match the question")
        return answer


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects fail as their status.

    urllib would follow a 301, 302 or 303 to a POST with a GET without the
    question (RFC 9110 §15.4 lets clients do that); RFC 8484 asks nothing
    of the sort, so a redirect is reported instead.
    """

    def redirect_request(self, *args: Any) -> None:
        return None


def _media_type(headers: HeaderMessage | None) -> str:
    value = headers.get("Content-Type") if headers is not None else None
    return str(value).split(";", 1)[0].strip().lower() if value else ""


class DoHClient:
    """Asks one DoH server (RFC 8484 §4.1, POST); blocking.

    :param url: the server's URL, or its URI template (RFC 8484 §4.1): the
        ``{?dns}`` variable is for GET and is dropped.
    :param timeout: seconds for connecting and for each read; the whole
        body must arrive within it too.
    """

    def __init__(self, url: str, timeout: float) -> None:
        """Ask ``url``, each exchange bounded by ``timeout``."""
        self.url = url.replace("{?dns}", "")
        self.timeout = timeout

    def __repr__(self) -> str:
        """The server asked."""
        return f"<DoHClient {self.url}>"

    def exchange(self, query: dns.message.Message) -> DoHReply:
        """POST ``query`` and return the reply, whatever its status.

        :raises OSError: when the server could not be asked.
        :raises ValueError: when what came back is not HTTP, or is longer
            than a DNS message.
        """
        request = urllib.request.Request(  # noqa: S310 (the caller chose http(s))
            self.url,
            data=query.to_wire(),
            headers={"Content-Type": MEDIA_TYPE, "Accept": MEDIA_TYPE},
            method="POST",
        )
        deadline = time.monotonic() + self.timeout
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=self.timeout) as response:
                kind = _media_type(response.headers)
                return DoHReply(response.status, kind, self._read(response, deadline))
        except urllib.error.HTTPError as error:
            # A status outside 2xx: nothing to read, the status says it.
            error.close()
            return DoHReply(error.code, _media_type(error.headers), b"")
        except urllib.error.URLError as error:
            # urllib wraps what went wrong (refused, TLS, timeout): raise that.
            reason = error.reason
            raise (reason if isinstance(reason, OSError) else OSError(str(reason))) from None
        except http.client.HTTPException as error:
            raise ValueError(f"the answer is not HTTP ({_one_line(error)})") from None

    def query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        """Ask for (``name``, ``rdtype``) and return the DNS answer.

        :raises OSError: when the server could not be asked.
        :raises ValueError: when it answered, but not with a usable answer.
        """
        question = doh_query(name, rdtype)
        return self.exchange(question).message(question)

    def _read(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        """The body, at most :data:`MAX_MESSAGE` octets, by ``deadline``.

        Each read waits at most ``timeout`` (the socket's); checking the
        deadline between reads stops a server that sends a byte at a time.
        """
        body = bytearray()
        while len(body) <= MAX_MESSAGE:
            if time.monotonic() > deadline:
                raise TimeoutError("timed out")
            chunk = response.read1(MAX_MESSAGE + 1 - len(body))
            if not chunk:
                return bytes(body)
            body += chunk
        raise ValueError(f"the answer is longer than {MAX_MESSAGE} octets")
