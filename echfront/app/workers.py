# -*- test-case-name: tests.test_workers -*-
"""``--workers N``: one supervising process and N worker processes.

One twistd process uses one core.  With ``--workers N`` the process started
by the operator becomes a supervisor: it validates the configuration, starts
N workers (``twistd echfront`` again, with the same options) and restarts any
that dies.  SIGHUP to the supervisor reaches every worker (each reloads)
once the supervisor's own check passes (:attr:`Supervisor.check_reload`);
SIGTERM stops them gracefully.

Sharing the listening ports:

* ``tcp:``/``tcp6:`` endpoints: every worker opens its own socket with
  ``SO_REUSEPORT`` on the same address; the kernel spreads connections over
  them (recommended; each worker has its own accept queue);
* ``unix:`` and ``systemd:`` endpoints: the supervisor holds the listening
  socket and every worker adopts a copy of it (one shared accept queue).

Metrics: workers write into a multiprocess directory created by the
supervisor, which serves their sum on ``--metrics``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from echfront.config.endpoints import split_endpoint_description
from echfront.errors import ConfigError

__all__ = [
    "ADOPT_ENV",
    "WORKER_ENV",
    "Listener",
    "Supervisor",
    "parse_tcp_description",
    "shared_listeners",
    "worker_index",
    "worker_listen",
]

#: Set in a worker's environment to its index.
WORKER_ENV = "ECHFRONT_WORKER"
#: ``<listen index>=<fd>,...``: listening sockets a worker adopts from the supervisor.
ADOPT_ENV = "ECHFRONT_ADOPT"

_log = Logger()


def worker_index() -> int | None:
    """This process's worker index, or None outside ``--workers`` mode."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None and value.isdigit() else None


@dataclass(frozen=True)
class TCPListen:
    """A parsed ``tcp:`` or ``tcp6:`` server endpoint description."""

    family: int
    port: int
    interface: str
    backlog: int


def parse_tcp_description(description: str) -> TCPListen | None:
    """Parse ``tcp[6]:PORT[:interface=I][:backlog=N]`` (keyword ``port=`` too).

    :returns: None for any other endpoint type.
    :raises ConfigError: for a malformed tcp description.
    """
    kind, *rest = split_endpoint_description(description)
    if kind not in ("tcp", "tcp6"):
        return None
    options: dict[str, str] = {}
    positional = []
    for item in rest:
        key, sep, value = item.partition("=")
        if sep:
            options[key] = value
        else:
            positional.append(item)
    if "port" in options and positional:
        raise ConfigError(f"listen: {description!r} gives the port twice")
    port_text = options.pop("port", positional[0] if positional else "")
    interface = options.pop("interface", "::" if kind == "tcp6" else "")
    backlog_text = options.pop("backlog", "50")
    if options or len(positional) > 1 or not port_text.isdigit() or not backlog_text.isdigit():
        raise ConfigError(f"listen: cannot use {description!r} with workers")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
    return TCPListen(family, int(port_text), interface, int(backlog_text))


