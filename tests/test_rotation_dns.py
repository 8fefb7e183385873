"""Key rotation end to end: ``twistd echfront`` publishing to a real Knot DNS (issue 5).

A front runs with ``[keys] rotate`` at a few seconds and ``[publish]``
pointed at knotd (tests/knotd.py) on loopback.  While it rotates, the test
plays the clients: it reads the ECHConfigList that DNS serves for
``secret.example``, connects with it (Go crypto/tls, through the front to a
Go backend), and keeps connecting with every list DNS served before, for as
long as the grace period promises.  It also reads what the front offers
(``/.well-known/origin-svcb``) to check that nothing is offered before DNS
carries it.

The second test breaks publication (the zone refuses updates, then the
server is down) and checks that the current keys stay in service, that
nothing is deleted, that logs and ``echfront_key_publications_total`` say
so, and that the next check after the repair completes the rotation.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echfront.ech.echconfig import decode_config_list
from echfront.ech.grease import is_decoy
from echfront.keys.keydir import KeyDirectory, KeyState
from tests.frontproc import FrontProcess, Pki, free_port, make_pki
from tests.gotools import GoBackend, GoUnavailableError, go_binary, run_client
from tests.knotd import KNOTD_MISSING, KnotServer

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(KNOTD_MISSING is not None, reason=KNOTD_MISSING or ""),
]

PUBLIC = "public.example"
SECRET = "secret.example"
ROTATE = 6.0
GRACE = 8.0
#: Slack for sampling, process start and a Go client's run.
MARGIN = 2.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    try:
        go_binary()
    except GoUnavailableError as error:
        pytest.skip(str(error))
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def backend(pki: Pki) -> Iterator[GoBackend]:
    with GoBackend([pki.pair(SECRET)], ident="secret") as server:
        yield server


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[KnotServer]:
    with KnotServer(tmp_path / "knot") as server:
        yield server


def front_config(
    pki: Pki, backend: GoBackend, knot: KnotServer, keys: Path, metrics_port: int
) -> dict[str, Any]:
    return {
        "public_name": PUBLIC,
        "keys": {
            "directory": str(keys),
            "rotate": f"{ROTATE}s",
            "grace": f"{GRACE}s",
            "check_interval": "0.5s",
            "verify_timeout": "3s",
        },
        "publish": {**knot.publish_table(), "names": [SECRET]},
        "public": {"cert": str(pki.certs[PUBLIC].combined)},
        "backends": {"secret": {"endpoint": f"tcp:host=127.0.0.1:port={backend.port}"}},
        "routes": [{"name": SECRET, "backend": "secret", "require_ech": True}],
        "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
    }


def dns_list(knot: KnotServer) -> bytes | None:
    """The ECHConfigList the authoritative server serves for SECRET."""
    (value,) = knot.ech(SECRET + ".")
    return value


def offered_list(front: FrontProcess, pki: Pki) -> bytes | None:
    """The ``ech`` of the front's ``/.well-known/origin-svcb``; None when it answers 404."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    with (
        socket.create_connection(("127.0.0.1", front.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=PUBLIC) as tls,
    ):
        tls.sendall(
            f"GET /.well-known/origin-svcb HTTP/1.0\r\nHost: {PUBLIC}\r\n\r\n".encode("ascii")
        )
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    if b" 404 " in head.split(b"\r\n", 1)[0]:
        return None
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    return base64.b64decode(json.loads(body)["endpoints"][0]["params"]["ech"])


def connect(front: FrontProcess, pki: Pki, config_list: bytes) -> dict[str, Any]:
    (result,) = run_client(front.address, name=SECRET, ech=config_list, ca=pki.ca, send=64)
    return result


def ids(config_list: bytes) -> list[int]:
    """config_ids of the real configs (after the GREASE decoy, RFC 9849 §6.2.2)."""
    return [c.config_id for c in decode_config_list(config_list).configs if not is_decoy(c)]


