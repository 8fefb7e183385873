# -*- test-case-name: tests.test_check -*-
"""``echfront check NAME``: diagnose an ECH deployment, one line per finding.

Three steps, each reported as ``ok:``, ``warning:`` or ``error:`` lines:

1. DNS (:mod:`~echfront.cli.check_dns`): the HTTPS records of NAME (RFC
   9460; AliasMode followed), from the system resolver, one given server
   (``--resolver``, e.g. the zone's authoritative server) or a DoH server
   (``--doh``, RFC 8484 POST), and the ECHConfigList in each record's
   ``ech`` SvcParam (RFC 9848), decoded (RFC 9849 §4).  A record set
   without any ``ech`` is an error: clients will not use ECH.
2. Keys (here, with ``--config`` or ``--keys``): every config in DNS must be
   one the front holds with its private key, or clients using it are
   rejected (error); a config the front publishes but DNS lacks is a
   warning (DNS not yet updated, RFC 9849 §8.1.1).
3. The front (:mod:`~echfront.cli.check_probe`): for each config in DNS, a
   real ClientHelloOuter for NAME (:mod:`echfront.ech.probe`) is sent on its
   own connection to the record's endpoint (``--connect`` overrides it), and
   the first handshake message says whether ECH was accepted (RFC 9849
   §6.1.4): the backend, or the front's local service, confirmed the
   decrypted ClientHelloInner.

Exit status: 0 without errors, 1 with any error, 2 for bad arguments or
unreadable local files.  Everything is bounded by ``--timeout`` per network
operation; no traceback reaches the operator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import dns.exception
import dns.name

from echfront.cli.check_dns import DoHLookup, Lookup, ResolverLookup, https_records
from echfront.cli.check_findings import CheckError, Findings
from echfront.cli.check_probe import probe_all
from echfront.dns.verify import name_text, split_host_port
from echfront.ech.echconfig import ECHConfig
from echfront.ech.keyset import ECHKey
from echfront.errors import ConfigError
from echfront.keys.keyfile import read_key_file

__all__ = ["DEFAULT_TIMEOUT", "add_check_parser", "run_check"]

DEFAULT_TIMEOUT = 5.0


# -- arguments --------------------------------------------------------------------------


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 300] seconds")
    return value


def _resolver_address(text: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(text, default_port=53)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    assert port is not None
    return host, port


def _connect_address(text: str) -> tuple[str, int | None]:
    try:
        return split_host_port(text, default_port=None)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _doh_url(text: str) -> str:
    if not text.startswith(("https://", "http://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an https:// URL")
    return text


def add_check_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``check`` to the ``echfront`` subcommands; return its parser.

    :param subparsers: what ``ArgumentParser.add_subparsers`` returned (its
        parser class decides how argument errors are printed).
    """
    check: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help="diagnose a deployment: DNS HTTPS record, keys, and ECH acceptance",
        description="Resolve the HTTPS records of NAME, decode their ech configs, compare "
        "them with the front's keys (--config or --keys), and connect to the front to "
        "confirm that each published config decrypts: one ClientHello per config, offering "
        "ECH for NAME. Prints one line per finding (ok:, warning:, error:); exits 0 "
        "without errors, 1 with any error, 2 for bad arguments.",
    )
    check.add_argument("name", metavar="NAME", help="the private (inner) name to check")
    dns_source = check.add_mutually_exclusive_group()
    dns_source.add_argument(
        "--resolver",
        metavar="HOST[:PORT]",
        type=_resolver_address,
        help="ask this DNS server (e.g. the zone's authoritative server) instead of the "
        "system resolver",
    )
    dns_source.add_argument(
        "--doh", metavar="URL", type=_doh_url, help="ask this DNS-over-HTTPS server (RFC 8484)"
    )
    check.add_argument(
        "--connect",
        metavar="HOST[:PORT]",
        type=_connect_address,
        help="probe this address instead of the records' targets (PORT defaults to the "
        "record's port, else 443)",
    )
    keys = check.add_mutually_exclusive_group()
    keys.add_argument(
        "--config", metavar="FILE", type=Path, help="the front's TOML configuration (its keys)"
    )
    keys.add_argument(
        "--keys", metavar="FILE", nargs="+", type=Path, help="the front's RFC 9934 key files"
    )
    check.add_argument(
        "--timeout",
        metavar="S",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        help=f"bound on each DNS query and each connection, in seconds (default "
        f"{DEFAULT_TIMEOUT:g})",
    )
    return check


