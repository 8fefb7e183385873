# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""The DNS-over-HTTPS responder (echfront.dns.dohserver, RFC 8484).

The zone is driven with dnspython messages; the resource with Twisted's
``DummyRequest`` for every refusal; the bounded request through a real
``HTTPChannel`` on a ``StringTransport``; and the whole endpoint over real
loopback HTTPS by dnspython's own DoH client, with GET and with POST.
"""

from __future__ import annotations

import base64
import io
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any, cast

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rdtypes.svcbbase
import pytest
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from echfront.app.certs import TestCA
from echfront.dns.dohserver import (
    DNS_MESSAGE,
    MAX_MESSAGE,
    BoundedRequest,
    DoHResource,
    Zone,
    demo_zone,
    https_owner,
)
from echfront.ech.echconfig import encode_config_list
from echfront.ech.keyset import generate_key
from echfront.front.tlsoptions import load_certificate_options

CONFIG_LIST = encode_config_list([generate_key("public.localhost", config_id=7).config])
PORT = 8443
ZONE = demo_zone(
    ("localhost", "echfront.test"),
    ["public.localhost", "private.localhost", "private.localhost.echfront.test"],
    CONFIG_LIST,
    port=PORT,
    alpn=("h2", "http/1.1"),
)


def ask(name: str, rdtype: str, zone: Zone = ZONE, **kwargs: object) -> dns.message.Message:
    """The zone's answer to a query, as it arrives: from the wire."""
    query = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    return zone.answer(dns.message.from_wire(query.to_wire()))


def https_params(response: dns.message.Message) -> dict[str, object]:
    (rrset,) = response.answer
    (rdata,) = rrset
    return {
        "target": rdata.target.to_text(),
        "alpn": [a.decode() for a in rdata.params[dns.rdtypes.svcbbase.ParamKey.ALPN].ids],
        "port": rdata.params[dns.rdtypes.svcbbase.ParamKey.PORT].port,
        "ech": rdata.params[dns.rdtypes.svcbbase.ParamKey.ECH].ech,
    }


# -- the zone ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "target"),
    [
        ("private.localhost", "."),
        # RFC 9460 §9.1: https://name:8443/ is looked up at _8443._https.name.
        ("_8443._https.private.localhost", "private.localhost."),
        ("_8443._https.private.localhost.echfront.test", "private.localhost.echfront.test."),
    ],
)
def test_https_record_carries_alpn_port_and_ech(owner: str, target: str) -> None:
    response = ask(owner, "HTTPS")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert https_params(response) == {
        "target": target,
        "alpn": ["h2", "http/1.1"],
        "port": PORT,
        "ech": CONFIG_LIST,
    }


def test_https_owner_prefixes_only_other_ports() -> None:
    assert https_owner("a.example", 443) == "a.example"
    assert https_owner("a.example", 8443) == "_8443._https.a.example"


@pytest.mark.parametrize(
    ("rdtype", "address"), [("A", "127.0.0.1"), ("AAAA", "::1")], ids=["A", "AAAA"]
)
def test_addresses_are_loopback(rdtype: str, address: str) -> None:
    for name in ("public.localhost", "private.localhost.echfront.test"):
        response = ask(name, rdtype)
        assert [r.to_text() for r in response.answer[0]] == [address]
        assert response.answer[0].ttl == 60


def test_unknown_name_under_an_origin_is_nxdomain_with_the_soa() -> None:
    response = ask("other.localhost", "A")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    (soa,) = response.authority
    assert soa.name == dns.name.from_text("localhost")
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa[0].minimum == 60


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("private.localhost", "TXT"),  # the name exists, not this type
        ("_https.private.localhost", "A"),  # an empty non-terminal (RFC 8020)
        ("echfront.test", "A"),  # the apex itself
    ],
)
def test_nodata(name: str, rdtype: str) -> None:
    response = ask(name, rdtype)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert [r.rdtype for r in response.authority] == [dns.rdatatype.SOA]


def test_name_outside_every_origin_is_nxdomain_without_authority() -> None:
    response = ask("example.com", "A")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert not response.flags & dns.flags.AA
    assert response.authority == []


def test_soa_comes_from_the_closest_origin() -> None:
    response = ask("nothing.private.localhost.echfront.test", "A")
    assert response.authority[0].name == dns.name.from_text("echfront.test")


def test_other_opcodes_and_question_counts() -> None:
    update = dns.message.make_query("private.localhost", "A")
    update.set_opcode(dns.opcode.UPDATE)
    assert ZONE.answer(update).rcode() == dns.rcode.NOTIMP
    empty = dns.message.make_query("private.localhost", "A")
    empty.question = []
    assert ZONE.answer(empty).rcode() == dns.rcode.FORMERR


