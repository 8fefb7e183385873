# -*- test-case-name: tests.test_splice -*-
"""Zero-copy relaying with splice(2) once a relay needs no more inspection (Linux).

On the ordinary fast path every chunk is copied from the kernel into a
Python bytes object and back.  :class:`SpliceSession` instead moves bytes
socket → pipe → socket inside the kernel: for each direction a pipe, and
``os.splice`` in and out of it.  The two sockets are taken away from their
Twisted transports while this runs; a :class:`SpliceEngine` per reactor
watches every spliced socket through one private epoll instance, and the
session gives the sockets back to the transports (which close them, and
tell the protocols) when it ends.

Everything the ordinary path guarantees is kept:

* flow control: a direction stops reading when its pipe is full and
  resumes when the pipe drains, so memory is bounded by the pipe sizes;
* half-close: end of stream on one side becomes ``shutdown(SHUT_WR)`` on
  the other once the pipe is empty; the session ends when both directions
  have ended;
* byte counts, which the idle sweep, logs and metrics read.

It only starts when it safely can: both transports are plain sockets,
their user-space write buffers are empty, and neither side has half-closed
yet.  Otherwise the relay stays on the ordinary path.

A session that moves data fast batches its wake-ups in the kernel with
``SO_RCVLOWAT``, as the lean engine's links do (:mod:`echfront.front.leansplice`
explains how): a socket is reported readable once a whole mark of bytes
waits, and a timer collects what waits below the mark after
:data:`_PERIOD` without a wake-up.

Why this module is long: a session is one state machine over two sockets
and two pipes (start, both directions' pumps with flow control and
half-close, batching, the hand-back), and the engine that drives sessions
shares its state; the lean engine's own links are in
:mod:`echfront.front.leansplice`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime, IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorFDSet

    from echfront.front.connection import ConnectionRecord

__all__ = [
    "AVAILABLE",
    "Pipe",
    "SpliceEngine",
    "SpliceSession",
    "engine_for",
    "socket_of",
    "write_buffer_empty",
]

#: Whether this platform can splice (Linux, Python >= 3.10).
AVAILABLE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
#: Pipe capacity to ask for; unprivileged processes may raise it to 1 MiB
#: (fs.pipe-max-size), and bigger pipes mean fewer wake-ups per gigabyte.
PIPE_SIZE = 1024 * 1024
#: Rounds of splice-in/splice-out per readiness event: draining a busy
#: socket in one wake-up saves an epoll round trip per chunk.
_ROUNDS = 8
#: Interrupt moderation: when one wake-up moved at least _BULK_BYTES, the
#: engine stops watching for _MODERATION seconds, so that the next wake-up
#: finds a bigger chunk waiting (level-triggered epoll loses nothing).  A
#: bulk transfer otherwise wakes the process for every few tens of KiB, and
#: each wake-up costs Python far more than the splice itself.  Interactive
#: traffic never reaches the threshold, and nothing waits more than 1 ms.
_BULK_BYTES = 64 * 1024
_MODERATION = 0.001
#: Batching (see the module docstring and echfront.front.leansplice): it
#: starts once a session moved _ENTER bytes within _ENTER_WINDOW seconds;
#: the mark starts at _LOWAT_START and doubles up to _LOWAT_MAX while whole
#: marks come sooner than every half _PERIOD; a timer collects what waits
#: below it after _PERIOD, halves it, and ends the batching when it
#: collects less than _STAY.
_ENTER = 256 * 1024
_ENTER_WINDOW = 0.01
_LOWAT_START = 64 * 1024
_LOWAT_MAX = 2 * PIPE_SIZE
_PERIOD = 0.008
_STAY = 32 * 1024
#: Empty pipes kept for reuse (each costs two descriptors).
_POOLED_PIPES = 32
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if AVAILABLE else 0
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


def socket_of(transport: Any) -> socket.socket | None:
    """The socket behind a Twisted stream transport, if it is a plain one."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    handle = get_handle()
    return handle if isinstance(handle, socket.socket) else None


def write_buffer_empty(transport: Any) -> bool:
    """Whether a Twisted FileDescriptor transport has nothing left to write.

    These are FileDescriptor internals (stable for many years); anything
    unexpected counts as "not empty", which only keeps the ordinary path.
    """
    data = getattr(transport, "dataBuffer", None)
    offset = getattr(transport, "offset", None)
    pending = getattr(transport, "_tempDataLen", None)
    if data is None or offset is None or pending is None:
        return False
    return pending == 0 and offset >= len(data) and not getattr(transport, "disconnecting", True)


