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

import warnings
from typing import Any

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


def __getattr__(name: str) -> Any:
    """Keep ``echfront.config.Config`` and the old module's other names working, with a warning."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"echfront.config.{name} moved to {module}.{name}", DeprecationWarning, stacklevel=2
    )
    # Imported here, and by name, so the layering test sees these arrows.
    import echfront.config.build  # noqa: PLC0415
    import echfront.config.endpoints  # noqa: PLC0415
    import echfront.config.schema  # noqa: PLC0415
    import echfront.interfaces  # noqa: PLC0415

    homes = {
        "echfront.config.schema": echfront.config.schema,
        "echfront.config.build": echfront.config.build,
        "echfront.config.endpoints": echfront.config.endpoints,
        "echfront.interfaces": echfront.interfaces,
    }
    return getattr(homes[module], name)
