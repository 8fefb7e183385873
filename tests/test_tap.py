# Trial's assertions are untyped, and calls through a subclass escape
# the project's untyped_calls_exclude = ["twisted"]:
# mypy: disable-error-code="no-untyped-call"
"""``twistd echfront`` (echfront.tap): options, the service, reload, shutdown.

Options and their precedence over a file are checked as parsed values.
:class:`~echfront.app.service.FrontService` runs on a ``MemoryReactorClock`` (it
listens through endpoints, which the memory reactor records) with real
key, certificate and TOML files in a temporary directory: reload success
and failure, the file watcher driven by the clock, SIGHUP, and graceful
shutdown with open connections.  A HelloRetryRequest in progress across a
reload (RFC 9849 §7.1.1) is checked both by swapping ``factory.state`` by
hand and through ``FrontService.reload`` with a real configuration.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from echfront import tap
from echfront.app.certs import TestCA
from echfront.app.service import FrontService, metrics_service
from echfront.app.workers import WORKER_ENV, Supervisor
from echfront.config.schema import Config, KeyFileConfig, load_config_file
from echfront.ech.decoder import ECHDecoder, ECHStatus
from echfront.ech.keyset import ECHKey, KeySet, generate_key
from echfront.errors import ConfigError
from echfront.front.metrics import Metrics, MetricsResource
from echfront.front.state import FrontSettings, FrontState
from echfront.keys.keyfile import write_key_file
from echfront.web import QuietSite
from tests.echhello import InnerSpec, read_flight, seal_hello
from tests.test_relay import KEY, FixedRouter, RelayTestCase, inner_records
from tests.twistedhelpers import (
    CLIENT_ADDRESS,
    Network,
    Pipe,
    RecordingFactory,
    RecordingServer,
    server_hello,
)

PUBLIC_NAME = "public.example"
SECRET_NAME = "secret.example.org"
BACKEND_PORT = 4433


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


# -- Options ------------------------------------------------------------------------------


def test_defaults() -> None:
    options = parse()
    assert options["config"] is None
    assert options["listen"] == []
    assert options["ech_keys"] == []
    assert options["routes"] == []
    assert options["public-cert"] is None
    assert options["metrics"] is None
    assert options["workers"] == 0
    assert options["state-dir"] is None
    assert not options.has_flags


def test_every_flag() -> None:
    options = parse(
        "--config", "front.toml",
        "--listen", "tcp:8443",
        "--listen", "unix:/run/front.sock",
        "--ech-key", "a.pem",
        "--ech-key", "b.pem",
        "--route", "app.example=tcp:10.0.0.2:443",
        "--route", "*.blog.example=unix:/run/blog.sock",
        "--public-cert", "public.pem",
        "--metrics", "tcp:9100:interface=127.0.0.1",
        "--workers", "4",
        "--state-dir", "/var/lib/echfront",
    )  # fmt: skip
    assert options["config"] == "front.toml"
    assert options["listen"] == ["tcp:8443", "unix:/run/front.sock"]
    assert options["ech_keys"] == ["a.pem", "b.pem"]
    assert options["routes"] == [
        ("app.example", "tcp:10.0.0.2:443"),
        ("*.blog.example", "unix:/run/blog.sock"),
    ]
    assert options["public-cert"] == "public.pem"
    assert options["metrics"] == "tcp:9100:interface=127.0.0.1"
    assert options["workers"] == 4
    assert options["state-dir"] == "/var/lib/echfront"
    assert options.has_flags


def test_short_config_flag_and_equals_forms() -> None:
    options = parse("-c", "f.toml", "--workers=2", "--metrics=tcp:0")
    assert (options["config"], options["workers"], options["metrics"]) == ("f.toml", 2, "tcp:0")
    assert not options.has_flags  # --config, --metrics and --workers are not quick flags


@pytest.mark.parametrize("flag", ["--listen", "--ech-key", "--route", "--public-cert"])
def test_quick_flags(flag: str) -> None:
    value = "a.example=tcp:1.2.3.4:443" if flag == "--route" else "x"
    assert parse(flag, value).has_flags


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--route", "app.example"], "expected NAME=CLIENT_ENDPOINT"),
        (["--route", "=tcp:1:2"], "expected NAME=CLIENT_ENDPOINT"),
        (["--route", "app.example="], "expected NAME=CLIENT_ENDPOINT"),
        (["--route", "bad..name=tcp:1:2"], "--route: "),
        (["--workers", "many"], "many"),
        (["--unknown"], "unknown"),
    ],
)
def test_bad_flags(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(*args)


# -- options_to_config --------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Key files and a certificate for the public name (real files)."""
    base = tmp_path_factory.mktemp("tap-files")
    ca = TestCA(base / "ca")
    issued = ca.issue([PUBLIC_NAME])
    key_a = generate_key(PUBLIC_NAME, config_id=0x42, maximum_name_length=32)
    key_b = generate_key(PUBLIC_NAME, config_id=0x43, maximum_name_length=32)
    write_key_file(base / "a.pem", [key_a])
    write_key_file(base / "b.pem", [key_b])
    return {
        "dir": base,
        "a": base / "a.pem",
        "b": base / "b.pem",
        "cert": issued.chain,
        "key": issued.key,
        "combined": issued.combined,
    }


