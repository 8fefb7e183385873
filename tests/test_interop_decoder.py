"""Real ECH clients against echfront's decoder, with a key from ``echfront keygen``.

* Go's crypto/tls client and BoringSSL (curl_cffi, Chrome 136 shape, which
  compresses GREASE types and a post-quantum key share into
  ech_outer_extensions) each send a ClientHello to a capturing socket; the
  captured first flight decrypts with :class:`echfront.ech.decoder.ECHDecoder`.
* Go's tls.Server, loaded with the RFC 9934 file ``echfront keygen``
  wrote, accepts ECH from a Go client using the config list keygen printed.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from echfront.app.certs import TestCA
from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus
from echfront.ech.keyset import ECHKey, KeySet
from echfront.keys.keyfile import read_key_file
from echfront.tls.hello import EXT_ECH, EXT_KEY_SHARE, is_grease
from echfront.tls.records import HandshakeReader
from tests.boringssl import curl_available, fetch
from tests.echhello import capture_first_flight
from tests.gotools import GoBackend, GoUnavailableError, go_binary, run_client

pytestmark = pytest.mark.interop

PUBLIC = "public.example"
INNER = "secret.example"


@pytest.fixture(scope="module")
def keygen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ECHKey, bytes]:
    """An ECH key written by the ``echfront keygen`` command, and its printed list."""
    directory = tmp_path_factory.mktemp("keygen")
    path = directory / "ech.pem"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "echfront.cli",
            "keygen",
            "--public-name",
            PUBLIC,
            "--max-name-length",
            "32",
            "--out",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    config_list = base64.b64decode(result.stdout.strip().splitlines()[-1])
    (key,) = read_key_file(path)
    return path, key, config_list


@pytest.fixture(scope="module")
def go() -> None:
    try:
        go_binary()
    except GoUnavailableError as error:
        pytest.skip(str(error))


def decode(records: bytes, key: ECHKey) -> ClientHelloInfo:
    reader = HandshakeReader(1)
    flight = reader.feed(records)
    assert flight is not None
    return ECHDecoder(KeySet([key])).decode(flight)


def test_go_client_hello_decrypts(go: None, keygen: tuple[Path, ECHKey, bytes]) -> None:
    _, key, config_list = keygen

    def connect(port: int) -> None:
        run_client(
            f"127.0.0.1:{port}",
            name=INNER,
            ech=config_list,
            insecure=True,
            alpn=["h2", "http/1.1"],
            raw_capture=True,
        )

    info = decode(capture_first_flight(connect), key)
    assert info.status is ECHStatus.ACCEPTED
    assert info.config_id == key.config_id
    assert info.outer.server_name() == PUBLIC
    assert info.server_name == INNER
    assert info.alpn == (b"h2", b"http/1.1")
    assert info.inner is not None and info.inner.get(EXT_ECH) is not None
    # Go compresses its key_share into ech_outer_extensions: the rebuilt
    # inner carries the outer's key_share bytes.
    share = info.inner.get(EXT_KEY_SHARE)
    assert share is not None and share.raw == info.outer.get(EXT_KEY_SHARE).raw  # type: ignore[union-attr]


@pytest.mark.skipif(curl_available() is not None, reason=str(curl_available()))
def test_boringssl_chrome_client_hello_decrypts(keygen: tuple[Path, ECHKey, bytes]) -> None:
    _, key, config_list = keygen

    def connect(port: int) -> None:
        fetch(
            f"https://{INNER}:{port}/",
            ech_config_list=config_list,
            resolve=[f"{INNER}:{port}:127.0.0.1"],
            timeout=5,
        )

    info = decode(capture_first_flight(connect), key)
    assert info.status is ECHStatus.ACCEPTED
    assert info.server_name == INNER
    assert info.outer.server_name() == PUBLIC
    inner = info.inner
    assert inner is not None
    # Chrome compresses GREASE extensions and its X25519MLKEM768 key share.
    assert any(is_grease(t) for t in inner.extension_types)
    share = inner.get(EXT_KEY_SHARE)
    assert share is not None and b"\x11\xec" in share.data


def test_go_server_accepts_a_keygen_key(
    go: None, keygen: tuple[Path, ECHKey, bytes], tmp_path: Path
) -> None:
    path, _, config_list = keygen
    ca = TestCA(tmp_path)
    public, inner = ca.issue([PUBLIC]), ca.issue([INNER])
    pairs = [(public.chain, public.key), (inner.chain, inner.key)]
    with GoBackend(pairs, ech_keys=[path]) as backend:
        (result,) = run_client(
            backend.address, name=INNER, ca=ca.cert_path, ech=config_list, send=1000
        )
        (report,) = backend.wait_reports(1)
    assert result["ok"] and result["ech_accepted"] and result["echo_ok"], result
    assert report["ech_accepted"] is True and report["ech_ext"] == "outer"
    assert report["sni"] == INNER
