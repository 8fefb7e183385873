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
from echfront.ech.decoder import ECHStatus
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
        config_list = self._keys().retry_config_list
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
        """Render the page (HTML, no scripts, no external resources)."""
        info = hello_info_for(request.channel.transport)
        rows = [("front", f"echfront {__version__} for {self._public_name}")]
        if info is not None:
            rows.append(("ECH", _STATUS_TEXT[info.status]))
            rows.append(("server name", info.server_name or "(none)"))
        keys = self._keys()
        for key in keys.keys:
            role = "published" if key.published else "decrypt-only"
            rows.append(
                (
                    f"config_id {key.config_id}",
                    f"{key.config.public_name}, {key.config.kem_name}, {role}",
                )
            )
        body = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return (
            "<!doctype html><meta charset=utf-8><title>echfront</title>"
            f"<h1>echfront</h1><table>{body}</table>"
            '<p><a href="/.well-known/origin-svcb">/.well-known/origin-svcb</a></p>\n'
        ).encode()


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
