"""Configuration parsing and building: every error is one line naming the key."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from echfront.app.certs import TestCA
from echfront.config.schema import (
    Config,
    KeyFileConfig,
    build_state,
    load_config_file,
    parse_config,
    resolve_dotted,
)
from echfront.ech.decoder import ClientHelloInfo, ECHStatus
from echfront.ech.keyset import KeySet, generate_key, write_key_file
from echfront.errors import AlertDescription, ConfigError
from echfront.interfaces import ServiceContext
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
