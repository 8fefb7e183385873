# -*- test-case-name: tests.test_tap -*-
"""The running front: listeners, reload, shutdown, key rotation, the workers' supervisor.

:class:`FrontService` serves one process's connections; :class:`KeyRotation`
runs the deployment's rotation schedule (``[keys] rotate`` and
``[publish]``), in the single front or in the ``--workers`` supervisor,
never in a worker; :func:`supervisor_service` is that supervisor.

What a reload (SIGHUP, ``[reload] watch``) does with each part of the
configuration:

* routes, backends, local services, key files, ``[ech]``, ``[limits]``,
  ``[log]`` and ``[relay]``: applied to new connections;
* ``[keys]`` and ``[publish]`` (and the TSIG secret file they name): applied
  too.  The new publisher is built, and its TSIG file read, before anything
  changes, so a bad table fails the whole reload with one error line and
  the running configuration stays.  When they changed, the rotation
  schedule is replaced: a rotation step in progress finishes with the old
  settings (its state is in the key directory, so nothing is lost), then
  the new schedule checks at once.  Adding ``rotate`` starts a schedule,
  removing it stops the schedule;
* ``[quic]`` and each target's ``quic_endpoint``: applied to new QUIC flows;
* ``listen``, ``[proxy] listen``, ``listen_quic`` and ``[metrics] listen``:
  only on restart (a warning says so); ``[proxy] from`` applies to new
  connections.

Each ``listen_quic`` port has its own :class:`~echfront.front.datagram.QuicFront`,
sharing the TCP front's metrics and HPKE budget; under ``--workers`` every
worker binds it (``SO_REUSEPORT``, :func:`~echfront.front.datagram.listen_udp`).
In a fleet, QUIC listens once the fleet's first key set is in service, as TCP does.

With ``--workers``, SIGHUP to the supervisor first checks the configuration
and applies ``[keys]``/``[publish]`` there (where rotation runs); only if
that succeeds is SIGHUP passed to every worker.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from echfront.app.fleet import FleetService
from echfront.app.listeners import ListenerService, listen_quic, metrics_service
from echfront.app.workers import Supervisor, shared_listeners, worker_listen
from echfront.config.build import (
    build_publisher,
    build_quic_state,
    build_state,
    listen_endpoints,
    listen_plan,
    load_tsig_key,
    proxy_listen_endpoints,
)
from echfront.config.schema import Config, PublishConfig
from echfront.dns.rfc2136 import TSIGKey
from echfront.ech.keyset import ECHKey, KeySet
from echfront.errors import ConfigError
from echfront.front.accept import accept_queued, closes_refused
from echfront.front.datagram import QuicFront
from echfront.front.leanport import adopt_port
from echfront.front.metrics import Metrics, key_publications_counter
from echfront.front.protocol import FrontFactory
from echfront.interfaces import IPublisher, StoreSnapshot
from echfront.keys.keydir import KeyDirectory
from echfront.keys.rotation import RotationPolicy, Rotator

__all__ = [
    "FrontService",
    "KeyRotation",
    "RotationPlan",
    "listen_quic",
    "metrics_service",
    "supervisor_service",
]

_log = Logger()


# -- key rotation -----------------------------------------------------------------


@dataclass(frozen=True)
class RotationPlan:
    """What the rotation schedule runs with; equal plans need no restart.

    :ivar tsig: the TSIG key as read from its file (so an edit of the file
        alone counts as a change).
    :ivar publisher: built from ``publish``; not compared.
    """

    directory: Path
    policy: RotationPolicy
    publish: PublishConfig
    tsig: TSIGKey | None
    publisher: IPublisher | None = field(compare=False)


class KeyRotation(MultiService):
    """The deployment's rotation schedule, following the configuration across reloads.

    :meth:`prepare` checks and builds (it may fail); :meth:`apply` only
    switches, so a reload can prepare everything before changing anything.
    It is a child of ``host`` only while it has a plan to run.

    :param host: the service the schedule runs under.
    :param on_change: called when the key directory changed (reloads fronts).
    :param publications: the ``echfront_key_publications_total`` counter, if any.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        host: MultiService,
        *,
        on_change: Callable[[], object],
        publications: Counter | None = None,
    ) -> None:
        """Run nothing until :meth:`apply` gets a plan."""
        super().__init__()  # type: ignore[no-untyped-call]
        self.reactor = reactor
        self.host = host
        self.on_change = on_change
        self.counter = publications
        self.plan: RotationPlan | None = None
        self.rotator: Rotator | None = None
        #: Fires when the previous schedule has stopped (its step finished).
        self._switched: Deferred[object] = succeed(None)

    def prepare(self, config: Config) -> RotationPlan | None:
        """The plan for ``config``: None without ``[keys] rotate``.

        :raises ConfigError: for a ``[publish]`` table whose publisher cannot
            be built (an unreadable TSIG file, a missing command).
        """
        if config.rotation is None or config.key_directory is None:
            return None
        tsig = load_tsig_key(config.publish) if config.publish.method == "rfc2136" else None
        publisher = build_publisher(config.publish, reactor=self.reactor, tsig=tsig)
        return RotationPlan(config.key_directory, config.rotation, config.publish, tsig, publisher)

    def apply(self, plan: RotationPlan | None) -> None:
        """Run ``plan`` from now on (see the module docstring); nothing when unchanged."""
        if plan == self.plan:
            return
        if self.plan is not None:
            self.log.info("key rotation settings changed; restarting the rotation schedule")
        self.plan = plan
        old, self.rotator = self.rotator, None
        if old is not None:
            stopped = old.disownServiceParent()  # type: ignore[no-untyped-call]
            if stopped is not None:
                self._switched = self._switched.addBoth(lambda _: stopped)
        if plan is None:
            if self.parent is not None:
                self.disownServiceParent()  # type: ignore[no-untyped-call]
            return
        if self.parent is None:
            self.setServiceParent(self.host)  # type: ignore[no-untyped-call]
        rotator = Rotator(
            KeyDirectory(plan.directory),
            plan.policy,
            plan.publisher,
            self.reactor,
            on_change=self.on_change,
            publications=self._count,
        )
        self.rotator = rotator

        def start(result: object) -> None:
            # A later apply may have replaced this plan while the old step ran.
            if self.rotator is rotator:
                rotator.setServiceParent(self)  # type: ignore[no-untyped-call]

        self._switched.addBoth(start)

    def _count(self, result: str) -> None:
        if self.counter is not None:
            self.counter.labels(result).inc()


