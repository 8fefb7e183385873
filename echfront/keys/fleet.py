# -*- test-case-name: tests.test_fleet_units -*-
"""A fleet's key rotation, run by whichever front leads it (RFC 9849 §4.1, §8.1, §10.10.5).

Many fronts share one :class:`~echfront.interfaces.IKeyStore`; one of them,
elected through a :class:`Coordinator` (:mod:`echfront.keys.etcdfleet` on
etcd), runs :class:`FleetRotation`.  Each :meth:`FleetRotation.step` reads
the store afresh and does the next thing the key states call for, so a
step that failed, or a new leader after a crash, simply carries on::

      due (no active key, or the newest is older than rotate)
       |
       v
    add one PENDING key per KEM (config_ids claimed by compare-and-swap)
       |
       v
    LOAD BARRIER: every live member reports the pending key ids loaded
       |                       (decrypt-only everywhere; nothing published)
       v
    PUBLISHING: the pending configs go to DNS ([publish])
       |
       v
    DNS BARRIER: every authoritative server answers with exactly them
       |
       v
    ACTIVATING: one atomic change: pending -> active, active -> retired
       |                        (retired keys decrypt for ``grace``)
       v
    IDLE ... retired keys past their grace are deleted

Every store write carries the leader's :class:`~echfront.interfaces.Fence`,
so a deposed leader's writes cannot land.  Before each stage the leader
also checks, on its own clock, that its lease cannot have expired yet
(:meth:`Coordinator.holds`); before publishing it renews the lease and
requires it to outlast the publication.  So a front that lost its lease
stops acting before another front can be granted the leadership.

The phase, the pending keys, the members the load barrier waits for and
the time the barriers took are recorded in the store
(:class:`RotationRecord`) for ``echfront fleet status``, the metrics and a
successor; the decisions themselves only ever follow the key states.
"""

from __future__ import annotations

import datetime
import enum
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

from twisted.internet.task import deferLater
from twisted.logger import Logger

from echfront.ech.keyset import ECHKey, generate_key, publication_list
from echfront.interfaces import (
    Fence,
    IKeyStore,
    IPublisher,
    MemberStatus,
    StateChange,
    StoredKey,
)
from echfront.keys.keydir import KeyState
from echfront.keys.rotation import RotationPolicy
from echfront.keys.stores import FenceLost, KeyStoreError

__all__ = [
    "Coordinator",
    "FleetRotation",
    "FleetView",
    "Phase",
    "RotationRecord",
]

#: Seconds of lease a leader keeps in hand beyond what an action needs.
LEASE_MARGIN = 0.5


class Phase(enum.Enum):
    """Where the fleet's rotation is (see the module docstring)."""

    IDLE = "idle"
    LOAD_BARRIER = "load_barrier"
    PUBLISHING = "publishing"
    DNS_BARRIER = "dns_barrier"
    ACTIVATING = "activating"


