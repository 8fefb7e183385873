"""A real authoritative DNS server for the tests: Knot DNS (``knotd``) on loopback.

Debian's ``knot`` package provides ``knotd``; ``.ci/run`` installs it when
it can.  :class:`KnotServer` starts one as the current user, with every
file (configuration, zone files, databases, control socket, pid file, log)
in a temporary directory, listening on 127.0.0.1 at a free port.  It
serves one zone by default, ``example.``, whose ``secret.example.`` has an
HTTPS record with ``alpn``, ``port`` and ``ech`` SvcParams, and accepts
RFC 2136 updates signed with the TSIG key :attr:`KnotServer.tsig_name`
(RFC 8945).  A second key, :attr:`KnotServer.readonly_tsig_name`, is known
to the server but not allowed to update (Knot answers NOTAUTH, TSIG error
BADKEY, to a key its ACL denies).

Use it as a context manager, or call :meth:`KnotServer.close` (for
example with ``addCleanup``)::

    from tests.knotd import KNOTD_MISSING, KnotServer

    @pytest.mark.skipif(KNOTD_MISSING is not None, reason=KNOTD_MISSING or "")
    def test_it() -> None:
        with KnotServer() as knot:
            table = knot.publish_table()            # a ready [publish] table
            knot.https_rrset("secret.example.")     # what the server serves

Nothing here uses the Twisted reactor: every call blocks (bounded by a
timeout), so trial tests call them before or after the code under test, or
through ``deferToThread``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.svcbbase
import dns.rrset
import dns.tsig
import dns.update

from tests.processes import stop_process

__all__ = [
    "DEFAULT_ZONE",
    "KNOTD",
    "KNOTD_MISSING",
    "KnotServer",
    "KnotStartError",
    "default_records",
    "find_knotd",
    "sample_config_list",
]

#: The zone served when no other is asked for.
DEFAULT_ZONE = "example."
#: How long knotd may take to answer its first SOA query.
START_TIMEOUT = 15.0
#: How long a stopped knotd gets before SIGKILL.
STOP_TIMEOUT = 5.0
#: Bound on one query or update the fixture itself sends.
QUERY_TIMEOUT = 3.0
#: Debian installs knotd in /usr/sbin, which a non-root PATH may lack.
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_knotd() -> str | None:
    """The path of ``knotd`` (PATH, then the sbin directories), or None."""
    found = shutil.which("knotd")
    if found is None:
        found = shutil.which("knotd", path=os.pathsep.join(_SBIN))
    return found


#: The ``knotd`` binary, or None.
KNOTD = find_knotd()
#: Why tests needing knotd are skipped, or None when it is there.
KNOTD_MISSING: str | None = (
    None
    if KNOTD is not None
    else "knotd not found: install Debian's knot package (apt-get install knot)"
)


class KnotStartError(RuntimeError):
    """knotd did not start, or did not answer in time; the message has its log."""


def sample_config_list(config_id: int, public_name: str = "public.example") -> bytes:
    """A well-formed ECHConfigList (RFC 9849 §4) with one X25519 config.

    The public key is derived from ``config_id`` (not a real key pair):
    enough for records to publish and compare, and for
    ``echfront.ech.echconfig.decode_config_list`` to parse.
    """
    public_key = hashlib.sha256(b"knotd sample %d" % config_id).digest()
    name = public_name.encode("ascii")
    contents = (
        bytes([config_id])
        + (0x0020).to_bytes(2, "big")  # DHKEM(X25519, HKDF-SHA256)
        + len(public_key).to_bytes(2, "big")
        + public_key
        + (4).to_bytes(2, "big")
        + (1).to_bytes(2, "big")  # HKDF-SHA256
        + (1).to_bytes(2, "big")  # AES-128-GCM
        + bytes([0])  # maximum_name_length
        + bytes([len(name)])
        + name
        + (0).to_bytes(2, "big")  # no extensions
    )
    config = (0xFE0D).to_bytes(2, "big") + len(contents).to_bytes(2, "big") + contents
    return len(config).to_bytes(2, "big") + config


def default_records(config_list: bytes | None = None) -> list[str]:
    """The records of ``example.`` besides SOA and NS (zone-file lines).

    ``secret.example.`` has one ServiceMode HTTPS record with ``alpn``,
    ``port`` and ``ech`` (``config_list``, default
    ``sample_config_list(1)``) and TTL 600; ``www.example.`` has an A
    record and no HTTPS record.
    """
    ech = base64.b64encode(config_list or sample_config_list(1)).decode("ascii")
    return [
        f'secret.example. 600 IN HTTPS 1 . alpn="h2,http/1.1" port=8443 ech="{ech}"',
        "secret.example. 600 IN A 127.0.0.1",
        "www.example. 300 IN A 127.0.0.1",
    ]


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (knotd needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise KnotStartError("no free port on 127.0.0.1")


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT (a weakref finalizer, hence a function)."""
    stop_process(process, STOP_TIMEOUT)


