"""A fleet end to end (issue 13): three twistd fronts sharing their keys in etcd.

Everything is real and on loopback: a 3-member etcd cluster
(tests/etcdcluster.py), two Knot DNS servers (the primary takes the
leader's RFC 2136 updates; the test copies its HTTPS records to the
secondary, and pausing that copy holds the DNS barrier), a Go backend, and
three ``twistd echfront`` fronts with ``[keys] store = "etcd"`` rotating
every few seconds.  Go ECH clients, round-robin across the live fronts,
always use the ECHConfigList they last read from DNS, and every older list
still in its grace period; each new list is checked against what every
member reported loaded in etcd the moment it appears.

The bounded test runs in about a minute; the soak variant
(``ECHFRONT_SOAK=1``, ``ECHFRONT_SOAK_ROUNDS``, default 10) repeats the
rotations and every failure many times.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from echfront.ech.echconfig import decode_config_list
from echfront.keys.etcdfleet import LEADER, ROTATION
from echfront.keys.sealing import Sealer, sealing_context
from tests.etcdcluster import ETCD_MISSING, EtcdCluster
from tests.frontproc import FrontProcess, Pki, make_pki
from tests.gotools import GoBackend, GoUnavailableError, go_binary, run_client
from tests.knotd import KNOTD_MISSING, KnotServer

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(KNOTD_MISSING is not None, reason=KNOTD_MISSING or ""),
    pytest.mark.skipif(ETCD_MISSING is not None, reason=ETCD_MISSING or ""),
]

PUBLIC = "public.example"
SECRET = "secret.example"
PREFIX = "/fleet/"
ROTATE = 4.0
GRACE = 10.0
#: Slack for sampling, process start and a Go client's run.
MARGIN = 2.5
MEMBER_TTL = 4.0
FRONTS = 3


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    try:
        go_binary()
    except GoUnavailableError as error:
        pytest.skip(str(error))
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def backend(pki: Pki) -> Iterator[GoBackend]:
    with GoBackend([pki.pair(SECRET)], ident="secret") as server:
        yield server


@pytest.fixture
def kek(tmp_path: Path) -> Path:
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def quiet_port() -> int:
    """A free loopback port below the ephemeral range.

    A front binds its port only after it has talked to etcd, and a port
    from the ephemeral range may meanwhile have become the local end of one
    of its own (or anyone's) outgoing connections.
    """
    ports = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    low = int(ports[0])
    for _attempt in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def ids_of(config_list: bytes) -> list[int]:
    return [c.config_id for c in decode_config_list(config_list).configs]


# -- etcd, read directly ----------------------------------------------------------


def etcd_entries(cluster: EtcdCluster) -> dict[str, bytes]:
    """Every entry under the fleet's prefix, read with etcdctl."""
    found = json.loads(cluster.etcdctl("get", "--prefix", PREFIX, "-w", "json"))
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
        for kv in found.get("kvs", [])
    }


