# -*- test-case-name: tests.test_engine,tests.test_splice_lean -*-
"""splice(2) between a lean relay's two sockets, edge-triggered, on the engine.

Once a :class:`~echfront.front.leanrelay.LeanRelay` has relayed 64 KiB past
the handshake with nothing waiting in user space, it hands both directions
to a :class:`SpliceLink`: each direction is a :class:`_Pump`, socket to pipe
to socket inside the kernel, with a pipe borrowed from the engine only
while bytes are in flight.  The sockets stay registered with the engine as
they are (one registration per socket for its life); their events reach
the pumps instead of the relay's reads.

What the relay guarantees holds here too: flow control (a direction stops
pulling while its pipe cannot drain into a full sink), half-close (end of
stream on one side becomes ``shutdown(SHUT_WR)`` on the other once the pipe
is empty; the link ends when both directions have), and byte counts, which
the idle sweep, logs and metrics read.

Batching in the kernel.  Bulk data arrives in the peers' write sizes (16
to 64 KiB at a time), and a wake-up of the process costs far more than the
splice it leads to, so a link that moves data fast (:data:`_ENTER` bytes
within :data:`_ENTER_WINDOW`) has the kernel batch its wake-ups: with
``SO_RCVLOWAT`` (socket(7)) on both sockets, a socket is reported readable
only once that many bytes wait, or at end of stream, or when the receive
window is nearly closed (so a sender is never stalled by it).  The mark
starts at :data:`_LOWAT_START` and doubles, up to :data:`_LOWAT_MAX`, while
full wake-ups come sooner than every half :data:`_PERIOD`.  What waits
below the mark, when a sender slows down or pauses, is collected by a
timer once the link has gone :data:`_PERIOD` (8 ms) without a wake-up:
so nothing waits longer than that, which is the price of batching; links
below about 25 MB/s never batch.  The timer halves the mark, and ends the
batching once it collects little.  A batching link's sockets are watched
for reads only (a sink that was full is retried by the timer), it serves
both directions once per wake-up, a pull that leaves the pipe part empty
is its last (no pull to see EAGAIN: what arrives later reaches the mark or
the timer), and it does not count toward the engine's moderation (which
pauses every connection of the engine): the kernel moderates it.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from echfront.front.engine import (
    AVAILABLE,
    EVENTS_END,
    EVENTS_IN,
    EVENTS_OUT,
    RETRY,
    LeanEngine,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from echfront.front.connection import ConnectionRecord
    from echfront.front.splice import Pipe

__all__ = ["SpliceLink"]

#: Splice rounds per run for one direction before letting others run.
_ROUNDS = 8
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if AVAILABLE else 0
#: Batching starts once a link moved this many bytes (both directions) ...
_ENTER = 256 * 1024
#: ... within this many seconds (about 25 MB/s and more).
_ENTER_WINDOW = 0.01
#: First receive low-water mark of a batching link, in bytes.
_LOWAT_START = 64 * 1024
#: Highest mark: two pipes' worth (1 MiB pipes, splice.PIPE_SIZE), pulled in two rounds.
_LOWAT_MAX = 2 * 1024 * 1024
#: Longest wait (seconds) of bytes below the mark.
_PERIOD = 0.008
#: A timer run that collects less than this ends the batching.
_STAY = 32 * 1024
#: What a batching link's sockets are watched for (edge-triggered): reads
#: only.  Writability is left to the timer, which retries a sink that was
#: full; a wake-up for every ACK that frees send space would collect the
#: bytes below the mark, and undo the batching.
_BATCH_EVENTS = (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET) if AVAILABLE else 0


class SpliceLink:
    """Both directions of one relayed connection, spliced (see the module docstring).

    :param engine: the engine both sockets are registered with.
    :param client: the client socket's descriptor; ``backend``: the backend's.
    :param record: where bytes are counted.
    :param shut_client: sends FIN to the client (after its direction ended).
    :param shut_backend: sends FIN to the backend.
    :param finished: called once with None (both directions ended, each
        FIN passed on) or the socket error that stopped the link; the
        caller then closes both sockets.
    """

    __slots__ = (
        "_down",
        "_finished",
        "_mark",
        "_serving",
        "_shut_backend",
        "_shut_client",
        "_timer",
        "_up",
        "_woken_at",
        "engine",
        "lowat",
        "moved",
        "record",
    )

    def __init__(
        self,
        engine: LeanEngine,
        client: int,
        backend: int,
        record: ConnectionRecord,
        *,
        shut_client: Callable[[], object],
        shut_backend: Callable[[], object],
        finished: Callable[[OSError | None], object],
    ) -> None:
        """Set up both pumps; :meth:`start` begins moving bytes."""
        self.engine = engine
        self.record = record
        self._shut_client = shut_client
        self._shut_backend = shut_backend
        self._finished: Callable[[OSError | None], object] | None = finished
        self._up = _Pump(self, client, backend, self._count_up)
        self._down = _Pump(self, backend, client, self._count_down)
        record.zero_copy = True
        #: The receive low-water mark set on both sockets; 0 while not batching.
        self.lowat = 0
        #: Bytes moved since ``_mark`` (not batching) or since the last wake-up.
        self.moved = 0
        self._mark = engine.time.seconds()
        self._woken_at = self._mark
        self._timer: IDelayedCall | None = None
        self._serving = False

    def start(self) -> None:
        """Move what is waiting: bytes may be there with no new edge to come."""
        self.engine.soon(self._up.run)
        self.engine.soon(self._down.run)

    @property
    def active(self) -> bool:
        """Whether the link still moves bytes."""
        return self._finished is not None

    def client_events(self, mask: int) -> None:
        """The client socket is ready: pull from it, or drain into it."""
        if self.lowat:
            if mask & EVENTS_END:
                self._up.to_end = True
            self._serve_soon()
            return
        if mask & EVENTS_IN:
            self._up.run()
        if mask & EVENTS_OUT:
            self._down.run()
        if self.moved >= _ENTER:
            self._check_rate()

    def backend_events(self, mask: int) -> None:
        """The backend socket is ready: pull from it, or drain into it."""
        if self.lowat:
            if mask & EVENTS_END:
                self._down.to_end = True
            self._serve_soon()
            return
        if mask & EVENTS_IN:
            self._down.run()
        if mask & EVENTS_OUT:
            self._up.run()
        if self.moved >= _ENTER:
            self._check_rate()

    def _count_up(self, moved: int) -> None:
        self.record.bytes_from_client += moved
        self.moved += moved

    def _count_down(self, moved: int) -> None:
        self.record.bytes_to_client += moved
        self.moved += moved

    # -- batching --------------------------------------------------------------------

    def _check_rate(self) -> None:
        """``_ENTER`` bytes moved: batch if that took at most ``_ENTER_WINDOW``."""
        now = self.engine.time.seconds()
        if now - self._mark <= _ENTER_WINDOW and self._finished is not None:
            self._set_lowat(_LOWAT_START)
            self._watch(_BATCH_EVENTS)
            self._woken_at = now
            self._timer = self.engine.time.callLater(_PERIOD, self._collect)
        self._mark = now
        self.moved = 0

    def _serve_soon(self) -> None:
        """Serve both directions once, after this wake-up's other events."""
        if not self._serving:
            self._serving = True
            self.engine.soon(self._serve)

    def _serve(self) -> None:
        """A batching link's wake-up: both directions, then the mark and the timer."""
        self._serving = False
        self._up.run()
        self._down.run()
        timer = self._timer
        if timer is None or self._finished is None:
            return  # the link ended, or stopped batching meanwhile
        now = self.engine.time.seconds()
        lowat = self.lowat
        if self.moved >= lowat and lowat < _LOWAT_MAX and now - self._woken_at < _PERIOD / 2:
            self._set_lowat(lowat * 2)
        self._woken_at = now
        self.moved = 0
        timer.reset(_PERIOD)

    def _collect(self) -> None:
        """No wake-up for ``_PERIOD``: move what waits below the mark."""
        self._timer = None
        if self._finished is None:
            return
        self.moved = 0
        self._up.run(probe=True)
        self._down.run(probe=True)
        if not self.active:  # the runs ended the link
            return
        moved, self.moved = self.moved, 0
        if moved < _STAY:
            # Too little for batching to pay: wake-ups per arrival again.
            self._set_lowat(0)
            self._watch(0)
            self._mark = self.engine.time.seconds()
            return
        if moved < self.lowat:
            # The sender slowed down, or cannot send a whole mark ahead.
            self._set_lowat(max(_LOWAT_START, self.lowat // 2))
        self._woken_at = self.engine.time.seconds()
        self._timer = self.engine.time.callLater(_PERIOD, self._collect)

    def _watch(self, events: int) -> None:
        """Watch both sockets for ``events`` (0: as the engine registered them)."""
        engine = self.engine
        for fd in (self._up.source, self._down.source):
            with contextlib.suppress(OSError):  # closed already: nothing to watch
                if events:
                    engine.epoll.modify(fd, events)
                else:
                    engine.watch_writes(fd)

    def _set_lowat(self, lowat: int) -> None:
        """Set SO_RCVLOWAT on both sockets (0: back to 1, the default)."""
        self.lowat = lowat
        for fd in (self._up.source, self._down.source):
            # A socket object on the descriptor just for the call: the relay
            # owns the socket, so this one must not close it (detach).
            try:
                sock = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            except OSError:
                continue  # closed meanwhile: the pumps see it
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat or 1)
            except OSError:
                pass  # a socket that broke: its events tell the pumps
            finally:
                sock.detach()

    # -- ending ------------------------------------------------------------------------

    def direction_ended(self, pump: _Pump) -> None:
        """One direction reached end of stream and emptied its pipe: pass the FIN on."""
        (self._shut_backend if pump is self._up else self._shut_client)()
        if self._up.finished and self._down.finished:
            self._end(None)

    def failed(self, error: OSError) -> None:
        """A socket error: stop at once."""
        self._end(error)

    def stop(self) -> None:
        """Stop moving bytes (the relay is being closed from outside); nobody is told."""
        self._finished = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._up.close()
        self._down.close()

    def _end(self, error: OSError | None) -> None:
        finished = self._finished
        if finished is None:
            return
        self.stop()
        finished(error)


class _Pump:
    """One spliced direction: source socket → pipe → sink socket, edge-triggered.

    The pipe is borrowed from the engine only while bytes are in flight, so
    an idle spliced connection holds none.  A run drains the pipe into the
    sink, then pulls from the source, until one of them would block (its
    next edge resumes it), the source ends, or it has had its rounds (then
    it continues after the other sockets' events).
    """

    __slots__ = (
        "count",
        "ended",
        "finished",
        "link",
        "pending",
        "pipe",
        "sink",
        "source",
        "to_end",
    )

    def __init__(
        self, link: SpliceLink, source: int, sink: int, count: Callable[[int], None]
    ) -> None:
        self.link = link
        self.source = source
        self.sink = sink
        self.count = count
        self.pipe: Pipe | None = None
        self.pending = 0
        #: The source reached end of stream; then its pipe drained (FIN passed on).
        self.ended = False
        self.finished = False
        #: The kernel reported the source's end of stream (or an error): read to it.
        self.to_end = False

    def run(self, *, probe: bool = False) -> None:
        """Move what can move now (see the class docstring).

        :param probe: pull until the source says it has nothing, also while
            batching (the timer's runs: an end of stream may wait there).
        """
        link = self.link
        engine = link.engine
        if not link.active or self.finished:
            return
        splice = os.splice
        # Batching, a pull that did not fill the pipe emptied the socket:
        # no pull to see EAGAIN.  Whatever arrives next reaches the mark
        # (a wake-up) or is collected by the timer; an end of stream the
        # kernel reported is read now.
        batching = link.lowat and not (probe or self.to_end)
        drained = False
        for _ in range(_ROUNDS):
            pipe = self.pipe
            while self.pending:
                assert pipe is not None
                try:
                    moved = splice(pipe.read_fd, self.sink, self.pending, None, None, _SPLICE_FLAGS)
                except OSError as error:
                    if error.errno not in RETRY:
                        link.failed(error)
                    return  # the sink's next writable edge (or the timer) resumes
                self.pending -= moved
            if self.ended:
                self._release()
                self.finished = True
                link.direction_ended(self)
                return
            if drained:
                self._release()
                return
            if pipe is None:
                try:
                    pipe = self.pipe = engine.take_pipe()
                except OSError as error:  # out of descriptors
                    link.failed(error)
                    return
            try:
                moved = splice(self.source, pipe.write_fd, pipe.capacity, None, None, _SPLICE_FLAGS)
            except OSError as error:
                if error.errno not in RETRY:
                    link.failed(error)
                    return
                self._release()  # the source's next readable edge resumes
                return
            if moved == 0:
                self.ended = True
                continue
            self.pending = moved
            self.count(moved)
            if batching:
                drained = moved < pipe.capacity
            if not link.lowat:  # (a batching link is moderated by the kernel)
                engine.spliced += moved
        engine.soon(self.run)

    def _release(self) -> None:
        if self.pipe is not None and not self.pending:
            self.link.engine.give_pipe(self.pipe)
            self.pipe = None

    def close(self) -> None:
        """Give the pipe back (or close it, if it still holds bytes nobody will read)."""
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            if self.pending:
                pipe.close()
            else:
                self.link.engine.give_pipe(pipe)
        self.ended = True
