# -*- test-case-name: tests.test_tap -*-
"""``twistd echfront``: command-line options and the service they build.

``twistd -n echfront --config front.toml`` runs from a configuration file;
the quick flags (``--listen``, ``--ech-key``, ``--public-cert``,
``--route``) cover simple setups without one and override or extend a
file; with neither, a self-contained demo runs on 127.0.0.1.  Every
configuration problem is reported as one line before the reactor starts.

This module is twistd's plugin module (``twisted/plugins/echfront_plugin.py``
names it): :class:`Options` and :func:`makeService` only.  The running
service is :mod:`echfront.app.service`.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger, LogLevel
from twisted.python import usage

from echfront._moved import moved_names
from echfront.app import localtls
from echfront.app import service as app_service
from echfront.app.demo import default_state_dir, demo_config
from echfront.app.workers import worker_index
from echfront.config.endpoints import check_listen
from echfront.config.schema import (
    DEFAULT_PUBLIC_FACTORY,
    BackendConfig,
    Config,
    KeyFileConfig,
    LocalConfig,
    RouteConfig,
    load_config_file,
)
from echfront.errors import ConfigError
from echfront.routing import validate_pattern

__all__ = ["Options", "makeService", "options_to_config"]

_log = Logger()


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
            "metrics",
            None,
            None,
            "Serve Prometheus metrics on this server endpoint, e.g. "
            "tcp:9100:interface=127.0.0.1 (overrides [metrics] listen).",
        ],
        [
            "workers",
            None,
            0,
            "Run this many worker processes sharing the listening ports "
            "(overrides workers in the file; default 1).",
            int,
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
        try:
            check_listen(description, "--listen")
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None
        self["listen"].append(description)

    def opt_ech_key(self, path: str) -> None:
        """Load an RFC 9934 ECH key file; its configs are published (repeatable)."""
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
        config, lines = demo_config(state_dir)
    else:
        config, lines = _file_and_flags(options), []
    if options["metrics"]:
        config = replace(config, metrics_listen=options["metrics"])
    return config, lines


def _file_and_flags(options: Options) -> Config:
    """The configuration file (if any) with the quick flags applied over it."""
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
        for number, (name, endpoint) in enumerate(options["routes"], 1):
            # Named by position, never by the routed name: backend names are
            # logged and are metric labels, and server names never are.
            # ('#' needs a quoted key in TOML, so a file rarely has it.)
            backend = f"route#{number}"
            if backend in backends:
                raise ConfigError(f"--route: the file already has a backend named {backend!r}")
            backends[backend] = BackendConfig(backend, endpoint)
            routes.append(RouteConfig(name, f"backend:{backend}"))
        config = replace(config, backends=backends, routes=tuple(routes))
    return config


def _worker_argv(options: Options) -> list[str]:
    """The twistd command line a worker runs: this front's own options."""
    args = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
    ]
    # Keep the operator's log format (e.g. --logger=echfront.logs.json_observer).
    args += [a for a in sys.argv[1:] if a.startswith(("--logger=", "--logfile="))]
    args.append("echfront")
    if options["config"]:
        args += ["--config", str(Path(options["config"]).resolve())]
    for description in options["listen"]:
        args += ["--listen", description]
    for path in options["ech_keys"]:
        args += ["--ech-key", str(Path(path).resolve())]
    if options["public-cert"]:
        args += ["--public-cert", str(Path(options["public-cert"]).resolve())]
    for name, endpoint in options["routes"]:
        args += ["--route", f"{name}={endpoint}"]
    if options["state-dir"]:
        args += ["--state-dir", str(Path(options["state-dir"]).resolve())]
    return args


def freeze_startup_objects() -> None:
    """Put everything built so far beyond the garbage collector's reach (gc.freeze).

    Modules, configuration, keys and listeners live as long as the process;
    a full collection would trace all of them (some 78,000 objects, 37 ms on
    the benchmark machine: a pause every open connection feels) to find
    garbage among what connections left behind.  Run once the front is up.
    """
    gc.collect()
    gc.freeze()


def makeService(options: Options, reactor: Any = None) -> Service:
    """Build the service twistd runs (the reactor may be injected, for tests).

    In a real run (no reactor injected) a process that terminates TLS
    itself first makes sure its records are padded, which may start it
    again (:func:`echfront.app.localtls.record_padding`).
    """
    real = reactor is None
    if reactor is None:
        from twisted.internet import reactor as global_reactor  # noqa: PLC0415 (installed late)

        reactor = global_reactor
    worker = worker_index()

    def load() -> Config:
        return options_to_config(options)[0]

    try:
        config, lines = options_to_config(options)
        count = options["workers"] or config.workers
        supervising = count > 1 and worker is None
        block = localtls.padding_wanted(config) if real else 0
        if block and not supervising:
            outcome = localtls.record_padding(block)  # may exec this process
            level = LogLevel.warn if outcome.warning else LogLevel.info
            _log.emit(level, "{message}", message=outcome.message)
        service: Service
        if supervising:
            argv = _worker_argv(options)
            # Workers terminate the TLS; each starts with padding in place.
            argv = localtls.worker_argv(argv, block) if block else argv
            service = app_service.supervisor_service(load, argv, count, reactor)
        else:
            # One rotation schedule per deployment: here, never in workers.
            service = app_service.FrontService(load, reactor, worker=worker, rotate=worker is None)
    except ConfigError as error:
        # One line, before the reactor starts, and a non-zero exit status.
        sys.stderr.write(f"echfront: error: {error}\n")
        raise SystemExit(1) from None
    reactor.callWhenRunning(freeze_startup_objects)
    if worker is None:
        warning = localtls.retry_configs_warning(config)
        if warning is not None:
            _log.warn("{warning}", warning=warning)
        for line in lines:
            print(line)
    return service


#: ``echfront.tap.FrontService`` and ``metrics_service``, from before :mod:`echfront.app`.
__getattr__ = moved_names(
    __name__, dict.fromkeys(("FrontService", "metrics_service"), "echfront.app.service")
)
