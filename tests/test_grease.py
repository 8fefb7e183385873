"""GREASE in ECH configurations (RFC 9849 §6.2.2, §11.3; checklist CFG-9).

Generated configs carry one reserved extension type with the high bit clear;
published lists lead with a decoy config carrying a reserved *mandatory*
type, which correct clients skip and which fails for a client that uses it.
Sans-IO parts are driven with bytes; the clients are real: Go's crypto/tls
(``echtest``) and BoringSSL (curl_cffi), against a ``twistd echfront``
process whose published list is read from its ``/.well-known/origin-svcb``.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from random import Random
from typing import Any

import dns.name
import dns.rdata
import pytest

from echfront.cli.check_dns import Answer, https_records
from echfront.cli.check_findings import Findings
from echfront.cli.main import main
from echfront.config.schema import load_config_file
from echfront.ech.decoder import ECHDecoder, ECHStatus, RejectReason
from echfront.ech.echconfig import (
    GREASE_EXTENSION_TYPES,
    ECHConfig,
    ECHConfigExtension,
    decode_config_list,
    encode_config_list,
)
from echfront.ech.grease import (
    GREASE_MANDATORY_TYPES,
    GREASE_OPTIONAL_TYPES,
    decoy_config,
    grease_extension,
    is_decoy,
)
from echfront.ech.hpke import RecipientKey
from echfront.ech.keyset import KeySet, generate_key, publication_list
from echfront.keys.keyfile import read_key_file, write_key_file
from tests.boringssl import curl_available, fetch
from tests.echhello import read_flight, seal_hello
from tests.frontproc import FrontProcess, Pki, make_pki
from tests.gotools import GoUnavailableError, go_binary, run_client

PUBLIC = "public.example"
PRIVATE = "private.example"


def _configs(config_list: bytes) -> list[ECHConfig]:
    return list(decode_config_list(config_list).configs)


# -- generated configs: one optional reserved type -------------------------------------------


def test_reserved_types_are_rfc_9849_section_11_3() -> None:
    assert GREASE_EXTENSION_TYPES[0] == 0x0000
    assert GREASE_EXTENSION_TYPES[1:] == tuple(0x0A0A + 0x1010 * n for n in range(1, 16))
    assert (0x0000, *(0x0A0A + 0x1010 * n for n in range(1, 8))) == GREASE_OPTIONAL_TYPES
    assert tuple(0x8A8A + 0x1010 * n for n in range(8)) == GREASE_MANDATORY_TYPES
    assert not any(t & 0x8000 for t in GREASE_OPTIONAL_TYPES)
    assert all(t & 0x8000 for t in GREASE_MANDATORY_TYPES)


def test_generated_configs_carry_one_random_optional_reserved_type() -> None:
    configs = [generate_key(PUBLIC).config for _ in range(64)]
    seen = set()
    lengths = set()
    for config in configs:
        (extension,) = config.extensions
        assert extension.type in GREASE_OPTIONAL_TYPES and not extension.mandatory
        assert not config.has_unknown_mandatory_extension  # clients keep using it
        seen.add(extension.type)
        lengths.add(len(extension.data))
    # Random per config: 64 draws from 8 types miss three only with p < 1e-10.
    assert len(seen) >= 6, seen
    assert lengths <= set(range(9)) and len(lengths) > 1


def test_grease_extension_draws_from_the_given_source() -> None:
    first = grease_extension(randbelow=Random(7).randrange)
    assert first == grease_extension(randbelow=Random(7).randrange)
    mandatory = {grease_extension(mandatory=True).type for _ in range(64)}
    assert mandatory <= set(GREASE_MANDATORY_TYPES) and len(mandatory) >= 6


def test_generate_key_grease_off_and_given_reserved_types() -> None:
    assert generate_key(PUBLIC, grease=False).config.extensions == ()
    given = ECHConfigExtension(0x3A3A, b"x")
    assert generate_key(PUBLIC, extensions=[given]).config.extensions == (given,)
    other = ECHConfigExtension(0x1234, b"")
    (kept, grease) = generate_key(PUBLIC, extensions=[other]).config.extensions
    assert kept == other and grease.type in GREASE_OPTIONAL_TYPES


def test_key_file_keeps_the_grease_extension(tmp_path: Path) -> None:
    key = generate_key(PUBLIC)
    write_key_file(tmp_path / "k.pem", [key])
    (loaded,) = read_key_file(tmp_path / "k.pem")
    assert loaded.config == key.config
    assert loaded.info == key.info  # the HPKE info covers the extension bytes


# -- published lists: a decoy first ----------------------------------------------------------


def test_decoy_leads_the_published_list() -> None:
    keys = [generate_key(PUBLIC, config_id=i, maximum_name_length=24) for i in (3, 4)]
    decoy, *real = _configs(publication_list([k.config for k in keys]))
    assert real == [k.config for k in keys]
    assert is_decoy(decoy) and decoy.has_unknown_mandatory_extension
    (extension,) = decoy.extensions
    assert extension.type in GREASE_MANDATORY_TYPES and len(extension.data) <= 8
    assert decoy.config_id not in (3, 4)
    # It looks like the real ones: same public name, padding and suites.
    assert decoy.public_name == PUBLIC and decoy.maximum_name_length == 24
    assert decoy.cipher_suites == real[0].cipher_suites
    assert decoy.kem_id == 0x0020 and len(decoy.public_key) == 32
    assert decoy.public_key not in {k.config.public_key for k in keys}


def test_decoy_is_derived_from_the_real_configs() -> None:
    key, other = generate_key(PUBLIC), generate_key(PUBLIC)
    published = publication_list([key.config])
    # Every path and worker publishes the same bytes for one key set...
    assert publication_list([key.config]) == published
    assert KeySet([key]).publication_list == published
    # ...a list read back (decoy included) gives the same list again...
    assert publication_list(_configs(published)) == published
    # ...and another key set gets another decoy.
    assert _configs(publication_list([other.config]))[0] != _configs(published)[0]


def test_decoy_types_vary_with_the_key_set() -> None:
    decoys = [decoy_config([generate_key(PUBLIC, grease=False).config]) for _ in range(48)]
    types = {d.extensions[0].type for d in decoys if d is not None}
    assert types <= set(GREASE_MANDATORY_TYPES) and len(types) >= 5, types


def test_decoy_config_id_is_never_a_real_one() -> None:
    base = generate_key(PUBLIC, grease=False).config
    all_but_one = [replace(base, config_id=i) for i in range(256) if i != 77]
    decoy = decoy_config(all_but_one)
    assert decoy is not None and decoy.config_id == 77
    assert decoy_config([*all_but_one, replace(base, config_id=77)]) is None
    assert decoy_config([]) is None


def test_grease_off_publishes_only_the_real_configs() -> None:
    key = generate_key(PUBLIC)
    assert publication_list([key.config], grease=False) == encode_config_list([key.config])
    assert KeySet([key], grease=False).publication_list == encode_config_list([key.config])
    assert KeySet([key.with_role(published=False)]).publication_list is None


def test_grease_switch_in_the_configuration(tmp_path: Path) -> None:
    text = '[keys]\ndirectory = "keys"\nrotate = "24h"\npublic_name = "public.example"\n'
    on = tmp_path / "on.toml"
    on.write_text(text)
    off = tmp_path / "off.toml"
    off.write_text("[ech]\ngrease = false\n" + text)
    loaded_on, loaded_off = load_config_file(on), load_config_file(off)
    assert loaded_on.grease and loaded_on.rotation is not None and loaded_on.rotation.grease
    assert not loaded_off.grease
    assert loaded_off.rotation is not None and not loaded_off.rotation.grease


def test_cli_publishes_decoys_unless_told_not_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = tmp_path / "k.pem"
    assert main(["keygen", "--public-name", PUBLIC, "--out", str(pem)]) == 0
    (key,) = read_key_file(pem)
    # keygen prints the key file's own list (as `inspect` does); `dns` publishes.
    assert base64.b64decode(capsys.readouterr().out.split()[-1]) == encode_config_list([key.config])
    for extra, decoys in (([], 1), (["--no-grease"], 0)):
        assert main(["dns", "--name", "secret.example", "--keys", str(pem), *extra]) == 0
        ech = capsys.readouterr().out.partition(' ech="')[2].strip().rstrip('"')
        configs = _configs(base64.b64decode(ech))
        assert [is_decoy(c) for c in configs] == [True] * decoys + [False]
    bare = tmp_path / "bare.pem"
    assert main(["keygen", "--public-name", PUBLIC, "--no-grease", "--out", str(bare)]) == 0
    assert read_key_file(bare)[0].config.extensions == ()


# -- the front: a decoy is an unknown config ---------------------------------------------------


def test_decoder_treats_a_decoy_as_an_unknown_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that uses the decoy anyway gets the rejection path, at no HPKE cost."""
    key = generate_key(PUBLIC)
    decoy = decoy_config([key.config])
    assert decoy is not None
    setups: list[object] = []
    original = RecipientKey.setup

    def counting(self: RecipientKey, *args: Any) -> Any:
        setups.append(args)
        return original(self, *args)

    monkeypatch.setattr(RecipientKey, "setup", counting)
    hello = seal_hello(decoy)  # what a client ignoring the mandatory bit would send
    info = ECHDecoder(KeySet([key])).decode(read_flight(hello.records))
    assert info.status is ECHStatus.REJECTED
    assert info.reject_reason is RejectReason.UNKNOWN_CONFIG_ID
    assert info.server_name == PUBLIC and info.forward == hello.records
    assert setups == []
    # The real config, with its GREASE extension in the HPKE info, still opens.
    assert ECHDecoder(KeySet([key])).decode(read_flight(seal_hello(key.config).records)).status is (
        ECHStatus.ACCEPTED
    )


