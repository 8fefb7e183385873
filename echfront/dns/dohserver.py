# -*- test-case-name: tests.test_dohserver -*-
"""A DNS-over-HTTPS responder (RFC 8484) for a small in-memory zone.

``echfront try`` points a browser's secure DNS at it, so that the browser
learns the demo's ECHConfigList from an HTTPS record (RFC 9460, ``ech``
SvcParam of RFC 9848) the way it would in production: browsers use ECH only
when that record arrives over secure DNS.  It is not a resolver: it answers
from :class:`Zone` alone, authoritatively for the names it holds, and
NXDOMAIN for every other name, so nothing the browser looks up leaves the
machine.

:class:`DoHResource` serves ``GET ?dns=`` (base64url, RFC 8484 §4.1) and
``POST`` with ``application/dns-message`` (§4.1, §6).  Requests are bounded
(:data:`MAX_MESSAGE`); anything that is not one DNS query gets a 4xx with a
one-line reason.  :class:`BoundedRequest` keeps a Site from buffering an
oversized POST body at all.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from twisted.web.resource import Resource
from twisted.web.server import Request

from echfront.dns.svcb import https_record

__all__ = [
    "DNS_MESSAGE",
    "MAX_MESSAGE",
    "BoundedRequest",
    "DoHResource",
    "Zone",
    "demo_zone",
    "https_owner",
]

#: The media type of RFC 8484 §6.
DNS_MESSAGE = b"application/dns-message"
#: Largest query accepted, in bytes.  A stub query is a few dozen bytes, or
#: 128 with the EDNS padding browsers add (RFC 8467 §4.1); 4 KiB leaves room
#: for any real query while bounding what one request can make us parse.
MAX_MESSAGE = 4096
_BAD_REQUEST = 400
_NOT_ALLOWED = 405
_TOO_LARGE = 413
_UNSUPPORTED_MEDIA = 415


def https_owner(name: str, port: int) -> str:
    """The owner name a client queries for ``https://name:port/`` (RFC 9460 §9.1).

    Port 443 uses the name itself; any other port is prefixed ``_port._https``.
    """
    return name if port == 443 else f"_{port}._https.{name}"


@dataclass(frozen=True)
class Zone:
    """Read-only resource records for names under one or more origins.

    :ivar origins: the apexes held; a name below one of them that holds no
        record gets NXDOMAIN, or NODATA when a name below it does (an empty
        non-terminal, RFC 8020), with that apex's SOA (RFC 2308 §2); a name
        under no apex gets NXDOMAIN without one.
    :ivar rrsets: the records, keyed by (owner, type).
    :ivar negative_ttl: the SOA's TTL and minimum, the negative-cache time
        (RFC 2308 §5).
    """

    origins: frozenset[dns.name.Name]
    rrsets: Mapping[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rrset.RRset]
    negative_ttl: int = 60
    _owners: frozenset[dns.name.Name] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Index the owner names once (a Zone is immutable)."""
        object.__setattr__(self, "_owners", frozenset(name for name, _ in self.rrsets))

    @classmethod
    def from_text(
        cls, origins: Iterable[str], lines: Iterable[str], negative_ttl: int = 60
    ) -> Zone:
        """Build a zone from zone-file lines ``owner ttl IN type rdata`` (absolute owners).

        :raises dns.exception.SyntaxError: for a line dnspython cannot read.
        """
        rrsets: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rrset.RRset] = {}
        for line in lines:
            owner, ttl, rdclass, rdtype, rdata = line.split(None, 4)
            name = dns.name.from_text(owner)
            kind = dns.rdatatype.from_text(rdtype)
            rrset = rrsets.setdefault((name, kind), dns.rrset.RRset(name, dns.rdataclass.IN, kind))
            rrset.add(dns.rdata.from_text(rdclass, rdtype, rdata), int(ttl))
        apexes = frozenset(dns.name.from_text(origin) for origin in origins)
        return cls(apexes, rrsets, negative_ttl)

    def _apex(self, name: dns.name.Name) -> dns.name.Name | None:
        """The closest origin ``name`` is under, if any."""
        under = [origin for origin in self.origins if name.is_subdomain(origin)]
        return max(under, key=len, default=None)

    def _soa(self, apex: dns.name.Name) -> dns.rrset.RRset:
        ttl = self.negative_ttl
        text = f"{apex} . 1 {ttl} {ttl} {ttl} {ttl}"
        soa = dns.rrset.RRset(apex, dns.rdataclass.IN, dns.rdatatype.SOA)
        soa.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA, text), ttl)
        return soa

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The response to ``query`` (RFC 1034 §4.3.2, for the names held only).

        The response is padded as RFC 8467 asks when the query was.
        """
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        (question,) = query.question
        name, rdtype = question.name, dns.rdatatype.RdataType(question.rdtype)
        apex = self._apex(name)
        if question.rdclass != dns.rdataclass.IN or apex is None:
            # Not ours: say it does not exist rather than refuse, so a
            # browser in secure-DNS mode fails fast for every other name.
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        response.flags |= dns.flags.AA
        found = self.rrsets.get((name, rdtype))
        if found is not None:
            response.answer.append(found)
            return response
        if not any(owner.is_subdomain(name) for owner in self._owners):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(self._soa(apex))
        return response


def demo_zone(
    origins: Sequence[str],
    names: Sequence[str],
    config_list: bytes,
    *,
    port: int,
    alpn: Sequence[str] = ("http/1.1",),
    ipv4: str = "127.0.0.1",
    ipv6: str = "::1",
    ttl: int = 60,
) -> Zone:
    """The zone of a front serving ``names`` on ``port`` of the loopback addresses.

    Each name gets A and AAAA records, and an HTTPS record (RFC 9460 §9)
    carrying the ALPN ids, the port and the ECHConfigList (RFC 9848), both at
    the name itself and at the owner name :func:`https_owner` gives for
    ``port``, where clients look for ``https://name:port/``.
    """
    lines = []
    for name in names:
        lines.append(f"{name}. {ttl} IN A {ipv4}")
        lines.append(f"{name}. {ttl} IN AAAA {ipv6}")
        for owner in dict.fromkeys([name, https_owner(name, port)]):
            # TargetName "." means the owner itself (RFC 9460 §2.5.2), which
            # for a _port._https owner is not a host: name the host instead.
            target = "." if owner == name else name
            lines.append(
                https_record(owner, config_list, alpn=alpn, port=port, target=target, ttl=ttl)
            )
    return Zone.from_text(origins, lines, negative_ttl=ttl)


class BoundedRequest(Request):
    """A request that stores at most :data:`MAX_MESSAGE` bytes of body.

    Twisted buffers any body (to a temporary file past 100 KB) before a
    resource sees it; this one counts and drops the excess instead, and
    answers 413 without calling the resource.
    """

    max_body = MAX_MESSAGE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """A request with an empty, bounded body."""
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._body = io.BytesIO()
        self._body_length = 0

    def gotLength(self, length: int | None) -> None:
        """Start a small in-memory body, whatever length is announced."""
        self.content = self._body
        if length is not None:
            self._body_length = length

    def handleContentChunk(self, data: bytes) -> None:
        """Keep the body while it fits; count it either way."""
        if self._body_length > self.max_body or self._body.tell() + len(data) > self.max_body:
            self._body_length = self.max_body + 1
        else:
            self._body.write(data)

    def process(self) -> None:
        """Answer 413 for an oversized body, else dispatch as usual."""
        if self._body_length > self.max_body:
            self.setResponseCode(_TOO_LARGE)
            body = f"request body over {self.max_body} bytes\n".encode()
            self.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
            self.setHeader(b"content-length", b"%d" % len(body))  # type: ignore[no-untyped-call]
            self.write(body)  # type: ignore[no-untyped-call]
            self.finish()  # type: ignore[no-untyped-call]
            return
        super().process()  # type: ignore[no-untyped-call]


class DoHResource(Resource):
    """``/dns-query``: RFC 8484 GET and POST, answered from a :class:`Zone`."""

    isLeaf = True

    def __init__(self, zone: Callable[[], Zone], max_message: int = MAX_MESSAGE) -> None:
        """Answer from ``zone()``, read at each request (so it may follow key changes)."""
        super().__init__()  # type: ignore[no-untyped-call]
        self._zone = zone
        self._max = max_message

    def render(self, request: Request) -> bytes:
        """GET and POST (and HEAD, as GET); a one-line 405 for any other method."""
        if request.method not in (b"GET", b"HEAD", b"POST"):
            request.setHeader(b"allow", b"GET, POST")
            return _refuse(request, _NOT_ALLOWED, "only GET and POST are served (RFC 8484 §4.1)")
        body: bytes = super().render(request)  # type: ignore[no-untyped-call]
        return body

    def render_GET(self, request: Request) -> bytes:
        """``?dns=`` holds the query in base64url without padding (RFC 8484 §4.1, §6)."""
        values = (request.args or {}).get(b"dns", [])
        if len(values) != 1:
            return _refuse(request, _BAD_REQUEST, "expected exactly one dns= parameter")
        text = values[0]
        if len(text) > (self._max * 4 + 2) // 3 + 3:
            return _refuse(request, _TOO_LARGE, f"query over {self._max} bytes")
        try:
            wire = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            return _refuse(request, _BAD_REQUEST, "dns= is not base64url")
        return self._respond(request, wire)

    def render_POST(self, request: Request) -> bytes:
        """The body is the query, typed ``application/dns-message`` (RFC 8484 §4.1)."""
        kind = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if kind != DNS_MESSAGE:
            return _refuse(
                request, _UNSUPPORTED_MEDIA, "content-type must be application/dns-message"
            )
        assert request.content is not None
        wire = request.content.read(self._max + 1)
        return self._respond(request, wire)

    def _respond(self, request: Request, wire: bytes) -> bytes:
        if len(wire) > self._max:
            return _refuse(request, _TOO_LARGE, f"query over {self._max} bytes")
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError) as error:
            return _refuse(request, _BAD_REQUEST, f"not a DNS message ({error})")
        if query.flags & dns.flags.QR:
            return _refuse(request, _BAD_REQUEST, "a DNS response, not a query")
        response = self._zone().answer(query)
        request.setHeader(b"content-type", DNS_MESSAGE)
        # RFC 8484 §5.1: freshness no longer than the smallest TTL inside.
        ttls = [rrset.ttl for rrset in (*response.answer, *response.authority)]
        request.setHeader(b"cache-control", f"max-age={min(ttls, default=0)}".encode())
        return response.to_wire()


def _refuse(request: Request, code: int, reason: str) -> bytes:
    """An HTTP error with a one-line plain-text reason."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return f"{reason}\n".encode()
