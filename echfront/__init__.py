"""echfront: a client-facing TLS front for Encrypted Client Hello (RFC 9849).

The package is laid out in wings, lowest first; arrows run down only (a test
fails on any import cycle or upward import):

* ``tls/``, ``ech/``, ``quic/``: sans-IO TLS 1.3 framing and hellos, ECH and
  HPKE, QUIC Initial handling.  Bytes in, bytes out; no Twisted.
* ``errors``, ``interfaces``, ``targets``, ``routing``: the alert family, the
  extension API (``IRouter``, ``IPublisher``, ``ServiceContext``), what a
  router returns, and the static router.
* ``front/``: one client connection on Twisted: first flight, decision,
  relay or local TLS.
* ``keys/`` and ``dns/``: key files, the key directory and rotation; HTTPS
  records, publication and verification.
* ``config/``: the TOML schema and the building of running objects from it.
* ``app/``: the service tree, workers, the demo.  ``tap`` (``twistd
  echfront``), ``logs`` (``twistd --logger``) and ``web`` (the default public
  service) keep their documented dotted names.
* ``cli/``: the ``echfront`` command.

The names a router or local service needs are importable from here
(``from echfront import IRouter, Backend, ClientHelloInfo``); they are loaded
on first use, so ``import echfront.tls`` stays free of Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from echfront._version import __version__

if TYPE_CHECKING:
    from echfront.ech.decoder import ClientHelloInfo, ECHStatus
    from echfront.ech.echconfig import ECHConfig
    from echfront.ech.keyset import ECHKey, KeySet
    from echfront.errors import AlertDescription, AlertError, ConfigError
    from echfront.front.local import hello_info_for
    from echfront.interfaces import IPublisher, IRouter, ServiceContext
    from echfront.routing import Rule, StaticRouter
    from echfront.targets import Backend, Local, Reject, Route

#: Public name -> the module that defines it.
_PUBLIC = {
    "AlertDescription": "echfront.errors",
    "AlertError": "echfront.errors",
    "Backend": "echfront.targets",
    "ClientHelloInfo": "echfront.ech.decoder",
    "ConfigError": "echfront.errors",
    "ECHConfig": "echfront.ech.echconfig",
    "ECHKey": "echfront.ech.keyset",
    "ECHStatus": "echfront.ech.decoder",
    "IPublisher": "echfront.interfaces",
    "IRouter": "echfront.interfaces",
    "KeySet": "echfront.ech.keyset",
    "Local": "echfront.targets",
    "Reject": "echfront.targets",
    "Route": "echfront.targets",
    "Rule": "echfront.routing",
    "ServiceContext": "echfront.interfaces",
    "StaticRouter": "echfront.routing",
    "hello_info_for": "echfront.front.local",
}

__all__ = [
    "AlertDescription",
    "AlertError",
    "Backend",
    "ClientHelloInfo",
    "ConfigError",
    "ECHConfig",
    "ECHKey",
    "ECHStatus",
    "IPublisher",
    "IRouter",
    "KeySet",
    "Local",
    "Reject",
    "Route",
    "Rule",
    "ServiceContext",
    "StaticRouter",
    "__version__",
    "hello_info_for",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its defining module on first use (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'echfront' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API, for ``dir(echfront)`` and completion."""
    return sorted(set(globals()) | set(_PUBLIC))
