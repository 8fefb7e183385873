"""The etcd key store against a real 3-member etcd cluster on loopback (tests/etcdcluster.py)."""

from __future__ import annotations

import base64
import datetime
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from echfront.ech.echconfig import KEM_MLKEM768_X25519
from echfront.ech.keyset import ECHKey, generate_key
from echfront.interfaces import Fence, IKeyStore, StateChange, StoreSnapshot
from echfront.keys.etcd import EtcdClient
from echfront.keys.etcdapi import EtcdSettings, EtcdUnavailable, KeyValue
from echfront.keys.etcdstore import EtcdKeyStore
from echfront.keys.etcdwatch import EtcdWatch
from echfront.keys.keydir import KeyState
from echfront.keys.sealing import Sealer
from echfront.keys.stores import FenceLost, KeyStoreError
from tests.etcdcluster import ETCD_MISSING, EtcdCluster
from tests.processes import stop_process

pytestmark = pytest.mark.skipif(ETCD_MISSING is not None, reason=ETCD_MISSING or "")

PUBLIC_NAME = "public.example"
UTC = datetime.UTC


def x25519(taken: frozenset[int]) -> Sequence[ECHKey]:
    """A build callback: one X25519 key with a random free config_id."""
    return [generate_key(PUBLIC_NAME, taken_ids=taken)]


def lowest_free(taken: frozenset[int]) -> Sequence[ECHKey]:
    """A build callback every writer agrees on, so concurrent writers collide."""
    return [generate_key(PUBLIC_NAME, config_id=min(set(range(256)) - taken))]


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``check()``; the seconds it took.  Fails the test after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await deferLater(reactor, 0.01)
    return time.monotonic() - start


def arrived(seen: list[StoreSnapshot], key_id: str) -> Callable[[], bool]:
    """Whether the last snapshot seen has ``key_id``."""
    return lambda: bool(seen) and key_id in seen[-1].key_ids


class EtcdTestCase(TestCase):
    """One cluster for the class; each test gets its own key prefix."""

    cluster: EtcdCluster
    timeout = 60

    @classmethod
    def setUpClass(cls) -> None:
        cls.cluster = EtcdCluster()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.cluster.close()

    def setUp(self) -> None:
        self.prefix = f"/t-{secrets.token_hex(4)}/"
        self.sealer = Sealer(secrets.token_bytes(32))

    def store(
        self, endpoints: Sequence[str] | None = None, timeout: float = 2.0, **extra: Any
    ) -> EtcdKeyStore:
        settings = EtcdSettings(
            tuple(endpoints or self.cluster.endpoints), self.prefix, timeout=timeout, **extra
        )
        store = EtcdKeyStore(EtcdClient(settings, reactor), self.sealer, reactor)
        self.addCleanup(store.close)
        return store


