"""The smallest split-mode ECH front in Python: the floor the lean engine is measured against.

Not a product, and not used by echfront: a reference for
``frontbench.py --fronts bare`` (docs/performance.rst, "The floor").  It does
the work of a split-mode front per connection and nothing else, in one
plain ``epoll`` loop with no Twisted at all:

* accept until the queue is empty;
* read the first flight with echfront's own record reader, decode it with
  echfront's own :class:`~echfront.ech.decoder.ECHDecoder` (real HPKE),
  route it with the configured router, all built from the same
  configuration file as ``twistd echfront`` (``build_state``);
* connect to the backend without blocking, send it the rebuilt
  ClientHelloInner, watch its ServerHello with echfront's own
  :class:`~echfront.ech.hrrwatch.HelloRetryWatch`;
* relay both ways with half-close: a FIN is passed on, the connection is
  closed when both directions have ended.

What it leaves out is everything a front must have beyond that: metrics,
the connection log, limits, deadlines, flow control beyond one buffer per
direction, splice, PROXY headers, local TLS, reloads, and every failure
path but the simplest (a refusal is the alert record and a close).  Its CPU
per handshake is therefore a floor for any Python front built on
echfront's decoder, on this machine, in the same run.

Usage: ``barefront.py CONFIG.toml PORT`` (listens on 127.0.0.1:PORT).
"""

from __future__ import annotations

import contextlib
import errno
import select
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from echfront.config.build import build_state
from echfront.config.schema import load_config_file
from echfront.ech.hrrwatch import HelloRetryWatch
from echfront.errors import AlertError, alert_record
from echfront.targets import Backend
from echfront.tls.hello import HANDSHAKE_CLIENT_HELLO
from echfront.tls.records import HandshakeReader

_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_IN_OUT = _IN | select.EPOLLOUT
_RECV = 65536


class Side:
    """One socket of a connection: what waits to be written to it, and whether it ended."""

    __slots__ = ("conn", "ended", "out", "shut", "sock")

    def __init__(self, conn: Conn, sock: socket.socket) -> None:
        self.conn = conn
        self.sock = sock
        self.out = b""
        self.ended = False  # its peer sent FIN
        self.shut = False  # we sent FIN on it


class Conn:
    """One client connection and, once routed, its backend."""

    __slots__ = ("backend", "client", "connected", "reader", "watch")

    def __init__(self, sock: socket.socket) -> None:
        self.client = Side(self, sock)
        self.backend: Side | None = None
        self.reader: HandshakeReader | None = HandshakeReader(HANDSHAKE_CLIENT_HELLO)
        self.watch: HelloRetryWatch | None = None
        self.connected = False