def test_inspect_names_the_reserved_types(capsys: pytest.CaptureFixture[str]) -> None:
    key = generate_key(PUBLIC, config_id=5)
    published = publication_list([key.config])
    assert main(["inspect", base64.b64encode(published).decode()]) == 0
    out = capsys.readouterr().out
    assert "ECHConfigList: 2 config(s)" in out
    decoy, real = _configs(published)
    decoy_type, real_type = decoy.extensions[0].type, real.extensions[0].type
    assert f"extension 0x{decoy_type:04x} (mandatory, reserved: GREASE" in out
    assert f"extension 0x{real_type:04x} (reserved: GREASE" in out
    ids = [line.split()[-1] for line in out.splitlines() if line.startswith("  config_id:")]
    assert ids == [str(decoy.config_id), "5"]  # the decoy first


class _Lookup:
    """One HTTPS record, for ``echfront check``'s DNS step."""

    where = "test"

    def __init__(self, record: str) -> None:
        self.record = dns.rdata.from_text("IN", "HTTPS", record)

    def query(self, name: dns.name.Name, rdtype: object) -> Answer:
        return Answer(name, (self.record,), 300)


def test_check_reports_the_decoy_and_leaves_it_out() -> None:
    key = generate_key(PUBLIC, config_id=9)
    ech = base64.b64encode(publication_list([key.config])).decode()
    out = io.StringIO()
    findings = Findings(out)
    endpoints = https_records(
        _Lookup(f"1 . ech={ech}"), dns.name.from_text("secret.example"), findings
    )
    assert endpoints is not None
    (endpoint,) = endpoints
    assert endpoint.configs == [key.config]  # only real configs are probed and compared
    assert findings.errors == findings.warnings == 0, out.getvalue()
    assert "is a GREASE decoy that clients skip" in out.getvalue()


