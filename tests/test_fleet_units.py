"""The fleet's parts one at a time: election and fencing, the rotation state machine,
a member's hand-over, ``echfront fleet status`` and the ``[keys.etcd]`` table.

Election and rotation run against a real 3-member etcd cluster on loopback
(tests/etcdcluster.py); the publisher is an in-process recorder whose
"DNS" the test controls, so each barrier can be held and released.  The
whole fleet of twistd fronts with knotd and Go clients is tests/test_fleet.py.
"""

from __future__ import annotations

import datetime
import io
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from echfront.config.schema import parse_config
from echfront.ech.keyset import ECHKey, generate_key
from echfront.errors import ConfigError
from echfront.interfaces import IMembership, IPublisher, StoreSnapshot
from echfront.keys.etcd import EtcdClient
from echfront.keys.etcdapi import EtcdSettings
from echfront.keys.etcdfleet import LEADER, EtcdCoordinator, read_fleet
from echfront.keys.etcdstore import EtcdKeyStore
from echfront.keys.etcdwatch import EtcdMembership
from echfront.keys.fleet import FleetRotation, Phase, RotationRecord, config_list_of
from echfront.keys.fleetmember import FleetMember
from echfront.keys.keydir import KeyDirectory, KeyState
from echfront.keys.rotation import RotationPolicy
from echfront.keys.sealing import Sealer
from echfront.keys.stores import DirectoryKeyStore, FenceLost
from tests.etcdcluster import ETCD_MISSING, EtcdCluster
from tests.frontproc import REPO_ROOT, free_port, to_toml

PUBLIC_NAME = "public.example"
T = TypeVar("T")
needs_etcd = pytest.mark.skipif(ETCD_MISSING is not None, reason=ETCD_MISSING or "")


def x25519(taken: frozenset[int]) -> Sequence[ECHKey]:
    return [generate_key(PUBLIC_NAME, taken_ids=taken)]


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``check()``; the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await deferLater(reactor, 0.02)
    return time.monotonic() - start


@implementer(IPublisher)
class RecordingPublisher:
    """An in-process "DNS": publish stores the list; verify compares, unless held back.

    ``check`` runs at each publication (the test asserts the load barrier there).
    """

    def __init__(self, check: Callable[[bytes], None] = lambda config_list: None) -> None:
        self.published: list[bytes] = []
        self.dns: bytes | None = None
        self.lagging = False
        self.check = check

    def publish(self, config_list: bytes) -> Deferred[None]:
        try:
            self.check(config_list)
        except AssertionError as error:
            return fail(error)
        self.published.append(config_list)
        self.dns = config_list
        return succeed(None)

    def verify(self, config_list: bytes) -> Deferred[bool]:
        return succeed(not self.lagging and self.dns == config_list)


POLICY = RotationPolicy(
    public_name=PUBLIC_NAME,
    rotate_every=3600.0,
    grace=1.0,
    check_interval=0.2,
    verify_timeout=0.5,
    verify_interval=0.05,
)


@needs_etcd
class FleetEtcdTestCase(TestCase):
    """One etcd cluster for the class; each test its own prefix."""

    cluster: EtcdCluster
    timeout = 60

    @classmethod
    def setUpClass(cls) -> None:
        cls.cluster = EtcdCluster()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.cluster.close()

    def setUp(self) -> None:
        self.prefix = f"/f-{secrets.token_hex(4)}/"
        self.sealer = Sealer(secrets.token_bytes(32))

    def store(self) -> EtcdKeyStore:
        settings = EtcdSettings(self.cluster.endpoints, self.prefix, timeout=2.0)
        store = EtcdKeyStore(EtcdClient(settings, reactor), self.sealer, reactor)
        self.addCleanup(store.close)
        return store

    async def member(self, name: str, ttl: float = 3.0) -> tuple[EtcdKeyStore, EtcdMembership]:
        store = self.store()
        membership = await store.register(name, ttl)
        assert isinstance(membership, EtcdMembership)
        return store, membership

    def coordinator(self, store: EtcdKeyStore, membership: EtcdMembership) -> EtcdCoordinator:
        return EtcdCoordinator(store.client, self.prefix, membership, reactor)

    def leader_entry(self) -> str:
        return self.cluster.etcdctl("get", self.prefix + LEADER, "--print-value-only").strip()


