"""The key directory, the `echfront keys` command and the rotation schedule."""

from __future__ import annotations

import base64
import datetime
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from echfront.ech.echconfig import (
    KEM_MLKEM768_X25519,
    KEM_X25519_HKDF_SHA256,
    ECHConfig,
    decode_config_list,
)
from echfront.ech.grease import is_decoy
from echfront.ech.keyset import generate_key
from echfront.errors import ConfigError
from echfront.interfaces import IPublisher
from echfront.keys.keydir import KeyDirectory, KeyState
from echfront.keys.rotation import RotationPolicy, Rotator, parse_duration

START = 1_800_000_000.0  # a fixed "now" for the clock


def real_configs(config_list: bytes) -> list[ECHConfig]:
    """The configs of a published list after its GREASE decoy (RFC 9849 §6.2.2).

    tests/test_grease.py proves the decoy; here it is checked and set aside.
    """
    decoy, *configs = decode_config_list(config_list).configs
    assert is_decoy(decoy) and not any(is_decoy(c) for c in configs)
    return configs


def when(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)


# -- the directory --------------------------------------------------------------


def test_directory_round_trip_and_permissions(tmp_path: Path) -> None:
    directory = KeyDirectory(tmp_path / "keys")
    key = generate_key("public.example", config_id=9)
    record = directory.add([key], KeyState.PENDING, when(START))
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(record.pem).st_mode) == 0o600
    (loaded,) = directory.records()
    assert loaded == record
    assert json.loads(record.metadata_path.read_text()) == {
        "created": "2027-01-15T08:00:00Z",
        "state": "pending",
        "retire_after": None,
        "config_ids": [9],
        "kem_id": KEM_X25519_HKDF_SHA256,
    }
    (ech,) = directory.load_keys()
    assert ech.config == key.config and not ech.published  # pending: decrypt-only
    active = directory.update(loaded, KeyState.ACTIVE)
    assert [k.published for k in directory.load_keys()] == [True]
    retired = directory.update(active, KeyState.RETIRED, when(START + 60))
    assert directory.records() == [retired]
    assert [k.published for k in directory.load_keys()] == [False]
    directory.delete(retired)
    assert directory.records() == [] and list((tmp_path / "keys").glob("ech-*")) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "unreadable key metadata"),
        ('{"state": "lost", "created": "2026-01-01T00:00:00Z"}', "unknown state"),
        ('{"state": "active"}', "created is missing"),
        ('{"state": "active", "created": "yesterday"}', "bad time"),
    ],
)
def test_bad_metadata_is_one_line(tmp_path: Path, content: str, message: str) -> None:
    directory = KeyDirectory(tmp_path)
    record = directory.add([generate_key("public.example")], KeyState.ACTIVE)
    record.metadata_path.write_text(content)
    with pytest.raises(ConfigError, match=message) as caught:
        directory.records()
    assert "\n" not in str(caught.value) and str(record.metadata_path) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("1.5h", 5400), (30, 30), ("0", 0)],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text, "keys.rotate") == seconds


@pytest.mark.parametrize("text", ["soon", "24x", True, -5, "h"])
def test_parse_duration_errors(text: object) -> None:
    with pytest.raises(ConfigError, match=r"keys\.rotate"):
        parse_duration(text, "keys.rotate")


