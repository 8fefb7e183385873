"""An example custom router for echfront: one backend per tenant, by name.

Names ``<tenant>.apps.example`` go to the backend named ``tenant-<tenant>``
in the configuration, if there is one; everything else is decided by the
static ``[[routes]]`` table.  Like every router, it can only return targets
the configuration defined (the front refuses any other), so a client cannot
steer the front to an arbitrary address.

Use it with ``PYTHONPATH=examples twistd -n echfront --config front.toml``
and, in front.toml::

    [router]
    factory = "myrouter:make_router"
    options = { suffix = ".apps.example" }
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from zope.interface import implementer

from echfront import Backend, ClientHelloInfo, IRouter, Route, ServiceContext


@implementer(IRouter)
class TenantRouter:
    """Route ``<tenant><suffix>`` to backend ``tenant-<tenant>``; else the static table."""

    def __init__(self, suffix: str, backends: dict[str, Backend], fallback: IRouter) -> None:
        self.suffix = suffix
        self.backends = backends
        self.fallback = fallback

    def route(self, hello: ClientHelloInfo, peer: IAddress) -> Route | Deferred[Route]:
        name = hello.server_name or ""
        if name.endswith(self.suffix):
            tenant = name[: -len(self.suffix)]
            backend = self.backends.get(f"tenant-{tenant}")
            if backend is not None:
                return backend
        return self.fallback.route(hello, peer)


def make_router(context: ServiceContext) -> TenantRouter:
    """The router factory named in the configuration."""
    assert context.static is not None
    suffix = str(context.options.get("suffix", ".apps.example"))
    return TenantRouter(suffix, dict(context.backends), context.static)