class BareFront:
    """The loop (see the module docstring)."""

    def __init__(self, config_path: Path, port: int) -> None:
        config = load_config_file(config_path)
        # Local services want a reactor; it never runs here.
        self.state = build_state(config, reactor, lambda: keys)
        keys = self.state.decoder.keys
        self.epoll = select.epoll()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.sides: dict[int, Side] = {}
        self.peer = None
        self.running = True

    def run(self) -> None:
        listen_fd = self.listener.fileno()
        poll = self.epoll.poll
        sides = self.sides
        while self.running:
            try:
                events = poll(1.0, 512)
            except InterruptedError:
                continue
            for fd, mask in events:
                if fd == listen_fd:
                    self.accept()
                    continue
                side = sides.get(fd)
                if side is None:
                    continue
                if mask & select.EPOLLOUT and side.out:
                    self.flush(side)
                if mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                    if side is side.conn.client:
                        self.client_readable(side.conn)
                    else:
                        self.backend_readable(side.conn)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    return
                raise
            sock.setblocking(False)
            conn = Conn(sock)
            self.sides[sock.fileno()] = conn.client
            self.epoll.register(sock.fileno(), _IN)

    def read_all(self, side: Side) -> tuple[bytes, bool]:
        """Everything readable now, and whether the peer's FIN is in."""
        chunks: list[bytes] = []
        while True:
            try:
                data = side.sock.recv(_RECV)
            except BlockingIOError:
                return b"".join(chunks), False
            except OSError:
                data = b""
            if not data:
                side.ended = True
                return b"".join(chunks), True
            chunks.append(data)

    def client_readable(self, conn: Conn) -> None:
        side = conn.client
        if side.ended:
            return
        data, ended = self.read_all(side)
        if conn.reader is not None:
            self.first_flight(conn, data)
        elif conn.backend is not None and data:
            if conn.watch is not None and not conn.watch.client_done:
                conn.watch.from_client(data, lambda b: self.send(conn.backend, b))  # type: ignore[arg-type]
            else:
                self.send(conn.backend, data)
        if ended:
            self.ended(conn, side)

    def first_flight(self, conn: Conn, data: bytes) -> None:
        reader = conn.reader
        assert reader is not None
        try:
            flight = reader.feed(data)
            if flight is None:
                if conn.client.ended:
                    self.close(conn)
                return
            conn.reader = None
            info = self.state.decoder.decode(flight)
            route: Any = self.state.router.route(info, self.peer)  # type: ignore[arg-type]
        except AlertError as error:
            self.refuse(conn, alert_record(error.alert))
            return
        if not isinstance(route, Backend) or route.address is None:
            self.refuse(conn, alert_record(getattr(route, "alert", 80)))
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        code = sock.connect_ex(route.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.refuse(conn, alert_record(80))
            return
        backend = conn.backend = Side(conn, sock)
        self.sides[sock.fileno()] = backend
        if info.second_hello is not None:
            conn.watch = HelloRetryWatch(info.second_hello, 1 << 16)
        backend.out = info.forward + info.rest
        self.epoll.register(sock.fileno(), _IN_OUT)

    def refuse(self, conn: Conn, alert: bytes) -> None:
        with contextlib.suppress(OSError):
            conn.client.sock.send(alert)
        self.close(conn)

    def backend_readable(self, conn: Conn) -> None:
        backend = conn.backend
        assert backend is not None
        if backend.ended:
            return
        data, ended = self.read_all(backend)
        if data:
            watch = conn.watch
            if watch is not None and not watch.server_done:
                known = watch.from_server(data, lambda b: self.send(backend, b))
                if known and watch.client_done:
                    conn.watch = None
            self.send(conn.client, data)
        if ended:
            self.ended(conn, backend)

    def send(self, side: Side, data: bytes) -> None:
        if side.out:
            side.out += data
            return
        try:
            sent = side.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return
        if sent < len(data):
            side.out = data[sent:]
            self.epoll.modify(side.sock.fileno(), _IN_OUT)

    def flush(self, side: Side) -> None:
        try:
            sent = side.sock.send(side.out)
        except BlockingIOError:
            return
        except OSError:
            self.close(side.conn)
            return
        side.out = side.out[sent:]
        if not side.out:
            other = side.conn.client if side is side.conn.backend else side.conn.backend
            if other is not None and other.ended:
                self.ended(side.conn, other)

    def ended(self, conn: Conn, side: Side) -> None:
        """``side``'s peer sent FIN: pass it on, close when both have."""
        other = conn.backend if side is conn.client else conn.client
        if other is None:
            self.close(conn)
            return
        if other.ended:
            if not other.out and not side.out:
                self.close(conn)
            return
        if not other.out and not other.shut:
            other.shut = True
            with contextlib.suppress(OSError):
                other.sock.shutdown(socket.SHUT_WR)

    def close(self, conn: Conn) -> None:
        for side in (conn.client, conn.backend):
            if side is not None and self.sides.pop(side.sock.fileno(), None) is not None:
                side.sock.close()


def main(argv: list[str]) -> int:
    front = BareFront(Path(argv[1]), int(argv[2]))

    def stop(*_: object) -> None:
        front.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"barefront listening on 127.0.0.1:{argv[2]}", flush=True)
    front.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