def test_response_is_padded_when_the_query_was() -> None:
    # RFC 8467 §4.1: responses to padded queries are padded to 468 octets.
    padded = ask("private.localhost", "A", use_edns=0, pad=128)
    assert len(padded.to_wire()) == 468
    options = dns.message.from_wire(padded.to_wire()).options
    assert [o.otype for o in options] == [dns.edns.OptionType.PADDING]
    assert len(ask("private.localhost", "A").to_wire()) < 100


def test_query_id_and_question_are_echoed() -> None:
    query = dns.message.make_query("private.localhost", "A")
    response = ZONE.answer(query)
    assert response.id == query.id
    assert response.question == query.question
    assert response.flags & dns.flags.QR


# -- the resource ------------------------------------------------------------------------------


def render(request: Any) -> bytes:
    body = DoHResource(lambda: ZONE).render(request)
    assert isinstance(body, bytes)
    return body


def get(dns_values: list[bytes]) -> tuple[Any, bytes]:
    request: Any = DummyRequest([b""])
    request.args = {b"dns": dns_values} if dns_values else {}
    return request, render(request)


def post(body: bytes, content_type: bytes = DNS_MESSAGE) -> tuple[Any, bytes]:
    request: Any = DummyRequest([b""])
    request.method = b"POST"
    request.requestHeaders.setRawHeaders(b"content-type", [content_type])
    request.content = io.BytesIO(body)
    return request, render(request)


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def header(request: DummyRequest, name: bytes) -> bytes | None:
    values = request.responseHeaders.getRawHeaders(name)
    return None if values is None else values[0]


def test_get_answers_with_a_dns_message_and_ttl_freshness() -> None:
    query = dns.message.make_query("_8443._https.private.localhost", "HTTPS")
    query.id = 0  # RFC 8484 §4.1: GET queries should use id 0, for caches
    request, body = get([b64url(query.to_wire())])
    assert request.responseCode in (None, 200)
    assert header(request, b"content-type") == DNS_MESSAGE
    # RFC 8484 §5.1: fresh no longer than the smallest TTL in the answer.
    assert header(request, b"cache-control") == b"max-age=60"
    assert https_params(dns.message.from_wire(body))["ech"] == CONFIG_LIST


def test_post_answers_the_body() -> None:
    query = dns.message.make_query("private.localhost", "AAAA")
    request, body = post(query.to_wire(), b"application/dns-message; charset=binary")
    assert header(request, b"content-type") == DNS_MESSAGE
    response = dns.message.from_wire(body)
    assert response.id == query.id
    assert [r.to_text() for r in response.answer[0]] == ["::1"]


def test_negative_answer_freshness_is_the_soa_ttl() -> None:
    request, _ = get([b64url(dns.message.make_query("gone.localhost", "A").to_wire())])
    assert header(request, b"cache-control") == b"max-age=60"
    request, _ = get([b64url(dns.message.make_query("example.com", "A").to_wire())])
    assert header(request, b"cache-control") == b"max-age=0"


@pytest.mark.parametrize(
    ("values", "code", "reason"),
    [
        ([], 400, b"expected exactly one dns= parameter\n"),
        ([b"AAAA", b"AAAA"], 400, b"expected exactly one dns= parameter\n"),
        ([b"not*base64"], 400, b"dns= is not base64url\n"),
        ([b64url(b"\x00\x01garbage")], 400, b"not a DNS message"),
        ([b"A" * (MAX_MESSAGE * 2)], 413, b"query over 4096 bytes\n"),
    ],
    ids=["missing", "twice", "alphabet", "garbage", "oversized"],
)
def test_bad_get_requests(values: list[bytes], code: int, reason: bytes) -> None:
    request, body = get(values)
    assert request.responseCode == code
    assert body.startswith(reason)
    assert body.count(b"\n") == 1
    assert header(request, b"content-type") == b"text/plain; charset=utf-8"


def test_bad_post_requests() -> None:
    query = dns.message.make_query("private.localhost", "A").to_wire()
    request, body = post(query, b"application/octet-stream")
    assert (request.responseCode, body) == (415, b"content-type must be application/dns-message\n")
    request, body = post(b"\x00" * (MAX_MESSAGE + 1))
    assert (request.responseCode, body) == (413, b"query over 4096 bytes\n")
    response = dns.message.make_response(dns.message.make_query("private.localhost", "A"))
    request, body = post(response.to_wire())
    assert (request.responseCode, body) == (400, b"a DNS response, not a query\n")


