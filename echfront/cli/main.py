# -*- test-case-name: tests.test_cli -*-
"""The ``echfront`` command: key generation, DNS records, inspection.

Every failure is one line on stderr (``echfront <command>: error: ...``)
and exit status 2; no traceback reaches the operator.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from echfront._version import __version__
from echfront.app.trybrowser import add_try_parser, run_try
from echfront.cli.check import add_check_parser, run_check
from echfront.cli.fleet import add_fleet_parser, run_fleet
from echfront.config.schema import load_config_file
from echfront.dns.svcb import https_record
from echfront.ech.echconfig import (
    ECHConfig,
    SymmetricSuite,
    decode_config_list,
    encode_config_list,
    kem_name,
    option_names,
    parse_config_list_text,
)
from echfront.ech.hpke import DEFAULT_SUITES
from echfront.ech.keyset import ECHKey, generate_key, publication_list
from echfront.ech.padding import derive_maximum_name_length
from echfront.errors import ConfigError
from echfront.keys.keydir import KeyDirectory, KeyRecord, KeyState, utcnow
from echfront.keys.keyfile import load_pem, read_key_file, write_key_file
from echfront.keys.rotation import parse_duration

__all__ = ["main"]

#: ``--suite`` and ``--kem`` choices, from the one HPKE name table.  The KEMs:
#: the classical one every ECH client supports, and the post-quantum hybrid
#: (draft-ietf-hpke-pq) that Go >= 1.26 clients use.
_KDFS = option_names("KDF")
_AEADS = option_names("AEAD")
_KEMS = option_names("KEM")


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
    _add_name_length_options(keygen)
    keygen.add_argument(
        "--suite",
        type=_suite,
        action="append",
        help="KDF/AEAD to offer, repeatable (default: hkdf-sha256 with aes-128-gcm, "
        "aes-256-gcm and chacha20-poly1305)",
    )
    keygen.add_argument("--out", required=True, type=Path, help="PEM file to write")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    _add_grease_option(keygen, "add no reserved (GREASE) extension to the config")

    dns = commands.add_parser(
        "dns",
        help="print the HTTPS resource record that publishes the ECH configs",
        description="Print an HTTPS record (RFC 9460) with the ech SvcParam (RFC 9848) "
        "holding the configs of the given key files, for a zone file: a GREASE decoy that "
        "clients skip (RFC 9849 §6.2.2), then post-quantum configs, then the others in the "
        "order given.",
    )
    dns.add_argument("--name", required=True, help="owner name of the record")
    sources = dns.add_mutually_exclusive_group(required=True)
    sources.add_argument("--keys", nargs="+", type=Path, help="RFC 9934 PEM files")
    sources.add_argument(
        "--keys-dir", type=Path, help="a key directory: its active (published) keys"
    )
    dns.add_argument("--alpn", action="append", default=[], help="ALPN ids, comma-separated")
    dns.add_argument("--port", type=int, help="port SvcParam, when not 443")
    dns.add_argument("--target", default=".", help="TargetName (default '.': the owner)")
    dns.add_argument("--priority", type=int, default=1, help="SvcPriority (default 1)")
    dns.add_argument("--ttl", type=int, default=300, help="TTL in seconds (default 300)")
    _add_grease_option(dns, "publish no GREASE decoy config ahead of the real ones")

    inspect = commands.add_parser(
        "inspect",
        help="decode an ECHConfigList or an RFC 9934 PEM file",
        description="Decode and print an ECHConfigList given as base64 or hex text, or a "
        "file holding such text, an RFC 9934 PEM file, or the raw list. '-' reads stdin.",
    )
    inspect.add_argument("source", help="file path, '-', or base64/hex text")
    _add_keys_parser(commands)
    add_check_parser(commands)
    add_try_parser(commands)
    add_fleet_parser(commands)
    return parser


def _add_keys_parser(commands: Any) -> None:
    keys = commands.add_parser(
        "keys",
        help="manage a key directory by hand (list, add, activate, rotate, retire)",
        description="Manage the key directory that [keys] directory names. Fronts pick "
        "changes up on SIGHUP (or at once with [reload] watch = true).",
    )
    actions = keys.add_subparsers(dest="action", required=True, parser_class=_Parser)
    listing = actions.add_parser("list", help="show every key, its state and dates")
    listing.add_argument("--dir", required=True, type=Path, help="the key directory")
    for name, text in (
        (
            "add",
            "generate a pending key: it decrypts once fronts reload, but is not "
            "published; publish its config, then `keys activate` it",
        ),
        (
            "rotate",
            "generate a key and make it active at once; the active keys are "
            "retired (decrypt-only for --grace)",
        ),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--dir", required=True, type=Path, help="the key directory")
        action.add_argument("--public-name", required=True, help="the client-facing name")
        action.add_argument(
            "--kem",
            choices=sorted(_KEMS),
            action="append",
            help="KEM, repeatable for one key each (default x25519)",
        )
        _add_name_length_options(action)
        _add_grease_option(
            action, "no reserved (GREASE) extension in the new config, no decoy in the lists"
        )
        if name == "rotate":
            action.add_argument(
                "--grace", default="48h", help="how long retired keys keep decrypting (default 48h)"
            )
    activate = actions.add_parser(
        "activate", help="make pending keys active; the active ones are retired"
    )
    activate.add_argument("--dir", required=True, type=Path, help="the key directory")
    activate.add_argument(
        "stems",
        nargs="*",
        help="keys to activate (names from `keys list`; default: every pending key)",
    )
    activate.add_argument(
        "--grace", default="48h", help="how long retired keys keep decrypting (default 48h)"
    )
    _add_grease_option(activate, "print the published list without a GREASE decoy")
    retire = actions.add_parser(
        "retire", help="make a key decrypt-only for --grace, or delete it with --now"
    )
    retire.add_argument("--dir", required=True, type=Path, help="the key directory")
    retire.add_argument("stems", nargs="+", help="keys to retire (names from `keys list`)")
    retire.add_argument("--grace", default="48h", help="decrypt-only time (default 48h)")
    retire.add_argument("--now", action="store_true", help="delete at once instead")
    _add_grease_option(retire, "print the published list without a GREASE decoy")


def _add_grease_option(parser: argparse.ArgumentParser, text: str) -> None:
    """``--no-grease``: turn GREASE (RFC 9849 §6.2.2) off, as ``[ech] grease = false``."""
    parser.add_argument(
        "--no-grease", dest="grease", action="store_false", help=f"{text} (RFC 9849 §6.2.2)"
    )


def _add_name_length_options(parser: argparse.ArgumentParser) -> None:
    """``--max-name-length N`` or ``--config FILE`` (RFC 9849 §6.1.3 padding)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--max-name-length",
        type=_byte,
        help="maximum_name_length: the longest private name, which clients pad to "
        "(default 0: unknown, unless --config)",
    )
    group.add_argument(
        "--config",
        type=Path,
        help="derive maximum_name_length from this front configuration's routes, as the "
        "front does ([keys] max_name_length when set)",
    )


