"""BE-7 (RFC 9849 §6.1.3): the TLS the front terminates itself pads its records.

What is measured here is what a client receives: a real TLS client (the
standard library's ``ssl``, on the system's OpenSSL) talks to a server on a
loopback port and reads the server's raw records off the socket before
handing them to its TLS stack. A padded record's ciphertext is a multiple
of the block plus the 16-byte AEAD tag; unpadded, the EncryptedExtensions
alone is about 50 bytes.

* :func:`echfront.app.localtls.boot` in a child process: echfront's own
  server options (:func:`~echfront.front.tlsoptions.load_certificate_options`)
  pad; an operator's ``OPENSSL_CONF`` is honoured, never overridden (its own
  ``openssl_conf`` wins, its other settings still apply); the standard
  library's OpenSSL in the same process is not padded, and the environment
  is unchanged.
* ``twistd -n echfront`` with a ``[public]`` service: the process starts
  itself again through ``boot`` (same PID), pads, and says so; ``[front]
  record_padding = 0`` leaves it alone; ``--workers`` children start padded.

Processes are stopped by PID with bounded waits.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from echfront.app import localtls
from echfront.config.schema import parse_config
from echfront.errors import ConfigError
from tests.frontproc import REPO_ROOT, FrontProcess, Pki, make_pki
from tests.processes import stop_process

TAG = 16
CONTENT_APPLICATION_DATA = 23

# -- a client that reads the server's records ----------------------------------------------


def server_records(
    port: int, *, ca: Path, name: str, alpn: str, request: bytes, until: bytes
) -> tuple[list[tuple[int, int]], str]:
    """Handshake with the server on ``port``, send ``request``, read until ``until``.

    The client offers ``alpn``, so the EncryptedExtensions carry the choice.

    :returns: (content type, length) of every record the server sent, in
        order, and the negotiated cipher suite.
    """
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([alpn])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    records: list[tuple[int, int]] = []
    pending = b""
    deadline = time.monotonic() + 10
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:

        def receive() -> None:
            nonlocal pending
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed")
            pending += data
            while len(pending) >= 5 and len(pending) >= 5 + int.from_bytes(pending[3:5], "big"):
                length = int.from_bytes(pending[3:5], "big")
                records.append((pending[0], length))
                pending = pending[5 + length :]
            incoming.write(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                receive()
        tls.write(request)
        sock.sendall(outgoing.read())
        answer = b""
        while until not in answer:
            assert time.monotonic() < deadline, "no answer in time"
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                receive()
    cipher = tls.cipher()
    assert cipher is not None
    assert tls.selected_alpn_protocol() == alpn
    return records, cipher[0]


def encrypted(records: list[tuple[int, int]]) -> list[int]:
    """Lengths of the server's encrypted records (after ServerHello and the CCS)."""
    return [length for kind, length in records if kind == CONTENT_APPLICATION_DATA]


def padded_to(lengths: list[int], block: int) -> bool:
    return all((length - TAG) % block == 0 for length in lengths)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- boot() in a child process ---------------------------------------------------------------

#: The child: echfront's server options on a loopback socket, one connection;
#: then what the standard library's OpenSSL does in the same process, and
#: the environment it leaves.
CHILD = """
import json, os, socket, ssl, sys
from pathlib import Path
from OpenSSL import SSL
from echfront.front.tlsoptions import load_certificate_options

options = load_certificate_options(Path(sys.argv[1]), alpn=["h2", "http/1.1"])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
listener.settimeout(20)
conn, _ = listener.accept()
conn.setblocking(True)  # pyOpenSSL wants a blocking socket; the test bounds the wait
server = SSL.Connection(options.getContext(), conn)
server.set_accept_state()
server.do_handshake()
assert server.recv(100) == b"ping"
server.sendall(b"pong")
server.shutdown()
conn.close()

# The standard library's OpenSSL, client side, against a pyOpenSSL server
# in memory: the client's Finished record tells whether it pads.
peer = SSL.Connection(options.getContext(), None)
peer.set_accept_state()
context = ssl.create_default_context(cafile=sys.argv[2])
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
client = context.wrap_bio(incoming, outgoing, server_hostname="public.example")
sent = []
for _ in range(6):
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = outgoing.read()
    if data:
        sent.append(data)
        peer.bio_write(data)
    try:
        peer.do_handshake()
    except SSL.WantReadError:
        pass
    try:
        incoming.write(peer.bio_read(65536))
    except SSL.WantReadError:
        pass
lengths = []
position, data = 0, b"".join(sent)
while position + 5 <= len(data):
    lengths.append(int.from_bytes(data[position + 3:position + 5], "big"))
    position += 5 + lengths[-1]
module = sys.modules.get("echfront.app.localtls")
print(json.dumps({
    "OPENSSL_CONF": os.environ.get("OPENSSL_CONF"),
    "stdlib_client_records": lengths,
    "booted": module._booted if module is not None else None,
}), flush=True)
"""


