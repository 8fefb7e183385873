"""Helpers of the splice tests (tests/test_splice.py, tests/test_splice_lean.py).

Real TCP socket pairs on loopback, a bounded blocking read to the end of a
stream, peers in threads, a bounded wait on the real reactor, and a sampler
of the receive low-water mark a splice uses.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

__all__ = ["in_thread", "low_water_marks", "pairs", "read_all", "wait_until"]


def pairs() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """client_peer <-> client_side, backend_side <-> backend_peer (TCP, loopback).

    The two ``_side`` sockets, the front's, are non-blocking.
    """
    sockets = []
    for _ in range(2):
        with socket.create_server(("127.0.0.1", 0)) as server:
            outer = socket.create_connection(server.getsockname())
            inner, _ = server.accept()
        sockets += [outer, inner]
    client_peer, client_side, backend_peer, backend_side = sockets
    for sock in (client_side, backend_side):
        sock.setblocking(False)
    return client_peer, client_side, backend_side, backend_peer


def read_all(sock: socket.socket, limit: float = 30.0) -> bytes:
    """Blocking read to end of stream, bounded in time."""
    sock.settimeout(limit)
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def low_water_marks(test: TestCase, current: Callable[[], int]) -> list[int]:
    """Every distinct value of ``current()`` (a splice's receive mark), sampled each millisecond.

    The sampling stops when ``test`` cleans up.
    """
    marks = [0]

    def sample() -> None:
        mark = current()
        if mark != marks[-1]:
            marks.append(mark)

    sampler = LoopingCall(sample)
    sampler.start(0.001)

    def stop() -> None:
        if sampler.running:
            sampler.stop()

    test.addCleanup(stop)
    return marks


def in_thread(target: Callable[[], object]) -> threading.Thread:
    """Run ``target`` (a blocking peer) in a started daemon thread."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_until(
    done: Callable[[], bool], failure: Callable[[], str], *, limit: float, every: float
) -> Deferred[None]:
    """Fire once ``done()`` holds, polled every ``every`` s on the real reactor.

    Fails with ``failure()`` as an AssertionError after ``limit`` seconds.
    """
    finished: Deferred[None] = Deferred()
    started = time.monotonic()

    def poll() -> None:
        if done():
            finished.callback(None)
        elif time.monotonic() - started > limit:
            finished.errback(AssertionError(failure()))
        else:
            reactor.callLater(every, poll)

    reactor.callLater(every, poll)
    return finished