def write_config(path: Path, files: dict[str, Path], body: str = "", keys: str = "a") -> Path:
    key_lines = "".join(f'[[ech.keys]]\nfile = "{files[k]}"\n' for k in keys)
    path.write_text(
        textwrap.dedent(
            f"""\
            listen = ["tcp:8443:interface=127.0.0.1"]
            public_name = "{PUBLIC_NAME}"
            default = "public"
            {body}
            {key_lines}
            [public]
            cert = "{files["cert"]}"
            key = "{files["key"]}"

            [backends.app]
            endpoint = "tcp:127.0.0.1:{BACKEND_PORT}"

            [[routes]]
            name = "{SECRET_NAME}"
            backend = "app"
            """
        )
    )
    return path


def test_file_alone(tmp_path: Path, files: dict[str, Path]) -> None:
    path = write_config(tmp_path / "front.toml", files, "workers = 3\n[metrics]\nlisten = 'tcp:1'")
    config, lines = tap.options_to_config(parse("--config", str(path)))
    assert lines == []
    assert config.listen == ("tcp:8443:interface=127.0.0.1",)
    assert config.keys == (KeyFileConfig(files["a"]),)
    assert config.metrics_listen == "tcp:1"
    assert config.workers == 3
    assert config.source == path


def test_flags_override_and_extend_the_file(tmp_path: Path, files: dict[str, Path]) -> None:
    path = write_config(tmp_path / "front.toml", files, "[metrics]\nlisten = 'tcp:1'")
    config, _ = tap.options_to_config(
        parse(
            "--config",
            str(path),
            "--listen",
            "tcp:9443",
            "--listen",
            "tcp:9444",
            "--ech-key",
            str(files["b"]),
            "--public-cert",
            str(files["combined"]),
            "--route",
            "new.example=tcp:10.0.0.9:443",
            "--metrics",
            "tcp:9100",
        )
    )
    # listen: the flags replace the file's list.
    assert config.listen == ("tcp:9443", "tcp:9444")
    # keys: the flags add to the file's keys.
    assert config.keys == (KeyFileConfig(files["a"]), KeyFileConfig(files["b"].resolve()))
    # public cert: the flag replaces the section (one combined file, no key).
    assert config.public is not None
    assert (config.public.cert, config.public.key) == (files["combined"].resolve(), None)
    assert config.public.factory == "echfront.web:public_service"
    # routes: the flags come after the file's, each with its own backend.
    assert [(r.name, r.target) for r in config.routes] == [
        (SECRET_NAME, "backend:app"),
        ("new.example", "backend:route#1"),
    ]
    assert config.backends["route#1"].endpoint == "tcp:10.0.0.9:443"
    assert config.backends["app"].endpoint == f"tcp:127.0.0.1:{BACKEND_PORT}"
    # --metrics over [metrics] listen.
    assert config.metrics_listen == "tcp:9100"


