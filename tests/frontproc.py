"""Run a real ``twistd -n echfront`` in a subprocess, for end-to-end tests.

:class:`FrontProcess` writes a TOML configuration (given as text, or as a
dict rendered by :func:`to_toml`) into a working directory, starts
``twistd -n --pidfile= echfront --config FILE`` on a free loopback port,
waits (bounded) until the port accepts connections, and stops the process
by its PID (SIGTERM, then SIGKILL after a bounded wait).

:func:`make_pki` builds the certificates and ECH keys the end-to-end tests
share; :func:`run_twistd` runs twistd to completion (for ``--help`` and
configuration errors).

Nothing here uses a Twisted reactor: tests drive the front with real peers
(the Go ``echtest`` tools, BoringSSL through curl_cffi, raw sockets).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from echfront.app.certs import IssuedCertificate, TestCA
from echfront.ech.echconfig import encode_config_list
from echfront.ech.keyset import generate_key
from echfront.keys.keyfile import write_key_file
from tests.processes import stop_process

__all__ = [
    "PKI_NAMES",
    "FrontProcess",
    "FrontStartError",
    "Pki",
    "free_port",
    "make_pki",
    "run_twistd",
    "to_toml",
    "twistd_command",
]

#: Repository root: put on PYTHONPATH so ``tests.localapp`` imports in twistd.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: How long a front may take to accept connections after it was started.
START_TIMEOUT = 20.0
#: How long SIGTERM gets before SIGKILL.
STOP_TIMEOUT = 10.0

#: Names the shared PKI issues certificates for.
PKI_NAMES = (
    "public.example",
    "secret.example",
    "other.example",
    "private.example",
    "*.wild.example",
)


# -- a tiny TOML writer ---------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX).
        return json.dumps(value)
    if isinstance(value, os.PathLike):
        return json.dumps(os.fspath(value))
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(v, Mapping) for v in value)
    )


def _emit(table: Mapping[str, Any], path: tuple[str, ...], out: list[str]) -> None:
    for name, value in table.items():
        if not isinstance(value, Mapping) and not _is_table_array(value):
            out.append(f"{_key(name)} = {_value(value)}")
    for name, value in table.items():
        here = (*path, name)
        header = ".".join(_key(p) for p in here)
        if isinstance(value, Mapping):
            out.append("")
            out.append(f"[{header}]")
            _emit(value, here, out)
        elif _is_table_array(value):
            for entry in value:
                out.append("")
                out.append(f"[[{header}]]")
                _emit(entry, here, out)


def to_toml(data: Mapping[str, Any]) -> str:
    """Render nested dicts, lists, strings, numbers, booleans and paths as TOML.

    Dict values become ``[tables]``, non-empty lists of dicts ``[[arrays of
    tables]]``; everything else is written inline.  The result is checked
    by parsing it back.
    """
    out: list[str] = []
    _emit(data, (), out)
    text = "\n".join(out).strip() + "\n"
    tomllib.loads(text)  # a writer bug shows up here, not as a confusing front error
    return text


# -- processes --------------------------------------------------------------------


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def twistd_command(*args: str) -> list[str]:
    """The argv that runs this venv's twistd with ``args`` (no pidfile, foreground)."""
    script = Path(sys.executable).parent / "twistd"
    if script.is_file():
        launcher = [sys.executable, str(script)]
    else:  # twisted.scripts.twistd has no __main__ guard, so call run() directly
        launcher = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    return [*launcher, "-n", "--pidfile=", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_twistd(
    args: Sequence[str], *, cwd: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``twistd -n --pidfile= ARGS`` to completion (bounded) and return the result."""
    return subprocess.run(
        twistd_command(*args),
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class FrontStartError(RuntimeError):
    """The front exited or did not accept connections in time."""


class FrontProcess:
    """A ``twistd -n echfront`` subprocess, as a context manager.

    :param workdir: directory for the config file and the log (created).
    :param config: TOML text, or a dict rendered with :func:`to_toml`, or
        None to run with ``args`` only.  When the config has no ``listen``
        key, one for ``tcp:PORT:interface=127.0.0.1`` is added.
    :param args: extra ``echfront`` arguments; ``{port}`` in them is
        replaced by the chosen port.
    :param port: the port to use (default: a free one).
    :param twistd_args: twistd options that go before ``echfront``, e.g.
        ``["--logger=echfront.logs.json_observer"]`` (use the ``--opt=value``
        form: ``--workers`` passes only that form on to its workers).
    """

    def __init__(
        self,
        workdir: Path,
        config: str | Mapping[str, Any] | None = None,
        *,
        args: Sequence[str] = (),
        port: int | None = None,
        start_timeout: float = START_TIMEOUT,
        twistd_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.listen = f"tcp:{self.port}:interface=127.0.0.1"
        self.start_timeout = start_timeout
        self.config_path: Path | None = None
        self.config_text: str | None = None
        if config is not None:
            if isinstance(config, Mapping):
                data = dict(config)
                data.setdefault("listen", [self.listen])
                self.config_text = to_toml(data)
            elif "listen" in tomllib.loads(config):
                self.config_text = config
            else:
                self.config_text = f"listen = [{json.dumps(self.listen)}]\n" + config
        self.args = [a.replace("{port}", str(self.port)) for a in args]
        self.twistd_args = list(twistd_args)
        self.log_path = workdir / "twistd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        """PID of the twistd process (the Python interpreter running it)."""
        assert self._proc is not None, "front not started"
        return self._proc.pid

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, for ``echtest client -addr``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> FrontProcess:
        """Start twistd and wait (bounded) until the port accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = ["echfront"]
        if self.config_text is not None:
            self.config_path = self.workdir / "front.toml"
            self.config_path.write_text(self.config_text)
            argv += ["--config", str(self.config_path)]
        argv += self.args
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                twistd_command(*self.twistd_args, *argv),
                cwd=self.workdir,
                env=_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.returncode = self._proc.returncode
                raise FrontStartError(
                    f"twistd exited with {self.returncode} before listening:\n{self.log_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise FrontStartError(
            f"twistd did not accept connections within {self.start_timeout}s:\n{self.log_text()}"
        )

    def running(self) -> bool:
        """Whether the process is still alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything twistd has written to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def fd_count(self) -> int:
        """Number of open file descriptors of the twistd process (Linux /proc)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait_fd_count(self, target: int, timeout: float = 5.0) -> int:
        """Poll (bounded) until the fd count is at most ``target``; return the last count."""
        deadline = time.monotonic() + timeout
        count = self.fd_count()
        while count > target and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.fd_count()
        return count

    def stop(self) -> int | None:
        """SIGTERM the process by its PID, SIGKILL it if it lingers; the exit status."""
        if self._proc is None:
            return None
        self.returncode = stop_process(self._proc, STOP_TIMEOUT)
        return self.returncode

    def __enter__(self) -> FrontProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- certificates and ECH keys ---------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A test CA with one certificate per name in :data:`PKI_NAMES`, and ECH keys.

    :ivar ca: the CA certificate file (trust anchor for clients).
    :ivar certs: issued certificates by name (``"*.wild.example"`` included).
    :ivar ech_key: RFC 9934 file of the key the front holds.
    :ivar ech_config_list: its ECHConfigList (with length prefix).
    :ivar stale_key: RFC 9934 file of a key the front does not hold.
    :ivar stale_config_list: its ECHConfigList, for clients with outdated configs.
    """

    ca: Path
    certs: dict[str, IssuedCertificate]
    ech_key: Path
    ech_config_list: bytes
    stale_key: Path
    stale_config_list: bytes

    def pair(self, name: str) -> tuple[Path, Path]:
        """``(chain, key)`` of a name's certificate, as GoBackend takes them."""
        issued = self.certs[name]
        return issued.chain, issued.key


def make_pki(directory: Path, public_name: str = "public.example") -> Pki:
    """Create the CA, the certificates and a current and a stale ECH key."""
    ca = TestCA(directory / "ca")
    certs = {name: ca.issue([name]) for name in PKI_NAMES}
    current = generate_key(public_name)
    stale = generate_key(public_name, taken_ids=[current.config_id])
    ech_key = directory / "ech.pem"
    stale_key = directory / "ech-stale.pem"
    write_key_file(ech_key, [current], overwrite=True)
    write_key_file(stale_key, [stale], overwrite=True)
    return Pki(
        ca=ca.cert_path,
        certs=certs,
        ech_key=ech_key,
        ech_config_list=encode_config_list([current.config]),
        stale_key=stale_key,
        stale_config_list=encode_config_list([stale.config]),
    )


# -- raw sockets against a front ------------------------------------------------


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Read until EOF, reset or ``timeout``; return the bytes and how it ended."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            return data, "timeout"
        if not chunk:
            return data, "eof"
        data += chunk
    return data, "timeout"


def client_hello_record(server_name: str = "secret.example") -> bytes:
    """A real TLS ClientHello record (Python's ssl, no ECH)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    record = outgoing.read()
    assert record[:1] == b"\x16" and len(record) > 200
    return record
