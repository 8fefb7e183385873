"""Real ECH clients over HTTP/3: their Initial datagrams through the sans-IO QUIC wing.

curl_cffi's libcurl (ngtcp2 + BoringSSL, shared/docs/quic-facts.md) sends
its first flight to a loopback UDP socket owned by the test.  The datagrams
go through :func:`~echfront.quic.admission.admit` and an
:class:`~echfront.quic.flow.InitialFlow` until the ClientHello is whole, the
ECH decoder accepts it, and the rewritten Initials decrypt to exactly the
ClientHelloInner; for plain curl, whose inner hello keys X25519, an aioquic
server also negotiates h3 on it.  No handshake completes: nothing answers
the client, which gives up after its timeout (it is killed as soon as the
hello is captured).
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from echfront.app.certs import TestCA
from echfront.ech.decoder import ECHDecoder, ECHStatus
from echfront.ech.echconfig import encode_config_list
from echfront.ech.keyset import KeySet, generate_key
from echfront.quic.admission import admit
from echfront.quic.flow import FlowPhase, InitialFlow
from echfront.quic.hello import decode_first_hello, release
from echfront.quic.packets import PacketType, split_datagram
from tests.boringssl import curl_available
from tests.test_quic_flow import crypto_stream, open_backend

PUBLIC_NAME = "public.example"
SECRET_NAME = "secret.example.org"
KEY = generate_key(PUBLIC_NAME, config_id=0x33)

#: The child: one HTTP/3-only request with a hard ECH config list (see tests/boringssl.py).
CHILD = """
import sys
from curl_cffi import Curl, CurlOpt, CurlHttpVersion
port, ecl, impersonate = sys.argv[1], sys.argv[2], sys.argv[3]
curl = Curl()
if impersonate:
    curl.impersonate(impersonate)
curl.setopt(CurlOpt.URL, f"https://{SECRET}:{port}/")
curl.setopt(CurlOpt.RESOLVE, [f"{SECRET}:{port}:127.0.0.1"])
curl.setopt(CurlOpt.HTTP_VERSION, CurlHttpVersion.V3ONLY)
curl.setopt(CurlOpt.ECH, "hard")
curl.setopt(CurlOpt.ECH, "ecl:" + ecl)
curl.setopt(CurlOpt.TIMEOUT_MS, 4000)
curl.setopt(CurlOpt.NOPROXY, "*")
try:
    curl.perform()
except Exception:
    pass
""".replace("{SECRET}", SECRET_NAME)


def capture(impersonate: str) -> tuple[InitialFlow, bytes, list[bytes]]:
    """Run the client against a bare UDP socket until its ClientHello is whole."""
    reason = curl_available(impersonate or None)
    if reason is not None:
        pytest.skip(reason)
    ecl = base64.b64encode(encode_config_list([KEY.config])).decode("ascii")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        port = str(sock.getsockname()[1])
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, port, ecl, impersonate],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            flow: InitialFlow | None = None
            datagrams: list[bytes] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    datagram, _address = sock.recvfrom(65536)
                except TimeoutError:
                    continue
                now = time.monotonic()
                if flow is None:
                    admission = admit(datagram)
                    assert admission.header is not None, admission.reason
                    flow = InitialFlow(admission.header, now=now)
                datagrams.append(datagram)
                out = flow.client_datagram(datagram, now)
                assert out.error is None, out.error
                if out.hello is not None:
                    return flow, out.hello, datagrams
            raise AssertionError("no complete ClientHello within 20 s")
        finally:
            child.kill()
            child.wait(10)


@pytest.mark.interop
@pytest.mark.parametrize(("impersonate", "packets"), [("", 1), ("chrome136", 2)])
def test_real_client_hello_is_rewritten(impersonate: str, packets: int, tmp_path: Path) -> None:
    flow, hello, datagrams = capture(impersonate)
    assert len(datagrams) == packets  # quic-facts.md: one packet for curl, two for Chrome's shape
    info = decode_first_hello(ECHDecoder(KeySet((KEY,))), hello)
    assert info.status is ECHStatus.ACCEPTED
    assert (info.outer.server_name(), info.server_name, info.alpn) == (
        PUBLIC_NAME,
        SECRET_NAME,
        (b"h3",),
    )
    assert info.inner is not None
    out = release(flow, info)
    assert flow.phase is FlowPhase.TRANSLATING
    key_dcid = flow.original_dcid
    opened = open_backend(out.to_backend, key_dcid=key_dcid)
    assert crypto_stream(opened) == info.inner.message
    if impersonate:
        return  # Chrome's shape keys X25519MLKEM768 only, which aioquic does not do
    issued = TestCA(tmp_path).issue([SECRET_NAME])
    config = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    config.load_cert_chain(issued.chain, issued.key)
    server = QuicConnection(configuration=config, original_destination_connection_id=key_dcid)
    for datagram in out.to_backend:
        server.receive_datagram(datagram, ("127.0.0.1", 4433), now=0.0)
    assert [type(e).__name__ for e in iter(server.next_event, None)] == ["ProtocolNegotiated"]
    (reply, _address), *_rest = server.datagrams_to_send(now=0.0)
    assert split_datagram(reply)[0][0].packet_type is PacketType.INITIAL
