"""HTTPS record presentation (RFC 9460, RFC 9848) and origin-svcb JSON."""

from __future__ import annotations

import base64
import json

import pytest

from echfront.dns.svcb import https_record, origin_svcb_document
from echfront.errors import ConfigError

LIST = bytes.fromhex("0004fe0d0000")


def test_minimal_record() -> None:
    text = https_record("a.example", LIST)
    assert text == f'a.example. 300 IN HTTPS 1 . ech="{base64.b64encode(LIST).decode()}"'


def test_params_in_key_order_and_target() -> None:
    text = https_record(
        "a.example.", LIST, alpn=["h2"], port=8443, priority=2, target="front.example", ttl=60
    )
    assert text.startswith('a.example. 60 IN HTTPS 2 front.example. alpn="h2" port=8443 ech="')


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpn": ["h,2"]},
        {"alpn": [""]},
        {"alpn": ['"']},
        {"port": 0},
        {"port": 70000},
        {"priority": 0},
        {"ttl": -1},
    ],
)
def test_unpublishable_values_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        https_record("a.example", LIST, **kwargs)  # type: ignore[arg-type]


def test_origin_svcb_document() -> None:
    doc = json.loads(origin_svcb_document(LIST, alpn=["h2", "http/1.1"], regeninterval=600))
    assert doc == {
        "regeninterval": 600,
        "endpoints": [
            {
                "priority": 1,
                "target": "",
                "params": {"ech": base64.b64encode(LIST).decode(), "alpn": ["h2", "http/1.1"]},
            }
        ],
    }
