"""The static routing table: names, wildcards, ALPN, require_ech, defaults."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from zope.interface.verify import verifyObject

from echfront.ech.decoder import ClientHelloInfo, ECHStatus
from echfront.errors import AlertDescription, ConfigError
from echfront.interfaces import IRouter
from echfront.routing import Rule, StaticRouter, validate_pattern
from echfront.targets import ECH_REQUIRED_REFUSAL, UNRECOGNIZED, Backend, Reject

PEER = IPv4Address("TCP", "127.0.0.1", 5000)


def backend(name: str) -> Backend:
    return Backend(name, endpoint=object())  # type: ignore[arg-type]


def hello(
    name: str | None, alpn: tuple[bytes, ...] = (), status: ECHStatus = ECHStatus.ACCEPTED
) -> ClientHelloInfo:
    fields: dict[str, Any] = dict.fromkeys(ClientHelloInfo.__dataclass_fields__)
    fields.update(server_name=name, alpn=alpn, status=status, forward=b"", rest=b"")
    return ClientHelloInfo(**fields)


A, B, C, H2 = backend("a"), backend("b"), backend("c"), backend("h2")
ROUTER = StaticRouter.from_rules(
    [
        Rule("exact.example", A),
        Rule("*.wild.example", B),
        Rule("deep.wild.example", C),
        Rule("alpn.example", H2, alpn=frozenset({b"h2"})),
        Rule("alpn.example", A),
        Rule("Private.Example.", C, require_ech=True),
    ]
)


def test_provides_irouter() -> None:
    assert verifyObject(IRouter, ROUTER)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("exact.example", A),
        ("x.wild.example", B),
        ("deep.wild.example", C),  # exact beats wildcard
        ("a.b.wild.example", UNRECOGNIZED),  # a wildcard covers one label
        ("wild.example", UNRECOGNIZED),
        ("unknown.example", UNRECOGNIZED),
        (None, UNRECOGNIZED),
    ],
)
def test_names_and_wildcards(name: str | None, expected: object) -> None:
    assert ROUTER.route(hello(name), PEER) is expected


def test_alpn_specific_rule_first_then_catch_all() -> None:
    assert ROUTER.route(hello("alpn.example", (b"http/1.1", b"h2")), PEER) is H2
    assert ROUTER.route(hello("alpn.example", (b"http/1.1",)), PEER) is A
    assert ROUTER.route(hello("alpn.example"), PEER) is A


@pytest.mark.parametrize("status", [ECHStatus.NOT_OFFERED, ECHStatus.REJECTED])
def test_require_ech_refuses_clear_access(status: ECHStatus) -> None:
    route = ROUTER.route(hello("private.example", status=status), PEER)
    assert route is ECH_REQUIRED_REFUSAL
    assert route.alert is AlertDescription.UNRECOGNIZED_NAME
    assert ROUTER.route(hello("private.example"), PEER) is C


def test_default_target_and_targets() -> None:
    router = StaticRouter.from_rules([Rule("a.example", A)], default=B)
    assert router.route(hello("zzz.example"), PEER) is B
    assert router.targets == frozenset({A, B})
    rejecting = StaticRouter.from_rules([], Reject(AlertDescription.HANDSHAKE_FAILURE))
    assert rejecting.targets == frozenset()
    assert rejecting.route(hello("a.example"), PEER).name == "reject:handshake_failure"


@pytest.mark.parametrize("bad", ["", "*", "*.", "a..b", "a b.example", "*.*.example", "é.example"])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_pattern(bad)


@pytest.mark.parametrize("name", ["Backend", "Local", "Reject", "Route"])
def test_targets_moved_from_routing_still_resolve_with_a_warning(name: str) -> None:
    import echfront  # noqa: PLC0415
    import echfront.routing  # noqa: PLC0415
    import echfront.targets  # noqa: PLC0415

    with pytest.warns(DeprecationWarning, match=rf"echfront\.routing\.{name} moved to"):
        value = getattr(echfront.routing, name)
    assert value is getattr(echfront.targets, name) is getattr(echfront, name)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        echfront.routing.Nothing  # noqa: B018


def test_public_api_is_importable_from_the_package() -> None:
    import echfront  # noqa: PLC0415

    for name in echfront.__all__:
        assert getattr(echfront, name) is not None, name
    with pytest.raises(AttributeError):
        echfront.NoSuchName  # noqa: B018