# -- the command line -----------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "echfront.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_keys_commands(tmp_path: Path) -> None:
    keys = str(tmp_path / "keys")
    added = cli("keys", "add", "--dir", keys, "--public-name", "public.example")
    assert added.returncode == 0, added.stderr
    (record,) = KeyDirectory(Path(keys)).records()
    assert record.state is KeyState.PENDING
    listing = cli("keys", "list", "--dir", keys).stdout
    assert listing.startswith(f"{record.stem}  pending  config_id {record.config_ids[0]}  ")
    # Adding prints the pending list: what to publish before activating.
    pending = base64.b64decode(added.stdout.strip().splitlines()[-1])
    assert [c.config_id for c in real_configs(pending)] == list(record.config_ids)
    # Activating (every pending key, without names) prints the published list.
    activated = cli("keys", "activate", "--dir", keys)
    assert activated.returncode == 0, activated.stderr
    assert f"activated {record.stem}" in activated.stdout
    listed = base64.b64decode(activated.stdout.strip().splitlines()[-1])
    assert [c.config_id for c in real_configs(listed)] == list(record.config_ids)
    nothing = cli("keys", "activate", "--dir", keys)
    assert nothing.returncode == 2 and "no pending keys to activate" in nothing.stderr
    # A bad --grace is refused before any key is made.
    refused = cli("keys", "rotate", "--dir", keys, "--public-name", "p.example", "--grace", "x")
    assert refused.returncode == 2 and "--grace: expected a duration" in refused.stderr
    assert len(KeyDirectory(Path(keys)).records()) == 1
    # Rotating retires it for the grace period and activates a new one.
    rotated = cli(
        "keys",
        "rotate",
        "--dir",
        keys,
        "--public-name",
        "public.example",
        "--kem",
        "mlkem768-x25519",
        "--kem",
        "x25519",
        "--grace",
        "2h",
    )
    assert rotated.returncode == 0, rotated.stderr
    states = {r.stem: r for r in KeyDirectory(Path(keys)).records()}
    old = states.pop(record.stem)
    assert old.state is KeyState.RETIRED and old.retire_after is not None
    assert {r.state for r in states.values()} == {KeyState.ACTIVE}
    assert {r.kem_id for r in states.values()} == {KEM_MLKEM768_X25519, KEM_X25519_HKDF_SHA256}
    published = real_configs(base64.b64decode(rotated.stdout.strip().splitlines()[-1]))
    assert published[0].kem_id == KEM_MLKEM768_X25519  # post-quantum first
    assert {c.config_id for c in published} == {i for r in states.values() for i in r.config_ids}
    # The DNS record can be printed from the directory's published keys.
    dns = cli("dns", "--name", "secret.example", "--keys-dir", keys)
    assert dns.returncode == 0 and dns.stdout.startswith("secret.example. 300 IN HTTPS 1 . ech=")
    # Retire --now deletes.
    deleted = cli("keys", "retire", "--dir", keys, "--now", old.stem)
    assert deleted.returncode == 0 and f"deleted {old.stem}" in deleted.stdout
    assert old.stem not in {r.stem for r in KeyDirectory(Path(keys)).records()}
    missing = cli("keys", "retire", "--dir", keys, "no-such-key")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "no key named 'no-such-key'" in missing.stderr


# -- the schedule -----------------------------------------------------------------


@implementer(IPublisher)
class FakePublisher:
    """Records publications; its answers are scripted by the test."""

    def __init__(self) -> None:
        self.published: list[bytes] = []
        self.dns: bytes | None = None
        self.publish_ok = True

    def publish(self, config_list: bytes) -> Deferred[None]:
        self.published.append(config_list)
        if not self.publish_ok:
            return fail(RuntimeError("the DNS server refused the update"))
        self.dns = config_list
        return succeed(None)

    def verify(self, config_list: bytes) -> Deferred[bool]:
        return succeed(self.dns == config_list)