def test_the_zone_is_read_at_each_request() -> None:
    zones = [ZONE]
    resource = DoHResource(lambda: zones[0])
    other_list = encode_config_list([generate_key("public.localhost", config_id=8).config])
    other = demo_zone(("localhost",), ["private.localhost"], other_list, port=PORT)
    query = b64url(dns.message.make_query("private.localhost", "HTTPS").to_wire())
    bodies = []
    for zone in (ZONE, other):
        zones[0] = zone
        request: Any = DummyRequest([b""])
        request.args = {b"dns": [query]}
        bodies.append(dns.message.from_wire(resource.render(request)))
    assert [https_params(b)["ech"] for b in bodies] == [CONFIG_LIST, other_list]


# -- the bounded request, through a real HTTP channel -------------------------------------------


def http_exchange(raw: bytes) -> bytes:
    root = Resource()
    root.putChild(b"dns-query", DoHResource(lambda: ZONE))
    site = Site(root)
    site.requestFactory = BoundedRequest
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    value: bytes = transport.value()
    channel.connectionLost(None)
    return value


def test_bounded_request_post_within_the_limit() -> None:
    query = dns.message.make_query("private.localhost", "A").to_wire()
    raw = (
        b"POST /dns-query HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/dns-message\r\n"
        b"Content-Length: " + str(len(query)).encode() + b"\r\n\r\n" + query
    )
    head, _, body = http_exchange(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"\r\nContent-Type: application/dns-message" in head
    assert dns.message.from_wire(body).answer[0][0].to_text() == "127.0.0.1"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bounded_request_refuses_an_oversized_body_without_keeping_it(chunked: bool) -> None:
    body = b"\x00" * (MAX_MESSAGE * 64)
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n\r\n"
        payload = b"".join(
            b"%x\r\n" % len(part) + part + b"\r\n"
            for part in (body[i : i + 8192] for i in range(0, len(body), 8192))
        )
        payload += b"0\r\n\r\n"
    else:
        framing = b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        payload = body
    raw = (
        b"POST /dns-query HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/dns-message\r\n" + framing + payload
    )
    head, _, text = http_exchange(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert text == b"request body over 4096 bytes\n"


def test_bounded_request_keeps_at_most_the_limit() -> None:
    request = BoundedRequest(DummyChannel())
    request.gotLength(None)
    for _ in range(10):
        request.handleContentChunk(b"\x00" * 1000)
    assert request.content is not None
    assert len(request.content.getvalue()) == 4000


def test_other_methods_are_not_allowed() -> None:
    raw = b"PUT /dns-query HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    head, _, body = http_exchange(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405")
    assert b"\r\nAllow: GET, POST" in head
    assert body == b"only GET and POST are served (RFC 8484 \xc2\xa74.1)\n"


# -- over real loopback HTTPS, with dnspython's DoH client ---------------------------------------


class DnspythonClientTests(TestCase):
    """dnspython's ``dns.query.https`` against the endpoint, GET and POST (RFC 8484 §4.1)."""

    timeout = 60

    async def listen(self) -> None:
        """A DoH endpoint on an ephemeral loopback port, with a certificate for localhost."""
        pytest.importorskip("httpx2", reason="dnspython's DoH client needs dnspython[doh]")
        directory = Path(tempfile.mkdtemp(prefix="echfront-doh-"))
        self.addCleanup(shutil.rmtree, directory)
        ca = TestCA(directory)
        issued = ca.issue(["localhost"])
        self.verify = ssl.create_default_context(cafile=str(ca.cert_path))
        root = Resource()
        root.putChild(b"dns-query", DoHResource(lambda: ZONE))
        site = Site(root)
        site.requestFactory = BoundedRequest
        tls = load_certificate_options(issued.chain, issued.key, alpn=["http/1.1"])
        endpoint = SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1")
        port = await endpoint.listen(site)
        self.addCleanup(port.stopListening)
        self.port = cast(IPv4Address, port.getHost()).port

    def query(self, name: str, rdtype: str, *, post: bool) -> Deferred[dns.message.Message]:
        url = f"https://localhost:{self.port}/dns-query"
        message = dns.message.make_query(name, rdtype, use_edns=0, pad=128)
        return threads.deferToThread(
            dns.query.https,
            message,
            url,
            timeout=10,
            post=post,
            verify=self.verify,
            bootstrap_address="127.0.0.1",
            http_version=dns.query.HTTPVersion.HTTP_1,
        )

    def test_get_and_post(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.get_and_post())

    async def get_and_post(self) -> None:
        await self.listen()
        for post in (False, True):
            response = await self.query("_8443._https.private.localhost", "HTTPS", post=post)
            assert isinstance(response, dns.message.Message)
            assert https_params(response)["ech"] == CONFIG_LIST
            assert len(response.to_wire()) == 468  # padded, as the query was
            nothing = await self.query("example.org", "A", post=post)
            assert isinstance(nothing, dns.message.Message)
            assert nothing.rcode() == dns.rcode.NXDOMAIN
