"""The key directory behind IKeyStore, key sealing, and the store-neutral helpers (no etcd)."""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from echfront.ech.keyset import ECHKey, generate_key
from echfront.errors import ConfigError
from echfront.interfaces import (
    Fence,
    IKeyStore,
    IKeyWatch,
    IMembership,
    StateChange,
    StoreSnapshot,
)
from echfront.keys.etcdapi import EtcdSettings, prefix_end
from echfront.keys.etcdstore import decode_member
from echfront.keys.keydir import KeyDirectory, KeyState
from echfront.keys.sealing import Sealer, SealError, read_kek_file, sealing_context
from echfront.keys.stores import (
    DirectoryKeyStore,
    KeyStoreError,
    changes_to_apply,
    check_member_name,
)

PUBLIC_NAME = "public.example"
UTC = datetime.UTC
T = TypeVar("T")


def x25519(taken: frozenset[int]) -> Sequence[ECHKey]:
    return [generate_key(PUBLIC_NAME, taken_ids=taken)]


@dataclass
class Env:
    """A key directory behind a DirectoryKeyStore, on a fake clock."""

    path: Path
    clock: Clock
    store: DirectoryKeyStore


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    clock = Clock()
    store = DirectoryKeyStore(KeyDirectory(tmp_path / "keys"), clock, poll_interval=0.5)
    yield Env(tmp_path / "keys", clock, store)
    done(store.close())


def done(d: Deferred[T]) -> T:
    """The result of a Deferred that has already fired (the directory store is synchronous)."""
    results: list[T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the Deferred has not fired"
    return results[0]


def failed(d: Deferred[Any], kind: type[BaseException]) -> Failure:
    """The failure of a Deferred that has already failed with ``kind``."""
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred did not fail"
    assert failures[0].check(kind), failures[0]
    return failures[0]


def test_lifecycle(env: Env) -> None:
    assert IKeyStore.providedBy(env.store)
    created = datetime.datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    first = done(env.store.add_key(x25519, KeyState.ACTIVE, created=created))
    second = done(env.store.add_key(x25519, KeyState.PENDING))
    assert first.key_id == f"ech-20260131T120000Z-{first.config_ids[0]:03d}"
    assert (env.path / f"{first.key_id}.pem").exists()
    snapshot = done(env.store.load())
    assert [k.key_id for k in snapshot.keys] == [first.key_id, second.key_id]
    assert snapshot.taken_ids() == {*first.config_ids, *second.config_ids}
    assert [k.published for k in snapshot.ech_keys()] == [True, False]

    until = datetime.datetime(2026, 2, 1, tzinfo=UTC)
    swap = [
        StateChange(second.key_id, KeyState.PENDING, KeyState.ACTIVE),
        StateChange(first.key_id, KeyState.ACTIVE, KeyState.RETIRED, until),
    ]
    assert done(env.store.change_states(swap))
    assert done(env.store.change_states(swap))  # retry
    stale = [StateChange(second.key_id, KeyState.PENDING, KeyState.RETIRED)]
    assert not done(env.store.change_states(stale))
    snapshot = done(env.store.load())
    assert [(k.state, k.retire_after) for k in snapshot.keys] == [
        (KeyState.RETIRED, until),
        (KeyState.ACTIVE, None),
    ]
    assert not done(env.store.delete_key(second.key_id, KeyState.RETIRED))
    assert done(env.store.delete_key(first.key_id, KeyState.RETIRED))
    assert done(env.store.delete_key(first.key_id, KeyState.RETIRED))
    assert done(env.store.load()).key_ids == {second.key_id}


def test_build_sees_taken_ids_and_bad_builds_are_refused(env: Env) -> None:
    first = done(env.store.add_key(x25519, KeyState.ACTIVE))
    offered: list[frozenset[int]] = []

    def reuse(taken: frozenset[int]) -> Sequence[ECHKey]:
        offered.append(taken)
        return [generate_key(PUBLIC_NAME, config_id=first.config_ids[0])]

    failure = failed(env.store.add_key(reuse, KeyState.PENDING), KeyStoreError)
    assert "already in use" in failure.getErrorMessage()
    assert offered == [frozenset(first.config_ids)]
    failed(env.store.add_key(lambda taken: [], KeyState.PENDING), KeyStoreError)


def test_fence_is_refused(env: Env) -> None:
    failure = failed(
        env.store.add_key(x25519, KeyState.PENDING, fence=Fence("leader", 1)), KeyStoreError
    )
    assert "no fence" in failure.getErrorMessage()


def test_watch_polls_and_reports_changes_only(env: Env) -> None:
    seen: list[StoreSnapshot] = []
    errors: list[str] = []
    watch = env.store.watch(seen.append, errors.append)
    assert IKeyWatch.providedBy(watch)
    assert [s.keys for s in seen] == [()]
    env.clock.advance(0.5)
    assert len(seen) == 1  # nothing changed, nothing delivered
    key = done(env.store.add_key(x25519, KeyState.PENDING))
    env.clock.advance(0.5)
    assert seen[-1].key_ids == {key.key_id}
    # A broken metadata file: the error is reported, the last set stays.
    (env.path / f"{key.key_id}.json").write_text("{")
    env.clock.advance(0.5)
    assert len(seen) == 2
    assert len(errors) == 1
    assert "unreadable key metadata" in errors[0]
    done(watch.stop())
    env.clock.advance(5)
    assert len(seen) == 2


def test_members_register_report_expire_and_leave(env: Env) -> None:
    seen: list[StoreSnapshot] = []
    env.store.watch(seen.append)
    membership = done(env.store.register("front-1", 3, {"host": "a"}))
    assert IMembership.providedBy(membership)
    done(membership.report(["ech-x"], 0))
    env.clock.advance(0.5)
    [member] = seen[-1].members
    assert (member.name, member.loaded) == ("front-1", frozenset({"ech-x"}))
    assert dict(member.info) == {"host": "a"}
    # Renewals keep it alive past its TTL without a new snapshot each time.
    count = len(seen)
    env.clock.pump([0.5] * 20)
    assert [m.name for m in seen[-1].members] == ["front-1"]
    assert len(seen) == count
    # Another process on the same directory, whose timers stop (a crash):
    # its file is not renewed and drops out after its TTL.
    frozen = Clock()
    frozen.advance(env.clock.seconds())
    crashed = DirectoryKeyStore(KeyDirectory(env.path), frozen)
    done(crashed.register("front-2", 3))
    env.clock.advance(0.5)
    assert [m.name for m in seen[-1].members] == ["front-1", "front-2"]
    env.clock.pump([0.5] * 7)
    assert [m.name for m in seen[-1].members] == ["front-1"]
    done(membership.leave())
    env.clock.advance(0.5)
    assert seen[-1].members == ()


def test_member_names_are_checked(env: Env) -> None:
    failed(env.store.register("../x", 3), KeyStoreError)
    assert check_member_name("front-1.example") == "front-1.example"


def test_seal_open_and_bindings() -> None:
    kek = secrets.token_bytes(32)
    sealer = Sealer(kek)
    context = sealing_context("ech-1", b"\x00\x04abcd")
    fingerprint, sealed = sealer.seal(b"secret key bytes", context)
    assert fingerprint == Sealer.fingerprint_of(kek)
    assert b"secret" not in sealed
    assert sealer.open(fingerprint, sealed, context) == b"secret key bytes"
    # Moved to another key id or paired with another config list: refused.
    for other in (
        sealing_context("ech-2", b"\x00\x04abcd"),
        sealing_context("ech-1", b"\x00\x04abce"),
    ):
        with pytest.raises(SealError):
            sealer.open(fingerprint, sealed, other)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError):
        sealer.open(fingerprint, tampered, context)
    with pytest.raises(SealError):
        Sealer(secrets.token_bytes(32)).open(fingerprint, sealed, context)
    # KEK rotation: the new sealer still opens values of the previous KEK.
    rotated = Sealer(secrets.token_bytes(32), previous=[kek])
    assert rotated.open(fingerprint, sealed, context) == b"secret key bytes"
    assert rotated.seal(b"x", context)[0] != fingerprint


