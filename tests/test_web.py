# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""The public-name site (echfront.web): status page, origin-svcb, no access log.

Resources are rendered with ``DummyRequest`` for every ECH outcome; the
whole site is then served over HTTP through ``iosim``, and once over real
(in-memory) TLS behind a :class:`~echfront.front.protocol.FrontFactory`, where the
status page must describe the connection it is served on.
"""

from __future__ import annotations

import base64
import html
import json

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from echfront import web
from echfront._version import __version__
from echfront.dns.svcb import origin_svcb_document
from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus
from echfront.ech.echconfig import decode_config_list
from echfront.ech.grease import is_decoy
from echfront.ech.keyset import KeySet, generate_key
from echfront.front.local import local_target
from echfront.front.protocol import FrontFactory
from echfront.front.state import FrontSettings, FrontState
from echfront.front.tlsoptions import load_certificate_options
from echfront.interfaces import ServiceContext
from tests.echhello import grease_extension, read_flight, seal_hello
from tests.test_local import CA, ISSUED, PUBLIC_NAME, ToLocal
from tests.twistedhelpers import CLIENT_ADDRESS, Network, plain_hello

KEY = generate_key(PUBLIC_NAME, config_id=0x42, maximum_name_length=32)
OLD_KEY = generate_key(PUBLIC_NAME, config_id=0x41).with_role(published=False)
NEW_KEY = generate_key(PUBLIC_NAME, config_id=0x43)


class Keys:
    """What a reload changes: the key set returned at each call."""

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys

    def __call__(self) -> KeySet:
        return self.keys


class Opaque:
    """A transport stand-in (weakly referenceable, as every Twisted transport is)."""


class FakeChannel:
    def __init__(self, transport: object) -> None:
        self.transport = transport


def get(
    resource: Resource, path: list[bytes], transport: object = None
) -> tuple[DummyRequest, bytes]:
    request = DummyRequest(path)
    request.channel = FakeChannel(transport or Opaque())  # type: ignore[attr-defined]
    body = resource.render(request)
    assert isinstance(body, bytes)
    return request, body


def header(request: DummyRequest, name: bytes) -> list[bytes] | None:
    values = request.responseHeaders.getRawHeaders(name)
    return None if values is None else list(values)


def decoded(records: bytes) -> ClientHelloInfo:
    return ECHDecoder(KeySet([KEY])).decode(read_flight(records))


def rows(body: bytes) -> list[tuple[str, str]]:
    """The status table as (header, value) pairs, unescaped."""
    text = body.decode()
    found = []
    for cell in text.split("<tr>")[1:]:
        key = cell.split("<th>", 1)[1].split("</th>", 1)[0]
        value = cell.split("<td>", 1)[1].split("</td>", 1)[0]
        found.append((html.unescape(key), html.unescape(value)))
    return found


# -- the status page --------------------------------------------------------------------------


@pytest.fixture
def hello_for(monkeypatch: pytest.MonkeyPatch) -> dict[object, ClientHelloInfo]:
    """Make ``hello_info_for`` answer from a dict (as local termination fills it)."""
    table: dict[object, ClientHelloInfo] = {}
    monkeypatch.setattr(web, "hello_info_for", table.get)
    return table


@pytest.mark.parametrize(
    ("records", "status_text", "name", "seen"),
    [
        (
            seal_hello(KEY.config).records,
            "accepted: this page was requested inside an encrypted ClientHello",
            "secret.example.org",
            [
                ("outer name (in the clear)", PUBLIC_NAME),
                ("inner name (encrypted)", "secret.example.org"),
                ("config_id used", "66"),
                ("KEM", "DHKEM(X25519) (0x0020)"),
            ],
        ),
        (
            seal_hello(KEY.config, ech_extension=grease_extension()).records,
            "offered but not decrypted (GREASE, or an outdated ECHConfig)",
            PUBLIC_NAME,
            [("outer name (in the clear)", PUBLIC_NAME), ("config_id used", "167")],
        ),
        (
            None,
            "not offered by your client",
            "plain.example",
            [],
        ),
    ],
)
def test_status_page_shows_the_connections_ech_outcome(
    hello_for: dict[object, ClientHelloInfo],
    records: bytes | None,
    status_text: str,
    name: str,
    seen: list[tuple[str, str]],
) -> None:
    transport = Opaque()
    hello_for[transport] = decoded(records if records is not None else plain_hello())
    resource = web.StatusResource(Keys(KeySet([KEY, OLD_KEY])), PUBLIC_NAME)
    request, body = get(resource, [b""], transport)
    assert rows(body) == [
        ("front", f"echfront {__version__} for {PUBLIC_NAME}"),
        ("ECH", status_text),
        ("server name", name),
        *seen,
        ("config_id 66", f"{PUBLIC_NAME}, DHKEM(X25519), published"),
        ("config_id 65", f"{PUBLIC_NAME}, DHKEM(X25519), decrypt-only"),
    ]
    assert header(request, b"content-type") == [b"text/html; charset=utf-8"]
    assert header(request, b"cache-control") == [b"no-store"]
    assert b"<script" not in body
    assert b'<a href="/.well-known/origin-svcb">' in body


def test_status_page_without_a_decoded_hello(hello_for: dict[object, ClientHelloInfo]) -> None:
    resource = web.StatusResource(Keys(KeySet([KEY])), PUBLIC_NAME)
    _request, body = get(resource, [b""])
    assert [key for key, _ in rows(body)] == ["front", "config_id 66"]


def test_status_page_without_a_server_name(hello_for: dict[object, ClientHelloInfo]) -> None:
    transport = Opaque()
    info = decoded(seal_hello(KEY.config, ech_extension=grease_extension()).records)
    hello_for[transport] = ClientHelloInfo(
        **{**{f: getattr(info, f) for f in info.__dataclass_fields__}, "server_name": None}
    )
    _request, body = get(web.StatusResource(Keys(KeySet()), PUBLIC_NAME), [b""], transport)
    assert ("server name", "(none)") in rows(body)


def test_status_page_follows_the_key_set(hello_for: dict[object, ClientHelloInfo]) -> None:
    keys = Keys(KeySet([KEY]))
    resource = web.StatusResource(keys, PUBLIC_NAME)
    keys.keys = KeySet([NEW_KEY])
    _request, body = get(resource, [b""])
    assert [key for key, _ in rows(body)] == ["front", "config_id 67"]


def test_status_page_reads_the_request_channel_transport() -> None:
    # The real lookup, keyed by the TLS protocol the site's channel writes to.
    resource = web.StatusResource(Keys(KeySet()), PUBLIC_NAME)
    _request, body = get(resource, [b""], Opaque())
    assert [key for key, _ in rows(body)] == ["front"]


# -- origin-svcb ------------------------------------------------------------------------------


def test_origin_svcb_serves_the_published_list() -> None:
    keys = KeySet([KEY, OLD_KEY, NEW_KEY])
    request, body = get(web.OriginSVCBResource(Keys(keys), ["h2", "http/1.1"]), [])
    assert header(request, b"content-type") == [b"application/json"]
    assert header(request, b"cache-control") == [b"max-age=300"]
    code: object = request.responseCode
    assert code in (None, 200)
    document = json.loads(body)
    (endpoint,) = document["endpoints"]
    assert endpoint["params"]["alpn"] == ["h2", "http/1.1"]
    config_list = base64.b64decode(endpoint["params"]["ech"])
    assert config_list == keys.publication_list  # a GREASE decoy first (tests/test_grease.py)
    decoy, *configs = decode_config_list(config_list).configs
    assert is_decoy(decoy)
    published = [c.config_id for c in configs]
    assert sorted(published) == [0x42, 0x43]  # the decrypt-only key is not published
    assert body == origin_svcb_document(config_list, alpn=["h2", "http/1.1"])


def test_origin_svcb_follows_a_reload() -> None:
    keys = Keys(KeySet([KEY]))
    resource = web.OriginSVCBResource(keys)
    _request, before = get(resource, [])
    keys.keys = KeySet([NEW_KEY, KEY.with_role(published=False)])
    _request, after = get(resource, [])
    ech = base64.b64decode(json.loads(after)["endpoints"][0]["params"]["ech"])
    real = [c.config_id for c in decode_config_list(ech).configs if not is_decoy(c)]
    assert real == [0x43]
    assert before != after
    assert "alpn" not in json.loads(after)["endpoints"][0]["params"]


@pytest.mark.parametrize("keys", [KeySet(), KeySet([OLD_KEY])])
def test_origin_svcb_404_when_nothing_is_published(keys: KeySet) -> None:
    request, body = get(web.OriginSVCBResource(Keys(keys)), [])
    code: object = request.responseCode
    assert code == 404
    assert body == b"no ECH configs are published\n"
    assert header(request, b"content-type") != [b"application/json"]


# -- the whole site over HTTP -------------------------------------------------------------------


class HTTPClient(Protocol):
    def __init__(self, path: bytes) -> None:
        self.path = path
        self.data = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            b"GET " + self.path + b" HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def fetch(site: Site, path: bytes) -> tuple[int, dict[str, str], bytes]:
    site.doStart()
    try:
        client, _server, pump = connectedServerAndClient(
            lambda: site.buildProtocol(None), lambda: HTTPClient(path), greet=True
        )
        pump.flush()
    finally:
        site.doStop()
    return parse_response(client.data)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(status.split()[1]), headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_text, _, data = data.partition(b"\r\n")
        size = int(size_text, 16)
        if not size:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def make_site(keys: Keys, alpn: tuple[str, ...] = ()) -> Site:
    site = web.status_site(keys, PUBLIC_NAME, alpn)
    site.reactor = Clock()  # keep the site's timers off the global reactor
    return site


def test_site_serves_status_and_origin_svcb() -> None:
    keys = Keys(KeySet([KEY]))
    status, headers, body = fetch(make_site(keys), b"/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert f"echfront {__version__} for {PUBLIC_NAME}".encode() in body

    status, headers, body = fetch(make_site(keys, ("http/1.1",)), b"/.well-known/origin-svcb")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["endpoints"][0]["params"]["alpn"] == ["http/1.1"]

    status, _headers, _body = fetch(make_site(keys), b"/nothing-here")
    assert status == 404
    status, _headers, body = fetch(make_site(Keys(KeySet())), b"/.well-known/origin-svcb")
    assert status == 404
    assert body == b"no ECH configs are published\n"


def test_public_service_uses_the_context() -> None:
    keys = Keys(KeySet([KEY]))
    context = ServiceContext(MemoryReactorClock(), {}, keys, "front.example", ("h2",))
    site = web.public_service(context)
    assert isinstance(site, web.QuietSite)
    assert site.displayTracebacks is False
    site.reactor = Clock()
    status, _headers, body = fetch(site, b"/")
    assert status == 200
    assert b"echfront " + __version__.encode() + b" for front.example" in body
    status, _headers, body = fetch(site, b"/.well-known/origin-svcb")
    assert json.loads(body)["endpoints"][0]["params"]["alpn"] == ["h2"]
    unnamed = web.public_service(ServiceContext(MemoryReactorClock(), {}, keys))
    unnamed.reactor = Clock()
    assert b" for this front" in fetch(unnamed, b"/")[2]


def access_log_lines(site: Site) -> list[str]:
    with capturedLogs() as events:
        status, _headers, _body = fetch(site, b"/?secret=1")
    assert status == 200
    return [formatEvent(e) for e in events if "GET /?secret=1" in formatEvent(e)]


def test_quiet_site_writes_no_access_log() -> None:
    site = make_site(Keys(KeySet([KEY])))
    assert isinstance(site, web.QuietSite)
    assert access_log_lines(site) == []
    # The same request through a plain Site is logged: the check can see a log.
    plain = Site(web.StatusResource(Keys(KeySet()), PUBLIC_NAME), reactor=Clock())
    assert len(access_log_lines(plain)) == 1


# -- over TLS behind the front ---------------------------------------------------------------


class TLSStatusTests(SynchronousTestCase):
    """The status page served on a connection the front terminated locally."""

    def test_status_page_describes_its_own_connection(self) -> None:
        clock = MemoryReactorClock()
        net = Network(clock)
        keys = Keys(KeySet([KEY]))
        site = web.status_site(keys, PUBLIC_NAME, ("http/1.1",))
        site.reactor = clock
        options = load_certificate_options(ISSUED.chain, ISSUED.key, alpn=["http/1.1"])
        target = local_target("public", options, site, clock)
        state = FrontState(
            ECHDecoder(KeySet([KEY])), ToLocal(target), frozenset({target}), FrontSettings()
        )
        factory = FrontFactory(state, clock)
        responses: list[HTTPClient] = []

        def client_app() -> HTTPClient:
            responses.append(HTTPClient(b"/"))
            return responses[-1]

        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS(
                PUBLIC_NAME,
                trustRoot=Certificate.loadPEM(CA.cert_path.read_bytes()),
                acceptableProtocols=[b"http/1.1"],
            ),
            True,
            Factory.forProtocol(client_app),
            clock=clock,
        )
        front = factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        pipe = net.connect(client_factory.buildProtocol(CLIENT_ADDRESS), front)
        # HTTPChannel turns Nagle off on its transport, which a TCP one has.
        pipe.server.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
        net.flush()
        (response,) = responses
        status, headers, body = parse_response(response.data)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(
            rows(body),
            [
                ("front", f"echfront {__version__} for {PUBLIC_NAME}"),
                ("ECH", "not offered by your client"),
                ("server name", PUBLIC_NAME),
                ("config_id 66", f"{PUBLIC_NAME}, DHKEM(X25519), published"),
            ],
        )
        assert front.record.hello is not None
        self.assertIs(front.record.hello.status, ECHStatus.NOT_OFFERED)
