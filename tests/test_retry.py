"""Retry configs for rejected ECH through an ECH-capable public-name backend (issue 5).

pyOpenSSL cannot send retry_configs, so a locally served public name leaves
a client with a stale config without a way forward.  With ``rejected =
"backend:NAME"`` the front sends ECH-rejected connections for the public
name to a server that holds the same RFC 9934 keys and can (here, Go's
tls.Server with SendAsRetry), while clients that offered no ECH keep the
local public service.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from echfront.ech.echconfig import decode_config_list, encode_config_list
from echfront.ech.keyset import generate_key
from tests.frontproc import FrontProcess, Pki, make_pki
from tests.gotools import GoBackend, GoUnavailableError, go_binary, run_client

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    try:
        go_binary()
    except GoUnavailableError as error:
        pytest.skip(str(error))
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def deployment(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FrontProcess, GoBackend]]:
    public, secret = pki.certs["public.example"], pki.certs["secret.example"]
    with (
        GoBackend([(secret.chain, secret.key)], ident="secret") as inner,
        # The same key files as the front, offered as retry configs.
        GoBackend([(public.chain, public.key)], ident="public", ech_keys=[pki.ech_key]) as retry,
    ):
        config = {
            "ech": {"keys": [{"file": str(pki.ech_key)}]},
            "public": {"cert": str(public.combined)},
            "backends": {
                "secret": {"endpoint": f"tcp:host=127.0.0.1:port={inner.port}"},
                "retry": {"endpoint": f"tcp:host=127.0.0.1:port={retry.port}"},
            },
            "routes": [{"name": "secret.example", "backend": "secret"}],
            "rejected": "backend:retry",
        }
        with FrontProcess(tmp_path_factory.mktemp("front"), config) as front:
            yield front, retry


def test_stale_config_gets_retry_configs_then_ech_is_accepted(
    pki: Pki, deployment: tuple[FrontProcess, GoBackend]
) -> None:
    front, _ = deployment
    address = f"127.0.0.1:{front.port}"
    (first,) = run_client(address, name="secret.example", ech=pki.stale_config_list, ca=pki.ca)
    assert first["ech_rejected"] is True, first
    retry_list = base64.b64decode(first["retry_configs"])
    assert retry_list == pki.ech_config_list  # the front's current configs
    assert [c.public_name for c in decode_config_list(retry_list).configs] == ["public.example"]
    (second,) = run_client(address, name="secret.example", ech=retry_list, ca=pki.ca, send=100)
    assert second["ok"] and second["ech_accepted"] and second["echo_ok"], second
    report = second["server_report"]
    assert report["backend"] == "secret" and report["ech_ext"] == "inner"
    assert report["sni"] == "secret.example"


def test_clients_without_ech_keep_the_local_public_service(
    pki: Pki, deployment: tuple[FrontProcess, GoBackend]
) -> None:
    front, retry = deployment
    seen = len(retry.reports())
    (result,) = run_client(
        f"127.0.0.1:{front.port}", name="public.example", ca=pki.ca, http_get="/"
    )
    assert result["ok"], result
    assert result["http_status"] == 200
    assert "echfront" in str(result["server_report"])  # the built-in status page
    assert len(retry.reports()) == seen  # the retry backend saw nothing


def test_grease_for_other_names_is_not_diverted(
    pki: Pki, deployment: tuple[FrontProcess, GoBackend]
) -> None:
    """Rejected ECH whose outer name is not a public name routes as usual.

    (A GREASE client's outer SNI is the name it wants; only a real ECH
    rejection carries the public name.)  Here: a stale config whose
    public_name differs from the front's is rejected and routed by its outer
    name, which has no route: the default (unrecognized_name).
    """
    front, retry = deployment
    other = encode_config_list([generate_key("elsewhere.example").config])
    seen = len(retry.reports())
    (result,) = run_client(f"127.0.0.1:{front.port}", name="secret.example", ech=other, ca=pki.ca)
    assert result["ok"] is False and result["alert"] == 112, result
    assert len(retry.reports()) == seen
