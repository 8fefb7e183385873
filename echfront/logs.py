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

The front emits the event (:func:`echfront.front.protocol.log_connection`)
with the fields of :func:`echfront.front.connection.connection_event_fields`;
this module only writes events out.

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
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorCore
from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

from echfront.front.connection import CONNECTION_EVENT

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = [
    "BufferedFileLogObserver",
    "json_observer",
    "text_observer",
]

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
        CONNECTION_EVENT,
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
    if event.get(CONNECTION_EVENT):
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

    :param reactor: for the flush timer (and, when it provides
        ``IReactorCore``, the flush at shutdown); the global reactor if None
        (observers are made by twistd before any reactor is installed).
    """

    FLUSH_SECONDS = 0.5
    FLUSH_BYTES = 64 * 1024

    def __init__(
        self,
        stream: IO[str],
        format_event: Callable[[dict[str, Any]], str],
        reactor: IReactorTime | None = None,
    ) -> None:
        """Format with ``format_event`` and write to ``stream``."""
        self._stream = stream
        self._format = format_event
        self._reactor = reactor
        self._lines: list[str] = []
        self._size = 0
        self._timer: IDelayedCall | None = None
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
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as installed  # noqa: PLC0415 (installed late)

            reactor = self._reactor = installed
        if not self._shutdown_hooked and IReactorCore.providedBy(reactor):
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)
            self._shutdown_hooked = True
        self._timer = reactor.callLater(self.FLUSH_SECONDS, self.flush)

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
