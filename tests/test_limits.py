# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""Limits that hold under abuse (echfront.front.limits, and the front enforcing them).

:class:`~echfront.front.limits.AddressLimits` is checked on its own with a fake
clock (token bucket arithmetic, first-flight counting, the sweep, address
grouping); then every limit is driven through a real
:class:`~echfront.front.protocol.FrontFactory` on a ``MemoryReactorClock`` with the
recording in-memory network of :mod:`tests.twistedhelpers`: max_connections,
unfinished first flights per address, the HPKE rate (a ClientHello beyond
it gets handshake_failure, one that costs no HPKE never spends a token),
the idle sweep and the timeouts, each counted in
``echfront_limited_connections_total``.
"""

from __future__ import annotations

import math

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IAddress

from echfront.ech.decoder import ECHStatus
from echfront.errors import AlertDescription
from echfront.front import limits as limits_module
from echfront.front.limits import DEMAND_HORIZON, DEMAND_SECONDS, AddressLimits, address_key
from echfront.front.protocol import FrontFactory, FrontProtocol
from echfront.front.state import FrontSettings
from echfront.targets import Backend
from echfront.tls.hello import handshake_message
from tests.echhello import frame, grease_extension, seal_hello
from tests.test_front import BACKEND_PORT, KEY, FrontTestCase, RecordingRouter
from tests.twistedhelpers import (
    CLIENT_ADDRESS,
    EARLY_DATA,
    Pipe,
    RecordingServer,
    alert,
    plain_hello,
)

HANDSHAKE_FAILURE_RECORD = bytes.fromhex("15 03 03 00 02 02 28")


class FakeClock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- address_key ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("203.0.113.255", "203.0.113.255"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:FFFF:FFFF:FFFF:FFFF", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("::ffff:c000:0207", "192.0.2.7"),
        # No IP address (a UNIX socket peer): not limited per address.
        ("/run/echfront.sock", ""),
        ("", ""),
    ],
)
def test_address_key(host: str, key: str) -> None:
    assert address_key(host) == key


def test_v4_mapped_shares_the_ipv4_key() -> None:
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; they must
    # not get a second allowance that way.
    assert address_key("::ffff:198.51.100.9") == address_key("198.51.100.9")


def test_one_ipv6_slash_64_is_one_key_and_the_next_is_another() -> None:
    same = {address_key(f"2001:db8:aa:bb:{i:x}::{i:x}") for i in range(1, 50)}
    assert same == {"2001:db8:aa:bb::/64"}
    assert address_key("2001:db8:aa:bc::1") != address_key("2001:db8:aa:bb::1")


# -- the HPKE token bucket -------------------------------------------------------


def test_bucket_starts_full_then_refuses() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    assert [limits.take_hpke("a", 2.0, 3.0) for _ in range(4)] == [True, True, True, False]
    # Refusals do not go negative or build up debt.
    assert [limits.take_hpke("a", 2.0, 3.0) for _ in range(5)] == [False] * 5


def test_bucket_refills_at_rate() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    for _ in range(3):
        assert limits.take_hpke("a", 2.0, 3.0)
    clock.now += 0.25  # half a token
    assert not limits.take_hpke("a", 2.0, 3.0)
    clock.now += 0.25  # a whole one, counting the refused moment too
    assert limits.take_hpke("a", 2.0, 3.0)
    assert not limits.take_hpke("a", 2.0, 3.0)
    clock.now += 1.0  # two tokens
    assert [limits.take_hpke("a", 2.0, 3.0) for _ in range(3)] == [True, True, False]


def test_bucket_refill_is_capped_at_burst() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    assert limits.take_hpke("a", 1.0, 2.0)
    clock.now += 3600
    assert [limits.take_hpke("a", 1.0, 2.0) for _ in range(3)] == [True, True, False]


def test_fractional_rate() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    assert limits.take_hpke("a", 0.1, 1.0)
    clock.now += 9.9
    assert not limits.take_hpke("a", 0.1, 1.0)
    clock.now += 0.1
    assert limits.take_hpke("a", 0.1, 1.0)


def test_buckets_are_per_key() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    assert limits.take_hpke("a", 1.0, 1.0)
    assert not limits.take_hpke("a", 1.0, 1.0)
    assert limits.take_hpke("b", 1.0, 1.0)
    assert limits.tracked == 2


def test_rate_zero_is_unlimited_and_keeps_no_state() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    assert all(limits.take_hpke("a", 0.0, 0.0) for _ in range(10_000))
    assert limits.tracked == 0


def test_sweep_forgets_only_full_buckets() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    assert limits.take_hpke("refilled", 1.0, 2.0)  # one token spent
    assert limits.take_hpke("spent", 1.0, 2.0)
    assert limits.take_hpke("spent", 1.0, 2.0)  # two spent
    clock.now += 1.0  # "refilled" is full again, "spent" holds 1 of 2
    limits.sweep(1.0, 2.0)
    assert limits.tracked == 1
    assert limits._buckets.keys() == {"spent"}
    # "spent" kept its state: one token now, none after it.
    assert limits.take_hpke("spent", 1.0, 2.0)
    assert not limits.take_hpke("spent", 1.0, 2.0)
    # A forgotten bucket starts again full, which is what it was.
    assert [limits.take_hpke("refilled", 1.0, 2.0) for _ in range(3)] == [True, True, False]


def test_sweep_keeps_an_untouched_partial_bucket_until_it_is_full() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    for _ in range(4):
        assert limits.take_hpke("a", 2.0, 4.0)
    clock.now += 1.9
    limits.sweep(2.0, 4.0)
    assert limits.tracked == 1
    clock.now += 0.1
    limits.sweep(2.0, 4.0)
    assert limits.tracked == 0


def test_sweep_with_rate_zero_forgets_every_bucket() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    limits.take_hpke("a", 1.0, 1.0)
    limits.take_hpke("b", 1.0, 1.0)
    limits.sweep(0.0, 0.0)
    assert limits.tracked == 0


def test_sweep_keeps_first_flights() -> None:
    limits = AddressLimits(FakeClock())
    assert limits.start_first_flight("a", 2)
    limits.sweep(1.0, 1.0)
    assert limits.first_flights("a") == 1
    assert limits.tracked == 1


# -- first flights -----------------------------------------------------------------


def test_first_flights_counted_up_to_the_limit() -> None:
    limits = AddressLimits(FakeClock())
    assert limits.start_first_flight("a", 2)
    assert limits.start_first_flight("a", 2)
    assert not limits.start_first_flight("a", 2)
    assert limits.first_flights("a") == 2  # a refusal is not counted
    assert limits.start_first_flight("b", 2)
    assert limits.first_flights("b") == 1


def test_ending_a_first_flight_frees_a_slot_and_forgets_at_zero() -> None:
    limits = AddressLimits(FakeClock())
    limits.start_first_flight("a", 2)
    limits.start_first_flight("a", 2)
    limits.end_first_flight("a")
    assert limits.first_flights("a") == 1
    assert limits.start_first_flight("a", 2)
    limits.end_first_flight("a")
    limits.end_first_flight("a")
    assert limits.first_flights("a") == 0
    assert limits.tracked == 0
    limits.end_first_flight("a")  # an extra end never goes negative
    assert limits.first_flights("a") == 0
    assert [limits.start_first_flight("a", 2) for _ in range(3)] == [True, True, False]


def test_first_flight_limit_zero_is_unlimited() -> None:
    limits = AddressLimits(FakeClock())
    assert all(limits.start_first_flight("a", 0) for _ in range(1000))
    assert limits.first_flights("a") == 1000


def test_tracked_counts_addresses_once() -> None:
    limits = AddressLimits(FakeClock())
    limits.start_first_flight("a", 5)
    limits.take_hpke("a", 1.0, 2.0)
    limits.take_hpke("b", 1.0, 2.0)
    assert limits.tracked == 2


# -- fair shares under saturation (a fake clock) -------------------------------------

SATURATION = 10


def saturate(limits: AddressLimits, count: int = SATURATION + 1) -> None:
    """Hold ``count`` unfinished first flights without a key (saturated past 10)."""
    for _ in range(count):
        limits.start_first_flight("", 0)


def arrive(limits: AddressLimits, key: str, times: int) -> None:
    for _ in range(times):
        limits.arrive(key)


def light_addresses(limits: AddressLimits, count: int = 20, times: int = 1) -> list[str]:
    keys = [f"198.51.100.{i}" for i in range(1, count + 1)]
    for key in keys:
        arrive(limits, key, times)
    return keys


def test_nothing_is_shed_while_the_front_keeps_up() -> None:
    limits = AddressLimits(FakeClock())
    light_addresses(limits)
    arrive(limits, "flood", 10_000)
    saturate(limits, SATURATION)  # at the threshold, not past it
    assert not limits.shed("flood", SATURATION)
    assert limits.admit("flood", cap=0, saturation=SATURATION) == ""


def test_a_single_address_is_never_shed() -> None:
    limits = AddressLimits(FakeClock())
    arrive(limits, "load-test", 100_000)
    saturate(limits, 10 * SATURATION)
    assert not limits.shed("load-test", SATURATION)
    assert all(limits.admit("load-test", cap=0, saturation=SATURATION) == "" for _ in range(500))


def test_a_flood_is_shed_and_the_light_addresses_are_not() -> None:
    limits = AddressLimits(FakeClock())
    light = light_addresses(limits, times=3)
    arrive(limits, "flood", 200)
    saturate(limits)
    assert limits.admit("flood", cap=0, saturation=SATURATION) == "fair_share"
    for key in light:
        assert limits.admit(key, cap=0, saturation=SATURATION) == ""
    # However deep the saturation: twice the others' mean protects them.
    saturate(limits, 1000)
    assert all(not limits.shed(key, SATURATION) for key in light)
    assert limits.shed("flood", SATURATION)
    # Shed attempts count as demand: the flood stays the heaviest.
    before = limits.demand("flood")
    limits.admit("flood", cap=0, saturation=SATURATION)
    assert limits.demand("flood") > before


def test_addresses_asking_alike_are_not_shed() -> None:
    limits = AddressLimits(FakeClock())
    arrive(limits, "a", 100)
    arrive(limits, "b", 100)
    arrive(limits, "c", 90)
    saturate(limits, 1000)
    assert not any(limits.shed(key, SATURATION) for key in "abc")


def test_two_addresses_the_heavier_far_beyond_the_other_is_shed() -> None:
    limits = AddressLimits(FakeClock())
    arrive(limits, "flood", 100)
    arrive(limits, "client", 5)
    saturate(limits)
    assert limits.shed("flood", SATURATION)
    assert not limits.shed("client", SATURATION)


def test_the_heaviest_first_then_deeper_as_the_queue_grows() -> None:
    limits = AddressLimits(FakeClock())
    light = light_addresses(limits, times=2)
    arrive(limits, "heaviest", 100)
    arrive(limits, "heavy", 40)
    # Just past the threshold: only the heaviest.
    saturate(limits)
    assert limits.shed("heaviest", SATURATION)
    assert not limits.shed("heavy", SATURATION)
    # At 2.5 times the threshold, addresses asking 40% of the heaviest too.
    saturate(limits, 25 - limits.pending)
    assert limits.pending == 25
    assert limits.shed("heavy", SATURATION)
    assert not any(limits.shed(key, SATURATION) for key in light)
    # Finished first flights bring the front back below the threshold.
    for _ in range(limits.pending - SATURATION):
        limits.end_first_flight("")
    assert not limits.shed("heaviest", SATURATION)


def test_demand_decays_and_quiet_addresses_are_forgotten() -> None:
    clock = FakeClock()
    limits = AddressLimits(clock)
    arrive(limits, "flood", 200)
    assert limits.demand("flood") == pytest.approx(200)
    clock.now += DEMAND_SECONDS
    assert limits.demand("flood") == pytest.approx(200 / math.e)
    light = light_addresses(limits, times=3)
    saturate(limits)
    assert limits.shed("flood", SATURATION)
    # The flood stops; the others go on, and after a while it is one of them.
    for _ in range(5):
        clock.now += 1.0
        for key in light:
            arrive(limits, key, 2)
    assert limits.active == 21
    assert not limits.shed("flood", SATURATION)
    # Quiet for DEMAND_HORIZON: forgotten altogether.
    clock.now += DEMAND_HORIZON - 5 - DEMAND_SECONDS + 0.001
    limits.arrive("newcomer")
    assert limits.active == 21  # the flood out, the newcomer in
    assert limits.demand("flood") == 0.0


def test_long_runs_keep_exact_demand() -> None:
    # An arrival every 0.25 s for 10 minutes: the weights are rebased many
    # times; the decayed sum must still be the closed form's.
    clock = FakeClock()
    limits = AddressLimits(clock)
    for _ in range(2400):
        clock.now += 0.25
        limits.arrive("steady")
    expected = 1 / (1 - math.exp(-0.25 / DEMAND_SECONDS))
    assert limits.demand("steady") == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(limits._demand_total)


def test_tracked_demand_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_module, "MAX_TRACKED", 50)
    limits = AddressLimits(FakeClock())
    for i in range(500):
        limits.arrive(f"10.0.{i // 256}.{i % 256}")
    assert limits.active == 50
    # The least recently seen went first; the sum is that of what is left.
    assert limits.demand("10.0.0.0") == 0.0
    assert limits._demand_total == pytest.approx(50)


def test_the_hard_cap_applies_whether_saturated_or_not() -> None:
    limits = AddressLimits(FakeClock())
    assert limits.admit("a", cap=2, saturation=SATURATION) == ""
    assert limits.admit("a", cap=2, saturation=SATURATION) == ""
    assert limits.admit("a", cap=2, saturation=SATURATION) == "first_flights_per_address"
    assert limits.first_flights("a") == 2
    assert limits.pending == 2
    # Without a key nothing is capped or shed, but the queue counts it.
    assert limits.admit("", cap=1, saturation=1) == ""
    assert limits.pending == 3


def test_an_extra_end_never_makes_the_queue_negative() -> None:
    limits = AddressLimits(FakeClock())
    limits.start_first_flight("", 0)
    limits.end_first_flight("")
    limits.end_first_flight("")
    assert limits.pending == 0


# -- the front enforcing them ------------------------------------------------------

V6_CLIENT = IPv6Address("TCP", "2001:db8:5:6::10", 50000)
V6_NEIGHBOUR = IPv6Address("TCP", "2001:db8:5:6:ffff::1", 50001)
V6_OTHER_NET = IPv6Address("TCP", "2001:db8:5:7::10", 50002)
OTHER_CLIENT = IPv4Address("TCP", "192.0.2.8", 50124)


class LimitTestCase(FrontTestCase):
    def factory_with(self, **settings: float | int) -> FrontFactory:
        return self.make_factory(self.to_backend(), settings=FrontSettings(**settings))  # type: ignore[arg-type]

    def accept(
        self, factory: FrontFactory, address: IAddress = CLIENT_ADDRESS
    ) -> tuple[Pipe, FrontProtocol, RecordingServer]:
        front = factory.buildProtocol(address)
        assert front is not None, f"refused {address}"
        client = RecordingServer()
        pipe = self.net.connect(client, front, client_address=address)
        return pipe, front, client

    def limited(self, factory: FrontFactory, limit: str) -> float:
        value = factory.metrics.registry.get_sample_value(
            "echfront_limited_connections_total", {"limit": limit}
        )
        return 0.0 if value is None else value


class MaxConnectionsTests(LimitTestCase):
    def test_connections_beyond_the_limit_are_refused_at_once(self) -> None:
        factory = self.factory_with(max_connections=2)
        first = self.accept(factory)
        self.accept(factory, OTHER_CLIENT)
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDRESS))
        self.assertIsNone(factory.buildProtocol(V6_CLIENT))
        self.assertEqual(self.limited(factory, "max_connections"), 2)
        self.assertEqual(factory.open_connections, 2)
        # A refusal leaves no per-address state behind.
        self.assertEqual(factory.limits.first_flights(address_key("2001:db8:5:6::10")), 0)
        self.assertEqual(factory.limits.first_flights("192.0.2.7"), 1)

        first[0].client.loseConnection()
        self.net.flush()
        self.assertEqual(factory.open_connections, 1)
        self.assertIsNotNone(factory.buildProtocol(V6_CLIENT))
        self.assertEqual(self.limited(factory, "max_connections"), 2)

    def test_zero_is_unlimited(self) -> None:
        factory = self.factory_with(max_connections=0, max_first_flights_per_address=0)
        for _ in range(300):
            self.assertIsNotNone(factory.buildProtocol(CLIENT_ADDRESS))
        self.assertEqual(factory.open_connections, 300)
        self.assertEqual(self.limited(factory, "max_connections"), 0)

    def test_active_gauge_follows_open_connections(self) -> None:
        factory = self.factory_with(max_connections=5)
        pipes = [self.accept(factory, OTHER_CLIENT)[0] for _ in range(3)]
        active = factory.metrics.registry.get_sample_value("echfront_active_connections")
        self.assertEqual(active, 3)
        for pipe in pipes:
            pipe.client.loseConnection()
        self.net.flush()
        active = factory.metrics.registry.get_sample_value("echfront_active_connections")
        self.assertEqual(active, 0)


class FirstFlightsPerAddressTests(LimitTestCase):
    def test_third_of_limit_two_is_refused(self) -> None:
        factory = self.factory_with(max_first_flights_per_address=2)
        self.accept(factory)
        self.accept(factory)
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDRESS))
        self.assertEqual(self.limited(factory, "first_flights_per_address"), 1)
        self.assertEqual(factory.open_connections, 2)
        # Another address is not affected.
        self.accept(factory, OTHER_CLIENT)
        self.assertEqual(factory.limits.first_flights("192.0.2.7"), 2)

    def test_finishing_a_first_flight_frees_a_slot(self) -> None:
        factory = self.factory_with(max_first_flights_per_address=2)
        pipe, front, _client = self.accept(factory)
        self.accept(factory)
        pipe.client.write(plain_hello())
        self.net.flush()
        assert front.record.hello is not None
        self.assertEqual(factory.limits.first_flights("192.0.2.7"), 1)
        # The finished connection is still open (connecting to its backend)
        # but no longer counts as an unfinished first flight.
        self.assertEqual(factory.open_connections, 2)
        self.accept(factory)
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDRESS))
        # When the finished one closes, it must not free a second slot.
        pipe.client.loseConnection()
        self.net.flush()
        self.assertEqual(factory.limits.first_flights("192.0.2.7"), 2)
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDRESS))

    def test_closing_before_the_hello_completes_frees_the_slot(self) -> None:
        factory = self.factory_with(max_first_flights_per_address=2)
        pipe, _front, _client = self.accept(factory)
        self.accept(factory)
        pipe.client.write(plain_hello()[:40])
        pipe.client.loseConnection()
        self.net.flush()
        self.assertEqual(factory.limits.first_flights("192.0.2.7"), 1)
        self.accept(factory)
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDRESS))

    def test_a_refused_hello_frees_the_slot(self) -> None:
        factory = self.factory_with(max_first_flights_per_address=1)
        pipe, _front, client = self.accept(factory)
        pipe.client.write(b"GET / HTTP/1.1\r\n\r\n")
        self.net.flush()
        self.assertEqual(bytes(client.data), alert(10))
        self.assertEqual(factory.limits.first_flights("192.0.2.7"), 0)
        self.accept(factory)

    def test_a_hello_refused_after_it_completed_frees_its_slot_once(self) -> None:
        factory = self.factory_with(max_first_flights_per_address=2)
        self.accept(factory)  # stays unfinished
        pipe, _front, client = self.accept(factory)
        # A complete ClientHello message whose body is malformed: the flight
        # is finished (slot freed), then the hello is refused and closed.
        pipe.client.write(frame(handshake_message(1, b"\x03\x03" + bytes(10))))
        self.net.flush()
        self.assertEqual(bytes(client.data), alert(50))
        self.assertEqual(client.events, ["made", "lost"])
        self.assertEqual(factory.limits.first_flights("192.0.2.7"), 1)
        self.accept(factory)
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDRESS))

    def test_first_flight_timeout_frees_the_slot(self) -> None:
        factory = self.factory_with(max_first_flights_per_address=1, first_flight_timeout=5)
        pipe, _front, _client = self.accept(factory)
        pipe.client.write(plain_hello()[:10])
        self.net.flush()
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDRESS))
        self.clock.advance(5)
        self.net.flush()
        self.assertEqual(factory.limits.first_flights("192.0.2.7"), 0)
        self.accept(factory)

    def test_ipv6_counts_per_slash_64(self) -> None:
        factory = self.factory_with(max_first_flights_per_address=2)
        self.accept(factory, V6_CLIENT)
        self.accept(factory, V6_NEIGHBOUR)
        self.assertIsNone(factory.buildProtocol(V6_CLIENT))
        self.assertIsNone(factory.buildProtocol(IPv6Address("TCP", "2001:db8:5:6::99", 1)))
        self.accept(factory, V6_OTHER_NET)
        self.assertEqual(self.limited(factory, "first_flights_per_address"), 2)

    def test_record_address_is_the_accounting_key(self) -> None:
        factory = self.factory_with()
        _pipe, front, _client = self.accept(factory, V6_NEIGHBOUR)
        self.assertEqual(front.record.address, "2001:db8:5:6::/64")


class HPKERateTests(LimitTestCase):
    """A cap on HPKE decryptions per second per client address (RFC 9849 §10.4)."""

    def hello(
        self, factory: FrontFactory, records: bytes, address: IAddress = CLIENT_ADDRESS
    ) -> tuple[Pipe, FrontProtocol, RecordingServer]:
        pipe, front, client = self.accept(factory, address)
        pipe.client.write(records)
        self.net.flush()
        return pipe, front, client

    def assert_accepted(self, front: FrontProtocol, client: RecordingServer) -> None:
        assert front.record.hello is not None
        self.assertIs(front.record.hello.status, ECHStatus.ACCEPTED)
        self.assertEqual(bytes(client.data), b"")

    def assert_limited(self, pipe: Pipe, front: FrontProtocol, client: RecordingServer) -> None:
        self.assertIsNone(front.info)
        self.assertIsNone(front.record.hello)
        self.assertEqual(bytes(client.data), HANDSHAKE_FAILURE_RECORD)
        self.assertEqual(client.events, ["made", "lost"])
        self.assertIn("loseConnection", pipe.server.calls)
        self.assertEqual(front.record.alert, AlertDescription.HANDSHAKE_FAILURE)
        self.assertEqual(front.record.limit, "hpke_rate")

    def test_hello_beyond_the_bucket_gets_handshake_failure(self) -> None:
        factory = self.factory_with(hpke_rate=1, hpke_burst=2)
        for _ in range(2):
            _pipe, front, client = self.hello(factory, seal_hello(KEY.config).records)
            self.assert_accepted(front, client)
        pipe, front, client = self.hello(factory, seal_hello(KEY.config).records)
        self.assert_limited(pipe, front, client)
        self.assertEqual(self.limited(factory, "hpke_rate"), 1)
        self.assertEqual(
            factory.metrics.registry.get_sample_value(
                "echfront_connections_total",
                {"ech": "error", "alert": "handshake_failure", "route": "none"},
            ),
            1,
        )
        # Only the two decryptions happened: two backend connections.
        self.assertEqual(len(self.clock.tcpClients), 2)

    def test_bucket_refills_with_time(self) -> None:
        factory = self.factory_with(hpke_rate=2, hpke_burst=1)
        _pipe, front, client = self.hello(factory, seal_hello(KEY.config).records)
        self.assert_accepted(front, client)
        self.clock.advance(0.4)
        self.assert_limited(*self.hello(factory, seal_hello(KEY.config).records))
        self.clock.advance(0.1)
        _pipe, front, client = self.hello(factory, seal_hello(KEY.config).records)
        self.assert_accepted(front, client)

    def test_other_addresses_have_their_own_bucket(self) -> None:
        factory = self.factory_with(hpke_rate=1, hpke_burst=1)
        self.assert_accepted(*self.hello(factory, seal_hello(KEY.config).records)[1:])
        self.assert_limited(*self.hello(factory, seal_hello(KEY.config).records))
        self.assert_accepted(*self.hello(factory, seal_hello(KEY.config).records, OTHER_CLIENT)[1:])
        self.assert_accepted(*self.hello(factory, seal_hello(KEY.config).records, V6_CLIENT)[1:])
        # The same /64 shares the bucket.
        self.assert_limited(*self.hello(factory, seal_hello(KEY.config).records, V6_NEIGHBOUR))

    def test_grease_and_unknown_config_ids_spend_no_tokens(self) -> None:
        factory = self.factory_with(hpke_rate=1, hpke_burst=1)
        self.assertNotEqual(KEY.config_id, 0xA7)
        grease = seal_hello(KEY.config, ech_extension=grease_extension(0xA7)).records
        unknown = seal_hello(KEY.config, config_id=0x99).records
        # The right config_id, but a suite the config does not list (DEC-3).
        unsupported = seal_hello(KEY.config, wire_suite=(0x0003, 0x0003)).records
        for records in (grease, unknown, unsupported, plain_hello()) * 5:
            _pipe, front, client = self.hello(factory, records)
            assert front.record.hello is not None
            self.assertIn(front.record.hello.status, (ECHStatus.REJECTED, ECHStatus.NOT_OFFERED))
            self.assertEqual(bytes(client.data), b"")
        self.assertEqual(factory.limits.tracked, 0)
        # The one token is still there for a hello the front can decrypt.
        self.assert_accepted(*self.hello(factory, seal_hello(KEY.config).records)[1:])
        self.assert_limited(*self.hello(factory, seal_hello(KEY.config).records))
        # And with the bucket empty, hellos that cost no HPKE still pass.
        for records in (grease, unknown, unsupported, plain_hello()):
            _pipe, front, client = self.hello(factory, records)
            self.assertIsNotNone(front.record.hello)
            self.assertEqual(bytes(client.data), b"")
        self.assertEqual(self.limited(factory, "hpke_rate"), 1)

    def test_grease_colliding_with_a_held_config_id_spends_a_token(self) -> None:
        # Colliding GREASE costs a real HPKE setup, so it is counted; it is
        # then rejected (not refused) while a token is available.
        factory = self.factory_with(hpke_rate=1, hpke_burst=1)
        colliding = seal_hello(KEY.config, ech_extension=grease_extension(KEY.config_id)).records
        _pipe, front, client = self.hello(factory, colliding)
        assert front.record.hello is not None
        self.assertIs(front.record.hello.status, ECHStatus.REJECTED)
        self.assertEqual(bytes(client.data), b"")
        self.assert_limited(*self.hello(factory, seal_hello(KEY.config).records))

    def test_rate_zero_is_unlimited(self) -> None:
        factory = self.factory_with(hpke_rate=0, hpke_burst=0)
        for _ in range(20):
            self.assert_accepted(*self.hello(factory, seal_hello(KEY.config).records)[1:])
        self.assertEqual(self.limited(factory, "hpke_rate"), 0)

    def test_buckets_survive_a_reload(self) -> None:
        # The limits belong to the factory, not to the state a reload swaps.
        factory = self.factory_with(hpke_rate=1, hpke_burst=1)
        self.assert_accepted(*self.hello(factory, seal_hello(KEY.config).records)[1:])
        factory.state = self.make_factory(
            self.to_backend(), settings=FrontSettings(hpke_rate=1, hpke_burst=1)
        ).state
        self.assert_limited(*self.hello(factory, seal_hello(KEY.config).records))


class IdleSweepTests(LimitTestCase):
    """Handed-off connections idle for idle_timeout are closed by a coarse sweep."""

    def relayed(self, factory: FrontFactory) -> tuple[Pipe, FrontProtocol, RecordingServer, Pipe]:
        pipe, front, client = self.accept(factory)
        pipe.client.write(plain_hello())
        self.net.flush()
        backend_pipe, _relay_side, _server = self.net.complete_backend(self.clock)
        self.net.flush()
        self.assertTrue(front.handed_off)
        return pipe, front, client, backend_pipe

    def advance_until_closed(self, pipe: Pipe, limit: float) -> float:
        """Run the clock call by call; return the time the front aborted the client."""
        while self.clock.getDelayedCalls():
            due = min(call.getTime() for call in self.clock.getDelayedCalls())
            if due > limit:
                break
            self.clock.advance(due - self.clock.seconds())
            self.net.flush()
            if pipe.server.aborted:
                return self.clock.seconds()
        raise AssertionError(f"still open at {self.clock.seconds()}")

    def test_idle_connection_closed_between_one_and_one_and_a_half_timeouts(self) -> None:
        factory = self.factory_with(idle_timeout=10)
        # Let the connection's last byte move at an arbitrary moment.
        self.clock.advance(1.3)
        pipe, front, client, backend_pipe = self.relayed(factory)
        backend = self.backends.built[-1]
        pipe.client.write(EARLY_DATA)
        backend.send(b"last word")
        self.net.flush()
        last_activity = self.clock.seconds()

        closed_at = self.advance_until_closed(pipe, last_activity + 20)
        self.assertGreaterEqual(closed_at - last_activity, 10)
        self.assertLessEqual(closed_at - last_activity, 15)
        self.assertTrue(backend_pipe.client.aborted)
        self.assertEqual(client.events, ["made", "lost"])
        self.assertEqual(front.record.close_reason, "idle timeout")
        self.assertEqual(front.record.limit, "idle_timeout")
        self.assertEqual(self.limited(factory, "idle_timeout"), 1)
        self.assertEqual(factory.open_connections, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_bound_holds_whenever_the_last_byte_moved(self) -> None:
        for offset in (0.0, 0.1, 2.5, 4.9, 5.0, 5.1, 9.99):
            self.setUp()
            factory = self.factory_with(idle_timeout=10)
            pipe, _front, _client, _backend_pipe = self.relayed(factory)
            self.clock.advance(offset)
            pipe.client.write(EARLY_DATA)
            self.net.flush()
            last_activity = self.clock.seconds()
            closed_at = self.advance_until_closed(pipe, last_activity + 20)
            idle = closed_at - last_activity
            self.assertTrue(10 <= round(idle, 9) <= 15, f"offset {offset}: idle {idle}")

    def test_active_connection_survives(self) -> None:
        factory = self.factory_with(idle_timeout=10)
        pipe, _front, _client, _backend_pipe = self.relayed(factory)
        backend = self.backends.built[-1]
        # One byte every 9.9 s (just under the timeout), alternating directions.
        for i in range(20):
            self.clock.advance(9.9)
            if i % 2:
                backend.send(b"x")
            else:
                pipe.client.write(b"y")
            self.net.flush()
            self.assertFalse(pipe.server.disconnecting, f"closed after {self.clock.seconds()}s")
        self.assertEqual(self.limited(factory, "idle_timeout"), 0)

    def test_connections_in_their_handshake_are_left_to_its_timeout(self) -> None:
        factory = self.factory_with(idle_timeout=2, handshake_timeout=30, first_flight_timeout=30)
        pipe, front, _client = self.accept(factory)
        # ECH accepted: the relay inspects until the backend's ServerHello,
        # which never comes; the connection is not idle-swept meanwhile.
        pipe.client.write(seal_hello(KEY.config).records)
        self.net.flush()
        self.net.complete_backend(self.clock)
        self.net.flush()
        self.assertFalse(front.handed_off)
        self.clock.advance(29)
        self.net.flush()
        self.assertFalse(pipe.server.disconnecting)
        self.clock.advance(1)
        self.net.flush()
        self.assertTrue(pipe.server.aborted)
        self.assertEqual(front.record.limit, "handshake_timeout")
        self.assertEqual(self.limited(factory, "idle_timeout"), 0)

    def test_no_sweep_timer_without_connections(self) -> None:
        factory = self.factory_with(idle_timeout=10)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        pipe, _front, _client, _backend_pipe = self.relayed(factory)
        sweeps = [
            c for c in self.clock.getDelayedCalls() if getattr(c, "func", None) == factory._sweep
        ]
        self.assertEqual(len(sweeps), 1)
        pipe.client.loseConnection()
        self.net.flush()
        self.assertEqual(factory.open_connections, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_sweep_timer_for_many_connections(self) -> None:
        factory = self.factory_with(idle_timeout=10)
        for _ in range(5):
            self.relayed(factory)
        sweeps = [
            c for c in self.clock.getDelayedCalls() if getattr(c, "func", None) == factory._sweep
        ]
        self.assertEqual(len(sweeps), 1)
        self.assertEqual(sweeps[0].getTime(), 5.0)

    def test_idle_timeout_zero_never_closes(self) -> None:
        factory = self.factory_with(idle_timeout=0)
        pipe, _front, _client, _backend_pipe = self.relayed(factory)
        self.clock.pump([30.0] * 100)
        self.net.flush()
        self.assertFalse(pipe.server.disconnecting)

    def test_sweep_forgets_refilled_hpke_buckets(self) -> None:
        factory = self.factory_with(idle_timeout=10, hpke_rate=1, hpke_burst=2)
        pipe, front, _client = self.accept(factory)
        pipe.client.write(seal_hello(KEY.config).records)
        self.net.flush()
        assert front.record.hello is not None
        self.assertEqual(factory.limits.tracked, 1)
        self.net.complete_backend(self.clock)
        self.net.flush()
        self.clock.advance(5)  # one sweep: the bucket (1 of 2 after 1 s) is full by now
        self.assertEqual(factory.limits.tracked, 0)


class TimeoutLimitTests(LimitTestCase):
    def test_first_flight_timeout_records_its_limit(self) -> None:
        factory = self.factory_with(first_flight_timeout=5)
        pipe, front, client = self.accept(factory)
        pipe.client.write(plain_hello()[:30])
        self.net.flush()
        self.clock.advance(5)
        self.net.flush()
        self.assertTrue(pipe.server.aborted)
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(front.record.limit, "first_flight_timeout")
        self.assertEqual(front.record.close_reason, "first flight timeout")
        self.assertEqual(self.limited(factory, "first_flight_timeout"), 1)
        self.assertEqual(
            factory.metrics.registry.get_sample_value(
                "echfront_connections_total", {"ech": "error", "alert": "none", "route": "none"}
            ),
            1,
        )

    def test_handshake_timeout_records_its_limit(self) -> None:
        factory = self.factory_with(handshake_timeout=3)
        pipe, front, _client = self.accept(factory)
        pipe.client.write(plain_hello())
        self.net.flush()
        self.clock.advance(3)
        self.net.flush()
        self.assertTrue(pipe.server.aborted)
        self.assertEqual(front.record.limit, "handshake_timeout")
        self.assertEqual(self.limited(factory, "handshake_timeout"), 1)
        self.assertEqual(self.limited(factory, "first_flight_timeout"), 0)

    def test_backend_connect_timeout_is_not_a_handshake_limit(self) -> None:
        slow = Backend(
            "slow", TCP4ClientEndpoint(self.clock, "127.0.0.1", BACKEND_PORT), connect_timeout=2
        )
        factory = self.make_factory(RecordingRouter(lambda hello: slow), targets=frozenset({slow}))
        pipe, front, client = self.accept(factory)
        pipe.client.write(plain_hello())
        self.net.flush()
        self.clock.advance(2)
        self.net.flush()
        self.assertEqual(bytes(client.data), alert(80))
        self.assertEqual(front.record.limit, "")
        self.assertEqual(
            factory.metrics.registry.get_sample_value(
                "echfront_backend_failures_total", {"backend": "slow", "reason": "timeout"}
            ),
            1,
        )


class FairShareTests(LimitTestCase):
    """Shedding only while saturated, the heaviest address first (saturation_first_flights)."""

    LIGHT = tuple(IPv4Address("TCP", f"198.51.100.{i}", 40000 + i) for i in range(1, 4))
    FLOOD = IPv4Address("TCP", "203.0.113.66", 50000)

    def test_the_defaults_cap_no_address(self) -> None:
        settings = FrontSettings()
        self.assertEqual(settings.max_first_flights_per_address, 0)
        self.assertEqual(settings.hpke_rate, 0)
        self.assertEqual(settings.saturation_first_flights, 256)

    def test_a_flood_is_shed_at_accept_while_saturated(self) -> None:
        factory = self.factory_with(saturation_first_flights=4)
        for address in self.LIGHT:
            self.accept(factory, address)
        # Not saturated yet: the flood's first connections are served.
        self.accept(factory, self.FLOOD)
        self.accept(factory, self.FLOOD)
        self.assertEqual(factory.limits.pending, 5)
        # Now it is, and the flood asks three times the others' mean.
        self.assertIsNone(factory.buildProtocol(self.FLOOD))
        self.assertEqual(self.limited(factory, "fair_share"), 1)
        # Light addresses, old or new, are still served.
        self.accept(factory, self.LIGHT[0])
        self.accept(factory, IPv4Address("TCP", "198.51.100.99", 40099))
        self.assertIsNone(factory.buildProtocol(self.FLOOD))
        self.assertEqual(self.limited(factory, "fair_share"), 2)

    def test_a_decryption_is_shed_while_saturated(self) -> None:
        factory = self.factory_with(saturation_first_flights=4)
        flood = [self.accept(factory, self.FLOOD) for _ in range(3)]
        light = [self.accept(factory, address) for address in self.LIGHT]
        self.assertEqual(factory.limits.pending, 6)
        # A flood connection accepted before saturation sends its hello now
        # (its first flight done, 5 are left unfinished: still saturated).
        pipe, front, client = flood[0]
        pipe.client.write(seal_hello(KEY.config).records)
        self.net.flush()
        self.assertEqual(bytes(client.data), HANDSHAKE_FAILURE_RECORD)
        self.assertEqual(front.record.limit, "hpke_fair_share")
        self.assertEqual(self.limited(factory, "hpke_fair_share"), 1)
        # A light address's hello is decrypted and relayed.
        pipe, front, client = light[0]
        pipe.client.write(seal_hello(KEY.config).records)
        self.net.flush()
        assert front.record.hello is not None
        self.assertIs(front.record.hello.status, ECHStatus.ACCEPTED)
        self.assertEqual(bytes(client.data), b"")

    def test_one_address_alone_is_served_at_full_speed(self) -> None:
        factory = self.factory_with(saturation_first_flights=4)
        opened = [self.accept(factory) for _ in range(50)]
        self.assertEqual(factory.limits.pending, 50)
        for pipe, _front, _client in opened:
            pipe.client.write(seal_hello(KEY.config).records)
        self.net.flush()
        for _pipe, front, client in opened:
            assert front.record.hello is not None
            self.assertIs(front.record.hello.status, ECHStatus.ACCEPTED)
            self.assertEqual(bytes(client.data), b"")
        self.assertEqual(self.limited(factory, "fair_share"), 0)
        self.assertEqual(self.limited(factory, "hpke_fair_share"), 0)

    def test_zero_turns_shedding_off(self) -> None:
        factory = self.factory_with(saturation_first_flights=0)
        for address in self.LIGHT:
            self.accept(factory, address)
        for _ in range(20):
            self.accept(factory, self.FLOOD)
        self.assertEqual(self.limited(factory, "fair_share"), 0)
