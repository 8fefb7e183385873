"""An HTTP/3 backend that confirms ECH as a split-mode backend: aioquic plus a small TLS hook.

In split mode (RFC 9849 §3.1) the front decrypts the ClientHelloOuter and
forwards the ClientHelloInner; the backend terminates TLS and tells the
client that ECH was accepted.  aioquic knows nothing of ECH, so
:class:`EchServerContext` (a subclass of aioquic's TLS ``Context``, put on
each server connection) adds what a backend must do:

* a ClientHello carrying ``encrypted_client_hello`` of type ``inner``
  (RFC 9849 §5) gets the acceptance signal in the last 8 bytes of
  ServerHello.random (§7.2): HKDF-Expand-Label(HKDF-Extract(0,
  ClientHelloInner.random), "ech accept confirmation", the transcript hash
  up to the ServerHello with those bytes zeroed, 8);
* HelloRetryRequest, which aioquic's server does not do at all: when none of
  the client's key shares is in the server's groups (``--groups``) but a
  group of both is, it sends a HelloRetryRequest for it (RFC 8446 §4.1.4)
  with, for an inner hello, an ``encrypted_client_hello`` extension holding
  the §7.2.1 signal ("hrr ech accept confirmation", transcript
  message_hash(ClientHelloInner1) || HelloRetryRequest with those 8 bytes
  zeroed), and then takes the second ClientHello on that transcript.

The HTTP/3 application answers ``GET /`` with one line naming what the
backend saw (``name=<this backend> sni=<server name> ech=inner|outer|none
hrr=<0|1>``), and ``GET /bytes/N`` with N bytes of
``shake_256(b"echfront")`` (:func:`payload`), so a client can check a
download byte for byte.

Run as a script (``python tests/quicbackend.py --port P --cert C --key K``)
it prints ``ready PORT`` once listening, and one line per ClientHello on
standard error (``hello sni=NAME ech=inner|outer|none``); :class:`QuicBackend`
runs it as a subprocess.  Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent
from cryptography.hazmat.primitives import hashes

from tests.processes import stop_process

__all__ = ["EXT_ECH", "EchServerContext", "QuicBackend", "confirmation", "main", "payload"]

#: encrypted_client_hello (RFC 9849 §11.1); type 1 in a ClientHello is ``inner``.
EXT_ECH = 0xFE0D
_INNER = b"\x01"
#: ServerHello.random of a HelloRetryRequest (RFC 8446 §4.1.3).
HRR_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()
_KEY_SHARE = 51
_MESSAGE_HASH = 254
_CHUNK = 1 << 20


def payload(size: int) -> bytes:
    """The first ``size`` bytes every ``/bytes/N`` download carries."""
    return hashlib.shake_256(b"echfront").digest(size)


def confirmation(
    algorithm: Any, inner_random: bytes, transcript_hash: bytes, *, hello_retry: bool
) -> bytes:
    """The 8-byte ECH acceptance signal (RFC 9849 §7.2, §7.2.1), with aioquic's HKDF."""
    zeros = bytes(algorithm.digest_size)
    secret = tls.hkdf_extract(algorithm, zeros, inner_random)
    label = b"hrr ech accept confirmation" if hello_retry else b"ech accept confirmation"
    return tls.hkdf_expand_label(algorithm, secret, label, transcript_hash, 8)


def _transcript(algorithm: Any, *messages: bytes) -> bytes:
    digest = hashes.Hash(algorithm)
    for message in messages:
        digest.update(message)
    return bytes(digest.finalize())


#: aioquic's own ServerHello writer (the module name is swapped during a hello).
_PUSH_SERVER_HELLO = tls.push_server_hello


def _server_hello_bytes(hello: tls.ServerHello) -> bytes:
    buf = Buffer(capacity=4096)
    _PUSH_SERVER_HELLO(buf, hello)
    return buf.data


