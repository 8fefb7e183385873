# -*- test-case-name: tests.test_logs -*-
"""Logging: one structured event per connection, and a JSON observer.

Every connection ends with one ``twisted.logger`` event in the namespace
``echfront.connection`` carrying these fields (documented in
docs/operations.rst):

``peer``, ``route``, ``ech`` (accepted, rejected, not_offered, error),
``config_id``, ``alert``, ``hrr``, ``bytes_from_client``,
``bytes_to_client``, ``first_flight_bytes``, ``duration``, ``close_reason``,
``zero_copy`` (the relay used splice(2)), ``worker`` and, only when
allowed, ``server_name``.  A QUIC flow's event (echfront.front.datagram)
has the same fields and ``transport`` (``quic``).

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


#: The format of a connection event (echfront.front.connlog): its text is
#: pre-rendered in the ``text`` field, so it needs no format parsing.
_CONNECTION_FORMAT = "connection {text}"


def _connection_text(event: dict[str, Any]) -> str | None:
    """A connection event's message (its text is pre-rendered), else None."""
    text = event.get("text")
    if (
        event.get(CONNECTION_EVENT)
        and event.get("log_format") == _CONNECTION_FORMAT
        and isinstance(text, str)
    ):
        return "connection " + text
    return None


def _event_text(event: dict[str, Any]) -> str:
    """The event's message, as ``twisted.logger.formatEvent`` renders it."""
    text = _connection_text(event)
    return formatEvent(event) if text is None else text


def _level_name(event: dict[str, Any]) -> str:
    level = event.get("log_level")
    return level.name if isinstance(level, type(LogLevel.info)) else "info"


_json_time_cache: list[Any] = [-1, ""]


def _json_event(event: dict[str, Any]) -> str:
    """One log event as one JSON line."""
    when = int(event.get("log_time", time.time()))
    if when != _json_time_cache[0]:
        _json_time_cache[:] = [when, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))]
    record: dict[str, Any] = {
        "time": _json_time_cache[1],
        "level": _level_name(event),
        "namespace": event.get("log_namespace", ""),
        "text": _event_text(event),
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
    text = _connection_text(event)
    if text is not None and event.get("log_level") is LogLevel.info:
        # A connection's line (one per connection): it has no failure, and
        # its level is known.
        text = text.replace("\n", "\n\t")
        return f"{_time_cache[1]} [{event.get('log_namespace', '-')}#info] {text}\n"
    level_name = _level_name(event)
    text = _event_text(event).replace("\n", "\n\t")
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n\t" + failure.getTraceback().rstrip().replace("\n", "\n\t")
    return f"{_time_cache[1]} [{event.get('log_namespace', '-')}#{level_name}] {text}\n"


#: Levels written at once rather than batched.
_URGENT = frozenset((LogLevel.error, LogLevel.critical))


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
        #: Set by the flush at shutdown: from then on every event is written
        #: at once (no timer would run again).
        self._stopped = False

    def __call__(self, event: dict[str, Any]) -> None:
        """Buffer one event; flush when due."""
        line = self._format(event)
        self._lines.append(line)
        self._size += len(line)
        urgent = event.get("log_level") in _URGENT
        if urgent or self._stopped or self._size >= self.FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as installed  # noqa: PLC0415 (installed late)

            reactor = self._reactor = installed
        if not self._shutdown_hooked and IReactorCore.providedBy(reactor):
            reactor.addSystemEventTrigger("after", "shutdown", self._final_flush)
            self._shutdown_hooked = True
        self._timer = reactor.callLater(self.FLUSH_SECONDS, self.flush)

    def _final_flush(self) -> None:
        # Events may still come after this (other shutdown triggers emit
        # theirs, e.g. the connection log's last batch): they are written at once.
        self._stopped = True
        self.flush()

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
