"""``echfront try`` (echfront.app.trybrowser, echfront.app.chromium): ECH in Chromium.

The pieces are checked on their own (Chromium's argument vector, the
profile certutil makes, the page text, the probe of a running front), then
the command is run for real, headless, as a person would run it: its
printed page must say that ECH was accepted and name the inner and outer
server names.  Chromium is also shown to fail without the demo CA in its
profile, so the trust really comes from the profile's NSS database, and to
work against a front that was already running.  These runs skip, saying
why, where Chromium or certutil is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from echfront.app.chromium import (
    DNS_SUFFIX,
    INSTALL_HINT,
    chromium_command,
    dns_alias,
    page_text,
    prepare_profile,
)
from echfront.app.trybrowser import TryOptions, probe_running_front
from echfront.errors import ConfigError
from tests.frontproc import REPO_ROOT, free_port
from tests.processes import stop_process

CHROMIUM = shutil.which("chromium")
CERTUTIL = shutil.which("certutil")
needs_certutil = pytest.mark.skipif(
    CERTUTIL is None, reason="certutil not installed (Debian package libnss3-tools)"
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CERTUTIL is None,
    reason="Chromium or certutil not installed (Debian packages chromium, libnss3-tools)",
)
#: Bound on one `echfront try` run (Chromium loads the page in ~2 s here).
RUN_TIMEOUT = 120


def run_try(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``echfront try ARGS`` in a subprocess, bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "echfront.cli", "try", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def rows(text: str) -> dict[str, str]:
    """The ``  key: value`` lines of the printed page."""
    found = {}
    for line in text.splitlines():
        if line.startswith("  ") and ":" in line:
            key, _, value = line.strip().partition(":")
            found[key] = value.strip()
    return found


# -- the pieces --------------------------------------------------------------------------------


def test_dns_alias_leaves_localhost() -> None:
    assert dns_alias("private.localhost") == f"private.localhost.{DNS_SUFFIX}"
    assert not dns_alias("private.localhost").endswith(".localhost")


def test_chromium_command_headless(tmp_path: Path) -> None:
    shot = tmp_path / "page.png"
    argv = chromium_command(
        "/usr/bin/chromium",
        tmp_path,
        "https://private.localhost:8443/",
        ("public.localhost", "private.localhost"),
        headless=True,
        screenshot=shot,
        as_root=True,
    )
    assert argv[0] == "/usr/bin/chromium"
    assert argv[-1] == "https://private.localhost:8443/"
    assert f"--user-data-dir={tmp_path}" in argv
    assert (
        "--host-resolver-rules=MAP public.localhost public.localhost.echfront.test, "
        "MAP private.localhost private.localhost.echfront.test"
    ) in argv
    for flag in (
        "--headless",
        "--dump-dom",
        f"--screenshot={shot}",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-gpu",
    ):
        assert flag in argv


def test_chromium_command_window_keeps_the_sandbox_when_not_root(tmp_path: Path) -> None:
    argv = chromium_command("chromium", tmp_path, "https://x/", ("x",), headless=False)
    assert "--headless" not in argv
    assert "--dump-dom" not in argv
    assert "--no-sandbox" not in argv


@pytest.mark.parametrize(
    ("headless", "screenshot", "environ", "expected"),
    [
        (None, None, {}, True),
        (None, None, {"DISPLAY": ":0"}, False),
        (None, None, {"WAYLAND_DISPLAY": "wayland-0"}, False),
        (True, None, {"DISPLAY": ":0"}, True),
        (None, Path("p.png"), {"DISPLAY": ":0"}, True),
    ],
)
def test_headless_unless_there_is_a_display(
    headless: bool | None, screenshot: Path | None, environ: dict[str, str], expected: bool
) -> None:
    options = TryOptions(Path("."), headless=headless, screenshot=screenshot)
    assert options.is_headless(environ) is expected


def test_page_text() -> None:
    document = (
        "<!doctype html><title>t</title><style>h1{}</style><h1>ECH accepted</h1>"
        "<h2>What the front saw</h2><table><tr><th>inner name</th><td>a &amp; b</td></tr>"
        "</table><p><a href=/x>/x</a></p>"
    )
    assert page_text(document).splitlines() == [
        "ECH accepted",
        "What the front saw",
        f"  {'inner name:':<28} a & b",
        "/x",
    ]


@needs_certutil
def test_prepare_profile_trusts_the_ca_and_forces_secure_dns(tmp_path: Path) -> None:
    from echfront.app.certs import TestCA  # noqa: PLC0415

    ca = TestCA(tmp_path / "ca")
    profile = tmp_path / "profile"
    profile.mkdir()
    assert CERTUTIL is not None
    prepare_profile(profile, ca.cert_path, "https://localhost:1/dns-query{?dns}", CERTUTIL)
    listing = subprocess.run(
        [CERTUTIL, "-L", "-d", f"sql:{profile / '.pki' / 'nssdb'}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    (line,) = [line for line in listing.splitlines() if line.startswith("echfront demo CA")]
    assert line.split()[-1] == "C,,"  # trusted to issue server certificates
    state = json.loads((profile / "Local State").read_text())
    assert state == {
        "dns_over_https": {"mode": "secure", "templates": "https://localhost:1/dns-query{?dns}"}
    }


@needs_certutil
def test_prepare_profile_reports_certutil_failure(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    profile.mkdir()
    assert CERTUTIL is not None
    with pytest.raises(ConfigError, match=r"^certutil failed: "):
        prepare_profile(profile, tmp_path / "missing.pem", "https://localhost:1/q", CERTUTIL)


def test_probe_finds_no_front_on_a_closed_port(tmp_path: Path) -> None:
    assert probe_running_front(free_port(), tmp_path / "ca.pem") is None


@pytest.fixture
def plain_listener() -> Iterator[int]:
    """A loopback port that accepts and answers in plain text (not the demo)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    port = server.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nhello\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    server.close()
    thread.join(10)


