"""ECH split mode over HTTP/3, end to end over loopback: curl -> echfront (twistd) -> aioquic.

The client is curl_cffi 0.16.3 (libcurl with ngtcp2 and BoringSSL, HTTP/3
only, ``CURLOPT_ECH`` = ``hard`` then ``ecl:<base64>``), plain and shaped
like Chrome 136 (whose ClientHello spans two Initial packets,
quic-facts.md).  The front is ``twistd -n echfront`` with ``listen_quic``.
The backend is aioquic with the test-side hook of :mod:`tests.quicbackend`
that computes the RFC 9849 §7.2 acceptance signal (and §7.2.1 for a
HelloRetryRequest).

How ECH acceptance is observed: libcurl logs no ECH outcome for HTTP/3,
but with ``hard`` BoringSSL aborts any handshake whose ECH was rejected
(curl error 101, ECH_REJECTED), so a page served proves acceptance; the
backend's page also says it read an inner ClientHello (``ech=inner``) for
the inner name, and a backend that does not send the signal is the
negative control (101).  The front's metrics and JSON connection log show
the same flows with ``transport="quic"``.

Load: 500 handshakes at concurrency 16 and a 64 MiB download checked by
SHA-256; ``ECHFRONT_QUIC_LOAD=quick`` runs 100 handshakes and 16 MiB.  The
front's CPU time per handshake and per GB relayed is printed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.boringssl import CURLE_PEER_FAILED_VERIFICATION, curl_available
from tests.frontproc import FrontProcess, FrontStartError, Pki, free_port, make_pki
from tests.quicbackend import QuicBackend, payload

pytestmark = pytest.mark.interop

SECRET = "secret.example"
PUBLIC = "public.example"
#: Seconds a flow may be idle before the front forgets it (and logs it).
IDLE = 1.0
QUICK = os.environ.get("ECHFRONT_QUIC_LOAD", "") == "quick"
HANDSHAKES = 100 if QUICK else 500
CONCURRENCY = 16
DOWNLOAD = (16 if QUICK else 64) << 20

#: The client child: requests over HTTP/3 on threads, one JSON result list on stdout.
CLIENT = r"""
import hashlib, json, sys, threading, time
from curl_cffi import Curl, CurlHttpVersion, CurlInfo, CurlOpt
from curl_cffi.curl import CurlError
spec = json.loads(sys.argv[1])
results, lock, counter = [], threading.Lock(), iter(range(spec["count"]))

def one():
    body, digest, size = bytearray(), hashlib.sha256(), [0]
    def write(data):
        digest.update(data)
        size[0] += len(data)
        if len(body) < 400:
            body.extend(data[: 400 - len(body)])
        return len(data)
    curl = Curl(cacert=spec["cafile"])
    if spec["impersonate"]:
        curl.impersonate(spec["impersonate"])
    if spec["ecl"]:
        curl.setopt(CurlOpt.ECH, "hard")
        curl.setopt(CurlOpt.ECH, "ecl:" + spec["ecl"])
    curl.setopt(CurlOpt.URL, spec["url"])
    curl.setopt(CurlOpt.RESOLVE, [spec["resolve"]])
    curl.setopt(CurlOpt.HTTP_VERSION, CurlHttpVersion.V3ONLY)
    curl.setopt(CurlOpt.NOPROXY, "*")
    curl.setopt(CurlOpt.TIMEOUT_MS, int(spec["timeout"] * 1000))
    curl.setopt(CurlOpt.WRITEFUNCTION, write)
    started, code, error = time.monotonic(), 0, ""
    try:
        curl.perform()
    except CurlError as e:
        code, error = e.code, str(e)
    status = int(curl.getinfo(CurlInfo.RESPONSE_CODE))
    curl.close()
    return {"code": code, "error": error, "status": status, "size": size[0],
            "sha256": digest.hexdigest(), "body": bytes(body).decode("latin-1"),
            "seconds": time.monotonic() - started}

def worker():
    while True:
        with lock:
            if next(counter, None) is None:
                return
        result = one()
        with lock:
            results.append(result)

threads = [threading.Thread(target=worker) for _ in range(spec["concurrency"])]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(results))
"""


@dataclass(frozen=True)
class Result:
    """One request's outcome, as the client child reports it."""

    code: int
    error: str
    status: int
    size: int
    sha256: str
    body: str
    seconds: float


