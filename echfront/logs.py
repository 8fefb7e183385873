# -*- test-case-name: tests.test_logs -*-
"""Logging: one structured event per connection, and a JSON observer.

Every connection ends with one ``twisted.logger`` event in the namespace
``echfront.connection`` carrying these fields (documented in
docs/operations.rst):

``peer``, ``route``, ``ech`` (accepted, rejected, not_offered, error),
``config_id``, ``alert``, ``hrr``, ``bytes_from_client``,
``bytes_to_client``, ``first_flight_bytes``, ``duration``, ``close_reason``,
``worker`` and, only when allowed, ``server_name``.

Privacy by default: the server name of an ECH-accepted connection is the
secret ECH protects, so it is logged only with ``[log] server_names =
true``.  Names the client sent in the clear (no ECH, or ECH rejected) are
visible on the wire anyway and are logged.  Keys never reach a log: no
event carries key material, and key objects do not print it.

``twistd --logger=echfront.logs.json_observer`` writes every event, these
and Twisted's own, as one JSON object per line on standard output.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from twisted.logger import FileLogObserver, Logger, LogLevel, formatEvent

from echfront.decoder import ECHStatus

if TYPE_CHECKING:
    from echfront.front import ConnectionRecord

__all__ = ["CONNECTION_FIELDS", "connection_event_fields", "json_observer", "log_connection"]

_log = Logger(namespace="echfront.connection")

#: The fields of a connection event, in the order the text form shows them.
CONNECTION_FIELDS = (
    "peer",
    "route",
    "ech",
    "config_id",
    "alert",
    "hrr",
    "bytes_from_client",
    "bytes_to_client",
    "first_flight_bytes",
    "duration",
    "close_reason",
    "worker",
    "server_name",
)


def connection_event_fields(
    record: ConnectionRecord, now: float, *, log_server_names: bool
) -> dict[str, Any]:
    """The fields of one connection's event (see the module docstring)."""
    info = record.info
    fields: dict[str, Any] = {
        "peer": record.peer,
        "route": record.route or "none",
        "ech": "error" if info is None else info.status.value,
        "config_id": None if info is None else info.config_id,
        "alert": None if record.alert is None else record.alert.name.lower(),
        "hrr": record.hello_retry,
        "bytes_from_client": record.bytes_from_client,
        "bytes_to_client": record.bytes_to_client,
        "first_flight_bytes": record.first_flight_bytes,
        "duration": round(now - record.started, 6),
        "close_reason": record.close_reason,
        "worker": os.getpid(),
    }
    if info is not None and (log_server_names or info.status is not ECHStatus.ACCEPTED):
        fields["server_name"] = info.server_name
    return fields


def log_connection(record: ConnectionRecord, now: float, *, log_server_names: bool) -> None:
    """Emit the connection's event (level info); ``now`` is on the record's clock."""
    fields = connection_event_fields(record, now, log_server_names=log_server_names)
    text = " ".join(f"{name}={{{name}}}" for name in CONNECTION_FIELDS if name in fields)
    _log.info("connection " + text, echfront_connection=True, **fields)


_SKIP = frozenset(
    (
        "log_logger",
        "log_source",
        "log_format",
        "log_io",
        "log_time",
        "log_level",
        "log_namespace",
        "log_trace",
        "log_failure",
        "log_text",
        "log_flattened",
        "message",
        "format",
        "system",
        "isError",
        "echfront_connection",
    )
)


def _json_event(event: dict[str, Any]) -> str:
    """One log event as one JSON line."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
        + "Z",
        "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
        "namespace": event.get("log_namespace", ""),
        "text": formatEvent(event),
    }
    if event.get("echfront_connection"):
        record.update((k, v) for k, v in event.items() if k not in _SKIP)
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getErrorMessage()
    return json.dumps(record, default=str) + "\n"


def json_observer(stream: IO[str] | None = None) -> FileLogObserver:
    """A log observer writing JSON lines (use with ``twistd --logger=``)."""
    return FileLogObserver(stream if stream is not None else sys.stdout, _json_event)
