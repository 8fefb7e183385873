"""DNS publication and verification (echfront.dns) against a real Knot DNS.

Every test with a server starts its own ``knotd`` on 127.0.0.1 (see
tests/knotd.py) and is skipped, with the reason, when knotd is missing.
The trial test cases run on the real reactor and return Deferreds; the
publishers run dnspython in the reactor's thread pool.  The DoH tests use
a small DoH responder (twisted.web, plain HTTP on 127.0.0.1) that forwards
to knotd; production configurations use https:// (the parser only allows
http:// to loopback addresses).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.rdtypes.svcbbase
import dns.rrset
import dns.update
import pytest
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from echfront.config.build import build_publisher
from echfront.config.schema import parse_publish
from echfront.dns.command import CommandPublisher
from echfront.dns.doh import DoHClient
from echfront.dns.rfc2136 import RFC2136Publisher, parse_tsig_secret_file
from echfront.dns.verify import DNSServer, PublishError, Verifier, check_config_list
from tests.knotd import KNOTD_MISSING, KnotServer, default_records, sample_config_list

reactor: Any = _reactor

OLD = sample_config_list(1)  # what the zone file starts with
NEW = sample_config_list(2)
OTHER = sample_config_list(3)
SECRET = "secret.example."
ECH = dns.rdtypes.svcbbase.ParamKey.ECH


def ech_of(rdata: Any) -> bytes | None:
    """The ech value of an HTTPS rdata, or None."""
    param = rdata.params.get(ECH)
    return None if param is None else bytes(param.ech)


def service_view(rrset: dns.rrset.RRset) -> list[tuple[int, str, str]]:
    """Each record's priority, target and SvcParams other than ech, sorted."""
    view = []
    for rdata in rrset:
        params = {k: v for k, v in rdata.params.items() if k != ECH}
        rest = rdata.replace(params=params).to_text()
        view.append((rdata.priority, rdata.target.to_text(), rest))
    return sorted(view)


def as_rfc2136(publisher: object) -> RFC2136Publisher:
    """``publisher``, checked to be an RFC2136Publisher."""
    # Taking an object, not an IPublisher: mypy-zope would call the
    # isinstance narrowing from an interface to its implementer unreachable.
    assert isinstance(publisher, RFC2136Publisher)
    return publisher


def as_command(publisher: object) -> CommandPublisher:
    """``publisher``, checked to be a CommandPublisher."""
    assert isinstance(publisher, CommandPublisher)
    return publisher


# -- without a server ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1", "127.0.0.1", 53),
        ("127.0.0.1:5353", "127.0.0.1", 5353),
        ("::1", "::1", 53),
        ("[::1]:5353", "::1", 5353),
        ("[2001:db8::1]", "2001:db8::1", 53),
    ],
)
def test_server_address(text: str, host: str, port: int) -> None:
    server = DNSServer.parse(text)
    assert (server.host, server.port) == (host, port)
    assert DNSServer.parse(str(server)) == server


@pytest.mark.parametrize("text", ["ns.example:53", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x"])
def test_server_address_errors(text: str) -> None:
    with pytest.raises(ValueError, match=r"not|port"):
        DNSServer.parse(text)


SECRET_B64 = base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{SECRET_B64}\n", (None, None)),
        (f"update.example.:{SECRET_B64}", ("update.example.", None)),
        (f"hmac-sha384:update.example.:{SECRET_B64}\n", ("update.example.", "hmac-sha384")),
        (
            # keymgr -t update.example. hmac-sha512
            f"# hmac-sha512:update.example.:{SECRET_B64}\nkey:\n  - id: update.example.\n"
            f"    algorithm: hmac-sha512\n    secret: {SECRET_B64}\n",
            ("update.example.", "hmac-sha512"),
        ),
        (
            # tsig-keygen -a hmac-sha256 update.example.
            f'key "update.example." {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET_B64}";\n}};\n',
            ("update.example.", "hmac-sha256"),
        ),
    ],
)
def test_tsig_secret_file_formats(text: str, expected: tuple[str | None, str | None]) -> None:
    ((name, algorithm, secret),) = parse_tsig_secret_file(text)
    assert (name, algorithm) == expected
    assert secret == b"k" * 32


