"""``--workers N`` (echfront.app.workers): endpoint parsing, shared sockets, supervision.

Parsing is a table.  Sockets are real where the behaviour is the kernel's:
a ``unix:`` listener bound by the supervisor and inherited, and two
``SO_REUSEPORT`` sockets of two workers on one 127.0.0.1 port that both
accept connections.  The supervisor runs on a fake reactor whose
``spawnProcess`` records its calls and whose clock the test advances;
``os.kill`` is replaced, so no signal is ever sent.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import endpoints
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.systemd import ListenFDs

from echfront.app.workers import (
    ADOPT_ENV,
    WORKER_ENV,
    Listener,
    Supervisor,
    TCPListen,
    _reuseport_socket,
    parse_tcp_description,
    shared_listeners,
    worker_index,
    worker_listen,
)
from echfront.errors import ConfigError

INET, INET6 = socket.AF_INET, socket.AF_INET6

# -- parse_tcp_description ------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:8443", TCPListen(INET, 8443, "", 50)),
        ("tcp:443:interface=127.0.0.1", TCPListen(INET, 443, "127.0.0.1", 50)),
        ("tcp:443:interface=0.0.0.0:backlog=1024", TCPListen(INET, 443, "0.0.0.0", 1024)),
        ("tcp:port=8443", TCPListen(INET, 8443, "", 50)),
        ("tcp:interface=127.0.0.1:port=0", TCPListen(INET, 0, "127.0.0.1", 50)),
        ("tcp:backlog=7:port=1", TCPListen(INET, 1, "", 7)),
        ("tcp6:8443", TCPListen(INET6, 8443, "::", 50)),
        (r"tcp6:8443:interface=\:\:1", TCPListen(INET6, 8443, "::1", 50)),
        (r"tcp6:port=8443:interface=2001\:db8\:\:1", TCPListen(INET6, 8443, "2001:db8::1", 50)),
        # An IPv6 interface on a tcp: endpoint, as Twisted allows.
        (r"tcp:8443:interface=\:\:", TCPListen(INET6, 8443, "::", 50)),
    ],
)
def test_parse_tcp_description(description: str, expected: TCPListen) -> None:
    assert parse_tcp_description(description) == expected


@pytest.mark.parametrize(
    "description",
    ["unix:/run/echfront.sock", "systemd:domain=INET:index=0", "ssl:443", "tls:443", "unix:x"],
)
def test_other_endpoint_types_are_not_tcp(description: str) -> None:
    assert parse_tcp_description(description) is None


@pytest.mark.parametrize(
    "description",
    [
        "tcp",
        "tcp:",
        "tcp:http",
        "tcp:-1",
        "tcp:8443:backlog=lots",
        "tcp:8443:reuse=yes",  # unknown option
        "tcp:8443:9000",  # two ports
        "tcp6:8443:interface=::1",  # unescaped colons (Twisted needs \:)
        "tcp:port=",
    ],
)
def test_malformed_tcp_descriptions(description: str) -> None:
    with pytest.raises(ConfigError, match=r"listen: cannot use .* with workers"):
        parse_tcp_description(description)


def test_port_given_twice_is_refused() -> None:
    # Twisted refuses a port given twice ("multiple values for argument
    # 'port'"); with workers the same string must not silently pick one.
    with pytest.raises(ConfigError, match=r"gives the port twice"):
        parse_tcp_description("tcp:80:port=443")


def test_worker_index_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    assert worker_index() is None
    monkeypatch.setenv(WORKER_ENV, "3")
    assert worker_index() == 3
    monkeypatch.setenv(WORKER_ENV, "x")
    assert worker_index() is None


# -- shared listeners ---------------------------------------------------------------------


@contextlib.contextmanager
def closing_fds(listeners: list[Listener]) -> Iterator[list[Listener]]:
    try:
        yield listeners
    finally:
        for listener in listeners:
            if listener.fd is not None:
                os.close(listener.fd)


def test_shared_unix_listener_is_bound_listening_and_inheritable(tmp_path: Path) -> None:
    path = tmp_path / "front.sock"
    with socket.socket(socket.AF_UNIX) as previous:  # a leftover from a previous run
        previous.bind(str(path))
    with closing_fds(shared_listeners([f"unix:{path}"])) as plan:
        (listener,) = plan
        assert listener.description == f"unix:{path}"
        assert listener.tcp is None
        assert listener.family == socket.AF_UNIX
        assert listener.fd is not None
        assert os.get_inheritable(listener.fd)
        with socket.socket(fileno=os.dup(listener.fd)) as server:
            assert server.family == socket.AF_UNIX
            assert server.getsockname() == str(path)
            assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert fcntl.fcntl(listener.fd, fcntl.F_GETFL) & os.O_NONBLOCK
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                client.sendall(b"hello")
                accepted, _ = server.accept()
                with accepted:
                    accepted.setblocking(True)
                    assert accepted.recv(5) == b"hello"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize(
    ("option", "mode"), [("", 0o666), (":mode=600", 0o600), (":mode=660", 0o660)]
)
def test_shared_unix_listener_mode_as_twisted_sets_it(
    tmp_path: Path, option: str, mode: int
) -> None:
    # Twisted's unix: server endpoint chmods the socket to mode= (default
    # 666); the same listen string must give the same permissions with
    # --workers, or a proxy that could connect to one process cannot connect
    # to the workers.
    path = tmp_path / "front.sock"
    with umask(0o022), closing_fds(shared_listeners([f"unix:{path}{option}"])):
        assert stat.S_IMODE(path.stat().st_mode) == mode


def test_shared_unix_listener_never_deletes_a_regular_file(tmp_path: Path) -> None:
    # Twisted removes only a leftover *socket* at the path (twisted#12785);
    # a typo pointing at, say, the configuration file must not delete it.
    path = tmp_path / "front.toml"
    path.write_text("listen = []\n")
    with pytest.raises(ConfigError, match=str(path)):
        shared_listeners([f"unix:{path}"])
    assert path.read_text() == "listen = []\n"


def test_shared_unix_listener_with_keyword_address(tmp_path: Path) -> None:
    path = tmp_path / "kw.sock"
    with closing_fds(shared_listeners([f"unix:address={path}:mode=660"])) as plan:
        assert plan[0].fd is not None
        assert path.exists()


def test_shared_listeners_plan_tcp_without_binding() -> None:
    plan = shared_listeners(["tcp:8443:interface=127.0.0.1", r"tcp6:8443:interface=\:\:1"])
    assert plan == [
        Listener("tcp:8443:interface=127.0.0.1", tcp=TCPListen(INET, 8443, "127.0.0.1", 50)),
        Listener(r"tcp6:8443:interface=\:\:1", tcp=TCPListen(INET6, 8443, "::1", 50)),
    ]


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("ssl:443:privateKey=k.pem", "workers cannot share 'ssl:443:privateKey=k.pem'"),
        ("unix:", "has no socket path"),
        ("unix:mode=600", "has no socket path"),
        ("tcp:nope", "cannot use 'tcp:nope' with workers"),
    ],
)
def test_shared_listeners_errors(description: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        shared_listeners([description])


def test_shared_systemd_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as first, socket.socket(socket.AF_INET6) as second:
        fds = ListenFDs([first.fileno(), second.fileno()], ["web", "alt"])
        # Twisted reads LISTEN_FDS once, when its endpoints module is imported,
        # and its systemd: parser keeps the result; that is what echfront asks.
        monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon", fds)
        by_index, by_name = shared_listeners(
            ["systemd:domain=INET:index=0", "systemd:domain=INET6:name=alt"]
        )
        assert (by_index.fd, by_index.family) == (first.fileno(), INET)
        assert (by_name.fd, by_name.family) == (second.fileno(), INET6)
        assert os.get_inheritable(first.fileno())
        with pytest.raises(ConfigError, match="systemd passed no such socket"):
            shared_listeners(["systemd:domain=INET:index=2"])
        with pytest.raises(ConfigError, match="systemd passed no such socket"):
            shared_listeners(["systemd:domain=INET:name=missing"])


# -- SO_REUSEPORT: two workers, one port -----------------------------------------------------


class AdoptingReactor:
    """Records adoptStreamPort calls and keeps a duplicate of each socket."""

    def __init__(self) -> None:
        self.adopted: list[tuple[socket.socket, int, Any]] = []

    def adoptStreamPort(self, fileno: int, family: int, factory: Any) -> object:
        self.adopted.append((socket.socket(fileno=os.dup(fileno)), family, factory))
        return object()

    def close(self) -> None:
        for sock, _family, _factory in self.adopted:
            sock.close()


def accept_all(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def spread(servers: list[socket.socket], port: int, clients: int = 40) -> list[int]:
    """Connect ``clients`` times to 127.0.0.1:port; how many each server accepted."""
    conns = []
    try:
        for _ in range(clients):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for server in servers:
            server.setblocking(False)
        counts = [0] * len(servers)
        for _ in range(200):
            for index, server in enumerate(servers):
                counts[index] += accept_all(server)
            if sum(counts) == clients:
                break
            time.sleep(0.01)
        return counts
    finally:
        for conn in conns:
            conn.close()


def test_two_reuseport_sockets_on_one_port_both_accept() -> None:
    first = _reuseport_socket(TCPListen(INET, 0, "127.0.0.1", 64))
    port = first.getsockname()[1]
    second = _reuseport_socket(TCPListen(INET, port, "127.0.0.1", 64))
    with first, second:
        for sock in (first, second):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert not sock.getblocking()
        counts = spread([first, second], port)
    assert sum(counts) == 40
    assert all(counts), counts


def test_worker_listen_opens_its_own_reuseport_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADOPT_ENV, raising=False)
    reactor = AdoptingReactor()
    try:
        factory_a, factory_b = Factory(), Factory()
        worker_listen(reactor, 0, "tcp:0:interface=127.0.0.1", factory_a)
        port = reactor.adopted[0][0].getsockname()[1]
        worker_listen(reactor, 0, f"tcp:{port}:interface=127.0.0.1", factory_b)
        (sock_a, family_a, got_a), (sock_b, family_b, got_b) = reactor.adopted
        assert (family_a, got_a) == (INET, factory_a)
        assert (family_b, got_b) == (INET, factory_b)
        assert sock_b.getsockname() == ("127.0.0.1", port)
        counts = spread([sock_a, sock_b], port)
        assert sum(counts) == 40
        assert all(counts), counts
    finally:
        reactor.close()


def test_worker_listen_adopts_the_supervisors_socket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "adopt.sock"
    with closing_fds(shared_listeners(["tcp:1", f"unix:{path}"])) as plan:
        fd = plan[1].fd
        assert fd is not None
        monkeypatch.setenv(ADOPT_ENV, f"1={fd}")
        reactor = AdoptingReactor()
        try:
            factory = Factory()
            worker_listen(reactor, 1, f"unix:{path}", factory)
            ((sock, family, got),) = reactor.adopted
            assert (family, got) == (socket.AF_UNIX, factory)
            assert sock.getsockname() == str(path)
        finally:
            reactor.close()


def test_worker_listen_refuses_what_it_cannot_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADOPT_ENV, "")
    with pytest.raises(ConfigError, match="worker cannot open 'unix:/x'"):
        worker_listen(AdoptingReactor(), 0, "unix:/x", Factory())


# -- the supervisor ------------------------------------------------------------------------------


class FakeProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class SpawningReactor(Clock):
    """A clock whose spawnProcess records calls and 'starts' a process at once."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.next_pid = 1000

    def spawnProcess(
        self,
        protocol: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str],
        childFDs: dict[int, Any],
    ) -> FakeProcessTransport:
        self.next_pid += 1
        transport = FakeProcessTransport(self.next_pid)
        self.spawned.append(
            {
                "protocol": protocol,
                "executable": executable,
                "args": args,
                "env": env,
                "childFDs": childFDs,
                "pid": self.next_pid,
                "time": self.seconds(),
            }
        )
        protocol.makeConnection(transport)
        return transport

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


