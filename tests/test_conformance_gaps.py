# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""Checklist rows the code implemented but no test proved (docs/conformance.toml names them).

Each test is named after its row of docs/ech-spec-checklist.md.  They drive
a real :class:`~echfront.front.protocol.FrontProtocol` in memory, as
tests/test_relay.py and tests/test_local.py do: a recording backend on a
``MemoryReactorClock`` for the relayed path, and real pyOpenSSL for the
locally terminated public name.
"""

from __future__ import annotations

import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from echfront.app.certs import TestCA
from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus
from echfront.ech.hpke import RecipientKey
from echfront.ech.keyset import KeySet, generate_key
from echfront.front.local import local_target
from echfront.front.protocol import FrontFactory
from echfront.front.state import FrontSettings, FrontState
from echfront.front.tlsoptions import load_certificate_options
from echfront.interfaces import IRouter
from echfront.targets import Local, Route
from echfront.tls.hello import HANDSHAKE_SERVER_HELLO, ServerHello
from echfront.tls.records import HandshakeReader
from tests.echhello import (
    EXT_ECH,
    EXT_GROUPS,
    EXT_KEY_SHARE,
    EXT_PSK_MODES,
    EXT_SIGALGS,
    EXT_SNI,
    EXT_VERSIONS,
    InnerSpec,
    OuterItem,
    grease_extension,
    seal_hello,
    sni,
    versions,
)
from tests.frontproc import FrontProcess, free_port, make_pki
from tests.gotools import GoUnavailableError, go_binary, run_client
from tests.test_relay import KEY, PUBLIC_NAME, RelayTestCase, inner_records
from tests.twistedhelpers import CCS, CLIENT_ADDRESS, Network, RecordingServer, server_hello

EXT_PRE_SHARED_KEY = 0x0029
#: SHA-256("HelloRetryRequest"), the random of a HelloRetryRequest (RFC 8446 §4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def count_hpke_setups(case: SynchronousTestCase) -> list[int]:
    """Count RecipientKey.setup (HPKE SetupBaseR) calls for the rest of ``case``."""
    calls: list[int] = []
    original = RecipientKey.setup

    def counting(key: RecipientKey, *args: Any) -> Any:
        calls.append(1)
        return original(key, *args)

    case.patch(RecipientKey, "setup", counting)
    return calls


class AfterTheFirstHelloTests(RelayTestCase):
    """What the front does with the client's later hellos (RFC 9849 §7.1.1)."""

    def test_REJ_4_second_hello_after_a_rejected_first_is_not_decrypted(self) -> None:
        """After a rejected CH1, CH2 is passed on untouched: no HPKE, no rewrite.

        CH1 is sealed under a stale key with the front's config_id (one
        failed open, then the rejection path); the backend answers with a
        HelloRetryRequest; CH2 is a hello the front *could* decrypt.  It
        must reach the backend byte for byte, and cost no HPKE operation.
        """
        setups = count_hpke_setups(self)
        stale = generate_key(PUBLIC_NAME, config_id=KEY.config_id)
        first = seal_hello(stale.config, InnerSpec())
        pipe, front, client, _backend_pipe, backend = self.relay_to(first.records)
        assert front.record.hello is not None
        self.assertIs(front.record.hello.status, ECHStatus.REJECTED)
        self.assertEqual(len(setups), 1)

        backend.send(server_hello(retry=True))
        self.net.flush()
        decryptable = seal_hello(KEY.config, InnerSpec(), record_version=0x0303)
        pipe.client.write(CCS + decryptable.records)
        self.net.flush()

        self.assertEqual(bytes(backend.data), first.records + CCS + decryptable.records)
        self.assertEqual(bytes(client.data), server_hello(retry=True))
        self.assertEqual(len(setups), 1)
        self.assertFalse(pipe.server.disconnecting)

    def test_HRR_11_hello_after_a_server_hello_passes_through(self) -> None:
        """Once the backend sent a ServerHello (not an HRR), another ClientHello is its problem.

        The front neither decrypts nor refuses it: the bytes reach the
        backend unchanged and the client gets no alert from the front.
        """
        setups = count_hpke_setups(self)
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, front, client, _backend_pipe, backend = self.relay_to(sealed.records)
        assert front.info is not None
        self.assertIs(front.info.status, ECHStatus.ACCEPTED)
        hello = server_hello()
        backend.send(hello)
        self.net.flush()

        again = seal_hello(KEY.config, InnerSpec(), record_version=0x0303)
        pipe.client.write(again.records)
        self.net.flush()

        self.assertEqual(bytes(backend.data), inner_records(sealed) + again.records)
        self.assertEqual(bytes(client.data), hello)
        self.assertEqual(len(setups), 1)  # CH1 only
        self.assertFalse(pipe.server.disconnecting)


