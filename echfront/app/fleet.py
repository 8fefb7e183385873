# -*- test-case-name: tests.test_fleet_units -*-
"""A front in a fleet (``[keys] store = "etcd"``): its key store, membership and candidacy.

:class:`FleetService` runs, under the :class:`~echfront.app.service.FrontService`:

* a :class:`~echfront.keys.fleetmember.FleetMember`, which registers the
  front, follows the store and hands every new key set to the front (which
  swaps it in as a reload does), then reports it loaded.  The front listens
  only once the first key set is in service;
* with ``[keys] rotate``, a :class:`~echfront.keys.fleetleader.FleetLeader`: the
  front is a candidate to lead the fleet's rotation, elected through
  :class:`~echfront.keys.etcdfleet.EtcdCoordinator`;
* a look at the leader and the rotation record every few seconds for the
  ``echfront_fleet_*`` metrics (:class:`~echfront.front.metrics.FleetMetrics`).

``[keys]`` rotation settings and ``[publish]`` follow reloads (a step in
progress finishes with the old ones); ``[keys.etcd]`` changes only on
restart.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from echfront._version import __version__
from echfront.config.build import build_publisher, load_tsig_key
from echfront.config.schema import Config, FleetConfig, PublishConfig
from echfront.dns.rfc2136 import TSIGKey
from echfront.errors import ConfigError
from echfront.front.metrics import FleetMetrics, Metrics
from echfront.interfaces import IMembership, IPublisher, StoreSnapshot
from echfront.keys.etcd import EtcdClient
from echfront.keys.etcdapi import EtcdSettings
from echfront.keys.etcdfleet import EtcdCoordinator
from echfront.keys.etcdstore import EtcdKeyStore
from echfront.keys.etcdwatch import EtcdMembership
from echfront.keys.fleet import FleetRotation, Phase
from echfront.keys.fleetleader import FleetLeader
from echfront.keys.fleetmember import FleetMember
from echfront.keys.rotation import RotationPolicy
from echfront.keys.sealing import Sealer
from echfront.keys.stores import KeyStoreError

__all__ = ["FleetPlan", "FleetService", "build_store", "etcd_settings", "member_name"]

#: Longest interval between two looks at the leader and the rotation record.
_LOOK_INTERVAL = 5.0


def etcd_settings(fleet: FleetConfig) -> EtcdSettings:
    """The etcd settings of ``[keys.etcd]``, with the password read from its file.

    :raises ConfigError: naming ``keys.etcd.password_file``.
    """
    if fleet.password_file is None:
        return fleet.etcd
    try:
        password = fleet.password_file.read_text("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            f"keys.etcd.password_file: {fleet.password_file}: cannot read ({reason})"
        ) from None
    return replace(fleet.etcd, password=password)


def build_store(fleet: FleetConfig, reactor: Any) -> EtcdKeyStore:
    """The fleet's key store: the etcd client and the sealer of its KEK files.

    :raises ConfigError: for an unreadable KEK, password, CA or client certificate file.
    """
    try:
        sealer = Sealer.from_files(fleet.kek_file, fleet.previous_kek_files)
    except ConfigError as error:
        raise ConfigError(f"keys.etcd.kek_file: {error}") from None
    client = EtcdClient(etcd_settings(fleet), reactor)
    return EtcdKeyStore(client, sealer, reactor)


def member_name(fleet: FleetConfig) -> str:
    """``[keys.etcd] member``, else the host name made a valid member name."""
    if fleet.member is not None:
        return fleet.member
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:63]
    return name or "front"


@dataclass(frozen=True)
class FleetPlan:
    """What the leader candidate runs with; equal plans need no change.

    :ivar tsig: the TSIG key as read (so an edit of the file alone counts).
    :ivar publisher: built from ``publish``; not compared.
    """

    policy: RotationPolicy
    publish: PublishConfig
    tsig: TSIGKey | None
    publisher: IPublisher | None = field(compare=False)


class FleetService(MultiService):
    """This front's membership in the fleet and, with rotation, its candidacy.

    :param apply: puts a snapshot's keys into service; False when it could not.
    :param listeners: the front's listening services, started (as children)
        once the first key set is in service.
    :raises ConfigError: for unreadable KEK, password or TLS files, or a
        ``[publish]`` whose publisher cannot be built.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        apply: Callable[[StoreSnapshot], bool],
        listeners: Sequence[StreamServerEndpointService],
        metrics: Metrics,
    ) -> None:
        """Build the store and the member; nothing is sent until the service starts."""
        super().__init__()  # type: ignore[no-untyped-call]
        assert config.fleet is not None
        self.settings = config.fleet
        self.reactor = reactor
        self.listeners = list(listeners)
        self.store = build_store(config.fleet, reactor)
        self.name = member_name(config.fleet)
        self.plan = self.prepare(config)
        self.publications = metrics.key_publications
        self.metrics = FleetMetrics(metrics.registry, [phase.value for phase in Phase])
        info = {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "version": __version__,
            "listen": ",".join(config.listen),
        }
        self.member = FleetMember(
            self.store,
            self.name,
            config.fleet.member_ttl,
            info,
            reactor,
            apply=apply,
            ready=self._ready,
            changed=self._changed,
        )
        self.member.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.coordinator: EtcdCoordinator | None = None
        self.leader: FleetLeader | None = None
        self._switched: Deferred[object] = succeed(None)
        self._look: LoopingCall | None = None
        self._members: frozenset[str] = frozenset()

    # -- the plan (follows reloads) --------------------------------------------------

    def prepare(self, config: Config) -> FleetPlan | None:
        """The candidate's plan for ``config``: None without ``[keys] rotate``.

        :raises ConfigError: for a ``[publish]`` whose publisher cannot be built.
        """
        if config.rotation is None:
            return None
        tsig = load_tsig_key(config.publish) if config.publish.method == "rfc2136" else None
        publisher = build_publisher(config.publish, reactor=self.reactor, tsig=tsig)
        return FleetPlan(config.rotation, config.publish, tsig, publisher)

    def apply(self, plan: FleetPlan | None, config: Config) -> None:
        """Run ``plan`` from now on (after the step under way); warn about restart-only changes."""
        if config.fleet != self.settings:
            self.log.warn("[keys.etcd] settings change only on restart")
        if plan == self.plan:
            return
        self.log.info("key rotation settings changed; restarting the fleet's rotation candidate")
        self.plan = plan
        if self.coordinator is not None:
            self._start_leader()

    def _start_leader(self) -> None:
        old, self.leader = self.leader, None
        if old is not None:
            stopped = old.disownServiceParent()  # type: ignore[no-untyped-call]
            if stopped is not None:
                self._switched = self._switched.addBoth(lambda _: stopped)
        plan, coordinator = self.plan, self.coordinator
        if plan is None or coordinator is None:
            return
        rotation = FleetRotation(
            self.store,
            coordinator,
            plan.policy,
            plan.publisher,
            self.reactor,
            publish_timeout=plan.publish.timeout,
            publications=lambda result: self.publications.labels(result).inc(),
        )
        leader = FleetLeader(rotation, self.reactor, plan.policy.check_interval)
        self.leader = leader

        def start(result: object) -> None:
            # Never two candidates in one process: the old one resigned first.
            if self.leader is leader and self.running:
                leader.setServiceParent(self)  # type: ignore[no-untyped-call]

        self._switched.addBoth(start)

    # -- membership events ---------------------------------------------------------------

    def _ready(self, membership: IMembership) -> None:
        """The first key set is in service: campaign, start looking, listen."""
        assert isinstance(membership, EtcdMembership)
        self.coordinator = EtcdCoordinator(
            self.store.client, self.settings.etcd.prefix, membership, self.reactor
        )
        self._start_leader()
        interval = _LOOK_INTERVAL
        if self.plan is not None:
            interval = min(interval, self.plan.policy.check_interval)
        self._look = LoopingCall(self.look)
        self._look.clock = self.reactor
        self._look.start(interval, now=True)
        for listener in self.listeners:
            # Bound only now: a port that cannot be bound stops the front, in one line.
            listener._raiseSynchronously = True
            try:
                listener.setServiceParent(self)
            except Exception as error:  # CannotListenError, or any endpoint's own
                self.log.error("cannot listen, stopping: {error}", error=str(error))
                self.reactor.stop()
                return

    def _changed(self, snapshot: StoreSnapshot) -> None:
        """Step at once when it may matter: while leading, or when a member came or went.

        A leader's entry goes with its lease, and so does its member entry:
        the candidates campaign right away instead of at their next check.
        """
        names = frozenset(member.name for member in snapshot.members)
        joined_or_left, self._members = names != self._members, names
        if self.leader is not None and (self.leader.leading or joined_or_left):
            self.leader.kick()

    def look(self) -> Deferred[None]:
        """Read the leader and the rotation record; set the fleet metrics."""
        looking = Deferred.fromCoroutine(self._look_once())
        looking.addErrback(lambda failure: self.log.failure("fleet metrics failed", failure))
        return looking

    async def _look_once(self) -> None:
        assert self.coordinator is not None
        snapshot = self.member.snapshot
        members = len(snapshot.members) if snapshot is not None else 0
        try:
            view = await self.coordinator.read()
        except KeyStoreError:
            view = None
        now = float(self.reactor.seconds())
        record = view.record if view is not None else None
        phase = record.phase if record is not None else None
        load_wait = record.load_wait if record is not None else None
        dns_wait = record.dns_wait if record is not None else None
        if record is not None and record.barrier_since is not None:
            if phase is Phase.LOAD_BARRIER:
                load_wait = now - record.barrier_since
            elif phase is Phase.DNS_BARRIER:
                dns_wait = now - record.barrier_since
        last = record.last_rotation if record is not None else None
        self.metrics.update(
            members=members,
            store_up=view is not None and self.member.connected,
            leader=view is not None and view.leader == self.name,
            phase=None if phase is None else phase.value,
            since_rotation=None if last is None else max(0.0, now - last),
            load_wait=load_wait,
            dns_wait=dns_wait,
        )

    # -- stop --------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Stop listening, then the candidate (it resigns), then leave the fleet and close.

        In that order, one after the other: the leader's step finishes while
        its lease still holds, and the registration goes last.
        """
        Service.stopService(self)  # not MultiService's: it stops children all at once
        if self._look is not None and self._look.running:
            self._look.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        running = [child for child in self if child.running]
        order = [c for c in running if c in self.listeners]
        order += [c for c in running if c is self.leader]
        order += [c for c in running if c not in order]
        for child in order:
            try:
                await maybeDeferred(child.stopService)
            except Exception:  # one child's failure must not keep the others running
                self.log.failure("stopping {child} failed", child=child)
        await self.store.close()
