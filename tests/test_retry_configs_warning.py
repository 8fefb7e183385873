"""REJ-2 (RFC 9849 §7.1): where the front cannot send retry_configs, it says so at start-up.

A rejected ECH client that lands on the local ``[public]`` service (pyOpenSSL)
gets no ``retry_configs``: the bundled OpenSSL 4.0 handles ECH itself but
neither pyOpenSSL nor cryptography binds any of it, and the one extension
hook that is bound refuses type 0xfe0d. The first test pins that premise to
the installed versions (it fails, on purpose, the day a binding appears).
The conformant set-up, ``rejected = "backend:NAME"`` to an ECH-capable
server for the public name, is proven by
``tests/test_retry.py::test_stale_config_gets_retry_configs_then_ech_is_accepted``;
the others here check that the front warns exactly when that route is
missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from echfront import tap
from echfront.app.certs import TestCA
from echfront.app.localtls import retry_configs_warning
from echfront.app.workers import WORKER_ENV
from echfront.config.schema import parse_config
from echfront.ech.keyset import generate_key
from echfront.keys.keyfile import write_key_file

EXT_ECH = 0xFE0D


def test_REJ_2_pyopenssl_cannot_send_retry_configs() -> None:
    # Nothing named ECH is bound, in pyOpenSSL or in cryptography's binding.
    assert [name for name in dir(SSL) if "ech" in name.lower()] == []
    assert [name for name in dir(lib) if "ech" in name.lower()] == []
    # TLS 1.3's custom-extension call (which could reach EncryptedExtensions)
    # is not bound; the TLS 1.2 one is, and OpenSSL refuses 0xfe0d there
    # because it handles the extension itself.
    assert not hasattr(lib, "SSL_CTX_add_custom_ext")
    assert lib.SSL_extension_supported(EXT_ECH) == 1
    context = SSL.Context(SSL.TLS_METHOD)
    null = ffi.NULL
    assert lib.SSL_CTX_add_server_custom_ext(context._context, EXT_ECH, *[null] * 5) == 0


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    issued = TestCA(tmp_path / "ca").issue(["public.example"])
    key_file = tmp_path / "ech.pem"
    write_key_file(key_file, [generate_key("public.example")])
    return {"cert": issued.combined, "key": key_file}


def config(files: dict[str, Path], tmp_path: Path, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": ["tcp:8443:interface=127.0.0.1"],
        "public_name": "public.example",
        "ech": {"keys": [{"file": str(files["key"])}]},
        "public": {"cert": str(files["cert"])},
        "backends": {"public-ech": {"endpoint": "tcp:host=127.0.0.1:port=9444"}},
    }
    data.update(extra)
    return data


def warning_for(data: dict[str, Any], tmp_path: Path) -> str | None:
    return retry_configs_warning(parse_config(data, base=tmp_path))


def test_REJ_2_warned_when_rejections_land_on_the_local_public_service(
    files: dict[str, Path], tmp_path: Path
) -> None:
    line = warning_for(config(files, tmp_path), tmp_path)
    assert line is not None
    assert "cannot send retry_configs" in line
    assert 'rejected = "backend:NAME"' in line


def test_REJ_2_not_warned_with_a_rejected_route(files: dict[str, Path], tmp_path: Path) -> None:
    data = config(files, tmp_path, rejected="backend:public-ech")
    assert warning_for(data, tmp_path) is None


@pytest.mark.parametrize(
    "change",
    [
        "no keys",
        "no public service",
        "public name routed to a backend",
        "custom router",
    ],
)
def test_not_warned_where_public_does_not_answer_rejections(
    files: dict[str, Path], tmp_path: Path, change: str
) -> None:
    data = config(files, tmp_path)
    if change == "no keys":
        del data["ech"]
    elif change == "no public service":
        del data["public"]
    elif change == "public name routed to a backend":
        data["routes"] = [{"name": "public.example", "backend": "public-ech"}]
    else:
        data["router"] = {"factory": "tests.test_tap:no_such_router"}
    assert warning_for(data, tmp_path) is None


def test_a_key_directory_counts_as_keys(files: dict[str, Path], tmp_path: Path) -> None:
    data = config(files, tmp_path)
    del data["ech"]
    data["keys"] = {"directory": str(tmp_path / "keys")}
    assert warning_for(data, tmp_path) is not None


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    from tests.frontproc import to_toml  # noqa: PLC0415 (a test helper, only here)

    path.write_text(to_toml(data))
    return path


@pytest.mark.parametrize(("rejected", "expected"), [(None, 1), ("backend:public-ech", 0)])
def test_REJ_2_make_service_warns_once(
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rejected: str | None,
    expected: int,
) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    data = config(files, tmp_path, **({"rejected": rejected} if rejected else {}))
    path = write_toml(tmp_path / "front.toml", data)
    options = tap.Options()
    options.parseOptions(["--config", str(path)])  # type: ignore[no-untyped-call]
    with capturedLogs() as events:
        tap.makeService(options, MemoryReactorClock())
    warnings = [
        formatEvent(e)
        for e in events
        if e.get("log_level") is LogLevel.warn and "retry_configs" in formatEvent(e)
    ]
    assert len(warnings) == expected, warnings