class Pipe:
    """A non-blocking pipe for splice(2), enlarged when the system allows.

    Both zero-copy paths use it: the sessions here and the lean engine's.
    """

    __slots__ = ("capacity", "read_fd", "write_fd")

    def __init__(self) -> None:
        """Open the pipe."""
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.capacity: int = fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            self.capacity = 65536  # the default pipe size

    def close(self) -> None:
        """Close both ends."""
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Pump:
    """One direction: source socket → pipe → destination socket.

    The pipe is borrowed from the engine's pool only while bytes are in
    flight and given back as soon as it is empty: an idle connection holds
    no pipe, so it costs two descriptors (its sockets) as on the ordinary
    path, and no pipe buffers in the kernel.
    """

    def __init__(
        self, session: SpliceSession, source: _End, sink: _End, count: Callable[[int], None]
    ) -> None:
        self.session = session
        self.source = source
        self.sink = sink
        self.count = count
        self.pipe: Pipe | None = None
        self.pending = 0
        self.ended = False

    @property
    def full(self) -> bool:
        return self.pipe is not None and self.pending >= self.pipe.capacity

    def pull(self) -> None:
        """Source readable: move what fits into the pipe and push it on, a few times."""
        self._pull()
        if self.pipe is not None and not self.pending:
            self._release()
        self.session.served()

    def push(self) -> None:
        """Sink writable: empty the pipe into it."""
        if self._drain() and self.pipe is not None:
            self._release()

    def _release(self) -> None:
        assert self.pipe is not None
        self.session.engine.give_pipe(self.pipe)
        self.pipe = None

    def _pull(self) -> None:
        # The hot loop of a bulk transfer: the pipe stays borrowed across
        # rounds (pull releases it once, at the end), and os.splice takes
        # its arguments positionally (keyword parsing costs per call).
        source_fd = self.source.fd
        for _ in range(_ROUNDS):
            pipe = self.pipe
            if pipe is None:
                try:
                    pipe = self.pipe = self.session.engine.take_pipe()
                except OSError as error:  # out of descriptors
                    self.session.fail(error)
                    return
            room = pipe.capacity - self.pending
            if room <= 0:
                self.source.want_read(self, False)
                return
            try:
                moved = os.splice(source_fd, pipe.write_fd, room, None, None, _FLAGS)
            except OSError as error:
                if error.errno not in _RETRY:
                    self.session.fail(error)
                return
            if moved == 0:
                self.ended = True
                self.source.want_read(self, False)
            else:
                self.pending += moved
                self.count(moved)
                if not self.session.lowat:  # (a batching session is moderated by the kernel)
                    self.session.engine.moved += moved
            if not self._drain() or self.ended:
                return
            if moved < room:
                # The socket is empty (or below its mark): readiness, which
                # epoll reports level-triggered, says when there is more.
                return

    def _drain(self) -> bool:
        """Empty the pipe into the sink, as far as it takes it.

        :returns: whether the pipe is empty now (it stays borrowed).
        """
        pipe = self.pipe
        while self.pending:
            assert pipe is not None
            try:
                moved = os.splice(pipe.read_fd, self.sink.fd, self.pending, None, None, _FLAGS)
            except OSError as error:
                if error.errno in _RETRY:
                    self.sink.want_write(self, True)
                    # A full pipe must not keep the source readable in a loop.
                    self.source.want_read(self, not self.full and not self.ended)
                    return False
                self.session.fail(error)
                return False
            self.pending -= moved
        self.sink.want_write(self, False)
        if self.ended:
            self.session.direction_ended(self)
        else:
            self.source.want_read(self, True)
        return True

    def close(self) -> None:
        if self.pipe is not None:
            if self.pending:
                self.pipe.close()  # it still holds bytes nobody will read
            else:
                self.session.engine.give_pipe(self.pipe)
            self.pipe = None


class _End:
    """One socket while splicing.

    It reads for one pump (its outgoing direction) and writes for the other.
    """

    def __init__(self, session: SpliceSession, sock: socket.socket, name: str) -> None:
        self.session = session
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.reader: _Pump | None = None
        self.writer: _Pump | None = None
        self.reading = False
        self.writing = False

    def want_read(self, pump: _Pump, wanted: bool) -> None:
        if wanted != self.reading and not self.session.finished:
            self.reading = wanted
            self.session.engine.update(self)

    def want_write(self, pump: _Pump, wanted: bool) -> None:
        if wanted != self.writing and not self.session.finished:
            self.writing = wanted
            self.session.engine.update(self)


