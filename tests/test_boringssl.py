"""BoringSSL (curl_cffi) as a real ECH client: what it sends, how it fails.

These tests pin down the behaviour the rest of the suite relies on when it
drives echfront with BoringSSL through :mod:`tests.boringssl`:

* with an ECHConfigList we made, BoringSSL sends a genuine ECH outer
  extension whose payload we can decrypt, and under ``chrome136`` the inner
  hello uses ech_outer_extensions compression including GREASE types;
* a server that ignores ECH makes the request fail with curl error 101
  (``ECH_REJECTED``) instead of silently talking to the public name;
* an ECHConfigList BoringSSL cannot load fails the request (no downgrade).
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pyhpke
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from tests.boringssl import (
    CURLE_ECH_REQUIRED,
    ECH_REJECTED_MARKER,
    curl_available,
    fetch,
)

pytestmark = pytest.mark.interop

PUBLIC_NAME = "public.example"
BACKEND_NAME = "backend.example"
CONFIG_ID = 0x5A

EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_PRE_SHARED_KEY = 0x0029
EXT_KEY_SHARE = 0x0033
EXT_ECH_OUTER_EXTENSIONS = 0xFD00
EXT_ECH = 0xFE0D
GROUP_X25519MLKEM768 = 0x11EC
KEM_X25519 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM = 0x0001


@pytest.fixture(autouse=True, scope="module")
def _require_curl() -> None:
    reason = curl_available()
    if reason is not None:
        pytest.skip(reason)


# --- ECHConfig (minimal; the project's own key generator replaces this) -------


@dataclass(frozen=True)
class EchKey:
    config: bytes  # one serialized ECHConfig (version, length, contents)
    config_list: bytes  # ECHConfigList: u16 length + configs
    private_key: bytes  # raw X25519 secret


def _v8(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def _v16(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def make_ech_key(public_name: str = PUBLIC_NAME, config_id: int = CONFIG_ID) -> EchKey:
    sk = X25519PrivateKey.generate()
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    contents = (
        bytes([config_id])
        + struct.pack("!H", KEM_X25519)
        + _v16(pk)
        + _v16(struct.pack("!HH", KDF_HKDF_SHA256, AEAD_AES_128_GCM))
        + bytes([0])  # maximum_name_length
        + _v8(public_name.encode("ascii"))
        + _v16(b"")  # extensions
    )
    config = struct.pack("!H", EXT_ECH) + _v16(contents)
    raw_sk = sk.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return EchKey(config=config, config_list=_v16(config), private_key=raw_sk)


# --- ClientHello parsing ---------------------------------------------------------


@dataclass(frozen=True)
class Extension:
    type: int
    offset: int  # offset of the extension *data* within the ClientHello body
    data: bytes


def parse_client_hello(body: bytes) -> tuple[bytes, list[Extension], int]:
    """Parse a ClientHello body: (legacy_session_id, extensions, end offset)."""
    pos = 2 + 32  # legacy_version, random
    session_id = body[pos + 1 : pos + 1 + body[pos]]
    pos += 1 + body[pos]
    (n,) = struct.unpack_from("!H", body, pos)
    pos += 2 + n  # cipher_suites
    pos += 1 + body[pos]  # legacy_compression_methods
    (n,) = struct.unpack_from("!H", body, pos)
    pos += 2
    end = pos + n
    assert end <= len(body)
    extensions = []
    while pos < end:
        ext_type, length = struct.unpack_from("!HH", body, pos)
        extensions.append(Extension(ext_type, pos + 4, body[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    assert pos == end
    return session_id, extensions, end


def by_type(extensions: list[Extension]) -> dict[int, Extension]:
    types = [e.type for e in extensions]
    assert len(types) == len(set(types)), f"duplicate extensions: {types}"
    return {e.type: e for e in extensions}


def server_name(ext: Extension) -> str:
    # ServerNameList: u16 list length, u8 name_type (0 = host_name), u16 name
    assert ext.data[2] == 0
    (n,) = struct.unpack_from("!H", ext.data, 3)
    return ext.data[5 : 5 + n].decode("ascii")


def is_grease(value: int) -> bool:
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


# --- one-connection loopback servers ---------------------------------------------


class OneShotServer:
    """Accept one TCP connection on 127.0.0.1 in a thread and run ``handler`` on it."""

    def __init__(self, handler: Callable[[socket.socket], Any], deadline: float = 20.0) -> None:
        self._handler = handler
        self._deadline = deadline
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.result: Any = None
        self.error: BaseException | None = None
        self.connected = False

    def _run(self) -> None:
        polls = int(self._deadline / 0.1)
        for _ in range(polls):
            if self._stop.is_set():
                return
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connected = True
            conn.settimeout(10)
            try:
                self.result = self._handler(conn)
            except BaseException as e:
                self.error = e
            finally:
                conn.close()
            return

    def __enter__(self) -> OneShotServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self._listener.close()
        assert not self._thread.is_alive()


def capture_client_hello(conn: socket.socket) -> bytes:
    """Read TLS records until one full handshake message is in; return it (with header)."""
    buf = b""
    handshake = b""
    for _ in range(64):  # records
        while len(buf) < 5:
            chunk = conn.recv(65536)
            assert chunk, "client closed before sending a full record"
            buf += chunk
        assert buf[0] == 0x16, f"not a handshake record: {buf[:5].hex()}"
        (length,) = struct.unpack_from("!H", buf, 3)
        while len(buf) < 5 + length:
            chunk = conn.recv(65536)
            assert chunk, "client closed mid-record"
            buf += chunk
        handshake += buf[5 : 5 + length]
        buf = buf[5 + length :]
        if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
            return handshake
    raise AssertionError("ClientHello spans too many records")


@dataclass(frozen=True)
class Pki:
    cafile: str
    chain_file: str  # leaf certificate + key, PEM, for ssl.SSLContext.load_cert_chain


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA and a leaf certificate for the public name."""
    directory: Path = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echfront test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PUBLIC_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(PUBLIC_NAME)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cafile = directory / "ca.pem"
    cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain_file = directory / "public.pem"
    chain_file.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(cafile=os.fspath(cafile), chain_file=os.fspath(chain_file))


