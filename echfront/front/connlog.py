# -*- test-case-name: tests.test_logs -*-
"""The connection log line: built when it is written, emitted in batches.

Every connection ends with one ``twisted.logger`` event in the namespace
``echfront.connection`` (fields: :func:`~echfront.front.connection.connection_event_fields`,
documented in docs/operations.rst).  Building that event and passing it
through the log system cost a large share of a short connection's CPU,
so a closing connection only appends its record (final once closed) to a
:class:`ConnectionLog`; the events are built and published together:

* after :attr:`ConnectionLog.FLUSH_SECONDS`, or once :attr:`~ConnectionLog.MAX_BATCH`
  records wait;
* at once when the front has no open connection left (so an idle front,
  and a test, has nothing waiting and no timer running);
* at reactor shutdown.

Nothing is dropped: every added record is emitted exactly once, in order,
with the wall-clock time of its close as ``log_time``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger, LogLevel

from echfront.front.connection import CONNECTION_EVENT, CONNECTION_FIELDS, connection_event_fields

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime
    from twisted.logger import ILogObserver

    from echfront.front.connection import ConnectionRecord

__all__ = ["ConnectionLog", "emit_connection"]

#: The logger whose namespace and observer connection events use.
_log = Logger(namespace="echfront.connection")
_FORMAT = "connection {text}"
#: The event's text: every field as name=value, in CONNECTION_FIELDS order,
#: rendered by one str.format_map call (the optional server name last).
_TEXT = " ".join(f"{name}={{{name}}}" for name in CONNECTION_FIELDS if name != "server_name")
_SERVER_NAME = " server_name={server_name}"


def emit_connection(
    record: ConnectionRecord,
    now: float,
    *,
    log_server_names: bool,
    log_time: float | None = None,
    observer: ILogObserver | None = None,
) -> None:
    """Emit one connection's event (level info) to ``observer`` (the global publisher).

    :param now: the reactor's seconds at close (for ``duration``).
    :param log_time: the wall-clock time of the close (now, by default).
    """
    fields = connection_event_fields(record, now, log_server_names=log_server_names)
    # Rendered here once: a format string with a dozen fields would be parsed
    # again by every text observer, for every connection.
    text = _TEXT.format_map(fields)
    if "server_name" in fields:
        text += _SERVER_NAME.format_map(fields)
    event: dict[str, Any] = fields
    event.update(
        text=text,
        log_logger=_log,
        log_level=LogLevel.info,
        log_namespace=_log.namespace,
        log_source=None,
        log_format=_FORMAT,
        log_time=time.time() if log_time is None else log_time,
    )
    event[CONNECTION_EVENT] = True
    (observer or _log.observer)(event)


class ConnectionLog:
    """Collects closed connections' records and emits their events in batches.

    :param clock: for the flush timer, and (when it provides ``IReactorCore``)
        the flush at shutdown.
    :param observer: where events go (default: the global log publisher).
    """

    FLUSH_SECONDS = 0.2
    MAX_BATCH = 512

    def __init__(self, clock: IReactorTime, observer: ILogObserver | None = None) -> None:
        """Emit through ``observer`` on ``clock``'s timers."""
        self._clock = clock
        self._observer = observer
        self._batch: list[tuple[ConnectionRecord, float, float, bool]] = []
        self._timer: IDelayedCall | None = None
        if IReactorCore.providedBy(clock):
            clock.addSystemEventTrigger("after", "shutdown", self.flush)

    def add(self, record: ConnectionRecord, now: float, *, log_server_names: bool) -> None:
        """Queue the event of a connection that closed at ``now`` (reactor seconds)."""
        batch = self._batch
        batch.append((record, now, time.time(), log_server_names))
        if len(batch) >= self.MAX_BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self.FLUSH_SECONDS, self._due)

    def __len__(self) -> int:
        """Events waiting."""
        return len(self._batch)

    def _due(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Emit every waiting event now, in the order the connections closed."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        observer = self._observer
        for record, now, wall, names in batch:
            emit_connection(record, now, log_server_names=names, log_time=wall, observer=observer)