def test_tsig_secret_file_several_keys_and_errors() -> None:
    two = (
        f'key "a." {{ algorithm hmac-sha256; secret "{SECRET_B64}"; }};\n'
        f'key "b." {{ algorithm hmac-sha512; secret "{SECRET_B64}"; }};\n'
    )
    assert [k[:2] for k in parse_tsig_secret_file(two)] == [
        ("a.", "hmac-sha256"),
        ("b.", "hmac-sha512"),
    ]
    with pytest.raises(ValueError, match="not base64"):
        parse_tsig_secret_file("not*base64")
    with pytest.raises(ValueError, match="expected one"):
        parse_tsig_secret_file("two words")
    with pytest.raises(ValueError, match="no secret"):
        parse_tsig_secret_file('key "a." { algorithm hmac-sha256; };')


def test_config_list_framing() -> None:
    check_config_list(NEW)
    with pytest.raises(PublishError, match="length prefix"):
        check_config_list(NEW[:-1])
    with pytest.raises(PublishError, match="empty"):
        check_config_list(b"\x00\x00")
    bad = bytearray(NEW)
    bad[5] += 1  # the ECHConfig's own length now runs past the end
    with pytest.raises(PublishError, match="past the end"):
        check_config_list(bytes(bad))
    two = NEW[2:] + OTHER[2:]
    check_config_list(len(two).to_bytes(2, "big") + two)


# -- the DoH client, against canned answers -----------------------------------


class CannedDoH(http.server.BaseHTTPRequestHandler):
    """Answers a DoH POST as its path says: well, or in one of the ways it must not."""

    def do_POST(self) -> None:
        query = dns.message.from_wire(self.rfile.read(int(self.headers["Content-Length"])))
        answer = dns.message.make_response(query)
        body, kind = answer.to_wire(), "application/dns-message"
        if self.path == "/redirect":
            # urllib would repeat a POST redirected by 302 as a GET without the question.
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/html":
            kind = "text/html; charset=utf-8"
        elif self.path == "/huge":
            body = bytes(70000)
        elif self.path == "/other":
            answer.id = 1
            body = answer.to_wire()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client stops reading a huge body
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_doh_client_takes_only_a_usable_answer() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CannedDoH)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    name = dns.name.from_text(SECRET)
    try:
        client = DoHClient(base + "/ok{?dns}", timeout=2)
        assert client.url == base + "/ok"  # RFC 8484 §4.1: the template's GET variable
        assert client.query(name, dns.rdatatype.HTTPS).question[0].name == name
        unusable = {
            "/redirect": "HTTP status 302",
            "/html": "the answer is text/html, not application/dns-message",
            "/huge": "the answer is longer than 65535 octets",
            "/other": "the answer does not match the question",
        }
        for path, problem in unusable.items():
            with pytest.raises(ValueError) as caught:
                DoHClient(base + path, timeout=2).query(name, dns.rdatatype.HTTPS)
            assert str(caught.value) == problem
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_doh_client_on_a_port_that_is_not_http_or_closed() -> None:
    name = dns.name.from_text(SECRET)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def banner() -> None:
            listener.settimeout(5)
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        thread = threading.Thread(target=banner)
        thread.start()
        with pytest.raises(ValueError, match=r"^the answer is not HTTP \("):
            DoHClient(f"http://127.0.0.1:{port}/", timeout=2).query(name, dns.rdatatype.HTTPS)
        thread.join(5)
    with pytest.raises(ConnectionRefusedError):  # closed now: nothing listens
        DoHClient(f"http://127.0.0.1:{port}/", timeout=2).query(name, dns.rdatatype.HTTPS)


# -- against knotd ------------------------------------------------------------