def _name_length(args: argparse.Namespace) -> int:
    """The maximum_name_length new keys get (see :func:`_add_name_length_options`)."""
    if args.config is None:
        return int(args.max_name_length or 0)
    config = load_config_file(args.config)
    if config.rotation is not None:
        length = config.rotation.maximum_name_length  # set, or derived by the same rule
    else:
        length = derive_maximum_name_length(config.routed_names())
    print(f"maximum_name_length {length} (from {args.config})")
    return length


def _keys(args: argparse.Namespace) -> None:
    directory = KeyDirectory(args.dir)
    now = utcnow()
    if args.action == "list":
        records = directory.records()
        if not records:
            print(f"{args.dir}: no keys")
        for record in records:
            limit = (
                f" until {record.retire_after:%Y-%m-%dT%H:%M:%SZ}" if record.retire_after else ""
            )
            ids = ",".join(map(str, record.config_ids))
            kem = kem_name(record.kem_id)
            print(
                f"{record.stem}  {record.state.value}{limit}  config_id {ids}  {kem}  "
                f"created {record.created:%Y-%m-%dT%H:%M:%SZ}"
            )
        return
    # Checked before anything is written: a bad --grace must not leave a
    # half-done rotation behind.
    grace = parse_duration(getattr(args, "grace", "0"), "--grace")
    with directory.locked():
        by_stem = {r.stem: r for r in directory.records()}
        if args.action in ("add", "rotate"):
            name_length = _name_length(args)
            taken = directory.taken_ids()
            added = []
            for kem in args.kem or ["x25519"]:
                key = generate_key(
                    args.public_name,
                    kem_id=_KEMS[kem],
                    taken_ids=taken,
                    maximum_name_length=name_length,
                    grease=args.grease,
                )
                taken.add(key.config_id)
                added.append(directory.add([key], KeyState.PENDING, now))
            for record in added:
                print(f"added {record.stem} (pending, config_id {record.config_ids[0]})")
            if args.action == "rotate":
                _activate(directory, list(by_stem.values()), added, grace, now)
            else:
                pending = [k.config for r in added for k in read_key_file(r.pem)]
                print("pending ECHConfigList (publish it, then `echfront keys activate`):")
                print(base64.b64encode(publication_list(pending, grease=args.grease)).decode())
        elif args.action == "activate":
            if args.stems:
                chosen = [_pick(by_stem, stem) for stem in args.stems]
            else:
                chosen = [r for r in by_stem.values() if r.state is KeyState.PENDING]
                if not chosen:
                    raise ConfigError(f"{args.dir}: no pending keys to activate")
            _activate(directory, list(by_stem.values()), chosen, grace, now)
        else:
            for stem in args.stems:
                record = _pick(by_stem, stem)
                if args.now:
                    directory.delete(record)
                    print(f"deleted {stem}")
                else:
                    until = now + datetime.timedelta(seconds=grace)
                    directory.update(record, KeyState.RETIRED, until)
                    print(f"retired {stem}: decrypts until {until:%Y-%m-%dT%H:%M:%SZ}")
    published = [k.config for k in directory.load_keys() if k.published]
    if published:
        print("published ECHConfigList (for DNS and origin-svcb):")
        print(base64.b64encode(publication_list(published, grease=args.grease)).decode())