# -- step 2: the front's keys ---------------------------------------------------------


def _front_keys(args: argparse.Namespace) -> tuple[list[ECHKey], str] | None:
    """The keys given by ``--config`` or ``--keys``, and a label for messages.

    :raises ConfigError: for an unreadable file (exit 2, like other commands).
    """
    if args.config is not None:
        # Imported here: the configuration pulls in Twisted, which the other
        # ``echfront`` commands (this module is imported for all) never need.
        from echfront.config.build import load_key_set  # noqa: PLC0415
        from echfront.config.schema import load_config_file  # noqa: PLC0415

        # The same loading the front does: [ech] key files and the [keys] directory.
        return list(load_key_set(load_config_file(args.config)).keys), str(args.config)
    if args.keys:
        keys = []
        for path in args.keys:
            keys.extend(read_key_file(path))
        return keys, " ".join(str(p) for p in args.keys)
    return None


def _compare_keys(
    dns_configs: list[ECHConfig], keys: list[ECHKey], source: str, findings: Findings
) -> None:
    """Step 2: DNS configs the front cannot decrypt are errors; unpublished ones, warnings."""
    if not keys:
        findings.error(f"{source} holds no ECH keys")
        return
    for config in dns_configs:
        held = [k for k in keys if k.config == config]
        label = f"config_id {config.config_id} ({config.kem_name}) in DNS"
        decrypting = [k for k in held if k.recipient is not None]
        if not decrypting:
            same_id = [k for k in keys if k.config_id == config.config_id]
            if held:
                why = "the front has it without its private key (retry-only)"
            elif same_id:
                why = "the front's config with that id has another key or contents (stale DNS?)"
            else:
                why = "the front has no such key"
            findings.error(f"{label} cannot be decrypted by the front: {why}")
        elif any(k.published for k in decrypting):
            findings.ok(f"{label} is a published key of the front ({decrypting[0].source})")
        else:
            findings.warning(
                f"{label} is decrypt-only at the front (being retired): DNS should publish "
                "the current configs"
            )
    for key in keys:
        if key.published and key.config not in dns_configs:
            findings.warning(
                f"the front publishes config_id {key.config_id} ({key.config.kem_name}, "
                f"{key.source}), which is not in DNS"
            )


# -- the command ------------------------------------------------------------------------


def run_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``echfront check`` with parsed ``args``; return the exit status.

    Findings go to ``out`` (default stdout).  A local file that cannot be
    read is one ``echfront check: error:`` line on stderr and status 2, as
    for the other commands.
    """
    stream = out if out is not None else sys.stdout
    findings = Findings(stream)
    try:
        front = _front_keys(args)
    except ConfigError as error:
        print(f"echfront check: error: {error}", file=sys.stderr)
        return 2
    try:
        name = dns.name.from_text(args.name)
    except dns.exception.DNSException as error:
        print(f"echfront check: error: {args.name!r} is not a DNS name ({error})", file=sys.stderr)
        return 2
    target = name_text(name)
    try:
        lookup: Lookup = (
            DoHLookup(args.doh, args.timeout)
            if args.doh is not None
            else ResolverLookup(args.resolver, args.timeout)
        )
        endpoints = https_records(lookup, name, findings)
    except CheckError as error:
        findings.error(str(error))
        endpoints = None
    dns_configs: list[ECHConfig] = []
    for endpoint in endpoints or []:
        for config in endpoint.configs:
            if config not in dns_configs:
                dns_configs.append(config)
    if front is not None:
        keys, source = front
        _compare_keys(dns_configs, keys, source, findings)
    if endpoints:
        try:
            probe_all(
                target,
                lookup,
                endpoints,
                findings,
                connect=args.connect,
                timeout=args.timeout,
            )
        except CheckError as error:
            findings.error(str(error))
    return 1 if findings.errors else 0