class KeyLifecycleTests(EtcdTestCase):
    async def test_add_change_delete(self) -> None:
        store = self.store()
        assert IKeyStore.providedBy(store)
        created = datetime.datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
        first = await store.add_key(x25519, KeyState.PENDING, created=created)
        assert first.state == KeyState.PENDING
        assert first.key_id == f"ech-20260131T120000Z-{first.config_ids[0]:03d}"
        assert not any(k.published for k in first.keys)

        snapshot = await store.load()
        assert [k.key_id for k in snapshot.keys] == [first.key_id]
        loaded = snapshot.keys[0]
        assert loaded.keys[0].config == first.keys[0].config
        assert loaded.keys[0].recipient is not None and first.keys[0].recipient is not None
        assert loaded.keys[0].recipient.private_bytes == first.keys[0].recipient.private_bytes
        assert snapshot.revision > 0

        second = await store.add_key(x25519, KeyState.PENDING)
        assert second.config_ids != first.config_ids
        promote = [StateChange(first.key_id, KeyState.PENDING, KeyState.ACTIVE)]
        assert await store.change_states(promote)
        assert await store.change_states(promote)  # a retry: already done
        wrong = [StateChange(second.key_id, KeyState.ACTIVE, KeyState.RETIRED)]
        assert not await store.change_states(wrong)

        # The rotation's swap: one transaction, all or nothing.
        until = datetime.datetime(2026, 2, 1, tzinfo=UTC)
        swap = [
            StateChange(second.key_id, KeyState.PENDING, KeyState.ACTIVE),
            StateChange(first.key_id, KeyState.ACTIVE, KeyState.RETIRED, until),
        ]
        missing = [*swap, StateChange("ech-nothing", KeyState.PENDING, KeyState.ACTIVE)]
        assert not await store.change_states(missing)
        assert [k.state for k in (await store.load()).keys] == [KeyState.ACTIVE, KeyState.PENDING]
        assert await store.change_states(swap)
        snapshot = await store.load()
        states = {k.key_id: (k.state, k.retire_after) for k in snapshot.keys}
        assert states[first.key_id] == (KeyState.RETIRED, until)
        assert states[second.key_id] == (KeyState.ACTIVE, None)
        assert [k.published for k in snapshot.ech_keys()] == [False, True]

        assert not await store.delete_key(second.key_id, KeyState.RETIRED)
        assert await store.delete_key(first.key_id, KeyState.RETIRED)
        assert await store.delete_key(first.key_id, KeyState.RETIRED)  # gone already
        snapshot = await store.load()
        assert snapshot.key_ids == {second.key_id}
        # The config_id claim went with the key.
        claims = self.cluster.etcdctl("get", "--prefix", self.prefix + "config-ids/", "--keys-only")
        assert claims.split() == [f"{self.prefix}config-ids/{second.config_ids[0]:03d}"]

    async def test_config_ids_unique_under_concurrent_allocators(self) -> None:
        # Four fronts, each with its own connection (and preferred endpoint),
        # all asking for the lowest free config_id at the same time: the
        # compare-and-swap makes every loser retry with a fresh view.
        endpoints = self.cluster.endpoints
        stores = [self.store(endpoints[i % 3 :] + endpoints[: i % 3]) for i in range(4)]
        added = await gatherResults(
            [s.add_key(lowest_free, KeyState.PENDING) for s in stores for _ in range(6)]
        )
        ids = [i for key in added for i in key.config_ids]
        assert sorted(ids) == list(range(24))
        snapshot = await stores[0].load()
        assert len(snapshot.keys) == 24
        assert snapshot.taken_ids() == frozenset(range(24))

    async def test_rejects_keys_the_build_did_not_make_unique(self) -> None:
        store = self.store()
        first = await store.add_key(x25519, KeyState.ACTIVE)
        taken_id = first.config_ids[0]

        def reuse(taken: frozenset[int]) -> Sequence[ECHKey]:
            return [generate_key(PUBLIC_NAME, config_id=taken_id)]

        with pytest.raises(KeyStoreError):
            await store.add_key(reuse, KeyState.PENDING)

    async def test_fence(self) -> None:
        store = self.store()
        client = store.client
        lease = await client.grant(10)
        await client.put(self.prefix.encode() + b"leader", b"front-a", lease)
        kvs, _ = await client.range(self.prefix.encode() + b"leader")
        fence = Fence("leader", kvs[0].create_revision)
        key = await store.add_key(x25519, KeyState.PENDING, fence=fence)
        change = [StateChange(key.key_id, KeyState.PENDING, KeyState.ACTIVE)]
        assert await store.change_states(change, fence=fence)

        # The lease ends (the leader was cut off): its entry goes, and with
        # it every write the old leader might still try.
        await client.revoke(lease)
        with pytest.raises(FenceLost):
            await store.add_key(x25519, KeyState.PENDING, fence=fence)
        retire = [StateChange(key.key_id, KeyState.ACTIVE, KeyState.RETIRED)]
        with pytest.raises(FenceLost):
            await store.change_states(retire, fence=fence)
        # A new leader's entry has another creation revision: still fenced.
        await client.put(self.prefix.encode() + b"leader", b"front-b")
        with pytest.raises(FenceLost):
            await store.delete_key(key.key_id, KeyState.ACTIVE, fence=fence)
        assert (await store.load()).key_ids == {key.key_id}