@dataclass(frozen=True)
class RotationRecord:
    """What the leader last recorded about the rotation (``fleet/rotation`` in etcd).

    Times are seconds since the epoch on the recording leader's clock.

    :ivar phase: the phase entered at :attr:`since`.
    :ivar leader: the member that recorded it.
    :ivar pending: ids of the keys being rotated in.
    :ivar waiting: members the load barrier waits for.
    :ivar barrier_since: when the current barrier started waiting.
    :ivar last_rotation: when new keys last became active.
    :ivar load_wait: seconds the last load barrier took.
    :ivar dns_wait: seconds the last DNS barrier took.
    """

    phase: Phase = Phase.IDLE
    leader: str = ""
    since: float = 0.0
    pending: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    barrier_since: float | None = None
    last_rotation: float | None = None
    load_wait: float | None = None
    dns_wait: float | None = None

    def encode(self) -> bytes:
        """The record as stored (JSON)."""
        document = {
            "phase": self.phase.value,
            "leader": self.leader,
            "since": self.since,
            "pending": list(self.pending),
            "waiting": list(self.waiting),
            "barrier_since": self.barrier_since,
            "last_rotation": self.last_rotation,
            "load_wait": self.load_wait,
            "dns_wait": self.dns_wait,
        }
        return json.dumps(document, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> RotationRecord:
        """A record from its stored form.

        :raises ValueError: for anything that is not a record.
        """
        try:
            document = json.loads(data)
            return cls(
                phase=Phase(document["phase"]),
                leader=str(document["leader"]),
                since=float(document["since"]),
                pending=tuple(str(k) for k in document["pending"]),
                waiting=tuple(str(m) for m in document["waiting"]),
                barrier_since=_number(document.get("barrier_since")),
                last_rotation=_number(document.get("last_rotation")),
                load_wait=_number(document.get("load_wait")),
                dns_wait=_number(document.get("dns_wait")),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a rotation record ({error})") from None


def _number(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FleetView:
    """The fleet's leadership and rotation as read from the store.

    :ivar leader: the leading member's name, or None.
    :ivar record: the last rotation record, or None before the first.
    """

    leader: str | None = None
    record: RotationRecord | None = None


class Coordinator(Protocol):
    """Election and the rotation record (:class:`~echfront.keys.etcdfleet.EtcdCoordinator`)."""

    name: str

    async def campaign(self) -> Fence | None:
        """Become (or stay) the leader if nobody else is; the fence while leading, else None.

        :raises KeyStoreError: when the store cannot be reached.
        """

    def holds(self, seconds: float = 0.0) -> bool:
        """Whether this front leads and its lease cannot expire within ``seconds``."""

    async def renew(self) -> bool:
        """Renew the lease now; whether it was renewed."""

    async def record(self, record: RotationRecord, fence: Fence) -> None:
        """Store ``record`` under ``fence``.

        :raises FenceLost: when the fence no longer holds.
        """

    async def read(self) -> FleetView:
        """The current leader and rotation record."""

    async def resign(self) -> None:
        """Give the leadership up (shutdown)."""


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)


def _kem(key: StoredKey) -> int:
    return key.keys[0].config.kem_id


def config_list_of(keys: Sequence[StoredKey], *, grease: bool = True) -> bytes:
    """The ECHConfigList that publishes ``keys``, as a single front publishes it.

    Post-quantum first (RFC 9849 §4), led by a GREASE decoy unless ``grease``
    is off (§6.2.2): :func:`~echfront.ech.keyset.publication_list`.
    """
    return publication_list((ech.config for key in keys for ech in key.keys), grease=grease)


@dataclass
class FleetRotation:
    """The leader's rotation state machine (see the module docstring).

    :param publisher: None with ``[publish] method = "none"``: a pending key
        becomes active once loaded everywhere, the operator publishes.
    :param publish_timeout: longest a publication may take; the lease must
        outlast it before one starts.
    :param publications: called with "success" or "failure" (metrics).
    """

    store: IKeyStore
    coordinator: Coordinator
    policy: RotationPolicy
    publisher: IPublisher | None
    clock: Any
    publish_timeout: float = 10.0
    publications: Callable[[str], object] = lambda result: None
    #: What was last recorded (None: read it from the store first).
    last: RotationRecord | None = field(default=None, init=False)

    log = Logger()

    def _now(self) -> float:
        return float(self.clock.seconds())

    def _acting(self, seconds: float = 0.0) -> None:
        """Stop here unless the lease certainly outlives ``seconds`` more."""
        if not self.coordinator.holds(seconds):
            raise FenceLost("the leader's lease may expire: stopped acting")

    async def _note(self, fence: Fence, **changes: Any) -> RotationRecord:
        """Record the rotation's state when it changed; the record."""
        assert self.last is not None
        now = self._now()
        record = replace(self.last, leader=self.coordinator.name, **changes)
        if record.phase is not self.last.phase:
            record = replace(record, since=now)
        if record != self.last:
            await self.coordinator.record(record, fence)
            self.last = record
        return record

    async def resume(self) -> None:
        """Read the previous leader's record (on taking the leadership)."""
        view = await self.coordinator.read()
        self.last = view.record or RotationRecord(since=self._now())
        previous = view.record
        if previous is not None and previous.phase is not Phase.IDLE:
            self.log.info(
                "resuming the fleet's key rotation of {pending} in phase {phase} "
                "(recorded by {leader})",
                pending=", ".join(previous.pending) or "-",
                phase=previous.phase.value,
                leader=previous.leader,
            )

    def _due(self, active: Sequence[StoredKey], now: float) -> bool:
        if not active:
            return True
        if not self.policy.rotate_every:
            return False
        newest = max(key.created for key in active).timestamp()
        return newest + self.policy.rotate_every <= now

    def _build(self, kem_id: int, taken: frozenset[int]) -> Sequence[ECHKey]:
        return [
            generate_key(
                self.policy.public_name,
                kem_id=kem_id,
                taken_ids=taken,
                maximum_name_length=self.policy.maximum_name_length,
                grease=self.policy.grease,
            )
        ]

    async def step(self, fence: Fence) -> None:
        """Advance the rotation once (idempotent; see the module docstring).

        :raises FenceLost: when this front no longer leads (it stops acting).
        :raises KeyStoreError: when the store cannot be reached (the rotation pauses).
        """
        if self.last is None:
            await self.resume()
        snapshot = await self.store.load()
        now = self._now()
        for key in snapshot.in_state(KeyState.RETIRED):
            if key.retire_after is not None and key.retire_after.timestamp() <= now:
                self._acting()
                if await self.store.delete_key(key.key_id, KeyState.RETIRED, fence=fence):
                    self.log.info("deleted retired ECH key {key}", key=key.key_id)
        pending = list(snapshot.in_state(KeyState.PENDING))
        active = snapshot.in_state(KeyState.ACTIVE)
        if not pending and not self._due(active, now):
            await self._note(fence, phase=Phase.IDLE, pending=(), waiting=(), barrier_since=None)
            return
        have = {_kem(key) for key in pending}
        missing = [kem for kem in self.policy.kems if kem not in have]
        for kem_id in missing:
            self._acting()
            added = await self.store.add_key(
                partial(self._build, kem_id), KeyState.PENDING, created=_utc(now), fence=fence
            )
            self.log.info("added pending ECH key {key}", key=added.key_id)
        if missing:
            snapshot = await self.store.load()
            pending = list(snapshot.in_state(KeyState.PENDING))
        await self._rotate(fence, pending, snapshot.members, list(active))

    async def _rotate(
        self,
        fence: Fence,
        pending: list[StoredKey],
        members: Sequence[MemberStatus],
        active: list[StoredKey],
    ) -> None:
        """Take ``pending`` through the barriers and make it active."""
        assert self.last is not None
        now = self._now()
        ids = tuple(key.key_id for key in pending)
        wanted = frozenset(ids)
        waiting = tuple(sorted(m.name for m in members if not wanted <= m.loaded))
        same = self.last.pending == ids and self.last.phase is not Phase.IDLE
        barrier_since = self.last.barrier_since if same else None
        if waiting:
            if barrier_since is None or self.last.phase is not Phase.LOAD_BARRIER:
                barrier_since = now
            await self._note(
                fence,
                phase=Phase.LOAD_BARRIER,
                pending=ids,
                waiting=waiting,
                barrier_since=barrier_since,
            )
            return
        load_wait = self.last.load_wait
        if self.last.phase is Phase.LOAD_BARRIER and barrier_since is not None:
            load_wait = now - barrier_since
            self.log.info(
                "every member loaded {keys} ({seconds:.2f}s)",
                keys=", ".join(ids),
                seconds=load_wait,
            )
        dns_wait = self.last.dns_wait
        if self.publisher is not None:
            waited = await self._publish(
                fence, ids, config_list_of(pending, grease=self.policy.grease), load_wait
            )
            if waited is None:
                return
            dns_wait = waited
        self._acting()
        await self._note(fence, phase=Phase.ACTIVATING, pending=ids, waiting=())
        retire_after = _utc(self._now() + self.policy.grace)
        changes = [StateChange(k.key_id, KeyState.PENDING, KeyState.ACTIVE) for k in pending]
        changes += [
            StateChange(k.key_id, KeyState.ACTIVE, KeyState.RETIRED, retire_after) for k in active
        ]
        if not await self.store.change_states(changes, fence=fence):
            self.log.warn("ECH key states changed under the rotation; reading them again")
            return
        if active:
            self.log.info(
                "ECH keys {new} are active; {old} decrypt until {until}",
                new=", ".join(ids),
                old=", ".join(k.key_id for k in active),
                until=retire_after.isoformat(),
            )
        else:
            self.log.info("ECH keys {new} are active", new=", ".join(ids))
        await self._note(
            fence,
            phase=Phase.IDLE,
            pending=(),
            waiting=(),
            barrier_since=None,
            last_rotation=self._now(),
            load_wait=load_wait,
            dns_wait=dns_wait,
        )

    async def _publish(
        self, fence: Fence, ids: tuple[str, ...], config_list: bytes, load_wait: float | None
    ) -> float | None:
        """Publish and pass the DNS barrier; the seconds it took, None when it failed."""
        assert self.publisher is not None and self.last is not None
        # A full lease in hand before an action no fence can stop.
        if not await self.coordinator.renew():
            raise KeyStoreError("could not renew the leader's lease before publishing")
        self._acting(self.publish_timeout + LEASE_MARGIN)
        await self._note(
            fence,
            phase=Phase.PUBLISHING,
            pending=ids,
            waiting=(),
            barrier_since=None,
            load_wait=load_wait,
        )
        started = self._now()
        try:
            published = self.publisher.publish(config_list)
            published.addTimeout(self.publish_timeout, self.clock)
            await published
        except Exception as error:  # a publisher reports any failure its own way
            self._failed(ids, f"ECH key publication failed: {error}")
            return None
        await self._note(fence, phase=Phase.DNS_BARRIER, barrier_since=started)
        deadline = started + self.policy.verify_timeout
        while True:
            self._acting()
            try:
                if await self.publisher.verify(config_list):
                    break
            except Exception as error:  # a server that cannot be asked right now
                self.log.warn("ECH publication check failed, retrying: {error}", error=str(error))
            if self._now() + self.policy.verify_interval > deadline:
                self._failed(ids, "the published ECH configs did not appear in DNS in time")
                return None
            await deferLater(self.clock, self.policy.verify_interval)
        waited = self._now() - started
        self.publications("success")
        self.log.info(
            "published ECH configs of {keys} in DNS and verified them ({seconds:.2f}s)",
            keys=", ".join(ids),
            seconds=waited,
        )
        return waited

    def _failed(self, ids: tuple[str, ...], message: str) -> None:
        self.publications("failure")
        self.log.error("{message}", message=message)
        self.log.error(
            "new ECH keys are not published; the current keys stay in service "
            "({keys} keep decrypting)",
            keys=", ".join(ids),
        )
