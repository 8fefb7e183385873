# -*- test-case-name: tests.test_fleet -*-
"""The fleet's leader candidate: campaign, and step the rotation while leading.

:class:`FleetLeader` is the service every front with ``[keys] rotate`` runs
in a fleet.  It asks its :class:`~echfront.keys.fleet.Coordinator` for the
leadership at every check and, while it holds it, runs one
:meth:`~echfront.keys.fleet.FleetRotation.step`.  A front that loses the
leadership (its fence or its lease) stops at once; a store that cannot be
reached pauses the rotation until it is back.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from echfront.keys.fleet import FleetRotation
from echfront.keys.stores import FenceLost, KeyStoreError

__all__ = ["FleetLeader"]


class FleetLeader(Service):
    """Campaigns for the leadership and, while leading, steps the rotation.

    A step runs every ``check_interval`` seconds and whenever :meth:`kick`
    is called (the store changed: a member reported, say), never two at once.
    A step that could not reach the store is retried after a second; when
    that fails too, the rotation is paused, said once in the log, and it
    resumes by itself (one failed request while etcd changes its leader or
    a member restarts is not worth a line).
    """

    log = Logger()

    def __init__(self, rotation: FleetRotation, clock: Any, check_interval: float) -> None:
        """Step ``rotation``; nothing runs until the service starts."""
        self.rotation = rotation
        self.clock = clock
        self.check_interval = check_interval
        self.leading = False
        self.paused: str | None = None
        self._failures = 0
        self._retry: Any = None
        self._loop: LoopingCall | None = None
        self._step: Deferred[None] | None = None
        self._again = False

    def startService(self) -> None:
        """Step now, then every ``check_interval`` seconds."""
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.kick)
        self._loop.clock = self.clock
        self._loop.start(self.check_interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        """Stop stepping; a step in progress finishes, then the leadership is given up."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        done: Deferred[None] = Deferred.fromCoroutine(self._resign())
        return done

    async def _resign(self) -> None:
        if self._step is not None:
            await self._step
        if self.leading:
            self.leading = False
            try:
                await self.rotation.coordinator.resign()
            except KeyStoreError as error:
                self.log.warn("could not resign the leadership: {error}", error=str(error))

    def kick(self) -> None:
        """Step now, or right after the step under way."""
        if not self.running:
            return
        if self._step is not None:
            self._again = True
            return
        self._again = False
        step = Deferred.fromCoroutine(self._tick())
        step.addErrback(lambda failure: self.log.failure("fleet rotation step failed", failure))
        if step.called:
            return
        self._step = step

        def done(result: None) -> None:
            self._step = None
            if self._again:
                self.kick()

        step.addCallback(done)

    async def _tick(self) -> None:
        try:
            fence = await self.rotation.coordinator.campaign()
            if fence is None:
                if self.leading:
                    self.log.warn("no longer leading the fleet's key rotation")
                self.leading = False
            else:
                if not self.leading:
                    self.log.info("leading the fleet's key rotation")
                    self.rotation.last = None  # read what the previous leader left
                self.leading = True
                await self.rotation.step(fence)
        except FenceLost as error:
            self.log.warn("stopped leading the fleet's key rotation: {error}", error=str(error))
            self.leading = False
            return
        except KeyStoreError as error:
            self._failures += 1
            if self._failures == 1:
                self._retry = self.clock.callLater(min(1.0, self.check_interval), self.kick)
            elif self.paused is None:
                self.log.error(
                    "key rotation paused, the key store cannot be reached: {error}; "
                    "fronts keep serving their keys",
                    error=str(error),
                )
                self.paused = str(error)
            return
        self._failures = 0
        if self.paused is not None:
            self.log.info("key store reachable again; key rotation resumed")
            self.paused = None