def test_flags_without_a_file() -> None:
    config, lines = tap.options_to_config(
        parse("--listen", "tcp:1", "--route", "a.example=tcp:h:1", "--route", "b.example=tcp:h:2")
    )
    assert lines == []
    assert config.listen == ("tcp:1",)
    assert config.source is None
    assert [(r.name, r.target) for r in config.routes] == [
        ("a.example", "backend:route#1"),
        ("b.example", "backend:route#2"),
    ]
    assert config.backends["route#2"].endpoint == "tcp:h:2"
    assert config.default == Config().default


def test_demo_when_given_nothing(tmp_path: Path) -> None:
    config, lines = tap.options_to_config(parse("--state-dir", str(tmp_path / "demo")))
    assert config.listen == ("tcp:8443:interface=127.0.0.1",)
    assert config.public_name == "public.localhost"
    assert (tmp_path / "demo" / "ech.pem").exists()
    assert lines[0].startswith("echfront demo: no configuration given")
    config, _ = tap.options_to_config(
        parse("--state-dir", str(tmp_path / "demo"), "--metrics", "tcp:9100")
    )
    assert config.metrics_listen == "tcp:9100"


# -- makeService ----------------------------------------------------------------------------


@pytest.fixture
def no_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)


@pytest.mark.usefixtures("no_worker_env")
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--config", "/nonexistent/front.toml"], "/nonexistent/front.toml: cannot read"),
        (["--listen", "tcp:1", "--ech-key", "/nonexistent/k.pem"], "/nonexistent/k.pem"),
        (["--listen", "nonsense:1"], "listen: 'nonsense:1'"),
        (["--listen", "tcp:1", "--metrics", "nonsense:2"], "metrics: 'nonsense:2'"),
    ],
)
def test_config_error_is_one_line_and_exit_1(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        tap.makeService(parse(*args), MemoryReactorClock())
    assert raised.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("echfront: error: ")
    assert needle in lines[0]


@pytest.mark.usefixtures("no_worker_env")
def test_make_service_for_a_file(tmp_path: Path, files: dict[str, Path]) -> None:
    path = write_config(tmp_path / "front.toml", files)
    reactor = MemoryReactorClock()
    service = tap.makeService(parse("--config", str(path), "--metrics", "tcp:9100"), reactor)
    assert isinstance(service, FrontService)
    assert service.worker is None
    service.startService()
    try:
        ports = sorted((port, interface) for port, _f, _b, interface in reactor.tcpServers)
        assert ports == [(8443, "127.0.0.1"), (9100, "")]
        factories: dict[int, object] = {port: f for port, f, _b, _i in reactor.tcpServers}
        # Every listener builds through the front's factory (ListenerFactory).
        assert getattr(factories[8443], "front", None) is service.factory
        # A tcp: port closes refused sockets itself: refusals answer None there.
        assert getattr(factories[8443], "bare_port", None) is True
        assert isinstance(factories[9100], QuietSite)
        # Start-up's objects leave the collector's sight once the reactor runs.
        assert (tap.freeze_startup_objects, (), {}) in reactor.whenRunningHooks
    finally:
        service.stopService()


def test_freeze_startup_objects_freezes_what_is_alive() -> None:
    kept = [[index] for index in range(100)]  # containers: objects the collector tracks
    gc.unfreeze()
    try:
        tap.freeze_startup_objects()
        assert gc.get_freeze_count() > len(kept)
    finally:
        gc.unfreeze()


@pytest.mark.usefixtures("no_worker_env")
def test_make_service_demo_prints_its_instructions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reactor = MemoryReactorClock()
    service = tap.makeService(parse("--state-dir", str(tmp_path)), reactor)
    assert isinstance(service, FrontService)
    out = capsys.readouterr().out
    assert out.startswith("echfront demo: no configuration given")
    assert "https://127.0.0.1:8443/" in out
    assert service.factory.state.decoder.keys.config_ids  # the demo's key is loaded


@pytest.mark.usefixtures("no_worker_env")
def test_make_service_with_workers_builds_a_supervisor(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    path = write_config(tmp_path / "front.toml", files)
    parent = tap.makeService(parse("--config", str(path), "--workers", "3"), MemoryReactorClock())
    assert isinstance(parent, MultiService)
    (service,) = list(parent)
    assert isinstance(service, Supervisor)
    try:
        assert service.count == 3
        assert service.argv[-3:] == ["echfront", "--config", str(path.resolve())]
        assert [listener.tcp.port for listener in service.listeners if listener.tcp] == [8443]
    finally:
        shutil.rmtree(service.metrics_dir, ignore_errors=True)

    with_metrics = tap.makeService(
        parse("--config", str(path), "--workers", "2", "--metrics", "tcp:9100"),
        MemoryReactorClock(),
    )
    assert isinstance(with_metrics, MultiService)
    children = list(with_metrics)
    assert isinstance(children[0], Supervisor)
    assert isinstance(children[1], StreamServerEndpointService)
    shutil.rmtree(children[0].metrics_dir, ignore_errors=True)


def test_make_service_in_a_worker_listens_itself(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WORKER_ENV, "1")
    path = write_config(tmp_path / "front.toml", files, "workers = 4")
    service = tap.makeService(parse("--config", str(path)), MemoryReactorClock())
    assert isinstance(service, FrontService)
    assert service.worker == 1
    assert list(service) == []  # no endpoint services: worker_listen at start instead


def test_metrics_service(files: dict[str, Path]) -> None:
    reactor = MemoryReactorClock()
    metrics = Metrics()
    service = metrics_service("tcp:9100:interface=127.0.0.1", metrics.registry, reactor)
    service.startService()
    ((port, site, _backlog, interface),) = reactor.tcpServers
    assert (port, interface) == (9100, "127.0.0.1")
    assert isinstance(site, QuietSite)
    assert isinstance(site.resource, MetricsResource)
    metrics.reloads.labels("success").inc()
    body = site.resource.render(DummyRequest([b"metrics"]))
    assert b'echfront_reloads_total{result="success"} 1.0' in body
    service.stopService()
    with pytest.raises(ConfigError, match=r"metrics: 'what:ever'"):
        metrics_service("what:ever", metrics.registry, reactor)


# -- FrontService: reload -------------------------------------------------------------------


class ThreadlessReactor(MemoryReactorClock):
    """A memory reactor with callFromThread, as SIGHUP handling needs."""

    def callFromThread(self, f: Callable[..., object], *args: object, **kw: object) -> None:
        f(*args, **kw)


class ServiceTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="echfront-test-tap-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        base = self.dir / "files"
        ca = TestCA(base / "ca")
        issued = ca.issue([PUBLIC_NAME])
        self.keys: dict[str, ECHKey] = {
            "a": KEY,
            "b": generate_key(PUBLIC_NAME, config_id=0x43, maximum_name_length=32),
        }
        write_key_file(base / "a.pem", [self.keys["a"]])
        write_key_file(base / "b.pem", [self.keys["b"]])
        self.files = {
            "a": base / "a.pem",
            "b": base / "b.pem",
            "cert": issued.chain,
            "key": issued.key,
        }
        self.path = self.dir / "front.toml"
        self.reactor = ThreadlessReactor()
        self.net = Network(self.reactor)
        self.backends = RecordingFactory()
        TCP4ServerEndpoint(self.reactor, BACKEND_PORT).listen(self.backends)
        self.previous_hup = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.previous_hup)

    def configure(self, body: str = "", keys: str = "a") -> None:
        write_config(self.path, self.files, body, keys)
        bump_mtime(self.path)

    def service(self, body: str = "", keys: str = "a") -> FrontService:
        self.configure(body, keys)
        return FrontService(lambda: load_config_file(self.path), self.reactor)

    def reloads(self, service: FrontService, result: str) -> float:
        value = service.metrics.registry.get_sample_value(
            "echfront_reloads_total", {"result": result}
        )
        return 0.0 if value is None else value

    def connect(self, service: FrontService) -> tuple[Pipe, RecordingServer]:
        front = service.factory.buildProtocol(CLIENT_ADDRESS)
        assert front is not None
        client = RecordingServer()
        return self.net.connect(client, front), client


_MTIME = [1_700_000_000_000_000_000]


def bump_mtime(path: Path) -> None:
    """Give ``path`` a new, later mtime (coarse filesystem clocks would hide a change)."""
    _MTIME[0] += 1_000_000_000
    os.utime(path, ns=(_MTIME[0], _MTIME[0]))


def config_ids(service: FrontService) -> set[int]:
    return set(service.factory.state.decoder.keys.config_ids)


def key_info_ids(service: FrontService) -> set[str]:
    """config_ids the metrics describe as in service."""
    found = set()
    for family in service.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "echfront_ech_key_info" and sample.value == 1:
                found.add(sample.labels["config_id"])
    return found


def errors(events: Sequence[dict[str, Any]]) -> list[str]:
    return [
        formatEvent(e) for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]


class ReloadTests(ServiceTestCase):
    def test_reload_swaps_the_state_and_counts_success(self) -> None:
        service = self.service()
        before = service.factory.state
        self.assertEqual(config_ids(service), {0x42})
        self.assertEqual(key_info_ids(service), {"66"})
        self.configure(keys="b")
        with capturedLogs() as events:
            self.assertTrue(service.reload())
        self.assertIsNot(service.factory.state, before)
        self.assertEqual(config_ids(service), {0x43})
        self.assertEqual(key_info_ids(service), {"67"})
        self.assertEqual(self.reloads(service, "success"), 1)
        self.assertEqual(self.reloads(service, "failure"), 0)
        self.assertEqual(errors(events), [])
        self.assertIn("reloaded: 1 ECH configs, 2 targets", [formatEvent(e) for e in events])

    def test_new_connections_use_the_new_keys(self) -> None:
        service = self.service()
        self.configure(keys="b")
        service.reload()
        pipe, _client = self.connect(service)
        pipe.client.write(seal_hello(self.keys["b"].config).records)
        self.net.flush()
        (front,) = service.factory.connections
        assert front.record.hello is not None
        self.assertIs(front.record.hello.status, ECHStatus.ACCEPTED)
        self.assertIs(front.state, service.factory.state)
        # The old key no longer decrypts (it would be routed to the public name).
        decoder = service.factory.state.decoder
        old = decoder.decode(read_flight(seal_hello(self.keys["a"].config).records))
        self.assertIs(old.status, ECHStatus.REJECTED)

    def test_reload_picks_up_limits(self) -> None:
        service = self.service()
        self.configure("[limits]\nhpke_rate = 5\nhpke_burst = 7")
        service.reload()
        self.assertEqual(service.factory.state.settings.hpke_rate, 5)
        self.assertEqual(service.factory.state.settings.hpke_burst, 7)

    def assert_failed_reload_keeps_state(self, break_it: Callable[[], None], needle: str) -> None:
        service = self.service()
        before = service.factory.state
        config = service.config
        break_it()
        with capturedLogs() as events:
            self.assertFalse(service.reload())
        self.assertIs(service.factory.state, before)
        self.assertIs(service.config, config)
        self.assertEqual(self.reloads(service, "failure"), 1)
        self.assertEqual(self.reloads(service, "success"), 0)
        self.assertEqual(key_info_ids(service), {"66"})
        (line,) = errors(events)
        self.assertTrue(
            line.startswith("reload failed, still serving the previous configuration: "), line
        )
        self.assertIn(needle, line)
        self.assertNotIn("\n", line)

    def test_invalid_toml_keeps_the_old_state(self) -> None:
        def break_it() -> None:
            self.path.write_text("listen = [\n")

        self.assert_failed_reload_keeps_state(break_it, "not valid TOML")

    def test_invalid_value_keeps_the_old_state(self) -> None:
        self.assert_failed_reload_keeps_state(
            lambda: self.configure("[limits]\nfirst_flight_timeout = -1"),
            "limits.first_flight_timeout: must be greater than 0",
        )

    def test_missing_key_file_keeps_the_old_state(self) -> None:
        def break_it() -> None:
            self.files["a"].unlink()

        self.assert_failed_reload_keeps_state(break_it, "a.pem: cannot read key file")

    def test_broken_certificate_keeps_the_old_state(self) -> None:
        def break_it() -> None:
            self.files["cert"].write_text("not a certificate\n")

        self.assert_failed_reload_keeps_state(break_it, "no PEM CERTIFICATE block")

    def test_listen_change_is_reported_and_not_applied(self) -> None:
        service = self.service()
        self.path.write_text(
            self.path.read_text().replace(
                "tcp:8443:interface=127.0.0.1", "tcp:9443:interface=127.0.0.1"
            )
        )
        with capturedLogs() as events:
            self.assertTrue(service.reload())
        warnings = [formatEvent(e) for e in events if e.get("log_level") is LogLevel.warn]
        self.assertEqual(warnings, ["listen and metrics endpoints change only on restart"])

    def test_sighup_reloads(self) -> None:
        service = self.service()
        service.startService()
        try:
            self.configure(keys="ab")
            handler = signal.getsignal(signal.SIGHUP)
            assert callable(handler)
            handler(signal.SIGHUP, None)
            self.assertEqual(config_ids(service), {0x42, 0x43})
            self.assertEqual(self.reloads(service, "success"), 1)
        finally:
            service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.previous_hup)


