# -*- test-case-name: tests.test_fleet_units -*-
"""The fleet's election and rotation record in etcd, and the fleet's status as etcd holds it.

Two entries beside the key store's (:mod:`echfront.keys.etcdstore`)::

    fleet/leader      the leader: JSON {name, since}, attached to the lease
                      of the leader's member registration
    fleet/rotation    the rotation record (echfront.keys.fleet.RotationRecord)

:class:`EtcdCoordinator` campaigns by creating ``fleet/leader`` on its
member lease only if it does not exist (one transaction), so exactly one
live front leads.  The entry's creation revision is the
:class:`~echfront.interfaces.Fence` of every write the leader makes: the
entry goes when the lease ends, and with it every write the old leader
might still try.  :meth:`EtcdCoordinator.holds` adds the local half: the
member registration knows the earliest time etcd may expire its lease (a
renewal's send time plus the TTL), and the leader acts only before it.
A leader whose renewals fail (cut off, or the cluster lost its quorum)
therefore stops before its lease can expire, hence before any other front
can be elected.

:func:`read_fleet` reads everything under the prefix at one revision
without opening any key (no KEK needed) for ``echfront fleet status``.
"""

from __future__ import annotations

import base64
import datetime
import json
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from echfront.ech.echconfig import decode_config_list, kem_name
from echfront.errors import ConfigError
from echfront.interfaces import Fence, MemberStatus
from echfront.keys.etcd import EtcdClient
from echfront.keys.etcdapi import KeyValue, compare_create, delete_op, prefix_end, put_op, range_op
from echfront.keys.etcdstore import decode_member
from echfront.keys.etcdwatch import EtcdMembership
from echfront.keys.fleet import LEASE_MARGIN, FleetView, RotationRecord
from echfront.keys.stores import FenceLost

__all__ = [
    "LEADER",
    "ROTATION",
    "EtcdCoordinator",
    "FleetStatus",
    "KeySummary",
    "read_fleet",
]

#: The leader entry and the rotation record, under the store's prefix.
LEADER = "fleet/leader"
ROTATION = "fleet/rotation"
_FLEET = "fleet/"


def _leader_name(kv: KeyValue | None) -> str | None:
    if kv is None:
        return None
    try:
        return str(json.loads(kv.value)["name"])
    except (ValueError, KeyError, TypeError):
        return "(unreadable)"


def _record(kv: KeyValue | None) -> RotationRecord | None:
    if kv is None:
        return None
    try:
        return RotationRecord.decode(kv.value)
    except ValueError:
        return None


class EtcdCoordinator:
    """Election on the member lease, and the fenced rotation record (see the module docstring).

    :param membership: this front's registration; its lease carries the leadership.
    :param clock: an ``IReactorTime``, the same clock the membership reads.
    """

    log = Logger()

    def __init__(
        self, client: EtcdClient, prefix: str, membership: EtcdMembership, clock: Any
    ) -> None:
        """Campaign as ``membership.name``."""
        self.client = client
        self.prefix = prefix.encode("utf-8")
        self.membership = membership
        self.clock = clock
        self.name = membership.name
        self._held: tuple[Fence, int] | None = None

    def _key(self, name: str) -> bytes:
        return self.prefix + name.encode("utf-8")

    async def campaign(self) -> Fence | None:
        """Create the leader entry on our lease if absent; our fence while it is ours.

        None, too, while the entry is ours but the lease cannot be shown to
        hold (a renewal failed): this front does not act then.
        """
        lease = self.membership.lease
        if not lease:
            self._held = None
            return None
        key = self._key(LEADER)
        value = json.dumps({"name": self.name, "since": float(self.clock.seconds())}).encode()
        result = await self.client.txn(
            [compare_create(key, 0)], [put_op(key, value, lease)], [range_op(key)]
        )
        if result.succeeded:
            fence = Fence(LEADER, result.revision)
        else:
            found = result.ranges()
            kv = found[0][0] if found and found[0] else None
            if kv is None or kv.lease != lease or _leader_name(kv) != self.name:
                self._held = None
                return None
            fence = Fence(LEADER, kv.create_revision)
        self._held = (fence, lease)
        if not self.holds() and not (await self.renew() and self.holds()):
            # Ours, but renewals failed (etcd was away): lead again only
            # once the lease is known to hold.
            return None
        return fence

    def holds(self, seconds: float = 0.0) -> bool:
        """Whether we lead on the current lease and it cannot expire within ``seconds``."""
        if self._held is None or self._held[1] != self.membership.lease:
            return False
        return float(self.clock.seconds()) + seconds + LEASE_MARGIN < self.membership.expires

    async def renew(self) -> bool:
        """Renew the member lease now."""
        renewed: bool = await self.membership.renew()
        return renewed

    async def record(self, record: RotationRecord, fence: Fence) -> None:
        """Write the rotation record, only while ``fence`` holds."""
        leader = self._key(fence.key)
        result = await self.client.txn(
            [compare_create(leader, fence.revision)],
            [put_op(self._key(ROTATION), record.encode())],
            [range_op(leader)],
        )
        if not result.succeeded:
            self._held = None
            raise FenceLost(f"fence {fence.key}@{fence.revision} no longer holds: not the leader")

    async def read(self) -> FleetView:
        """The leader and the rotation record."""
        start = self._key(_FLEET)
        kvs, _revision = await self.client.range(start, prefix_end(start))
        found = {kv.key: kv for kv in kvs}
        return FleetView(
            leader=_leader_name(found.get(self._key(LEADER))),
            record=_record(found.get(self._key(ROTATION))),
        )

    async def resign(self) -> None:
        """Delete the leader entry if it is still ours."""
        held, self._held = self._held, None
        if held is None:
            return
        fence = held[0]
        leader = self._key(fence.key)
        await self.client.txn([compare_create(leader, fence.revision)], [delete_op(leader)])


