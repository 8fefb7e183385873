# -*- test-case-name: tests.test_cli -*-
"""The ``echfront`` command: key generation, DNS records, inspection.

Every failure is one line on stderr (``echfront <command>: error: ...``)
and exit status 2; no traceback reaches the operator.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from echfront._version import __version__
from echfront.echconfig import (
    KEM_MLKEM768_X25519,
    KEM_X25519_HKDF_SHA256,
    ECHConfig,
    SymmetricSuite,
    decode_config_list,
    encode_config_list,
    parse_config_list_text,
)
from echfront.errors import ConfigError
from echfront.hpke import DEFAULT_SUITES
from echfront.keys import (
    ECHKey,
    generate_key,
    load_pem,
    preference_order,
    read_key_file,
    write_key_file,
)
from echfront.svcb import https_record

__all__ = ["main"]

_KDFS = {"hkdf-sha256": 1, "hkdf-sha384": 2, "hkdf-sha512": 3}
_AEADS = {"aes-128-gcm": 1, "aes-256-gcm": 2, "chacha20-poly1305": 3}
#: ``keygen --kem`` choices: the classical KEM every ECH client supports, and
#: the post-quantum hybrid (draft-ietf-hpke-pq) that Go >= 1.26 clients use.
_KEMS = {"x25519": KEM_X25519_HKDF_SHA256, "mlkem768-x25519": KEM_MLKEM768_X25519}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: error: <message>`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _suite(text: str) -> SymmetricSuite:
    kdf, _, aead = text.lower().partition("/")
    if kdf not in _KDFS or aead not in _AEADS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KDF/AEAD with KDF in {sorted(_KDFS)} and AEAD in {sorted(_AEADS)}"
        )
    return SymmetricSuite(_KDFS[kdf], _AEADS[aead])


def _byte(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{value} is not 0..255")
    return value


def _parser() -> _Parser:
    parser = _Parser(
        prog="echfront",
        description="Encrypted Client Hello (RFC 9849) front: key and DNS tools. "
        "Run the server itself with `twistd -n echfront`.",
    )
    parser.add_argument("--version", action="version", version=f"echfront {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    keygen = commands.add_parser(
        "keygen",
        help="generate an ECH key and config (RFC 9934 PEM file)",
        description="Generate an ECH key: DHKEM(X25519, HKDF-SHA256) by default, or the "
        "post-quantum hybrid MLKEM768-X25519 (X-Wing). Writes an RFC 9934 PEM file (mode "
        "0600) and prints the ECHConfigList in base64 as the last line.",
    )
    keygen.add_argument("--public-name", required=True, help="the client-facing (outer) name")
    keygen.add_argument(
        "--kem",
        choices=sorted(_KEMS),
        default="x25519",
        help="HPKE KEM (default x25519; mlkem768-x25519 is post-quantum, publish it "
        "beside an x25519 key for clients without it)",
    )
    keygen.add_argument("--config-id", type=_byte, help="config_id 0..255 (default: random)")
    keygen.add_argument(
        "--max-name-length",
        type=_byte,
        default=0,
        help="longest private name, for client padding (default 0: unknown)",
    )
    keygen.add_argument(
        "--suite",
        type=_suite,
        action="append",
        help="KDF/AEAD to offer, repeatable (default: hkdf-sha256 with aes-128-gcm, "
        "aes-256-gcm and chacha20-poly1305)",
    )
    keygen.add_argument("--out", required=True, type=Path, help="PEM file to write")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")

    dns = commands.add_parser(
        "dns",
        help="print the HTTPS resource record that publishes the ECH configs",
        description="Print an HTTPS record (RFC 9460) with the ech SvcParam (RFC 9848) "
        "holding the configs of the given key files, for a zone file. Post-quantum configs "
        "come first, then the others in the order given.",
    )
    dns.add_argument("--name", required=True, help="owner name of the record")
    dns.add_argument("--keys", required=True, nargs="+", type=Path, help="RFC 9934 PEM files")
    dns.add_argument("--alpn", action="append", default=[], help="ALPN ids, comma-separated")
    dns.add_argument("--port", type=int, help="port SvcParam, when not 443")
    dns.add_argument("--target", default=".", help="TargetName (default '.': the owner)")
    dns.add_argument("--priority", type=int, default=1, help="SvcPriority (default 1)")
    dns.add_argument("--ttl", type=int, default=300, help="TTL in seconds (default 300)")

    inspect = commands.add_parser(
        "inspect",
        help="decode an ECHConfigList or an RFC 9934 PEM file",
        description="Decode and print an ECHConfigList given as base64 or hex text, or a "
        "file holding such text, an RFC 9934 PEM file, or the raw list. '-' reads stdin.",
    )
    inspect.add_argument("source", help="file path, '-', or base64/hex text")
    return parser


def _keygen(args: argparse.Namespace) -> None:
    key = generate_key(
        args.public_name,
        config_id=args.config_id,
        maximum_name_length=args.max_name_length,
        suites=tuple(args.suite) if args.suite else DEFAULT_SUITES,
        kem_id=_KEMS[args.kem],
    )
    write_key_file(args.out, [key], overwrite=args.force)
    config_list = encode_config_list([key.config])
    print(
        f"wrote {args.out} (config_id {key.config_id}, public_name {key.config.public_name}, "
        f"kem {key.config.kem_name})"
    )
    print(base64.b64encode(config_list).decode("ascii"))


def _dns(args: argparse.Namespace) -> None:
    configs: list[ECHConfig] = []
    for path in args.keys:
        for key in read_key_file(path):
            if key.config not in configs:
                configs.append(key.config)
    alpn = [part.strip() for item in args.alpn for part in item.split(",") if part.strip()]
    print(
        https_record(
            args.name,
            encode_config_list(preference_order(configs)),
            alpn=alpn,
            port=args.port,
            priority=args.priority,
            target=args.target,
            ttl=args.ttl,
        )
    )


def _read_source(source: str) -> tuple[bytes, str]:
    """Return the bytes named by ``source`` and a label for messages."""
    if source == "-":
        return sys.stdin.buffer.read(), "stdin"
    path = Path(source)
    if path.exists():
        try:
            return path.read_bytes(), source
        except OSError as error:
            raise ConfigError(f"{source}: cannot read ({error.strerror})") from None
    return source.encode("utf-8", "replace"), "argument"


def _inspect(args: argparse.Namespace) -> None:
    data, label = _read_source(args.source)
    keys: list[ECHKey] = []
    if b"-----BEGIN" in data:
        keys = load_pem(data, source=label)
        configs = tuple(k.config for k in keys)
        has_key = keys[0].recipient is not None
        print(f"{label}: RFC 9934 PEM, private key {'present' if has_key else 'absent'}")
        raw = encode_config_list(configs)
    else:
        try:
            raw = parse_config_list_text(data.decode("ascii"))
        except (UnicodeDecodeError, ConfigError):
            raw = data  # perhaps the binary list itself
        try:
            decoded = decode_config_list(raw)
        except ConfigError as error:
            raise ConfigError(
                f"{label}: not an ECHConfigList as base64, hex, PEM or binary ({error})"
            ) from None
        configs = decoded.configs
        for version in decoded.skipped_versions:
            print(f"skipped an ECHConfig of unknown version 0x{version:04x}")
    print(f"ECHConfigList: {len(configs)} config(s), {len(raw)} bytes")
    for config in configs:
        print(config.describe())
    print(base64.b64encode(raw).decode("ascii"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    handlers = {"keygen": _keygen, "dns": _dns, "inspect": _inspect}
    try:
        handlers[args.command](args)
    except ConfigError as error:
        print(f"echfront {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `echfront inspect x | head -1`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