def _reuseport_socket(spec: TCPListen) -> socket.socket:
    """A listening socket with SO_REUSEPORT, non-blocking."""
    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((spec.interface, spec.port))
        sock.listen(spec.backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class Listener:
    """How workers share one ``listen`` entry: their own socket, or an inherited fd."""

    description: str
    tcp: TCPListen | None = None
    fd: int | None = None
    family: int = socket.AF_INET


def shared_listeners(descriptions: Sequence[str]) -> list[Listener]:
    """Plan the listening sockets for workers (see the module docstring).

    ``unix:`` sockets are bound here, by the supervisor, and inherited.

    :raises ConfigError: for an endpoint type workers cannot share.
    """
    plan = []
    for description in descriptions:
        tcp = parse_tcp_description(description)
        if tcp is not None:
            plan.append(Listener(description, tcp=tcp))
            continue
        kind, *rest = split_endpoint_description(description)
        if kind == "unix":
            plan.append(_unix_listener(description, rest))
        elif kind == "systemd":
            plan.append(_systemd_listener(description, rest))
        else:
            raise ConfigError(
                f"listen: workers cannot share {description!r}; use tcp:, unix: or systemd:"
            )
    return plan


def _unix_listener(description: str, rest: list[str]) -> Listener:
    """Bind a UNIX socket as Twisted's ``unix:`` server endpoint would.

    Same options (``address``, ``mode`` (octal, default 666), ``backlog``),
    and a leftover socket file is replaced, but nothing else ever is: a
    path that names a regular file is a mistake worth an error.
    """
    options = {k: v for k, _, v in (p.partition("=") for p in rest if "=" in p)}
    positional = [p for p in rest if "=" not in p]
    path = options.pop("address", positional[0] if positional else "")
    mode_text = options.pop("mode", "666")
    backlog_text = options.pop("backlog", "50")
    options.pop("lockfile", None)
    if not path:
        raise ConfigError(f"listen: {description!r} has no socket path")
    if options or not backlog_text.isdigit():
        raise ConfigError(f"listen: cannot use {description!r} with workers")
    try:
        mode = int(mode_text, 8)
    except ValueError:
        raise ConfigError(f"listen: {description!r}: mode must be octal") from None
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as error:
        sock.close()
        raise ConfigError(f"listen: {description!r}: {error.strerror}") from None
    os.chmod(path, mode)
    sock.listen(int(backlog_text))
    sock.setblocking(False)
    os.set_inheritable(sock.fileno(), True)
    return Listener(description, fd=sock.detach(), family=socket.AF_UNIX)


def _socket_family(fd: int) -> int:
    """The address family of a socket descriptor, without keeping a second one open."""
    probe = socket.socket(fileno=fd)
    try:
        return probe.family
    finally:
        probe.detach()  # the descriptor stays open; it is not ours to close


def _systemd_listener(description: str, rest: list[str]) -> Listener:
    """A socket systemd passed us, found by Twisted's own ``systemd:`` parser.

    Twisted reads (and removes) LISTEN_FDS when its endpoints module is
    imported, so the descriptor is looked up through it rather than in the
    environment.  systemd passes blocking sockets; workers need non-blocking
    ones, so that is set here, once, for all of them.
    """
    from twisted.internet import reactor  # noqa: PLC0415 (the endpoint only parses)

    try:
        endpoint = serverFromString(reactor, description)
    except (IndexError, KeyError):
        raise ConfigError(f"listen: {description!r}: systemd passed no such socket") from None
    except Exception as error:
        raise ConfigError(f"listen: {description!r}: {error}") from None
    fd = getattr(endpoint, "fileno", None)
    if not isinstance(fd, int):
        raise ConfigError(f"listen: {description!r}: systemd passed no such socket")
    try:
        os.fstat(fd)
    except OSError:
        raise ConfigError(f"listen: {description!r}: systemd passed no such socket") from None
    os.set_blocking(fd, False)
    os.set_inheritable(fd, True)
    return Listener(description, fd=fd, family=_socket_family(fd))


def worker_listen(
    reactor: Any,
    index: int,
    description: str,
    factory: IProtocolFactory,
    *,
    adopt: Callable[[int, int, IProtocolFactory], IListeningPort] | None = None,
) -> IListeningPort:
    """In a worker: listen for ``description`` (the ``index``-th listen entry).

    A socket adopted from the supervisor when one was passed; otherwise a
    SO_REUSEPORT socket of this worker's own.

    :param adopt: listens on a listening descriptor (default: the reactor's
        ``adoptStreamPort``; the lean engine's is
        :func:`echfront.front.leanport.adopt_port`).
    """
    adopt_port = reactor.adoptStreamPort if adopt is None else adopt
    adopted = dict(
        item.split("=", 1) for item in os.environ.get(ADOPT_ENV, "").split(",") if "=" in item
    )
    if str(index) in adopted:
        fd = int(adopted[str(index)])
        os.set_blocking(fd, False)  # adoptStreamPort needs a non-blocking socket
        port: IListeningPort = adopt_port(fd, _socket_family(fd), factory)
        return port
    spec = parse_tcp_description(description)
    if spec is None:
        raise ConfigError(f"listen: worker cannot open {description!r} itself")
    sock = _reuseport_socket(spec)
    try:
        port = adopt_port(sock.fileno(), spec.family, factory)
    finally:
        sock.close()  # adoptStreamPort keeps its own duplicate
    return port


class _WorkerProcess(ProcessProtocol):
    """Watches one worker; tells the supervisor when it ends."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport is not None else None

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason)


class Supervisor(Service):
    """Runs and supervises the workers (see the module docstring).

    :param argv: the worker command line, without environment.
    :param count: how many workers.
    :param listeners: from :func:`shared_listeners`.
    :param grace: seconds workers get to finish open connections on stop.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        argv: Sequence[str],
        count: int,
        listeners: Sequence[Listener],
        grace: float,
        metrics_dir: str | None = None,
    ) -> None:
        """Prepare; workers start with the service."""
        self.reactor = reactor
        self.argv = list(argv)
        self.count = count
        self.listeners = list(listeners)
        self.grace = grace
        self._owns_metrics_dir = metrics_dir is None
        self.metrics_dir = metrics_dir or tempfile.mkdtemp(prefix="echfront-metrics-")
        self.workers: dict[int, _WorkerProcess] = {}
        self.restarts = 0
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._backoff: dict[int, float] = {}
        self._started: dict[int, float] = {}
        self._previous_hup: Any = None
        self.on_reload: Callable[[], None] | None = None
        #: Runs on SIGHUP before the workers are told; False keeps them as they are.
        self.check_reload: Callable[[], bool] | None = None

    def startService(self) -> None:
        """Start every worker and forward SIGHUP."""
        super().startService()  # type: ignore[no-untyped-call]
        for index in range(self.count):
            self._spawn(index)
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.hangup)

    def hangup(self) -> None:
        """SIGHUP: check the configuration (:attr:`check_reload`), then let every worker reload."""
        if self.check_reload is None or self.check_reload():
            self.reload()

    def reload(self) -> None:
        """Let every worker reload (each checks its configuration itself)."""
        if self.on_reload is not None:
            self.on_reload()
        for worker in self.workers.values():
            if worker.pid is not None:
                os.kill(worker.pid, signal.SIGHUP)

    def _spawn(self, index: int) -> None:
        env = dict(os.environ)
        env[WORKER_ENV] = str(index)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        adopt = []
        for position, listener in enumerate(self.listeners):
            if listener.fd is not None:
                child_fds[listener.fd] = listener.fd
                adopt.append(f"{position}={listener.fd}")
        env[ADOPT_ENV] = ",".join(adopt)
        worker = _WorkerProcess(self, index)
        self.reactor.spawnProcess(worker, sys.executable, self.argv, env=env, childFDs=child_fds)
        self.workers[index] = worker
        self._started[index] = self.reactor.seconds()
        _log.info("started worker {index} (pid {pid})", index=index, pid=worker.pid)

    def worker_ended(self, worker: _WorkerProcess, reason: Failure) -> None:
        """A worker exited: restart it, unless stopping."""
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if worker.pid is not None:
            _mark_dead(self.metrics_dir, worker.pid)
        if self._stopping:
            if not self.workers and self._stopped is not None:
                self._stopped.callback(None)
            return
        self.restarts += 1
        if self.reactor.seconds() - self._started.get(worker.index, 0.0) > 60.0:
            # It ran for a while: a crash now is not a crash loop.
            self._backoff.pop(worker.index, None)
        delay = min(30.0, self._backoff.get(worker.index, 0.5) * 2)
        self._backoff[worker.index] = delay
        _log.error(
            "worker {index} (pid {pid}) ended ({reason}); restarting in {delay:.1f}s",
            index=worker.index,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self.reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self.workers:
            self._spawn(index)

    def stopService(self) -> Deferred[None] | None:
        """SIGTERM every worker; wait for them (SIGKILL after the grace period)."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        self._stopping = True
        if not self.workers:
            self._remove_metrics_dir()
            return None
        self._stopped = Deferred()
        for worker in self.workers.values():
            if worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        killer = self.reactor.callLater(self.grace + 5.0, self._kill_remaining)

        def finished(result: object) -> object:
            if killer.active():
                killer.cancel()
            self._remove_metrics_dir()
            return result

        self._stopped.addBoth(finished)
        return self._stopped

    def _remove_metrics_dir(self) -> None:
        """The workers' metric files are only meaningful while they run."""
        if self._owns_metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _kill_remaining(self) -> None:
        for worker in list(self.workers.values()):
            if worker.pid is not None:
                os.kill(worker.pid, signal.SIGKILL)


def _mark_dead(directory: str, pid: int) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics."""
    from prometheus_client import multiprocess  # noqa: PLC0415 (only the supervisor needs it)

    multiprocess.mark_process_dead(pid, directory)
