"""The one alert-name table (echfront.errors) and what names alerts through it."""

from __future__ import annotations

from echfront.errors import (
    ALERT_NAMES,
    AlertDescription,
    InternalError,
    UnrecognizedName,
    alert_name,
)
from echfront.front.connection import ConnectionRecord, connection_event_fields


def test_every_alert_the_front_sends_has_its_registry_name() -> None:
    for alert in AlertDescription:
        assert ALERT_NAMES[alert] == alert.name.lower()


def test_registry_names_rfc_8446_and_ech_required() -> None:
    assert alert_name(0) == "close_notify"
    assert alert_name(120) == "no_application_protocol"
    assert alert_name(121) == "ech_required"  # RFC 9849 §11.2
    assert alert_name(AlertDescription.UNRECOGNIZED_NAME) == "unrecognized_name"
    assert alert_name(255) == "unknown"


def test_error_text_and_log_field_use_the_table() -> None:
    assert str(UnrecognizedName("no route")) == "unrecognized_name: no route"
    assert str(InternalError()) == "internal_error"
    record = ConnectionRecord(started=0.0, alert=AlertDescription.ECH_REQUIRED)
    assert connection_event_fields(record, 1.0, log_server_names=False)["alert"] == "ech_required"
