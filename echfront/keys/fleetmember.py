# -*- test-case-name: tests.test_fleet_units -*-
"""A front's part in a fleet: register, follow the key store, put each key set into service.

:class:`FleetMember` is a service that

1. registers the front as a member of the fleet (its lease renewed by the
   store; the load barrier counts it from now on, with nothing loaded);
2. watches the store; the watch's first snapshot is the whole key set, read
   at one revision.  Each snapshot whose keys differ from those in service
   goes to ``apply`` (the front swaps its key set in, as a reload does);
   then, and only then, the member reports the key ids it has loaded;
3. calls ``ready`` once the first key set is in service: the front listens
   only from then on, so it never serves with an empty or partial set
   because the store was away.  Until then each failed attempt is logged
   (one line, at most every 10 seconds) and retried.

While the store cannot be reached the front keeps serving the keys it has
(never dropping keys because the store is away); once the watch has been
cut off for :data:`UNAVAILABLE_AFTER` seconds (longer than moving to
another etcd member takes) the log says so, once, and again when the store
is back.  A report that could not be sent is sent again until it lands.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from echfront.interfaces import IKeyStore, IKeyWatch, IMembership, StoreSnapshot
from echfront.keys.stores import KeyStoreError

__all__ = ["UNAVAILABLE_AFTER", "FleetMember", "key_set_signature"]

#: Seconds without the store before a front says it is unavailable.
UNAVAILABLE_AFTER = 2.0
#: Seconds between two log lines about the same start-up problem.
_QUIET = 10.0


def key_set_signature(snapshot: StoreSnapshot) -> tuple[tuple[str, str, object], ...]:
    """What a front serves from a snapshot: each key's id, state and retirement time."""
    return tuple((k.key_id, k.state.value, k.retire_after) for k in snapshot.keys)