class EchServerContext(tls.Context):
    """aioquic's server TLS with the ECH acceptance signal and HelloRetryRequest (module doc)."""

    #: Send the acceptance signals (off: a backend that does not confirm ECH).
    confirm = True
    #: Set on the connection's context: what this backend saw, for the page.
    ech = "none"
    server_name = ""
    hello_retried = False
    _prefix = b""
    _inner_random = b""

    def _server_handle_hello(
        self, input_buf: Buffer, initial_buf: Buffer, handshake_buf: Buffer
    ) -> None:
        message = input_buf.data_slice(0, input_buf.capacity)
        hello = tls.pull_client_hello(Buffer(data=message))
        ech = [value for kind, value in hello.other_extensions if kind == EXT_ECH]
        self.ech = "none" if not ech else ("inner" if ech[0] == _INNER else "outer")
        self.server_name = hello.server_name or ""
        print(f"hello sni={self.server_name} ech={self.ech}", file=sys.stderr, flush=True)
        if self.ech == "inner" and not self._inner_random:
            self._inner_random = hello.random
        if not self.hello_retried and self._needs_retry(hello):
            self._send_hello_retry(hello, message, initial_buf)
            input_buf.seek(input_buf.capacity)  # the caller checks it was all read
            return
        # aioquic builds the key schedule and pushes the ServerHello in one
        # method: its two module names are swapped for the call's duration
        # (one thread; restored in finally).
        original_schedule, original_push = tls.KeySchedule, _PUSH_SERVER_HELLO
        context = self

        class SeededSchedule(tls.KeySchedule):
            def __init__(self, cipher_suite: tls.CipherSuite) -> None:
                super().__init__(cipher_suite)
                if context._prefix:
                    self.update_hash(context._prefix)  # message_hash(CH1) || HRR

        def push_confirmed(buf: Buffer, server_hello: tls.ServerHello) -> None:
            if context.ech == "inner" and context.confirm:
                schedule = context.key_schedule
                assert schedule is not None
                zeroed = dataclasses.replace(
                    server_hello, random=server_hello.random[:24] + bytes(8)
                )
                digest = schedule.hash.copy()
                digest.update(_server_hello_bytes(zeroed))
                signal = confirmation(
                    schedule.algorithm, context._inner_random, digest.finalize(), hello_retry=False
                )
                server_hello.random = server_hello.random[:24] + signal
                context.server_random = server_hello.random
            original_push(buf, server_hello)

        module: Any = tls  # the two names are module attributes, swapped on purpose
        module.KeySchedule, module.push_server_hello = SeededSchedule, push_confirmed
        try:
            super()._server_handle_hello(input_buf, initial_buf, handshake_buf)
        finally:
            module.KeySchedule, module.push_server_hello = original_schedule, original_push

    def _needs_retry(self, hello: tls.ClientHello) -> bool:
        shared = {group for group, _key in hello.key_share or []}
        return not shared & set(self._supported_groups)

    def _send_hello_retry(self, hello: tls.ClientHello, message: bytes, out: Buffer) -> None:
        """A HelloRetryRequest for a group both sides support (RFC 8446 §4.1.4)."""
        offered = hello.supported_groups or []
        group = next((g for g in self._supported_groups if g in offered), None)
        if group is None:
            raise tls.AlertHandshakeFailure("No supported group")
        suite = tls.negotiate(
            self._cipher_suites,
            hello.cipher_suites,
            tls.AlertHandshakeFailure("No supported cipher suite"),
        )
        algorithm = tls.cipher_suite_hash(suite)
        extensions = [(_KEY_SHARE, int(group).to_bytes(2, "big"))]
        if self.ech == "inner":
            extensions.append((EXT_ECH, bytes(8)))
        retry = tls.ServerHello(
            random=HRR_RANDOM,
            legacy_session_id=hello.legacy_session_id,
            cipher_suite=suite,
            compression_method=tls.CompressionMethod.NULL,
            supported_version=tls.TLS_VERSION_1_3,
            other_extensions=extensions,
        )
        digest = _transcript(algorithm, message)
        message_hash = bytes((_MESSAGE_HASH, 0, 0, len(digest))) + digest
        if self.ech == "inner" and self.confirm:
            transcript = _transcript(algorithm, message_hash, _server_hello_bytes(retry))
            signal = confirmation(algorithm, self._inner_random, transcript, hello_retry=True)
            extensions[-1] = (EXT_ECH, signal)
        encoded = _server_hello_bytes(retry)
        out.push_bytes(encoded)
        self._prefix = message_hash + encoded
        self.hello_retried = True