class Harness:
    """A Rotator on a memory clock with a fake publisher."""

    def __init__(
        self,
        path: Path,
        *,
        rotate: float = 3600,
        grace: float = 600,
        kems: tuple[int, ...] = (KEM_X25519_HKDF_SHA256,),
    ) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(START)
        self.directory = KeyDirectory(path)
        self.publisher = FakePublisher()
        self.changes = 0
        self.results: list[str] = []
        policy = RotationPolicy(
            "public.example",
            rotate,
            grace,
            kems,
            check_interval=60,
            verify_timeout=10,
            verify_interval=2,
        )
        self.rotator = Rotator(
            self.directory,
            policy,
            self.publisher,
            self.clock,
            on_change=self.changed,
            publications=self.results.append,
        )

    def changed(self) -> None:
        self.changes += 1

    def states(self) -> list[tuple[KeyState, datetime.datetime | None]]:
        return [(r.state, r.retire_after) for r in self.directory.records()]

    def run(self, seconds: float) -> None:
        """Advance time in check-interval steps (each step runs the schedule)."""
        for _ in range(int(seconds // 60)):
            self.clock.advance(60)


def test_bootstrap_publishes_then_activates(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.rotator.startService()
    (record,) = h.directory.records()
    assert record.state is KeyState.ACTIVE
    (published,) = h.publisher.published
    assert [c.config_id for c in real_configs(published)] == list(record.config_ids)
    assert h.results == ["success"]
    assert h.changes == 2  # loaded as pending, then activated
    h.rotator.stopService()


def test_full_cycle_new_key_verified_before_offered_old_retired_after_grace(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, rotate=3600, grace=600)
    h.publisher.publish_ok = True
    h.rotator.startService()
    (first,) = h.directory.records()
    # Before the rotation is due, nothing changes.
    h.run(3500)
    assert [r.stem for r in h.directory.records()] == [first.stem]
    # While DNS refuses, the new key is only pending: it decrypts (loaded,
    # decrypt-only) but is not offered; the old key stays active; nothing
    # is deleted; the failure is counted.
    h.publisher.publish_ok = False
    h.run(120)
    states = h.states()
    assert states[0] == (KeyState.ACTIVE, None)
    assert states[1][0] is KeyState.PENDING
    assert "failure" in h.results
    keys = h.directory.load_keys()
    assert [k.published for k in keys] == [True, False]
    # DNS is back: the next check publishes, verifies, swaps roles.
    h.publisher.publish_ok = True
    h.run(60)
    old, new = h.directory.records()
    assert old.stem == first.stem and old.state is KeyState.RETIRED
    assert new.state is KeyState.ACTIVE
    retire_after = old.retire_after
    assert retire_after is not None
    assert h.publisher.dns is not None
    assert [c.config_id for c in real_configs(h.publisher.dns)] == list(new.config_ids)
    # The retired key decrypts until its grace is over, then goes.
    h.run(540)
    assert [r.stem for r in h.directory.records()] == [old.stem, new.stem]
    h.run(120)
    assert [r.stem for r in h.directory.records()] == [new.stem]
    h.rotator.stopService()


def test_verification_that_never_succeeds_keeps_the_old_key(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.rotator.startService()
    (first,) = h.directory.records()

    def lying_verify(config_list: bytes) -> Deferred[bool]:
        return succeed(False)

    h.publisher.verify = lying_verify  # type: ignore[method-assign]
    h.run(3600 + 120)
    assert h.states()[0] == (KeyState.ACTIVE, None)
    assert h.directory.records()[0].stem == first.stem
    assert all(r.state is not KeyState.RETIRED for r in h.directory.records())
    assert h.results.count("failure") >= 1
    h.rotator.stopService()


def test_post_quantum_and_classical_keys_rotate_together(tmp_path: Path) -> None:
    h = Harness(tmp_path, kems=(KEM_MLKEM768_X25519, KEM_X25519_HKDF_SHA256))
    h.rotator.startService()
    records = h.directory.records()
    assert {r.kem_id for r in records} == {KEM_MLKEM768_X25519, KEM_X25519_HKDF_SHA256}
    assert {r.state for r in records} == {KeyState.ACTIVE}
    (published,) = h.publisher.published
    assert real_configs(published)[0].kem_id == KEM_MLKEM768_X25519
    h.rotator.stopService()


def test_without_a_publisher_pending_keys_activate_at_once(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    clock.advance(START)
    directory = KeyDirectory(tmp_path)
    policy = RotationPolicy("public.example", 60, 60)
    rotator = Rotator(directory, policy, None, clock, on_change=lambda: None)
    rotator.startService()
    assert [r.state for r in directory.records()] == [KeyState.ACTIVE]
    rotator.stopService()