class DoHResource(Resource):
    """A DoH endpoint (RFC 8484 POST) that forwards to knotd.

    ``frozen`` maps a question name to an answer served instead of asking
    knotd (a resolver cache that has not expired yet); ``status`` makes it
    fail with an HTTP status.
    """

    isLeaf = True

    def __init__(self, knot: KnotServer) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.knot = knot
        self.frozen: dict[str, dns.message.Message] = {}
        self.status = 200
        self.requests = 0

    def render_POST(self, request: Request) -> bytes | int:
        self.requests += 1
        assert request.content is not None
        assert request.getHeader(b"content-type") == b"application/dns-message"
        query = dns.message.from_wire(request.content.read())
        assert query.id == 0  # RFC 8484 §4.1
        request.setHeader(b"content-type", b"application/dns-message")
        if self.status != 200:
            request.setResponseCode(self.status)
            return b"oops"
        name = query.question[0].name.to_text()
        if name in self.frozen:
            stale = self.frozen[name]
            stale.id = query.id
            return stale.to_wire()

        def ask() -> bytes:
            answer = dns.query.tcp(query, self.knot.host, timeout=2, port=self.knot.port)
            return answer.to_wire()

        def reply(wire: bytes) -> None:
            request.write(wire)
            request.finish()

        deferToThread(ask).addCallback(reply)
        return NOT_DONE_YET


class KnotTestCase(TestCase):
    """Each test gets its own knotd."""

    if KNOTD_MISSING is not None:
        skip = KNOTD_MISSING

    zones: ClassVar[dict[str, list[str]] | None] = None

    def setUp(self) -> None:
        self.knot = KnotServer(zones=self.zones)
        self.addCleanup(self.knot.close)

    def publisher(self, names: tuple[str, ...] = (SECRET,), **table: Any) -> RFC2136Publisher:
        """An RFC 2136 publisher for this knotd, built from a [publish] table."""
        publish = parse_publish(
            {**self.knot.publish_table(**table), "names": list(names)}, base=self.knot.directory
        )
        publisher = build_publisher(publish, reactor=reactor)
        return as_rfc2136(publisher)

    def serial(self) -> int:
        answer = self.knot.query("example.", "SOA")
        return int(answer.answer[0][0].serial)

    async def publish_error(self, d: Deferred[Any]) -> str:
        """The message of the PublishError ``d`` fails with."""
        try:
            await d
        except PublishError as error:
            message = str(error)
            assert "\n" not in message
            return message
        raise AssertionError("no PublishError")


