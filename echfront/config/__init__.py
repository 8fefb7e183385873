"""The configuration: TOML to frozen dataclasses, then to running objects.

Owns: the schema and its validation, every table including ``[publish]``
(:mod:`~echfront.config.schema`), building a
:class:`~echfront.front.state.FrontState`, endpoints, local services, the
router and the publisher from it (:mod:`~echfront.config.build`), and
endpoint strings and the one ``host:port`` parser
(:mod:`~echfront.config.endpoints`).

May import: every lower wing (``tls``, ``ech``, ``front``, ``keys``, ``dns``)
and the top-level API modules.  Never :mod:`echfront.app` or :mod:`echfront.cli`.

``echfront.config`` was a module before the wings; its names still resolve
here, with a :class:`DeprecationWarning` naming their new home.
"""

from __future__ import annotations

from echfront._moved import moved_names

#: Names the old ``echfront.config`` module defined -> the module defining them now.
_MOVED = {
    "DEFAULT_LISTEN": "echfront.config.schema",
    "DEFAULT_PUBLIC_FACTORY": "echfront.config.schema",
    "BackendConfig": "echfront.config.schema",
    "Config": "echfront.config.schema",
    "KeyFileConfig": "echfront.config.schema",
    "LocalConfig": "echfront.config.schema",
    "RouteConfig": "echfront.config.schema",
    "load_config_file": "echfront.config.schema",
    "parse_config": "echfront.config.schema",
    "build_state": "echfront.config.build",
    "listen_endpoints": "echfront.config.build",
    "load_key_set": "echfront.config.build",
    "resolve_dotted": "echfront.config.build",
    "split_endpoint_description": "echfront.config.endpoints",
    "tcp_client_address": "echfront.config.endpoints",
    "ServiceContext": "echfront.interfaces",
}


__getattr__ = moved_names(__name__, _MOVED)