class WatchTests(ServiceTestCase):
    body = "[reload]\nwatch = true\ninterval = 2\n"

    def test_watcher_reloads_after_a_key_file_change(self) -> None:
        service = self.service(self.body)
        service.startService()
        self.addCleanup(service.stopService)
        self.reactor.advance(2)
        self.reactor.advance(2)
        self.assertEqual(self.reloads(service, "success"), 0)  # nothing changed

        # The key file itself is replaced (as a key rotation does).
        write_key_file(self.files["a"], [self.keys["b"]], overwrite=True)
        bump_mtime(self.files["a"])
        self.reactor.advance(1.9)
        self.assertEqual(self.reloads(service, "success"), 0)
        self.reactor.advance(0.1)
        self.assertEqual(self.reloads(service, "success"), 1)
        self.assertEqual(config_ids(service), {0x43})
        self.reactor.advance(2)
        self.reactor.advance(2)
        self.assertEqual(self.reloads(service, "success"), 1)

    def test_watcher_reloads_after_a_config_change(self) -> None:
        service = self.service(self.body)
        service.startService()
        self.addCleanup(service.stopService)
        self.configure(self.body, keys="ab")
        self.reactor.advance(2)
        self.assertEqual(config_ids(service), {0x42, 0x43})
        # Files added by the new config are watched from now on.
        write_key_file(self.files["b"], [generate_key(PUBLIC_NAME, config_id=9)], overwrite=True)
        bump_mtime(self.files["b"])
        self.reactor.advance(2)
        self.assertEqual(config_ids(service), {0x42, 9})
        self.assertEqual(self.reloads(service, "success"), 2)

    def test_a_broken_file_is_reported_once(self) -> None:
        service = self.service(self.body)
        service.startService()
        self.addCleanup(service.stopService)
        before = service.factory.state
        self.path.write_text("listen = [\n")
        bump_mtime(self.path)
        with capturedLogs() as events:
            for _ in range(5):
                self.reactor.advance(2)
        self.assertEqual(len(errors(events)), 1)
        self.assertEqual(self.reloads(service, "failure"), 1)
        self.assertIs(service.factory.state, before)
        # Fixed: reloaded at the next poll.
        self.configure(self.body, keys="b")
        self.reactor.advance(2)
        self.assertEqual(self.reloads(service, "success"), 1)
        self.assertEqual(config_ids(service), {0x43})

    def test_check_files_directly(self) -> None:
        service = self.service(self.body)
        service.startService()
        self.addCleanup(service.stopService)
        service._check_files()
        self.assertEqual(self.reloads(service, "success"), 0)
        bump_mtime(self.files["cert"])
        service._check_files()
        self.assertEqual(self.reloads(service, "success"), 1)

    def test_no_watcher_unless_configured(self) -> None:
        service = self.service()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.configure(keys="b")
        self.reactor.advance(60)
        self.assertEqual(self.reloads(service, "success"), 0)

    def test_watcher_stops_with_the_service(self) -> None:
        service = self.service(self.body)
        service.startService()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        service.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])