@implementer(IReadDescriptor)
class SpliceEngine:
    """All splicing sockets of one reactor, behind one private epoll instance.

    The reactor watches only the engine's epoll descriptor; when it is
    readable the engine handles every ready socket in one loop.  Going
    through the reactor for each socket event instead costs a dispatch
    (context and logging wrappers) per event, which at bulk rates was most
    of the CPU a spliced relay used.
    """

    def __init__(self, reactor: IReactorFDSet) -> None:
        """Create the epoll instance; the reactor watches it while it watches sockets.

        :param reactor: watches the epoll descriptor; it must also provide
            ``IReactorTime`` (every Twisted reactor does), for moderation.
        """
        self.reactor = reactor
        self._time = IReactorTime(reactor)
        self.epoll = select.epoll()
        self._ends: dict[int, _End] = {}
        self._masks: dict[int, int] = {}
        self._pipes: list[Pipe] = []
        #: Bytes moved in the current wake-up (see _BULK_BYTES).
        self.moved = 0
        self._watched = False
        self._moderating: IDelayedCall | None = None  # resumes watching
        #: How many times bulk traffic paused the engine (tests read it).
        self.moderations = 0

    def take_pipe(self) -> Pipe:
        """An empty pipe: from the pool, or a new one."""
        return self._pipes.pop() if self._pipes else Pipe()

    def give_pipe(self, pipe: Pipe) -> None:
        """Take back an empty pipe; keep a few for the next burst."""
        if len(self._pipes) < _POOLED_PIPES:
            self._pipes.append(pipe)
        else:
            pipe.close()

    def fileno(self) -> int:
        """The private epoll descriptor, which the reactor watches."""
        return self.epoll.fileno()

    def logPrefix(self) -> str:
        """Name in Twisted's logs."""
        return "splice"

    def update(self, end: _End) -> None:
        """Watch ``end`` for what it wants now (nothing: forget it)."""
        mask = (select.EPOLLIN if end.reading else 0) | (select.EPOLLOUT if end.writing else 0)
        old = self._masks.get(end.fd, 0)
        if mask == old:
            return
        if not mask:
            self.forget(end)
        elif old:
            self.epoll.modify(end.fd, mask)
            self._masks[end.fd] = mask
        else:
            self.epoll.register(end.fd, mask)
            self._masks[end.fd] = mask
            self._ends[end.fd] = end
            self._watch()

    def forget(self, end: _End) -> None:
        """Stop watching ``end``."""
        if self._ends.get(end.fd) is end:
            del self._ends[end.fd]
            del self._masks[end.fd]
            with contextlib.suppress(OSError):
                self.epoll.unregister(end.fd)
            if not self._ends:
                self._unwatch()
                if self._moderating is not None:
                    # Nothing left to resume; leave no timer behind.
                    self._moderating.cancel()
                    self._moderating = None

    def _watch(self) -> None:
        """Have the reactor watch the epoll descriptor (unless moderating)."""
        if not self._watched and self._moderating is None and self._ends:
            self._watched = True
            self.reactor.addReader(self)

    def _unwatch(self) -> None:
        if self._watched:
            self._watched = False
            self.reactor.removeReader(self)

    def _resume(self) -> None:
        self._moderating = None
        self._watch()

    def doRead(self) -> None:
        """Serve every ready socket (level-triggered: whatever is left wakes us again)."""
        self.moved = 0
        self._serve()
        if self.moved >= _BULK_BYTES and self._ends:
            self._unwatch()
            self.moderations += 1
            self._moderating = self._time.callLater(_MODERATION, self._resume)

    def _serve(self) -> None:
        for fd, events in self.epoll.poll(0, 256):
            end = self._ends.get(fd)
            if end is None:
                continue
            try:
                if events & _READ_EVENTS and end.reader is not None and end.reading:
                    end.reader.pull()
                if events & select.EPOLLOUT and end.writer is not None and end.writing:
                    end.writer.push()
            except Exception as error:  # never let one connection break the engine
                end.session.fail(error)

    def connectionLost(self, reason: Failure) -> None:
        """The epoll descriptor broke: stop every session."""
        for end in list(self._ends.values()):
            end.session.fail(OSError(errno.EIO, reason.getErrorMessage()))


#: Readiness worth a pull: data, end of stream, or an error to collect.
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR if AVAILABLE else 0
_engines: dict[int, SpliceEngine] = {}


def engine_for(reactor: IReactorFDSet) -> SpliceEngine:
    """The reactor's splice engine, created on first use."""
    engine = _engines.get(id(reactor))
    if engine is None or engine.reactor is not reactor:
        engine = _engines[id(reactor)] = SpliceEngine(reactor)
    return engine


