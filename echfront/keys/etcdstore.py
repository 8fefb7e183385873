# -*- test-case-name: tests.test_etcd -*-
"""The fleet's ECH keys in etcd v3: :class:`EtcdKeyStore` (an ``IKeyStore``).

Layout under the prefix (default ``/echfront/``)::

    keys/<key_id>        one key: JSON with its state, times, ECHConfigList,
                         and its private key sealed (echfront.keys.sealing)
    config-ids/<nnn>     a claimed config_id (0..255), holding the key_id
    members/<name>       a registered front, attached to its lease: JSON with
                         what it has loaded (the load barrier reads this)

Every write is one etcd transaction whose conditions make it safe to
retry and to race: a key and its config_ids are created only if none of
them exists yet (compare-and-swap on their creation revision), a state
change only if the key is unchanged since it was read (its modification
revision), and, with a :class:`~echfront.interfaces.Fence`, only while the
fence entry still exists with its creation revision.  A request whose
answer was lost is recognised on retry by reading what is there.

The private key never enters etcd in the clear: the value holds the raw
HPKE private key AES-GCM-sealed under the local key-encryption key, bound
to the key id and ECHConfigList; no PEM is written at all.  The watch and
the member registrations are in :mod:`echfront.keys.etcdwatch`.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from echfront.ech.echconfig import decode_config_list, encode_config_list
from echfront.ech.hpke import RecipientKey
from echfront.ech.keyset import ECHKey
from echfront.errors import ConfigError
from echfront.interfaces import (
    Fence,
    IKeyStore,
    IKeyWatch,
    IMembership,
    MemberStatus,
    StateChange,
    StoredKey,
    StoreSnapshot,
)
from echfront.keys.etcd import EtcdClient
from echfront.keys.etcdapi import (
    KeyValue,
    compare_create,
    compare_mod,
    delete_op,
    prefix_end,
    put_op,
    range_op,
)
from echfront.keys.etcdwatch import EtcdMembership, EtcdWatch
from echfront.keys.keydir import KeyState
from echfront.keys.sealing import Sealer, SealError, sealing_context
from echfront.keys.stores import (
    FenceLost,
    KeyStoreError,
    changes_to_apply,
    check_member_name,
    check_new_keys,
)

__all__ = ["EtcdKeyStore", "decode_member", "encode_key_record"]

_FORMAT = 1
_TIME = "%Y-%m-%dT%H:%M:%SZ"
#: Attempts of a compare-and-swap that keeps losing to other writers.  Each
#: round has one winner, so N writers racing for the lowest free config_id
#: can make the last one lose N - 1 times: the bound must exceed the writers
#: that can race (one leader in a fleet; the tests race 24).
_ATTEMPTS = 64


def _iso(when: datetime.datetime | None) -> str | None:
    return None if when is None else when.strftime(_TIME)


def _time(text: object) -> datetime.datetime | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError("bad time")
    return datetime.datetime.strptime(text, _TIME).replace(tzinfo=datetime.UTC)


def encode_key_record(
    sealer: Sealer,
    key_id: str,
    keys: Sequence[ECHKey],
    *,
    state: KeyState,
    created: datetime.datetime,
    retire_after: datetime.datetime | None = None,
) -> bytes:
    """The etcd value of one key: metadata, ECHConfigList, sealed private key (JSON)."""
    recipient = keys[0].recipient
    assert recipient is not None
    config_list = encode_config_list(k.config for k in keys)
    kek, sealed = sealer.seal(recipient.private_bytes, sealing_context(key_id, config_list))
    document = {
        "format": _FORMAT,
        "key_id": key_id,
        "state": state.value,
        "created": _iso(created),
        "retire_after": _iso(retire_after),
        "kem_id": recipient.kem_id,
        "config_list": base64.b64encode(config_list).decode("ascii"),
        "kek": kek,
        "sealed_key": base64.b64encode(sealed).decode("ascii"),
    }
    return json.dumps(document, sort_keys=True).encode()


def _document(kv: KeyValue) -> dict[str, Any]:
    try:
        document = json.loads(kv.value)
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise KeyStoreError(f"etcd {kv.key.decode('utf-8', 'replace')}: not an echfront key record")
    return document


def _state_of(kv: KeyValue) -> tuple[KeyState, datetime.datetime | None]:
    document = _document(kv)
    try:
        return KeyState(document["state"]), _time(document.get("retire_after"))
    except (KeyError, ValueError):
        raise KeyStoreError(f"etcd {kv.key.decode('utf-8', 'replace')}: bad state") from None


def decode_member(name: str, value: bytes) -> MemberStatus:
    """A member's status from its etcd value; a malformed one counts, with nothing loaded."""
    try:
        data = json.loads(value)
        return MemberStatus(
            name=name,
            loaded=frozenset(str(k) for k in data["loaded"]),
            revision=int(data["revision"]),
            reported=float(data["reported"]),
            info={str(k): str(v) for k, v in data.get("info", {}).items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        # Counted, with nothing loaded: the load barrier waits rather than skip it.
        return MemberStatus(name, frozenset(), 0, 0.0, {"error": f"unreadable: {error}"})


@implementer(IKeyStore)
class EtcdKeyStore:
    """:class:`~echfront.interfaces.IKeyStore` on etcd v3 (see the module docstring).

    :param client: the etcd connection (its settings carry the prefix).
    :param sealer: seals and opens private keys with the local KEK.
    :param clock: an ``IReactorTime`` (creation times, timers).
    """

    log = Logger()

    def __init__(self, client: EtcdClient, sealer: Sealer, clock: Any) -> None:
        """Use ``client``; nothing is sent until asked."""
        self.client = client
        self.sealer = sealer
        self.clock = clock
        self.prefix = client.settings.prefix.encode("utf-8")
        self.keys_prefix = self.prefix + b"keys/"
        self.ids_prefix = self.prefix + b"config-ids/"
        self.members_prefix = self.prefix + b"members/"
        self.watches: set[EtcdWatch] = set()
        self.memberships: set[EtcdMembership] = set()
        self._opened: dict[tuple[bytes, int], StoredKey] = {}

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(int(self.clock.seconds()), datetime.UTC)

    # -- reading ----------------------------------------------------------------------

    def open_key(self, kv: KeyValue) -> StoredKey:
        """The key stored in ``kv``, its private key unsealed (cached by revision).

        :raises KeyStoreError: for a malformed record or one that does not open.
        """
        cached = self._opened.get((kv.key, kv.mod_revision))
        if cached is not None:
            return cached
        where = f"etcd {kv.key.decode('utf-8', 'replace')}"
        document = _document(kv)
        try:
            key_id = str(document["key_id"])
            state = KeyState(document["state"])
            config_list = base64.b64decode(document["config_list"])
            sealed = base64.b64decode(document["sealed_key"])
            private = self.sealer.open(
                str(document["kek"]), sealed, sealing_context(key_id, config_list)
            )
            recipient = RecipientKey(int(document["kem_id"]), private)
            configs = decode_config_list(config_list).configs
            published = state is KeyState.ACTIVE
            stored = StoredKey(
                key_id=key_id,
                keys=tuple(ECHKey(c, recipient, published, f"etcd:{key_id}") for c in configs),
                state=state,
                created=_time(document["created"]) or self._now(),
                retire_after=_time(document.get("retire_after")),
            )
        except SealError as error:
            raise KeyStoreError(f"{where}: {error}") from None
        except (KeyError, ValueError, TypeError, ConfigError) as error:
            raise KeyStoreError(f"{where}: malformed key record ({error})") from None
        if kv.key != self.keys_prefix + key_id.encode():
            raise KeyStoreError(f"{where}: record of another key ({key_id})")
        if len(self._opened) > 64:
            self._opened.clear()
        self._opened[(kv.key, kv.mod_revision)] = stored
        return stored

    def snapshot_of(self, kvs: Mapping[bytes, KeyValue], revision: int) -> StoreSnapshot:
        """The snapshot of the prefix's key-values ``kvs`` at ``revision``.

        :raises KeyStoreError: when a key cannot be opened (never a partial set).
        """
        keys = []
        members = []
        for name in sorted(kvs):
            kv = kvs[name]
            if name.startswith(self.keys_prefix):
                keys.append(self.open_key(kv))
            elif name.startswith(self.members_prefix):
                member = name[len(self.members_prefix) :].decode("utf-8", "replace")
                members.append(decode_member(member, kv.value))
        keys.sort(key=lambda k: (k.created, k.key_id))
        return StoreSnapshot(keys=tuple(keys), members=tuple(members), revision=revision)

    async def read_all(self) -> tuple[dict[bytes, KeyValue], int]:
        """Every key-value under the prefix, and the revision they were read at."""
        kvs, revision = await self.client.range(self.prefix, prefix_end(self.prefix))
        return {kv.key: kv for kv in kvs}, revision

    async def _load(self) -> StoreSnapshot:
        kvs, revision = await self.read_all()
        return self.snapshot_of(kvs, revision)

    def load(self) -> Deferred[StoreSnapshot]:
        """The whole key set and the live members at one revision (see :class:`IKeyStore`)."""
        return Deferred.fromCoroutine(self._load())

    def watch(
        self,
        on_change: Callable[[StoreSnapshot], object],
        on_error: Callable[[str], object] | None = None,
    ) -> IKeyWatch:
        """Follow the prefix (see :meth:`IKeyStore.watch` and :class:`EtcdWatch`)."""
        watch = EtcdWatch(self, on_change, on_error)
        self.watches.add(watch)
        watch.start()
        return watch

    # -- writing ------------------------------------------------------------------------

    def _fence(self, fence: Fence | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The condition for ``fence`` and the read that tells whether it failed."""
        if fence is None:
            return [], []
        key = self.prefix + fence.key.encode("utf-8")
        return [compare_create(key, fence.revision)], [range_op(key)]

    def _check_fence(self, fence: Fence | None, ranges: list[list[KeyValue]]) -> None:
        """Raise :class:`FenceLost` when the fence read (the last range) shows it failed."""
        if fence is None:
            return
        found = ranges[-1] if ranges else []
        if not found or found[0].create_revision != fence.revision:
            raise FenceLost(f"fence {fence.key}@{fence.revision} no longer holds: not the leader")

    async def _add_key(
        self,
        build: Callable[[frozenset[int]], Sequence[ECHKey]],
        state: KeyState,
        created: datetime.datetime | None,
        fence: Fence | None,
    ) -> StoredKey:
        fence_compare, fence_read = self._fence(fence)
        for _attempt in range(_ATTEMPTS):
            claimed, _revision = await self.client.range(
                self.ids_prefix, prefix_end(self.ids_prefix)
            )
            taken = frozenset(int(kv.key[len(self.ids_prefix) :]) for kv in claimed)
            keys = tuple(build(taken))
            ids = check_new_keys(keys, taken)
            when = created or self._now()
            key_id = f"ech-{when.strftime('%Y%m%dT%H%M%SZ')}-{ids[0]:03d}"
            record_key = self.keys_prefix + key_id.encode()
            value = encode_key_record(self.sealer, key_id, keys, state=state, created=when)
            id_keys = [self.ids_prefix + b"%03d" % i for i in ids]
            result = await self.client.txn(
                [compare_create(k, 0) for k in [*id_keys, record_key]] + fence_compare,
                [put_op(k, key_id.encode()) for k in id_keys] + [put_op(record_key, value)],
                [range_op(record_key), *fence_read],
            )
            found = result.ranges()
            # A failed compare may be our own earlier attempt, committed but
            # its answer lost (a timeout, then the retry on another endpoint).
            ours = not result.succeeded and bool(found[0]) and found[0][0].value == value
            if result.succeeded or ours:
                return self.open_key(
                    KeyValue(record_key, value, result.revision, result.revision, 1, 0)
                )
            self._check_fence(fence, found)
        raise KeyStoreError(f"could not claim a config_id in {_ATTEMPTS} attempts (busy writers)")

    def add_key(
        self,
        build: Callable[[frozenset[int]], Sequence[ECHKey]],
        state: KeyState,
        *,
        created: datetime.datetime | None = None,
        fence: Fence | None = None,
    ) -> Deferred[StoredKey]:
        """Add a key, its config_ids claimed by compare-and-swap (see :class:`IKeyStore`)."""
        return Deferred.fromCoroutine(self._add_key(build, state, created, fence))

    async def _change_states(self, changes: Sequence[StateChange], fence: Fence | None) -> bool:
        fence_compare, fence_read = self._fence(fence)
        for _attempt in range(_ATTEMPTS):
            kvs, _revision = await self.client.range(self.keys_prefix, prefix_end(self.keys_prefix))
            by_id = {kv.key[len(self.keys_prefix) :].decode(): kv for kv in kvs}
            current = {key_id: _state_of(kv) for key_id, kv in by_id.items()}
            todo = changes_to_apply(changes, current)
            if todo is None:
                return False
            if not todo:
                return True
            compare = [compare_mod(by_id[c.key_id].key, by_id[c.key_id].mod_revision) for c in todo]
            puts = []
            for change in todo:
                kv = by_id[change.key_id]
                document = _document(kv)
                document["state"] = change.state.value
                document["retire_after"] = _iso(change.retire_after)
                puts.append(put_op(kv.key, json.dumps(document, sort_keys=True).encode()))
            result = await self.client.txn(compare + fence_compare, puts, fence_read)
            if result.succeeded:
                return True
            self._check_fence(fence, result.ranges())
        raise KeyStoreError(f"could not change key states in {_ATTEMPTS} attempts (busy writers)")

    def change_states(
        self, changes: Sequence[StateChange], *, fence: Fence | None = None
    ) -> Deferred[bool]:
        """Apply every change or none, in one transaction (see :class:`IKeyStore`)."""
        return Deferred.fromCoroutine(self._change_states(changes, fence))

    async def _delete_key(self, key_id: str, expected: KeyState, fence: Fence | None) -> bool:
        fence_compare, fence_read = self._fence(fence)
        record_key = self.keys_prefix + key_id.encode()
        for _attempt in range(_ATTEMPTS):
            kvs, _revision = await self.client.range(record_key)
            if not kvs:
                return True
            kv = kvs[0]
            if _state_of(kv)[0] is not expected:
                return False
            try:
                ids = decode_config_list(base64.b64decode(_document(kv)["config_list"])).configs
            except (KeyError, ValueError, ConfigError) as error:
                raise KeyStoreError(f"etcd {key_id}: malformed key record ({error})") from None
            deletes = [delete_op(record_key)]
            deletes += [delete_op(self.ids_prefix + b"%03d" % c.config_id) for c in ids]
            result = await self.client.txn(
                [compare_mod(record_key, kv.mod_revision), *fence_compare], deletes, fence_read
            )
            if result.succeeded:
                return True
            self._check_fence(fence, result.ranges())
        raise KeyStoreError(f"could not delete {key_id} in {_ATTEMPTS} attempts (busy writers)")

    def delete_key(
        self, key_id: str, expected: KeyState, *, fence: Fence | None = None
    ) -> Deferred[bool]:
        """Delete a key in state ``expected`` and free its config_ids (see :class:`IKeyStore`)."""
        return Deferred.fromCoroutine(self._delete_key(key_id, expected, fence))

    # -- members ------------------------------------------------------------------------

    async def _register(self, name: str, ttl: float, info: Mapping[str, str]) -> IMembership:
        try:
            check_member_name(name)
        except ConfigError as error:
            raise KeyStoreError(str(error)) from None
        membership = EtcdMembership(self, name, ttl, info)
        await membership.start()
        self.memberships.add(membership)
        return membership

    def register(
        self, name: str, ttl: float, info: Mapping[str, str] | None = None
    ) -> Deferred[IMembership]:
        """Register under a lease of ``ttl`` seconds, renewed every ``ttl``/3 (see IKeyStore)."""
        return Deferred.fromCoroutine(self._register(name, ttl, info or {}))

    async def _close(self) -> None:
        for watch in list(self.watches):
            await watch.stop()
        for membership in list(self.memberships):
            try:
                await membership.leave()
            except KeyStoreError as error:
                # Unreachable: the lease lapses after its TTL by itself.
                self.log.warn("etcd registration not revoked: {error}", error=str(error))
        await self.client.close()

    def close(self) -> Deferred[None]:
        """Stop watches, leave registrations (revoking their leases), close connections."""
        return Deferred.fromCoroutine(self._close())
