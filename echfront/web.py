# -*- test-case-name: tests.test_web -*-
"""The default local service for the public name: a small HTTPS responder.

``/`` is a status page that tells the client what the front saw of its own
connection (ECH outcome, the name it asked for) and which configs are in
service; ``/.well-known/origin-svcb`` is the JSON document of
draft-ietf-tls-wkech with the ECHConfigList currently published, so a zone
factory can publish DNS records from it.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from echfront._version import __version__
from echfront.dns.svcb import origin_svcb_document
from echfront.ech.decoder import ClientHelloInfo, ECHStatus
from echfront.errors import AlertError
from echfront.front.local import hello_info_for

if TYPE_CHECKING:
    from echfront.ech.keyset import KeySet
    from echfront.interfaces import ServiceContext

__all__ = ["OriginSVCBResource", "QuietSite", "StatusResource", "public_service", "status_site"]

_STATUS_TEXT = {
    ECHStatus.ACCEPTED: "accepted: this page was requested inside an encrypted ClientHello",
    ECHStatus.REJECTED: "offered but not decrypted (GREASE, or an outdated ECHConfig)",
    ECHStatus.NOT_OFFERED: "not offered by your client",
}
#: The page's headline and its colour, per ECH outcome.
_HEADLINE = {
    ECHStatus.ACCEPTED: ("ECH accepted", "#0a6b2d"),
    ECHStatus.REJECTED: ("ECH not accepted", "#8a4b00"),
    ECHStatus.NOT_OFFERED: ("ECH not used", "#444"),
}
_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:60em}"
    "h1{margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .3em}"
    "th{text-align:left;padding:.15em 1.2em .15em 0;font-weight:600;white-space:nowrap;"
    "min-width:14em}"
    "td{font-family:monospace,monospace}"
)


class OriginSVCBResource(Resource):
    """``/.well-known/origin-svcb``: the published configs (draft-ietf-tls-wkech)."""

    isLeaf = True

    def __init__(self, keys: Callable[[], KeySet], alpn: Sequence[str] = ()) -> None:
        """Serve the published list of whatever key set ``keys()`` returns now."""
        super().__init__()  # type: ignore[no-untyped-call]
        self._keys = keys
        self._alpn = tuple(alpn)

    def render_GET(self, request: Request) -> bytes:
        """Return the JSON, or 404 when no config is published."""
        config_list = self._keys().publication_list  # with the GREASE decoy, as DNS
        if config_list is None:
            request.setResponseCode(404)
            return b"no ECH configs are published\n"
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"max-age=300")
        return origin_svcb_document(config_list, alpn=self._alpn)


class StatusResource(Resource):
    """``/``: a plain status page about the front and this connection."""

    isLeaf = True

    def __init__(self, keys: Callable[[], KeySet], public_name: str) -> None:
        """Describe the front serving ``public_name`` with the key set ``keys()``."""
        super().__init__()  # type: ignore[no-untyped-call]
        self._keys = keys
        self._public_name = public_name

    def render_GET(self, request: Request) -> bytes:
        """Render the page (HTML and a style sheet; no scripts, no external resources).

        The connection table says what the front saw (RFC 9849 §5, §7.1):
        the name sent in the clear in the ClientHelloOuter, and, when ECH
        was accepted, the name decrypted from the ClientHelloInner, the
        config_id the client chose and that config's KEM.
        """
        info = hello_info_for(request.channel.transport)
        connection = [("front", f"echfront {__version__} for {self._public_name}")]
        headline, colour = "echfront", "#000"
        if info is not None:
            headline, colour = _HEADLINE[info.status]
            connection += _connection_rows(info)
        keys = self._keys()
        configs = [
            (
                f"config_id {key.config_id}",
                f"{key.config.public_name}, {key.config.kem_name}, "
                + ("published" if key.published else "decrypt-only"),
            )
            for key in keys.keys
        ]
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return (
            "<!doctype html><meta charset=utf-8>"
            f"<title>echfront: {html.escape(headline)}</title><style>{_STYLE}</style>"
            f'<h1 style="color:{colour}">{html.escape(headline)}</h1>'
            "<h2>What the front saw of this connection</h2>"
            f"{_table(connection)}"
            + (f"<h2>ECH configs in service</h2>{_table(configs)}" if configs else "")
            + '<p><a href="/.well-known/origin-svcb">/.well-known/origin-svcb</a></p>\n'
        ).encode()


def _connection_rows(info: ClientHelloInfo) -> list[tuple[str, str]]:
    """The ECH outcome and names of one connection, as table rows."""
    rows = [("ECH", _STATUS_TEXT[info.status]), ("server name", info.server_name or "(none)")]
    if info.status is ECHStatus.NOT_OFFERED:
        return rows
    try:
        outer = info.outer.server_name() or "(none)"
    except AlertError:  # the decoder read it already; a malformed one never routes here
        outer = "(unreadable)"
    rows.append(("outer name (in the clear)", outer))
    if info.status is ECHStatus.ACCEPTED:
        rows.append(("inner name (encrypted)", info.server_name or "(none)"))
    if info.config_id is not None:
        rows.append(("config_id used", str(info.config_id)))
    if info.key is not None:
        config = info.key.config
        rows.append(("KEM", f"{config.kem_name} (0x{config.kem_id:04x})"))
    return rows


def _table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


class QuietSite(Site):
    """A Site without per-request access logs.

    The front logs one event per connection; per-request lines would add
    client addresses and paths to the logs for no operational gain.
    """

    noisy = False

    def log(self, request: http.Request) -> None:
        """Do not log requests."""


class _Directory(Resource):
    """A resource with fixed children and an escaped 404 for anything else."""

    def __init__(self) -> None:
        """No children yet (putChild adds them)."""
        super().__init__()  # type: ignore[no-untyped-call]

    def getChild(self, path: bytes, request: Request) -> Resource:
        """Unknown paths: a plain 404 (Twisted's default page is deprecated)."""
        return notFound()  # type: ignore[return-value]


def status_site(
    keys: Callable[[], KeySet], public_name: str, alpn: Sequence[str] = (), reactor: Any = None
) -> Site:
    """The default public-name site: status page and origin-svcb document."""
    root = _Directory()
    status = StatusResource(keys, public_name)
    root.putChild(b"", status)
    well_known = _Directory()
    well_known.putChild(b"origin-svcb", OriginSVCBResource(keys, alpn))
    root.putChild(b".well-known", well_known)
    site = QuietSite(root, reactor=reactor)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    return site


def public_service(context: ServiceContext) -> Site:
    """The factory named by default for ``[public]`` (``echfront.web:public_service``)."""
    return status_site(
        context.keys, context.public_name or "this front", context.alpn, context.reactor
    )
