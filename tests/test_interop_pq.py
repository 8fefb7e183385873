"""Post-quantum ECH with real peers: an MLKEM768-X25519 config before an X25519 one.

The keys come from ``echfront keygen --kem ...`` and the combined
ECHConfigList from ``echfront dns`` (which puts the post-quantum config
first whatever the order of its ``--keys``).  Then:

a. Go's crypto/tls client and Go's tls.Server, the server loading the RFC
   9934 files echfront wrote: ECH is accepted, also when the server holds
   only the post-quantum key (so Go reads echfront's X-Wing PKCS#8 and derives
   the same public key from the seed), and rejected when it holds only the
   X25519 key (so the Go client chose the post-quantum config);
b. the same Go client's ClientHello, captured on a socket, decrypts with
   echfront's decoder under the post-quantum key;
c. BoringSSL (curl_cffi, Chrome 136) given the same list skips the config
   whose KEM it lacks: its ClientHello decrypts under the X25519 key;
d. the full path through ``twistd echfront`` holding both keys, to a Go
   backend: ECH accepted for Go (post-quantum) and for BoringSSL (X25519),
   and the front's connection log names the config that decrypted each.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from echfront.app.certs import TestCA
from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus, parse_outer_ech
from echfront.ech.echconfig import KEM_MLKEM768_X25519, KEM_X25519_HKDF_SHA256, decode_config_list
from echfront.ech.grease import is_decoy
from echfront.ech.keyset import ECHKey, KeySet
from echfront.keys.keyfile import read_key_file
from echfront.tls.hello import EXT_ECH
from echfront.tls.records import DEFAULT_MAX_FLIGHT, HandshakeReader
from tests.boringssl import curl_available, fetch
from tests.echhello import capture_first_flight
from tests.frontproc import FrontProcess
from tests.gotools import GoBackend, GoUnavailableError, go_binary, run_client

pytestmark = pytest.mark.interop

PUBLIC = "public.example"
INNER = "secret.example"
PQ_CONFIG_ID = 0x7A
CLASSIC_CONFIG_ID = 0x20
RUN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Keys:
    """Both key files, their keys, and the combined list ``echfront dns`` printed."""

    pq_path: Path
    classic_path: Path
    pq: ECHKey
    classic: ECHKey
    config_list: bytes


def echfront(*args: str) -> str:
    """Run the ``echfront`` command as an operator would; its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "echfront.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("pq-keys")
    pq_path, classic_path = directory / "pq.pem", directory / "x25519.pem"
    for path, kem, config_id in (
        (pq_path, "mlkem768-x25519", PQ_CONFIG_ID),
        (classic_path, "x25519", CLASSIC_CONFIG_ID),
    ):
        echfront(
            "keygen",
            "--public-name",
            PUBLIC,
            "--kem",
            kem,
            "--config-id",
            str(config_id),
            "--max-name-length",
            "32",
            "--out",
            str(path),
        )
    # X25519 file first: dns still publishes the post-quantum config first.
    record = echfront("dns", "--name", INNER, "--keys", str(classic_path), str(pq_path))
    config_list = base64.b64decode(record.strip().partition(' ech="')[2].rstrip('"'))
    (pq,) = read_key_file(pq_path)
    (classic,) = read_key_file(classic_path)
    decoy, *real = decode_config_list(config_list).configs
    assert is_decoy(decoy), "the published list leads with a GREASE decoy (RFC 9849 §6.2.2)"
    assert real == [pq.config, classic.config]
    return Keys(pq_path, classic_path, pq, classic, config_list)


@pytest.fixture(scope="module")
def go() -> None:
    try:
        go_binary()
    except GoUnavailableError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def boringssl() -> None:
    reason = curl_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pq-ca"))


def decode(records: bytes, keys: Keys) -> ClientHelloInfo:
    """Decode with both keys, the X25519 one listed first (order must not matter)."""
    flight = HandshakeReader(1).feed(records)
    assert flight is not None
    return ECHDecoder(KeySet([keys.classic, keys.pq])).decode(flight)


def enc_length(info: ClientHelloInfo) -> int:
    extension = info.outer.get(EXT_ECH)
    assert extension is not None
    return len(parse_outer_ech(extension).enc)


# -- a. Go client and Go server ----------------------------------------------------------


@pytest.mark.parametrize("held", ["both", "pq"])
def test_go_server_accepts_the_combined_list(go: None, keys: Keys, ca: TestCA, held: str) -> None:
    files = [keys.pq_path] if held == "pq" else [keys.classic_path, keys.pq_path]
    public, inner = ca.issue([PUBLIC]), ca.issue([INNER])
    pairs = [(public.chain, public.key), (inner.chain, inner.key)]
    with GoBackend(pairs, ech_keys=files) as backend:
        (result,) = run_client(
            backend.address, name=INNER, ca=ca.cert_path, ech=keys.config_list, send=1000
        )
        (report,) = backend.wait_reports(1)
    assert result["ok"] and result["ech_accepted"] and result["echo_ok"], result
    assert report["ech_accepted"] is True and report["ech_ext"] == "outer"
    assert report["sni"] == INNER


def test_go_client_chooses_the_pq_config(go: None, keys: Keys, ca: TestCA) -> None:
    # A server with only the X25519 key cannot decrypt what Go sent: Go used
    # the first config, the post-quantum one, and gets the retry configs.
    public, inner = ca.issue([PUBLIC]), ca.issue([INNER])
    pairs = [(public.chain, public.key), (inner.chain, inner.key)]
    with GoBackend(pairs, ech_keys=[keys.classic_path]) as backend:
        (result,) = run_client(backend.address, name=INNER, ca=ca.cert_path, ech=keys.config_list)
    assert result["ech_rejected"] is True and not result["ok"], result
    retry = decode_config_list(base64.b64decode(result["retry_configs"])).configs
    assert retry == (keys.classic.config,)


