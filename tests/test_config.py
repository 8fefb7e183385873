"""Configuration parsing and building: every error is one line naming the key.

``[publish]`` is parsed with the rest (echfront.config.schema) and its
publisher built from the DNS wing's classes (echfront.config.build).
"""

from __future__ import annotations

import base64
import dataclasses
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from echfront.app.certs import TestCA
from echfront.config import schema
from echfront.config.build import build_publisher, build_state, resolve_dotted
from echfront.config.schema import (
    Config,
    KeyFileConfig,
    load_config_file,
    parse_config,
    parse_publish,
)
from echfront.dns.command import CommandPublisher
from echfront.dns.rfc2136 import RFC2136Publisher, TSIGKey
from echfront.dns.verify import DNSServer
from echfront.ech.decoder import ClientHelloInfo, ECHStatus
from echfront.ech.keyset import KeySet, generate_key
from echfront.errors import AlertDescription, ConfigError
from echfront.front.state import FrontSettings
from echfront.interfaces import IPublisher, ServiceContext
from echfront.keys.keyfile import write_key_file
from echfront.routing import StaticRouter
from echfront.targets import Backend, Local, Reject
from tests.test_routing import hello

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PEER = IPv4Address("TCP", "127.0.0.1", 5000)


def parse(text: str, base: Path = Path("/etc/echfront")) -> Config:
    return parse_config(tomllib.loads(text), base=base)


def test_empty_config_has_safe_defaults() -> None:
    config = parse("")
    assert config.listen == ("tcp:443",)
    assert config.default == "reject:unrecognized_name"
    assert config.settings.first_flight_timeout == 10.0
    assert config.settings.max_first_flight == 65536
    assert not config.trial_decryption