class FleetMember(Service):
    """Membership, watch and key-set hand-over of one front (see the module docstring).

    :param apply: puts a snapshot's keys into service; False when it could
        not (the previous keys stay, nothing is reported).
    :param ready: called once with the membership, after the first key set
        is in service.
    :param changed: called after every snapshot (the leader steps on it).
    :param retry: seconds between start-up attempts and report retries.
    """

    log = Logger()

    def __init__(
        self,
        store: IKeyStore,
        name: str,
        ttl: float,
        info: Mapping[str, str],
        clock: Any,
        *,
        apply: Callable[[StoreSnapshot], bool],
        ready: Callable[[IMembership], object],
        changed: Callable[[StoreSnapshot], object] = lambda snapshot: None,
        retry: float = 1.0,
    ) -> None:
        """Prepare; nothing is sent until the service starts."""
        self.store = store
        self.member = name
        self.ttl = ttl
        self.info = dict(info)
        self.clock = clock
        self.apply = apply
        self.ready = ready
        self.changed = changed
        self.retry = retry
        self.membership: IMembership | None = None
        self.watch: IKeyWatch | None = None
        self.snapshot: StoreSnapshot | None = None
        #: The key set in service: its signature, ids and store revision.
        self.signature: object = None
        self.loaded: frozenset[str] = frozenset()
        self.revision = 0
        self.is_ready = False
        self.unreachable: str | None = None
        self._failing: tuple[float, str] | None = None
        self._reported: tuple[frozenset[str], int] | None = None
        self._reporting = False
        self._last_complaint = -_QUIET
        self._starting: Deferred[None] | None = None
        self._sleep: Deferred[None] | None = None
        self._loop: LoopingCall | None = None

    # -- start and stop ----------------------------------------------------------------

    def startService(self) -> None:
        """Register and start following the store (in the background)."""
        super().startService()  # type: ignore[no-untyped-call]
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(lambda failure: self.log.failure("fleet member failed", failure))
        self._loop = LoopingCall(self._check)
        self._loop.clock = self.clock
        self._loop.start(self.retry, now=False)

    async def _start(self) -> None:
        while self.running and self.membership is None:
            try:
                self.membership = await self.store.register(self.member, self.ttl, self.info)
            except KeyStoreError as error:
                self._complain(f"cannot register member {self.member} in the key store: {error}")
                self._sleep = deferLater(self.clock, self.retry)
                try:
                    await self._sleep
                except CancelledError:
                    return
                finally:
                    self._sleep = None
        if self.running:
            self.watch = self.store.watch(self._changed, self._error)

    def stopService(self) -> Deferred[None] | None:
        """Stop watching and leave the fleet (the registration is removed at once)."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._sleep is not None:
            self._sleep.cancel()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.watch is not None:
            await self.watch.stop()
        if self.membership is not None:
            try:
                await self.membership.leave()
            except KeyStoreError as error:
                self.log.warn(
                    "fleet registration not removed ({error}); it lapses by itself",
                    error=str(error),
                )

    # -- following the store ------------------------------------------------------------

    def _complain(self, reason: str) -> None:
        """Log a start-up problem, at most every few seconds."""
        now = float(self.clock.seconds())
        if now - self._last_complaint >= _QUIET:
            self._last_complaint = now
            self.log.error("not listening yet: {reason}; retrying", reason=reason)

    def _error(self, reason: str) -> None:
        """The watch lost the store (or could not open a key): keep serving what we have."""
        if not self.is_ready:
            self._complain(f"no key set from the key store yet: {reason}")
            return
        since = self._failing[0] if self._failing is not None else float(self.clock.seconds())
        self._failing = (since, reason)

    def _changed(self, snapshot: StoreSnapshot) -> None:
        """A snapshot from the watch: put its keys into service when they changed."""
        self.snapshot = snapshot
        self._back()
        signature = key_set_signature(snapshot)
        if signature != self.signature:
            if not self.apply(snapshot):
                return
            self.signature = signature
            self.loaded = snapshot.key_ids
            self.revision = snapshot.revision
            self._report()
        if not self.is_ready:
            self.is_ready = True
            if not snapshot.keys:
                self.log.warn("the fleet's key store holds no keys yet: serving without ECH keys")
            assert self.membership is not None
            self.ready(self.membership)
        self.changed(snapshot)

    def _back(self) -> None:
        self._failing = None
        if self.unreachable is not None:
            self.unreachable = None
            self.log.info("key store reachable again")

    def _check(self) -> None:
        """Every ``retry`` seconds: say whether the store is away; send a report that failed."""
        if self.watch is not None and self.watch.connected:
            self._back()
        elif self._failing is not None and self.unreachable is None:
            since, reason = self._failing
            if float(self.clock.seconds()) - since >= UNAVAILABLE_AFTER:
                self.log.error(
                    "key store unavailable: {reason}; serving the last key set "
                    "({count} keys) until it is back",
                    reason=reason,
                    count=len(self.loaded),
                )
                self.unreachable = reason
        if self._reported != (self.loaded, self.revision) and self.is_ready:
            self._report()

    @property
    def connected(self) -> bool:
        """Whether the watch follows the store now."""
        return bool(self.watch is not None and self.watch.connected)

    def _report(self) -> None:
        """Report the key set in service (one report at a time; the latest wins)."""
        if self._reporting or self.membership is None:
            return
        self._reporting = True
        loaded, revision = self.loaded, self.revision
        reporting = self.membership.report(loaded, revision)

        def sent(result: object) -> None:
            self._reported = (loaded, revision)

        def failed(failure: Any) -> None:
            if failure.check(KeyStoreError) is None:
                self.log.failure("fleet report failed", failure)

        def done(result: object) -> None:
            self._reporting = False
            # A newer key set arrived while this report was on its way: send
            # it now.  After a failure, the next check retries instead.
            landed = self._reported == (loaded, revision)
            if landed and self._reported != (self.loaded, self.revision) and self.running:
                self._report()

        reporting.addCallbacks(sent, failed)
        reporting.addBoth(done)
