# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""What a reload does with ``[keys]`` and ``[publish]`` (echfront.app.service, issue 10).

The decision: a reload (SIGHUP, ``[reload] watch``) applies them.  The new
publisher is built, and the TSIG file read, before anything changes, so a
bad ``[publish]`` refuses the whole reload with one error line; a changed
table (or TSIG file) replaces the rotation schedule once any step in
progress has finished; an unchanged one leaves it alone.  Under
``--workers`` the supervisor, where rotation runs, checks and applies first
and passes SIGHUP on only when that succeeds.

Fronts run on a ``MemoryReactorClock`` with real files; the schedule's own
steps run against a real key directory.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer

from echfront.app.service import FrontService, KeyRotation, RotationPlan, supervisor_service
from echfront.app.workers import Supervisor
from echfront.config.schema import PublishConfig, load_config_file
from echfront.dns.command import CommandPublisher
from echfront.dns.rfc2136 import RFC2136Publisher
from echfront.interfaces import IPublisher
from echfront.keys.keydir import KeyDirectory, KeyState
from echfront.keys.rotation import RotationPolicy, Rotator
from tests.test_tap import PUBLIC_NAME, SECRET_NAME, ServiceTestCase, config_ids, errors

HOOK = (sys.executable, "-c", "pass")


def toml_list(items: Sequence[str]) -> str:
    """A TOML array of basic strings (JSON string escapes are TOML's)."""
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def as_command(publisher: object) -> CommandPublisher:
    # An object, not an IPublisher: mypy-zope calls narrowing an interface
    # to its implementer unreachable.
    assert isinstance(publisher, CommandPublisher)
    return publisher


def as_rfc2136(publisher: object) -> RFC2136Publisher:
    assert isinstance(publisher, RFC2136Publisher)
    return publisher


class RotationReloadTests(ServiceTestCase):
    def keys_table(self, rotate: str = "24h") -> str:
        return (
            f'[keys]\ndirectory = "{self.dir / "keys"}"\n'
            f'public_name = "{PUBLIC_NAME}"\nrotate = "{rotate}"\n'
        )

    def command_table(self, argv: Sequence[str] = HOOK) -> str:
        return (
            f'[publish]\nmethod = "command"\nnames = ["{SECRET_NAME}"]\n'
            f'command = {toml_list(argv)}\nverify_servers = ["127.0.0.1:5300"]\n'
        )

    def rfc2136_table(self, secret_file: Path) -> str:
        return (
            f'[publish]\nmethod = "rfc2136"\nnames = ["{SECRET_NAME}"]\n'
            f'server = "127.0.0.1:5300"\ntsig_secret_file = "{secret_file}"\n'
        )

    def rotating(self, body: str) -> FrontService:
        self.configure(body)
        return FrontService(lambda: load_config_file(self.path), self.reactor, rotate=True)

    def rotator(self, service: FrontService) -> Rotator:
        assert service.rotation is not None
        rotator = service.rotation.rotator
        assert rotator is not None
        return rotator

    def test_a_publish_edit_is_applied(self) -> None:
        service = self.rotating(self.keys_table() + self.command_table())
        first = self.rotator(service)
        self.assertEqual(as_command(first.publisher).argv, HOOK)
        self.configure(self.keys_table() + self.command_table([*HOOK, "{config_list}"]))
        self.assertTrue(service.reload())
        second = self.rotator(service)
        self.assertIsNot(second, first)
        self.assertEqual(as_command(second.publisher).argv, (*HOOK, "{config_list}"))
        self.assertIsNone(first.parent)
        self.assertIs(second.parent, service.rotation)

    def test_a_keys_edit_is_applied(self) -> None:
        service = self.rotating(self.keys_table("24h") + self.command_table())
        self.configure(self.keys_table("12h") + self.command_table())
        self.assertTrue(service.reload())
        self.assertEqual(self.rotator(service).policy.rotate_every, 12 * 3600)

    def test_an_unchanged_reload_keeps_the_schedule(self) -> None:
        service = self.rotating(self.keys_table() + self.command_table())
        first = self.rotator(service)
        self.configure(self.keys_table() + self.command_table(), keys="ab")
        self.assertTrue(service.reload())
        self.assertIs(self.rotator(service), first)
        self.assertEqual(config_ids(service), {0x42, 0x43})

    def test_a_bad_publish_table_refuses_the_whole_reload(self) -> None:
        service = self.rotating(self.keys_table() + self.command_table())
        first = self.rotator(service)
        self.configure(self.keys_table() + self.command_table(["./no-such-hook"]), keys="b")
        with capturedLogs() as events:
            self.assertFalse(service.reload())
        (line,) = errors(events)
        self.assertTrue(line.startswith("reload failed, still serving the previous configuration"))
        self.assertIn("publish.command: ", line)
        self.assertIn("no-such-hook: program not found", line)
        # Nothing changed: neither the keys nor the schedule.
        self.assertEqual(config_ids(service), {0x42})
        self.assertIs(self.rotator(service), first)
        self.assertEqual(self.reloads(service, "failure"), 1)

    def test_rotation_starts_and_stops_with_the_keys_table(self) -> None:
        service = self.rotating("")
        assert service.rotation is not None
        self.assertIsNone(service.rotation.parent)  # no schedule, no child service
        self.assertEqual([s for s in service if isinstance(s, KeyRotation)], [])
        self.configure(self.keys_table())
        self.assertTrue(service.reload())
        self.assertIs(service.rotation.parent, service)
        self.assertIsNone(self.rotator(service).publisher)  # no [publish]: "none"
        self.configure("")
        self.assertTrue(service.reload())
        self.assertIsNone(service.rotation.parent)
        self.assertIsNone(service.rotation.rotator)

    def test_an_edited_tsig_file_is_applied_and_an_unreadable_one_refused(self) -> None:
        secret = self.dir / "tsig.key"
        secret.write_text(f"hmac-sha256:update.example.:{base64.b64encode(b'a' * 32).decode()}\n")
        service = self.rotating(self.keys_table() + self.rfc2136_table(secret))
        first = self.rotator(service)
        self.assertEqual(as_rfc2136(first.publisher).key.secret, b"a" * 32)
        # The configuration is the same; only the file the table names changed.
        secret.write_text(f"hmac-sha256:update.example.:{base64.b64encode(b'b' * 32).decode()}\n")
        self.assertTrue(service.reload())
        second = self.rotator(service)
        self.assertEqual(as_rfc2136(second.publisher).key.secret, b"b" * 32)
        secret.unlink()
        with capturedLogs() as events:
            self.assertFalse(service.reload())
        (line,) = errors(events)
        self.assertIn("publish.tsig_secret_file: cannot read", line)
        self.assertIs(self.rotator(service), second)

    def test_the_tsig_file_is_watched(self) -> None:
        secret = self.dir / "tsig.key"
        secret.write_text(f"update.example.:{base64.b64encode(b'a' * 32).decode()}\n")
        service = self.rotating(self.keys_table() + self.rfc2136_table(secret))
        self.assertIn(secret, service.config.watched_files())