class EncryptionAtRestTests(EtcdTestCase):
    async def test_no_private_key_in_etcd(self) -> None:
        store = self.store()
        secrets_written = []
        for kem in (None, KEM_MLKEM768_X25519):

            def build(taken: frozenset[int], kem: int | None = kem) -> Sequence[ECHKey]:
                if kem is None:
                    return [generate_key(PUBLIC_NAME, taken_ids=taken)]
                return [generate_key(PUBLIC_NAME, taken_ids=taken, kem_id=kem)]

            key = await store.add_key(build, KeyState.PENDING)
            recipient = key.keys[0].recipient
            assert recipient is not None
            secrets_written.append(recipient.private_bytes)
        await store.register("front-1", 10)
        values = [value for name, value in self.cluster.dump() if name.startswith(b"/t-")]
        # Read also through the JSON gateway, as any client with read access could.
        answer = self.cluster.gateway_get(
            "/v3/kv/range",
            {"key": base64.b64encode(self.prefix.encode()).decode(), "range_end": "AA=="},
        )
        values += [base64.b64decode(kv["value"]) for kv in answer["kvs"]]
        assert len(values) >= 10
        for value in values:
            assert b"-----BEGIN" not in value
            assert b"PRIVATE KEY" not in value
            for secret in secrets_written:
                for form in (secret, base64.b64encode(secret), secret.hex().encode()):
                    assert form not in value
                    assert form[:16] not in value
        # The public half is there (fronts and the publisher need it).
        snapshot = await store.load()
        assert len(snapshot.keys) == 2

    async def test_other_kek_cannot_open(self) -> None:
        store = self.store()
        await store.add_key(x25519, KeyState.ACTIVE)
        self.sealer = Sealer(secrets.token_bytes(32))
        other = self.store()
        with pytest.raises(KeyStoreError) as caught:
            await other.load()
        assert "key-encryption key" in str(caught.value)

    async def test_moved_value_does_not_open(self) -> None:
        store = self.store()
        key = await store.add_key(x25519, KeyState.ACTIVE)
        prefix = self.prefix.encode()
        kvs, _ = await store.client.range(prefix + b"keys/" + key.key_id.encode())
        # An attacker with write access copies the sealed record to another key id.
        await store.client.put(prefix + b"keys/ech-20990101T000000Z-001", kvs[0].value)
        with pytest.raises(KeyStoreError):
            await store.load()


