# -*- test-case-name: tests.test_rotation -*-
"""Automatic key rotation with DNS publication (RFC 9849 §8.1, §10.10.5).

One :class:`Rotator` per deployment (the single front, or the supervisor
of ``--workers``) drives the key directory (:mod:`echfront.keys.keydir`):

1. when no key is active, or the active one is older than ``rotate``, it
   generates a *pending* key set (one key per configured KEM) and makes
   every front load it, so the new key decrypts everywhere before any
   client can learn it;
2. it publishes the pending configs (a GREASE decoy, then post-quantum
   first; :func:`~echfront.ech.keyset.publication_list`) and verifies, by
   asking the authoritative server, that the records now carry exactly
   them; only then does the pending set become *active* (served in
   origin-svcb and as the retry list) and the previous active set
   *retired*: decrypt-only for ``grace`` more seconds, for clients that
   cached the old config from DNS;
3. retired keys past their grace are deleted.

If publication or verification fails, nothing changes: the current keys
stay in service, the pending ones keep decrypting, and the failure is
logged and counted; the next check tries again.  Without a publisher
(``[publish] method = "none"``) the operator publishes (``echfront dns``,
origin-svcb) and a pending key becomes active at once.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from echfront.ech.echconfig import KEM_X25519_HKDF_SHA256
from echfront.ech.keyset import generate_key, publication_list
from echfront.errors import ConfigError
from echfront.interfaces import IPublisher
from echfront.keys.keydir import KeyDirectory, KeyRecord, KeyState
from echfront.keys.keyfile import read_key_file

__all__ = ["RotationPolicy", "Rotator"]


@dataclass(frozen=True)
class RotationPolicy:
    """How keys rotate (``[keys]`` in the configuration).

    :ivar rotate_every: seconds between rotations; 0: only bootstrap.
    :ivar grace: seconds a replaced key keeps decrypting.
    :ivar kems: one key per KEM in each key set (post-quantum published first).
    :ivar grease: GREASE (RFC 9849 §6.2.2, ``[ech] grease``): new configs carry a
        reserved optional extension, and the published list leads with a decoy.
    """

    public_name: str
    rotate_every: float
    grace: float
    kems: tuple[int, ...] = (KEM_X25519_HKDF_SHA256,)
    maximum_name_length: int = 0
    check_interval: float = 60.0
    verify_timeout: float = 60.0
    verify_interval: float = 2.0
    grease: bool = True


class Rotator(Service):
    """The rotation schedule as a Twisted service (see the module docstring).

    :param on_change: called after the directory changed, to reload fronts.
    :param publications: called with "success" or "failure" (metrics).
    """

    log = Logger()

    def __init__(
        self,
        directory: KeyDirectory,
        policy: RotationPolicy,
        publisher: IPublisher | None,
        clock: Any,
        *,
        on_change: Callable[[], object],
        publications: Callable[[str], object] = lambda result: None,
    ) -> None:
        """Drive ``directory`` with ``policy``; nothing runs until the service starts."""
        self.directory = directory
        self.policy = policy
        self.publisher = publisher
        self.clock = clock
        self.on_change = on_change
        self.publications = publications
        self._loop: LoopingCall | None = None
        self._step: Deferred[None] | None = None

    def startService(self) -> None:
        """Check now, then every ``check_interval`` seconds."""
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.policy.check_interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        """Stop checking; a step in progress finishes (DNS I/O cannot be cut)."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._step

    def tick(self) -> Deferred[None] | None:
        """Run one step unless one is still running."""
        if self._step is not None:
            return None
        step = ensureDeferred(self.step())
        self._step = step

        def done(result: object) -> None:
            self._step = None

        step.addErrback(lambda failure: self.log.failure("key rotation step failed", failure))
        step.addBoth(done)
        return step

    def now(self) -> datetime.datetime:
        """The clock's time as a UTC datetime."""
        return datetime.datetime.fromtimestamp(int(self.clock.seconds()), datetime.UTC)

    async def step(self) -> None:
        """Advance the lifecycle once (idempotent; see the module docstring)."""
        now = self.now()
        changed = False
        with self.directory.locked():
            records = self.directory.records()
            for record in records:
                expired = record.retire_after is not None and record.retire_after <= now
                if record.state is KeyState.RETIRED and expired:
                    self.directory.delete(record)
                    self.log.info("deleted retired ECH key {stem}", stem=record.stem)
                    changed = True
            records = self.directory.records()
            pending = [r for r in records if r.state is KeyState.PENDING]
            active = [r for r in records if r.state is KeyState.ACTIVE]
            if not pending and self._due(active, now):
                pending = self._generate(now)
                changed = True
        if changed:
            self.on_change()
        if pending:
            await self._promote(pending, active)

    def _due(self, active: list[KeyRecord], now: datetime.datetime) -> bool:
        if not active:
            return True
        if not self.policy.rotate_every:
            return False
        newest = max(r.created for r in active)
        return newest + datetime.timedelta(seconds=self.policy.rotate_every) <= now

    def _generate(self, now: datetime.datetime) -> list[KeyRecord]:
        """A new pending key per KEM (the directory lock is held)."""
        taken = self.directory.taken_ids()
        created = []
        for kem_id in self.policy.kems:
            key = generate_key(
                self.policy.public_name,
                kem_id=kem_id,
                taken_ids=taken,
                maximum_name_length=self.policy.maximum_name_length,
                grease=self.policy.grease,
            )
            taken.add(key.config_id)
            created.append(self.directory.add([key], KeyState.PENDING, now))
        self.log.info(
            "generated pending ECH keys {stems}", stems=", ".join(r.stem for r in created)
        )
        return created

    async def _promote(self, pending: list[KeyRecord], active: list[KeyRecord]) -> None:
        """Publish the pending set; once verified, make it active."""
        config_list = publication_list(
            (key.config for record in pending for key in read_key_file(record.pem)),
            grease=self.policy.grease,
        )
        if self.publisher is not None:
            try:
                await self.publisher.publish(config_list)
                verified = await self._verified(config_list)
            except Exception as error:  # a publisher reports any failure its own way
                verified = False
                self.log.error("ECH key publication failed: {error}", error=str(error))
            if not verified:
                self.publications("failure")
                self.log.error(
                    "new ECH keys are not published; the current keys stay in service "
                    "({stems} keep decrypting)",
                    stems=", ".join(r.stem for r in pending),
                )
                return
            self.publications("success")
            self.log.info(
                "published ECH configs of {stems} in DNS and verified them",
                stems=", ".join(r.stem for r in pending),
            )
        retire_after = self.now() + datetime.timedelta(seconds=self.policy.grace)
        with self.directory.locked():
            for record in self.directory.records():
                if record.state is KeyState.PENDING and record.stem in {p.stem for p in pending}:
                    self.directory.update(record, KeyState.ACTIVE)
                elif record.state is KeyState.ACTIVE:
                    self.directory.update(record, KeyState.RETIRED, retire_after)
        if active:
            self.log.info(
                "ECH keys {new} are active; {old} decrypt until {until}",
                new=", ".join(r.stem for r in pending),
                old=", ".join(r.stem for r in active),
                until=retire_after.isoformat(),
            )
        else:
            self.log.info("ECH keys {new} are active", new=", ".join(r.stem for r in pending))
        self.on_change()

    async def _verified(self, config_list: bytes) -> bool:
        """Ask until the records carry ``config_list``, up to ``verify_timeout``."""
        assert self.publisher is not None
        deadline = self.clock.seconds() + self.policy.verify_timeout
        while True:
            try:
                if await self.publisher.verify(config_list):
                    return True
            except Exception as error:  # a server that cannot be asked right now
                self.log.warn("ECH publication check failed, retrying: {error}", error=str(error))
            if self.clock.seconds() + self.policy.verify_interval > deadline:
                self.log.error("the published ECH configs did not appear in DNS in time")
                return False
            await deferLater(self.clock, self.policy.verify_interval)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _number(text: str) -> bool:
    return text.replace(".", "", 1).isdigit()


def parse_duration(value: object, where: str) -> float:
    """Seconds from a number or a string like ``90s``, ``15m``, ``24h``, ``7d``.

    :raises ConfigError: naming ``where``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like 24h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value[-1:] in _UNITS and _number(value[:-1]):
        seconds = float(value[:-1]) * _UNITS[value[-1]]
    elif isinstance(value, str) and _number(value):
        seconds = float(value)
    else:
        raise ConfigError(f"{where}: expected a duration like 90s, 15m, 24h or 7d")
    if seconds < 0:
        raise ConfigError(f"{where}: must not be negative")
    return seconds