# -- FrontService: graceful shutdown ----------------------------------------------------------


class ShutdownTests(ServiceTestCase):
    def started(self, grace: float) -> FrontService:
        service = self.service(
            f"[limits]\nshutdown_grace = {grace}\nfirst_flight_timeout = 600\nidle_timeout = 0"
        )
        service.startService()
        return service

    def stop(self, service: FrontService) -> list[object]:
        done = service.stopService()
        self.assertIsInstance(done, Deferred)
        fired: list[object] = []
        done.addBoth(fired.append)
        return fired

    def test_without_connections_stops_at_once(self) -> None:
        fired = self.stop(self.started(30))
        self.assertEqual(fired, [None])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_waits_for_an_open_connection_to_close(self) -> None:
        service = self.started(30)
        pipe, client = self.connect(service)
        fired = self.stop(service)
        self.assertEqual(fired, [])
        self.reactor.advance(10)
        self.net.flush()
        self.assertEqual(fired, [])
        self.assertFalse(pipe.server.disconnecting)
        pipe.client.loseConnection()
        self.net.flush()
        self.reactor.advance(0.1)
        self.assertEqual(fired, [None])
        self.assertEqual(client.events, ["made", "lost"])
        self.assertFalse(pipe.server.aborted)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_aborts_what_is_left_after_the_grace_period(self) -> None:
        service = self.started(3)
        pipe, client = self.connect(service)
        (front,) = service.factory.connections
        fired = self.stop(service)
        self.reactor.advance(2.9)
        self.net.flush()
        self.assertEqual(fired, [])
        self.assertFalse(pipe.server.disconnecting)
        self.reactor.advance(0.25)
        self.net.flush()
        # Aborted at the end of the grace period; the stop completes once the
        # connection is really closed (so it is still logged and counted).
        self.assertTrue(pipe.server.aborted)
        self.reactor.advance(0.1)
        self.net.flush()
        self.assertEqual(fired, [None])
        self.assertEqual(client.events, ["made", "lost"])
        self.assertEqual(front.record.limit, "shutdown_grace")
        self.assertEqual(front.record.close_reason, "shutdown")
        self.assertEqual(
            service.metrics.registry.get_sample_value(
                "echfront_limited_connections_total", {"limit": "shutdown_grace"}
            ),
            1,
        )

    def test_stops_listening_first(self) -> None:
        service = self.started(30)
        endpoints = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(endpoints), 1)
        self.connect(service)
        self.stop(service)
        self.assertFalse(service.running)
        self.assertFalse(endpoints[0].running)


