# -*- test-case-name: tests.test_engine -*-
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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from echfront.front.engine import AVAILABLE, EVENTS_IN, EVENTS_OUT, RETRY, LeanEngine

if TYPE_CHECKING:
    from echfront.front.connection import ConnectionRecord
    from echfront.front.splice import Pipe

__all__ = ["SpliceLink"]

#: Splice rounds per run for one direction before letting others run.
_ROUNDS = 8
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if AVAILABLE else 0


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

    __slots__ = ("_down", "_finished", "_shut_backend", "_shut_client", "_up", "engine", "record")

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
        if mask & EVENTS_IN:
            self._up.run()
        if mask & EVENTS_OUT:
            self._down.run()

    def backend_events(self, mask: int) -> None:
        """The backend socket is ready: pull from it, or drain into it."""
        if mask & EVENTS_IN:
            self._down.run()
        if mask & EVENTS_OUT:
            self._up.run()

    def _count_up(self, moved: int) -> None:
        self.record.bytes_from_client += moved

    def _count_down(self, moved: int) -> None:
        self.record.bytes_to_client += moved

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

    __slots__ = ("count", "ended", "finished", "link", "pending", "pipe", "sink", "source")

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

    def run(self) -> None:
        """Move what can move now (see the class docstring)."""
        link = self.link
        engine = link.engine
        if not link.active or self.finished:
            return
        splice = os.splice
        for _ in range(_ROUNDS):
            pipe = self.pipe
            while self.pending:
                assert pipe is not None
                try:
                    moved = splice(pipe.read_fd, self.sink, self.pending, None, None, _SPLICE_FLAGS)
                except OSError as error:
                    if error.errno not in RETRY:
                        link.failed(error)
                    return  # the sink's next writable edge resumes
                self.pending -= moved
            if self.ended:
                self._release()
                self.finished = True
                link.direction_ended(self)
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
