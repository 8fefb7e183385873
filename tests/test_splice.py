# mypy: disable-error-code="no-untyped-call"
"""Zero-copy relaying on real sockets, and through twistd on both engines.

The sessions here are the Twisted relay's (echfront.front.splice); the lean
engine's splicing (echfront.front.leansplice) has its own tests in
tests/test_engine.py, and the end-to-end test at the bottom runs both.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from echfront.front import splice
from echfront.front.connection import ConnectionRecord
from tests.frontproc import FrontProcess, make_pki
from tests.gotools import GoBackend, GoUnavailableError, go_binary, run_client
from tests.splicepairs import in_thread, low_water_marks, pairs, read_all, wait_until

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="splice(2) is Linux only")

MiB = 1024 * 1024


class SpliceSessionTests(TestCase):
    """A session between two real socket pairs, driven by the real reactor."""

    timeout = 60

    def run_session(
        self,
    ) -> tuple[ConnectionRecord, Deferred[BaseException | None], list[socket.socket]]:
        client_peer, client_side, backend_side, backend_peer = pairs()
        record = ConnectionRecord(started=0.0)
        done: Deferred[BaseException | None] = Deferred()
        session = splice.SpliceSession(reactor, client_side, backend_side, record, done.callback)
        session.start()
        self.session = session
        socks = [client_peer, client_side, backend_side, backend_peer]
        for sock in socks:
            self.addCleanup(sock.close)
        return record, done, socks

    def test_both_ways_with_half_close_and_counts(self) -> Deferred[None]:
        record, done, (client_peer, _, _, backend_peer) = self.run_session()
        upload = os.urandom(8 * MiB)
        reply = os.urandom(3 * MiB)
        results: dict[str, bytes] = {}

        def client() -> None:
            client_peer.sendall(upload)
            client_peer.shutdown(socket.SHUT_WR)  # half-close: keep reading
            results["client"] = read_all(client_peer)

        def backend() -> None:
            results["backend"] = read_all(backend_peer)  # ends at the client's FIN
            backend_peer.sendall(reply)
            backend_peer.shutdown(socket.SHUT_WR)

        threads = [threading.Thread(target=f, daemon=True) for f in (client, backend)]
        for thread in threads:
            thread.start()

        def check(error: BaseException | None) -> None:
            for thread in threads:
                thread.join(20)
            self.assertIsNone(error)
            self.assertEqual(results["backend"], upload)
            self.assertEqual(results["client"], reply)
            self.assertEqual(record.bytes_from_client, len(upload))
            self.assertEqual(record.bytes_to_client, len(reply))

        return done.addCallback(check)

    def test_bulk_is_moderated_and_interactive_traffic_is_not(self) -> Deferred[None]:
        """Bulk wake-ups pause the engine for a millisecond; ping-pong never does."""
        engine = splice.engine_for(reactor)
        record, done, (client_peer, _, _, backend_peer) = self.run_session()
        before = engine.moderations
        answers: list[bytes] = []

        def ping_pong() -> None:
            for _ in range(50):
                client_peer.sendall(b"ping")
                backend_peer.settimeout(10)
                answers.append(backend_peer.recv(100))
                backend_peer.sendall(b"pong")
                client_peer.settimeout(10)
                answers.append(client_peer.recv(100))

        talker = in_thread(ping_pong)
        interactive = wait_until(
            lambda: not talker.is_alive(), lambda: "the exchange did not end", limit=60, every=0.05
        )
        upload = os.urandom(32 * MiB)
        received: list[bytes] = []

        def bulk(_: None) -> Deferred[BaseException | None]:
            self.assertEqual(answers, [b"ping", b"pong"] * 50)
            self.assertEqual(engine.moderations, before)  # small chunks: never paused

            def send() -> None:
                client_peer.sendall(upload)
                client_peer.shutdown(socket.SHUT_WR)

            def receive() -> None:
                received.append(read_all(backend_peer))
                backend_peer.shutdown(socket.SHUT_WR)

            for target in (send, receive):
                threading.Thread(target=target, daemon=True).start()
            return done

        def check(error: BaseException | None) -> None:
            self.assertIsNone(error)
            self.assertEqual(received, [upload])
            self.assertEqual(record.bytes_from_client, len(upload) + 200)
            self.assertGreater(engine.moderations, before)
            # With no session left, no moderation timer is left behind either.
            self.assertIsNone(engine._moderating)
            calls = reactor.getDelayedCalls()
            resumes = [c for c in calls if getattr(c, "func", None) == engine._resume]
            self.assertEqual(resumes, [])

        return interactive.addCallback(bulk).addCallback(check)

    def watch_marks(self) -> list[int]:
        """Every receive low-water mark the last session uses, sampled each millisecond."""
        session = self.session
        return low_water_marks(self, lambda: session.lowat)

    def test_bulk_batches_and_the_tail_arrives_without_end_of_stream(self) -> Deferred[None]:
        """A fast session batches with SO_RCVLOWAT; bytes left below the mark still arrive.

        Then, with nothing more to move, it stops batching; at the end both
        sockets go back to their transports with the default mark.
        """
        record, done, (client_peer, client_side, backend_side, backend_peer) = self.run_session()
        session = self.session
        marks = self.watch_marks()
        data = os.urandom(24 * MiB) + b"the tail, well below any mark"
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
        idle = wait_until(
            lambda: len(received) == len(data) and not session.lowat,
            lambda: f"{len(received)} of {len(data)} bytes arrived",
            limit=30,
            every=0.005,
        )

        def batched(_: None) -> Deferred[BaseException | None]:
            sender.join(5)
            reader.join(5)
            self.assertEqual(bytes(received), data)
            self.assertGreater(max(marks), 0, "the bulk transfer never batched")
            self.assertLessEqual(max(marks), splice._LOWAT_MAX)
            self.assertFalse(done.called)
            client_peer.shutdown(socket.SHUT_WR)
            backend_peer.shutdown(socket.SHUT_WR)
            return done

        def check(error: BaseException | None) -> None:
            self.assertIsNone(error)
            self.assertEqual(record.bytes_from_client, len(data))
            self.assertIsNone(session._timer)
            for sock in (client_side, backend_side):
                self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT), 1)

        return idle.addCallback(batched).addCallback(check)

    def test_flow_control_bounds_buffering(self) -> Deferred[None]:
        """A backend that does not read stalls the client; nothing piles up."""
        record, done, (client_peer, client_side, backend_side, backend_peer) = self.run_session()
        total = 96 * MiB
        progress = [0]

        def client() -> None:
            chunk = b"x" * MiB
            for _ in range(total // MiB):
                client_peer.sendall(chunk)
                progress[0] += len(chunk)
            client_peer.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=client, daemon=True)
        sender.start()
        stalled: Deferred[None] = Deferred()
        reactor.callLater(2.0, stalled.callback, None)

        def while_stalled(_: None) -> Deferred[BaseException | None]:
            # Kernel socket buffers and one pipe hold what the client could
            # send, not the 96 MiB it wanted to.  (The buffers are read, not
            # assumed: Linux grows a receive buffer up to tcp_rmem's maximum,
            # 32 MiB here, for a socket that is read quickly.)
            kernel = sum(
                sock.getsockopt(socket.SOL_SOCKET, option)
                for sock, option in (
                    (client_peer, socket.SO_SNDBUF),
                    (client_side, socket.SO_RCVBUF),
                    (backend_side, socket.SO_SNDBUF),
                    (backend_peer, socket.SO_RCVBUF),
                )
            )
            self.assertLessEqual(progress[0], kernel + splice.PIPE_SIZE)
            self.assertLess(progress[0], total)
            self.assertLessEqual(record.bytes_from_client, progress[0] + MiB)
            received = threading.Thread(
                target=lambda: progress.append(len(read_all(backend_peer))), daemon=True
            )
            received.start()

            def finish_backend(error: BaseException | None) -> BaseException | None:
                return error

            # The backend now reads everything, then closes its side.
            def close_backend() -> None:
                received.join(30)
                backend_peer.shutdown(socket.SHUT_WR)

            threading.Thread(target=close_backend, daemon=True).start()
            return done.addCallback(finish_backend)

        def check(error: BaseException | None) -> None:
            sender.join(30)
            self.assertIsNone(error)
            self.assertEqual(progress[-1], total)
            self.assertEqual(record.bytes_from_client, total)

        return stalled.addCallback(while_stalled).addCallback(check)

    def test_idle_connections_hold_no_pipes(self) -> Deferred[None]:
        """Pipes are borrowed only while bytes are in flight, then pooled.

        Forty sessions each move a message and fall idle.  Beyond their
        sockets the process holds the engine's epoll and at most the pool's
        empty pipes (32, two descriptors each): bounded, where pipes held per
        connection would add four descriptors for each of the forty.
        """
        baseline = len(os.listdir("/proc/self/fd"))
        sessions = [self.run_session() for _ in range(40)]
        for session in sessions:
            session[2][0].sendall(b"ping" * 1000)
        settled: Deferred[None] = Deferred()
        reactor.callLater(0.3, settled.callback, None)

        def check(_: None) -> Deferred[list[BaseException | None]]:
            for session in sessions:
                backend_peer = session[2][3]
                backend_peer.settimeout(5)
                self.assertEqual(len(backend_peer.recv(1 << 20, socket.MSG_WAITALL)), 4000)
            extra = len(os.listdir("/proc/self/fd")) - baseline - 4 * 40
            self.assertLessEqual(extra, 1 + 2 * 32)
            for session in sessions:
                session[2][0].shutdown(socket.SHUT_WR)
                session[2][3].shutdown(socket.SHUT_WR)
            return gatherResults([done for _, done, _ in sessions])

        def ended(errors: list[BaseException | None]) -> None:
            self.assertEqual(errors, [None] * 40)

        return settled.addCallback(check).addCallback(ended)

    def test_reset_ends_the_session_with_an_error(self) -> Deferred[None]:
        _, done, (client_peer, _, _, backend_peer) = self.run_session()
        client_peer.sendall(b"hello")
        # An RST from the backend's side.
        backend_peer.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        backend_peer.close()
        client_peer.sendall(b"more" * 1000)

        def check(error: BaseException | None) -> None:
            self.assertIsInstance(error, OSError)

        return done.addCallback(check)


@pytest.mark.interop
@pytest.mark.parametrize("engine", ["lean", "twisted"])
@pytest.mark.parametrize("zero_copy", [True, False])
def test_bulk_through_twistd_both_paths(
    tmp_path_factory: pytest.TempPathFactory, zero_copy: bool, engine: str
) -> None:
    """48 MiB echoed through a real front, spliced or copied, on either engine."""
    try:
        go_binary()
    except GoUnavailableError as error:
        pytest.skip(str(error))
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    secret = pki.certs["secret.example"]
    with GoBackend([(secret.chain, secret.key)]) as backend:
        config = {
            "ech": {"keys": [{"file": str(pki.ech_key)}]},
            "relay": {"splice": zero_copy},
            "front": {"engine": engine},
            "backends": {"b": {"endpoint": f"tcp:host=127.0.0.1:port={backend.port}"}},
            "routes": [{"name": "secret.example", "backend": "b"}],
        }
        with FrontProcess(tmp_path_factory.mktemp("front"), config) as front:
            (result,) = run_client(
                f"127.0.0.1:{front.port}",
                name="secret.example",
                ech=pki.ech_config_list,
                ca=pki.ca,
                send=48 * MiB,
            )
            assert result["ok"] and result["ech_accepted"] and result["echo_ok"], result
            assert result["sent"] == result["received"] == 48 * MiB
            deadline = time.monotonic() + 10
            while f"zero_copy={zero_copy}" not in front.log_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert f"zero_copy={zero_copy}" in front.log_text()
