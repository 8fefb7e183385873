# -*- test-case-name: tests.test_tap -*-
"""``twistd echfront``: command-line options and the service they build.

``twistd -n echfront --config front.toml`` runs from a configuration file;
the quick flags (``--listen``, ``--ech-key``, ``--public-cert``,
``--route``) cover simple setups without one and override or extend a
file; with neither, a self-contained demo runs on 127.0.0.1.  Every
configuration problem is reported as one line before the reactor starts.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from echfront.app.demo import default_state_dir, demo_config
from echfront.app.workers import Supervisor, shared_listeners, worker_index, worker_listen
from echfront.config.schema import (
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
from echfront.ech.keyset import KeySet
from echfront.errors import ConfigError
from echfront.front.metrics import Metrics, MetricsResource, key_publications_counter
from echfront.front.protocol import FrontFactory
from echfront.keys.keydir import KeyDirectory
from echfront.keys.rotation import Rotator
from echfront.routing import validate_pattern
from echfront.web import QuietSite

__all__ = ["FrontService", "Options", "makeService", "metrics_service"]


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
        for name, endpoint in options["routes"]:
            # A name no [backends.X] table can have (TOML bare keys have no ':').
            backend = f"route:{name}"
            backends[backend] = BackendConfig(backend, endpoint)
            routes.append(RouteConfig(name, f"backend:{backend}"))
        config = replace(config, backends=backends, routes=tuple(routes))
    return config


class FrontService(MultiService):
    """The running front: listeners, the factory they share, reload and shutdown.

    :ivar factory: the FrontFactory; ``factory.state`` is what new
        connections are served with.
    :ivar config: the configuration in service.
    """

    log = Logger()

    def __init__(
        self,
        load: Callable[[], Config],
        reactor: Any,
        *,
        worker: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """Build the state and listeners; raise ConfigError if anything is wrong.

        :param load: reads the configuration (again, on every reload).
        :param worker: this process's index under ``--workers``, if any.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self.load = load
        self.reactor = reactor
        self.worker = worker
        self.config = load()
        self.metrics = metrics if metrics is not None else Metrics()
        state = build_state(self.config, reactor, self.current_keys)
        self.factory = FrontFactory(state, reactor, self.metrics)
        self.metrics.set_keys(state.decoder.keys)
        self._ports: list[IListeningPort] = []
        self._watched: dict[Path, tuple[int, int, int] | None] = {}
        self._watcher: LoopingCall | None = None
        self._previous_hup: Any = None
        if worker is None:
            for endpoint in listen_endpoints(self.config, reactor):
                StreamServerEndpointService(endpoint, self.factory).setServiceParent(self)
            if self.config.metrics_listen:
                metrics_service(
                    self.config.metrics_listen, self.metrics.registry, reactor
                ).setServiceParent(self)

    def current_keys(self) -> KeySet:
        """The key set new connections are decrypted with."""
        return self.factory.state.decoder.keys if hasattr(self, "factory") else KeySet()

    # -- reload ------------------------------------------------------------

    def reload(self) -> bool:
        """Read the configuration again and serve new connections with it.

        Connections in progress keep the state they started with (a second
        ClientHello after a HelloRetryRequest still uses its first hello's
        HPKE context).  If the new configuration is invalid, the running one
        stays and one error line is logged.
        """
        try:
            config = self.load()
            state = build_state(config, self.reactor, self.current_keys)
        except ConfigError as error:
            self.metrics.reloads.labels("failure").inc()
            self.log.error(
                "reload failed, still serving the previous configuration: {error}",
                error=str(error),
            )
            return False
        if config.listen != self.config.listen or config.metrics_listen != (
            self.config.metrics_listen
        ):
            self.log.warn("listen and metrics endpoints change only on restart")
        self.config = config
        self.factory.state = state
        self.metrics.set_keys(state.decoder.keys)
        self.metrics.reloads.labels("success").inc()
        self._snapshot()
        self.log.info(
            "reloaded: {keys} ECH configs, {targets} targets",
            keys=len(state.decoder.keys),
            targets=len(state.targets),
        )
        return True

    def _on_sighup(self, signum: int, frame: object) -> None:
        # Signal handlers run between bytecodes; hand the work to the reactor.
        self.reactor.callFromThread(self.reload)

    def _stat(self, path: Path) -> tuple[int, int, int] | None:
        try:
            info = path.stat()
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _snapshot(self) -> None:
        self._watched = {path: self._stat(path) for path in self.config.watched_files()}

    def _check_files(self) -> None:
        """Reload when a watched file changed (``[reload] watch = true``)."""
        changed = any(self._stat(path) != seen for path, seen in self._watched.items())
        if changed and not self.reload():
            self._snapshot()  # report a broken file once, not at every poll

    # -- start and stop ------------------------------------------------------

    def startService(self) -> None:
        """Listen, and start watching for SIGHUP and file changes."""
        if self.worker is not None:
            for index, description in enumerate(self.config.listen):
                self._ports.append(worker_listen(self.reactor, index, description, self.factory))
        super().startService()  # type: ignore[no-untyped-call]
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        if self.config.watch:
            self._snapshot()
            self._watcher = LoopingCall(self._check_files)
            self._watcher.clock = self.reactor
            self._watcher.start(self.config.watch_interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Stop accepting, let open connections finish, then close the rest.

        Open connections get ``[limits] shutdown_grace`` seconds; whatever is
        still open then is aborted.
        """
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        if self._watcher is not None and self._watcher.running:
            self._watcher.stop()
        stopped = [d for d in (port.stopListening() for port in self._ports) if d is not None]
        self._ports = []
        done: Deferred[None] = Deferred()

        def drain(_: object) -> None:
            grace = self.factory.state.settings.shutdown_grace
            deadline = self.reactor.seconds() + grace
            if self.factory.connections:
                self.log.info(
                    "waiting up to {grace}s for {count} open connections",
                    grace=grace,
                    count=len(self.factory.connections),
                )

            def check() -> None:
                if not self.factory.connections:
                    done.callback(None)
                    return
                if self.reactor.seconds() >= deadline:
                    # Aborting closes on the next reactor turn; keep waiting
                    # (briefly) so each connection is still logged and counted.
                    for proto in list(self.factory.connections):
                        proto.abort("shutdown", limit="shutdown_grace")
                if self.reactor.seconds() >= deadline + 2.0:
                    done.callback(None)
                else:
                    self.reactor.callLater(0.1, check)

            check()

        listeners = DeferredList([*stopped, maybeDeferred(super().stopService)])
        listeners.addCallback(drain)
        return done


def metrics_service(description: str, registry: Any, reactor: Any) -> StreamServerEndpointService:
    """The ``--metrics`` listener: Prometheus text format on any path."""
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as error:
        raise ConfigError(f"metrics: {description!r}: {error}") from None
    site = QuietSite(MetricsResource(registry))  # type: ignore[no-untyped-call]
    return StreamServerEndpointService(endpoint, site)


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


def makeService(options: Options, reactor: Any = None) -> Service:
    """Build the service twistd runs (the reactor may be injected, for tests)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor  # noqa: PLC0415 (installed late)

        reactor = global_reactor
    worker = worker_index()
    try:
        config, lines = options_to_config(options)
        count = options["workers"] or config.workers
        service: MultiService
        publications: Counter | None
        if count > 1 and worker is None:
            service, reload, publications = _supervisor(options, config, count, reactor)
        else:
            front = FrontService(lambda: options_to_config(options)[0], reactor, worker=worker)
            service, reload = front, front.reload
            publications = front.metrics.key_publications
        if worker is None and config.rotation is not None:
            # One rotation schedule per deployment: here, never in workers.
            _rotator(config, reactor, reload, publications).setServiceParent(service)  # type: ignore[no-untyped-call]
    except ConfigError as error:
        # One line, before the reactor starts, and a non-zero exit status.
        sys.stderr.write(f"echfront: error: {error}\n")
        raise SystemExit(1) from None
    if worker is None:
        for line in lines:
            print(line)
    return service


def _rotator(
    config: Config, reactor: Any, reload: Callable[[], object], counter: Counter | None
) -> Rotator:
    """The key rotation service for ``[keys]``/``[publish]`` (echfront.keys.rotation)."""
    from echfront.dns.publish import publisher_from_config  # noqa: PLC0415 (needs dnspython)

    assert config.rotation is not None and config.key_directory is not None
    publisher = publisher_from_config(
        config.publish,
        base=config.source.parent if config.source is not None else Path.cwd(),
        names=config.publish_names,
        reactor=reactor,
    )

    def publications(result: str) -> None:
        if counter is not None:
            counter.labels(result).inc()

    return Rotator(
        KeyDirectory(config.key_directory),
        config.rotation,
        publisher,
        reactor,
        on_change=reload,
        publications=publications,
    )


def _supervisor(
    options: Options, config: Config, count: int, reactor: Any
) -> tuple[MultiService, Callable[[], object], Counter | None]:
    """The ``--workers`` supervisor: checks the configuration, then runs workers.

    Also returns the key publication counter the supervisor serves beside
    the workers' sum (rotation runs here), or None without ``--metrics``.
    """
    build_state(config, reactor, KeySet)  # fail here, once, rather than in every worker
    supervisor = Supervisor(
        reactor,
        argv=_worker_argv(options),
        count=count,
        listeners=shared_listeners(config.listen),
        grace=config.settings.shutdown_grace,
    )
    parent = MultiService()
    supervisor.setServiceParent(parent)  # type: ignore[no-untyped-call]
    publications = None
    if config.metrics_listen:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=supervisor.metrics_dir)
        publications = key_publications_counter(registry)
        metrics_service(config.metrics_listen, registry, reactor).setServiceParent(parent)
    return parent, supervisor.reload, publications
