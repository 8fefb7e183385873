# -*- test-case-name: tests.test_rotation -*-
"""A directory of ECH keys with their lifecycle (RFC 9849 §4.1, §8.1, §10.10.5).

Each key is an RFC 9934 PEM file, ``<stem>.pem``, with a metadata file
``<stem>.json`` beside it: when it was created, its state and, once
retired, until when it must still decrypt.  Both are written atomically
and readable by the owner only.  Every front process (all workers) reads
the directory; changes are made by one writer at a time (the rotation
schedule or the ``echfront keys`` command), under an exclusive lock.

States:

* ``pending``: loaded by every front, so it decrypts, but not published yet:
  keys are loaded everywhere before clients can learn them (checklist
  CFG-10);
* ``active``: published (DNS, origin-svcb, the retry list);
* ``retired``: decrypt-only, for clients that still hold its config from a
  cache, until ``retire_after`` (at least the DNS TTL plus a margin, CFG-5);
  then it is deleted.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from echfront.ech.echconfig import KEM_X25519_HKDF_SHA256
from echfront.ech.keyset import ECHKey
from echfront.errors import ConfigError
from echfront.keys.keyfile import read_key_file, write_key_file

__all__ = ["KeyDirectory", "KeyRecord", "KeyState", "utcnow"]


def utcnow() -> datetime.datetime:
    """The current time, UTC, to the second."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _iso(when: datetime.datetime | None) -> str | None:
    return None if when is None else when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: object, where: str) -> datetime.datetime | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected a time like 2026-01-31T12:00:00Z")
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        raise ConfigError(f"{where}: bad time {text!r}") from None


class KeyState(enum.Enum):
    """Where a key is in its life (see the module docstring)."""

    PENDING = "pending"
    ACTIVE = "active"
    RETIRED = "retired"


@dataclass(frozen=True)
class KeyRecord:
    """One key file and its metadata.

    :ivar stem: the file name without extension, unique in the directory.
    """

    stem: str
    pem: Path
    created: datetime.datetime
    state: KeyState
    retire_after: datetime.datetime | None
    config_ids: tuple[int, ...]
    kem_id: int

    @property
    def metadata_path(self) -> Path:
        """The JSON file beside the PEM file."""
        return self.pem.with_suffix(".json")

    def metadata(self) -> dict[str, object]:
        """The JSON document for this record."""
        return {
            "created": _iso(self.created),
            "state": self.state.value,
            "retire_after": _iso(self.retire_after),
            "config_ids": list(self.config_ids),
            "kem_id": self.kem_id,
        }


class KeyDirectory:
    """The keys of one deployment, in one directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        """Use ``path`` (created, mode 0700, when missing)."""
        self.path = path

    def _ensure(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as error:
            raise ConfigError(
                f"{self.path}: cannot create key directory ({error.strerror})"
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's writer lock (``.lock``; other writers wait)."""
        self._ensure()
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def records(self) -> list[KeyRecord]:
        """Every key in the directory, oldest first.

        :raises ConfigError: for a metadata file that does not parse.
        """
        if not self.path.is_dir():
            return []
        found = []
        for meta in sorted(self.path.glob("*.json")):
            pem = meta.with_suffix(".pem")
            where = str(meta)
            try:
                data = json.loads(meta.read_text())
            except (OSError, ValueError) as error:
                raise ConfigError(f"{where}: unreadable key metadata ({error})") from None
            if not isinstance(data, dict) or not pem.exists():
                raise ConfigError(f"{where}: metadata without its key file {pem.name}")
            try:
                state = KeyState(data.get("state"))
            except ValueError:
                raise ConfigError(f"{where}: unknown state {data.get('state')!r}") from None
            created = _parse_time(data.get("created"), f"{where}: created")
            if created is None:
                raise ConfigError(f"{where}: created is missing")
            ids = data.get("config_ids", [])
            kem = data.get("kem_id", KEM_X25519_HKDF_SHA256)
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise ConfigError(f"{where}: config_ids must be a list of numbers")
            if not isinstance(kem, int):
                raise ConfigError(f"{where}: kem_id must be a number")
            found.append(
                KeyRecord(
                    stem=meta.stem,
                    pem=pem,
                    created=created,
                    state=state,
                    retire_after=_parse_time(data.get("retire_after"), f"{where}: retire_after"),
                    config_ids=tuple(ids),
                    kem_id=kem,
                )
            )
        found.sort(key=lambda r: (r.created, r.stem))
        return found

    def load_keys(self) -> list[ECHKey]:
        """Loaded keys with their role: active ones published, the rest decrypt-only."""
        loaded: list[ECHKey] = []
        for record in self.records():
            published = record.state is KeyState.ACTIVE
            loaded.extend(read_key_file(record.pem, published=published))
        return loaded

    def add(
        self, keys: Sequence[ECHKey], state: KeyState, now: datetime.datetime | None = None
    ) -> KeyRecord:
        """Write a new key (one private key, its configs) with ``state``."""
        self._ensure()
        when = now or utcnow()
        ids = tuple(k.config_id for k in keys)
        stem = f"ech-{when.strftime('%Y%m%dT%H%M%SZ')}-{ids[0]:03d}"
        record = KeyRecord(
            stem=stem,
            pem=self.path / f"{stem}.pem",
            created=when,
            state=state,
            retire_after=None,
            config_ids=ids,
            kem_id=keys[0].config.kem_id,
        )
        write_key_file(record.pem, keys)
        self._write_metadata(record)
        return record

    def update(
        self, record: KeyRecord, state: KeyState, retire_after: datetime.datetime | None = None
    ) -> KeyRecord:
        """Change a key's state (and retirement time)."""
        changed = replace(record, state=state, retire_after=retire_after)
        self._write_metadata(changed)
        return changed

    def delete(self, record: KeyRecord) -> None:
        """Remove a key and its metadata (metadata first: a half-deleted key is ignored)."""
        for path in (record.metadata_path, record.pem):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def taken_ids(self) -> set[int]:
        """config_ids of every key in the directory."""
        return {i for r in self.records() for i in r.config_ids}

    def _write_metadata(self, record: KeyRecord) -> None:
        data = json.dumps(record.metadata(), indent=2).encode() + b"\n"
        fd, temp = tempfile.mkstemp(prefix=".meta-", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, record.metadata_path)
        except OSError as error:
            Path(temp).unlink(missing_ok=True)
            raise ConfigError(f"{record.metadata_path}: cannot write ({error.strerror})") from None