class ElectionTests(FleetEtcdTestCase):
    async def test_one_leader_fenced_by_its_entry(self) -> None:
        store_a, a = await self.member("a")
        store_b, b = await self.member("b")
        ca, cb = self.coordinator(store_a, a), self.coordinator(store_b, b)
        fence = await ca.campaign()
        assert fence is not None
        assert await cb.campaign() is None
        assert await ca.campaign() == fence  # still the leader, same fence
        assert ca.holds() and not cb.holds()
        # The fence is the leader entry's creation revision.
        kvs, _ = await store_a.client.range(self.prefix.encode() + LEADER.encode())
        assert kvs[0].create_revision == fence.revision and kvs[0].lease == a.lease
        await ca.record(RotationRecord(leader="a", since=1.0), fence)
        view = await cb.read()
        assert view.leader == "a" and view.record == RotationRecord(leader="a", since=1.0)

        # The leader's lease ends: its entry goes with it; b is elected and
        # every write a might still try is refused.
        await a.leave()
        assert not ca.holds()
        fence_b = await cb.campaign()
        assert fence_b is not None and fence_b.revision > fence.revision
        assert json.loads(self.leader_entry())["name"] == "b"
        with pytest.raises(FenceLost):
            await ca.record(RotationRecord(leader="a"), fence)
        with pytest.raises(FenceLost):
            await store_a.add_key(x25519, KeyState.PENDING, fence=fence)
        assert (await store_b.load()).keys == ()

        # Resigning hands the leadership over at once.
        await cb.resign()
        assert self.leader_entry() == ""

    async def test_leader_stops_acting_before_its_lease_can_expire(self) -> None:
        store_a, a = await self.member("a", ttl=2.0)
        store_b, b = await self.member("b", ttl=2.0)
        ca, cb = self.coordinator(store_a, a), self.coordinator(store_b, b)
        assert await ca.campaign() is not None
        # a is cut off: its renewals stop (b's go on).
        a._loop.stop()
        await eventually(lambda: not ca.holds(), 5.0, "the leader to stop acting")
        stopped = time.monotonic()
        # At that moment etcd has not expired the lease: nobody else can lead.
        assert json.loads(self.leader_entry())["name"] == "a"
        assert await cb.campaign() is None
        while await cb.campaign() is None:
            assert time.monotonic() - stopped < 5.0, "the lease never expired"
            await deferLater(reactor, 0.05)
        # The gap: the old leader stopped first, then the lease expired.
        assert time.monotonic() - stopped > 0.3
        assert cb.holds() and not ca.holds()

    async def test_renewal_moves_the_deadline(self) -> None:
        store_a, a = await self.member("a", ttl=3.0)
        ca = self.coordinator(store_a, a)
        assert await ca.campaign() is not None
        before = a.expires
        await deferLater(reactor, 0.3)
        assert await ca.renew()
        assert a.expires >= before + 0.25
        assert ca.holds(2.0) and not ca.holds(3.0)