# -- the fleet as etcd holds it (echfront fleet status) ------------------------------------


@dataclass(frozen=True)
class KeySummary:
    """One key as its etcd record describes it (nothing unsealed)."""

    key_id: str
    state: str
    created: str
    retire_after: str | None
    config_ids: tuple[int, ...]
    kems: tuple[str, ...]


@dataclass(frozen=True)
class FleetStatus:
    """Everything ``echfront fleet status`` shows, read at one etcd revision.

    :ivar leader_since: when the leader was elected (its clock, epoch seconds).
    :ivar problems: records that could not be read, one line each.
    """

    revision: int
    keys: tuple[KeySummary, ...]
    members: tuple[MemberStatus, ...]
    leader: str | None
    leader_since: float | None
    record: RotationRecord | None
    problems: tuple[str, ...]


def _summary(kv: KeyValue, key_id: str) -> KeySummary:
    document = json.loads(kv.value)
    retire_after = document.get("retire_after")
    configs = decode_config_list(base64.b64decode(document["config_list"])).configs
    return KeySummary(
        key_id=key_id,
        state=str(document["state"]),
        created=str(document["created"]),
        retire_after=None if retire_after is None else str(retire_after),
        config_ids=tuple(c.config_id for c in configs),
        kems=tuple(kem_name(c.kem_id) for c in configs),
    )


async def read_fleet(client: EtcdClient, prefix: str) -> FleetStatus:
    """Read the fleet under ``prefix`` (one linearizable range; no KEK needed).

    :raises KeyStoreError: when etcd cannot be reached.
    """
    start = prefix.encode("utf-8")
    kvs, revision = await client.range(start, prefix_end(start))
    keys: list[KeySummary] = []
    members: list[MemberStatus] = []
    problems: list[str] = []
    leader: str | None = None
    since: float | None = None
    record: RotationRecord | None = None
    for kv in kvs:
        name = kv.key[len(start) :].decode("utf-8", "replace")
        if name.startswith("keys/"):
            try:
                keys.append(_summary(kv, name[len("keys/") :]))
            except (ValueError, KeyError, TypeError, ConfigError) as error:
                problems.append(f"{name}: unreadable key record ({error})")
        elif name.startswith("members/"):
            members.append(decode_member(name[len("members/") :], kv.value))
        elif name == LEADER:
            leader = _leader_name(kv)
            try:
                since = float(json.loads(kv.value)["since"])
            except (ValueError, KeyError, TypeError):
                since = None
        elif name == ROTATION:
            record = _record(kv)
            if record is None:
                problems.append(f"{name}: unreadable rotation record")
    keys.sort(key=lambda k: (k.created, k.key_id))
    return FleetStatus(
        revision=revision,
        keys=tuple(keys),
        members=tuple(members),
        leader=leader,
        leader_since=since,
        record=record,
        problems=tuple(problems),
    )


def utc_text(seconds: float | None) -> str:
    """Epoch seconds as ``2026-01-31T12:00:00Z`` ("-" for None)."""
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
