# -*- test-case-name: tests.test_etcd -*-
"""Following an etcd key store, and a front's registration in it.

:class:`EtcdWatch` keeps a copy of every key-value under the store's
prefix: it reads them all (one linearizable range), then watches from the
next revision and applies each event batch, handing the consumer a full
snapshot after every batch (a transaction's events arrive in one batch).
When the stream breaks (member stopped, connection cut, member lost its
leader) or etcd cancels it because the revision to resume from was
compacted away (``compact_revision``, etcd's ErrCompacted), it reads
everything again and delivers a snapshot only if something differs, then
watches from there: a full resync, never a guess at what was missed.
Retries back off from 0.1 s to 2 s and go to the next endpoint.

:class:`EtcdMembership` is a front's entry under ``members/``, attached to
a lease of ``ttl`` seconds and renewed every ``ttl``/3 seconds; a front
that stops renewing (crash, partition) drops out when the lease expires.
When a renewal finds the lease gone (the front was cut off longer than the
TTL), it takes a new lease and writes its last report again.  It keeps
:attr:`EtcdMembership.expires`, the earliest time etcd may let the lease
expire (when the last successful grant or renewal was *sent*, plus the TTL
etcd answered), so a leader elected on that lease knows, from its own
clock, when it must stop acting (:mod:`echfront.keys.etcdfleet`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

from echfront.interfaces import IKeyWatch, IMembership, StoreSnapshot
from echfront.keys.etcd import EtcdClient
from echfront.keys.etcdapi import EtcdError, EtcdUnavailable, KeyValue, prefix_end
from echfront.keys.stores import KeyStoreError

__all__ = ["EtcdMembership", "EtcdWatch", "WatchSource"]

_FIRST_DELAY = 0.1
_LONGEST_DELAY = 2.0


class WatchSource(Protocol):
    """What a watch and a membership need from their store (EtcdKeyStore provides it)."""

    client: EtcdClient
    clock: Any
    prefix: bytes
    members_prefix: bytes
    watches: set[EtcdWatch]
    memberships: set[EtcdMembership]

    async def read_all(self) -> tuple[dict[bytes, KeyValue], int]:
        """Every key-value under the prefix and the revision read at."""

    def snapshot_of(self, kvs: Mapping[bytes, KeyValue], revision: int) -> StoreSnapshot:
        """The snapshot of ``kvs``."""


class _Resync(EtcdError):
    """The stream cannot go on (compacted, cancelled); read everything again."""


@implementer(IKeyWatch)
class EtcdWatch:
    """A running watch of an etcd key store (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        source: WatchSource,
        on_change: Callable[[StoreSnapshot], object],
        on_error: Callable[[str], object] | None,
    ) -> None:
        """Prepare; :meth:`start` begins."""
        self.source = source
        self.on_change = on_change
        self.on_error = on_error
        self.connected = False
        self.revision = 0
        self.resyncs = 0
        self._kvs: dict[bytes, KeyValue] | None = None
        self._stream: Any = None
        self._sleep: Deferred[None] | None = None
        self._stopped = False
        self._running: Deferred[None] | None = None

    def stopped(self) -> bool:
        """Whether :meth:`stop` was called (a call, not an attribute: it changes across awaits)."""
        return self._stopped

    def start(self) -> None:
        """Read everything and start following."""
        self._running = Deferred.fromCoroutine(self._run())
        self._running.addErrback(lambda failure: self.log.failure("etcd watch failed", failure))

    async def _run(self) -> None:
        delay = _FIRST_DELAY
        while not self._stopped:
            try:
                await self._resync()
                delay = _FIRST_DELAY
                if self.stopped():
                    break
                prefix = self.source.prefix
                self._stream = await self.source.client.watch(
                    prefix, prefix_end(prefix), self.revision + 1, self._message
                )
                if self.stopped():
                    self._stream.stop()
                self.connected = True
                await self._stream.done
                reason = f"etcd watch stream from {self._stream.endpoint} ended"
            except KeyStoreError as error:
                reason = str(error)
            finally:
                self.connected = False
                self._stream = None
            if self.stopped():
                break
            if self.on_error is not None:
                self.on_error(reason)
            self._sleep = deferLater(self.source.clock, delay)
            try:
                await self._sleep
            except CancelledError:
                break
            finally:
                self._sleep = None
            delay = min(delay * 2, _LONGEST_DELAY)

    async def _resync(self) -> None:
        """Read everything; deliver a snapshot when it differs from the last one."""
        kvs, revision = await self.source.read_all()
        self.resyncs += 1
        previous = self._kvs
        self._kvs = kvs
        self.revision = revision
        if previous is None or _versions(previous) != _versions(kvs):
            self._deliver()

    def _message(self, result: Mapping[str, Any]) -> None:
        """Apply one watch response (raising :class:`_Resync` ends the stream)."""
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            raise _Resync(f"etcd history compacted up to revision {compacted}; resynchronising")
        if result.get("canceled"):
            reason = result.get("cancel_reason") or "no reason given"
            raise _Resync(f"etcd cancelled the watch ({reason}); resynchronising")
        revision = int(result.get("header", {}).get("revision", 0))
        events = result.get("events", [])
        if not events or self._kvs is None:
            self.revision = max(self.revision, revision)
            return
        for event in events:
            kv = KeyValue.from_json(event.get("kv", {}))
            if event.get("type") == "DELETE":
                self._kvs.pop(kv.key, None)
            else:
                self._kvs[kv.key] = kv
            revision = max(revision, kv.mod_revision)
        self.revision = revision
        self._deliver()

    def _deliver(self) -> None:
        if self._stopped or self._kvs is None:
            return
        try:
            snapshot = self.source.snapshot_of(self._kvs, self.revision)
        except KeyStoreError as error:
            # Keep serving the last good set; the next change is tried afresh.
            if self.on_error is not None:
                self.on_error(str(error))
            return
        try:
            self.on_change(snapshot)
        except Exception:  # the consumer's bug must not stop the watch
            self.log.failure("key store watch callback failed")

    def stop(self) -> Deferred[None]:
        """Stop watching; fires once the stream is closed."""
        self._stopped = True
        self.source.watches.discard(self)
        if self._stream is not None:
            self._stream.stop()
        if self._sleep is not None:
            self._sleep.cancel()
        running = self._running
        if running is None or running.called:
            return succeed(None)
        done: Deferred[None] = Deferred()
        running.addBoth(lambda result: done.callback(None))
        return done


