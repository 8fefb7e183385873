# mypy: disable-error-code="no-untyped-call"
"""The lean engine's splice link (echfront.front.leansplice) on real sockets and the real reactor.

tests/test_engine.py drives the link through a whole lean front on a
harness whose clock only moves when told; these tests run a
:class:`~echfront.front.leansplice.SpliceLink` between two loopback socket
pairs on the running reactor, so its batching (``SO_RCVLOWAT`` and the
collecting timer) runs as in a front: bulk transfers batch and stay
byte-exact with half-close both ways, bytes below the mark are delivered
without an end of stream, interactive traffic never batches, flow control
holds while batching, and a reset ends the link with an error.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from echfront.front import engine as lean
from echfront.front import leansplice
from echfront.front.connection import ConnectionRecord
from echfront.front.leansplice import SpliceLink
from echfront.front.splice import PIPE_SIZE
from tests.splicepairs import in_thread, low_water_marks, pairs, read_all, wait_until

pytestmark = pytest.mark.skipif(not lean.AVAILABLE, reason="epoll and splice(2) are Linux only")

MiB = 1024 * 1024


def lowat(sock: socket.socket) -> int:
    value: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
    return value


class _Events:
    """What the engine calls for one of the link's sockets (as the relay and transport do)."""

    def __init__(self, handle: Callable[[int], None]) -> None:
        self.handle = handle

    def events(self, mask: int) -> None:
        self.handle(mask)

    def crashed(self, failure: Failure) -> None:
        raise AssertionError(failure.getTraceback())