def test_kek_file(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_bytes(secrets.token_bytes(32))
    path.chmod(0o600)
    assert len(read_kek_file(path)) == 32
    path.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        read_kek_file(path)
    assert "accessible by other users" in str(caught.value)
    path.chmod(0o600)
    path.write_bytes(b"too short\n")
    with pytest.raises(ConfigError) as caught:
        read_kek_file(path)
    assert "exactly 32 bytes" in str(caught.value)
    with pytest.raises(ConfigError):
        read_kek_file(path.with_name("missing"))


def test_changes_to_apply() -> None:
    until = datetime.datetime(2026, 2, 1, tzinfo=UTC)
    changes = [
        StateChange("a", KeyState.PENDING, KeyState.ACTIVE),
        StateChange("b", KeyState.ACTIVE, KeyState.RETIRED, until),
    ]
    current = {"a": (KeyState.PENDING, None), "b": (KeyState.ACTIVE, None)}
    assert changes_to_apply(changes, current) == changes
    assert changes_to_apply(changes, {**current, "a": (KeyState.ACTIVE, None)}) == changes[1:]
    done = {"a": (KeyState.ACTIVE, None), "b": (KeyState.RETIRED, until)}
    assert changes_to_apply(changes, done) == []
    assert changes_to_apply(changes, {"a": (KeyState.PENDING, None)}) is None
    assert changes_to_apply(changes, {**current, "b": (KeyState.RETIRED, None)}) is None


def test_prefix_end() -> None:
    assert prefix_end(b"/echfront/") == b"/echfront0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\x00"


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="at least one endpoint"):
        EtcdSettings(())
    with pytest.raises(ConfigError, match="expected http"):
        EtcdSettings(("127.0.0.1:2379",))
    with pytest.raises(ConfigError, match="both cert and key"):
        EtcdSettings(("http://127.0.0.1:2379",), cert_file=Path("c.pem"))
    with pytest.raises(ConfigError, match="user and password"):
        EtcdSettings(("http://127.0.0.1:2379",), username="root")
    assert "secret" not in repr(
        EtcdSettings(("http://127.0.0.1:2379",), username="root", password="secret")
    )


def test_malformed_member_counts_with_nothing_loaded() -> None:
    member = decode_member("front-9", b"not json")
    assert member.loaded == frozenset()
    assert "unreadable" in member.info["error"]
    good = decode_member(
        "front-1",
        json.dumps({"loaded": ["a"], "revision": 3, "reported": 1.5, "info": {}}).encode(),
    )
    assert (good.loaded, good.revision) == (frozenset({"a"}), 3)