@implementer(IPublisher)
class HeldPublisher:
    """Publishes when the test says so; verifies at once."""

    def __init__(self) -> None:
        self.held: list[Deferred[None]] = []

    def publish(self, config_list: bytes) -> Deferred[None]:
        held: Deferred[None] = Deferred()
        self.held.append(held)
        return held

    def verify(self, config_list: bytes) -> Deferred[bool]:
        return succeed(True)


class ScheduleSwitchTests(ServiceTestCase):
    def test_a_step_in_progress_finishes_before_the_new_schedule_starts(self) -> None:
        host = MultiService()
        changes: list[bool] = []
        rotation = KeyRotation(self.reactor, host, on_change=lambda: changes.append(True))
        publisher = HeldPublisher()
        directory = self.dir / "keys"
        plan = RotationPlan(
            directory,
            RotationPolicy(PUBLIC_NAME, 86400.0, 3600.0),
            PublishConfig(),
            None,
            publisher,
        )
        rotation.apply(plan)
        host.startService()
        first = rotation.rotator
        assert first is not None
        self.assertTrue(first.running)
        (held,) = publisher.held  # bootstrap: a pending key, being published
        rotation.apply(replace(plan, policy=replace(plan.policy, rotate_every=43200.0)))
        second = rotation.rotator
        assert second is not None
        self.assertIsNot(second, first)
        self.assertFalse(first.running)
        self.assertIsNone(second.parent)  # waits for the step
        held.callback(None)
        # The old step finished with the old settings: its key is active ...
        states = [r.state for r in KeyDirectory(directory).records()]
        self.assertEqual(states, [KeyState.ACTIVE])
        # ... and only then does the new schedule run (and find nothing due).
        self.assertIs(second.parent, rotation)
        self.assertTrue(second.running)
        self.assertEqual(len(publisher.held), 1)
        host.stopService()


class SupervisorReloadTests(ServiceTestCase):
    def supervised(self, body: str = "") -> tuple[MultiService, Supervisor, list[bool]]:
        self.configure(body)
        parent = supervisor_service(
            lambda: load_config_file(self.path), ["worker"], 2, self.reactor
        )
        supervisor = next(s for s in parent if isinstance(s, Supervisor))
        self.addCleanup(shutil.rmtree, supervisor.metrics_dir, True)
        forwarded: list[bool] = []
        supervisor.on_reload = lambda: forwarded.append(True)
        return parent, supervisor, forwarded

    def test_sighup_applies_keys_here_then_reaches_the_workers(self) -> None:
        parent, supervisor, forwarded = self.supervised()
        self.assertEqual([type(s) for s in parent], [Supervisor])
        keys = f'[keys]\ndirectory = "{self.dir / "keys"}"\nrotate = "24h"\n'
        self.configure(keys)
        supervisor.hangup()
        self.assertEqual(forwarded, [True])
        (rotation,) = [s for s in parent if isinstance(s, KeyRotation)]
        assert rotation.rotator is not None
        self.assertEqual(rotation.rotator.policy.rotate_every, 86400.0)

    def test_a_bad_configuration_stops_at_the_supervisor(self) -> None:
        _parent, supervisor, forwarded = self.supervised()
        self.configure("[publish]\nmethod = 'command'")
        with capturedLogs() as events:
            supervisor.hangup()
        self.assertEqual(forwarded, [])
        (line,) = [formatEvent(e) for e in events if "reload failed" in formatEvent(e)]
        self.assertIn("publish.names: required to publish", line)
        self.assertNotIn("\n", line)