# -- b. Go client hello through echfront's decoder ---------------------------------------------


def test_go_client_hello_decrypts_with_the_pq_key(go: None, keys: Keys) -> None:
    def connect(port: int) -> None:
        run_client(
            f"127.0.0.1:{port}",
            name=INNER,
            ech=keys.config_list,
            insecure=True,
            alpn=["h2", "http/1.1"],
            raw_capture=True,
        )

    records = capture_first_flight(connect)
    info = decode(records, keys)
    assert info.status is ECHStatus.ACCEPTED
    assert info.key is not None and info.key.config.kem_id == KEM_MLKEM768_X25519
    assert info.config_id == PQ_CONFIG_ID
    assert info.server_name == INNER and info.outer.server_name() == PUBLIC
    assert enc_length(info) == 1120
    # The ClientHelloOuter carries X25519MLKEM768 (~1.2 KB) and the 1120-byte
    # enc: under 4 KB, far below the 64 KiB first-flight default.
    assert 2000 < len(records) < 4096 < DEFAULT_MAX_FLIGHT


# -- c. BoringSSL skips the post-quantum config -----------------------------------------------


def test_boringssl_hello_decrypts_with_the_x25519_key(boringssl: None, keys: Keys) -> None:
    def connect(port: int) -> None:
        fetch(
            f"https://{INNER}:{port}/",
            ech_config_list=keys.config_list,
            resolve=[f"{INNER}:{port}:127.0.0.1"],
            timeout=5,
        )

    info = decode(capture_first_flight(connect), keys)
    assert info.status is ECHStatus.ACCEPTED
    assert info.key is not None and info.key.config.kem_id == KEM_X25519_HKDF_SHA256
    assert info.config_id == CLASSIC_CONFIG_ID
    assert info.server_name == INNER
    assert enc_length(info) == 32


# -- d. the full path through twistd echfront ------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A front holding both keys, with echo and HTTP Go backends behind it."""

    front: FrontProcess
    ca: TestCA
    echo: GoBackend
    http: GoBackend


@pytest.fixture(scope="module")
def site(
    go: None, keys: Keys, ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    inner, www, public = ca.issue([INNER]), ca.issue(["www.example"]), ca.issue([PUBLIC])
    with (
        GoBackend([(inner.chain, inner.key)], ident="echo") as echo,
        GoBackend([(www.chain, www.key)], ident="http", mode="http") as http,
    ):
        config = {
            "public_name": PUBLIC,
            # X25519 first in the configuration: published order is PQ first anyway.
            "ech": {"keys": [{"file": str(keys.classic_path)}, {"file": str(keys.pq_path)}]},
            "public": {"cert": str(public.combined)},
            "default": "reject",
            "backends": {
                "echo": {"endpoint": f"tcp:host=127.0.0.1:port={echo.port}"},
                "http": {"endpoint": f"tcp:host=127.0.0.1:port={http.port}"},
            },
            "routes": [
                {"name": INNER, "backend": "echo"},
                {"name": "www.example", "backend": "http"},
            ],
        }
        with FrontProcess(tmp_path_factory.mktemp("pq-front"), config) as front:
            yield Site(front, ca, echo, http)


def accepted_config_ids(front: FrontProcess) -> list[int]:
    """config_id of every ECH-accepted connection in the front's connection log."""
    return [int(m) for m in re.findall(r"\bech=accepted config_id=(\d+)", front.log_text())]


def wait_accepted_config_ids(front: FrontProcess, count: int, timeout: float = 10.0) -> list[int]:
    """Poll (bounded) until ``count`` accepted connections are logged.

    The front logs a connection when it closes, which can be a moment after
    the client has its answer.
    """
    deadline = time.monotonic() + timeout
    found = accepted_config_ids(front)
    while len(found) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        found = accepted_config_ids(front)
    return found


def test_go_client_through_the_front_uses_the_pq_config(site: Site, keys: Keys) -> None:
    before = accepted_config_ids(site.front)
    lines = run_client(
        site.front.address,
        run_timeout=RUN_TIMEOUT,
        name=INNER,
        ca=site.ca.cert_path,
        ech=keys.config_list,
        send=4096,
    )
    (result,) = lines
    assert result["ok"] and result["ech_accepted"] is True and result["echo_ok"], result
    report = result["server_report"]
    assert (report["backend"], report["sni"], report["ech_ext"]) == ("echo", INNER, "inner")
    found = wait_accepted_config_ids(site.front, len(before) + 1)
    assert found == [*before, PQ_CONFIG_ID], site.front.log_text()[-2000:]


def test_boringssl_through_the_front_uses_the_x25519_config(
    boringssl: None, site: Site, keys: Keys
) -> None:
    before = accepted_config_ids(site.front)
    name = "www.example"
    result = fetch(
        f"https://{name}:{site.front.port}/",
        ech_config_list=keys.config_list,
        resolve=[f"{name}:{site.front.port}:127.0.0.1"],
        cafile=str(site.ca.cert_path),
    )
    # BoringSSL completes no handshake whose ECH was rejected (tests/boringssl.py).
    assert result.ok, (result.error_code, result.error, result.ech_log)
    assert result.status == 200
    body = json.loads(result.body)
    assert (body["backend"], body["sni"], body["ech_ext"]) == ("http", name, "inner")
    found = wait_accepted_config_ids(site.front, len(before) + 1)
    assert found == [*before, CLASSIC_CONFIG_ID], site.front.log_text()[-2000:]