class RotationTests(FleetEtcdTestCase):
    def rotation(
        self,
        store: EtcdKeyStore,
        coordinator: EtcdCoordinator,
        publisher: IPublisher | None,
        publications: Callable[[str], object] = lambda result: None,
    ) -> FleetRotation:
        return FleetRotation(
            store,
            coordinator,
            POLICY,
            publisher,
            reactor,
            publish_timeout=1.0,
            publications=publications,
        )

    async def test_barriers_then_resume_after_the_leader_dies(self) -> None:
        store_a, a = await self.member("a")
        store_b, b = await self.member("b")
        reports: dict[str, frozenset[str]] = {}

        async def report(member: IMembership, ids: frozenset[str]) -> None:
            await member.report(ids, 0)
            reports[member.name] = ids

        def loaded_everywhere(config_list: bytes) -> None:
            # The load barrier, checked at publication time.
            assert config_list == config_list_of(pending_keys()), "not the pending set"
            assert all(reports.get(m) for m in ("a", "b"))

        snapshots: list[StoreSnapshot] = []

        def pending_keys() -> tuple[Any, ...]:
            return snapshots[-1].in_state(KeyState.PENDING)

        publisher = RecordingPublisher(loaded_everywhere)
        ca = self.coordinator(store_a, a)
        rotation = self.rotation(store_a, ca, publisher)
        fence = await ca.campaign()
        assert fence is not None

        # Bootstrap: a pending key, then the load barrier waits for both.
        await rotation.step(fence)
        snapshots.append(await store_a.load())
        (first,) = pending_keys()
        assert recorded(rotation).phase is Phase.LOAD_BARRIER
        assert list(recorded(rotation).waiting) == ["a", "b"] and publisher.published == []
        await report(a, frozenset({first.key_id}))
        await rotation.step(fence)
        assert list(recorded(rotation).waiting) == ["b"] and publisher.published == []
        await report(b, frozenset({first.key_id}))
        await rotation.step(fence)
        assert publisher.published == [config_list_of([first])]
        snapshot = await store_a.load()
        assert [(k.key_id, k.state) for k in snapshot.keys] == [(first.key_id, KeyState.ACTIVE)]
        record = recorded(rotation)
        assert record.phase is Phase.IDLE and record.last_rotation is not None
        assert record.load_wait is not None and record.dns_wait is not None

        # The next rotation is due; its DNS barrier never passes (a lagging
        # secondary), so the attempt ends in dns_barrier with the key pending.
        await deferLater(reactor, 1.1)
        rotation.policy = replace(POLICY, rotate_every=1.0)
        await rotation.step(fence)
        snapshots.append(await store_a.load())
        (second,) = pending_keys()
        both = frozenset({first.key_id, second.key_id})
        await report(a, both)
        await report(b, both)
        publisher.lagging = True
        await rotation.step(fence)
        assert recorded(rotation).phase is Phase.DNS_BARRIER
        assert publisher.published[-1] == config_list_of([second])
        states = {k.key_id: k.state for k in (await store_a.load()).keys}
        assert states == {first.key_id: KeyState.ACTIVE, second.key_id: KeyState.PENDING}

        # The leader dies there (after publishing, before activating).  b
        # is elected and finishes the same rotation.
        await a.leave()
        cb = self.coordinator(store_b, b)
        successor = self.rotation(store_b, cb, publisher)
        successor.policy = rotation.policy
        fence_b = await cb.campaign()
        assert fence_b is not None
        publisher.lagging = False
        await successor.step(fence_b)
        snapshot = await store_b.load()
        states = {k.key_id: k.state for k in snapshot.keys}
        assert states == {first.key_id: KeyState.RETIRED, second.key_id: KeyState.ACTIVE}
        assert publisher.published[-1] == config_list_of([second])
        view = await cb.read()
        assert view.leader == "b" and view.record is not None
        assert view.record.phase is Phase.IDLE and view.record.leader == "b"
        # The deposed leader's next step cannot change anything.
        with pytest.raises(FenceLost):
            await rotation.step(fence)

        # The retired key goes after its grace (1 s), with its config_id.
        await deferLater(reactor, 2.1)
        successor.policy = replace(POLICY, rotate_every=3600.0)
        await successor.step(fence_b)
        snapshot = await store_b.load()
        assert snapshot.key_ids == {second.key_id}
        assert snapshot.taken_ids() == frozenset(second.config_ids)

    async def test_publication_failure_keeps_the_key_pending(self) -> None:
        store_a, a = await self.member("a")
        publisher = RecordingPublisher()
        publisher.lagging = True
        results: list[str] = []
        ca = self.coordinator(store_a, a)
        rotation = self.rotation(store_a, ca, publisher, results.append)
        fence = await ca.campaign()
        assert fence is not None
        await rotation.step(fence)
        (key,) = (await store_a.load()).keys
        await a.report({key.key_id}, 0)
        await rotation.step(fence)
        assert results == ["failure"]
        assert [k.state for k in (await store_a.load()).keys] == [KeyState.PENDING]
        publisher.lagging = False
        await rotation.step(fence)
        assert results == ["failure", "success"]
        assert [k.state for k in (await store_a.load()).keys] == [KeyState.ACTIVE]

    async def test_fleet_status_reads_without_the_kek(self) -> None:
        store_a, a = await self.member("a")
        ca = self.coordinator(store_a, a)
        rotation = self.rotation(store_a, ca, None)
        fence = await ca.campaign()
        assert fence is not None
        await rotation.step(fence)
        (key,) = (await store_a.load()).keys
        await rotation.step(fence)
        assert recorded(rotation).waiting == ("a",)
        other = EtcdClient(EtcdSettings(self.cluster.endpoints, self.prefix), reactor)
        self.addCleanup(other.close)
        status = await read_fleet(other, self.prefix)
        assert status.leader == "a" and status.record == rotation.last
        assert [(k.key_id, k.state) for k in status.keys] == [(key.key_id, "pending")]
        assert [m.name for m in status.members] == ["a"] and status.problems == ()

        # The command line, in its own process, from a front's configuration.
        directory = Path(tempfile.mkdtemp(prefix="fleet-status-"))
        self.addCleanup(shutil.rmtree, directory)
        kek = directory / "kek"
        kek.write_bytes(secrets.token_bytes(32))
        config = directory / "front.toml"
        config.write_text(
            to_toml(
                {
                    "keys": {
                        "store": "etcd",
                        "etcd": {
                            "endpoints": list(self.cluster.endpoints),
                            "prefix": self.prefix,
                            "kek_file": str(kek),  # named, never read
                        },
                    }
                }
            )
        )
        done = await run_cli("fleet", "status", "--config", str(config), "--json")
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        assert document["leader"] == "a"
        assert document["rotation"]["phase"] == "load_barrier"
        assert document["rotation"]["waiting_for"] == ["a"]
        assert document["members"][0]["missing"] == [key.key_id]
        done = await run_cli("fleet", "status", "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert "load barrier waits for a" in done.stdout
        assert f"a: missing {key.key_id}" in done.stdout


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m echfront.cli ARGS`` in a thread (the reactor keeps serving etcd's answers)."""
    from twisted.internet.threads import deferToThread  # noqa: PLC0415

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "echfront.cli", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO_ROOT,
            check=False,
        )

    done: subprocess.CompletedProcess[str] = await deferToThread(run)
    return done


# -- without etcd ------------------------------------------------------------------


def test_fleet_status_without_a_fleet_or_a_store(tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text('listen = ["tcp:8443"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "echfront.cli", "fleet", "status", "--config", str(plain)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "not a fleet member" in done.stderr
    down = tmp_path / "down.toml"
    down.write_text(
        to_toml(
            {
                "keys": {
                    "store": "etcd",
                    "etcd": {
                        "endpoints": [f"http://127.0.0.1:{free_port()}"],
                        "kek_file": "kek",
                        "timeout": "1s",
                    },
                }
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "echfront.cli", "fleet", "status", "--config", str(down)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done
    assert done.stderr.startswith("echfront fleet: error: etcd http://127.0.0.1:")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def recorded(rotation: FleetRotation) -> RotationRecord:
    """What the rotation last recorded (never narrowed by mypy across awaits)."""
    assert rotation.last is not None
    return rotation.last


def settled(deferred: Deferred[T]) -> T:
    """The result of a Deferred that has already fired."""
    results: list[T] = []
    deferred.addCallback(results.append)
    assert results, "not fired"
    return results[0]


def test_member_applies_reports_then_is_ready(tmp_path: Path) -> None:
    clock = Clock()
    store = DirectoryKeyStore(KeyDirectory(tmp_path / "keys"), clock, poll_interval=0.5)
    first = store.add_key(x25519, KeyState.ACTIVE)
    applied: list[frozenset[str]] = []
    ready: list[IMembership] = []
    accept = [True]

    def apply(snapshot: StoreSnapshot) -> bool:
        # What the member reported so far must never include keys not yet applied.
        for member in store.live_members():
            assert member.loaded <= (applied[-1] if applied else frozenset())
        if accept[0]:
            applied.append(snapshot.key_ids)
        return accept[0]

    member = FleetMember(store, "a", 10.0, {}, clock, apply=apply, ready=ready.append)
    member.startService()
    key_id = settled(first).key_id
    assert applied == [frozenset({key_id})] and len(ready) == 1
    (status,) = store.live_members()
    assert status.loaded == {key_id}

    # A key set the front cannot put into service is not reported.
    accept[0] = False
    second = settled(store.add_key(x25519, KeyState.PENDING)).key_id
    clock.advance(0.5)
    (status,) = store.live_members()
    assert status.loaded == {key_id}
    # Once it can, it is.
    accept[0] = True
    (store.directory.path / f"{second}.json").touch()  # the next poll sees a change
    clock.advance(0.5)
    (status,) = store.live_members()
    assert status.loaded == {key_id, second} and len(ready) == 1
    member.stopService()
    assert store.live_members() == ()


def test_rotation_record_round_trip() -> None:
    record = RotationRecord(
        phase=Phase.DNS_BARRIER,
        leader="front-1",
        since=10.5,
        pending=("ech-1",),
        waiting=(),
        barrier_since=10.5,
        last_rotation=1.0,
        load_wait=0.25,
        dns_wait=None,
    )
    assert RotationRecord.decode(record.encode()) == record
    for bad in (b"[]", b'{"phase": "nope"}', b"not json", b'{"phase": "idle"}'):
        with pytest.raises(ValueError):
            RotationRecord.decode(bad)


def _fleet(**etcd: Any) -> dict[str, Any]:
    table = {"endpoints": ["http://127.0.0.1:2379"], "kek_file": "kek", **etcd}
    return {"public_name": PUBLIC_NAME, "keys": {"store": "etcd", "etcd": table}}


def test_keys_etcd_table(tmp_path: Path) -> None:
    config = parse_config(_fleet(member="f1", previous_kek_files=["old"]), base=tmp_path)
    assert config.fleet is not None and config.rotation is None
    assert config.fleet.kek_file == tmp_path / "kek"
    assert config.fleet.previous_kek_files == (tmp_path / "old",)
    assert config.fleet.etcd.endpoints == ("http://127.0.0.1:2379",)
    assert config.fleet.member == "f1" and config.fleet.member_ttl == 15.0
    data = _fleet()
    data["keys"]["rotate"] = "1h"
    assert parse_config(data, base=tmp_path).rotation is not None
    assert parse_config({}, base=tmp_path).fleet is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"keys": {"store": "s3"}}, 'keys.store: expected "directory" or "etcd"'),
        ({"keys": {"etcd": {}}}, 'keys.etcd: only used with store = "etcd"'),
        ({"keys": {"store": "etcd"}}, "keys.etcd: required"),
        ({"keys": {"store": "etcd", "directory": "k", "etcd": {}}}, "keys.directory: not used"),
        ({"keys": {"store": "etcd", "etcd": {"kek_file": "k"}}}, "keys.etcd.endpoints: required"),
        (_fleet(endpoints=["127.0.0.1:2379"]), "keys.etcd endpoint"),
        (_fleet(user="u"), "user and password_file go together"),
        (_fleet(member="a b"), "keys.etcd.member name"),
        (_fleet(member_ttl="1s"), "keys.etcd.member_ttl: must be at least 2"),
        (_fleet(colour="blue"), "keys.etcd.colour: unknown key"),
        ({"keys": {"store": "etcd", "etcd": {"endpoints": ["http://a:1"]}}}, "kek_file: required"),
    ],
)
def test_keys_etcd_errors(data: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(data, base=tmp_path)
    assert message in str(raised.value)


def test_member_ttl_covers_a_publication(tmp_path: Path) -> None:
    data = _fleet(member_ttl="5s")
    data["keys"]["rotate"] = "1h"
    data["publish"] = {
        "method": "command",
        "command": ["true"],
        "names": ["secret.example"],
        "verify_servers": ["127.0.0.1:53"],
        "timeout": 4,
    }
    with pytest.raises(ConfigError, match=r"member_ttl: must be at least publish\.timeout"):
        parse_config(data, base=tmp_path)
    data["keys"]["etcd"]["member_ttl"] = "6s"
    assert parse_config(data, base=tmp_path).fleet is not None


def test_status_rendering_names_what_is_missing() -> None:
    from echfront.cli.fleet import render_status  # noqa: PLC0415
    from echfront.interfaces import MemberStatus  # noqa: PLC0415
    from echfront.keys.etcdfleet import FleetStatus, KeySummary  # noqa: PLC0415

    status = FleetStatus(
        revision=7,
        keys=(
            KeySummary("ech-1", "active", "2026-01-01T00:00:00Z", None, (1,), ("x25519",)),
            KeySummary("ech-2", "pending", "2026-01-02T00:00:00Z", None, (2,), ("x25519",)),
        ),
        members=(
            MemberStatus("f0", frozenset({"ech-1", "ech-2"}), 7, 99.0),
            MemberStatus("f1", frozenset({"ech-1"}), 6, 98.0),
        ),
        leader="f0",
        leader_since=50.0,
        record=RotationRecord(
            Phase.LOAD_BARRIER, "f0", 95.0, ("ech-2",), ("f1",), barrier_since=95.0
        ),
        problems=(),
    )
    out = io.StringIO()
    render_status(status, 100.0, "/echfront/", out)
    text = out.getvalue()
    assert "leader: f0" in text
    assert "rotation: load_barrier for 5.0s; pending ech-2; load barrier waits for f1" in text
    assert "f0: has every key" in text and "f1: missing ech-2; loaded ech-1" in text


def test_utc_of_records_is_iso() -> None:
    from echfront.keys.etcdfleet import utc_text  # noqa: PLC0415

    when = datetime.datetime(2026, 1, 31, 12, 0, tzinfo=datetime.UTC).timestamp()
    assert utc_text(when) == "2026-01-31T12:00:00Z" and utc_text(None) == "-"