def test_example_config_parses() -> None:
    config = load_config_file(EXAMPLES / "front.toml")
    assert config.public_name == "public.example"
    assert config.keys == (
        KeyFileConfig(Path("/etc/echfront/ech-current.pem"), True),
        KeyFileConfig(Path("/etc/echfront/ech-previous.pem"), False),
    )
    assert config.backends["app"].proxy_protocol == 2
    assert [(r.name, r.target, r.require_ech) for r in config.routes] == [
        ("app.example", "backend:app", True),
        ("*.blog.example", "backend:blog", False),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lisen = []", "lisen: unknown key"),
        ("listen = 'tcp:443'", "listen: expected list, got str"),
        (
            "[limits]\nfirst_flight_timeout = 0",
            "limits.first_flight_timeout: must be greater than 0",
        ),
        ("[limits]\nhandshake_timeout = true", "limits.handshake_timeout: expected a number"),
        ("[limits]\nmax_first_flight = 10", "limits.max_first_flight: must be 512..1048576"),
        ("[ech]\nkeys = [{}]", "ech.keys[0].file: required"),
        ("[ech]\nkeys = [{file='a', publish=true}]", "ech.keys[0].publish: unknown key"),
        ("[backends.b]\nendpoint = ''", "backends.b.endpoint: required"),
        (
            "[backends.b]\nendpoint = 'tcp:host=a:port=1'\nproxy_protocol = 3",
            "backends.b.proxy_protocol: must be 0 (off), 1 or 2",
        ),
        (
            "[[routes]]\nname = 'a.example'\nbackend = 'nope'",
            "routes[0].backend: no backend named 'nope'",
        ),
        ("[[routes]]\nname = 'a.example'", "routes[0]: give exactly one of backend"),
        ("[[routes]]\nname = 'a..example'\nreject = 'handshake_failure'", "routes[0].name:"),
        (
            "[[routes]]\nname = 'a.example'\nreject = 'oops'",
            "routes[0].reject: unknown alert 'oops'",
        ),
        ("[[routes]]\nname = 'a.example'\npublic = true", "needs a [public] section"),
        ("default = 'elsewhere'", "default: 'elsewhere' is not backend:NAME"),
        ("public_name = '1.2.3.4'", "public_name: public name '1.2.3.4' looks like an IP address"),
        (
            "[locals.public]\ncert = 'x'\nfactory = 'a:b'",
            "locals.public: the name 'public' is reserved",
        ),
        ("[locals.x]\ncert = 'x'", "locals.x.factory: required"),
        ("[public]\ncert = 'x'\nalpn = ['h,2']", "public.alpn: ALPN id 'h,2'"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.toml: cannot read"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_config_file(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[limits]\nfirst_flight_timout = 3\n")
    with pytest.raises(ConfigError, match=r"typo.toml: limits.first_flight_timout: unknown key"):
        load_config_file(typo)


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_text("[ech]\nkeys = [{file = 'k/ech.pem'}]\n")
    config = load_config_file(tmp_path / "f.toml")
    assert config.keys[0].path == tmp_path.resolve() / "k" / "ech.pem"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nodots", "is not a dotted name"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("echfront.web:nope", "'echfront.web' has no attribute 'nope'"),
    ],
)
def test_resolve_dotted_errors(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_dotted(name, "router.factory")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with an ECH key and certificates for a full configuration."""
    root = tmp_path_factory.mktemp("deploy")
    write_key_file(root / "ech.pem", [generate_key("public.example", config_id=3)])
    write_key_file(root / "old.pem", [generate_key("public.example", config_id=4)])
    ca = TestCA(root)
    ca.issue(["public.example"], "public")
    ca.issue(["blog.example"], "blog")
    return root


FULL = """
listen = ["tcp:0:interface=127.0.0.1"]
default = "public"
[ech]
keys = [{file = "ech.pem"}, {file = "old.pem", published = false}]
[public]
cert = "public.combined.pem"
[backends.app]
endpoint = "tcp:host=127.0.0.1:port=9"
connect_timeout = 2
[locals.blog]
cert = "blog.pem"
key = "blog.key"
factory = "echfront.web:public_service"
[[routes]]
name = "app.example"
backend = "app"
require_ech = true
[[routes]]
name = "blog.example"
local = "blog"
[[routes]]
name = "gone.example"
reject = "handshake_failure"
"""


def build(deployment: Path, text: str) -> tuple[Any, KeySet]:
    (deployment / "front.toml").write_text(text)
    config = load_config_file(deployment / "front.toml")
    holder: list[KeySet] = []
    state = build_state(config, MemoryReactorClock(), lambda: holder[0])
    holder.append(state.decoder.keys)
    return state, holder[0]


def test_build_state(deployment: Path) -> None:
    state, keys = build(deployment, FULL)
    assert [k.config_id for k in keys.keys] == [3, 4]
    assert [k.config_id for k in keys.published] == [3]
    router = state.router
    assert isinstance(router, StaticRouter)
    app = router.route(hello("app.example"), PEER)
    assert isinstance(app, Backend) and app.name == "app" and app.connect_timeout == 2
    assert app in state.targets
    blog = router.route(hello("blog.example"), PEER)
    assert isinstance(blog, Local) and blog.name == "blog" and blog in state.targets
    public = router.route(hello("public.example"), PEER)  # public name added automatically
    assert isinstance(public, Local) and public.name == "public"
    assert router.route(hello("unknown.example"), PEER) is public  # default = "public"
    gone = router.route(hello("gone.example"), PEER)
    assert gone == Reject(AlertDescription.HANDSHAKE_FAILURE, "configured rejection")
    refused = router.route(hello("app.example", status=ECHStatus.REJECTED), PEER)
    assert isinstance(refused, Reject)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("ech.pem", "missing.pem"), "missing.pem: cannot read key file"),
        (("public.combined.pem", "blog.pem"), "blog.pem: no usable PEM private key"),
        (('key = "blog.key"', 'key = "public.key"'), "the private key does not match"),
        (("tcp:host=127.0.0.1:port=9", "bogus:thing"), "backends.app.endpoint:"),
        (("echfront.web:public_service", "echfront.web:nothing"), "locals.blog.factory:"),
        (
            ("echfront.web:public_service", "echfront.web:StatusResource"),
            "locals.blog.factory: echfront.web:StatusResource failed: ",
        ),
        (
            ("echfront.web:public_service", "tests.test_config:not_a_router"),
            "locals.blog.factory: tests.test_config:not_a_router did not return a protocol factory",
        ),
    ],
)
def test_build_errors_are_one_line(deployment: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(deployment, FULL.replace(*change))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_custom_router_from_examples(deployment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    text = (
        FULL
        + """
[backends.tenant-acme]
endpoint = "tcp:host=127.0.0.1:port=10"
[router]
factory = "myrouter:make_router"
options = { suffix = ".apps.example" }
"""
    )
    state, _ = build(deployment, text)
    acme = state.router.route(hello("acme.apps.example"), PEER)
    assert isinstance(acme, Backend) and acme.name == "tenant-acme" and acme in state.targets
    # Unknown tenants fall back to the static table (default: public service).
    other = state.router.route(hello("other.apps.example"), PEER)
    assert isinstance(other, Local) and other.name == "public"
    sys.modules.pop("myrouter", None)


def test_router_factory_must_return_an_irouter(deployment: Path) -> None:
    text = FULL + '\n[router]\nfactory = "tests.test_config:not_a_router"\n'
    with pytest.raises(ConfigError, match="did not return an IRouter"):
        build(deployment, text)


def not_a_router(context: ServiceContext) -> object:
    return object()


def test_route_info_type_is_the_decoder_result() -> None:
    # The router's input type is the decoder's result type (documented API).
    assert ClientHelloInfo.__name__ == "ClientHelloInfo"


# -- [publish]: parsed with the rest, built from the DNS wing's classes ----------------

SECRET_NAME = "secret.example."
TSIG_B64 = base64.b64encode(b"k" * 32).decode()


@pytest.fixture
def tsig_file(tmp_path: Path) -> Path:
    path = tmp_path / "update.key"
    path.write_text(f"hmac-sha256:update.example.:{TSIG_B64}\n")
    return path


def publisher_of(
    table: dict[str, Any], base: Path, names: tuple[str, ...] = (SECRET_NAME,)
) -> object:
    """Parse a ``[publish]`` table (with ``names``) and build its publisher.

    An object, not an IPublisher: mypy-zope calls narrowing an interface to
    its implementer unreachable.
    """
    publish = parse_publish({**table, "names": list(names)}, base=base)
    return build_publisher(publish, reactor=MemoryReactorClock())


def test_publish_rfc2136(tmp_path: Path, tsig_file: Path) -> None:
    table = {
        "method": "rfc2136",
        "server": "[::1]:5300",
        "tsig_secret_file": tsig_file.name,  # relative to the file's directory
        "ttl": 60,
        "timeout": 1.5,
        "doh": "https://resolver.example/dns-query{?dns}",
    }
    publish = parse_publish({**table, "names": [SECRET_NAME]}, base=tmp_path)
    assert publish.tsig_secret_file == tsig_file
    publisher = publisher_of(table, tmp_path)
    assert isinstance(publisher, RFC2136Publisher)
    assert IPublisher.providedBy(publisher)
    assert publisher.server == DNSServer("::1", 5300)
    assert publisher.key == TSIGKey("update.example.", b"k" * 32, "hmac-sha256")
    assert (publisher.ttl, publisher.timeout, publisher.zone) == (60, 1.5, None)
    assert publisher.verifier.servers == (DNSServer("::1", 5300),)
    assert publisher.verifier.doh == "https://resolver.example/dns-query"


def test_publish_command_and_none(tmp_path: Path) -> None:
    table = {
        "method": "command",
        "command": [sys.executable, "-c", "pass", "{config_list}"],
        "verify_servers": ["127.0.0.1", "127.0.0.2:5353"],
    }
    publisher = publisher_of(table, tmp_path)
    assert isinstance(publisher, CommandPublisher)
    assert IPublisher.providedBy(publisher)
    assert publisher.verifier.servers == (DNSServer("127.0.0.1"), DNSServer("127.0.0.2", 5353))
    assert publisher_of({}, tmp_path) is None
    # "none" ignores the other (known) keys, so publication can be paused.
    assert publisher_of({"method": "none", "server": "bad"}, tmp_path) is None
    # A table with only names is "none" too, and needs no [keys] rotation.
    assert parse(f'[publish]\nnames = ["{SECRET_NAME}"]').publish.method == "none"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "blue"}, "publish.colour: unknown key"),
        ({"method": "nsupdate"}, "publish.method: expected"),
        ({"method": None}, "publish.method: required"),
        ({"server": None}, "publish.server: required"),
        ({"server": "ns.example"}, "publish.server: 'ns.example' is not an IP address"),
        ({"server": "[::1"}, r"publish.server: '\[::1' is not HOST\[:PORT\]"),
        ({"server": "127.0.0.1:0"}, "publish.server: '127.0.0.1:0': port must be 1..65535"),
        ({"server": 53}, "publish.server: expected a non-empty string"),
        ({"tsig_secret_file": None}, "publish.tsig_secret_file: required"),
        ({"tsig_secret_file": "missing.key"}, r"publish.tsig_secret_file: cannot read \("),
        ({"tsig_algorithm": "hmac-md5"}, "publish.tsig_algorithm: 'hmac-md5' is not one of"),
        ({"tsig_algorithm": "hmac-sha512"}, "publish.tsig_algorithm: .* says the key is"),
        ({"tsig_key_name": "other.example."}, "publish.tsig_key_name: other.example. is not in"),
        ({"ttl": True}, "publish.ttl: expected a whole number"),
        ({"ttl": -1}, "publish.ttl: expected a whole number"),
        ({"timeout": 0}, "publish.timeout: must be more than 0"),
        ({"timeout": "5"}, "publish.timeout: expected a number"),
        ({"verify_servers": "127.0.0.1"}, "publish.verify_servers: expected a non-empty list"),
        ({"verify_servers": ["127.0.0.1", ""]}, "publish.verify_servers: expected a list of"),
        ({"verify_servers": ["localhost"]}, "publish.verify_servers: 'localhost' is not"),
        ({"doh": "http://resolver.example/dns-query"}, "publish.doh: plain http://"),
        ({"doh": "ftp://resolver.example/"}, "publish.doh: 'ftp://resolver.example/' is not"),
        ({"zone": "other.example."}, "publish.zone: secret.example. is not in zone"),
        ({"command": ["true"]}, 'publish.command: only used with method = "command"'),
    ],
)
def test_publish_errors(
    tmp_path: Path, tsig_file: Path, change: dict[str, Any], message: str
) -> None:
    table: dict[str, Any] = {
        "method": "rfc2136",
        "server": "127.0.0.1:5300",
        "tsig_secret_file": str(tsig_file),
    }
    table.update(change)
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(ConfigError, match=message) as caught:
        publisher_of(table, tmp_path)
    assert "\n" not in str(caught.value)


def test_publish_errors_command_and_keys(tmp_path: Path, tsig_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"publish.command: required"):
        publisher_of({"method": "command", "verify_servers": ["127.0.0.1"]}, tmp_path)
    with pytest.raises(ConfigError, match=r"publish.verify_servers: required"):
        publisher_of({"method": "command", "command": ["true"]}, tmp_path)
    with pytest.raises(ConfigError, match=r"publish.command: .*no-such-hook: program not found"):
        publisher_of(
            {"method": "command", "command": ["./no-such-hook"], "verify_servers": ["::1"]},
            tmp_path,
        )
    with pytest.raises(ConfigError, match=r'publish.server: only used with method = "rfc2136"'):
        publisher_of(
            {"method": "command", "command": ["true"], "server": "::1", "verify_servers": ["::1"]},
            tmp_path,
        )
    with pytest.raises(ConfigError, match=r"publish\.names: required to publish"):
        publisher_of({"method": "command", "command": ["true"]}, tmp_path, names=())
    with pytest.raises(ConfigError, match=r"publish\.names: 'a\.\.b' is not a domain name"):
        publisher_of({"method": "command", "command": ["true"]}, tmp_path, names=("a..b",))
    bare = tmp_path / "bare.key"
    bare.write_text(TSIG_B64)
    table = {"method": "rfc2136", "server": "127.0.0.1", "tsig_secret_file": str(bare)}
    with pytest.raises(ConfigError, match=r"publish.tsig_key_name: required"):
        publisher_of(table, tmp_path)
    named = publisher_of({**table, "tsig_key_name": "k."}, tmp_path)
    assert isinstance(named, RFC2136Publisher) and named.key.name == "k."


def test_publish_is_checked_when_the_file_is_loaded(tmp_path: Path) -> None:
    """A bad [publish] value is reported by parse_config, naming the key, like any other."""
    keys = f'[keys]\ndirectory = "{tmp_path}"\npublic_name = "p.example"\nrotate = "24h"\n'
    bad = (
        keys + f'[publish]\nmethod = "rfc2136"\nnames = ["{SECRET_NAME}"]\nserver = "ns.example"\n'
    )
    with pytest.raises(ConfigError, match=r"publish\.server: 'ns\.example' is not an IP address"):
        parse(bad)
    with pytest.raises(ConfigError, match=r"publish: needs \[keys\] directory and rotate"):
        parse('[publish]\nmethod = "none"')
    good = parse(
        keys + f'[publish]\nmethod = "command"\nnames = ["{SECRET_NAME}"]\n'
        'command = ["hook"]\nverify_servers = ["::1"]\n'
    )
    assert good.publish.command == ("hook",)
    assert good.publish.verify_servers == (DNSServer("::1"),)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1", "127.0.0.1", 53),
        ("127.0.0.1:5353", "127.0.0.1", 5353),
        ("::1", "::1", 53),
        ("[::1]:5353", "::1", 5353),
        ("[2001:db8::1]", "2001:db8::1", 53),
    ],
)
def test_publish_server_addresses(text: str, host: str, port: int) -> None:
    table = {"method": "command", "command": ["hook"], "verify_servers": [text]}
    (server,) = parse_publish({**table, "names": [SECRET_NAME]}, base=Path("/")).verify_servers
    assert (server.host, server.port) == (host, port)


def test_settings_defaults_come_from_the_dataclass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser restates no default: change the dataclass and an empty file follows."""
    assert parse("").settings == FrontSettings()
    changed = dataclasses.replace(
        FrontSettings(), idle_timeout=7.0, hpke_rate=50.0, hpke_burst=75.0
    )
    monkeypatch.setattr(schema, "FrontSettings", lambda **kw: dataclasses.replace(changed, **kw))
    settings = parse("").settings
    # What the file does not set is the dataclass's; hpke_burst follows hpke_rate.
    assert settings.idle_timeout == 7.0
    assert settings.hpke_rate == 50.0
    assert settings.hpke_burst == 75.0


def test_old_echfront_config_names_warn_and_resolve() -> None:
    """``echfront.config`` was a module (0.1.0); its names still work, with a warning."""
    import echfront.config  # noqa: PLC0415

    with pytest.warns(DeprecationWarning, match=r"echfront\.config\.Config moved to"):
        assert echfront.config.Config is Config
    with pytest.warns(DeprecationWarning, match=r"moved to echfront\.config\.build\.build_state"):
        assert echfront.config.build_state is build_state
    with pytest.warns(DeprecationWarning, match=r"moved to echfront\.interfaces\.ServiceContext"):
        assert echfront.config.ServiceContext is ServiceContext
    with pytest.raises(AttributeError):
        echfront.config.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    ("description", "address"),
    [
        ("tcp:host=127.0.0.1:port=9443", ("127.0.0.1", 9443)),
        ("tcp:127.0.0.1:9443", ("127.0.0.1", 9443)),  # Twisted's positional spelling
        ("tcp:127.0.0.1:port=9443", ("127.0.0.1", 9443)),
        (r"tcp:\:\:1:9443", ("::1", 9443)),
        ("tcp:127.0.0.1:9443:timeout=3", ("127.0.0.1", 9443)),
        ("tcp:127.0.0.1:9443:bindAddress=127.0.0.2", None),  # an option the direct path lacks
        ("tcp:127.0.0.1:host=127.0.0.1:9443", None),  # the host twice: Twisted decides
        ("tcp:127.0.0.1", None),
        ("tcp:127.0.0.1:https", None),
        ("tls:127.0.0.1:9443", None),
        ("unix:/run/backend.sock", None),
    ],
)
def test_plain_tcp_backends_take_the_direct_path(
    description: str, address: tuple[str, int] | None
) -> None:
    from echfront.config.endpoints import tcp_client_address  # noqa: PLC0415

    assert tcp_client_address(description) == address