# -- a HelloRetryRequest in progress across a reload ---------------------------------------------


class HelloRetryAcrossReloadTests(RelayTestCase):
    """The second ClientHello opens with the first one's HPKE context (§7.1.1)."""

    def start_hrr(self) -> tuple[Any, Pipe, Any, RecordingServer, Pipe, RecordingServer]:
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, front, client, backend_pipe, backend = self.relay_to(sealed.records)
        backend.send(server_hello(retry=True))
        self.net.flush()
        self.assertTrue(front.record.hello_retry)
        return sealed, pipe, front, client, backend_pipe, backend

    def reload_to(self, keys: KeySet) -> FrontState:
        state = FrontState(
            ECHDecoder(keys), FixedRouter(self.backend), frozenset({self.backend}), FrontSettings()
        )
        self.factory.state = state
        return state

    def test_second_hello_after_a_reload_removing_every_key(self) -> None:
        sealed, pipe, front, client, backend_pipe, backend = self.start_hrr()
        old_state = front.state
        self.reload_to(KeySet())
        second = sealed.second()
        pipe.client.write(second.records)
        self.net.flush()
        self.assertEqual(bytes(backend.data), inner_records(sealed) + inner_records(second, 0x0303))
        self.assertEqual(bytes(client.data), server_hello(retry=True))
        self.assert_fast_path(front, pipe, backend_pipe)
        self.assertIs(front.state, old_state)
        # A new connection with the removed key is now rejected.
        _pipe, new_front, _client = self.open(seal_hello(KEY.config).records)
        assert new_front.record.hello is not None
        self.assertIs(new_front.record.hello.status, ECHStatus.REJECTED)

    def test_second_hello_after_a_reload_reusing_the_config_id(self) -> None:
        # A rotated key under the same config_id must not be used for CH2.
        sealed, pipe, front, _client, backend_pipe, backend = self.start_hrr()
        self.reload_to(KeySet([generate_key(PUBLIC_NAME, config_id=KEY.config_id)]))
        second = sealed.second()
        pipe.client.write(second.records)
        self.net.flush()
        self.assertEqual(bytes(backend.data), inner_records(sealed) + inner_records(second, 0x0303))
        self.assert_fast_path(front, pipe, backend_pipe)


