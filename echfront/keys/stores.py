# -*- test-case-name: tests.test_keystore -*-
"""The key directory behind :class:`~echfront.interfaces.IKeyStore`, and what every store shares.

:class:`DirectoryKeyStore` adapts :class:`~echfront.keys.keydir.KeyDirectory`
(one machine; also a Kubernetes Secret volume, which fronts re-read) to
the interface the etcd store (:mod:`echfront.keys.etcdstore`) provides, so
rotation and the fronts speak to either the same way:

* the directory's writer lock is its compare-and-swap: config_ids are
  chosen and claimed under it, so writers on one machine never share one;
* a watch polls the directory (every 0.5 s by default) and delivers a new
  snapshot when a key or metadata file changed, or a member joined, left,
  expired or reported another key set;
* members register as files under ``.members/`` with an expiry that a
  timer renews (every ttl/3 seconds); an expired file no longer counts.

There is no election on one machine, so writes take no fence.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

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
from echfront.keys.keydir import KeyDirectory, KeyRecord, KeyState
from echfront.keys.keyfile import read_key_file

__all__ = [
    "DirectoryKeyStore",
    "FenceLost",
    "KeyStoreError",
    "changes_to_apply",
    "check_member_name",
    "check_new_keys",
]

_MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class KeyStoreError(Exception):
    """A key store could not do what was asked; the message is one line for the operator."""


class FenceLost(KeyStoreError):
    """A write was refused because its :class:`~echfront.interfaces.Fence` no longer holds."""


def check_member_name(name: str) -> str:
    """``name`` if it is a valid member name (letters, digits, ``.``, ``_``, ``-``; 1-63).

    :raises ConfigError: otherwise.
    """
    if not _MEMBER_NAME.fullmatch(name):
        raise ConfigError(f"member name {name!r}: use 1-63 letters, digits, '.', '_' or '-'")
    return name


def check_new_keys(keys: Sequence[ECHKey], taken: frozenset[int]) -> tuple[int, ...]:
    """The config_ids of keys a ``build`` callback made, checked.

    :raises KeyStoreError: no keys, no private key or several, or a
        config_id that is repeated or already taken.
    """
    if not keys:
        raise KeyStoreError("a new key needs at least one ECHConfig")
    recipient = keys[0].recipient
    if recipient is None or any(k.recipient is not recipient for k in keys):
        raise KeyStoreError("a new key is one private key with its configs")
    ids = tuple(k.config_id for k in keys)
    if len(set(ids)) != len(ids) or taken.intersection(ids):
        raise KeyStoreError(f"config_ids {ids} repeat or are already in use")
    return ids


def changes_to_apply(
    changes: Sequence[StateChange],
    current: Mapping[str, tuple[KeyState, datetime.datetime | None]],
) -> list[StateChange] | None:
    """Which of ``changes`` still have to be made; None when one cannot be made.

    A change is done when its key is already in the new state with the new
    ``retire_after`` (a retry), to do when its key is in the expected
    state, and impossible otherwise (the key is gone or elsewhere).
    """
    todo = []
    for change in changes:
        found = current.get(change.key_id)
        if found == (change.state, change.retire_after):
            continue
        if found is None or found[0] is not change.expected:
            return None
        todo.append(change)
    return todo


@implementer(IKeyWatch)
class _DirectoryWatch:
    """Polls the directory and delivers a snapshot when anything changed."""

    log = Logger()

    def __init__(
        self,
        store: DirectoryKeyStore,
        on_change: Callable[[StoreSnapshot], object],
        on_error: Callable[[str], object] | None,
        interval: float,
    ) -> None:
        self.store = store
        self.on_change = on_change
        self.on_error = on_error
        self.connected = False
        self.revision = 0
        self._seen: object = None
        self._loop = LoopingCall(self.poll)
        self._loop.clock = store.clock
        self._loop.start(interval, now=True)

    def poll(self) -> None:
        """Deliver a snapshot if the directory differs from the last one delivered."""
        try:
            members = self.store.live_members()
            seen = (self.store.fingerprint(), [(m.name, m.loaded, m.revision) for m in members])
            if seen == self._seen:
                return
            snapshot = self.store.snapshot(members)
        except KeyStoreError as error:
            self.connected = False
            if self.on_error is not None:
                self.on_error(str(error))
            return
        self.connected = True
        self._seen = seen
        try:
            self.on_change(snapshot)
        except Exception:  # the consumer's bug must not stop the watch
            self.log.failure("key store watch callback failed")

    def stop(self) -> Deferred[None]:
        """Stop polling."""
        if self._loop.running:
            self._loop.stop()
        self.store.watches.discard(self)
        return succeed(None)


@implementer(IMembership)
class _FileMembership:
    """A member file under ``.members/``, renewed by a timer."""

    def __init__(
        self, store: DirectoryKeyStore, name: str, ttl: float, info: Mapping[str, str]
    ) -> None:
        self.store = store
        self.name = name
        self.ttl = ttl
        self.info = dict(info)
        self.loaded: frozenset[str] = frozenset()
        self.revision = 0
        self.path = store.members_path / f"{name}.json"
        self._loop = LoopingCall(self._write)
        self._loop.clock = store.clock

        self.reported = float(store.clock.seconds())

    def start(self) -> None:
        self._write()
        self._loop.start(self.ttl / 3, now=False)

    def _write(self) -> None:
        document = {
            "name": self.name,
            "loaded": sorted(self.loaded),
            "revision": self.revision,
            "reported": self.reported,
            "expires": float(self.store.clock.seconds()) + self.ttl,
            "info": self.info,
        }
        try:
            _write_atomically(self.path, json.dumps(document).encode())
        except OSError as error:
            raise KeyStoreError(f"{self.path}: cannot write ({error.strerror})") from None

    def report(self, loaded: Iterable[str], revision: int) -> Deferred[None]:
        """Write what this member has loaded."""
        self.loaded = frozenset(loaded)
        self.revision = revision
        self.reported = float(self.store.clock.seconds())
        try:
            self._write()
        except KeyStoreError:
            return fail()
        return succeed(None)

    def leave(self) -> Deferred[None]:
        """Stop renewing and remove the file."""
        if self._loop.running:
            self._loop.stop()
        self.path.unlink(missing_ok=True)
        self.store.memberships.discard(self)
        return succeed(None)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".member-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except OSError:
        Path(temp).unlink(missing_ok=True)
        raise


@implementer(IKeyStore)
class DirectoryKeyStore:
    """:class:`~echfront.interfaces.IKeyStore` over a key directory (see the module docstring).

    :param clock: an ``IReactorTime`` (polling, member expiry).
    :param poll_interval: seconds between two looks at the directory.
    """

    def __init__(self, directory: KeyDirectory, clock: Any, *, poll_interval: float = 0.5) -> None:
        """Serve ``directory``; nothing is read until asked."""
        self.directory = directory
        self.clock = clock
        self.poll_interval = poll_interval
        self.members_path = directory.path / ".members"
        self.watches: set[_DirectoryWatch] = set()
        self.memberships: set[_FileMembership] = set()

    # -- reading ----------------------------------------------------------------------

    def _stored(self, record: KeyRecord) -> StoredKey:
        published = record.state is KeyState.ACTIVE
        return StoredKey(
            key_id=record.stem,
            keys=tuple(read_key_file(record.pem, published=published)),
            state=record.state,
            created=record.created,
            retire_after=record.retire_after,
        )

    def live_members(self) -> tuple[MemberStatus, ...]:
        """Members whose registration has not expired, by name."""
        now = float(self.clock.seconds())
        found = []
        for path in sorted(self.members_path.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                if float(data["expires"]) <= now:
                    continue
                found.append(
                    MemberStatus(
                        name=str(data["name"]),
                        loaded=frozenset(str(k) for k in data["loaded"]),
                        revision=int(data["revision"]),
                        reported=float(data["reported"]),
                        info={str(k): str(v) for k, v in data.get("info", {}).items()},
                    )
                )
            except FileNotFoundError:
                continue  # left between the listing and the read
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                # Counted, with nothing loaded: the load barrier waits rather than skip it.
                found.append(MemberStatus(path.stem, frozenset(), 0, 0.0, {"error": str(error)}))
        return tuple(found)

    def snapshot(self, members: tuple[MemberStatus, ...] | None = None) -> StoreSnapshot:
        """The directory's keys and live members (or ``members``) now.

        :raises KeyStoreError: for an unreadable key or metadata file.
        """
        try:
            keys = tuple(self._stored(record) for record in self.directory.records())
        except ConfigError as error:
            raise KeyStoreError(str(error)) from None
        if members is None:
            members = self.live_members()
        return StoreSnapshot(keys=keys, members=members, revision=0)

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """What changes when a key or metadata file changes: names, sizes, mtimes."""
        try:
            entries = sorted(os.scandir(self.directory.path), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError as error:
            raise KeyStoreError(f"{self.directory.path}: cannot list ({error.strerror})") from None
        found = []
        for entry in entries:
            if entry.name.endswith((".pem", ".json")):
                try:
                    info = entry.stat()
                except FileNotFoundError:
                    continue
                found.append((entry.name, info.st_size, info.st_mtime_ns))
        return found

    def load(self) -> Deferred[StoreSnapshot]:
        """The whole key set and the live members (see :meth:`IKeyStore.load`)."""
        try:
            return succeed(self.snapshot())
        except KeyStoreError:
            return fail()

    def watch(
        self,
        on_change: Callable[[StoreSnapshot], object],
        on_error: Callable[[str], object] | None = None,
    ) -> IKeyWatch:
        """Poll the directory (see :meth:`IKeyStore.watch`)."""
        watch = _DirectoryWatch(self, on_change, on_error, self.poll_interval)
        self.watches.add(watch)
        return watch

    # -- writing (under the directory's lock) -------------------------------------------------

    def _no_fence(self, fence: Fence | None) -> None:
        if fence is not None:
            raise KeyStoreError("a key directory has one writer at a time; it takes no fence")

    def add_key(
        self,
        build: Callable[[frozenset[int]], Sequence[ECHKey]],
        state: KeyState,
        *,
        created: datetime.datetime | None = None,
        fence: Fence | None = None,
    ) -> Deferred[StoredKey]:
        """Add a key with config_ids chosen under the directory's lock."""
        try:
            self._no_fence(fence)
            with self.directory.locked():
                taken = frozenset(self.directory.taken_ids())
                keys = build(taken)
                check_new_keys(keys, taken)
                record = self.directory.add(keys, state, created)
            return succeed(self._stored(record))
        except ConfigError as error:
            return fail(KeyStoreError(str(error)))
        except KeyStoreError:
            return fail()

    def change_states(
        self, changes: Sequence[StateChange], *, fence: Fence | None = None
    ) -> Deferred[bool]:
        """Apply every change or none (see :meth:`IKeyStore.change_states`).

        Atomic for writers (the lock); a front reading the directory in the
        middle may see some metadata files changed and not others, as with
        the rotation that drives the directory today.
        """
        try:
            self._no_fence(fence)
            with self.directory.locked():
                records = {r.stem: r for r in self.directory.records()}
                current = {stem: (r.state, r.retire_after) for stem, r in records.items()}
                todo = changes_to_apply(changes, current)
                if todo is None:
                    return succeed(False)
                for change in todo:
                    self.directory.update(records[change.key_id], change.state, change.retire_after)
            return succeed(True)
        except ConfigError as error:
            return fail(KeyStoreError(str(error)))
        except KeyStoreError:
            return fail()

    def delete_key(
        self, key_id: str, expected: KeyState, *, fence: Fence | None = None
    ) -> Deferred[bool]:
        """Delete a key in state ``expected`` (see :meth:`IKeyStore.delete_key`)."""
        try:
            self._no_fence(fence)
            with self.directory.locked():
                found = [r for r in self.directory.records() if r.stem == key_id]
                if found and found[0].state is not expected:
                    return succeed(False)
                if found:
                    self.directory.delete(found[0])
            return succeed(True)
        except ConfigError as error:
            return fail(KeyStoreError(str(error)))
        except KeyStoreError:
            return fail()

    # -- members ------------------------------------------------------------------------

    def register(
        self, name: str, ttl: float, info: Mapping[str, str] | None = None
    ) -> Deferred[IMembership]:
        """Register as member ``name`` with a file renewed every ``ttl``/3 seconds."""
        try:
            membership = _FileMembership(self, check_member_name(name), ttl, info or {})
            membership.start()
        except ConfigError as error:
            return fail(KeyStoreError(str(error)))
        except KeyStoreError:
            return fail()
        self.memberships.add(membership)
        return succeed(membership)

    def close(self) -> Deferred[None]:
        """Stop every watch and leave every registration."""
        for watch in list(self.watches):
            watch.stop()
        for membership in list(self.memberships):
            membership.leave()
        return succeed(None)