def _pick(records: dict[str, KeyRecord], stem: str) -> KeyRecord:
    record = records.get(stem)
    if record is None:
        raise ConfigError(f"no key named {stem!r} (see `echfront keys list`)")
    return record


def _activate(
    directory: KeyDirectory,
    existing: list[KeyRecord],
    chosen: list[KeyRecord],
    grace: float,
    now: datetime.datetime,
) -> None:
    """Make ``chosen`` active and the other active keys retired for ``grace`` seconds."""
    until = now + datetime.timedelta(seconds=grace)
    names = {r.stem for r in chosen}
    for record in existing:
        if record.state is KeyState.ACTIVE and record.stem not in names:
            directory.update(record, KeyState.RETIRED, until)
            print(f"retired {record.stem}: decrypts until {until:%Y-%m-%dT%H:%M:%SZ}")
    for record in chosen:
        directory.update(record, KeyState.ACTIVE)
        print(f"activated {record.stem}")


def _keygen(args: argparse.Namespace) -> None:
    key = generate_key(
        args.public_name,
        config_id=args.config_id,
        maximum_name_length=_name_length(args),
        suites=tuple(args.suite) if args.suite else DEFAULT_SUITES,
        kem_id=_KEMS[args.kem],
        grease=args.grease,
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
    if args.keys_dir is not None:
        keys = [k for k in KeyDirectory(args.keys_dir).load_keys() if k.published]
        if not keys:
            raise ConfigError(f"{args.keys_dir}: no active (published) keys")
    else:
        keys = [key for path in args.keys for key in read_key_file(path)]
    for key in keys:
        if key.config not in configs:
            configs.append(key.config)
    alpn = [part.strip() for item in args.alpn for part in item.split(",") if part.strip()]
    print(
        https_record(
            args.name,
            publication_list(configs, grease=args.grease),
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
    if args.command == "check":
        # Its own exit status: 1 when a finding is an error (see echfront.cli.check).
        return run_check(args)
    if args.command == "fleet":
        return run_fleet(args)  # runs the reactor; its own exit status (echfront.cli.fleet)
    if args.command == "try":
        return run_try(args)  # runs the reactor; its own exit status (echfront.app.trybrowser)
    handlers = {"keygen": _keygen, "dns": _dns, "inspect": _inspect, "keys": _keys}
    try:
        handlers[args.command](args)
    except ConfigError as error:
        print(f"echfront {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `echfront inspect x | head -1`
        return 0
    return 0