def _versions(kvs: Mapping[bytes, KeyValue]) -> dict[bytes, int]:
    return {key: kv.mod_revision for key, kv in kvs.items()}


@implementer(IMembership)
class EtcdMembership:
    """A front's entry under ``members/``, on a lease it renews (see the module docstring)."""

    log = Logger()

    def __init__(self, source: WatchSource, name: str, ttl: float, info: Mapping[str, str]) -> None:
        """Prepare; :meth:`start` registers."""
        self.source = source
        self.name = name
        self.ttl = max(1, math.ceil(ttl))
        self.info = dict(info)
        self.key = source.members_prefix + name.encode("utf-8")
        self.lease = 0
        self.loaded: frozenset[str] = frozenset()
        self.revision = 0
        self.reported = float(source.clock.seconds())
        #: The earliest time (clock seconds) etcd may expire :attr:`lease`.
        self.expires = 0.0
        self._loop = LoopingCall(self._renew)
        self._loop.clock = source.clock
        self._renewing: Deferred[bool] | None = None

    def _value(self) -> bytes:
        document = {
            "name": self.name,
            "loaded": sorted(self.loaded),
            "revision": self.revision,
            "reported": self.reported,
            "info": self.info,
        }
        return json.dumps(document, sort_keys=True).encode()

    async def _write(self) -> None:
        """Put the entry on the lease, taking a new lease when it is gone."""
        client = self.source.client
        if not self.lease:
            await self._grant()
        try:
            await client.put(self.key, self._value(), self.lease)
        except EtcdError as error:
            if "lease not found" not in str(error):
                raise
            await self._grant()
            await client.put(self.key, self._value(), self.lease)

    async def _grant(self) -> None:
        sent = float(self.source.clock.seconds())
        self.lease = await self.source.client.grant(self.ttl)
        self.expires = sent + self.ttl

    async def start(self) -> None:
        """Register and start renewing."""
        await self._write()
        self._loop.start(self.ttl / 3, now=False)

    def _renew(self) -> None:
        # The timer's call: never waits, so a slow answer does not stop the loop.
        if self._renewing is None:
            self.renew()

    def renew(self) -> Deferred[bool]:
        """Renew the lease now (or join the renewal under way); True when it was renewed.

        A leader calls this before an action that must finish while it
        holds its lease (a DNS publication), to start from a full TTL.
        """
        renewing = self._renewing
        if renewing is None:
            started = Deferred.fromCoroutine(self._keepalive())
            if started.called:
                return started
            self._renewing = started

            def done(result: bool) -> bool:
                self._renewing = None
                return result

            started.addCallback(done)
            return started
        joined: Deferred[bool] = Deferred()

        def pass_on(result: bool) -> bool:
            joined.callback(result)
            return result

        renewing.addCallback(pass_on)
        return joined

    async def _keepalive(self) -> bool:
        sent = float(self.source.clock.seconds())
        lease = self.lease
        try:
            remaining = await self.source.client.keepalive(lease)
            if remaining <= 0:
                self.log.warn(
                    "etcd registration of {name} had lapsed; registering again", name=self.name
                )
                self.lease = 0
                await self._write()
                return False
            if self.lease == lease:
                self.expires = max(self.expires, sent + remaining)
            return True
        except EtcdUnavailable as error:
            self.log.warn(
                "etcd registration of {name} not renewed: {error}", name=self.name, error=str(error)
            )
        except KeyStoreError as error:
            self.log.error(
                "etcd registration of {name} failed: {error}", name=self.name, error=str(error)
            )
        return False

    async def _report(self, loaded: Iterable[str], revision: int) -> None:
        self.loaded = frozenset(loaded)
        self.revision = revision
        self.reported = float(self.source.clock.seconds())
        await self._write()

    def report(self, loaded: Iterable[str], revision: int) -> Deferred[None]:
        """Say which keys this member has in service (see :class:`IMembership`)."""
        return Deferred.fromCoroutine(self._report(loaded, revision))

    async def _leave(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self.source.memberships.discard(self)
        if self.lease:
            lease, self.lease = self.lease, 0
            await self.source.client.revoke(lease)

    def leave(self) -> Deferred[None]:
        """Stop renewing and revoke the lease, removing the entry now."""
        return Deferred.fromCoroutine(self._leave())