class HelloRetryAcrossServiceReloadTests(ServiceTestCase):
    def test_service_reload_between_hrr_and_second_hello(self) -> None:
        service = self.service()
        service.startService()
        self.addCleanup(service.stopService)
        sealed = seal_hello(KEY.config, InnerSpec())
        pipe, client = self.connect(service)
        pipe.client.write(sealed.records)
        self.net.flush()
        backend_pipe, _relay_side, _server = self.net.complete_backend(self.reactor)
        self.net.flush()
        backend = self.backends.built[-1]
        backend.send(server_hello(retry=True))
        self.net.flush()

        self.configure(keys="b")  # the key in use is gone from the new configuration
        self.assertTrue(service.reload())
        self.assertEqual(config_ids(service), {0x43})

        second = sealed.second()
        pipe.client.write(second.records)
        self.net.flush()
        self.assertEqual(bytes(backend.data), inner_records(sealed) + inner_records(second, 0x0303))
        self.assertEqual(bytes(client.data), server_hello(retry=True))
        self.assertFalse(pipe.server.disconnecting)
        self.assertFalse(backend_pipe.client.disconnecting)


def test_the_running_service_moved_with_a_warning() -> None:
    """``echfront.tap`` is Options and makeService; the old names still resolve, warning."""
    with pytest.warns(DeprecationWarning, match=r"echfront\.tap\.FrontService moved to"):
        assert tap.FrontService is FrontService
    with pytest.warns(DeprecationWarning, match=r"moved to echfront\.app\.service\.metrics_serv"):
        assert tap.metrics_service is metrics_service
    with pytest.raises(AttributeError):
        tap.no_such_name  # noqa: B018
    assert sorted(tap.__all__) == ["Options", "makeService", "options_to_config"]
