"""The exit's link and the relayed-hello decoding, in process (RFC 9849 §10.10.6).

tests.test_exit runs whole fronts and exits; here the pieces are driven
directly: :class:`~echfront.front.exitlink.ExitListenEndpoint` on a real
loopback socket with Twisted TLS clients (with the front's certificate,
without one), :func:`~echfront.front.exitlink.exit_tls_options` on bad
files, and :meth:`~echfront.ech.decoder.ECHDecoder.decode_relayed` on
ClientHello bytes.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from echfront.ech.decoder import ECHDecoder, ECHStatus
from echfront.ech.keyset import KeySet, generate_key
from echfront.ech.probe import build_probe
from echfront.errors import ConfigError, IllegalParameter
from echfront.front.exitlink import (
    ExitLinkProtocol,
    ExitListenEndpoint,
    exit_tls_options,
    trusted_link,
)
from echfront.tls.records import CONTENT_HANDSHAKE, HandshakeReader, frame_records
from tests.linkpki import EXIT_NAME, LinkPki, make_link_pki

reactor: Any = global_reactor


class _Seen(Protocol):
    """Server side: reports, at its first bytes, what the link says about the peer."""

    def __init__(self, seen: Deferred[tuple[bool, int]]) -> None:
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        link: Any = self.transport
        assert isinstance(link, ExitLinkProtocol)
        tcp: Any = link.transport  # the TCP transport under the TLS
        handle = tcp.getHandle()
        no_delay = handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        if not self.seen.called:
            self.seen.callback((trusted_link(link), no_delay))
        # What the relay does when the backend sends FIN (a half-close).
        link.loseWriteConnection()


class _Lost(Protocol):
    """Client side: fires when the connection ends, with why (the exception, as a value)."""

    def __init__(self, lost: Deferred[BaseException]) -> None:
        self.lost = lost

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"relayed bytes")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if not self.lost.called:
            self.lost.callback(reason.value or ConnectionError())


class ExitListenerTests(TestCase):
    """A real exit listener on loopback, real TLS clients."""

    timeout = 30

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        # Not trial's mktemp, which writes below the working directory.
        directory = Path(tempfile.mkdtemp(prefix="exitlink-"))
        self.addCleanup(shutil.rmtree, directory, True)
        self.link: LinkPki = make_link_pki(directory)
        self.seen: Deferred[tuple[bool, int]] = Deferred()
        options = exit_tls_options(self.link.exit_cert, self.link.exit_key, self.link.ca)
        endpoint = ExitListenEndpoint(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), options, reactor
        )
        factory = Factory.forProtocol(lambda: _Seen(self.seen))
        listening = endpoint.listen(factory)

        def listening_on(port: Any) -> None:
            self.port: Any = port
            self.addCleanup(port.stopListening)

        return listening.addCallback(listening_on)

    def _connect(self, cert: Path | None, key: Path | None) -> Deferred[BaseException]:
        trust = Certificate.loadPEM(self.link.ca.read_bytes())
        # The client certificate as cryptography objects (pyOpenSSL's own
        # types are deprecated there), as echfront's etcd client passes it.
        client: dict[str, object] = {}
        if cert is not None and key is not None:
            client["certificate"] = x509.load_pem_x509_certificate(cert.read_bytes())
            client["privateKey"] = serialization.load_pem_private_key(key.read_bytes(), None)
        options = optionsForClientTLS(EXIT_NAME, trustRoot=trust, extraCertificateOptions=client)
        number = self.port.getHost().port
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", number))
        lost: Deferred[BaseException] = Deferred()
        connecting = endpoint.connect(Factory.forProtocol(lambda: _Lost(lost)))

        def failed(failure: Failure) -> None:
            lost.callback(failure.value or ConnectionError())

        connecting.addErrback(failed)
        return lost

    async def test_front_certificate_makes_a_trusted_link_without_nagle(self) -> None:
        lost = self._connect(self.link.front_cert, self.link.front_key)
        trusted, no_delay = await self.seen
        assert trusted is True
        assert no_delay == 1  # small relayed writes are not held back
        # The half-close reached the front as TLS's close_notify, not a bare
        # FIN that its TLS layer would report as a truncated connection.
        reason = await lost
        assert isinstance(reason, ConnectionDone), reason

    async def test_no_certificate_never_reaches_the_protocol(self) -> None:
        reason = await self._connect(None, None)
        assert not self.seen.called
        assert "certificate required" in str(reason), reason

    async def test_another_cas_certificate_never_reaches_the_protocol(self) -> None:
        reason = await self._connect(self.link.rogue_cert, self.link.rogue_key)
        assert not self.seen.called
        assert "unknown ca" in str(reason), reason


def test_plain_transports_are_not_trusted() -> None:
    assert trusted_link(object()) is False
    assert trusted_link(None) is False


def test_options_errors_name_the_key(tmp_path: Path) -> None:
    link = make_link_pki(tmp_path / "link")
    with pytest.raises(ConfigError, match=r"^exit\.client_ca: .*cannot read"):
        exit_tls_options(link.exit_cert, link.exit_key, tmp_path / "missing.pem")
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^exit\.client_ca: .*no PEM CERTIFICATE"):
        exit_tls_options(link.exit_cert, link.exit_key, empty)
    with pytest.raises(ConfigError, match=r"^exit\.cert: "):
        exit_tls_options(tmp_path / "none.pem", None, link.ca)


# -- decode_relayed ------------------------------------------------------------------


KEY = generate_key("public.example")


def test_relayed_inner_hello_counts_as_accepted_and_is_forwarded_as_is() -> None:
    probe = build_probe("secret.example", KEY.config)
    records = frame_records(CONTENT_HANDSHAKE, 0x0301, probe.inner)
    flight = HandshakeReader(1).feed(records)
    assert flight is not None
    info = ECHDecoder(KeySet()).decode_relayed(flight)
    assert info.status is ECHStatus.ACCEPTED
    assert info.server_name == "secret.example"
    assert info.inner is not None and info.inner.server_name() == "secret.example"
    assert info.forward == records
    assert info.config_id is None and info.key is None and info.second_hello is None


def test_the_same_hello_elsewhere_is_illegal_parameter() -> None:
    """RFC 9849 §7: a client-facing server refuses an inner-type hello."""
    probe = build_probe("secret.example", KEY.config)
    flight = HandshakeReader(1).feed(frame_records(CONTENT_HANDSHAKE, 0x0301, probe.inner))
    assert flight is not None
    with pytest.raises(IllegalParameter):
        ECHDecoder(KeySet([KEY])).decode(flight)


def test_other_hellos_on_a_relayed_link_decode_as_usual() -> None:
    """An outer hello (ECH the front rejected, or none) goes through the ordinary decoder."""
    probe = build_probe("secret.example", KEY.config)
    flight = HandshakeReader(1).feed(probe.records)
    assert flight is not None
    decoder = ECHDecoder(KeySet([KEY]))
    info = decoder.decode_relayed(flight)
    assert info.status is ECHStatus.ACCEPTED  # decrypted with the key, as decode() does
    assert info.config_id == KEY.config_id
    stranger = ECHDecoder(KeySet()).decode_relayed(flight)
    assert stranger.status is ECHStatus.REJECTED
    assert stranger.server_name == "public.example"


def test_a_malformed_inner_extension_is_not_trusted() -> None:
    """Only the exact inner-type extension (type 0xfe0d, length 1, value 1) counts."""
    probe = build_probe("secret.example", KEY.config)
    inner = probe.inner.replace(b"\xfe\x0d\x00\x01\x01", b"\xfe\x0d\x00\x01\x07")
    assert inner != probe.inner
    flight = HandshakeReader(1).feed(frame_records(CONTENT_HANDSHAKE, 0x0301, inner))
    assert flight is not None
    with pytest.raises(IllegalParameter):
        ECHDecoder(KeySet()).decode_relayed(flight)