# -- the locally terminated public name ------------------------------------------------------

_TMP = tempfile.TemporaryDirectory(prefix="echfront-test-conformance-")
CA = TestCA(Path(_TMP.name) / "ca")
PUBLIC_CERT = CA.issue([PUBLIC_NAME])


@implementer(IRouter)
class ToLocal:
    def __init__(self, target: Local) -> None:
        self.target = target
        self.routed: list[ClientHelloInfo] = []

    def route(self, hello: ClientHelloInfo, peer: IAddress) -> Route:
        self.routed.append(hello)
        return self.target


def grease_psk() -> bytes:
    """pre_shared_key data: one random identity and binder, as a GREASE PSK (RFC 8446 §4.2.11)."""
    identity = bytes((i * 53 + 7) % 256 for i in range(64))
    identities = len(identity).to_bytes(2, "big") + identity + b"\x01\x02\x03\x04"
    binders = b"\x20" + bytes((i * 29 + 5) % 256 for i in range(32))
    return (
        len(identities).to_bytes(2, "big") + identities + len(binders).to_bytes(2, "big") + binders
    )


class PublicNameTerminationTests(SynchronousTestCase):
    """The rejection path ends at the local public-name service (pyOpenSSL)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = Network(self.clock)
        options = load_certificate_options(PUBLIC_CERT.chain, PUBLIC_CERT.key, alpn=())
        target = local_target("public", options, Factory.forProtocol(Protocol), self.clock)
        self.router = ToLocal(target)
        state = FrontState(
            ECHDecoder(KeySet([KEY])), self.router, frozenset({target}), FrontSettings()
        )
        self.factory = FrontFactory(state, self.clock)

    def test_REJ_5_outer_handshake_ignores_a_grease_psk(self) -> None:
        """A rejected hello offering a (GREASE) PSK gets a full handshake.

        RFC 9849 §6.1.2: the outer handshake must not resume, so the
        ServerHello carries no pre_shared_key extension (a client that
        sent a GREASE PSK would abort on one).
        """
        share = X25519PrivateKey.generate().public_key().public_bytes_raw()
        key_share = (36).to_bytes(2, "big") + b"\x00\x1d\x00\x20" + share
        outer: list[OuterItem] = [
            (EXT_SNI, sni(PUBLIC_NAME)),
            (EXT_GROUPS, bytes.fromhex("0004001d0017")),
            (EXT_SIGALGS, bytes.fromhex("0006040308040401")),
            (EXT_KEY_SHARE, key_share),
            (EXT_VERSIONS, versions((0x0304,))),
            (EXT_PSK_MODES, b"\x01\x01"),
            EXT_ECH,
            (EXT_PRE_SHARED_KEY, grease_psk()),  # last, as RFC 8446 §4.2.11 requires
        ]
        hello = seal_hello(KEY.config, InnerSpec(), outer=outer, ech_extension=grease_extension())
        front = self.factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        client = RecordingServer()
        pipe = self.net.connect(client, front)
        pipe.client.write(hello.records)
        self.net.flush()

        (routed,) = self.router.routed
        self.assertIs(routed.status, ECHStatus.REJECTED)
        self.assertEqual(routed.server_name, PUBLIC_NAME)
        flight = HandshakeReader(HANDSHAKE_SERVER_HELLO, require_boundary=False).feed(
            bytes(client.data)
        )
        assert flight is not None, bytes(client.data[:16]).hex()
        server_hello_ = ServerHello.from_message(flight.message)
        self.assertNotEqual(server_hello_.random, HRR_RANDOM)
        self.assertIn(EXT_VERSIONS, server_hello_.extension_types)
        self.assertIn(EXT_KEY_SHARE, server_hello_.extension_types)
        self.assertNotIn(EXT_PRE_SHARED_KEY, server_hello_.extension_types)


# -- REJ-6: the alerts clients send, counted -----------------------------------------------

#: A root the certificate does not chain to (another name, another key).
OTHER_CA = TestCA(Path(_TMP.name) / "other-ca", name="some other CA")


class ClientAlertTests(SynchronousTestCase):
    """Alerts from clients of the locally terminated public name (RFC 9849 §7.1, REJ-6).

    In memory, a Twisted TLS client that does not trust the certificate ends
    the handshake with a fatal alert; the front reads it and counts it by
    name.  The ``ech_required`` alert of a real ECH client is counted by the
    same path: see :func:`test_REJ_6_ech_required_from_a_rejected_go_client`.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = Network(self.clock)
        options = load_certificate_options(PUBLIC_CERT.chain, PUBLIC_CERT.key, alpn=())
        target = local_target("public", options, Factory.forProtocol(Protocol), self.clock)
        state = FrontState(
            ECHDecoder(KeySet([KEY])), ToLocal(target), frozenset({target}), FrontSettings()
        )
        self.factory = FrontFactory(state, self.clock)

    def alerts(self, name: str) -> float | None:
        return self.factory.metrics.registry.get_sample_value(
            "echfront_client_alerts_total", {"alert": name}
        )

    def connect(self, ca: TestCA) -> TLSMemoryBIOProtocol:
        trust = Certificate.loadPEM(ca.cert_path.read_bytes())
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS(PUBLIC_NAME, trustRoot=trust),
            True,
            Factory.forProtocol(Protocol),
            clock=self.clock,
        )
        client = client_factory.buildProtocol(CLIENT_ADDRESS)
        front = self.factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        self.net.connect(client, front)
        self.net.flush()
        return client

    def test_REJ_6_a_client_alert_is_counted_by_name(self) -> None:
        self.connect(OTHER_CA)  # the client cannot verify public.example: unknown_ca (48)
        self.assertEqual(self.alerts("unknown_ca"), 1.0)

    def test_REJ_6_close_notify_is_not_counted(self) -> None:
        client = self.connect(CA)
        self.assertTrue(client._handshakeDone)
        client.loseConnection()  # close_notify, the normal end
        self.net.flush()
        self.assertEqual(self.factory.open_connections, 0)
        self.assertIsNone(self.alerts("close_notify"))
        self.assertEqual([m.samples for m in self.factory.metrics.client_alerts.collect()], [[]])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a front's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _ech_required(port: int) -> float:
    key = ("echfront_client_alerts_total", (("alert", "ech_required"),))
    return _scrape(port).get(key, 0.0)