def fetch(
    port: int,
    *,
    ecl: bytes | None,
    pki: Pki,
    path: str = "/",
    impersonate: str = "",
    name: str = SECRET,
    count: int = 1,
    concurrency: int = 1,
    timeout: float = 20.0,
) -> list[Result]:
    """``count`` HTTP/3 requests from a curl_cffi child process (bounded in time)."""
    reason = curl_available(impersonate or None)
    if reason is not None:
        pytest.skip(reason)
    spec = {
        "url": f"https://{name}:{port}{path}",
        "resolve": f"{name}:{port}:127.0.0.1",
        "ecl": None if ecl is None else base64.b64encode(ecl).decode("ascii"),
        "cafile": str(pki.ca),
        "impersonate": impersonate,
        "count": count,
        "concurrency": concurrency,
        "timeout": timeout,
    }
    rounds = -(-count // concurrency)
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(spec)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30 + rounds * timeout,
        check=True,
    )
    return [Result(**item) for item in json.loads(done.stdout)]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Deployment:
    """A front on loopback with ``listen_quic``, metrics and JSON logs."""

    def __init__(self, front: FrontProcess, quic_port: int, metrics_port: int) -> None:
        self.front = front
        self.quic_port = quic_port
        self.metrics_port = metrics_port

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        for _attempt in range(20):  # the metrics listener may start a moment after TCP's
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    text = answer.read().decode()
                break
            except urllib.error.URLError:
                time.sleep(0.25)
        else:
            raise AssertionError(f"no metrics at {url}:\n{self.front.log_text()[-2000:]}")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def flows(self, expected: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The QUIC connection events once ``expected`` are logged (flows end when idle)."""
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            found = []
            for line in self.front.log_text().splitlines():
                if line.startswith("{") and '"transport": "quic"' in line:
                    found.append(json.loads(line))
            if len(found) >= expected:
                break
            time.sleep(0.1)
        return found

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.front.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def deploy(pki: Pki, tmp_path: Path) -> Iterator[Any]:
    """Start fronts (a function of backend port, public QUIC port or None, extra config)."""
    started: list[FrontProcess] = []

    def start(app_port: int, public_port: int | None = None, **extra: Any) -> Deployment:
        # A port found free may be taken before twistd binds it (other tests
        # run on this machine): try again with new ports, a bounded few times.
        for _attempt in range(2):
            try:
                return attempt(app_port, public_port, **extra)
            except FrontStartError as error:
                if "Address already in use" not in str(error):
                    raise
        return attempt(app_port, public_port, **extra)

    def attempt(app_port: int, public_port: int | None, **extra: Any) -> Deployment:
        quic_port, metrics_port = free_udp_port(), free_port()
        public: dict[str, Any] = {
            "cert": str(pki.certs[PUBLIC].chain),
            "key": str(pki.certs[PUBLIC].key),
        }
        if public_port is not None:
            public["quic_endpoint"] = f"127.0.0.1:{public_port}"
        config = {
            "listen_quic": [f"udp:{quic_port}:interface=127.0.0.1"],
            "ech": {"keys": [{"file": str(pki.ech_key)}]},
            "public": public,
            "backends": {"app": {"endpoint": f"tcp:host=127.0.0.1:port={app_port}"}},
            "routes": [{"name": SECRET, "backend": "app"}],
            "quic": {"idle_timeout": IDLE},
            "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
            **extra,
        }
        front = FrontProcess(
            tmp_path / f"front{len(started)}",
            config,
            twistd_args=["--logger=echfront.logs.json_observer"],
        )
        started.append(front)
        front.start()
        return Deployment(front, quic_port, metrics_port)

    yield start
    for front in started:
        front.stop()


def backend(pki: Pki, tmp_path: Path, name: str = SECRET, **options: Any) -> QuicBackend:
    chain, key = pki.pair(name)
    return QuicBackend(chain, key, name=name, log=tmp_path / f"backend-{name}.log", **options)


@pytest.mark.parametrize("impersonate", ["", "chrome136"], ids=["curl", "chrome136"])
def test_ech_accepted_over_http3(impersonate: str, pki: Pki, deploy: Any, tmp_path: Path) -> None:
    """The inner hello reaches the backend, which confirms ECH; the page is served.

    chrome136's ClientHello spans two Initial packets, reassembled by the front.
    """
    with backend(pki, tmp_path) as app:
        site = deploy(app.port)
        (result,) = fetch(site.quic_port, ecl=pki.ech_config_list, pki=pki, impersonate=impersonate)
        assert (result.code, result.status) == (0, 200), result.error
        assert result.body == f"name={SECRET} sni={SECRET} ech=inner hrr=0\n"
        (event,) = site.flows(1)
    assert (event["ech"], event["route"], event["close_reason"]) == (
        "accepted",
        "app",
        "idle timeout",
    )
    assert event["first_flight_bytes"] >= (2400 if impersonate else 1200)
    assert "server_name" not in event
    labels = {"ech": "accepted", "alert": "none", "route": "app", "transport": "quic"}
    assert site.sample("echfront_connections_total", **labels) == 1
    # TCP series are untouched (the readiness probe's TCP connection has no transport label).
    assert site.sample("echfront_connections_total", ech="accepted", alert="none", route="app") == 0


@pytest.mark.parametrize("impersonate", ["", "chrome136"], ids=["curl", "chrome136"])
def test_hello_retry_request(impersonate: str, pki: Pki, deploy: Any, tmp_path: Path) -> None:
    """The backend only does P-256, which neither client key-shares: HelloRetryRequest.

    The second ClientHelloOuter is translated with the first one's HPKE
    context (RFC 9849 §7.1.1); BoringSSL checks the HRR's §7.2.1 signal and
    the ServerHello's §7.2 signal.
    """
    with backend(pki, tmp_path, groups=["secp256r1"]) as app:
        site = deploy(app.port)
        (result,) = fetch(site.quic_port, ecl=pki.ech_config_list, pki=pki, impersonate=impersonate)
        assert (result.code, result.status) == (0, 200), result.error
        assert result.body == f"name={SECRET} sni={SECRET} ech=inner hrr=1\n"
        (event,) = site.flows(1)
    assert (event["ech"], event["hrr"]) == ("accepted", True)
    assert site.sample("echfront_hello_retry_requests_total", transport="quic") == 1


def test_backend_without_the_signal_is_rejected(pki: Pki, deploy: Any, tmp_path: Path) -> None:
    """Negative control: the same backend without the acceptance signal serves nothing.

    BoringSSL takes ECH as rejected and checks the certificate against the
    public name, which the backend's does not carry, so the handshake never
    completes (curl 0.16.3 over HTTP/3 reports a timeout).
    """
    with backend(pki, tmp_path, confirm=False) as app:
        site = deploy(app.port)
        (result,) = fetch(site.quic_port, ecl=pki.ech_config_list, pki=pki, timeout=5.0)
    assert (result.status, result.size) == (0, 0) and result.code != 0, result
    assert "hello sni=secret.example ech=inner" in (tmp_path / f"backend-{SECRET}.log").read_text()


def test_stale_config_goes_to_the_public_name(pki: Pki, deploy: Any, tmp_path: Path) -> None:
    """A config the front does not hold: ECH rejected, routed to the public name as on TCP.

    The public name's QUIC server (the local service's ``quic_endpoint``)
    gets the ClientHelloOuter and authenticates as public.example; it sends
    no retry_configs, so the client stops (RFC 9849 §6.1.6; curl 0.16.3
    over HTTP/3 reports CURLE_PEER_FAILED_VERIFICATION).  Without a
    ``quic_endpoint`` the front refuses with CONNECTION_REFUSED and a
    browser would use TCP.
    """
    with backend(pki, tmp_path) as app, backend(pki, tmp_path, name=PUBLIC) as public:
        site = deploy(app.port, public.port)
        (result,) = fetch(site.quic_port, ecl=pki.stale_config_list, pki=pki)
        assert (result.code, result.status) == (CURLE_PEER_FAILED_VERIFICATION, 0), result
        log = (tmp_path / f"backend-{PUBLIC}.log").read_text()
        assert log.splitlines() == [f"hello sni={PUBLIC} ech=outer"]
        assert not (tmp_path / f"backend-{SECRET}.log").read_text()
        (event,) = site.flows(1)
        assert (event["ech"], event["route"], event["server_name"]) == (
            "rejected",
            "public",
            PUBLIC,
        )
        bare = deploy(app.port)
        started = time.monotonic()
        (refused,) = fetch(bare.quic_port, ecl=pki.stale_config_list, pki=pki, timeout=5.0)
        assert refused.code != 0 and refused.status == 0
        events = bare.flows(1)
    assert events[0]["close_reason"] == "no QUIC endpoint for public"
    assert events[0]["route"] == "public"
    assert time.monotonic() - started < 20


def test_no_ech_routes_by_the_outer_name(pki: Pki, deploy: Any, tmp_path: Path) -> None:
    with backend(pki, tmp_path) as app:
        site = deploy(app.port)
        (result,) = fetch(site.quic_port, ecl=None, pki=pki)
        assert (result.code, result.status) == (0, 200), result.error
        assert result.body == f"name={SECRET} sni={SECRET} ech=none hrr=0\n"
        (event,) = site.flows(1)
    assert (event["ech"], event["route"], event["server_name"]) == ("not_offered", "app", SECRET)


def test_load_handshakes_and_download(pki: Pki, deploy: Any, tmp_path: Path) -> None:
    """HANDSHAKES ECH handshakes at concurrency 16, then a DOWNLOAD-byte file, byte-exact."""
    with backend(pki, tmp_path) as app:
        site = deploy(app.port, quic={"idle_timeout": 5.0})
        before = site.cpu_seconds()
        started = time.monotonic()
        results = fetch(
            site.quic_port,
            ecl=pki.ech_config_list,
            pki=pki,
            count=HANDSHAKES,
            concurrency=CONCURRENCY,
            timeout=20.0,
        )
        handshake_wall = time.monotonic() - started
        handshake_cpu = site.cpu_seconds() - before
        failed = [r for r in results if r.code or r.status != 200]
        assert len(results) == HANDSHAKES and not failed, failed[:3]
        assert all(r.body.endswith("ech=inner hrr=0\n") for r in results)

        before = site.cpu_seconds()
        started = time.monotonic()
        (download,) = fetch(
            site.quic_port,
            ecl=pki.ech_config_list,
            pki=pki,
            path=f"/bytes/{DOWNLOAD}",
            timeout=300.0,
        )
        download_wall = time.monotonic() - started
        download_cpu = site.cpu_seconds() - before
        assert (download.code, download.status, download.size) == (0, 200, DOWNLOAD), download.error
        assert download.sha256 == hashlib.sha256(payload(DOWNLOAD)).hexdigest()
    print(
        f"\nQUIC front: {HANDSHAKES} handshakes in {handshake_wall:.1f} s, "
        f"{handshake_cpu / HANDSHAKES * 1000:.2f} ms CPU each; "
        f"{DOWNLOAD >> 20} MiB in {download_wall:.1f} s, "
        f"{download_cpu / (DOWNLOAD / 1e9):.1f} s CPU per GB relayed"
    )


def udp_sockets_bound(port: int) -> int:
    """How many IPv4 UDP sockets are bound to ``port`` (from /proc/net/udp)."""
    suffix = f":{port:04X}"
    lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1].endswith(suffix))


def test_workers_share_the_udp_port(pki: Pki, deploy: Any, tmp_path: Path) -> None:
    """--workers 2: each worker binds the port with SO_REUSEPORT; flows spread over both."""
    with backend(pki, tmp_path) as app:
        site = deploy(app.port, workers=2)
        # The front answers on TCP once one worker is up; a flow begun before
        # the second binds the port would have its later packets hashed to
        # the other worker, which does not know it.
        deadline = time.monotonic() + 30
        while udp_sockets_bound(site.quic_port) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert udp_sockets_bound(site.quic_port) == 2
        results = fetch(site.quic_port, ecl=pki.ech_config_list, pki=pki, count=24, concurrency=4)
        failed = [r for r in results if (r.code, r.status) != (0, 200)]
        assert not failed, failed[:3]
        events = site.flows(24)
        labels = {"ech": "accepted", "alert": "none", "route": "app", "transport": "quic"}
        assert site.sample("echfront_connections_total", **labels) == 24
    assert len(events) == 24 and len({event["worker"] for event in events}) == 2