def plain_tls_server(pki: Pki) -> Callable[[socket.socket], str]:
    """A TLS 1.3 HTTP/1.1 server for the public name that knows nothing of ECH."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(pki.chain_file)
    context.set_alpn_protocols(["http/1.1"])

    def handle(conn: socket.socket) -> str:
        with context.wrap_socket(conn, server_side=True) as tls:
            request = b""
            for _ in range(64):
                if b"\r\n\r\n" in request:
                    break
                chunk = tls.recv(65536)
                if not chunk:
                    break
                request += chunk
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            return request.decode("latin-1")

    return handle


@pytest.fixture
def ech_key() -> EchKey:
    return make_ech_key()


# --- tests -----------------------------------------------------------------------


def test_chrome136_sends_a_real_ech(ech_key: EchKey) -> None:
    with OneShotServer(capture_client_hello) as server:
        result = fetch(
            f"https://{BACKEND_NAME}:{server.port}/",
            ech_config_list=ech_key.config_list,
            resolve=[f"{BACKEND_NAME}:{server.port}:127.0.0.1"],
            cafile=None,
            impersonate="chrome136",
            timeout=10,
        )
    assert server.error is None, server.error
    assert not result.ok  # the capturing server hangs up after the ClientHello
    handshake: bytes = server.result
    assert handshake[0] == 1  # client_hello
    body = handshake[4 : 4 + int.from_bytes(handshake[1:4], "big")]

    # The outer ClientHello: public name, ECH outer extension, PQ key share.
    _, outer_extensions, _ = parse_client_hello(body)
    outer = by_type(outer_extensions)
    assert server_name(outer[EXT_SERVER_NAME]) == PUBLIC_NAME
    ech = outer[EXT_ECH].data
    assert ech[0] == 0  # ECHClientHelloType outer
    kdf_id, aead_id, config_id = struct.unpack_from("!HHB", ech, 1)
    assert (kdf_id, aead_id, config_id) == (KDF_HKDF_SHA256, AEAD_AES_128_GCM, CONFIG_ID)
    (enc_len,) = struct.unpack_from("!H", ech, 6)
    enc = ech[8 : 8 + enc_len]
    assert len(enc) == 32
    (payload_len,) = struct.unpack_from("!H", ech, 8 + enc_len)
    payload_offset = 10 + enc_len
    payload = ech[payload_offset : payload_offset + payload_len]
    assert len(payload) == payload_len and payload_offset + payload_len == len(ech)

    key_share = outer[EXT_KEY_SHARE].data
    groups = []
    pos = 2
    while pos < len(key_share):
        group, length = struct.unpack_from("!HH", key_share, pos)
        groups.append(group)
        pos += 4 + length
    assert GROUP_X25519MLKEM768 in groups

    # Decrypt the payload: it must be a real EncodedClientHelloInner.
    absolute = outer[EXT_ECH].offset + payload_offset
    aad = body[:absolute] + bytes(payload_len) + body[absolute + payload_len :]
    suite = pyhpke.CipherSuite.new(
        pyhpke.KEMId.DHKEM_X25519_HKDF_SHA256, pyhpke.KDFId.HKDF_SHA256, pyhpke.AEADId(aead_id)
    )
    context = suite.create_recipient_context(
        enc,
        suite.kem.deserialize_private_key(ech_key.private_key),
        info=b"tls ech\x00" + ech_key.config,
    )
    encoded_inner: bytes = context.open(payload, aad=aad)

    session_id, inner_extensions, end = parse_client_hello(encoded_inner)
    assert session_id == b""  # EncodedClientHelloInner omits legacy_session_id
    assert encoded_inner[end:] == bytes(len(encoded_inner) - end)  # zero padding
    inner = by_type(inner_extensions)
    assert server_name(inner[EXT_SERVER_NAME]) == BACKEND_NAME
    assert inner[EXT_ECH].data == b"\x01"  # ECHClientHelloType inner
    assert EXT_SUPPORTED_VERSIONS in inner
    assert EXT_PRE_SHARED_KEY not in inner

    compressed = inner[EXT_ECH_OUTER_EXTENSIONS].data
    assert compressed[0] == len(compressed) - 1
    referenced = [t for (t,) in struct.iter_unpack("!H", compressed[1:])]
    assert any(is_grease(t) for t in referenced), [hex(t) for t in referenced]
    assert EXT_KEY_SHARE in referenced
    # Referenced extensions appear in the outer hello, in the same order.
    outer_order = [e.type for e in outer_extensions]
    positions = [outer_order.index(t) for t in referenced]
    assert positions == sorted(positions)


def test_ech_rejected_by_a_server_without_ech(pki: Pki, ech_key: EchKey) -> None:
    with OneShotServer(plain_tls_server(pki)) as server:
        result = fetch(
            f"https://{BACKEND_NAME}:{server.port}/",
            ech_config_list=ech_key.config_list,
            resolve=[f"{BACKEND_NAME}:{server.port}:127.0.0.1"],
            cafile=pki.cafile,
            timeout=10,
        )
    assert not result.ok
    assert result.error_code == CURLE_ECH_REQUIRED, result
    assert ECH_REJECTED_MARKER in result.error
    assert result.ech_rejected
    # BoringSSL answered the server's Finished with an ech_required alert.
    assert isinstance(server.error, ssl.SSLError), server.error


def test_plain_request_through_the_harness(pki: Pki) -> None:
    with OneShotServer(plain_tls_server(pki)) as server:
        result = fetch(
            f"https://{PUBLIC_NAME}:{server.port}/path",
            ech_config_list=None,
            resolve=[f"{PUBLIC_NAME}:{server.port}:127.0.0.1"],
            cafile=pki.cafile,
            timeout=10,
        )
    assert server.error is None, server.error
    assert result.ok, result
    assert (result.status, result.body, result.http_version) == (200, b"hello", "1.1")
    assert (result.error_code, result.error) == (0, "")
    assert str(server.result).startswith("GET /path HTTP/1.1\r\n")


def test_unloadable_ech_config_list_fails_instead_of_dropping_ech(pki: Pki) -> None:
    # An empty ECHConfigList: without "hard", curl would silently send no ECH.
    with OneShotServer(plain_tls_server(pki)) as server:
        result = fetch(
            f"https://{BACKEND_NAME}:{server.port}/",
            ech_config_list=b"\x00\x00",
            resolve=[f"{BACKEND_NAME}:{server.port}:127.0.0.1"],
            cafile=pki.cafile,
            timeout=10,
        )
    assert not result.ok
    assert result.status is None
    assert any("ech_config_list failed" in line for line in result.ech_log), result
    assert server.result is None  # no request was ever served
