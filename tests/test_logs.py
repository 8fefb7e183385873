# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""Connection logging (echfront.logs): fields, privacy, JSON lines, no key material.

One ``echfront.connection`` event per connection, with the documented
fields; the inner server name of an ECH-accepted connection appears only
with ``log_server_names``; :func:`json_observer` writes one parseable JSON
object per line; and neither key objects nor log output ever show a private
key.
"""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent

from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus, HelloSummary
from echfront.ech.echconfig import KEM_MLKEM768_X25519
from echfront.ech.keyset import ECHKey, KeySet, generate_key
from echfront.errors import AlertDescription
from echfront.front.connection import CONNECTION_FIELDS, ConnectionRecord, connection_event_fields
from echfront.front.protocol import log_connection
from echfront.front.state import FrontSettings
from echfront.keys.keyfile import dump_pem
from echfront.logs import BufferedFileLogObserver, json_observer, text_observer
from tests.echhello import grease_extension, read_flight, seal_hello
from tests.test_front import KEY, SECRET_NAME, FrontTestCase
from tests.twistedhelpers import CLIENT_ADDRESS, RecordingServer, alert, plain_hello

PUBLIC_NAME = "public.example"


def decoded(records: bytes) -> ClientHelloInfo:
    return ECHDecoder(KeySet([KEY])).decode(read_flight(records))


def accepted() -> ClientHelloInfo:
    info = decoded(seal_hello(KEY.config).records)
    assert info.status is ECHStatus.ACCEPTED
    return info


def rejected() -> ClientHelloInfo:
    info = decoded(seal_hello(KEY.config, ech_extension=grease_extension()).records)
    assert info.status is ECHStatus.REJECTED
    return info


def record(info: ClientHelloInfo | HelloSummary | None, **fields: Any) -> ConnectionRecord:
    hello = info.summary if isinstance(info, ClientHelloInfo) else info
    return ConnectionRecord(started=100.0, peer="192.0.2.7:50123", hello=hello, **fields)


# -- fields -------------------------------------------------------------------------


def test_fields_of_an_accepted_connection() -> None:
    rec = record(
        accepted(),
        route="app",
        close_reason="backend closed",
        first_flight_bytes=517,
        hello_retry=True,
        bytes_from_client=1200,
        bytes_to_client=34000,
    )
    fields = connection_event_fields(rec, 102.5000004, log_server_names=False)
    assert fields == {
        "peer": "192.0.2.7:50123",
        "route": "app",
        "ech": "accepted",
        "config_id": KEY.config_id,
        "alert": None,
        "hrr": True,
        "bytes_from_client": 1200,
        "bytes_to_client": 34000,
        "first_flight_bytes": 517,
        "duration": 2.5,
        "close_reason": "backend closed",
        "zero_copy": False,
        "worker": os.getpid(),
    }


def test_fields_of_a_refused_connection_before_decoding() -> None:
    rec = record(None, alert=AlertDescription.UNEXPECTED_MESSAGE, close_reason="not TLS")
    fields = connection_event_fields(rec, 100.25, log_server_names=True)
    assert fields["ech"] == "error"
    assert fields["config_id"] is None
    assert fields["alert"] == "unexpected_message"
    assert fields["route"] == "none"
    assert fields["duration"] == 0.25
    assert "server_name" not in fields  # nothing was decoded: no name to show


@pytest.mark.parametrize("log_server_names", [False, True])
def test_accepted_inner_name_only_when_allowed(log_server_names: bool) -> None:
    fields = connection_event_fields(record(accepted()), 101.0, log_server_names=log_server_names)
    if log_server_names:
        assert fields["server_name"] == SECRET_NAME
    else:
        assert "server_name" not in fields
        assert SECRET_NAME not in repr(fields)


@pytest.mark.parametrize("log_server_names", [False, True])
def test_names_sent_in_the_clear_are_logged(log_server_names: bool) -> None:
    # Rejected ECH routes by the outer (public) name; no ECH by the only name.
    fields = connection_event_fields(record(rejected()), 101, log_server_names=log_server_names)
    assert fields["ech"] == "rejected"
    assert fields["config_id"] == 0xA7
    assert fields["server_name"] == PUBLIC_NAME
    plain = decoded(plain_hello("plain.example"))
    fields = connection_event_fields(record(plain), 101, log_server_names=log_server_names)
    assert fields["ech"] == "not_offered"
    assert fields["config_id"] is None
    assert fields["server_name"] == "plain.example"


def test_field_order_is_the_documented_one() -> None:
    fields = connection_event_fields(record(rejected()), 101, log_server_names=False)
    assert tuple(fields) == CONNECTION_FIELDS


# -- the event ------------------------------------------------------------------------


def test_log_connection_emits_one_info_event_in_its_namespace() -> None:
    rec = record(accepted(), route="app", bytes_from_client=5, bytes_to_client=6)
    with capturedLogs() as events:
        log_connection(rec, 103.0, log_server_names=False)
    assert len(events) == 1
    (event,) = events
    assert event["log_namespace"] == "echfront.connection"
    assert event["log_level"] is LogLevel.info
    assert event["echfront_connection"] is True
    for name, value in connection_event_fields(rec, 103.0, log_server_names=False).items():
        assert event[name] == value
    assert "server_name" not in event
    text = formatEvent(event)
    assert text == (
        f"connection peer=192.0.2.7:50123 route=app ech=accepted config_id={KEY.config_id} "
        f"alert=None hrr=False bytes_from_client=5 bytes_to_client=6 first_flight_bytes=0 "
        f"duration=3.0 close_reason= zero_copy=False worker={os.getpid()}"
    )
    assert SECRET_NAME not in text


def test_log_connection_text_names_the_server_when_allowed() -> None:
    with capturedLogs() as events:
        log_connection(record(accepted()), 101.0, log_server_names=True)
    assert formatEvent(events[0]).endswith(f" server_name={SECRET_NAME}")


def test_braces_in_a_value_do_not_break_formatting() -> None:
    # Hello parsing refuses such names; the log format must not depend on it.
    info = decoded(plain_hello()).summary._replace(server_name="x{peer}y.example")
    with capturedLogs() as events:
        log_connection(record(info), 101.0, log_server_names=False)
    assert formatEvent(events[0]).endswith(" server_name=x{peer}y.example")


class FrontLoggingTests(FrontTestCase):
    """The front logs each connection once, when it closes."""

    def run_one(self, settings: FrontSettings, records: bytes) -> list[dict[str, Any]]:
        factory = self.make_factory(self.to_backend(), settings=settings)
        front = factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        with capturedLogs() as events:
            pipe = self.net.connect(RecordingServer(), front)
            pipe.client.write(records)
            self.net.flush()
            self.net.complete_backend(self.clock)
            self.net.flush()
            self.clock.advance(1.5)
            pipe.client.write(b"\x17\x03\x03\x00\x01x")
            self.net.flush()
            pipe.client.loseConnection()
            self.net.flush()
        return [e for e in events if e.get("log_namespace") == "echfront.connection"]

    def test_one_event_without_the_inner_name_by_default(self) -> None:
        sealed = seal_hello(KEY.config)
        (event,) = self.run_one(FrontSettings(), sealed.records)
        self.assertEqual(event["ech"], "accepted")
        self.assertEqual(event["route"], "be")
        self.assertEqual(event["peer"], "192.0.2.7:50123")
        self.assertEqual(event["first_flight_bytes"], len(sealed.records))
        self.assertEqual(event["bytes_from_client"], 6)
        self.assertEqual(event["duration"], 1.5)
        self.assertNotIn("server_name", event)
        self.assertNotIn(SECRET_NAME, formatEvent(event))

    def test_inner_name_with_log_server_names(self) -> None:
        (event,) = self.run_one(
            FrontSettings(log_server_names=True), seal_hello(KEY.config).records
        )
        self.assertEqual(event["server_name"], SECRET_NAME)

    def test_refused_connection_is_logged_with_its_alert(self) -> None:
        factory = self.make_factory(self.to_backend())
        with capturedLogs() as events:
            front = factory.buildProtocol(CLIENT_ADDRESS)
            assert front is not None
            pipe = self.net.connect(RecordingServer(), front)
            pipe.client.write(b"GET / HTTP/1.0\r\n\r\n")
            self.net.flush()
        self.assertEqual(bytes(pipe.client.received), alert(10))
        (event,) = [e for e in events if e.get("log_namespace") == "echfront.connection"]
        self.assertEqual(event["ech"], "error")
        self.assertEqual(event["alert"], "unexpected_message")


# -- JSON lines -------------------------------------------------------------------------


def test_json_observer_writes_connection_fields() -> None:
    stream = io.StringIO()
    observer = json_observer(stream)
    rec = record(rejected(), route="public", bytes_to_client=99, close_reason="done")
    with capturedLogs() as events:
        log_connection(rec, 100.5, log_server_names=False)
    observer(events[0])
    observer.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["level"] == "info"
    assert obj["namespace"] == "echfront.connection"
    assert obj["text"] == formatEvent(events[0])
    assert obj["text"].startswith("connection peer=192.0.2.7:50123 route=public ech=rejected ")
    assert obj["time"].endswith("Z") and obj["time"][10] == "T"
    expected = connection_event_fields(rec, 100.5, log_server_names=False)
    assert {k: obj[k] for k in expected} == expected
    # Nothing of the logging machinery leaks into the object.
    assert set(obj) == {"time", "level", "namespace", "text", *expected}


def test_json_observer_one_line_per_event_for_any_event() -> None:
    stream = io.StringIO()
    observer = json_observer(stream)
    log = Logger(namespace="some.module", observer=observer)
    log.warn("multi\nline {thing}", thing={"a": 1})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it broke")
    log.info("with an object {obj}", obj=object())
    observer.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["level"] == "warn"
    assert first["namespace"] == "some.module"
    assert first["text"] == "multi\nline {'a': 1}"
    assert "thing" not in first  # only connection events carry their fields
    assert second["level"] == "critical"
    assert second["failure"] == "division by zero"
    assert third["text"].startswith("with an object <object object at ")


def test_json_observer_defaults_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    observer = json_observer()
    Logger(namespace="x", observer=observer).error("hello")  # errors are written at once
    assert json.loads(capsys.readouterr().out)["text"] == "hello"


def test_text_observer_lines() -> None:
    stream = io.StringIO()
    observer = text_observer(stream)
    with capturedLogs() as events:
        log_connection(record(accepted()), 101.0, log_server_names=False)
    observer(events[0])
    observer.flush()
    (line,) = stream.getvalue().splitlines()
    when, namespace, text = line.split(" ", 2)
    assert when.endswith("Z") and when[10] == "T"
    assert namespace == "[echfront.connection#info]"
    assert text == formatEvent(events[0])
    assert SECRET_NAME not in line


def test_text_observer_continues_a_multi_line_close_reason_with_a_tab() -> None:
    stream = io.StringIO()
    observer = text_observer(stream)
    with capturedLogs() as events:
        log_connection(record(accepted(), close_reason="one\ntwo"), 101.0, log_server_names=False)
    observer(events[0])
    observer.flush()
    first, second = stream.getvalue().splitlines()
    assert first.endswith(" close_reason=one")
    assert second.startswith("\ttwo zero_copy=False")


# -- buffering ---------------------------------------------------------------------------


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_buffered_observer_flushes_after_half_a_second() -> None:
    clock = Clock()
    stream = io.StringIO()
    observer = BufferedFileLogObserver(stream, lambda e: e["log_format"] + "\n", clock)
    log = Logger(namespace="t", observer=observer)
    log.info("one")
    log.info("two")
    assert lines_of(stream) == []
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.49)
    assert lines_of(stream) == []
    clock.advance(0.01)
    assert lines_of(stream) == ["one", "two"]
    assert clock.getDelayedCalls() == []


def test_buffered_observer_writes_errors_at_once() -> None:
    clock = Clock()
    stream = io.StringIO()
    observer = BufferedFileLogObserver(stream, lambda e: e["log_format"] + "\n", clock)
    log = Logger(namespace="t", observer=observer)
    log.info("before")
    log.error("broken")
    assert lines_of(stream) == ["before", "broken"]
    assert clock.getDelayedCalls() == []


def test_buffered_observer_flushes_at_64_kib() -> None:
    clock = Clock()
    stream = io.StringIO()
    observer = BufferedFileLogObserver(stream, lambda e: e["log_format"] + "\n", clock)
    log = Logger(namespace="t", observer=observer)
    chunk = "x" * 1023
    for _ in range(63):
        log.info(chunk)
    assert lines_of(stream) == []
    log.info(chunk)
    assert len(lines_of(stream)) == 64
    assert clock.getDelayedCalls() == []


# -- key material -----------------------------------------------------------------------


def _secrets(key: ECHKey) -> list[str]:
    assert key.recipient is not None
    raw = key.recipient.private_bytes
    return [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(), repr(raw)[2:-1]]


@pytest.mark.parametrize("kem", ["x25519", "xwing"])
def test_key_objects_never_print_private_keys(kem: str) -> None:
    key = (
        generate_key(PUBLIC_NAME, config_id=5, kem_id=KEM_MLKEM768_X25519)
        if kem == "xwing"
        else generate_key(PUBLIC_NAME, config_id=5)
    )
    assert key.recipient is not None
    texts = [
        repr(key),
        str(key),
        repr(key.recipient),
        str(key.recipient),
        f"{key}",
        repr(KeySet([key]).keys),
        repr([key.with_role(published=False)]),
    ]
    for text in texts:
        for secret in _secrets(key):
            assert secret not in text
    assert "RecipientKey" in repr(key.recipient)
    # The PEM file is the one place the private key is written.
    assert b"PRIVATE KEY" in dump_pem([key])


def test_nothing_logged_about_an_accepted_connection_shows_the_key() -> None:
    info = accepted()
    assert info.key is KEY
    stream = io.StringIO()
    with capturedLogs() as events:
        log_connection(record(info), 101.0, log_server_names=True)
    observer = json_observer(stream)
    observer(events[0])
    observer.flush()
    texts = [stream.getvalue(), formatEvent(events[0]), repr(events[0]), repr(info)]
    for text in texts:
        for secret in _secrets(KEY):
            assert secret not in text


def test_worker_field_is_the_forked_childs_pid() -> None:
    """The cached pid of the ``worker`` field follows a fork (--workers children)."""
    from echfront.front.connection import ConnectionRecord, connection_event_fields  # noqa: PLC0415

    assert (
        connection_event_fields(ConnectionRecord(0.0), 1.0, log_server_names=False)["worker"]
        == os.getpid()
    )
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        fields = connection_event_fields(ConnectionRecord(0.0), 1.0, log_server_names=False)
        os.write(write_end, str(fields["worker"] == os.getpid()).encode())
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(child, 0)
    assert answer == b"True"