@pytest.mark.interop
def test_REJ_6_ech_required_from_a_rejected_go_client(tmp_path: Path) -> None:
    """A real client rejected by the local public service sends ech_required; it is counted.

    Go's crypto/tls, given a config the front does not hold, completes the
    outer handshake with public.example (the local ``[public]`` service,
    which cannot send retry_configs), then aborts with ech_required (121,
    RFC 9849 §6.1.6).  A client that offered no ECH sends none.
    """
    try:
        go_binary()
    except GoUnavailableError as error:
        pytest.skip(str(error))
    pki = make_pki(tmp_path / "pki")
    metrics_port = free_port()
    config = {
        "public_name": PUBLIC_NAME,
        "ech": {"keys": [{"file": str(pki.ech_key)}]},
        "public": {"cert": str(pki.certs[PUBLIC_NAME].combined)},
        "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
    }
    with FrontProcess(tmp_path / "front", config) as front:
        (plain,) = run_client(front.address, name=PUBLIC_NAME, ca=pki.ca, http_get="/")
        assert plain["ok"], plain
        (stale,) = run_client(
            front.address, name="secret.example", ech=pki.stale_config_list, ca=pki.ca
        )
        assert stale["ech_rejected"] is True and stale["ok"] is False, stale
        deadline = time.monotonic() + 10
        while _ech_required(metrics_port) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _ech_required(metrics_port) == 1.0, front.log_text()
        samples = _scrape(metrics_port)
        alerts = {k: v for k, v in samples.items() if k[0] == "echfront_client_alerts_total"}
        assert alerts == {("echfront_client_alerts_total", (("alert", "ech_required"),)): 1.0}
