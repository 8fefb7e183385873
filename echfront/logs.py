# -*- test-case-name: tests.test_logs -*-
"""Logging: one structured event per connection, and a JSON observer.

Every connection ends with one ``twisted.logger`` event in the namespace
``echfront.connection`` carrying these fields (documented in
docs/operations.rst):

``peer``, ``route``, ``ech`` (accepted, rejected, not_offered, error),
``config_id``, ``alert``, ``hrr``, ``bytes_from_client``,
``bytes_to_client``, ``first_flight_bytes``, ``duration``, ``close_reason``,
``zero_copy`` (the relay used splice(2)), ``worker`` and, only when
allowed, ``server_name``.

Privacy by default: the server name of an ECH-accepted connection is the
secret ECH protects, so it is logged only with ``[log] server_names =
true``.  Names the client sent in the clear (no ECH, or ECH rejected) are
visible on the wire anyway and are logged.  Keys never reach a log: no
event carries key material, and key objects do not print it.

``twistd --logger=echfront.logs.json_observer`` writes every event, these
and Twisted's own, as one JSON object per line on standard output;
``twistd --logger=echfront.logs.text_observer`` writes the usual text lines.
Both buffer: twistd's default observer flushes a write per event, which at
thousands of connections per second is a large share of the front's CPU;
these flush at most every half second (and at 64 KiB, at every error, and
at shutdown), so a line is late by at most that much.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from zope.interface import implementer

from echfront.ech.decoder import ECHStatus

if TYPE_CHECKING:
    from echfront.front.protocol import ConnectionRecord

__all__ = [
    "CONNECTION_FIELDS",
    "BufferedFileLogObserver",
    "connection_event_fields",
    "json_observer",
    "log_connection",
    "text_observer",
]

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
    "zero_copy",
    "worker",
    "server_name",
)


def connection_event_fields(
    record: ConnectionRecord, now: float, *, log_server_names: bool
) -> dict[str, Any]:
    """The fields of one connection's event (see the module docstring)."""
    info = record.hello
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
        "zero_copy": record.zero_copy,
        "worker": os.getpid(),
    }
    if info is not None and (log_server_names or info.status is not ECHStatus.ACCEPTED):
        fields["server_name"] = info.server_name
    return fields


def log_connection(record: ConnectionRecord, now: float, *, log_server_names: bool) -> None:
    """Emit the connection's event (level info); ``now`` is on the record's clock."""
    fields = connection_event_fields(record, now, log_server_names=log_server_names)
    # Rendered here once: a format string with a dozen fields would be parsed
    # again by every text observer, for every connection.
    text = " ".join(f"{name}={fields[name]}" for name in CONNECTION_FIELDS if name in fields)
    _log.info("connection {text}", text=text, echfront_connection=True, **fields)


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
        "text",
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


_time_cache: list[Any] = [-1, ""]


def _text_event(event: dict[str, Any]) -> str:
    """One log event as a text line: ``<UTC time> [<namespace>#<level>] <text>``."""
    when = int(event.get("log_time", time.time()))
    if when != _time_cache[0]:
        _time_cache[:] = [when, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))]
    level = event.get("log_level")
    level_name = level.name if isinstance(level, type(LogLevel.info)) else "info"
    text = formatEvent(event).replace("\n", "\n\t")
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n\t" + failure.getTraceback().rstrip().replace("\n", "\n\t")
    return f"{_time_cache[1]} [{event.get('log_namespace', '-')}#{level_name}] {text}\n"


@implementer(ILogObserver)
class BufferedFileLogObserver:
    """Write formatted events to a stream in batches (see the module docstring).

    :param clock: the reactor, for the flush timer; the global one if None
        (observers are made by twistd before any service exists).
    """

    FLUSH_SECONDS = 0.5
    FLUSH_BYTES = 64 * 1024

    def __init__(
        self,
        stream: IO[str],
        format_event: Callable[[dict[str, Any]], str],
        clock: Any = None,
    ) -> None:
        """Format with ``format_event`` and write to ``stream``."""
        self._stream = stream
        self._format = format_event
        self._clock = clock
        self._lines: list[str] = []
        self._size = 0
        self._timer: Any = None
        self._shutdown_hooked = False

    def __call__(self, event: dict[str, Any]) -> None:
        """Buffer one event; flush when due."""
        line = self._format(event)
        self._lines.append(line)
        self._size += len(line)
        level = event.get("log_level")
        urgent = level is not None and level >= LogLevel.error
        if urgent or self._size >= self.FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor  # noqa: PLC0415 (installed after observers)

            clock = self._clock = reactor
        if not self._shutdown_hooked and hasattr(clock, "addSystemEventTrigger"):
            clock.addSystemEventTrigger("after", "shutdown", self.flush)
            self._shutdown_hooked = True
        self._timer = clock.callLater(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write everything buffered."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._lines:
            self._stream.write("".join(self._lines))
            self._lines.clear()
            self._size = 0
            self._stream.flush()


def json_observer(stream: IO[str] | None = None) -> BufferedFileLogObserver:
    """A log observer writing JSON lines (use with ``twistd --logger=``)."""
    return BufferedFileLogObserver(stream if stream is not None else sys.stdout, _json_event)


def text_observer(stream: IO[str] | None = None) -> BufferedFileLogObserver:
    """A log observer writing text lines, buffered (use with ``twistd --logger=``)."""
    return BufferedFileLogObserver(stream if stream is not None else sys.stdout, _text_event)
