# -*- test-case-name: tests.test_tap -*-
"""``twistd echfront``: command-line options and the service they build.

``twistd -n echfront --config front.toml`` runs from a configuration file;
the quick flags (``--listen``, ``--ech-key``, ``--public-cert``,
``--route``) cover simple setups without one and override or extend a
file; with neither, a self-contained demo runs on 127.0.0.1.  Every
configuration problem is reported as one line before the reactor starts.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.python import usage

from echfront.config import (
    DEFAULT_PUBLIC_FACTORY,
    BackendConfig,
    Config,
    KeyFileConfig,
    LocalConfig,
    RouteConfig,
    build_state,
    listen_endpoints,
    load_config_file,
)
from echfront.demo import default_state_dir, demo_config
from echfront.errors import ConfigError
from echfront.front import FrontFactory
from echfront.keys import KeySet
from echfront.routing import validate_pattern

__all__ = ["FrontService", "Options", "makeService"]


class Options(usage.Options):
    """Options of ``twistd echfront``."""

    synopsis = (
        "[--config FILE] [--listen ENDPOINT]... [--ech-key FILE]... [--route NAME=ENDPOINT]..."
    )
    longdesc = (
        "Encrypted Client Hello (RFC 9849) split-mode TLS front. Decrypts the ECH "
        "ClientHelloOuter, then relays the connection to the backend serving the inner "
        "server name (which terminates TLS and confirms ECH) or terminates TLS locally. "
        "With no --config and no flags, runs a self-contained demo on 127.0.0.1:8443. "
        "Configuration reference: docs/configuration.rst."
    )
    optParameters = [  # noqa: RUF012 (Twisted's usage.Options reads a class-level list)
        ["config", "c", None, "TOML configuration file."],
        [
            "public-cert",
            None,
            None,
            "PEM file with the certificate chain and private key of the public name; "
            "it is served locally by the built-in status page.",
        ],
        [
            "state-dir",
            None,
            None,
            "Directory for the demo's generated key and certificates "
            "(default: $XDG_STATE_HOME/echfront-demo or ~/.local/state/echfront-demo).",
        ],
    ]

    def __init__(self) -> None:
        """Start with empty repeatable options."""
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self["ech_keys"] = []
        self["routes"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on ENDPOINT, e.g. tcp:8443:interface=127.0.0.1 (repeatable)."""
        self["listen"].append(description)

    def opt_ech_key(self, path: str) -> None:
        """Load an RFC 9934 ECH key file, published as a retry config (repeatable)."""
        self["ech_keys"].append(path)

    def opt_route(self, spec: str) -> None:
        """Relay NAME (or *.domain) to a client endpoint: NAME=ENDPOINT (repeatable)."""
        name, sep, endpoint = spec.partition("=")
        if not sep or not name or not endpoint:
            raise usage.UsageError(f"--route {spec!r}: expected NAME=CLIENT_ENDPOINT")
        try:
            validate_pattern(name)
        except ConfigError as error:
            raise usage.UsageError(f"--route: {error}") from None
        self["routes"].append((name, endpoint))

    @property
    def has_flags(self) -> bool:
        """Whether any quick flag was given."""
        return bool(self["listen"] or self["ech_keys"] or self["routes"] or self["public-cert"])


def options_to_config(options: Options) -> tuple[Config, list[str]]:
    """Turn options into a Config, plus lines to print (the demo's instructions).

    :raises ConfigError: for an unusable file or flag.
    """
    if options["config"] is None and not options.has_flags:
        state_dir = Path(options["state-dir"]) if options["state-dir"] else default_state_dir()
        return demo_config(state_dir)
    config = load_config_file(Path(options["config"])) if options["config"] else Config()
    if options["listen"]:
        config = replace(config, listen=tuple(options["listen"]))
    if options["ech_keys"]:
        extra = tuple(KeyFileConfig(Path(p).resolve()) for p in options["ech_keys"])
        config = replace(config, keys=config.keys + extra)
    if options["public-cert"]:
        public = LocalConfig(
            "public",
            Path(options["public-cert"]).resolve(),
            None,
            DEFAULT_PUBLIC_FACTORY,
            ("http/1.1",),
        )
        config = replace(config, public=public)
    if options["routes"]:
        backends = dict(config.backends)
        routes = list(config.routes)
        for index, (name, endpoint) in enumerate(options["routes"]):
            backend = f"route{index + 1}"
            backends[backend] = BackendConfig(backend, endpoint)
            routes.append(RouteConfig(name, f"backend:{backend}"))
        config = replace(config, backends=backends, routes=tuple(routes))
    return config, []


class FrontService(MultiService):
    """The running front: its listeners and the factory they share.

    :ivar factory: the FrontFactory; ``factory.state`` is what new
        connections are served with.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        """Build the state and listeners; raise ConfigError if anything is wrong."""
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        self.factory = FrontFactory(build_state(config, reactor, self.current_keys), reactor)
        for endpoint in listen_endpoints(config, reactor):
            StreamServerEndpointService(endpoint, self.factory).setServiceParent(self)

    def current_keys(self) -> KeySet:
        """The key set new connections are decrypted with."""
        return self.factory.state.decoder.keys if hasattr(self, "factory") else KeySet()


def makeService(options: Options, reactor: Any = None) -> FrontService:
    """Build the service twistd runs (the reactor may be injected, for tests)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor  # noqa: PLC0415 (installed late)

        reactor = global_reactor
    try:
        config, lines = options_to_config(options)
        service = FrontService(config, reactor)
    except ConfigError as error:
        # One line, before the reactor starts, and a non-zero exit status.
        sys.stderr.write(f"echfront: error: {error}\n")
        raise SystemExit(1) from None
    for line in lines:
        print(line)
    return service