def test_probe_refuses_a_port_held_by_something_else(tmp_path: Path, plain_listener: int) -> None:
    from echfront.app.certs import TestCA  # noqa: PLC0415

    ca = TestCA(tmp_path)
    with pytest.raises(ConfigError) as caught:
        probe_running_front(plain_listener, ca.cert_path)
    message = str(caught.value)
    assert message.startswith(f"127.0.0.1:{plain_listener} is in use, but not by the demo front")
    assert message.endswith("stop it or pass --port")
    assert "\n" not in message


# -- the command -------------------------------------------------------------------------------


def test_without_a_browser_it_names_the_package(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    for env, args in (
        ({"PATH": str(empty)}, ()),  # nothing on $PATH
        ({}, ("--browser", str(tmp_path / "no-such-browser"))),
    ):
        done = run_try("--state-dir", str(tmp_path / "state"), *args, env=env)
        assert done.returncode == 2
        assert done.stdout == ""
        assert done.stderr == (
            f"echfront try: error: Chromium not found; install it: {INSTALL_HINT}\n"
        )


def test_bad_port_is_one_line(tmp_path: Path) -> None:
    done = run_try("--state-dir", str(tmp_path), "--port", "0")
    assert (done.returncode, done.stderr) == (2, "echfront try: error: --port 0 is not 1..65535\n")


@needs_chromium
def test_headless_chromium_gets_ech_accepted(tmp_path: Path) -> None:
    """The README's first run: the printed page says ECH was accepted, and by whom."""
    port = free_port()
    # Short: Chromium's singleton socket path must fit in sockaddr_un.
    temp = Path(tempfile.mkdtemp(prefix="eft-"))
    shot = tmp_path / "page.png"
    started = time.monotonic()
    done = run_try(
        "--state-dir",
        str(tmp_path / "state"),
        "--port",
        str(port),
        "--screenshot",
        str(shot),
        env={"TMPDIR": str(temp)},
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"echfront try: demo front on https://127.0.0.1:{port}/ (started")
    assert lines[1] == f"echfront try: headless Chromium loads https://private.localhost:{port}/"
    assert lines[2] == "ECH accepted"
    page = rows(done.stdout)
    assert page["ECH"] == "accepted: this page was requested inside an encrypted ClientHello"
    assert page["inner name (encrypted)"] == "private.localhost"
    assert page["outer name (in the clear)"] == "public.localhost"
    assert page["KEM"] == "DHKEM(X25519) (0x0020)"
    assert page["config_id used"].isdigit()
    assert f"config_id {page['config_id used']}" in page
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(temp.iterdir()) == []  # the throw-away profile is gone
    temp.rmdir()
    assert elapsed < RUN_TIMEOUT


@needs_chromium
def test_without_the_ca_in_the_profile_chromium_cannot_resolve(tmp_path: Path) -> None:
    """A certutil that adds nothing: DoH's certificate fails, so no name resolves."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "certutil").write_text("#!/bin/sh\nexit 0\n")
    (fake / "certutil").chmod(0o755)
    assert CHROMIUM is not None
    done = run_try(
        "--state-dir",
        str(tmp_path / "state"),
        "--port",
        str(free_port()),
        "--headless",
        "--browser",
        CHROMIUM,
        env={"PATH": f"{fake}:{os.environ['PATH']}"},
    )
    assert done.returncode == 2
    assert done.stderr.startswith("echfront try: error: Chromium showed no page: ")
    assert "net::ERR_NAME_NOT_RESOLVED" in done.stderr
    assert done.stderr.count("\n") == 1


FRONT_SCRIPT = """
import sys
from pathlib import Path
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from echfront.app.demo import demo_config
from echfront.app.trybrowser import demo_front

state_dir, port = Path(sys.argv[1]), int(sys.argv[2])
factory, _ = demo_front(demo_config(state_dir, port)[0], reactor)
TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)
reactor.run()
"""


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Until 127.0.0.1:port accepts, or fail if the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the front exited with status {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@needs_chromium
def test_a_running_demo_front_is_used(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    front = subprocess.Popen(
        [sys.executable, "-c", FRONT_SCRIPT, str(state), str(port)], cwd=REPO_ROOT
    )
    try:
        wait_for_port(port, front)
        done = run_try("--state-dir", str(state), "--port", str(port), "--headless")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "(already running)" in done.stdout.splitlines()[0]
        assert rows(done.stdout)["inner name (encrypted)"] == "private.localhost"
        # Another state directory means another CA: refused, not half-used.
        other = run_try("--state-dir", str(tmp_path / "other"), "--port", str(port))
        assert other.returncode == 2
        assert "is in use, but not by the demo front of this state directory" in other.stderr
    finally:
        stop_process(front, 10)