def run_child(
    certificate: Path, ca: Path, *, boot: int | None, env: Mapping[str, str] | None = None
) -> tuple[list[tuple[int, int]], str, dict[str, Any]]:
    """Run :data:`CHILD` (through ``boot`` when ``boot`` is a block size) and talk to it."""
    command = [sys.executable, "-c", CHILD, str(certificate), str(ca)]
    if boot is not None:
        command = [
            sys.executable,
            "-c",
            localtls.BOOT_CODE,
            str(boot),
            "",
            "-c",
            CHILD,
            str(certificate),
            str(ca),
        ]
    environment = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    environment["PYTHONPATH"] = str(REPO_ROOT)
    environment.update(env or {})
    child = subprocess.Popen(
        command,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        records, cipher = server_records(
            port, ca=ca, name="public.example", alpn="h2", request=b"ping", until=b"pong"
        )
        report = json.loads(child.stdout.readline())
        assert child.wait(20) == 0
    finally:
        stop_process(child, 10)
        if child.returncode:
            assert child.stderr is not None
            raise AssertionError(child.stderr.read())
    return records, cipher, report


def test_boot_pads_the_servers_records(pki: Pki) -> None:
    certificate = pki.certs["public.example"].combined
    records, _cipher, report = run_child(certificate, pki.ca, boot=512)
    lengths = encrypted(records)
    # EncryptedExtensions, Certificate, CertificateVerify, Finished, the
    # session tickets and "pong": every one a multiple of 512 plus the tag.
    assert len(lengths) >= 5
    assert padded_to(lengths, 512)
    assert lengths[0] == 512 + TAG  # EncryptedExtensions, with the chosen ALPN
    assert report["booted"] == 512
    # The environment is as it was, for this process's children too.
    assert report["OPENSSL_CONF"] is None
    # The standard library's OpenSSL in the same process kept its own
    # configuration: its Finished is not padded (53 or 69 bytes, not 528).
    finished = report["stdlib_client_records"][-1]
    assert finished < 100


def test_without_boot_nothing_is_padded(pki: Pki) -> None:
    certificate = pki.certs["public.example"].combined
    records, _cipher, report = run_child(certificate, pki.ca, boot=None)
    lengths = encrypted(records)
    assert lengths[0] < 100  # EncryptedExtensions as it is
    assert not padded_to(lengths, 512)
    assert report["booted"] is None


def test_any_block_size(pki: Pki) -> None:
    records, _cipher, _report = run_child(pki.certs["public.example"].combined, pki.ca, boot=1024)
    lengths = encrypted(records)
    assert padded_to(lengths, 1024) and lengths[0] == 1024 + TAG


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_an_operator_configuration_with_its_own_padding_wins(pki: Pki, tmp_path: Path) -> None:
    theirs = write(
        tmp_path / "theirs.cnf",
        "openssl_conf = their_init\n[their_init]\nssl_conf = their_ssl\n"
        "[their_ssl]\nsystem_default = their_tls\n[their_tls]\nRecordPadding = 256\n",
    )
    records, _cipher, report = run_child(
        pki.certs["public.example"].combined,
        pki.ca,
        boot=512,
        env={"OPENSSL_CONF": str(theirs)},
    )
    lengths = encrypted(records)
    assert padded_to(lengths, 256) and not padded_to(lengths, 512)
    assert report["OPENSSL_CONF"] == str(theirs)


def test_an_operator_configuration_is_never_overridden(pki: Pki, tmp_path: Path) -> None:
    # Its own openssl_conf, a cipher suite choice and no padding: the
    # choice applies (the client sees ChaCha20), and echfront's padding
    # does not replace the file's settings.
    theirs = write(
        tmp_path / "theirs.cnf",
        "openssl_conf = their_init\n[their_init]\nssl_conf = their_ssl\n"
        "[their_ssl]\nsystem_default = their_tls\n"
        "[their_tls]\nCiphersuites = TLS_CHACHA20_POLY1305_SHA256\n",
    )
    records, cipher, _report = run_child(
        pki.certs["public.example"].combined,
        pki.ca,
        boot=512,
        env={"OPENSSL_CONF": str(theirs)},
    )
    assert cipher == "TLS_CHACHA20_POLY1305_SHA256"
    assert encrypted(records)[0] < 100


def test_an_operator_configuration_without_ssl_settings_gets_padding(
    pki: Pki, tmp_path: Path
) -> None:
    # A file for other tools (openssl req) names no openssl_conf: padding
    # is added beside it, and the file is still read.
    theirs = write(tmp_path / "req.cnf", "HOME = .\n[ req ]\ndefault_bits = 2048\n")
    records, _cipher, report = run_child(
        pki.certs["public.example"].combined,
        pki.ca,
        boot=512,
        env={"OPENSSL_CONF": str(theirs)},
    )
    assert padded_to(encrypted(records), 512)
    assert report["OPENSSL_CONF"] == str(theirs)


# -- the pieces --------------------------------------------------------------------------------


def test_generated_configuration_puts_the_operators_file_last() -> None:
    text = localtls.openssl_config(512, "/etc/ssl/theirs.cnf")
    lines = text.splitlines()
    assert lines[1] == "openssl_conf = echfront_record_padding_init"
    assert "RecordPadding = 512" in lines
    assert lines[-2:] == ["[default]", ".include /etc/ssl/theirs.cnf"]
    assert ".include" not in localtls.openssl_config(512, None)


@pytest.mark.parametrize(
    ("orig", "argv", "expected"),
    [
        (
            ["/v/bin/python", "/v/bin/twistd", "-n", "echfront"],
            ["/v/bin/twistd", "-n", "echfront"],
            localtls.Command((), "path", "/v/bin/twistd", ("-n", "echfront")),
        ),
        (
            ["python", "-X", "dev", "-W", "error", "/v/bin/twistd", "-n"],
            ["twistd", "-n"],
            localtls.Command(("-X", "dev", "-W", "error"), "path", "/v/bin/twistd", ("-n",)),
        ),
        (
            ["python", "-c", "from x import run; run()", "-n", "echfront"],
            ["-c", "-n", "echfront"],
            localtls.Command((), "-c", "from x import run; run()", ("-n", "echfront")),
        ),
        (
            ["python", "-u", "-m", "twisted", "echfront"],
            ["/v/lib/twisted/__main__.py", "echfront"],
            localtls.Command(("-u",), "-m", "twisted", ("echfront",)),
        ),
        (
            ["python", "-mtwisted", "echfront"],
            ["/v/lib/twisted/__main__.py", "echfront"],
            localtls.Command((), "-m", "twisted", ("echfront",)),
        ),
        (["python", "-", "echfront"], ["-", "echfront"], None),  # standard input
        (["python", "/v/bin/twistd", "-n"], ["/v/bin/twistd", "--changed"], None),
    ],
)
def test_original_command(
    orig: list[str], argv: list[str], expected: localtls.Command | None
) -> None:
    assert localtls.original_command(orig, argv) == expected


def test_boot_argv_runs_the_same_command() -> None:
    command = localtls.Command(("-X", "dev"), "path", "/v/bin/twistd", ("-n", "echfront"))
    argv = localtls.boot_argv(256, command, None)
    assert argv == [
        sys.executable, "-X", "dev", "-c", localtls.BOOT_CODE,
        "256", "", "path", "/v/bin/twistd", "-n", "echfront",
    ]  # fmt: skip


def test_worker_argv_starts_through_boot() -> None:
    argv = localtls.worker_argv([sys.executable, "-c", "run()", "-n", "echfront"], 512)
    assert argv[:4] == [sys.executable, "-c", localtls.BOOT_CODE, "512"]
    assert argv[5:] == ["-c", "run()", "-n", "echfront"]
    with pytest.raises(ValueError, match="python -c"):
        localtls.worker_argv([sys.executable, "twistd"], 512)


def test_padding_wanted_only_where_the_front_terminates_tls(tmp_path: Path) -> None:
    cert = tmp_path / "public.pem"
    assert localtls.padding_wanted(parse_config({}, base=tmp_path)) == 0
    public = {"public": {"cert": str(cert)}}
    assert localtls.padding_wanted(parse_config(public, base=tmp_path)) == 512
    configured = {**public, "front": {"record_padding": 1024}}
    assert localtls.padding_wanted(parse_config(configured, base=tmp_path)) == 1024
    off = {**public, "front": {"record_padding": 0}}
    assert localtls.padding_wanted(parse_config(off, base=tmp_path)) == 0


@pytest.mark.parametrize("value", [1, -1, 16385, True, "512"])
def test_record_padding_values_are_checked(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match=r"front\.record_padding"):
        parse_config({"front": {"record_padding": value}}, base=tmp_path)


@pytest.mark.skipif("OPENSSL_CONF" in os.environ, reason="an OpenSSL configuration is set")
def test_this_process_is_not_padded() -> None:
    assert localtls.measured_padding() == 0


# -- twistd ------------------------------------------------------------------------------------


def public_config(pki: Pki, top: str = "", tables: str = "") -> str:
    """The public name served by the built-in status page, nothing else."""
    cert = pki.certs["public.example"].combined
    return (
        f'public_name = "public.example"\n{top}'
        f'[public]\ncert = "{cert}"\nalpn = ["http/1.1"]\n{tables}'
    )


def get_records(front: FrontProcess, pki: Pki) -> list[int]:
    records, _cipher = server_records(
        front.port,
        ca=pki.ca,
        name="public.example",
        alpn="http/1.1",
        request=b"GET / HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
        until=b"\r\n\r\n",
    )
    return encrypted(records)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_twistd_starts_again_padded(pki: Pki, tmp_path: Path) -> None:
    with FrontProcess(tmp_path / "front", public_config(pki)) as front:
        lengths = get_records(front, pki)
        # The process Popen started is the one serving: exec kept the PID.
        argv = cmdline(front.pid)
    assert argv[1:5] == ["-c", localtls.BOOT_CODE, "512", ""]
    assert argv[5] == "path" and argv[6].endswith("twistd")
    assert padded_to(lengths, 512) and len(lengths) >= 5
    log = front.log_text()
    assert log.count("local TLS pads its records to multiples of 512 bytes") == 1


def test_twistd_without_padding(pki: Pki, tmp_path: Path) -> None:
    config = public_config(pki, tables="[front]\nrecord_padding = 0\n")
    with FrontProcess(tmp_path / "front", config) as front:
        lengths = get_records(front, pki)
        argv = cmdline(front.pid)
    assert localtls.BOOT_CODE not in argv
    assert lengths[0] < 100 and not padded_to(lengths, 512)
    assert "pads its records" not in front.log_text()


def test_twistd_workers_start_padded(pki: Pki, tmp_path: Path) -> None:
    config = public_config(pki, "workers = 2\n", "[front]\nrecord_padding = 1024\n")
    said = "pads its records to multiples of 1024 bytes"
    with FrontProcess(tmp_path / "front", config) as front:
        lengths = get_records(front, pki)
        supervisor = cmdline(front.pid)
        # The front listens once one worker does; the other may still be
        # starting: wait (bounded) for both to say how they pad.
        deadline = time.monotonic() + 60
        while front.log_text().count(said) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    # The supervisor terminates no TLS and stays as it was started.
    assert localtls.BOOT_CODE not in supervisor
    assert padded_to(lengths, 1024)
    assert front.log_text().count(said) == 2


def test_twistd_says_when_the_operators_configuration_wins(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = write(
        tmp_path / "theirs.cnf",
        "openssl_conf = their_init\n[their_init]\nssl_conf = their_ssl\n"
        "[their_ssl]\nsystem_default = their_tls\n[their_tls]\nMinProtocol = TLSv1.2\n",
    )
    monkeypatch.setenv("OPENSSL_CONF", str(theirs))  # FrontProcess passes the environment on
    with FrontProcess(tmp_path / "front", public_config(pki)) as front:
        lengths = get_records(front, pki)
    assert lengths[0] < 100
    log = front.log_text()
    assert f"local TLS records are not padded: OPENSSL_CONF={theirs} names its own" in log
    assert "add RecordPadding = 512 to its system_default section" in log


def test_no_restart_when_the_command_line_cannot_be_run_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(localtls, "measured_padding", lambda: 0)
    monkeypatch.setattr(localtls, "original_command", lambda: None)
    outcome = localtls.record_padding(512)
    assert outcome.warning and "cannot be run again" in outcome.message


def test_a_failed_restart_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: str, argv: list[str], env: object) -> None:
        raise OSError(2, "No such file or directory")

    monkeypatch.setattr(localtls, "measured_padding", lambda: 0)
    monkeypatch.setattr(os, "execve", fail)
    command = localtls.Command((), "-c", "pass", ())
    outcome = localtls.record_padding(512, command=command)
    assert outcome.warning and "restarting with padding failed" in outcome.message


def test_a_failed_measurement_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> int:
        raise RuntimeError("no TLS 1.3 here")

    monkeypatch.setattr(localtls, "measured_padding", fail)
    monkeypatch.setattr(localtls, "original_command", pytest.fail)  # never asked
    outcome = localtls.record_padding(512)
    assert outcome.warning and "could not be measured" in outcome.message


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="Linux /proc")
@pytest.mark.skipif("PATH" not in os.environ, reason="no PATH to take away")
def test_the_restart_gets_the_initial_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Twisted's systemd: endpoint deletes LISTEN_PID and LISTEN_FDS once read;
    # the restarted process (same PID, same sockets) needs them again.
    path = os.environ["PATH"]
    monkeypatch.delenv("PATH")
    assert localtls.initial_environment()[b"PATH"] == path.encode()
