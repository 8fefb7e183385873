"""A real etcd v3 cluster for the tests: three ``etcd`` members on 127.0.0.1.

Debian's ``etcd-server`` package provides ``etcd`` and ``etcd-client``
provides ``etcdctl``; ``.ci/run`` installs both when it can.
:class:`EtcdCluster` starts ``size`` members as the current user, each with
its own data directory in a temporary directory (under ``/dev/shm`` when it
exists: etcd fsyncs every write, and tmpfs makes that free), client and
peer URLs on free loopback ports, and short raft timers (50 ms heartbeat,
500 ms election) so that a stopped member's leadership moves quickly.

Optionally the client URLs speak TLS with a CA made here (``tls=True``,
client certificates required with ``client_cert=True``), and
authentication is enabled with a root user (``password="..."``).

Use it as a context manager, or call :meth:`EtcdCluster.close` (for example
with ``addCleanup``)::

    from tests.etcdcluster import ETCD_MISSING, EtcdCluster

    @pytest.mark.skipif(ETCD_MISSING is not None, reason=ETCD_MISSING or "")
    def test_it() -> None:
        with EtcdCluster() as cluster:
            cluster.endpoints                  # ("http://127.0.0.1:port", ...)
            cluster.stop_member(0)             # SIGTERM to that member's PID
            cluster.start_member(0)            # same data directory, rejoins
            cluster.etcdctl("get", "--prefix", "/")

Nothing here uses the Twisted reactor: every call blocks (bounded by a
timeout), so trial tests call them before or after the code under test, or
through ``deferToThread``.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.processes import stop_process

__all__ = [
    "ETCD",
    "ETCDCTL",
    "ETCD_MISSING",
    "EtcdCluster",
    "EtcdStartError",
    "TLSFiles",
]

#: The binaries, or None.
ETCD = shutil.which("etcd")
ETCDCTL = shutil.which("etcdctl")
#: Why tests needing etcd are skipped, or None when it is there.
ETCD_MISSING: str | None = (
    None
    if ETCD is not None and ETCDCTL is not None
    else "etcd or etcdctl not found: install Debian's etcd-server and etcd-client packages"
)
#: How long a cluster may take until every member reports healthy.
START_TIMEOUT = 20.0
#: How long a stopped member gets before SIGKILL.
STOP_TIMEOUT = 5.0
#: Bound on one request the fixture itself sends.
REQUEST_TIMEOUT = 3.0


class EtcdStartError(RuntimeError):
    """etcd did not start, or did not become healthy in time; the message has its log."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of the test CA, the servers' certificate and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_tls_files(directory: Path) -> TLSFiles:
    """A CA, a server certificate for IP 127.0.0.1 and a client certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echfront etcd test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(name: str | None, usage: list[x509.ObjectIdentifier], stem: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if name else [])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path = directory / f"{stem}.pem"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    # Client use too: with --client-cert-auth, etcd's gateway dials its own
    # gRPC server presenting the server certificate.
    server = issue(
        "127.0.0.1", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], "server"
    )
    # No CommonName: with authentication enabled, etcd's gateway refuses a
    # client certificate that has one (CN-based auth does not apply to it).
    client = issue(None, [ExtendedKeyUsageOID.CLIENT_AUTH], "client")
    return TLSFiles(ca_path, server[0], server[1], client[0], client[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT (a weakref finalizer, hence a function)."""
    stop_process(process, STOP_TIMEOUT)


