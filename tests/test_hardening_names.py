"""Private names stay out of default logs and metric labels (issue 12, item 6).

A real ``twistd -n echfront`` (default text logging, ``--metrics``) relays
ECH connections for private names to a backend, and fails one to a backend
that is down, with the routes configured either way: ``[[routes]]`` in the
file, or ``--route NAME=ENDPOINT`` flags (whose backends are named
``route#N``, not after the name).  Neither the log nor any metric may carry
a routed private name, while both must show the connections (so the test
cannot pass by logging nothing).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echfront.ech.echconfig import ECHConfig
from echfront.ech.keyset import generate_key
from echfront.keys.keyfile import write_key_file
from tests.echhello import InnerSpec, seal_hello
from tests.frontproc import FrontProcess, free_port, read_until_closed
from tests.twistedhelpers import alert, server_hello

#: Private names the clients ask for; none may appear in logs or metrics.
ROUTED = ("hidden-one.example", "deep.hidden-zone.example", "gone.example")
#: Parts of them that would give them away too (the wildcard route's zone).
SECRETS = (*ROUTED, "hidden-zone", "hidden-one", "gone.example")


@contextlib.contextmanager
def answering_backend() -> Iterator[int]:
    """A backend that answers every connection with a ServerHello record, then closes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(server_hello())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def ech_connection(port: int, config: ECHConfig, name: str) -> bytes:
    """An ECH ClientHello for ``name`` through the front; what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(seal_hello(config, InnerSpec(server_name=name)).records)
        data, _how = read_until_closed(sock, 10)
    return data


def exercise(front: FrontProcess, config: ECHConfig, metrics_port: int) -> tuple[str, str]:
    """Connect for every routed name; the log and the metrics afterwards."""
    for name in ROUTED:
        data = ech_connection(front.port, config, name)
        expected = alert(80) if name.startswith("gone") else server_hello()
        assert data == expected, (name, data)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        metrics = page.read().decode()
    front.stop()  # the connection log lines are flushed by now
    return front.log_text(), metrics


def assert_no_private_name(log: str, metrics: str) -> None:
    for secret in SECRETS:
        assert secret not in log, f"{secret!r} in the log:\n{log}"
        assert secret not in metrics, f"{secret!r} in the metrics"
    assert log.count("ech=accepted") == len(ROUTED), log


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, ECHConfig]:
    ech = generate_key("public.example", maximum_name_length=32)
    path = tmp_path / "ech.pem"
    write_key_file(path, [ech], overwrite=True)
    return path, ech.config


def test_routes_in_the_file(tmp_path: Path, key: tuple[Path, ECHConfig]) -> None:
    key_file, config = key
    metrics_port, down = free_port(), free_port()
    with answering_backend() as backend:
        data: dict[str, Any] = {
            "ech": {"keys": [{"file": str(key_file)}]},
            "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
            "backends": {
                "app": f"tcp:host=127.0.0.1:port={backend}",
                "spare": f"tcp:host=127.0.0.1:port={down}",
            },
            "routes": [
                {"name": "hidden-one.example", "backend": "app"},
                {"name": "*.hidden-zone.example", "backend": "app"},
                {"name": "gone.example", "backend": "spare"},
            ],
        }
        with FrontProcess(tmp_path / "front", data) as front:
            log, metrics = exercise(front, config, metrics_port)
    assert_no_private_name(log, metrics)
    assert 'route="app"' in metrics and 'backend="spare"' in metrics


def test_routes_from_flags(tmp_path: Path, key: tuple[Path, ECHConfig]) -> None:
    key_file, config = key
    metrics_port, down = free_port(), free_port()
    with answering_backend() as backend:
        args = [
            "--listen",
            "tcp:{port}:interface=127.0.0.1",
            "--ech-key",
            str(key_file),
            "--metrics",
            f"tcp:{metrics_port}:interface=127.0.0.1",
            "--route",
            f"hidden-one.example=tcp:host=127.0.0.1:port={backend}",
            "--route",
            f"*.hidden-zone.example=tcp:host=127.0.0.1:port={backend}",
            "--route",
            f"gone.example=tcp:host=127.0.0.1:port={down}",
        ]
        with FrontProcess(tmp_path / "front", None, args=args) as front:
            log, metrics = exercise(front, config, metrics_port)
    assert_no_private_name(log, metrics)
    # The flags' backends are named by position.
    assert "route=route#1" in log and "route=route#2" in log
    assert 'backend="route#3"' in metrics
