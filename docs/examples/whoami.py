"""A local service that tells each client what the front saw of its connection.

Used in docs/routing.rst as the example of a local factory.  Enable it with
``PYTHONPATH=docs/examples`` and, in the configuration::

    [locals.whoami]
    cert = "who.pem"
    factory = "whoami:make_site"
    options = { greeting = "hello" }
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from echfront.front.local import hello_info_for
from echfront.interfaces import ServiceContext


class WhoAmI(Resource):
    """Answer every GET with the ECH outcome and the server name."""

    isLeaf = True

    def __init__(self, greeting: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.greeting = greeting

    def render_GET(self, request: Request) -> bytes:
        # The TLS protocol is the HTTP channel's transport; echfront keyed the
        # decoded ClientHello by it when it handed the connection over.
        info = hello_info_for(request.channel.transport)
        lines = [self.greeting]
        if info is not None:
            lines.append(f"ECH: {info.status.value}")
            lines.append(f"server name: {info.server_name}")
            offered = ", ".join(p.decode() for p in info.alpn) or "(none)"
            lines.append(f"ALPN offered: {offered}")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return ("\n".join(lines) + "\n").encode()


def make_site(context: ServiceContext) -> Site:
    """The local factory: called once at start-up with the service's context."""
    return Site(WhoAmI(str(context.options.get("greeting", "hello"))))