class WatchTests(EtcdTestCase):
    def watch(self, store: EtcdKeyStore) -> tuple[list[StoreSnapshot], list[str], Any]:
        seen: list[StoreSnapshot] = []
        errors: list[str] = []
        watch = store.watch(seen.append, errors.append)
        self.addCleanup(watch.stop)
        return seen, errors, watch

    async def test_change_arrives_within_a_second(self) -> None:
        writer = self.store()
        existing = await writer.add_key(x25519, KeyState.ACTIVE)
        seen, errors, watch = self.watch(self.store())
        await eventually(lambda: bool(seen) and watch.connected, 5, "first snapshot")
        assert seen[0].key_ids == {existing.key_id}
        for _round in range(3):
            added = (await writer.add_key(x25519, KeyState.PENDING)).key_id
            took = await eventually(arrived(seen, added), 1.0, "the new key")
            assert took < 1.0
        # The swap arrives as one snapshot: never two active keys, never none.
        pending = [k for k in seen[-1].keys if k.state is KeyState.PENDING]
        count = len(seen)
        await writer.change_states(
            [
                StateChange(pending[0].key_id, KeyState.PENDING, KeyState.ACTIVE),
                StateChange(existing.key_id, KeyState.ACTIVE, KeyState.RETIRED),
            ]
        )
        await eventually(lambda: len(seen) > count, 1.0, "the swap")
        for snapshot in seen[count:]:
            assert len(snapshot.in_state(KeyState.ACTIVE)) == 1
        assert errors == []

    async def test_resumes_after_member_stops_and_compaction(self) -> None:
        seen, errors, watch = self.watch(self.store(timeout=1.0))
        await eventually(lambda: bool(seen) and watch.connected, 5, "first snapshot")
        stream_member = self.cluster.endpoints.index(watch._stream.endpoint)
        # Stop the member serving the stream; meanwhile keys change and the
        # history is compacted, so nothing can be resumed: a full resync.
        await deferLater(reactor, 0, self.cluster.stop_member, stream_member)
        self.addCleanup(self.cluster.start_member, stream_member)
        others = [e for i, e in enumerate(self.cluster.endpoints) if i != stream_member]
        writer = self.store(others)
        added = await writer.add_key(x25519, KeyState.PENDING)
        self.cluster.compact()
        took = await eventually(lambda: added.key_id in seen[-1].key_ids, 10, "resynced")
        await eventually(lambda: watch.connected, 5, "the stream reopened")
        assert errors, "the lost stream is reported"
        assert watch.resyncs >= 2
        # Then it follows again, live.
        again = await writer.add_key(x25519, KeyState.PENDING)
        await eventually(lambda: again.key_id in seen[-1].key_ids, 1.0, "live again")
        assert took < 10

    async def test_resync_when_resume_revision_was_compacted(self) -> None:
        # Compaction lands between the full read and the watch request, so
        # etcd cancels the watch with compact_revision (ErrCompacted): the
        # watch must read everything again, not skip the change.
        store = self.store()
        writer = self.store()
        added: list[str] = []

        class Racing:
            def __init__(self) -> None:
                self.client = store.client
                self.clock = reactor
                self.prefix = store.prefix
                self.members_prefix = store.members_prefix
                self.watches = store.watches
                self.memberships = store.memberships
                self.reads = 0

            async def read_all(self) -> tuple[dict[bytes, KeyValue], int]:
                kvs, revision = await store.read_all()
                self.reads += 1
                if self.reads == 1:
                    key = await writer.add_key(x25519, KeyState.PENDING)
                    added.append(key.key_id)
                    await writer.client.put(b"/unrelated", b"x")
                    await writer.client.compact(revision + 2)
                return kvs, revision

            def snapshot_of(self, kvs: Mapping[bytes, KeyValue], revision: int) -> StoreSnapshot:
                return store.snapshot_of(kvs, revision)

        seen: list[StoreSnapshot] = []
        errors: list[str] = []
        source = Racing()
        watch = EtcdWatch(source, seen.append, errors.append)
        watch.start()
        self.addCleanup(watch.stop)
        await eventually(lambda: bool(added and seen) and added[0] in seen[-1].key_ids, 5, "resync")
        assert source.reads == 2
        assert len(errors) == 1
        assert "compacted" in errors[0]
        assert [s.key_ids for s in seen] == [frozenset(), frozenset(added)]

    async def test_unreachable_store_fails_fast_and_watch_keeps_quiet(self) -> None:
        dead = [f"http://127.0.0.1:{port}" for port in free_closed_ports(2)]
        store = self.store(dead, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable) as caught:
            await store.load()
        assert time.monotonic() - started < 2.0
        assert "\n" not in str(caught.value)
        seen, errors, watch = self.watch(store)
        await eventually(lambda: len(errors) >= 2, 5, "retries reported")
        assert seen == []
        assert not watch.connected

    async def test_failover_to_a_live_endpoint(self) -> None:
        dead = [f"http://127.0.0.1:{port}" for port in free_closed_ports(1)]
        store = self.store([*dead, *self.cluster.endpoints], timeout=1.0)
        key = await store.add_key(x25519, KeyState.ACTIVE)
        assert (await store.load()).key_ids == {key.key_id}


def free_closed_ports(count: int) -> list[int]:
    """Loopback ports nothing listens on (bound, then closed)."""
    ports = []
    for _ in range(count):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


