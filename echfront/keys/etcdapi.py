# -*- test-case-name: tests.test_etcd -*-
"""The JSON forms of etcd's v3 gRPC gateway: settings, errors, key-values, transactions.

The gateway (etcd 3.4 and later, under ``/v3/`` on the client port) speaks
proto3 JSON: bytes are base64, 64-bit integers are decimal strings, and
fields at their default value (0, false, empty, the first enum value such
as a PUT event's type) are left out.  This module turns those forms into
typed values and back; :mod:`echfront.keys.etcd` sends them.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echfront.errors import ConfigError
from echfront.keys.stores import KeyStoreError

__all__ = [
    "DEADLINE_EXCEEDED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "EtcdError",
    "EtcdSettings",
    "EtcdUnavailable",
    "KeyValue",
    "TxnResult",
    "b64",
    "compare_create",
    "compare_mod",
    "delete_op",
    "error_from_answer",
    "header_revision",
    "prefix_end",
    "put_op",
    "range_op",
    "unb64",
]

#: gRPC status codes etcd returns (google.golang.org/grpc/codes).
UNAVAILABLE = 14
UNAUTHENTICATED = 16
DEADLINE_EXCEEDED = 4


class EtcdError(KeyStoreError):
    """etcd refused a request; ``code`` is its gRPC status code (0 when unknown)."""

    def __init__(self, message: str, code: int = 0) -> None:
        """One line: ``message``."""
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered (refused, timed out, cut off, no leader)."""


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach an etcd cluster (``[keys] store = "etcd"``).

    :ivar endpoints: client URLs, ``http://`` or ``https://`` host:port.
    :ivar prefix: every key the store writes starts with it.
    :ivar ca_file: PEM CA certificates to verify the servers with (default:
        the system's trust store).
    :ivar cert_file: PEM client certificate (with ``key_file``), for
        etcd's ``--client-cert-auth``.  With authentication enabled too,
        the gateway refuses a certificate that has a CommonName (etcd would
        not use it for the gateway): use one with a SAN only, and a user.
    :ivar username: etcd user (with ``password``), when auth is enabled.
    :ivar timeout: seconds one request may take on one endpoint.
    """

    endpoints: tuple[str, ...]
    prefix: str = "/echfront/"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 5.0

    def __post_init__(self) -> None:
        """Check what can be checked without the network."""
        if not self.endpoints:
            raise ConfigError("etcd: at least one endpoint is required")
        for url in self.endpoints:
            if not url.startswith(("http://", "https://")) or url.count(":") != 2:
                raise ConfigError(f"etcd endpoint {url!r}: expected http(s)://host:port")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("etcd: a client certificate needs both cert and key files")
        if (self.username is None) != (self.password is None):
            raise ConfigError("etcd: user and password go together")
        if not self.prefix:
            raise ConfigError("etcd: the key prefix must not be empty")


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd returns it (mvccpb.KeyValue)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyValue:
        """Decode the gateway's JSON form."""
        return cls(
            key=unb64(data.get("key", "")),
            value=unb64(data.get("value", "")),
            create_revision=int(data.get("create_revision", 0)),
            mod_revision=int(data.get("mod_revision", 0)),
            version=int(data.get("version", 0)),
            lease=int(data.get("lease", 0)),
        )


@dataclass(frozen=True)
class TxnResult:
    """What a transaction did: which branch ran, at what revision, with which answers."""

    succeeded: bool
    revision: int
    responses: tuple[Mapping[str, Any], ...]

    def ranges(self) -> list[list[KeyValue]]:
        """The key-values of each ``request_range`` answer, in order."""
        found = []
        for response in self.responses:
            if "response_range" in response:
                kvs = response["response_range"].get("kvs", [])
                found.append([KeyValue.from_json(kv) for kv in kvs])
        return found


def b64(data: bytes) -> str:
    """Bytes as the gateway takes them (base64)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Bytes from the gateway's base64."""
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with ``prefix`` (etcd's convention)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"  # every key
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def compare_create(key: bytes, revision: int) -> dict[str, Any]:
    """Txn condition: ``key`` was created at ``revision`` (0: it does not exist)."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": revision}


def compare_mod(key: bytes, revision: int) -> dict[str, Any]:
    """Txn condition: ``key`` was last modified at ``revision``."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision}


def put_op(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    """Txn operation: put ``value`` at ``key`` (attached to ``lease`` when not 0)."""
    request: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        request["lease"] = lease
    return {"request_put": request}


def delete_op(key: bytes) -> dict[str, Any]:
    """Txn operation: delete ``key``."""
    return {"request_delete_range": {"key": b64(key)}}


def range_op(key: bytes, range_end: bytes = b"") -> dict[str, Any]:
    """Txn operation: read ``key`` (or ``[key, range_end)``)."""
    request = {"key": b64(key)}
    if range_end:
        request["range_end"] = b64(range_end)
    return {"request_range": request}


def header_revision(answer: Mapping[str, Any]) -> int:
    """The store revision in an answer's header."""
    return int(answer.get("header", {}).get("revision", 0))


def error_from_answer(endpoint: str, answer: Mapping[str, Any], status: int) -> EtcdError:
    """The error for a refusal (unary: flat fields; streams: nested under ``error``)."""
    detail = answer.get("error")
    if isinstance(detail, dict):
        message = str(detail.get("message", "unknown error"))
        code = int(detail.get("grpc_code", 0))
    else:
        message = str(answer.get("message") or detail or f"HTTP {status}")
        code = int(answer.get("code", 0))
    text = f"etcd {endpoint}: {message}"
    if code in (UNAVAILABLE, DEADLINE_EXCEEDED) or status == 503:
        return EtcdUnavailable(text, code or UNAVAILABLE)
    return EtcdError(text, code)