# -- real clients against a front ------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def front(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontProcess]:
    """A front serving the public name (status page, origin-svcb) and a local private name."""
    private = pki.certs[PRIVATE]
    config = {
        "public_name": PUBLIC,
        "ech": {"keys": [{"file": str(pki.ech_key)}]},
        "public": {"cert": str(pki.certs[PUBLIC].combined)},
        "locals": {
            "priv": {
                "cert": str(private.chain),
                "key": str(private.key),
                "factory": "tests.localapp:echo_factory",
                "alpn": ["http/1.1"],
            }
        },
        "routes": [{"name": PRIVATE, "local": "priv", "require_ech": True}],
    }
    with FrontProcess(tmp_path_factory.mktemp("front"), config) as proc:
        yield proc


def origin_svcb(front: FrontProcess, pki: Pki) -> bytes:
    """The ECHConfigList the front publishes at ``/.well-known/origin-svcb``."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    with (
        socket.create_connection(("127.0.0.1", front.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=PUBLIC) as tls,
    ):
        tls.sendall(
            f"GET /.well-known/origin-svcb HTTP/1.1\r\nHost: {PUBLIC}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    (endpoint,) = json.loads(body)["endpoints"]
    return base64.b64decode(endpoint["params"]["ech"])


@pytest.fixture(scope="module")
def go(pki: Pki) -> None:
    try:
        go_binary()
    except GoUnavailableError as error:
        pytest.skip(str(error))


@pytest.mark.interop
def test_front_publishes_the_decoy_first(front: FrontProcess, pki: Pki) -> None:
    published = origin_svcb(front, pki)
    (key,) = read_key_file(pki.ech_key)
    assert published == publication_list([key.config])
    decoy, real = _configs(published)
    assert is_decoy(decoy) and real == key.config


@pytest.mark.interop
def test_go_skips_the_decoy_and_uses_the_real_config(
    go: None, front: FrontProcess, pki: Pki
) -> None:
    published = origin_svcb(front, pki)
    (result,) = run_client(front.address, name=PRIVATE, ech=published, ca=pki.ca, send=1000)
    assert result["ok"] and result["ech_accepted"] and result["echo_ok"], result
    report = result["server_report"]
    assert report["ech_status"] == "accepted" and report["sni"] == PRIVATE
    assert report["config_id"] == _configs(published)[1].config_id  # the real one


@pytest.mark.interop
def test_go_finds_no_usable_config_in_a_list_of_decoys(
    go: None, front: FrontProcess, pki: Pki
) -> None:
    """Go skips every config with a mandatory extension it does not know (RFC 9849 §4.2)."""
    decoy = _configs(origin_svcb(front, pki))[0]
    (result,) = run_client(front.address, name=PRIVATE, ech=encode_config_list([decoy]), ca=pki.ca)
    assert not result["ok"] and not result["ech_accepted"] and not result["ech_rejected"]
    # Refused before anything is sent: no hello, no handshake with the front.
    assert result["error"] == (
        "handshake: tls: EncryptedClientHelloConfigList contains no valid configs"
    ), result


@pytest.mark.interop
def test_a_client_that_uses_the_decoy_fails(go: None, front: FrontProcess, pki: Pki) -> None:
    """Built to fail (RFC 9849 §6.2.2): without its mandatory extension Go uses the decoy.

    Its config_id names no key of the front, so ECH is rejected: the public
    name answers, and the client learns no private name.
    """
    decoy = _configs(origin_svcb(front, pki))[0]
    ignored = replace(decoy, extensions=())  # what a client ignoring the bit sees
    (result,) = run_client(
        front.address, name=PRIVATE, ech=encode_config_list([ignored]), ca=pki.ca
    )
    assert result["ech_rejected"] is True and result["ech_accepted"] is False, result
    assert result["ok"] is False


@pytest.mark.interop
def test_boringssl_skips_the_decoy_and_uses_the_real_config(front: FrontProcess, pki: Pki) -> None:
    reason = curl_available()
    if reason is not None:
        pytest.skip(reason)
    result = fetch(
        f"https://{PRIVATE}:{front.port}/",
        ech_config_list=origin_svcb(front, pki),
        resolve=[f"{PRIVATE}:{front.port}:127.0.0.1"],
        cafile=str(pki.ca),
    )
    assert result.ok, (result.error_code, result.error, result.ech_log)
    body = json.loads(result.body)
    assert body["ech_status"] == "accepted" and body["sni"] == PRIVATE, body
