# -*- test-case-name: tests.test_engine -*-
"""The lean connection engine: one private epoll per reactor for accepted and backend sockets.

Twisted's per-connection machinery (a transport object with its buffers and
producer bookkeeping, a connector and Deferreds per backend connect, reactor
wrappers around every socket event, a ``DelayedCall`` per deadline) costs
more CPU per short connection than decrypting its ECH.  For the common case,
a plain ``tcp:`` listener relaying to plain TCP backends, the lean engine
does the same work with less: how the pieces fit (docs/performance.rst,
"The lean engine"):

* :class:`~echfront.front.leanport.LeanPort` listens; the reactor watches
  its socket, and each wake-up accepts until the queue is empty;
* every accepted socket gets a :class:`~echfront.front.leantransport.LeanTransport`,
  a Twisted-shaped transport on this engine, and the factory's protocol
  as usual: :class:`~echfront.front.protocol.FrontProtocol` reads the first
  flight, decodes and routes exactly as on any other transport;
* when the route is a plain TCP backend, the transport supplies the handler:
  a :class:`~echfront.front.leanrelay.LeanRelay`, which connects without a
  connector, watches the ServerHello with the same
  :class:`~echfront.ech.hrrwatch.HelloRetryWatch` as the Twisted relay,
  relays with flow control and half-close and switches to ``splice(2)``
  for bulk data;
* local TLS termination runs on the lean transport as on any transport
  (Twisted's TLS layer needs only a transport's calls);
* for any other backend (``unix:``, ``tls:`` or plugin endpoints,
  PROXY-protocol backends, host names) the transport hands its socket to a
  Twisted transport (``adoptStreamConnection``) under the same protocol,
  which goes on exactly as today.

This module is the shared core: :class:`LeanEngine` owns the epoll instance
(edge-triggered, so each socket is registered once, and modified only
if a write to it ever has to wait for room: from then on it is watched for
writability too) and runs what a socket's event calls for; its
:class:`~echfront.front.deadlines.DeadlineClock` gives connections coarse
deadlines from one timer instead of a ``DelayedCall`` each.  Both are per
reactor (:func:`engine_for`).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.internet.interfaces import IReactorTime, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echfront.front.deadlines import DeadlineClock
from echfront.front.splice import Pipe
from echfront.targets import Backend

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorFDSet

    from echfront.targets import Local

__all__ = [
    "AVAILABLE",
    "EVENTS_IN",
    "EVENTS_OUT",
    "RECV_SIZE",
    "EventTarget",
    "LeanEngine",
    "Pipe",
    "PlainTarget",
    "engine_for",
    "plain_tcp_target",
]

#: Whether this platform has what the engine needs (Linux: epoll, splice).
AVAILABLE = hasattr(select, "epoll") and hasattr(os, "splice")

#: Readiness that calls for a read: data, end of stream, or an error to collect.
EVENTS_IN = (
    (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR) if AVAILABLE else 0
)
#: Readiness that calls for a write (an error shows on a write too).
EVENTS_OUT = (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP) if AVAILABLE else 0
#: The connection is broken (a reset, or both directions shut down).
EVENTS_BROKEN = (select.EPOLLHUP | select.EPOLLERR) if AVAILABLE else 0
#: End of stream seen by the kernel: read to the end, not just one chunk.
EVENTS_END = (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR) if AVAILABLE else 0
#: What every socket is watched for (edge-triggered): reads and end of stream;
#: errors always show.  Writability only once a write had to wait
#: (:meth:`LeanEngine.watch_writes`): otherwise every ACK that frees send
#: space would be an event with nothing to do.
_READS = (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET) if AVAILABLE else 0
_READS_AND_WRITES = (_READS | select.EPOLLOUT) if AVAILABLE else 0
#: Bytes asked for per socket read.
RECV_SIZE = 65536
#: Events taken from the epoll instance per wake-up.
_MAX_EVENTS = 512
#: Polls per wake-up while events keep coming (see LeanEngine.doRead).
_ROUNDS = 4
#: Empty pipes kept for the next bulk connection (two descriptors each).
_POOLED_PIPES = 32
#: Interrupt moderation (as in :mod:`echfront.front.splice`): after a wake-up
#: that spliced at least _BULK_BYTES, the engine waits _MODERATION seconds
#: before the next, so the next one finds a bigger chunk waiting.
_BULK_BYTES = 64 * 1024
_MODERATION = 0.001


class EventTarget(Protocol):
    """What the engine calls for a registered socket (a transport, a relay)."""

    def events(self, mask: int) -> None:
        """The socket is ready for what ``mask`` says (epoll event bits)."""

    def crashed(self, failure: Failure) -> None:
        """:meth:`events` raised: drop the connection."""


_log = Logger(namespace="echfront.engine")


@implementer(IReadDescriptor)
class LeanEngine:
    """One reactor's lean sockets behind one private, edge-triggered epoll instance.

    The reactor watches the epoll descriptor while any socket is registered;
    a wake-up handles every ready socket in one loop.  Work that must not
    run inside another socket's event (a transport resuming its reads, a
    protocol's ``connectionLost``) is queued with :meth:`soon` and runs
    after the loop, within the same wake-up.

    :param reactor: watches the epoll descriptor and provides the time.
    """

    def __init__(self, reactor: IReactorFDSet) -> None:
        """Create the epoll instance and the deadline clock."""
        self.reactor = reactor
        self.time = IReactorTime(reactor)
        self.clock = DeadlineClock(self.time)
        self.clock.after_tick = self.run_soon
        self.epoll = select.epoll()
        self._targets: dict[int, EventTarget] = {}
        self._soon: list[Callable[[], object]] = []
        self._soon_timer: IDelayedCall | None = None
        #: Descriptors closed during the current wake-up: their remaining
        #: events in it are stale (the number may already name a new socket).
        self._closed_now: set[int] = set()
        self._running = False
        self._watched = False
        self._pipes: list[Pipe] = []
        self._moderating: IDelayedCall | None = None
        #: Bytes spliced in the current wake-up (see _BULK_BYTES).
        self.spliced = 0
        #: Every socket read lands here first, and only what arrived is
        #: copied out: a 64 KiB allocation per read, shrunk to the few
        #: hundred bytes a handshake read brings, fragments the heap.
        self.recv_buffer = memoryview(bytearray(RECV_SIZE))
        #: How many times bulk traffic paused the engine (tests read it).
        self.moderations = 0

    # -- registration -------------------------------------------------------

    def register(self, fd: int, target: EventTarget, *, writes: bool = False) -> None:
        """Watch ``fd`` (edge-triggered) until :meth:`closed`: reads, and ``writes`` too."""
        self.epoll.register(fd, _READS_AND_WRITES if writes else _READS)
        self._targets[fd] = target
        self._closed_now.discard(fd)
        if not self._watched and self._moderating is None:
            self._watched = True
            self.reactor.addReader(self)

    def watch_writes(self, fd: int) -> None:
        """Report ``fd`` writable too from now on (a write had to wait for room).

        Edge-triggered: if it is writable already, the next poll says so.
        """
        self.epoll.modify(fd, _READS_AND_WRITES)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``, which stays open (it is handed to someone else)."""
        if self._targets.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)
        self._forgotten(fd)

    def closed(self, fd: int) -> None:
        """``fd`` is about to be closed: forget it (closing removes it from epoll)."""
        self._targets.pop(fd, None)
        self._forgotten(fd)

    def _forgotten(self, fd: int) -> None:
        if self._running:
            self._closed_now.add(fd)
        if not self._targets:
            self._unwatch()
            if self._moderating is not None:
                self._moderating.cancel()
                self._moderating = None

    @property
    def sockets(self) -> int:
        """Sockets registered now."""
        return len(self._targets)

    @property
    def registered(self) -> dict[int, EventTarget]:
        """The registered descriptors and what their events go to."""
        return self._targets

    def _unwatch(self) -> None:
        if self._watched:
            self._watched = False
            self.reactor.removeReader(self)

    # -- deferred work ----------------------------------------------------------

    def soon(self, call: Callable[[], object]) -> None:
        """Run ``call`` after the current wake-up (or on the next reactor turn)."""
        self._soon.append(call)
        if not self._running and self._soon_timer is None:
            self._soon_timer = self.time.callLater(0, self._from_timer)

    def _from_timer(self) -> None:
        self._soon_timer = None
        self.run_soon()

    def run_soon(self) -> None:
        """Run the queued calls, and those they queue, now."""
        if self._soon_timer is not None:
            if self._soon_timer.active():
                self._soon_timer.cancel()
            self._soon_timer = None
        running, self._running = self._running, True
        try:
            while self._soon:
                calls, self._soon = self._soon, []
                for call in calls:
                    try:
                        call()
                    except Exception:
                        _log.failure("lean engine call {call!r} failed", call=call)
        finally:
            self._running = running

    # -- the reactor's side ------------------------------------------------------

    def fileno(self) -> int:
        """The private epoll descriptor, which the reactor watches."""
        return self.epoll.fileno()

    def logPrefix(self) -> str:
        """Name in Twisted's logs."""
        return "lean"

    def doRead(self) -> None:
        """Handle every ready socket, then the work that waited for the loop's end.

        Events that arrive meanwhile (a backend's answer to what was just
        sent) are taken in the same wake-up, up to :data:`_ROUNDS` polls:
        each reactor wake-up costs more than a poll (Twisted's dispatch
        wrappers, its timer bookkeeping), and the bound keeps the reactor's
        other sockets and timers served.
        """
        self._running = True
        self.spliced = 0
        targets = self._targets
        stale = self._closed_now
        poll = self.epoll.poll
        try:
            for _ in range(_ROUNDS):
                events = poll(0, _MAX_EVENTS)
                if not events:
                    break
                for fd, mask in events:
                    if fd in stale:
                        continue
                    target = targets.get(fd)
                    if target is None:
                        continue
                    try:
                        target.events(mask)
                    except Exception:
                        target.crashed(Failure())
                if self._soon:
                    self.run_soon()
                if stale:
                    stale.clear()
                if self.spliced >= _BULK_BYTES:
                    break
        finally:
            self._running = False
            stale.clear()
        if self.spliced >= _BULK_BYTES and self._targets and self._watched:
            # Moderation: the events wait in the epoll instance meanwhile.
            self._unwatch()
            self.moderations += 1
            self._moderating = self.time.callLater(_MODERATION, self._resume)

    def _resume(self) -> None:
        self._moderating = None
        if self._targets and not self._watched:
            self._watched = True
            self.reactor.addReader(self)

    def connectionLost(self, reason: Failure) -> None:
        """The epoll descriptor broke: drop every connection."""
        for target in list(self._targets.values()):
            target.crashed(reason)

    def close(self) -> None:
        """Release the epoll instance and pooled pipes (the reactor is going away).

        Sockets still registered are the connections' to close; they are
        forgotten here.
        """
        self._targets.clear()
        self._unwatch()
        for timer in (self._moderating, self._soon_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._moderating = self._soon_timer = None
        for pipe in self._pipes:
            pipe.close()
        self._pipes.clear()
        self.epoll.close()
        if _engines.get(id(self.reactor)) is self:
            del _engines[id(self.reactor)]

    # -- pipes for splice ------------------------------------------------------------

    def take_pipe(self) -> Pipe:
        """An empty pipe: from the pool, or a new one."""
        return self._pipes.pop() if self._pipes else Pipe()

    def give_pipe(self, pipe: Pipe) -> None:
        """Take back an empty pipe; keep a few for the next burst."""
        if len(self._pipes) < _POOLED_PIPES:
            self._pipes.append(pipe)
        else:
            pipe.close()


class PlainTarget:
    """A backend the lean engine connects itself: its address family and socket address."""

    __slots__ = ("__weakref__", "address", "backend", "family")

    def __init__(self, backend: Backend, family: int, address: tuple[str, int]) -> None:
        """Connect to ``address`` (an IP literal and port) for ``backend``."""
        self.backend = backend
        self.family = family
        self.address = address


_targets: weakref.WeakKeyDictionary[Backend, PlainTarget | None] = weakref.WeakKeyDictionary()


def plain_tcp_target(route: Backend | Local) -> PlainTarget | None:
    """The lean engine's view of ``route``, or None when Twisted should connect it.

    Plain means: a ``tcp:`` backend (one whose address the configuration
    extracted), an IP literal (a name needs the reactor's resolver) and no
    PROXY protocol header (the Twisted relay writes those).
    """
    if not isinstance(route, Backend):
        return None
    try:
        return _targets[route]
    except KeyError:
        pass
    target = None
    if route.address is not None and not route.proxy_protocol:
        host, port = route.address
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            target = PlainTarget(route, family, (host, port))
    _targets[route] = target
    return target


#: Errors that mean "try again later" on a non-blocking descriptor.
RETRY = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))

_engines: dict[int, LeanEngine] = {}


def engine_for(reactor: IReactorFDSet) -> LeanEngine:
    """The reactor's lean engine, created on first use."""
    engine = _engines.get(id(reactor))
    if engine is None or engine.reactor is not reactor:
        engine = _engines[id(reactor)] = LeanEngine(reactor)
    return engine