class RFC2136Tests(KnotTestCase):
    """Publication by dynamic update, and verification, against knotd."""

    zones: ClassVar[dict[str, list[str]] | None] = {
        "example.": [
            *default_records(),
            # Two ServiceMode records, one without ech, a mandatory list.
            'multi.example. 120 IN HTTPS 1 . alpn=h2 ech="' + base64.b64encode(OLD).decode() + '"',
            "multi.example. 120 IN HTTPS 2 pool.example. port=443 mandatory=port alpn=h3",
            "alias.example. 300 IN HTTPS 0 pool.example.",
            "cname.example. 300 IN CNAME secret.example.",
        ],
        "other.test.": [
            "@ 300 IN HTTPS 1 . alpn=h2 ipv4hint=127.0.0.1",
        ],
    }

    def test_publish_replaces_ech_and_keeps_the_rest(self) -> Deferred[None]:
        before = self.knot.https_rrset(SECRET)
        assert before is not None
        publisher = self.publisher()

        async def run() -> None:
            assert not await publisher.verify(NEW)
            assert [str(f) for f in publisher.verifier.last_findings] == [
                f"{self.knot.server}: secret.example: record 1 . ech is "
                f"{hashlib.sha256(OLD).hexdigest()[:12]}, "
                f"not {hashlib.sha256(NEW).hexdigest()[:12]}"
            ]
            assert await publisher.verify(OLD)
            await publisher.publish(NEW)
            assert await publisher.verify(NEW)
            assert not await publisher.verify(OTHER)
            assert not await publisher.verify(OLD)

        def check(_: None) -> None:
            after = self.knot.https_rrset(SECRET)
            assert after is not None
            assert after.ttl == before.ttl == 600
            assert service_view(after) == service_view(before)
            assert [ech_of(rd) for rd in after] == [NEW]
            # The name's other records are untouched.
            assert self.knot.query(SECRET, "A").answer

        return ensureDeferred(run()).addCallback(check)

    def test_publish_every_record_of_several_names_and_zones(self) -> Deferred[None]:
        names = (SECRET, "multi.example.", "other.test.")
        # No zone: each name's zone is found by a SOA query to the primary.
        publisher = self.publisher(names=names, zone=None)
        multi_before = self.knot.https_rrset("multi.example.")
        other_before = self.knot.https_rrset("other.test.")
        assert multi_before is not None and other_before is not None

        async def run() -> None:
            await publisher.publish(NEW)
            assert await publisher.verify(NEW)

        def check(_: None) -> None:
            multi = self.knot.https_rrset("multi.example.")
            other = self.knot.https_rrset("other.test.")
            assert multi is not None and other is not None
            assert [ech_of(rd) for rd in multi] == [NEW, NEW]
            assert service_view(multi) == service_view(multi_before)
            assert multi.ttl == 120
            assert [ech_of(rd) for rd in other] == [NEW]
            assert service_view(other) == service_view(other_before)

        return ensureDeferred(run()).addCallback(check)

    def test_publish_creates_a_record_where_there_is_none(self) -> Deferred[None]:
        names = ("www.example.", "fresh.example.")  # an A record only; no name at all
        publisher = self.publisher(names=names, ttl=120)

        async def run() -> None:
            assert not await publisher.verify(NEW)
            problems = sorted(str(f) for f in publisher.verifier.last_findings)
            assert problems == [
                f"{self.knot.server}: fresh.example: no such name (NXDOMAIN)",
                f"{self.knot.server}: www.example: no HTTPS record",
            ]
            await publisher.publish(NEW)
            assert await publisher.verify(NEW)

        def check(_: None) -> None:
            for name in names:
                rrset = self.knot.https_rrset(name)
                assert rrset is not None
                assert rrset.ttl == 120
                assert [rd.to_text() for rd in rrset] == [
                    f'1 . ech="{base64.b64encode(NEW).decode()}"'
                ]
            assert self.knot.query("www.example.", "A").answer

        return ensureDeferred(run()).addCallback(check)

    def test_publishing_the_same_list_again_changes_nothing(self) -> Deferred[None]:
        publisher = self.publisher()

        async def run() -> None:
            await publisher.publish(NEW)
            serial = self.serial()
            await publisher.publish(NEW)
            assert self.serial() == serial  # no UPDATE was sent

        return ensureDeferred(run())

    def test_alias_and_cname_names_are_refused(self) -> Deferred[None]:
        async def run() -> None:
            alias = await self.publish_error(self.publisher(names=("alias.example.",)).publish(NEW))
            assert "alias.example: has an AliasMode HTTPS record (priority 0" in alias
            cname = await self.publish_error(self.publisher(names=("cname.example.",)).publish(NEW))
            assert "cname.example: is a CNAME" in cname
            verifier = Verifier(
                ["alias.example."], [DNSServer.parse(self.knot.server)], reactor=reactor
            )
            assert not await verifier.verify(OLD)
            assert "AliasMode" in str(verifier.last_findings[0])

        return ensureDeferred(run())

    def test_a_concurrent_edit_makes_the_update_fail_without_clobbering(self) -> Deferred[None]:
        knot = self.knot

        class Racing(RFC2136Publisher):
            """Someone edits the record between our read and our UPDATE."""

            def read(self, zone: Any, names: Any) -> Any:
                current = super().read(zone, names)
                knot.replace(
                    SECRET, 600, "HTTPS", f'1 . alpn=h3 ech="{base64.b64encode(OTHER).decode()}"'
                )
                return current

        base = self.publisher()
        racing = Racing([SECRET], base.server, base.key, reactor=reactor, zone="example.")

        async def run() -> None:
            message = await self.publish_error(racing.publish(NEW))
            assert "UPDATE of zone example: NXRRSET" in message
            # The concurrent edit stands; our list was not written.
            rrset = knot.https_rrset(SECRET)
            assert rrset is not None
            assert [rd.to_text() for rd in rrset] == [
                f'1 . alpn="h3" ech="{base64.b64encode(OTHER).decode()}"'
            ]
            # Publishing again reads the new state and succeeds.
            await base.publish(NEW)
            rrset = knot.https_rrset(SECRET)
            assert rrset is not None
            assert [(rd.to_text().split()[2], ech_of(rd)) for rd in rrset] == [('alpn="h3"', NEW)]

        return ensureDeferred(run())

    def test_a_concurrent_creation_makes_the_update_fail(self) -> Deferred[None]:
        knot = self.knot

        class Racing(RFC2136Publisher):
            def read(self, zone: Any, names: Any) -> Any:
                current = super().read(zone, names)
                knot.replace("www.example.", 60, "HTTPS", "1 . alpn=h3")
                return current

        base = self.publisher(names=("www.example.",))
        racing = Racing(["www.example."], base.server, base.key, reactor=reactor)

        async def run() -> None:
            message = await self.publish_error(racing.publish(NEW))
            assert "YXRRSET" in message
            rrset = knot.https_rrset("www.example.")
            assert rrset is not None and [rd.to_text() for rd in rrset] == ['1 . alpn="h3"']

        return ensureDeferred(run())

    def test_a_wrong_secret_is_refused(self) -> Deferred[None]:
        wrong = self.knot.directory / "wrong.key"
        wrong.write_text(base64.b64encode(b"w" * 32).decode())

        async def run() -> None:
            message = await self.publish_error(
                self.publisher(tsig_secret_file=str(wrong)).publish(NEW)
            )
            assert "NOTAUTH" in message and "BADSIG" in message, message
            assert self.knot.ech(SECRET) == [OLD]

        return ensureDeferred(run())

    def test_a_key_the_acl_denies_is_refused(self) -> Deferred[None]:
        # Knot answers an update its ACL denies with NOTAUTH and TSIG error
        # BADKEY (not REFUSED), even though it knows the key.
        denied = self.knot.directory / "readonly.key"
        denied.write_text(f"{self.knot.readonly_tsig_name}:{self.knot.readonly_tsig_secret}\n")

        async def run() -> None:
            publisher = self.publisher(tsig_secret_file=str(denied), tsig_key_name=None)
            message = await self.publish_error(publisher.publish(NEW))
            assert "NOTAUTH" in message and "BADKEY" in message, message
            assert self.knot.ech(SECRET) == [OLD]

        return ensureDeferred(run())

    def test_a_refused_update_fails_with_refused(self) -> Deferred[None]:
        # A frozen zone is one whose server refuses updates for now.
        self.knot.freeze()

        async def run() -> None:
            message = await self.publish_error(self.publisher().publish(NEW))
            assert message == f"{self.knot.server}: UPDATE of zone example: REFUSED"
            self.knot.thaw()
            assert self.knot.ech(SECRET) == [OLD]

        return ensureDeferred(run())

    def test_a_zone_the_server_does_not_serve(self) -> Deferred[None]:
        async def run() -> None:
            # Knot refuses queries for zones it does not serve, so the
            # publisher stops at its read (zone given) or SOA query (not).
            explicit = self.publisher(names=("www.elsewhere.",), zone="elsewhere.")
            message = await self.publish_error(explicit.publish(NEW))
            assert "www.elsewhere: HTTPS query answered REFUSED" in message, message
            derived = self.publisher(names=("www.elsewhere.",), zone=None)
            message = await self.publish_error(derived.publish(NEW))
            assert "www.elsewhere: SOA query answered REFUSED" in message, message
            # An UPDATE for it anyway is answered NOTAUTH without a TSIG.
            update = explicit.build_update(
                dns.name.from_text("elsewhere."), {dns.name.from_text("www.elsewhere."): None}, NEW
            )
            assert update is not None
            sent = deferToThread(explicit.send, dns.name.from_text("elsewhere."), update)
            message = await self.publish_error(sent)
            assert message == (
                f"{self.knot.server}: UPDATE of zone elsewhere: NOTAUTH (unsigned answer: the "
                "server may not be the primary of this zone)"
            )

        return ensureDeferred(run())

    def test_server_down_fails_quickly(self) -> Deferred[None]:
        publisher = self.publisher(timeout=1.0)
        self.knot.stop()

        async def run() -> None:
            started = time.monotonic()
            message = await self.publish_error(publisher.publish(NEW))
            assert message.startswith(f"{self.knot.server}: ConnectionRefusedError"), message
            message = await self.publish_error(publisher.verify(NEW))
            assert message == f"{self.knot.server}: secret.example: no answer in 1s"
            assert time.monotonic() - started < 5

        return ensureDeferred(run())

    def test_one_unreachable_verify_server_is_an_error(self) -> Deferred[None]:
        down = self.knot.server.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1

        async def run() -> None:
            publisher = self.publisher(verify_servers=[self.knot.server, down], timeout=0.5)
            await publisher.publish(NEW)
            findings = await publisher.verifier.check(NEW)
            assert [(f.source, f.error) for f in findings] == [("127.0.0.1:1", True)]
            message = await self.publish_error(publisher.verify(NEW))
            assert message.startswith("127.0.0.1:1: secret.example: ")

        return ensureDeferred(run())