_MEMBER_SCRIPT = """
import sys
from twisted.internet import reactor
from echfront.keys.etcd import EtcdClient
from echfront.keys.etcdapi import EtcdSettings
from echfront.keys.etcdstore import EtcdKeyStore
from echfront.keys.sealing import Sealer

settings = EtcdSettings(tuple(sys.argv[1].split(",")), sys.argv[2])
store = EtcdKeyStore(EtcdClient(settings, reactor), Sealer(bytes(32)), reactor)

def registered(membership):
    return membership.report(["ech-a", "ech-b"], 7).addCallback(lambda _: print("ok", flush=True))

def failed(failure):
    print("failed", failure.getErrorMessage(), flush=True)
    reactor.stop()

reactor.callWhenRunning(
    lambda: store.register("crashing", 1, {"pid": "x"}).addCallback(registered).addErrback(failed)
)
reactor.run()
"""


class MembershipTests(EtcdTestCase):
    async def test_register_report_leave(self) -> None:
        store = self.store()
        membership = await store.register("front-1", 2, {"host": "a"})
        await membership.report(["ech-1"], 42)
        snapshot = await store.load()
        [member] = snapshot.members
        assert (member.name, member.loaded, member.revision, dict(member.info)) == (
            "front-1",
            frozenset({"ech-1"}),
            42,
            {"host": "a"},
        )
        await membership.leave()
        assert (await store.load()).members == ()

    async def test_lease_expiry_removes_a_crashed_member(self) -> None:
        store = self.store()
        child = subprocess.Popen(
            [sys.executable, "-c", _MEMBER_SCRIPT, ",".join(self.cluster.endpoints), self.prefix],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parent.parent,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
        self.addCleanup(stop_process, child, 5)
        assert child.stdout is not None
        line = await deferLater(reactor, 0, child.stdout.readline)
        assert line.split()[:1] == [b"ok"], line
        snapshot = await store.load()
        assert [m.name for m in snapshot.members] == ["crashing"]
        assert snapshot.members[0].loaded == {"ech-a", "ech-b"}
        # Alive past its 1 s TTL: the child renews the lease.
        await deferLater(reactor, 2.0)
        assert [m.name for m in (await store.load()).members] == ["crashing"]

        child.kill()  # SIGKILL to its PID: no revoke, the lease must lapse
        child.wait(5)
        killed = time.monotonic()
        members: list[str] = ["crashing"]

        async def poll() -> None:
            while members and time.monotonic() - killed < 5:
                members[:] = [m.name for m in (await store.load()).members]
                await deferLater(reactor, 0.05)

        await poll()
        assert members == []
        assert time.monotonic() - killed < 3.5


class SecuredClusterTests(TestCase):
    """TLS with client certificates and user/password authentication."""

    timeout = 60

    async def test_tls_client_cert_and_password(self) -> None:
        cluster = EtcdCluster(tls=True, client_cert=True, password="s3cret")
        self.addCleanup(cluster.close)
        files = cluster.tls_files
        assert files is not None
        sealer = Sealer(secrets.token_bytes(32))

        def store(**changes: Any) -> EtcdKeyStore:
            options: dict[str, Any] = {
                "ca_file": files.ca,
                "cert_file": files.client_cert,
                "key_file": files.client_key,
                "username": "root",
                "password": "s3cret",
                "timeout": 2.0,
            }
            options.update(changes)
            settings = EtcdSettings(cluster.endpoints, "/secure/", **options)
            made = EtcdKeyStore(EtcdClient(settings, reactor), sealer, reactor)
            self.addCleanup(made.close)
            return made

        good = store()
        key = await good.add_key(x25519, KeyState.ACTIVE)
        seen: list[StoreSnapshot] = []
        watch = good.watch(seen.append)
        self.addCleanup(watch.stop)
        await eventually(lambda: bool(seen), 5, "snapshot over TLS with a token")
        assert seen[0].key_ids == {key.key_id}

        with pytest.raises(KeyStoreError) as caught:
            await store(password="wrong").load()
        assert "authentication failed" in str(caught.value)
        with pytest.raises(EtcdUnavailable) as caught:
            await store(cert_file=None, key_file=None).load()  # no client certificate
        assert "bad certificate" in str(caught.value)
        # A CA that did not sign the servers' certificate: refused.
        with pytest.raises(EtcdUnavailable) as caught:
            await store(ca_file=files.client_cert).load()
        assert "certificate verify failed" in str(caught.value)