class SpliceSession:
    """Relays two sockets with splice(2) until both directions have ended.

    :param reactor: the reactor (its engine is shared), watching descriptors.
    :param client: the client socket; ``backend``: the backend socket.
    :param record: where to count bytes.
    :param finished: called once with None (both directions ended) or the
        error that stopped it; the caller then closes both transports.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        client: socket.socket,
        backend: socket.socket,
        record: ConnectionRecord,
        finished: Callable[[BaseException | None], None],
    ) -> None:
        """Set up both pumps; :meth:`start` begins moving bytes."""
        self.engine = engine_for(reactor)
        self.record = record
        self.finished = False
        self._on_finished = finished
        self._client = _End(self, client, "client")
        self._backend = _End(self, backend, "backend")
        self._up = _Pump(self, self._client, self._backend, self._count_up)
        self._down = _Pump(self, self._backend, self._client, self._count_down)
        self._pumps = [self._up, self._down]
        self._client.reader = self._backend.writer = self._up
        self._backend.reader = self._client.writer = self._down
        self._ended: set[_Pump] = set()
        #: The receive low-water mark set on both sockets; 0 while not batching.
        self.lowat = 0
        #: Bytes moved since ``_mark`` (not batching) or since the last wake-up.
        self.moved = 0
        self._time = IReactorTime(reactor)
        self._mark = self._woken_at = self._time.seconds()
        self._timer: IDelayedCall | None = None

    def _count_up(self, moved: int) -> None:
        self.record.bytes_from_client += moved
        self.moved += moved

    def _count_down(self, moved: int) -> None:
        self.record.bytes_to_client += moved
        self.moved += moved

    # -- batching --------------------------------------------------------------------

    def served(self) -> None:
        """A pump pulled: start batching, or adjust the mark and put the timer off."""
        if self.finished:
            return
        timer = self._timer
        if timer is None:
            if self.moved >= _ENTER:
                now = self._time.seconds()
                if now - self._mark <= _ENTER_WINDOW:
                    self._set_lowat(_LOWAT_START)
                    self._woken_at = now
                    self._timer = self._time.callLater(_PERIOD, self._collect)
                self._mark = now
                self.moved = 0
            return
        if self.moved >= self.lowat:
            now = self._time.seconds()
            if self.lowat < _LOWAT_MAX and now - self._woken_at < _PERIOD / 2:
                self._set_lowat(self.lowat * 2)
            self._woken_at = now
            self.moved = 0
            timer.reset(_PERIOD)

    def _collect(self) -> None:
        """No whole mark for ``_PERIOD``: move what waits below it."""
        self._timer = None
        if self.finished:
            return
        self.moved = 0
        for pump in self._pumps:
            if not pump.ended and not pump.full:
                pump.pull()
        if self._settled():
            return
        moved, self.moved = self.moved, 0
        if moved < _STAY:
            self._set_lowat(0)  # too little for batching to pay
            self._mark = self._time.seconds()
            return
        if moved < self.lowat:
            # The sender slowed down, or cannot send a whole mark ahead.
            self._set_lowat(max(_LOWAT_START, self.lowat // 2))
        self._woken_at = self._time.seconds()
        self._timer = self._time.callLater(_PERIOD, self._collect)

    def _settled(self) -> bool:
        """Whether the pulls just made ended the session, or started batching anew."""
        return self.finished or self._timer is not None

    def _set_lowat(self, lowat: int) -> None:
        """Set SO_RCVLOWAT on both sockets (0: back to 1, the default)."""
        self.lowat = lowat
        for end in (self._client, self._backend):
            with contextlib.suppress(OSError):  # a broken socket: its events tell
                end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat or 1)

    def start(self) -> None:
        """Watch both sockets for reading."""
        self._client.want_read(self._up, True)
        self._backend.want_read(self._down, True)

    def direction_ended(self, pump: _Pump) -> None:
        """One direction saw end of stream and emptied its pipe: pass the FIN on."""
        if pump in self._ended:
            return
        self._ended.add(pump)
        # If the peer is gone already, the other direction will tell.
        with contextlib.suppress(OSError):
            pump.sink.sock.shutdown(socket.SHUT_WR)
        if len(self._ended) == 2:
            self._finish(None)

    def fail(self, error: BaseException) -> None:
        """A socket error: stop at once."""
        self._finish(error)

    def stop(self) -> None:
        """Stop watching the sockets (the relay is being closed from outside)."""
        self._finish(None, notify=False)

    def _finish(self, error: BaseException | None, *, notify: bool = True) -> None:
        if self.finished:
            return
        for end in (self._client, self._backend):
            end.reading = end.writing = False
            self.engine.forget(end)
        self.finished = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.lowat:
            # The sockets go back to their transports: the default mark.
            self._set_lowat(0)
        for pump in self._pumps:
            pump.close()
        if notify:
            self._on_finished(error)
