"""DEC-8 (RFC 9849 §10.6): up to the decision, routed and unrouted inner names cost the same.

Timing is not measured (a shared 2-core machine makes wall clocks flaky);
the work is counted instead. ``sys.setprofile`` records every Python and C
function call, in order, from the first byte a :class:`FrontProtocol`
receives to the return of the router's ``route``; an accepted ECH hello
whose inner name is routed (exactly, or by a wildcard) and one whose inner
name is not must give the same sequence. After the decision the paths
differ on purpose (a backend connection, or the operator's default for
unrouted names), and the tests say so too.

A reference copy of the lookup echfront had before (exact name first, the
wildcard only on a miss) shows that the count does tell a name-dependent
lookup apart, and is the oracle for the new lookup's answers.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock

from echfront.ech.decoder import ClientHelloInfo, ECHDecoder, ECHStatus
from echfront.ech.keyset import KeySet, generate_key
from echfront.front.protocol import FrontFactory, FrontProtocol
from echfront.front.state import FrontSettings, FrontState
from echfront.routing import Rule, StaticRouter
from echfront.targets import ECH_REQUIRED_REFUSAL, UNRECOGNIZED, Backend, Reject, Route
from tests.echhello import InnerSpec, seal_hello
from tests.test_routing import backend, hello
from tests.twistedhelpers import CLIENT_ADDRESS, Network, RecordingServer, alert

PEER = IPv4Address("TCP", "192.0.2.7", 50123)
KEY = generate_key("public.example", config_id=0x42, maximum_name_length=32)

#: One event of a profile: ("call"/"return", file, function, first line) for
#: Python code, ("c_call"/"c_return"/"c_exception", qualified name) for C.
Event = tuple[Any, ...]


def profile(action: Callable[[], object]) -> list[Event]:
    """Every function call and return made while ``action`` runs, in order."""
    events: list[Event] = []

    def record(frame: FrameType, event: str, arg: object) -> None:
        if event in ("call", "return"):
            code = frame.f_code
            events.append((event, code.co_filename, code.co_name, code.co_firstlineno))
        else:
            events.append((event, getattr(arg, "__qualname__", type(arg).__qualname__)))

    # A garbage collection in the middle would run finalizers and gc
    # callbacks (hypothesis registers one) that belong to no connection.
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    previous = sys.getprofile()
    sys.setprofile(record)
    try:
        action()
    finally:
        sys.setprofile(previous)
        if collecting:
            gc.enable()
    # The last events are setprofile's own call, made inside the profile.
    while events and events[-1][-1] == "setprofile":
        events.pop()
    return events


def until_return_of(events: list[Event], function: str) -> list[Event]:
    """The events up to and including the first return of ``function``."""
    for index, event in enumerate(events):
        if event[0] == "return" and event[2] == function:
            return events[: index + 1]
    raise AssertionError(f"{function} never returned")


class ReferenceRouter:
    """The lookup as echfront had it before DEC-8: the wildcard only on a miss."""

    def __init__(self, rules: Sequence[Rule], default: Route = UNRECOGNIZED) -> None:
        self.default = default
        self.by_pattern: dict[str, list[Rule]] = {}
        for rule in rules:
            self.by_pattern.setdefault(rule.pattern, []).append(rule)

    def find(self, server_name: str | None, alpn: Sequence[bytes]) -> Rule | None:
        if not server_name:
            return None
        candidates = [server_name]
        dot = server_name.find(".")
        if dot > 0:
            candidates.append("*" + server_name[dot:])
        for pattern in candidates:
            for rule in self.by_pattern.get(pattern, ()):
                if rule.matches_alpn(alpn):
                    return rule
        return None

    def route(self, info: ClientHelloInfo, peer: object) -> Route:
        rule = self.find(info.server_name, info.alpn)
        if rule is None:
            return self.default
        if rule.require_ech and info.status is not ECHStatus.ACCEPTED:
            return ECH_REQUIRED_REFUSAL
        return rule.target


A, B, C, H2 = backend("a"), backend("b"), backend("c"), backend("h2")
RULES = (
    Rule("exact.example", A),
    Rule("*.wild.example", B),
    Rule("deep.wild.example", C),
    Rule("alpn.example", H2, alpn=frozenset({b"h2"})),
    Rule("alpn.example", A),
    Rule("privat.example", C, require_ech=True),
)
ROUTER = StaticRouter(RULES)

#: Routed exactly, by the wildcard, through an ALPN rule, behind require_ech, not at all.
NAMES = ("exact.example", "q.wild.example", "alpn.example", "privat.example", "nomaps.example")


def route_events(router: Any, info: ClientHelloInfo) -> list[Event]:
    return profile(lambda: router.route(info, PEER))


# -- the router alone --------------------------------------------------------------------------


@pytest.mark.parametrize("alpn", [(), (b"h2",), (b"http/1.1", b"h2"), (b"h3", b"x", b"y")])
@pytest.mark.parametrize("status", [ECHStatus.ACCEPTED, ECHStatus.REJECTED])
def test_route_makes_the_same_calls_for_every_name(
    alpn: tuple[bytes, ...], status: ECHStatus
) -> None:
    answers = {name: ROUTER.route(hello(name, alpn, status), PEER) for name in NAMES}
    # The names do get different answers: a routed target, a refusal, the default.
    assert answers["exact.example"] is A
    assert answers["q.wild.example"] is B
    assert answers["nomaps.example"] is UNRECOGNIZED
    expected_private = C if status is ECHStatus.ACCEPTED else ECH_REQUIRED_REFUSAL
    assert answers["privat.example"] is expected_private
    traces = {name: route_events(ROUTER, hello(name, alpn, status)) for name in NAMES}
    reference = traces["nomaps.example"]
    assert len(reference) > 10
    for name, events in traces.items():
        assert events == reference, name


def test_no_server_name_and_odd_names_cost_the_same_too() -> None:
    reference = route_events(ROUTER, hello("nomaps.example"))
    for name in (None, "", "nodot", ".leading.example", "exact.example."):
        assert route_events(ROUTER, hello(name)) == reference, name


def test_an_empty_table_costs_what_a_full_one_does() -> None:
    empty = StaticRouter(())
    assert empty.route(hello("exact.example"), PEER) is UNRECOGNIZED
    assert route_events(empty, hello("exact.example")) == route_events(
        ROUTER, hello("exact.example")
    )


def test_the_count_tells_a_name_dependent_lookup_apart() -> None:
    # The old lookup returned on an exact hit and tried the wildcard only on
    # a miss: the profile sees that, so equal profiles above mean something.
    old = ReferenceRouter(RULES)
    hit = route_events(old, hello("exact.example"))
    miss = route_events(old, hello("nomaps.example"))
    wildcard = route_events(old, hello("q.wild.example"))
    # An exact hit and a miss make as many calls, but not the same ones (a
    # second probe against an ALPN check): hence sequences, not counts.
    assert hit != miss
    assert wildcard not in (hit, miss)
    assert len(wildcard) > len(hit)


# -- the same answers as before ----------------------------------------------------------------

LABELS = st.sampled_from(["a", "b", "wild", "x"])
PATTERNS = st.builds(
    lambda wild, labels: ("*." if wild else "") + ".".join(labels),
    st.booleans(),
    st.lists(LABELS, min_size=1, max_size=3),
)
PROTOCOLS = st.sampled_from([b"h2", b"http/1.1", b"h3"])
RULE = st.builds(
    lambda pattern, alpn, require, target: Rule(pattern, target, alpn=alpn, require_ech=require),
    PATTERNS,
    st.none() | st.frozensets(PROTOCOLS, min_size=1),
    st.booleans(),
    st.sampled_from([A, B, C, H2]),
)
QUERY_NAMES = st.none() | st.lists(LABELS, min_size=1, max_size=4).map(".".join)


@settings(max_examples=300, deadline=None)
@given(
    rules=st.lists(RULE, max_size=8),
    queries=st.lists(
        st.tuples(QUERY_NAMES, st.lists(PROTOCOLS, max_size=3).map(tuple)), min_size=1
    ),
)
def test_lookup_answers_as_the_reference_does(
    rules: list[Rule], queries: list[tuple[str | None, tuple[bytes, ...]]]
) -> None:
    router, reference = StaticRouter(tuple(rules)), ReferenceRouter(rules)
    for name, alpn in queries:
        assert router.find(name, alpn) is reference.find(name, alpn)
        for status in (ECHStatus.ACCEPTED, ECHStatus.NOT_OFFERED):
            info = hello(name, alpn, status)
            assert router.route(info, PEER) is reference.route(info, PEER)


# -- the front, from the first byte to the decision --------------------------------------------

ROUTED, WILDCARD, UNROUTED = "routed.example", "q.wild.example", "norout.example"


def first_flight(name: str) -> tuple[list[Event], list[Event], FrontProtocol, RecordingServer]:
    """One accepted ECH hello for inner ``name`` through a fresh front, profiled.

    Everything is fresh per run (clock, factory, limits), so no state left
    by an earlier run (a pending timer, an HPKE bucket) is counted.

    :returns: the events up to the router's return, the events after it,
        the front and the client.
    """
    clock = MemoryReactorClock()
    be = Backend("be", TCP4ClientEndpoint(clock, "127.0.0.1", 4433), connect_timeout=5)
    router = StaticRouter((Rule(ROUTED, be), Rule("*.wild.example", be)))
    state = FrontState(
        decoder=ECHDecoder(KeySet([KEY])),
        router=router,
        targets=frozenset({be}),
        settings=FrontSettings(),
    )
    factory = FrontFactory(state, clock)
    front = factory.buildProtocol(CLIENT_ADDRESS)
    assert front is not None
    client = RecordingServer()
    network = Network(clock)
    network.connect(client, front)
    records = seal_hello(KEY.config, InnerSpec(server_name=name)).records
    events = profile(lambda: front.dataReceived(records))
    decided = until_return_of(events, "route")
    network.flush()
    return decided, events[len(decided) :], front, client


def test_front_does_the_same_work_up_to_the_decision() -> None:
    assert len(ROUTED) == len(WILDCARD) == len(UNROUTED)
    for name in (ROUTED, WILDCARD, UNROUTED):
        first_flight(name)  # once each first: lazy imports and caches settle
    runs = {name: first_flight(name) for name in (ROUTED, UNROUTED, WILDCARD)}
    again = first_flight(ROUTED)[0]

    decided = {name: run[0] for name, run in runs.items()}
    reference = decided[UNROUTED]
    # The whole first flight: record reading, HPKE, the inner hello's
    # rebuild, limits, metrics, timers, the lookup.
    assert len(reference) > 300
    assert decided[ROUTED] == reference
    assert decided[WILDCARD] == reference
    assert again == reference

    # Every hello was decrypted: the names are the inner ones.
    for name, (_decided, _after, front, _client) in runs.items():
        assert front.info is not None and front.info.status is ECHStatus.ACCEPTED
        assert front.info.server_name == name


def test_after_the_decision_the_paths_differ_as_configured() -> None:
    _decided, routed_after, routed_front, routed_client = first_flight(ROUTED)
    _decided, unrouted_after, unrouted_front, unrouted_client = first_flight(UNROUTED)
    # A routed name gets its backend; an unrouted one the operator's default
    # (here the built-in unrecognized_name alert), which the client sees anyway.
    assert routed_front.record.route == "be"
    assert bytes(routed_client.data) == b""
    assert isinstance(UNRECOGNIZED, Reject)
    assert unrouted_front.record.route == UNRECOGNIZED.name
    assert bytes(unrouted_client.data) == alert(112)
    assert routed_after != unrouted_after