class _Member:
    """One etcd member: its name, ports, data directory and process."""

    def __init__(self, name: str, directory: Path, client_port: int, peer_port: int) -> None:
        self.name = name
        self.directory = directory
        self.client_port = client_port
        self.peer_port = peer_port
        self.process: subprocess.Popen[bytes] | None = None
        self.finalizer: weakref.finalize[Any, Any] | None = None
        self.log_file = directory.parent / f"{name}.log"


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1, started by the constructor, stopped by :meth:`close`.

    :param tls: the client URLs speak TLS (server certificate for IP
        127.0.0.1 from :attr:`tls_files`); peers stay on plain HTTP.
    :param client_cert: with ``tls``, clients must present a certificate
        from the same CA (:attr:`tls_files` has one).
    :param password: enable authentication with user ``root`` and this password.

    :ivar endpoints: the client URLs, one per member, in member order.
    :ivar tls_files: the PEM files, when ``tls``.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        tls: bool = False,
        client_cert: bool = False,
        password: str | None = None,
    ) -> None:
        """Start the members and wait until every one is healthy."""
        if ETCD is None or ETCDCTL is None:
            raise EtcdStartError(ETCD_MISSING or "etcd not found")
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.directory = Path(tempfile.mkdtemp(prefix="etcd-test-", dir=base))
        self.tls_files = write_tls_files(self.directory) if tls else None
        self.client_cert = client_cert
        self.password = password
        self.scheme = "https" if tls else "http"
        self.members: list[_Member] = []
        self._auth_enabled = False
        try:
            self._start_all(size)
            if password is not None:
                self._enable_auth(password)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ----------------------------------------------------------------

    def _start_all(self, size: int) -> None:
        for attempt in range(3):
            ports = _free_ports(2 * size)
            self.members = [
                _Member(f"m{i}", self.directory / f"m{i}", ports[2 * i], ports[2 * i + 1])
                for i in range(size)
            ]
            for member in self.members:
                self._spawn(member, new=True)
            try:
                self.wait_healthy()
                return
            except EtcdStartError:
                logs = "\n".join(self.log_tail(i) for i in range(size))
                for member in self.members:
                    self._kill(member)
                    shutil.rmtree(member.directory, ignore_errors=True)
                if "address already in use" not in logs or attempt == 2:
                    raise EtcdStartError(f"etcd cluster did not start; logs end:\n{logs}") from None

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)

    def _spawn(self, member: _Member, *, new: bool) -> None:
        assert ETCD is not None
        client_url = f"{self.scheme}://127.0.0.1:{member.client_port}"
        peer_url = f"http://127.0.0.1:{member.peer_port}"
        args = [
            ETCD,
            "--name",
            member.name,
            "--data-dir",
            str(member.directory),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            self._initial_cluster(),
            "--initial-cluster-state",
            "new" if new else "existing",
            "--initial-cluster-token",
            self.directory.name,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        if self.tls_files is not None:
            args += [
                "--cert-file",
                str(self.tls_files.server_cert),
                "--key-file",
                str(self.tls_files.server_key),
            ]
            if self.client_cert:
                args += ["--client-cert-auth", "--trusted-ca-file", str(self.tls_files.ca)]
        with member.log_file.open("ab") as log:
            member.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        member.finalizer = weakref.finalize(self, _stop, member.process)

    def _kill(self, member: _Member) -> None:
        if member.process is not None:
            _stop(member.process)
            member.process = None
        if member.finalizer is not None:
            member.finalizer.detach()
            member.finalizer = None

    def stop_member(self, index: int) -> None:
        """Stop member ``index`` (SIGTERM to its PID, SIGKILL after 5 s); its data stays."""
        self._kill(self.members[index])

    def start_member(
        self, index: int, timeout: float = START_TIMEOUT, *, wait: bool = True
    ) -> None:
        """Start member ``index`` again on its data directory and wait until it is healthy.

        With ``wait=False`` it returns at once: a member alone cannot become
        healthy, so start the others too, then :meth:`wait_healthy`.
        """
        member = self.members[index]
        if member.process is None:
            self._spawn(member, new=False)
        if wait:
            self._wait_member(member, time.monotonic() + timeout)

    def pid(self, index: int) -> int | None:
        """Member ``index``'s PID while it runs."""
        process = self.members[index].process
        return process.pid if process is not None and process.poll() is None else None

    def close(self) -> None:
        """Stop every member and remove the directory."""
        for member in self.members:
            self._kill(member)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        """The running cluster."""
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """:meth:`close`."""
        self.close()

    # -- health and access ----------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every member's client URL."""
        return tuple(f"{self.scheme}://127.0.0.1:{m.client_port}" for m in self.members)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_files is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_files.ca))
        if self.client_cert:
            context.load_cert_chain(str(self.tls_files.client_cert), str(self.tls_files.client_key))
        return context

    def _healthy(self, member: _Member) -> bool:
        url = f"{self.scheme}://127.0.0.1:{member.client_port}/health"
        try:
            with urllib.request.urlopen(
                url, timeout=REQUEST_TIMEOUT, context=self._ssl_context()
            ) as answer:
                return bool(json.loads(answer.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _wait_member(self, member: _Member, deadline: float) -> None:
        while time.monotonic() < deadline:
            if member.process is None or member.process.poll() is not None:
                raise EtcdStartError(f"etcd {member.name} exited; its log ends:\n{self.log_tail()}")
            if self._healthy(member):
                return
            time.sleep(0.05)
        raise EtcdStartError(f"etcd {member.name} not healthy in time:\n{self.log_tail()}")

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every running member reports healthy (it has a leader)."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            if member.process is not None:
                self._wait_member(member, deadline)

    def log_tail(self, index: int = 0, lines: int = 20) -> str:
        """The end of member ``index``'s log."""
        member = self.members[index]
        try:
            text = member.log_file.read_text("utf-8", "replace")
        except OSError:
            return ""
        return f"[{member.name}]\n" + "\n".join(text.splitlines()[-lines:])

    def etcdctl(self, *args: str, input_text: str | None = None) -> str:
        """Run ``etcdctl`` (API v3) against the running members; its stdout.

        :raises subprocess.CalledProcessError: when it fails.
        """
        assert ETCDCTL is not None
        running = [f"{self.scheme}://127.0.0.1:{m.client_port}" for m in self.members if m.process]
        command = [ETCDCTL, "--endpoints", ",".join(running), "--command-timeout", "5s"]
        if self.tls_files is not None:
            command += ["--cacert", str(self.tls_files.ca)]
            if self.client_cert:
                command += ["--cert", str(self.tls_files.client_cert)]
                command += ["--key", str(self.tls_files.client_key)]
        if self.password is not None and self._auth_enabled:
            command += ["--user", f"root:{self.password}"]
        done = subprocess.run(
            [*command, *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=15,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
        return done.stdout

    def _enable_auth(self, password: str) -> None:
        """Create ``root`` with ``password`` and turn authentication on."""
        self.etcdctl("user", "add", "root", "--interactive=false", input_text=password + "\n")
        self.etcdctl("auth", "enable")
        self._auth_enabled = True

    def dump(self) -> list[tuple[bytes, bytes]]:
        """Every key and value in the cluster, read with ``etcdctl get -w json``."""
        found = json.loads(self.etcdctl("get", "", "--from-key", "-w", "json"))
        return [
            (base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")))
            for kv in found.get("kvs", [])
        ]

    def compact(self) -> int:
        """Compact the history up to the current revision; that revision."""
        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        revision = max(int(s["Status"]["header"]["revision"]) for s in status)
        self.etcdctl("compaction", str(revision), "--physical")
        return revision

    def gateway_get(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the JSON gateway of the first running member (no auth)."""
        member = next(m for m in self.members if m.process is not None)
        request = urllib.request.Request(
            f"{self.scheme}://127.0.0.1:{member.client_port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(
                request, timeout=REQUEST_TIMEOUT, context=self._ssl_context()
            ) as answer:
                result: dict[str, Any] = json.loads(answer.read())
        except urllib.error.HTTPError as error:
            result = json.loads(error.read())
        return result