class SpliceLinkTests(TestCase):
    """One link between two real socket pairs, on the real reactor's lean engine."""

    timeout = 90

    def start_link(self) -> tuple[SpliceLink, Deferred[OSError | None], list[socket.socket]]:
        client_peer, client_side, backend_side, backend_peer = pairs()
        socks = [client_peer, client_side, backend_side, backend_peer]
        engine = lean.engine_for(reactor)
        record = ConnectionRecord(started=0.0)
        done: Deferred[OSError | None] = Deferred()
        link = SpliceLink(
            engine,
            client_side.fileno(),
            backend_side.fileno(),
            record,
            shut_client=lambda: client_side.shutdown(socket.SHUT_WR),
            shut_backend=lambda: backend_side.shutdown(socket.SHUT_WR),
            finished=done.callback,
        )
        engine.register(client_side.fileno(), _Events(link.client_events), writes=True)
        engine.register(backend_side.fileno(), _Events(link.backend_events), writes=True)

        def close() -> None:
            link.stop()
            for sock in (client_side, backend_side):
                engine.closed(sock.fileno())
            for sock in socks:
                sock.close()

        self.addCleanup(close)
        link.start()
        return link, done, socks

    def watch_marks(self, link: SpliceLink) -> list[int]:
        """Every receive low-water mark the link uses, sampled each millisecond."""
        return low_water_marks(self, lambda: link.lowat)

    def test_bulk_batches_both_ways_byte_exact_with_half_close(self) -> Deferred[None]:
        link, done, (client_peer, _, _, backend_peer) = self.start_link()
        marks = self.watch_marks(link)
        upload = os.urandom(48 * MiB)
        reply = os.urandom(40 * MiB)
        results: dict[str, bytes] = {}

        def client() -> None:
            client_peer.sendall(upload)
            client_peer.shutdown(socket.SHUT_WR)  # half-close: keep reading

        def client_reads() -> None:
            results["client"] = read_all(client_peer)

        def backend() -> None:
            backend_peer.sendall(reply)  # while the upload is under way
            backend_peer.shutdown(socket.SHUT_WR)

        def backend_reads() -> None:
            results["backend"] = read_all(backend_peer)

        threads = [in_thread(f) for f in (client, client_reads, backend, backend_reads)]

        def check(error: OSError | None) -> None:
            for thread in threads:
                thread.join(30)
            self.assertIsNone(error)
            self.assertEqual(results["backend"], upload)
            self.assertEqual(results["client"], reply)
            self.assertEqual(link.record.bytes_from_client, len(upload))
            self.assertEqual(link.record.bytes_to_client, len(reply))
            self.assertTrue(link.record.zero_copy)
            # It batched, with marks between the first and the highest.
            used = [m for m in marks if m]
            self.assertTrue(used, "the bulk transfer never batched")
            self.assertGreaterEqual(min(used), leansplice._LOWAT_START)
            self.assertLessEqual(max(used), leansplice._LOWAT_MAX)
            self.assertFalse(link.active)
            self.assertIsNone(link._timer)  # no timer left behind

        return done.addCallback(check)

    def test_bytes_below_the_mark_arrive_without_end_of_stream(self) -> Deferred[None]:
        """Bytes left below the mark are collected by the timer; then batching ends."""
        link, done, (client_peer, client_side, backend_side, backend_peer) = self.start_link()
        marks = self.watch_marks(link)
        # A burst, then a few bytes more, and no FIN: after the last wake-up
        # at the mark, what is left waits below it until the timer runs.
        data = os.urandom(16 * MiB) + b"the tail, well below any mark"
        received = bytearray()

        def backend_reads() -> None:
            backend_peer.settimeout(30)
            while len(received) < len(data):
                chunk = backend_peer.recv(1 << 20)
                if not chunk:
                    return
                received.extend(chunk)

        reader = in_thread(backend_reads)
        sender = in_thread(lambda: client_peer.sendall(data))
        finished = wait_until(
            lambda: len(received) == len(data) and not link.lowat,
            lambda: f"{len(received)} of {len(data)} bytes arrived",
            limit=30,
            every=0.005,
        )

        def check(_: None) -> None:
            sender.join(5)
            reader.join(5)
            self.assertEqual(bytes(received), data)
            self.assertGreater(max(marks), 0, "the burst never batched")
            # Batching ended: both sockets are back at the default mark.
            self.assertEqual((lowat(client_side), lowat(backend_side)), (1, 1))
            self.assertTrue(link.active)
            self.assertIsNone(link._timer)
            self.assertFalse(done.called)

        return finished.addCallback(check)

    def test_interactive_traffic_never_batches(self) -> Deferred[None]:
        link, _, (client_peer, _, _, backend_peer) = self.start_link()
        marks = self.watch_marks(link)
        answers: list[bytes] = []

        def ping_pong() -> None:
            for sock in (client_peer, backend_peer):
                sock.settimeout(10)
            for _ in range(200):
                client_peer.sendall(b"ping" * 100)
                answers.append(backend_peer.recv(1000, socket.MSG_WAITALL))
                backend_peer.sendall(b"pong" * 100)
                answers.append(client_peer.recv(1000, socket.MSG_WAITALL))

        talker = in_thread(ping_pong)
        finished = wait_until(
            lambda: not talker.is_alive(), lambda: "the exchange did not end", limit=60, every=0.02
        )

        def check(_: None) -> None:
            self.assertEqual(answers, [b"ping" * 100, b"pong" * 100] * 200)
            self.assertEqual(marks, [0])
            self.assertIsNone(link._timer)

        return finished.addCallback(check)

    def test_flow_control_holds_while_batching(self) -> Deferred[None]:
        """A backend that stops reading stalls the client, batching or not; nothing piles up."""
        link, done, (client_peer, client_side, backend_side, backend_peer) = self.start_link()
        marks = self.watch_marks(link)
        total = 128 * MiB
        progress = [0]
        first = bytearray()

        def client() -> None:
            chunk = b"x" * MiB
            for _ in range(total // MiB):
                client_peer.sendall(chunk)
                progress[0] += len(chunk)
            client_peer.shutdown(socket.SHUT_WR)

        def backend_reads_some() -> None:
            backend_peer.settimeout(30)
            while len(first) < 16 * MiB:  # enough to batch, then it stops reading
                first.extend(backend_peer.recv(1 << 20))

        sender = in_thread(client)
        in_thread(backend_reads_some)
        stalled: Deferred[None] = Deferred()
        reactor.callLater(3.0, stalled.callback, None)
        rest: list[int] = []
        helpers: list[threading.Thread] = []

        def while_stalled(_: None) -> Deferred[OSError | None]:
            self.assertGreater(max(marks), 0, "it never batched")
            kernel = sum(
                sock.getsockopt(socket.SOL_SOCKET, option)
                for sock, option in (
                    (client_peer, socket.SO_SNDBUF),
                    (client_side, socket.SO_RCVBUF),
                    (backend_side, socket.SO_SNDBUF),
                    (backend_peer, socket.SO_RCVBUF),
                )
            )
            self.assertLess(progress[0], total)
            self.assertLessEqual(progress[0], len(first) + kernel + PIPE_SIZE)
            helpers.append(in_thread(lambda: rest.append(len(read_all(backend_peer)))))

            def close_backend() -> None:
                sender.join(60)
                backend_peer.shutdown(socket.SHUT_WR)

            helpers.append(in_thread(close_backend))
            return done

        def check(error: OSError | None) -> None:
            sender.join(30)
            for helper in helpers:
                helper.join(30)
            self.assertIsNone(error)
            self.assertEqual(progress[0], total)
            self.assertEqual(len(first) + rest[0], total)
            self.assertEqual(link.record.bytes_from_client, total)

        return stalled.addCallback(while_stalled).addCallback(check)

    def test_reset_while_batching_ends_with_an_error(self) -> Deferred[None]:
        link, done, (client_peer, _, _, backend_peer) = self.start_link()
        marks = self.watch_marks(link)
        stop = threading.Event()

        def client() -> None:
            chunk = os.urandom(MiB)
            while not stop.is_set():
                try:
                    client_peer.sendall(chunk)
                except OSError:
                    return

        def backend_reads() -> None:
            backend_peer.settimeout(30)
            while not link.lowat:
                if not backend_peer.recv(1 << 20):
                    return
            # Seen here, where the reset follows: the reactor's 1 ms sampler
            # may miss a mark the reset ends at once.
            marks.append(link.lowat)
            # An RST from the backend's side, mid-transfer.
            backend_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            backend_peer.close()

        in_thread(client)
        in_thread(backend_reads)

        def check(error: OSError | None) -> None:
            stop.set()
            self.assertIsInstance(error, OSError)
            self.assertGreater(max(marks), 0)
            self.assertIsNone(link._timer)

        return done.addCallback(check)