class DoHTests(KnotTestCase):
    """Verification through a DNS-over-HTTPS resolver (RFC 8484)."""

    def setUp(self) -> None:
        super().setUp()
        self.resource = DoHResource(self.knot)
        port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}/dns-query"
        # Run first (cleanups are last in, first out): let the closed DoH
        # connections leave the reactor before trial looks for leftovers.
        self.addCleanup(deferLater, reactor, 0.05, lambda: None)

    def test_doh_sees_the_published_list(self) -> Deferred[None]:
        publisher = self.publisher(doh=self.url)

        async def run() -> None:
            assert not await publisher.verify(NEW)
            await publisher.publish(NEW)
            assert await publisher.verify(NEW)
            assert self.resource.requests == 2

        return ensureDeferred(run())

    def test_a_lagging_resolver_is_not_verified(self) -> Deferred[None]:
        publisher = self.publisher(doh=self.url)
        # The resolver keeps serving the old answer from its cache.
        self.resource.frozen[SECRET] = self.knot.query(SECRET)

        async def run() -> None:
            await publisher.publish(NEW)
            assert not await publisher.verify(NEW)
            (finding,) = publisher.verifier.last_findings
            assert finding.source == self.url and not finding.error
            del self.resource.frozen[SECRET]
            assert await publisher.verify(NEW)

        return ensureDeferred(run())

    def test_a_broken_resolver_is_an_error(self) -> Deferred[None]:
        self.resource.status = 500
        verifier = Verifier([SECRET], [], reactor=reactor, doh=self.url, timeout=2)

        async def run() -> None:
            message = await self.publish_error(verifier.verify(OLD))
            assert message == f"{self.url}: secret.example: ValueError: HTTP status 500"

        return ensureDeferred(run())

    def test_a_resolver_that_does_not_answer_times_out(self) -> Deferred[None]:
        class Silent(Resource):
            isLeaf = True

            def render_POST(self, request: Request) -> int:
                return NOT_DONE_YET  # never answers

        silent = Silent()  # type: ignore[no-untyped-call]
        port = reactor.listenTCP(0, Site(silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        verifier = Verifier([SECRET], [], reactor=reactor, doh=url, timeout=0.5)

        async def run() -> None:
            started = time.monotonic()
            message = await self.publish_error(verifier.verify(OLD))
            assert message == f"{url}: secret.example: no answer in 0.5s"
            assert time.monotonic() - started < 3

        return ensureDeferred(run())


HOOK = textwrap.dedent(
    """\
    # A publication hook: records what it was given, then replaces the
    # HTTPS records itself by a signed dynamic update.
    import json, os, sys
    import dns.query, dns.tsig, dns.update

    config_list, names, server, secret, record = sys.argv[1:6]
    with open(record, "w") as out:
        json.dump({"argv": sys.argv[1:], "env": {
            k: v for k, v in os.environ.items() if k.startswith("ECHFRONT_")}}, out)
    host, port = server.rsplit(":", 1)
    update = dns.update.UpdateMessage("example.")
    for name in names.split():
        update.replace(name, 600, "HTTPS", f'1 . alpn="h2,http/1.1" port=8443 ech="{config_list}"')
    update.use_tsig(dns.tsig.Key("echfront-update.", secret))
    answer = dns.query.tcp(update, host, port=int(port), timeout=2)
    sys.exit(0 if answer.rcode() == 0 else 5)
    """
)


class CommandTests(KnotTestCase):
    """The command hook publisher."""

    def hook(self, source: str) -> Path:
        path = self.knot.directory / "hook.py"
        path.write_text(source)
        return path

    def command_publisher(self, argv: list[str], timeout: float = 5) -> CommandPublisher:
        table = {
            "method": "command",
            "command": argv,
            "verify_servers": [self.knot.server],
            "timeout": timeout,
            "names": [SECRET],
        }
        publisher = build_publisher(parse_publish(table, base=self.knot.directory), reactor=reactor)
        return as_command(publisher)

    def test_a_hook_that_succeeds(self) -> Deferred[None]:
        record = self.knot.directory / "record.json"
        hook = self.hook(HOOK)
        argv = [
            sys.executable,
            str(hook),
            "{config_list}",
            "{names}",
            self.knot.server,
            self.knot.tsig_secret,
            str(record),
        ]
        publisher = self.command_publisher(argv)

        async def run() -> None:
            assert not await publisher.verify(NEW)
            await publisher.publish(NEW)
            assert await publisher.verify(NEW)
            seen = json.loads(record.read_text())
            encoded = base64.b64encode(NEW).decode()
            assert seen["argv"][:2] == [encoded, SECRET]
            assert seen["env"] == {"ECHFRONT_CONFIG_LIST": encoded, "ECHFRONT_NAMES": SECRET}

        return ensureDeferred(run())

    def test_a_hook_that_fails(self) -> Deferred[None]:
        hook = self.hook(
            "import sys\nprint('working', file=sys.stderr)\n"
            "print('zone is locked by another job\\n', file=sys.stderr)\nsys.exit(3)\n"
        )
        publisher = self.command_publisher([sys.executable, str(hook)])

        async def run() -> None:
            message = await self.publish_error(publisher.publish(NEW))
            assert message == (
                f"publish.command: {sys.executable} exited with status 3: "
                "zone is locked by another job"
            )

        return ensureDeferred(run())

    def test_a_hook_that_hangs_is_killed(self) -> Deferred[None]:
        pid_file = self.knot.directory / "hook.pid"
        hook = self.hook(
            "import os, sys, time\n"
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "time.sleep(60)\n"
        )
        publisher = self.command_publisher([sys.executable, str(hook)], timeout=0.5)

        async def run() -> None:
            started = time.monotonic()
            message = await self.publish_error(publisher.publish(NEW))
            assert message == f"publish.command: {sys.executable} did not finish in 0.5s (killed)"
            assert time.monotonic() - started < 4
            pid = int(pid_file.read_text())
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # gone (and reaped)

        return ensureDeferred(run())

    def test_a_hook_killed_by_a_signal_or_missing(self) -> Deferred[None]:
        hook = self.hook("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
        publisher = self.command_publisher([sys.executable, str(hook)])
        missing = CommandPublisher(
            ["/nonexistent/hook"],
            [SECRET],
            reactor=reactor,
            verifier=publisher.verifier,
        )

        async def run() -> None:
            message = await self.publish_error(publisher.publish(NEW))
            assert message == f"publish.command: {sys.executable} was killed by signal 9"
            message = await self.publish_error(missing.publish(NEW))
            assert message == "publish.command: /nonexistent/hook: program not found"
            message = await self.publish_error(publisher.publish(b"\x00\x05abc"))
            assert "length prefix" in message

        return ensureDeferred(run())
