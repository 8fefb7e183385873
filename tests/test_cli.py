"""The ``echfront`` command line: keygen, dns, inspect, and its errors."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from echfront.cli.main import main
from echfront.ech.echconfig import decode_config_list
from echfront.ech.grease import is_decoy
from echfront.keys.keyfile import read_key_file


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console entry point as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "echfront.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_keygen_writes_private_pem_and_prints_list_last(tmp_path: Path) -> None:
    out = tmp_path / "k.pem"
    result = run(
        "keygen",
        "--public-name",
        "Public.Example",
        "--config-id",
        "7",
        "--max-name-length",
        "40",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    last = result.stdout.strip().splitlines()[-1]
    printed = decode_config_list(base64.b64decode(last)).configs
    (key,) = read_key_file(out)
    assert printed == (key.config,)
    assert key.config.config_id == 7
    assert key.config.public_name == "public.example"
    assert key.config.maximum_name_length == 40
    assert key.recipient is not None


def test_keygen_suite_option(tmp_path: Path) -> None:
    out = tmp_path / "k.pem"
    assert (
        main(
            [
                "keygen",
                "--public-name",
                "p.example",
                "--suite",
                "hkdf-sha256/chacha20-poly1305",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (key,) = read_key_file(out)
    assert [(s.kdf_id, s.aead_id) for s in key.config.cipher_suites] == [(1, 3)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["keygen", "--public-name", "1.2.3.4", "--out", "x.pem"], "looks like an IP address"),
        (["keygen", "--public-name", "a..b", "--out", "x.pem"], "invalid label"),
        (
            ["keygen", "--public-name", "p.example", "--config-id", "300", "--out", "x.pem"],
            "not 0..255",
        ),
        (
            ["keygen", "--public-name", "p.example", "--suite", "md5/rot13", "--out", "x.pem"],
            "KDF/AEAD",
        ),
        (["keygen"], "required"),
        (["dns", "--name", "a.example", "--keys", "missing.pem"], "cannot read key file"),
        (["inspect", "not base64!"], "not an ECHConfigList"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "k.pem"
    assert main(["keygen", "--public-name", "p.example", "--out", str(out)]) == 0
    before = out.read_bytes()
    result = run("keygen", "--public-name", "p.example", "--out", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert out.read_bytes() == before
    assert main(["keygen", "--public-name", "p.example", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != before


def test_dns_record_carries_every_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [tmp_path / "a.pem", tmp_path / "b.pem"]
    for index, path in enumerate(paths):
        assert (
            main(
                [
                    "keygen",
                    "--public-name",
                    "p.example",
                    "--config-id",
                    str(index),
                    "--out",
                    str(path),
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert (
        main(
            [
                "dns",
                "--name",
                "secret.example",
                "--keys",
                *map(str, paths),
                "--alpn",
                "h2,http/1.1",
                "--port",
                "8443",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    head, _, ech = line.partition(' ech="')
    assert head == 'secret.example. 300 IN HTTPS 1 . alpn="h2,http/1.1" port=8443'
    decoy, *configs = decode_config_list(base64.b64decode(ech.rstrip('"'))).configs
    assert is_decoy(decoy)  # RFC 9849 §6.2.2 (tests/test_grease.py)
    assert [c.config_id for c in configs] == [0, 1]


def test_inspect_accepts_pem_base64_hex_and_binary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = tmp_path / "k.pem"
    assert (
        main(["keygen", "--public-name", "p.example", "--config-id", "9", "--out", str(pem)]) == 0
    )
    b64 = capsys.readouterr().out.strip().splitlines()[-1]
    raw = base64.b64decode(b64)
    binary = tmp_path / "list.bin"
    binary.write_bytes(raw)
    for source in (str(pem), b64, raw.hex(), str(binary)):
        assert main(["inspect", source]) == 0
        out = capsys.readouterr().out
        assert "config_id: 9" in out and "public_name: p.example" in out
        assert out.strip().splitlines()[-1] == b64
    assert main(["inspect", str(pem)]) == 0
    assert "private key present" in capsys.readouterr().out
    # The private key itself is never printed.
    (key,) = read_key_file(pem)
    assert key.recipient is not None
    assert key.recipient.private_bytes.hex() not in out


def test_keygen_post_quantum_kem(tmp_path: Path) -> None:
    out = tmp_path / "pq.pem"
    result = run(
        "keygen", "--public-name", "p.example", "--kem", "mlkem768-x25519", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "kem MLKEM768-X25519" in result.stdout.splitlines()[0]
    (key,) = read_key_file(out)
    assert key.config.kem_id == 0x647A
    assert len(key.config.public_key) == 1216
    printed = decode_config_list(base64.b64decode(result.stdout.strip().splitlines()[-1]))
    assert printed.configs == (key.config,)


def test_keygen_default_kem_is_x25519(tmp_path: Path) -> None:
    out = tmp_path / "k.pem"
    assert main(["keygen", "--public-name", "p.example", "--out", str(out)]) == 0
    (key,) = read_key_file(out)
    assert key.config.kem_id == 0x0020


def test_keygen_unknown_kem(tmp_path: Path) -> None:
    result = run(
        "keygen", "--public-name", "p.example", "--kem", "kyber", "--out", str(tmp_path / "k")
    )
    assert result.returncode == 2
    assert "invalid choice: 'kyber'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "k").exists()


def test_dns_lists_post_quantum_configs_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classic, pq = tmp_path / "x25519.pem", tmp_path / "pq.pem"
    for path, kem, config_id in ((classic, "x25519", "1"), (pq, "mlkem768-x25519", "2")):
        args = ["keygen", "--public-name", "p.example", "--kem", kem, "--config-id", config_id]
        assert main([*args, "--out", str(path)]) == 0
    capsys.readouterr()
    # The X25519 file first on the command line; the record still leads with PQ.
    assert main(["dns", "--name", "secret.example", "--keys", str(classic), str(pq)]) == 0
    line = capsys.readouterr().out.strip()
    ech = base64.b64decode(line.partition(' ech="')[2].rstrip('"'))
    decoy, *configs = decode_config_list(ech).configs
    assert is_decoy(decoy)  # RFC 9849 §6.2.2 (tests/test_grease.py)
    assert [(c.config_id, c.kem_id) for c in configs] == [(2, 0x647A), (1, 0x0020)]
    # Over 512 bytes on the wire: the docs' EDNS/TCP note applies.
    assert len(ech) > 1216 + 32


def test_inspect_post_quantum_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "pq.pem"
    args = ["keygen", "--public-name", "p.example", "--kem", "mlkem768-x25519", "--config-id", "3"]
    assert main([*args, "--out", str(pem)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(pem)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  kem: MLKEM768-X25519 (0x647a)" in lines
    (shown,) = [line for line in lines if line.startswith("  public_key: ")]
    assert shown.endswith("(1216 bytes)") and len(shown) < 100
    (key,) = read_key_file(pem)
    assert key.config.public_key[:16].hex() in shown
    assert key.recipient is not None
    assert key.recipient.private_bytes.hex() not in "\n".join(lines)
