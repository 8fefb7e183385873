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
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
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