class Kills:
    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def __call__(self, pid: int, sig: int) -> None:
        self.sent.append((pid, sig))


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> Kills:
    recorder = Kills()
    monkeypatch.setattr(os, "kill", recorder)  # what echfront.app.workers calls
    return recorder


@pytest.fixture
def supervised(tmp_path: Path, kills: Kills) -> Iterator[tuple[Supervisor, SpawningReactor]]:
    reactor = SpawningReactor()
    previous = signal.getsignal(signal.SIGHUP)
    supervisor = Supervisor(
        reactor,
        argv=["python", "-c", "worker"],
        count=2,
        listeners=[Listener("tcp:8443", tcp=TCPListen(INET, 8443, "", 50))],
        grace=10.0,
        metrics_dir=str(tmp_path),
    )
    supervisor.startService()
    try:
        yield supervisor, reactor
    finally:
        if supervisor.running:
            supervisor.stopService()
        signal.signal(signal.SIGHUP, previous)


def end(reactor: SpawningReactor, spawn_index: int) -> None:
    """The process of the spawn_index-th spawnProcess call exits."""
    protocol = reactor.spawned[spawn_index]["protocol"]
    protocol.processEnded(Failure(Exception("exit 1")))


def test_starts_count_workers_with_their_environment(
    supervised: tuple[Supervisor, SpawningReactor], tmp_path: Path
) -> None:
    supervisor, reactor = supervised
    assert len(reactor.spawned) == 2
    for index, call in enumerate(reactor.spawned):
        assert call["executable"] == sys.executable
        assert call["args"] == ["python", "-c", "worker"]
        assert call["env"][WORKER_ENV] == str(index)
        assert call["env"]["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
        assert call["env"][ADOPT_ENV] == ""
        assert call["childFDs"] == {0: "w", 1: 1, 2: 2}
    assert {i: w.pid for i, w in supervisor.workers.items()} == {0: 1001, 1: 1002}


def test_inherited_listeners_are_passed_to_workers(tmp_path: Path, kills: Kills) -> None:
    reactor = SpawningReactor()
    previous = signal.getsignal(signal.SIGHUP)
    listeners = [Listener("tcp:1", tcp=TCPListen(INET, 1, "", 50)), Listener("unix:x", fd=17)]
    supervisor = Supervisor(
        reactor, argv=["w"], count=1, listeners=listeners, grace=1, metrics_dir=str(tmp_path)
    )
    try:
        supervisor.startService()
        (call,) = reactor.spawned
        assert call["env"][ADOPT_ENV] == "1=17"
        assert call["childFDs"] == {0: "w", 1: 1, 2: 2, 17: 17}
    finally:
        supervisor.stopService()
        signal.signal(signal.SIGHUP, previous)


def test_dead_worker_is_restarted_after_a_backoff(
    supervised: tuple[Supervisor, SpawningReactor],
) -> None:
    supervisor, reactor = supervised
    reactor.advance(100)
    end(reactor, 1)
    assert 1 not in supervisor.workers
    assert supervisor.restarts == 1
    reactor.advance(0.999)
    assert len(reactor.spawned) == 2
    reactor.advance(0.001)
    assert len(reactor.spawned) == 3
    respawn = reactor.spawned[2]
    assert respawn["env"][WORKER_ENV] == "1"
    assert supervisor.workers[1].pid == respawn["pid"]
    assert supervisor.workers[0].pid == 1001  # the other worker is untouched


def test_backoff_doubles_and_caps_at_thirty_seconds(
    supervised: tuple[Supervisor, SpawningReactor],
) -> None:
    supervisor, reactor = supervised
    delays = []
    for _ in range(8):
        end(reactor, len(reactor.spawned) - 1 if len(reactor.spawned) > 2 else 0)
        died = reactor.seconds()
        (pending,) = reactor.getDelayedCalls()
        delays.append(pending.getTime() - died)
        reactor.advance(pending.getTime() - died)
        assert reactor.spawned[-1]["env"][WORKER_ENV] == "0"
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert supervisor.restarts == 8


def test_backoff_is_per_worker(supervised: tuple[Supervisor, SpawningReactor]) -> None:
    _supervisor, reactor = supervised
    end(reactor, 0)
    reactor.advance(1)
    end(reactor, 2)  # worker 0 again: 2 s
    end(reactor, 1)  # worker 1 for the first time: 1 s
    times = sorted(call.getTime() for call in reactor.getDelayedCalls())
    assert times == [2.0, 3.0]


def test_stop_sends_sigterm_and_waits(
    supervised: tuple[Supervisor, SpawningReactor], kills: Kills
) -> None:
    supervisor, reactor = supervised
    done = supervisor.stopService()
    assert done is not None
    assert sorted(kills.sent) == [(1001, signal.SIGTERM), (1002, signal.SIGTERM)]
    fired: list[object] = []
    done.addBoth(fired.append)
    end(reactor, 0)
    assert fired == []
    end(reactor, 1)
    assert len(fired) == 1
    # Nobody is restarted while stopping, and no timer is left behind.
    reactor.advance(60)
    assert len(reactor.spawned) == 2
    assert reactor.getDelayedCalls() == []
    assert len(kills.sent) == 2


def test_stop_kills_workers_that_outlive_the_grace(
    supervised: tuple[Supervisor, SpawningReactor], kills: Kills
) -> None:
    supervisor, reactor = supervised
    done = supervisor.stopService()
    assert done is not None
    end(reactor, 0)
    reactor.advance(14.9)
    assert (1002, signal.SIGKILL) not in kills.sent
    reactor.advance(0.1)  # grace (10) + 5
    assert kills.sent[-1] == (1002, signal.SIGKILL)
    assert (1001, signal.SIGKILL) not in kills.sent
    fired: list[object] = []
    done.addBoth(fired.append)
    end(reactor, 1)
    assert len(fired) == 1


def test_stop_while_a_restart_is_pending(
    supervised: tuple[Supervisor, SpawningReactor], kills: Kills
) -> None:
    supervisor, reactor = supervised
    end(reactor, 0)
    done = supervisor.stopService()
    assert done is not None
    assert kills.sent == [(1002, signal.SIGTERM)]
    reactor.advance(5)  # the restart would have happened at 1 s
    assert len(reactor.spawned) == 2
    end(reactor, 1)
    assert done.called


def test_sighup_reaches_every_worker(
    supervised: tuple[Supervisor, SpawningReactor], kills: Kills
) -> None:
    supervisor, _reactor = supervised
    reloaded: list[bool] = []
    supervisor.on_reload = lambda: reloaded.append(True)
    handler = signal.getsignal(signal.SIGHUP)
    assert callable(handler)
    handler(signal.SIGHUP, None)
    assert reloaded == [True]
    assert sorted(kills.sent) == [(1001, signal.SIGHUP), (1002, signal.SIGHUP)]


@pytest.mark.parametrize("passes", [True, False])
def test_sighup_waits_for_the_supervisors_check(
    supervised: tuple[Supervisor, SpawningReactor], kills: Kills, passes: bool
) -> None:
    """SIGHUP reaches the workers only when ``check_reload`` accepts the configuration."""
    supervisor, _reactor = supervised
    checked: list[bool] = []

    def check() -> bool:
        checked.append(True)
        return passes

    supervisor.check_reload = check
    handler = signal.getsignal(signal.SIGHUP)
    assert callable(handler)
    handler(signal.SIGHUP, None)
    assert checked == [True]
    expected = [(1001, signal.SIGHUP), (1002, signal.SIGHUP)] if passes else []
    assert sorted(kills.sent) == expected
    # The rotation schedule's own reload (key files changed) never waits for it.
    supervisor.reload()
    assert checked == [True]
    assert len(kills.sent) == len(expected) + 2


def test_stop_restores_the_previous_sighup_handler(tmp_path: Path, kills: Kills) -> None:
    previous = signal.getsignal(signal.SIGHUP)
    marker = signal.SIG_IGN
    signal.signal(signal.SIGHUP, marker)
    try:
        supervisor = Supervisor(
            SpawningReactor(), argv=["w"], count=1, listeners=[], grace=1,
            metrics_dir=str(tmp_path),
        )  # fmt: skip
        supervisor.startService()
        assert signal.getsignal(signal.SIGHUP) != marker
        supervisor.stopService()
        assert signal.getsignal(signal.SIGHUP) == marker
    finally:
        signal.signal(signal.SIGHUP, previous)
