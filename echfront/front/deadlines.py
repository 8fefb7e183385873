# -*- test-case-name: tests.test_engine -*-
"""Coarse deadlines for many connections from one reactor timer.

A ``DelayedCall`` per connection deadline (first flight, handshake,
backend connect, close) costs an object, a heap insertion and, when it is
cancelled a few milliseconds later, the reactor's bookkeeping of
cancellations.  The lean engine (:mod:`echfront.front.engine`) gives its
connections a :class:`DeadlineClock` instead: long deadlines are entries
in one heap, checked by one reactor timer every
:attr:`DeadlineClock.RESOLUTION` seconds while any is pending, and
cancelling one sets a flag.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

__all__ = ["Deadline", "DeadlineClock"]

_log = Logger(namespace="echfront.engine")


class Deadline:
    """A coarse deadline (the ``IDelayedCall`` calls connections use)."""

    __slots__ = ("_clock", "args", "func", "kwargs", "state", "time")

    def __init__(
        self,
        clock: DeadlineClock,
        when: float,
        func: Callable[..., object],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Due at ``when`` (the reactor's seconds)."""
        self._clock = clock
        self.time = when
        self.func = func
        self.args = args
        self.kwargs = kwargs
        #: "pending", "cancelled" or "called".
        self.state = "pending"

    def getTime(self) -> float:
        """When it is due."""
        return self.time

    def active(self) -> bool:
        """Whether it has neither run nor been cancelled."""
        return self.state == "pending"

    def _check_pending(self) -> None:
        if self.state == "cancelled":
            raise AlreadyCancelled(self)
        if self.state == "called":
            raise AlreadyCalled(self)

    def cancel(self) -> None:
        """Never run it (its queue entry is skipped when its time comes)."""
        if self.state != "pending":  # tested here: every connection cancels one
            self._check_pending()
        self.state = "cancelled"
        self.func = _nothing
        self.args = ()
        self.kwargs = {}
        self._clock.dropped()

    def reset(self, seconds_from_now: float) -> None:
        """Make it due ``seconds_from_now``."""
        if self.state != "pending":
            self._check_pending()
        self.time = self._clock.seconds() + seconds_from_now
        self._clock.requeue(self)

    def delay(self, seconds_later: float) -> None:
        """Make it due ``seconds_later`` than now planned."""
        self._check_pending()
        self.time += seconds_later
        self._clock.requeue(self)


def _nothing() -> None:
    """What a cancelled deadline holds instead of its call."""


@implementer(IReactorTime)
class DeadlineClock:
    """Coarse deadlines for many connections from one reactor timer.

    ``callLater`` with a delay of :attr:`COARSE` seconds or more (the first
    flight, handshake, connect and close deadlines) queues a
    :class:`Deadline` in a heap; one reactor timer, running every
    :attr:`RESOLUTION` seconds while a deadline is pending, runs those due.
    A deadline runs up to :attr:`RESOLUTION` late, never early; cancelling
    one costs a flag (its heap entry is skipped, and dropped in bulk once
    stale entries outnumber the live ones).  With no deadline pending no
    timer runs.  Shorter delays go to the reactor unchanged.

    :param reactor: the real reactor (its time, and the one timer).
    """

    COARSE = 1.0
    RESOLUTION = 0.1

    def __init__(self, reactor: IReactorTime) -> None:
        """Queue nothing yet."""
        self.reactor = reactor
        self._heap: list[tuple[float, int, Deadline]] = []
        self._sequence = 0
        #: Deadlines neither run nor cancelled.
        self._live = 0
        self._timer: IDelayedCall | None = None
        #: Called after the due deadlines of a tick have run (the engine's
        #: deferred work).
        self.after_tick: Callable[[], object] = _nothing

    def seconds(self) -> float:
        """The reactor's time."""
        return self.reactor.seconds()

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        """The reactor's delayed calls (deadlines are not among them)."""
        return self.reactor.getDelayedCalls()

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> IDelayedCall:
        """Run ``callable(*args, **kwargs)`` in ``delay`` seconds (coarsely, if long)."""
        if delay < self.COARSE:
            return self.reactor.callLater(delay, callable, *args, **kwargs)
        deadline = Deadline(self, self.reactor.seconds() + delay, callable, args, kwargs)
        self._live += 1
        self.requeue(deadline)
        return deadline  # type: ignore[return-value]

    def requeue(self, deadline: Deadline) -> None:
        """Queue ``deadline`` at its time (an older entry of it is skipped)."""
        self._sequence += 1
        heapq.heappush(self._heap, (deadline.time, self._sequence, deadline))
        if self._timer is None:
            self._timer = self.reactor.callLater(self.RESOLUTION, self._tick)

    def dropped(self) -> None:
        """A deadline was cancelled."""
        self._live -= 1
        heap = self._heap
        if not self._live:
            heap.clear()
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
        elif len(heap) > 2 * self._live + 1024:
            heap[:] = [entry for entry in heap if entry[2].state == "pending"]
            heapq.heapify(heap)

    @property
    def queued(self) -> int:
        """Heap entries, live or not (tests read it)."""
        return len(self._heap)

    @property
    def pending(self) -> int:
        """Deadlines neither run nor cancelled."""
        return self._live

    def _tick(self) -> None:
        self._timer = None
        heap = self._heap
        now = self.reactor.seconds()
        while heap and heap[0][0] <= now:
            when, _, deadline = heapq.heappop(heap)
            if deadline.state != "pending" or deadline.time != when:
                continue  # cancelled, or moved (its new entry comes later)
            deadline.state = "called"
            self._live -= 1
            func, args, kwargs = deadline.func, deadline.args, deadline.kwargs
            deadline.func, deadline.args, deadline.kwargs = _nothing, (), {}
            try:
                func(*args, **kwargs)
            except Exception:
                _log.failure("deadline {func!r} failed", func=func)
        self.after_tick()
        if not self._live:
            heap.clear()
        elif self._timer is None:
            self._timer = self.reactor.callLater(self.RESOLUTION, self._tick)