# -- one front ----------------------------------------------------------------------


class FrontService(MultiService):
    """The running front: listeners, the factory they share, reload and shutdown.

    :ivar factory: the FrontFactory; ``factory.state`` is what new
        connections are served with.
    :ivar config: the configuration in service.
    :ivar rotation: the rotation schedule, when this process runs it.
    """

    log = Logger()

    def __init__(
        self,
        load: Callable[[], Config],
        reactor: Any,
        *,
        worker: int | None = None,
        metrics: Metrics | None = None,
        rotate: bool = False,
    ) -> None:
        """Build the state and listeners; raise ConfigError if anything is wrong.

        :param load: reads the configuration (again, on every reload).
        :param worker: this process's index under ``--workers``, if any.
        :param rotate: run the deployment's rotation schedule here.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self.load = load
        self.reactor = reactor
        self.worker = worker
        self.config = load()
        self.metrics = metrics if metrics is not None else Metrics()
        state = build_state(self.config, reactor, self.current_keys)
        self.factory = FrontFactory(state, reactor, self.metrics)
        #: One QUIC front per ``listen_quic`` entry (each has its own flows).
        self.quic_fronts = [
            QuicFront(
                build_quic_state(self.config, state),
                reactor,
                metrics=self.metrics,
                limits=self.factory.limits,
            )
            for _ in self.config.listen_quic
        ]
        self.metrics.set_keys(state.decoder.keys)
        self._ports: list[IListeningPort] = []
        self._watched: dict[Path, tuple[int, int, int] | None] = {}
        self._watcher: LoopingCall | None = None
        self._previous_hup: Any = None
        #: The ``listen_quic`` ports, started with the TCP listeners.
        self.quic_listeners = [
            listen_quic(reactor, description, quic, reuse_port=worker is not None)
            for description, quic in zip(self.config.listen_quic, self.quic_fronts, strict=True)
        ]
        for quic_listener in self.quic_listeners if self.config.fleet is None else ():
            quic_listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        listeners = []
        if worker is None:
            listeners = [ListenerService(e, f) for e, f in self._listeners(reactor)]
            # In a fleet they start with its first key set (FleetService).
            for listener in listeners if self.config.fleet is None else ():
                listener.setServiceParent(self)  # type: ignore[no-untyped-call]
            if self.config.metrics_listen:
                metrics_service(
                    self.config.metrics_listen, self.metrics.registry, reactor
                ).setServiceParent(self)
        self.rotation: KeyRotation | None = None
        if rotate:
            self.rotation = KeyRotation(
                reactor, self, on_change=self.reload, publications=self.metrics.key_publications
            )
            self.rotation.apply(self.rotation.prepare(self.config))
        #: The fleet's keys in service ([keys] store = "etcd"); reloads keep them.
        self._store_keys: tuple[ECHKey, ...] = ()
        self.fleet: FleetService | None = None
        if self.config.fleet is not None:
            self.fleet = FleetService(
                self.config,
                reactor,
                apply=self.serve_store_keys,
                listeners=listeners,
                metrics=self.metrics,
            )
            self.fleet.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _listeners(self, reactor: Any) -> list[tuple[Any, Any]]:
        """Each listening endpoint with the factory it listens with.

        Every endpoint listens through the front factory's
        :meth:`~echfront.front.protocol.FrontFactory.listener`, which closes
        refused sockets whatever the endpoint's kind; ``[proxy] listen``
        endpoints read a balancer's PROXY header first.
        """
        factory = self.factory
        plain = [
            (e, factory.listener(bare_port=closes_refused(e)))
            for e in listen_endpoints(self.config, reactor)
        ]
        return plain + [
            (e, factory.listener(proxied=True, bare_port=closes_refused(e)))
            for e in proxy_listen_endpoints(self.config, reactor)
        ]

    def current_keys(self) -> KeySet:
        """The key set new connections are decrypted with."""
        return self.factory.state.decoder.keys if hasattr(self, "factory") else KeySet()

    # -- reload ------------------------------------------------------------

    def reload(self) -> bool:
        """Read the configuration again and serve new connections with it.

        Connections in progress keep the state they started with (a second
        ClientHello after a HelloRetryRequest still uses its first hello's
        HPKE context).  If the new configuration is invalid, including a
        ``[publish]`` whose publisher cannot be built, the running one stays
        and one error line is logged.
        """
        try:
            config = self.load()
            state = build_state(
                config, self.reactor, self.current_keys, store_keys=self._store_keys
            )
            quic_state = build_quic_state(config, state)
            plan = self.rotation.prepare(config) if self.rotation is not None else None
            fleet_plan = self.fleet.prepare(config) if self.fleet is not None else None
        except ConfigError as error:
            self.metrics.reloads.labels("failure").inc()
            self.log.error(
                "reload failed, still serving the previous configuration: {error}",
                error=str(error),
            )
            return False
        if (
            config.listen != self.config.listen
            or config.proxy_listen != self.config.proxy_listen
            or config.listen_quic != self.config.listen_quic
            or config.metrics_listen != self.config.metrics_listen
        ):
            self.log.warn("listen and metrics endpoints change only on restart")
        self.config = config
        self.factory.state = state
        for quic in self.quic_fronts:
            quic.state = quic_state
        if self.rotation is not None:
            self.rotation.apply(plan)
        if self.fleet is not None:
            self.fleet.apply(fleet_plan, config)
        self.metrics.set_keys(state.decoder.keys)
        self.metrics.reloads.labels("success").inc()
        self._snapshot()
        self.log.info(
            "reloaded: {keys} ECH configs, {targets} targets",
            keys=len(state.decoder.keys),
            targets=len(state.targets),
        )
        return True

    def serve_store_keys(self, snapshot: StoreSnapshot) -> bool:
        """Serve new connections with the fleet's keys in ``snapshot``, as a reload does."""
        keys = tuple(snapshot.ech_keys())
        try:
            state = build_state(self.config, self.reactor, self.current_keys, store_keys=keys)
            quic_state = build_quic_state(self.config, state)
        except ConfigError as error:
            self.log.error("the fleet's new key set is not in service: {error}", error=str(error))
            return False
        self._store_keys, self.factory.state = keys, state
        for quic in self.quic_fronts:
            quic.state = quic_state
        for quic_listener in self.quic_listeners:
            if quic_listener.parent is None:  # the first key set: listen now
                quic_listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.metrics.set_keys(state.decoder.keys)
        described = ", ".join(f"{k.key_id} ({k.state.value})" for k in snapshot.keys)
        self.log.info(
            "serving the fleet's keys of revision {revision}: {keys}",
            revision=snapshot.revision,
            keys=described or "none",
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
            # Plain listen entries run on the lean engine unless [front] says not.
            lean = self.config.engine == "lean" and self.config.exit is None
            for index, (description, proxied) in enumerate(listen_plan(self.config)):
                # Workers adopt sockets into Twisted's own ports (bare_port).
                factory = self.factory.listener(proxied=proxied, bare_port=True)
                adopt = partial(adopt_port, self.reactor) if lean and not proxied else None
                self._ports.append(
                    worker_listen(self.reactor, index, description, factory, adopt=adopt)
                )
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
        for port in self._ports:
            accept_queued(port)  # closing would reset what the kernel queued
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


# -- the --workers supervisor ---------------------------------------------------------


def supervisor_service(
    load: Callable[[], Config], argv: Sequence[str], count: int, reactor: Any
) -> MultiService:
    """The ``--workers`` supervisor: checks the configuration, runs workers and rotation.

    :param load: reads the configuration (again, on SIGHUP).
    :param argv: a worker's command line.
    :raises ConfigError: for a configuration a worker could not serve.
    """
    config = load()
    if config.fleet is not None:
        raise ConfigError('workers: a fleet member ([keys] store = "etcd") runs as one process')
    build_state(config, reactor, KeySet)  # fail here, once, rather than in every worker
    supervisor = Supervisor(
        reactor,
        argv=argv,
        count=count,
        listeners=shared_listeners([description for description, _ in listen_plan(config)]),
        grace=config.settings.shutdown_grace,
    )
    parent = MultiService()
    supervisor.setServiceParent(parent)  # type: ignore[no-untyped-call]
    publications = None
    if config.metrics_listen:
        # The workers' sum, and the publication counter of the rotation run here.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=supervisor.metrics_dir)
        publications = key_publications_counter(registry)
        metrics_service(config.metrics_listen, registry, reactor).setServiceParent(parent)
    rotation = KeyRotation(reactor, parent, on_change=supervisor.reload, publications=publications)
    rotation.apply(rotation.prepare(config))

    def check() -> bool:
        """SIGHUP: check the new configuration here, apply [keys]/[publish], then pass it on."""
        try:
            new = load()
            build_state(new, reactor, KeySet)
            plan = rotation.prepare(new)
        except ConfigError as error:
            _log.error(
                "reload failed, still serving the previous configuration: {error}",
                error=str(error),
            )
            return False
        rotation.apply(plan)
        return True

    supervisor.check_reload = check
    return parent