def key_records(entries: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {
        name[len(PREFIX + "keys/") :]: json.loads(value)
        for name, value in entries.items()
        if name.startswith(PREFIX + "keys/")
    }


def members(entries: dict[str, bytes]) -> dict[str, set[str]]:
    return {
        name[len(PREFIX + "members/") :]: set(json.loads(value)["loaded"])
        for name, value in entries.items()
        if name.startswith(PREFIX + "members/")
    }


def keys_of_list(entries: dict[str, bytes], config_list: bytes) -> set[str]:
    """The key ids whose configs make up ``config_list``."""
    wanted = set(ids_of(config_list))
    return {
        key_id
        for key_id, record in key_records(entries).items()
        if set(ids_of(base64.b64decode(record["config_list"]))) & wanted
    }


def states(fleet: Fleet) -> list[str]:
    return [r["state"] for r in key_records(etcd_entries(fleet.cluster)).values()]


def leader_of(cluster: EtcdCluster) -> str | None:
    value = cluster.etcdctl("get", PREFIX + LEADER, "--print-value-only").strip()
    return str(json.loads(value)["name"]) if value else None


def rotation_record(cluster: EtcdCluster) -> dict[str, Any]:
    value = cluster.etcdctl("get", PREFIX + ROTATION, "--print-value-only").strip()
    return json.loads(value) if value else {}


# -- the fleet ---------------------------------------------------------------------


@dataclass
class Result:
    """One client connection."""

    front: str
    list_ids: list[int]
    superseded: bool
    ok: bool
    accepted: bool
    rejected: bool
    error: str | None


@dataclass
class Fleet:
    """The fronts, the DNS servers and the clients of one test."""

    tmp: Path
    pki: Pki
    backend: GoBackend
    cluster: EtcdCluster
    primary: KnotServer
    secondary: KnotServer
    kek: Path
    fronts: dict[str, FrontProcess] = field(default_factory=dict)
    metrics: dict[str, int] = field(default_factory=dict)
    #: Fronts the clients leave alone (about to be killed, restarting).
    down: set[str] = field(default_factory=set)
    #: (list, first seen, superseded at) in the order DNS served them.
    history: list[tuple[bytes, float, float | None]] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    barrier_violations: list[str] = field(default_factory=list)
    replicate: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: New lists waiting to be checked against etcd.
    checks: queue.Queue[bytes] = field(default_factory=queue.Queue)
    #: What the background threads could not do (each a one-line reason).
    errors: list[str] = field(default_factory=list)
    #: The list DNS served before the fleet published anything.
    initial: bytes | None = None

    def config(self, name: str, *, rotate: bool = True) -> dict[str, Any]:
        keys: dict[str, Any] = {
            "store": "etcd",
            "etcd": {
                "endpoints": list(self.cluster.endpoints),
                "prefix": PREFIX,
                "kek_file": str(self.kek),
                "member": name,
                "member_ttl": f"{MEMBER_TTL}s",
                "timeout": "1s",
            },
        }
        if rotate:
            keys.update(
                rotate=f"{ROTATE}s",
                grace=f"{GRACE}s",
                check_interval="0.3s",
                verify_timeout="30s",
            )
        publish: dict[str, Any] = {"names": [SECRET]}
        if rotate:
            servers = [self.primary.server, self.secondary.server]
            publish.update(self.primary.publish_table(verify_servers=servers))
        return {
            "public_name": PUBLIC,
            "keys": keys,
            "publish": publish,
            "public": {"cert": str(self.pki.certs[PUBLIC].combined)},
            "backends": {"secret": {"endpoint": f"tcp:host=127.0.0.1:port={self.backend.port}"}},
            "routes": [{"name": SECRET, "backend": "secret", "require_ech": True}],
            "metrics": {"listen": f"tcp:{self.metrics[name]}:interface=127.0.0.1"},
        }

    def front(self, name: str, *, port: int | None = None) -> FrontProcess:
        self.metrics.setdefault(name, quiet_port())
        front = FrontProcess(
            self.tmp / name, self.config(name), port=port or quiet_port(), start_timeout=40
        )
        self.fronts[name] = front
        return front

    def start_fronts(self, names: list[str]) -> None:
        made = [self.front(name) for name in names]
        with ThreadPoolExecutor(len(made)) as pool:
            list(pool.map(FrontProcess.start, made))

    def kill(self, name: str) -> None:
        """SIGKILL a front (a crash: no lease revoked, nothing said)."""
        with self.lock:
            self.down.add(name)
        time.sleep(0.5)  # let a client connection to it in flight finish
        front = self.fronts[name]
        os.kill(front.pid, signal.SIGKILL)
        front.stop()

    def metric(self, name: str, metric: str) -> float:
        url = f"http://127.0.0.1:{self.metrics[name]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            text = page.read().decode()
        match = re.search(rf"^{re.escape(metric)} (\S+)$", text, re.M)
        assert match is not None, f"{metric} not served by {name}"
        return float(match.group(1))

    def dns(self) -> bytes | None:
        (value,) = self.primary.ech(SECRET + ".")
        return value

    def lists(self) -> int:
        with self.lock:
            return len(self.history)

    # -- background threads ---------------------------------------------------------

    def start_threads(self) -> None:
        self.replicate.set()
        for target in (self._replicator, self._clients, self._checker):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop_threads(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive()

    def _guarded(self, work: Callable[..., None], *args: Any) -> None:
        try:
            work(*args)
        except Exception as error:  # recorded; the test fails on it at the end
            self.errors.append(f"{work.__name__}: {type(error).__name__}: {error}")

    def _replicator(self) -> None:
        """Copy the primary's HTTPS records to the secondary, unless paused."""
        while not self.stopping.wait(0.05):
            if self.replicate.is_set():
                self._guarded(self._replicate)

    def _replicate(self) -> None:
        primary = self.primary.https_rrset(SECRET + ".")
        secondary = self.secondary.https_rrset(SECRET + ".")
        if primary is not None and primary != secondary:
            rdatas = [rdata.to_text() for rdata in primary]
            self.secondary.replace(SECRET + ".", primary.ttl, "HTTPS", *rdatas)

    def _new_list(self, config_list: bytes, now: float) -> None:
        """A list DNS just started serving: every live front decrypts it at once."""
        self.checks.put(config_list)
        with self.lock:
            if self.history:
                last, seen, _ = self.history[-1]
                self.history[-1] = (last, seen, now)
            self.history.append((config_list, now, None))
            live = [n for n in self.fronts if n not in self.down]
        for name in live:
            self._connect(name, config_list, superseded=False)

    def _checker(self) -> None:
        """Check each new list against etcd (in its own thread: etcd may be slow to answer)."""
        while not (self.stopping.is_set() and self.checks.empty()):
            try:
                config_list = self.checks.get(timeout=0.1)
            except queue.Empty:
                continue
            self._guarded(self._check_barrier, config_list)

    def _check_barrier(self, config_list: bytes) -> None:
        """Every member reported the list's keys loaded before DNS served it."""
        for _attempt in range(50):  # an etcd member may be restarting right now
            try:
                entries = etcd_entries(self.cluster)
                break
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        else:
            raise AssertionError(f"{ids_of(config_list)}: etcd could not be read to check it")
        wanted = keys_of_list(entries, config_list)
        if not wanted:
            self.barrier_violations.append(f"{ids_of(config_list)}: no such keys in etcd")
        for member, loaded in members(entries).items():
            if not wanted <= loaded:
                self.barrier_violations.append(
                    f"{ids_of(config_list)} published while {member} had only {sorted(loaded)}"
                )

    def latest(self) -> bytes | None:
        """The last list the clients saw in DNS."""
        with self.lock:
            return self.history[-1][0] if self.history else None

    def _connect(self, name: str, config_list: bytes, *, superseded: bool) -> None:
        front = self.fronts[name]
        (result,) = run_client(
            front.address, name=SECRET, ech=config_list, ca=self.pki.ca, send=64, timeout=5
        )
        error = result.get("error")
        self.results.append(
            Result(
                front=name,
                list_ids=ids_of(config_list),
                superseded=superseded,
                ok=bool(result["ok"] and result["echo_ok"]),
                accepted=bool(result["ech_accepted"]),
                rejected=bool(result["ech_rejected"]),
                error=None if error is None else str(error),
            )
        )

    def _clients(self) -> None:
        """Round-robin over the live fronts with the lists DNS served, newest first."""
        turn = [0]

        def one_round() -> None:
            current = self.dns()
            now = time.monotonic()
            last = self.history[-1][0] if self.history else self.initial
            if current is not None and current != last:
                self._new_list(current, now)
            with self.lock:
                live = sorted(n for n in self.fronts if n not in self.down)
                usable = [
                    (config_list, superseded is not None)
                    for config_list, _, superseded in reversed(self.history)
                    if superseded is None or now < superseded + GRACE - MARGIN
                ]
            for config_list, superseded in usable if live else []:
                name = live[turn[0] % len(live)]
                turn[0] += 1
                self._connect(name, config_list, superseded=superseded)

        while not self.stopping.wait(0.1):
            self._guarded(one_round)


@pytest.fixture
def fleet(tmp_path: Path, pki: Pki, backend: GoBackend, kek: Path) -> Iterator[Fleet]:
    with (
        EtcdCluster() as cluster,
        KnotServer(tmp_path / "knot-primary") as primary,
        KnotServer(tmp_path / "knot-secondary") as secondary,
    ):
        fleet = Fleet(tmp_path, pki, backend, cluster, primary, secondary, kek)
        fleet.initial = fleet.dns()
        try:
            yield fleet
        finally:
            fleet.stopping.set()
            for front in fleet.fronts.values():
                front.stop()
            for thread in fleet.threads:
                thread.join(60)


def check_clients(fleet: Fleet) -> None:
    rejected = [r for r in fleet.results if r.rejected]
    failed = [r for r in fleet.results if not (r.ok and r.accepted)]
    assert not rejected, f"{len(rejected)} ECH rejections, e.g. {rejected[:3]}"
    assert not failed, f"{len(failed)} failed connections, e.g. {failed[:3]}"
    assert not fleet.barrier_violations, fleet.barrier_violations
    assert not fleet.errors, fleet.errors[:5]


def wait_rotations(fleet: Fleet, count: int, timeout: float, what: str) -> None:
    target = fleet.lists() + count
    wait_for(lambda: fleet.lists() >= target, timeout, what)


def logged(fleet: Fleet, name: str, text: str) -> int:
    """How often front ``name`` logged ``text`` so far."""
    return fleet.fronts[name].log_text().count(text)


def run_fleet(fleet: Fleet, cycles: int, rounds: int = 1) -> None:
    """The whole story: ``cycles`` rotations, then each failure, ``rounds`` times."""
    names = [f"f{i}" for i in range(FRONTS)]
    fleet.start_fronts(names)
    fleet.start_threads()
    wait_for(lambda: fleet.lists() >= 1, 30, "the first key published")
    for _ in range(rounds):
        # -- rotation every few seconds; nothing published before every member has it.
        wait_rotations(fleet, cycles, cycles * (ROTATE + 6), f"{cycles} rotations")
        wait_for(lambda: "retired" in states(fleet), ROTATE + 6, "a retired key")
        # Each front applies a change within a second: the load barrier, from
        # the leader adding a key to every member reporting it loaded, took less.
        load_wait = rotation_record(fleet.cluster)["load_wait"]
        assert load_wait is not None and load_wait < 1.0, load_wait
        kill_the_leader_mid_rotation(fleet)
        stop_one_etcd_member(fleet, names)
        lose_the_quorum(fleet, names)

    # -- every member converges; the fleet's view, from every side.
    def converged() -> bool:
        entries = etcd_entries(fleet.cluster)
        everything = set(key_records(entries))
        loaded = members(entries)
        return sorted(loaded) == names and all(v == everything for v in loaded.values())

    wait_for(converged, 10, "every member to load every key")
    wait_for(lambda: rotation_record(fleet.cluster).get("phase") == "idle", 20, "an activation")
    time.sleep(1.0)  # a look at the fleet for the metrics
    assert sum(fleet.metric(n, "echfront_fleet_leader") for n in names) == 1
    for name in names:
        assert fleet.metric(name, "echfront_fleet_members") == FRONTS
        assert fleet.metric(name, "echfront_fleet_store_up") == 1
        assert fleet.metric(name, "echfront_fleet_seconds_since_rotation") < ROTATE + 3
        phases = [
            fleet.metric(name, f'echfront_fleet_rotation_phase{{phase="{phase}"}}')
            for phase in ("idle", "load_barrier", "publishing", "dns_barrier", "activating")
        ]
        assert sum(phases) == 1, phases
        # The last barrier may have waited for a front still backing off after
        # the outage (its watch retries every 2 s at most): a bound, not 1 s.
        assert 0 <= fleet.metric(name, 'echfront_fleet_barrier_wait_seconds{barrier="load"}') < 5
    fleet.stop_threads()
    check_clients(fleet)
    assert len(fleet.results) >= 30
    assert any(r.superseded for r in fleet.results), "no client used a list in its grace"


def kill_the_leader_mid_rotation(fleet: Fleet) -> None:
    """SIGKILL the leader after it published, before it activated; another one finishes."""
    fleet.replicate.clear()  # the secondary lags: the DNS barrier holds

    def held() -> bool:
        # Published to the primary, not on the secondary: the barrier cannot pass.
        phase = rotation_record(fleet.cluster).get("phase")
        return phase == "dns_barrier" and fleet.dns() != fleet.secondary.ech(SECRET + ".")[0]

    wait_for(held, 20, "a publication held at the DNS barrier")
    record = rotation_record(fleet.cluster)
    old = record["leader"]
    pending = set(record["pending"])
    assert leader_of(fleet.cluster) == old
    published = fleet.dns()
    assert published is not None
    assert keys_of_list(etcd_entries(fleet.cluster), published) == pending
    resuming = "resuming the fleet's key rotation"
    resumed = {name: logged(fleet, name, resuming) for name in fleet.fronts}
    fleet.kill(old)
    wait_for(lambda: leader_of(fleet.cluster) not in (None, old), MEMBER_TTL + 10, "a new leader")
    new = leader_of(fleet.cluster)
    assert new is not None
    wait_for(
        lambda: logged(fleet, new, resuming) > resumed[new],
        10,
        "the new leader to resume",
    )
    records = key_records(etcd_entries(fleet.cluster))
    assert {records[k]["state"] for k in pending} == {"pending"}, "activated by the dead leader"
    fleet.replicate.set()
    wait_for(
        lambda: (
            {key_records(etcd_entries(fleet.cluster))[k]["state"] for k in pending} == {"active"}
        ),
        20,
        "the new leader to activate",
    )
    assert rotation_record(fleet.cluster)["leader"] == new
    # The crashed front comes back: it loads the whole set before listening.
    restarted = fleet.front(old, port=fleet.fronts[old].port)
    restarted.start()
    first_load = re.search(r"serving the fleet's keys of revision \d+: (.*)", restarted.log_text())
    assert first_load is not None
    in_store = key_records(etcd_entries(fleet.cluster))
    assert all(key_id in first_load.group(1) for key_id in in_store), first_load.group(1)
    with fleet.lock:
        fleet.down.discard(old)


def stop_one_etcd_member(fleet: Fleet, names: list[str]) -> None:
    """One etcd member stops: nothing changes, rotation goes on, nobody complains."""
    complaints = [logged(fleet, n, "key store unavailable") for n in names]
    fleet.cluster.stop_member(0)
    wait_rotations(fleet, 1, ROTATE + 10, "a rotation with one etcd member down")
    fleet.cluster.start_member(0)
    assert [logged(fleet, n, "key store unavailable") for n in names] == complaints


def lose_the_quorum(fleet: Fleet, names: list[str]) -> None:
    """Two of three etcd members stop: fronts serve, rotation pauses, then resumes."""
    wait_for(lambda: rotation_record(fleet.cluster).get("phase") == "idle", 20, "an idle fleet")
    wait_for(lambda: fleet.latest() == fleet.dns(), 10, "the clients to see the last list")
    counts = {
        text: [logged(fleet, n, text) for n in names]
        for text in ("key store unavailable", "key store reachable again", "key rotation paused")
    }
    fleet.cluster.stop_member(1)
    fleet.cluster.stop_member(2)
    paused_at = fleet.lists()
    time.sleep(2 * ROTATE + 2)
    assert fleet.lists() == paused_at, "published while etcd had no quorum"
    for index, name in enumerate(names):
        assert fleet.metric(name, "echfront_fleet_store_up") == 0
        assert logged(fleet, name, "key store unavailable") > counts["key store unavailable"][index]
    paused = [logged(fleet, n, "key rotation paused") for n in names]
    assert paused != counts["key rotation paused"], "nobody said the rotation paused"
    fleet.cluster.start_member(1)
    fleet.cluster.start_member(2)
    fleet.cluster.wait_healthy()
    wait_rotations(fleet, 1, ROTATE + MEMBER_TTL + 15, "rotation to resume after the quorum")
    for index, name in enumerate(names):
        back = logged(fleet, name, "key store reachable again")
        assert back > counts["key store reachable again"][index], name


def check_at_rest(fleet: Fleet) -> None:
    """No etcd value holds a PEM block or a raw private key (read directly)."""
    entries = etcd_entries(fleet.cluster)
    sealer = Sealer(fleet.kek.read_bytes())
    privates = []
    for key_id, record in key_records(entries).items():
        config_list = base64.b64decode(record["config_list"])
        sealed = base64.b64decode(record["sealed_key"])
        privates.append(sealer.open(record["kek"], sealed, sealing_context(key_id, config_list)))
    assert privates
    values = b"".join(entries.values())
    assert b"-----BEGIN" not in values and b"PRIVATE" not in values
    for private in privates:
        for form in (private, base64.b64encode(private), private.hex().encode()):
            assert form not in values


def check_status(fleet: Fleet) -> None:
    """``echfront fleet status`` sees three members and a leader."""
    config = fleet.fronts["f0"].config_path
    assert config is not None
    command = ["fleet", "status", "--config", str(config), "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "echfront.cli", *command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert sorted(m["name"] for m in status["members"]) == [f"f{i}" for i in range(FRONTS)]
    assert status["leader"] in {m["name"] for m in status["members"]}
    pending = {k["key_id"] for k in status["keys"] if k["state"] == "pending"}
    assert all(set(m["missing"]) <= pending for m in status["members"]), status["members"]


def test_fleet_rotates_as_one(fleet: Fleet) -> None:
    started = time.monotonic()
    run_fleet(fleet, cycles=3)
    check_at_rest(fleet)
    check_status(fleet)
    for name, front in fleet.fronts.items():
        log = front.log_text()
        assert "Traceback" not in log, f"{name}:\n{log}"
    print(
        f"fleet: {fleet.lists()} lists published, {len(fleet.results)} connections, "
        f"{time.monotonic() - started:.0f}s"
    )


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("ECHFRONT_SOAK"), reason="soak: set ECHFRONT_SOAK=1")
def test_fleet_soak(fleet: Fleet) -> None:
    rounds = int(os.environ.get("ECHFRONT_SOAK_ROUNDS", "10"))
    run_fleet(fleet, cycles=5, rounds=rounds)
    check_at_rest(fleet)


def test_front_started_while_etcd_is_down(
    tmp_path: Path, pki: Pki, backend: GoBackend, kek: Path
) -> None:
    with (
        EtcdCluster() as cluster,
        KnotServer(tmp_path / "knot-primary") as primary,
        KnotServer(tmp_path / "knot-secondary") as secondary,
    ):
        fleet = Fleet(tmp_path, pki, backend, cluster, primary, secondary, kek)
        # A fleet of one makes a key (publication off: it is active at once).
        fleet.metrics["f0"] = quiet_port()
        config = fleet.config("f0")
        config["publish"] = {"names": [SECRET]}
        with FrontProcess(tmp_path / "f0", config, port=quiet_port()) as first:
            wait_for(
                lambda: any(
                    r["state"] == "active" for r in key_records(etcd_entries(cluster)).values()
                ),
                20,
                "a key",
            )
            assert first.running()
        (record,) = key_records(etcd_entries(cluster)).values()
        config_list = base64.b64decode(record["config_list"])

        for index in range(3):
            cluster.stop_member(index)
        fleet.metrics["f1"] = quiet_port()
        follower = FrontProcess(
            tmp_path / "f1", fleet.config("f1", rotate=False), port=quiet_port(), start_timeout=60
        )
        starting = ThreadPoolExecutor(1)
        started = starting.submit(follower.start)
        try:
            time.sleep(4)
            # Not listening: it has no key set, and says why in one line.
            assert not started.done()
            log = follower.log_text()
            lines = [line for line in log.splitlines() if "not listening yet" in line]
            assert len(lines) == 1, log
            assert "cannot register member f1 in the key store: etcd http://127.0.0.1:" in lines[0]
            assert "Traceback" not in log
            assert fleet.metric("f1", "echfront_fleet_store_up") == 0
            for index in range(3):
                cluster.start_member(index, wait=False)
            cluster.wait_healthy()
            started.result(timeout=60)
            assert "serving the fleet's keys of revision" in follower.log_text()
            (result,) = run_client(
                follower.address, name=SECRET, ech=config_list, ca=pki.ca, send=64, timeout=5
            )
            assert result["ok"] and result["ech_accepted"], result
            assert "Traceback" not in follower.log_text()
        finally:
            starting.shutdown(wait=False)
            follower.stop()
