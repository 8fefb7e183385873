"""Padding from the routes (RFC 9849 §4, §6.1.3, §10.11; issue 15 item 1).

* :mod:`echfront.ech.padding` turns routed names into ``maximum_name_length``;
* the value does what §6.1.3 wants on the wire: ECH payloads for every
  routed name have one length, which they do not with 0;
* rotation inside the front, ``echfront keygen --config``, ``echfront keys
  add --config`` and the demo make keys with it;
* a front whose keys carry less warns once when its state is built, naming
  the route by position, never the name (item 3).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from echfront.app.demo import PRIVATE_NAME, demo_config
from echfront.cli.main import main
from echfront.config.build import build_state, padding_warning
from echfront.config.schema import load_config_file, parse_config
from echfront.ech.decoder import parse_outer_ech
from echfront.ech.echconfig import ECHConfig
from echfront.ech.keyset import KeySet, generate_key
from echfront.ech.padding import (
    NAME_LENGTH_STEP,
    WILDCARD_LABEL_LENGTH,
    derive_maximum_name_length,
    longest_name,
    name_length,
)
from echfront.ech.probe import build_probe
from echfront.keys.keydir import KeyDirectory
from echfront.keys.keyfile import read_key_file, write_key_file
from echfront.keys.rotation import Rotator
from echfront.tls.hello import EXT_ECH, ClientHello

#: Private names of the deployment these tests configure; none may be logged.
PRIVATE = ("app.example", "a-much-longer-private-name.example", "*.tenants.example")


# -- the derivation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "length"),
    [
        ("app.example", 11),
        ("app.example.", 11),
        ("*.tenants.example", WILDCARD_LABEL_LENGTH + len(".tenants.example")),
        ("x" * 63 + ".example", 71),
    ],
)
def test_name_length(pattern: str, length: int) -> None:
    assert name_length(pattern) == length


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ((), 0),  # unknown: §4 allows 0
        (("a.example",), 32),
        (("x" * 32,), 32),  # exactly a multiple stays
        (("x" * 33,), 64),
        (("app.example", "*.tenants.example"), 64),  # 32 + 16 = 48, rounded up
        (("x" * 63 + "." + "y" * 63 + "." + "z" * 63 + "." + "w" * 61,), 255),  # uint8 cap
    ],
)
def test_derive_rounds_up_to_the_step_and_caps(names: tuple[str, ...], expected: int) -> None:
    assert derive_maximum_name_length(names) == expected
    assert expected in (0, 255) or expected % NAME_LENGTH_STEP == 0


def test_longest_name_reports_the_first_of_equals() -> None:
    assert longest_name(["ab.example", "cd.example", "e.example"]) == (0, 10)
    assert longest_name([]) is None


def _payload_length(config: ECHConfig, name: str) -> int:
    """Length of the ECH payload a §6.1.3-padding client sends for ``name``."""
    outer = ClientHello.from_message(build_probe(name, config).outer)
    extension = outer.get(EXT_ECH)
    assert extension is not None
    return len(parse_outer_ech(extension).payload)


def test_derived_value_gives_every_routed_name_one_payload_length() -> None:
    """What the value is for: the ciphertext no longer tells the names apart (§10.11)."""
    names = ["a.example", "app.example", "a-much-longer-private-name.example", "b" * 40 + ".ex"]
    derived = derive_maximum_name_length(names)
    padded = generate_key("public.example", maximum_name_length=derived).config
    unpadded = generate_key("public.example", maximum_name_length=0).config
    assert len({_payload_length(padded, name) for name in names}) == 1
    assert len({_payload_length(unpadded, name) for name in names}) > 1


def test_wildcard_names_up_to_the_counted_label_share_the_length() -> None:
    derived = derive_maximum_name_length(["app.example", "*.tenants.example"])
    config = generate_key("public.example", maximum_name_length=derived).config
    under = [f"{'t' * size}.tenants.example" for size in (1, 8, WILDCARD_LABEL_LENGTH)]
    assert len({_payload_length(config, name) for name in [*under, "app.example"]}) == 1


# -- the configuration: rotation inside the front ----------------------------------


def _rotating_config(tmp_path: Path, **keys: object) -> dict[str, object]:
    return {
        "public_name": "public.example",
        "backends": {"app": "tcp:host=127.0.0.1:port=4433"},
        "routes": [{"name": name, "backend": "app"} for name in PRIVATE],
        "keys": {"directory": str(tmp_path / "keys"), "rotate": "24h", **keys},
        "publish": {"names": ["www." + "n" * 60 + ".example"]},
    }


def test_rotation_derives_from_routes_and_publish_names(tmp_path: Path) -> None:
    config = parse_config(_rotating_config(tmp_path), base=tmp_path)
    assert config.rotation is not None
    # The longest is the [publish] name: 4 + 60 + 8 = 72 octets -> 96.
    assert config.rotation.maximum_name_length == 96
    assert config.routed_names()[-1].startswith("www.")


@pytest.mark.parametrize("explicit", [0, 48])
def test_rotation_keeps_an_explicit_value(tmp_path: Path, explicit: int) -> None:
    data = _rotating_config(tmp_path, max_name_length=explicit)
    config = parse_config(data, base=tmp_path)
    assert config.rotation is not None
    assert config.rotation.maximum_name_length == explicit


def test_keys_made_by_rotation_carry_the_derived_value(tmp_path: Path) -> None:
    config = parse_config(_rotating_config(tmp_path), base=tmp_path)
    assert config.rotation is not None and config.key_directory is not None
    clock = Clock()
    clock.advance(1_800_000_000)
    directory = KeyDirectory(config.key_directory)
    rotator = Rotator(directory, config.rotation, None, clock, on_change=lambda: None)
    rotator.startService()
    rotator.stopService()
    keys = directory.load_keys()
    assert keys and {k.config.maximum_name_length for k in keys} == {96}


# -- the command line -------------------------------------------------------------


def _front_file(tmp_path: Path) -> Path:
    path = tmp_path / "front.toml"
    routes = "".join(f'\n[[routes]]\nname = "{name}"\nbackend = "app"\n' for name in PRIVATE)
    path.write_text('[backends.app]\nendpoint = "tcp:host=127.0.0.1:port=4433"\n' + routes)
    return path


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(argv))
    return status, out.getvalue()


def test_keygen_with_config_derives_the_value(tmp_path: Path) -> None:
    front = _front_file(tmp_path)
    expected = derive_maximum_name_length(PRIVATE)
    assert load_config_file(front).routed_names() == PRIVATE
    pem = tmp_path / "ech.pem"
    status, out = _cli(
        "keygen", "--public-name", "public.example", "--config", str(front), "--out", str(pem)
    )
    assert status == 0
    assert f"maximum_name_length {expected} (from {front})" in out
    (key,) = read_key_file(pem)
    assert key.config.maximum_name_length == expected == 64
    assert not any(name.lstrip("*.") in out for name in PRIVATE)


def test_keys_add_with_config_derives_the_value(tmp_path: Path) -> None:
    front = _front_file(tmp_path)
    keys = tmp_path / "keys"
    argv = ["keys", "add", "--dir", str(keys), "--public-name", "public.example"]
    status, _ = _cli(*argv, "--config", str(front), "--kem", "x25519")
    assert status == 0
    loaded = KeyDirectory(keys).load_keys()
    assert [k.config.maximum_name_length for k in loaded] == [64]


def test_keys_without_config_keep_zero(tmp_path: Path) -> None:
    pem = tmp_path / "ech.pem"
    assert _cli("keygen", "--public-name", "public.example", "--out", str(pem))[0] == 0
    assert read_key_file(pem)[0].config.maximum_name_length == 0


def test_config_and_explicit_length_exclude_each_other(tmp_path: Path) -> None:
    front = _front_file(tmp_path)
    err = io.StringIO()
    argv = ["keygen", "--public-name", "p.example", "--out", str(tmp_path / "k.pem")]
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        main([*argv, "--config", str(front), "--max-name-length", "9"])
    assert exited.value.code == 2
    assert "not allowed with argument" in err.getvalue()


def test_keygen_with_a_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("routes = 3\n")
    err = io.StringIO()
    argv = ["keygen", "--public-name", "p.example", "--out", str(tmp_path / "k.pem")]
    with contextlib.redirect_stderr(err):
        assert main([*argv, "--config", str(bad)]) == 2
    assert err.getvalue().count("\n") == 1 and "routes" in err.getvalue()
    assert not (tmp_path / "k.pem").exists()


def test_demo_key_is_padded_to_its_private_name(tmp_path: Path) -> None:
    config, _ = demo_config(tmp_path / "demo")
    (key,) = read_key_file(config.keys[0].path)
    assert key.config.maximum_name_length == derive_maximum_name_length([PRIVATE_NAME])
    assert key.config.maximum_name_length >= len(PRIVATE_NAME)


# -- the warning at start -------------------------------------------------------------


def _front_with_key(tmp_path: Path, maximum_name_length: int) -> Path:
    pem = tmp_path / f"ech-{maximum_name_length}.pem"
    write_key_file(pem, [generate_key("public.example", maximum_name_length=maximum_name_length)])
    front = _front_file(tmp_path)
    front.write_text(f'[ech]\nkeys = [{{ file = "{pem}" }}]\n' + front.read_text())
    return front


def _state_logs(front: Path) -> list[tuple[LogLevel, str]]:
    config = load_config_file(front)
    with capturedLogs() as events:
        build_state(config, Clock(), KeySet)
    return [(event["log_level"], formatEvent(event)) for event in events]


def test_short_keys_warn_once_naming_the_route_not_the_name(tmp_path: Path) -> None:
    logs = _state_logs(_front_with_key(tmp_path, 0))
    warnings = [text for level, text in logs if level is LogLevel.warn]
    assert len(warnings) == 1, logs
    (text,) = warnings
    # The longest is the wildcard, counted at 32 + 16 = 48 octets; it is routes[2].
    assert "routes[2]" in text and "48 octets" in text and "maximum_name_length 0" in text
    for _, line in logs:
        assert not any(name.lstrip("*.") in line for name in PRIVATE), line


def test_keys_padded_for_the_routes_do_not_warn(tmp_path: Path) -> None:
    logs = _state_logs(_front_with_key(tmp_path, derive_maximum_name_length(PRIVATE)))
    assert [text for level, text in logs if level is LogLevel.warn] == []


def test_no_routes_or_no_keys_no_warning(tmp_path: Path) -> None:
    config = load_config_file(_front_file(tmp_path))
    assert padding_warning(config, KeySet()) is None
    key = generate_key("public.example")
    assert padding_warning(parse_config({}, base=tmp_path), KeySet([key])) is None