class EchQuicConnection(QuicConnection):
    """A server connection whose TLS is :class:`EchServerContext`, with chosen groups."""

    groups: Sequence[tls.Group] = ()
    confirm = True

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls.__class__ = EchServerContext
        assert isinstance(self.tls, EchServerContext)
        self.tls.confirm = self.confirm
        if self.groups:
            self.tls._supported_groups = list(self.groups)


class _Http3(QuicConnectionProtocol):
    """``GET /`` and ``GET /bytes/N`` over HTTP/3 (module docstring)."""

    name = "backend"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h3: H3Connection | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if self._h3 is None:
            self._h3 = H3Connection(self._quic)
        for h3_event in self._h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                headers = dict(h3_event.headers)
                self._answer(h3_event.stream_id, headers.get(b":path", b"/").decode())

    def _answer(self, stream_id: int, path: str) -> None:
        assert self._h3 is not None
        context = self._quic.tls
        if path.startswith("/bytes/") and path[7:].isdigit():
            size = int(path[7:])
            self._h3.send_headers(
                stream_id,
                [(b":status", b"200"), (b"content-length", str(size).encode())],
            )
            body = payload(size)
            for start in range(0, size, _CHUNK):
                end = min(size, start + _CHUNK)
                self._h3.send_data(stream_id, body[start:end], end_stream=end == size)
            if not size:
                self._h3.send_data(stream_id, b"", end_stream=True)
        else:
            retried = int(getattr(context, "hello_retried", False))
            line = (
                f"name={self.name} sni={getattr(context, 'server_name', '')} "
                f"ech={getattr(context, 'ech', 'none')} hrr={retried}\n"
            ).encode()
            self._h3.send_headers(
                stream_id, [(b":status", b"200"), (b"content-length", str(len(line)).encode())]
            )
            self._h3.send_data(stream_id, line, end_stream=True)
        self.transmit()


async def _serve(args: argparse.Namespace) -> None:
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(args.cert, args.key)
    groups = tuple(tls.Group[name.upper()] for name in args.groups.split(",") if name)

    def protocol(connection: QuicConnection, **kwargs: Any) -> _Http3:
        connection.__class__ = EchQuicConnection
        assert isinstance(connection, EchQuicConnection)
        connection.groups = groups
        connection.confirm = not args.no_confirm
        handler = _Http3(connection, **kwargs)
        handler.name = args.name
        return handler

    server = await serve(
        args.host, args.port, configuration=config, create_protocol=protocol, retry=args.retry
    )
    transport: Any = server._transport
    print(f"ready {transport.get_extra_info('sockname')[1]}", flush=True)
    await asyncio.get_running_loop().create_future()  # until killed


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until killed (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--name", default="backend")
    parser.add_argument(
        "--groups", default="", help="comma-separated aioquic Group names, e.g. secp256r1"
    )
    parser.add_argument("--retry", action="store_true", help="validate addresses with Retry")
    parser.add_argument(
        "--no-confirm", action="store_true", help="never send the ECH acceptance signal"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


class QuicBackend:
    """This module run as a subprocess, as a context manager; :attr:`port` once ready."""

    #: Seconds the subprocess gets to print its ready line.
    START_TIMEOUT = 30.0

    def __init__(
        self,
        cert: Path,
        key: Path,
        *,
        name: str = "backend",
        groups: Sequence[str] = (),
        retry: bool = False,
        confirm: bool = True,
        log: Path | None = None,
    ) -> None:
        self.args = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--name",
            name,
            "--groups",
            ",".join(groups),
        ]
        if retry:
            self.args.append("--retry")
        if not confirm:
            self.args.append("--no-confirm")
        self.log = log
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> QuicBackend:
        root = Path(__file__).resolve().parent.parent
        stderr = subprocess.DEVNULL if self.log is None else self.log.open("wb")
        self._proc = subprocess.Popen(
            self.args,
            cwd=root,
            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert self._proc.stdout is not None
        ready, _w, _x = select.select([self._proc.stdout], [], [], self.START_TIMEOUT)
        line = self._proc.stdout.readline().decode().split() if ready else ["timeout"]
        if len(line) != 2 or line[0] != "ready":
            self.__exit__(None, None, None)
            raise RuntimeError(f"the QUIC backend did not start: {line}")
        self.port = int(line[1])
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            stop_process(self._proc, 10.0)
            self._proc = None


if __name__ == "__main__":
    main()