class KnotServer:
    """A knotd on 127.0.0.1, started by the constructor, stopped by :meth:`close`.

    :param directory: where its files go (default: a new temporary
        directory, removed by :meth:`close`; a given one is kept).
    :param zones: zone name → zone-file lines besides SOA and NS (which are
        generated: serial 1, ``ns.<zone>`` at 127.0.0.1).  Default:
        ``{"example.": default_records()}``.  Every zone accepts updates
        signed with :attr:`tsig_name`.
    :param start: start knotd now (else call :meth:`start`).

    :ivar port: the port it listens on, UDP and TCP.
    :ivar server: ``"127.0.0.1:<port>"``, as ``[publish] server`` takes it.
    :ivar tsig_name: the update key's name (``echfront-update.``).
    :ivar tsig_algorithm: ``hmac-sha256``.
    :ivar tsig_secret: the update key's secret, base64.
    :ivar tsig_secret_file: a file holding the key in Knot's format.
    :ivar readonly_tsig_name: a key the server knows but whose updates its
        ACL denies; :ivar readonly_tsig_secret: its secret, base64.
    :ivar zone_file: the zone file of the first zone (Knot writes updates
        back to it at once: ``zonefile-sync: 0``).
    :ivar zone_files: every zone's file, by zone name.
    :ivar log_file: knotd's stdout and stderr.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        zones: Mapping[str, Sequence[str]] | None = None,
        start: bool = True,
    ) -> None:
        """Write the configuration and zone files, and start knotd unless ``start`` is False."""
        if KNOTD is None:
            raise KnotStartError(KNOTD_MISSING or "knotd not found")
        self.knotd = KNOTD
        self._owned = directory is None
        # mkdtemp's short path also keeps the control socket's path under
        # the 108-byte limit of AF_UNIX addresses.
        self.directory = Path(tempfile.mkdtemp(prefix="knotd-")) if directory is None else directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = 0
        self.tsig_name = "echfront-update."
        self.tsig_algorithm = "hmac-sha256"
        self.tsig_secret = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        self.readonly_tsig_name = "readonly."
        self.readonly_tsig_secret = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        zones = {DEFAULT_ZONE: default_records()} if zones is None else zones
        self.zone_files: dict[str, Path] = {}
        for zone in zones:
            self.zone_files[str(dns.name.from_text(zone))] = (
                self.directory
                / "zones"
                / (f"{dns.name.from_text(zone).to_text(omit_final_dot=True) or 'root'}.zone")
            )
        self.zone_file = next(iter(self.zone_files.values()))
        self.log_file = self.directory / "knotd.log"
        self.config_file = self.directory / "knot.conf"
        self.tsig_secret_file = self.directory / "update.key"
        self._zones = {str(dns.name.from_text(zone)): list(lines) for zone, lines in zones.items()}
        self.process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        for sub in ("zones", "run", "db"):
            (self.directory / sub).mkdir(exist_ok=True)
        self._write_zone_files()
        self.tsig_secret_file.write_text(
            f"# {self.tsig_algorithm}:{self.tsig_name}:{self.tsig_secret}\n"
            "key:\n"
            f"  - id: {self.tsig_name}\n"
            f"    algorithm: {self.tsig_algorithm}\n"
            f"    secret: {self.tsig_secret}\n"
        )
        self.tsig_secret_file.chmod(0o600)
        if start:
            self.start()

    # -- life cycle -------------------------------------------------------------

    @property
    def server(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """knotd's PID while it runs."""
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """Whether knotd runs."""
        return self.process is not None and self.process.poll() is None

    def _write_zone_files(self) -> None:
        for zone, lines in self._zones.items():
            header = [
                f"$ORIGIN {zone}",
                "$TTL 300",
                f"@ 300 IN SOA ns.{zone} hostmaster.{zone} 1 3600 600 86400 300",
                f"@ 300 IN NS ns.{zone}",
                "ns 300 IN A 127.0.0.1",
            ]
            self.zone_files[zone].write_text("\n".join([*header, *lines]) + "\n")

    def _write_config(self) -> None:
        d = self.directory
        zones = "\n".join(f"  - domain: {zone}\n    acl: [update]" for zone in self._zones)
        self.config_file.write_text(
            f"""\
# Generated by tests/knotd.py: every path is under {d}.
server:
    rundir: "{d / "run"}"
    pidfile: "{d / "run" / "knot.pid"}"
    listen: {self.host}@{self.port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "{d / "db"}"
    journal-db: "{d / "db" / "journal"}"
    kasp-db: "{d / "db" / "keys"}"
    timer-db: "{d / "db" / "timers"}"
    catalog-db: "{d / "db" / "catalog"}"
control:
    listen: "knot.sock"
log:
  - target: stdout
    any: info
key:
  - id: {self.tsig_name}
    algorithm: {self.tsig_algorithm}
    secret: {self.tsig_secret}
  - id: {self.readonly_tsig_name}
    algorithm: {self.tsig_algorithm}
    secret: {self.readonly_tsig_secret}
acl:
  - id: update
    key: {self.tsig_name}
    action: update
template:
  - id: default
    storage: "{d / "zones"}"
    file: "%s.zone"
    # Write updates back to the zone file at once, so tests can read it.
    zonefile-sync: 0
    semantic-checks: off
zone:
{zones}
"""
        )

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start knotd (again, after :meth:`stop`: zones keep their updates).

        Waits until it answers a SOA query for the first zone.

        :raises KnotStartError: if it exits or does not answer in time.
        """
        if self.running:
            return
        for _attempt in range(3):
            if self.port == 0 or _attempt:
                self.port = _free_port()
            self._write_config()
            with self.log_file.open("ab") as log:
                self.process = subprocess.Popen(
                    [self.knotd, "-c", str(self.config_file)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                )
            self._finalizer = weakref.finalize(self, _stop_process, self.process)
            if self._wait_ready(timeout):
                return
            process = self.process
            _stop_process(process)
            self.process = None
            if "address already in use" not in self.log_tail().lower():
                break
        raise KnotStartError(f"knotd did not start; its log ends:\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        zone = next(iter(self._zones))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                answer = self.query(zone, "SOA", tcp=False, timeout=0.2)
            except (dns.exception.DNSException, OSError):
                time.sleep(0.05)
                continue
            if answer.rcode() == dns.rcode.NOERROR and answer.answer:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop knotd (SIGTERM to its PID, SIGKILL after 5 s); the files stay."""
        if self.process is not None:
            _stop_process(self.process)
            self.process = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def close(self) -> None:
        """Stop knotd and remove the directory if this object made it."""
        self.stop()
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> KnotServer:
        """The running server."""
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """:meth:`close`."""
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        """The end of knotd's log."""
        try:
            text = self.log_file.read_text("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- talking to it ----------------------------------------------------------

    def query(
        self, name: str, rdtype: str = "HTTPS", *, tcp: bool = True, timeout: float = QUERY_TIMEOUT
    ) -> dns.message.Message:
        """Ask knotd directly (recursion not desired)."""
        query = dns.message.make_query(name, rdtype)
        query.flags &= ~dns.flags.RD
        if tcp:
            return dns.query.tcp(query, self.host, timeout=timeout, port=self.port)
        return dns.query.udp(query, self.host, timeout=timeout, port=self.port)

    def https_rrset(self, name: str) -> dns.rrset.RRset | None:
        """The HTTPS RRset of ``name`` as knotd serves it, or None."""
        answer = self.query(name, "HTTPS")
        return answer.get_rrset(
            answer.answer,
            dns.name.from_text(name),
            dns.rdataclass.IN,
            dns.rdatatype.HTTPS,
        )

    def ech(self, name: str) -> list[bytes | None]:
        """The ``ech`` value of each of ``name``'s HTTPS records (None: none), in order."""
        rrset = self.https_rrset(name)
        if rrset is None:
            return []
        key = dns.rdtypes.svcbbase.ParamKey.ECH
        values: list[bytes | None] = []
        for rdata in sorted(rrset, key=lambda rd: rd.to_text()):
            param = rdata.params.get(key)
            values.append(None if param is None else param.ech)
        return values

    def update(
        self,
        build: Callable[[dns.update.UpdateMessage], None],
        *,
        zone: str = DEFAULT_ZONE,
        readonly: bool = False,
    ) -> str:
        """Send an UPDATE that ``build`` fills in, signed; return the RCODE's name.

        With ``readonly``, it is signed with the key the ACL denies.
        """
        update = dns.update.UpdateMessage(zone)
        build(update)
        if readonly:
            update.use_tsig(dns.tsig.Key(self.readonly_tsig_name, self.readonly_tsig_secret))
        else:
            update.use_tsig(dns.tsig.Key(self.tsig_name, self.tsig_secret, self.tsig_algorithm))
        answer = dns.query.tcp(update, self.host, timeout=QUERY_TIMEOUT, port=self.port)
        return dns.rcode.to_text(answer.rcode())

    def replace(self, name: str, ttl: int, rdtype: str, *rdatas: str) -> None:
        """Replace ``name``'s ``rdtype`` RRset (a change by someone else, for tests).

        :raises AssertionError: unless knotd answers NOERROR.
        """

        def build(update: dns.update.UpdateMessage) -> None:
            update.replace(name, ttl, rdtype, *rdatas)

        zone = self._zone_of(name)
        rcode = self.update(build, zone=zone)
        assert rcode == "NOERROR", f"update of {name} answered {rcode}"

    def _zone_of(self, name: str) -> str:
        absolute = dns.name.from_text(name)
        matches = [z for z in self._zones if absolute.is_subdomain(dns.name.from_text(z))]
        if not matches:
            raise ValueError(f"{name} is in no zone of this server")
        return max(matches, key=len)

    def knotc(self, *args: str) -> str:
        """Run ``knotc`` on this server's control socket; return its output.

        :raises AssertionError: when it fails.
        """
        knotc = shutil.which("knotc", path=str(Path(self.knotd).parent)) or "knotc"
        socket_path = self.directory / "run" / "knot.sock"
        done = subprocess.run(
            [knotc, "-s", str(socket_path), *args],
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT * 3,
            check=False,
        )
        assert done.returncode == 0, f"knotc {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def freeze(self, zone: str = DEFAULT_ZONE) -> None:
        """Freeze ``zone``: knotd then answers REFUSED to updates of it."""
        self.knotc("zone-freeze", zone)

    def thaw(self, zone: str = DEFAULT_ZONE) -> None:
        """Undo :meth:`freeze`."""
        self.knotc("zone-thaw", zone)

    def publish_table(self, **overrides: Any) -> dict[str, Any]:
        """A ``[publish]`` table for this server (method ``rfc2136``), plus ``overrides``.

        An override of None removes the key.
        """
        table: dict[str, Any] = {
            "method": "rfc2136",
            "server": self.server,
            "zone": next(iter(self._zones)),
            "tsig_key_name": self.tsig_name,
            "tsig_algorithm": self.tsig_algorithm,
            "tsig_secret_file": str(self.tsig_secret_file),
            "timeout": 2.0,
        }
        table.update(overrides)
        return {key: value for key, value in table.items() if value is not None}