def publications(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    found = re.findall(r'^echfront_key_publications_total\{result="(\w+)"\} (\S+)$', text, re.M)
    return {result: float(value) for result, value in found}


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_full_rotation_cycle_against_knot(
    pki: Pki, backend: GoBackend, knot: KnotServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    metrics_port = free_port()
    config = front_config(pki, backend, knot, keys, metrics_port)
    sample = dns_list(knot)
    with FrontProcess(tmp_path / "front", config) as front:
        # Bootstrap: the first key is made, published, verified, then offered.
        wait_for(lambda: offered_list(front, pki) is not None, 15, "the first key")
        first = dns_list(knot)
        assert first is not None and first != sample
        assert offered_list(front, pki) == first

        history: list[tuple[bytes, float | None]] = [(first, None)]  # (list, superseded at)
        deleted: set[str] = set()
        known: set[str] = {r.stem for r in KeyDirectory(keys).records()}
        attempts = 0
        deadline = time.monotonic() + 2 * ROTATE + GRACE + 4 * MARGIN
        while time.monotonic() < deadline and (len(history) < 3 or not deleted):
            offered = offered_list(front, pki)
            current = dns_list(knot)
            assert current is not None
            now = time.monotonic()
            if current != history[-1][0]:
                history[-1] = (history[-1][0], now)
                history.append((current, None))
            # Offered only once DNS carries it: the front never advertises
            # (or sends as retry) a config clients cannot have learnt.
            assert offered in {entry for entry, _ in history}, "offered before published"
            # Every client holding a list DNS served succeeds while its
            # grace lasts: the newest and each older one still in grace.
            for config_list, superseded in history:
                if superseded is not None and now > superseded + GRACE - MARGIN:
                    continue
                result = connect(front, pki, config_list)
                attempts += 1
                assert result["ok"] and result["ech_accepted"], (ids(config_list), result)
                assert result["echo_ok"] and result["server_report"]["sni"] == SECRET
            stems = {r.stem for r in KeyDirectory(keys).records()}
            deleted |= known - stems
            known |= stems
            time.sleep(0.3)
        assert len(history) >= 3, f"expected two rotations, DNS served {len(history)} lists"
        assert deleted, "no retired key was deleted after its grace period"
        assert attempts >= 10
        # A list past its grace is rejected, like any stale config: the key is gone.
        oldest, superseded = history[0]
        assert superseded is not None
        wait_for(lambda: time.monotonic() > superseded + GRACE + MARGIN, GRACE + MARGIN, "grace")
        stale = connect(front, pki, oldest)
        assert stale["ok"] is False and stale["ech_rejected"], stale
        counts = publications(metrics_port)
        assert counts.get("success", 0) >= 3 and counts.get("failure", 0) == 0, counts
        states = [r.state for r in KeyDirectory(keys).records()]
        assert states.count(KeyState.ACTIVE) == 1
        log = front.log_text()
        assert "Traceback" not in log
        assert log.count(" are active") >= 3
        assert log.count("in DNS and verified them") == counts["success"]


def test_publication_failure_keeps_keys_and_is_reported(
    pki: Pki, backend: GoBackend, knot: KnotServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    metrics_port = free_port()
    config = front_config(pki, backend, knot, keys, metrics_port)
    with FrontProcess(tmp_path / "front", config) as front:
        wait_for(lambda: offered_list(front, pki) is not None, 15, "the first key")
        current = dns_list(knot)
        assert current is not None
        (active,) = [r for r in KeyDirectory(keys).records() if r.state is KeyState.ACTIVE]

        # The zone refuses updates: the next rotation cannot publish.
        knot.freeze()
        wait_for(lambda: publications(metrics_port).get("failure", 0) >= 1, 2 * ROTATE, "failure")
        records = {r.stem: r.state for r in KeyDirectory(keys).records()}
        assert records[active.stem] is KeyState.ACTIVE
        pending = [stem for stem, state in records.items() if state is KeyState.PENDING]
        assert len(pending) == 1
        assert "ECH key publication failed" in front.log_text()
        assert "REFUSED" in front.log_text()

        # The server down altogether: still failing, still serving.
        knot.stop()
        failures = publications(metrics_port)["failure"]
        wait_for(
            lambda: publications(metrics_port)["failure"] > failures, 2 * ROTATE, "second failure"
        )
        records = {r.stem: r.state for r in KeyDirectory(keys).records()}
        assert records[active.stem] is KeyState.ACTIVE and pending[0] in records
        assert offered_list(front, pki) == current
        result = connect(front, pki, current)
        assert result["ok"] and result["ech_accepted"], result

        # Repaired: the pending key is published at the next check, then offered.
        knot.start()
        knot.thaw()
        wait_for(lambda: dns_list(knot) != current, 2 * ROTATE, "publication after repair")
        published = dns_list(knot)
        assert published is not None
        wait_for(lambda: offered_list(front, pki) == published, 10, "the new key offered")
        assert ids(published) == list(
            next(r for r in KeyDirectory(keys).records() if r.stem == pending[0]).config_ids
        )
        for config_list in (current, published):  # the old one is in its grace period
            result = connect(front, pki, config_list)
            assert result["ok"] and result["ech_accepted"], result
        assert publications(metrics_port).get("success", 0) >= 2
        assert "Traceback" not in front.log_text()
