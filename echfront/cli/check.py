# -*- test-case-name: tests.test_check -*-
"""``echfront check NAME``: diagnose an ECH deployment, one line per finding.

Three steps, each reported as ``ok:``, ``warning:`` or ``error:`` lines:

1. DNS: the HTTPS records of NAME (RFC 9460; AliasMode followed), from
   the system resolver, one given server (``--resolver``, e.g. the zone's
   authoritative server) or a DoH server (``--doh``, RFC 8484 POST), and
   the ECHConfigList in each record's ``ech`` SvcParam (RFC 9848),
   decoded (RFC 9849 §4).  A record set without any ``ech`` is an error:
   clients will not use ECH.
2. Keys (with ``--config`` or ``--keys``): every config in DNS must be one
   the front holds with its private key, or clients using it are rejected
   (error); a config the front publishes but DNS lacks is a warning (DNS
   not yet updated, RFC 9849 §8.1.1).
3. The front: for each config in DNS, a real ClientHelloOuter for NAME
   (:mod:`echfront.ech.probe`) is sent on its own connection to the record's
   endpoint (``--connect`` overrides it), and the first handshake message
   says whether ECH was accepted (RFC 9849 §6.1.4): the backend, or the
   front's local service, confirmed the decrypted ClientHelloInner.

Exit status: 0 without errors, 1 with any error, 2 for bad arguments or
unreadable local files.  Everything is bounded by ``--timeout`` per network
operation; no traceback reaches the operator.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from dns.rdtypes.IN.HTTPS import HTTPS
from dns.rdtypes.svcbbase import (
    ECHParam,
    IPv4HintParam,
    IPv6HintParam,
    ParamKey,
    PortParam,
)

from echfront.ech.echconfig import ECHConfig, decode_config_list
from echfront.ech.keyset import ECHKey, read_key_file
from echfront.ech.probe import ProbeError, ProbeStatus, build_probe, send_probe
from echfront.errors import ConfigError

__all__ = ["add_check_parser", "run_check"]

DEFAULT_TIMEOUT = 5.0
#: The port of an HTTPS record without ``port``: https (RFC 9460 §9).
DEFAULT_PORT = 443
#: RFC 9460 asks clients to bound chains of AliasMode records; 8 hops here.
MAX_ALIAS_HOPS = 8
#: Addresses probed per endpoint, so a large record set stays quick.
MAX_ADDRESSES = 4
#: Bound on a DoH response body (a DNS message is at most 65535 bytes).
MAX_DOH_RESPONSE = 65535
_DNS_MESSAGE = "application/dns-message"
_SUITE_NAMES = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
}


class _CheckError(Exception):
    """A step cannot go on; the message is one line for an ``error:`` finding."""


class Findings:
    """Prints findings as they come and counts the errors."""

    def __init__(self, out: TextIO) -> None:
        """Print to ``out``."""
        self._out = out
        self.errors = 0
        self.warnings = 0

    def _line(self, kind: str, text: str) -> None:
        print(f"{kind}: {' '.join(text.split())}", file=self._out, flush=True)

    def ok(self, text: str) -> None:
        """Report something that is as it should be."""
        self._line("ok", text)

    def warning(self, text: str) -> None:
        """Report something that works but should be fixed."""
        self.warnings += 1
        self._line("warning", text)

    def error(self, text: str) -> None:
        """Report something that breaks ECH for clients."""
        self.errors += 1
        self._line("error", text)


# -- arguments --------------------------------------------------------------------------


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 300] seconds")
    return value


def _host_port(text: str, *, default_port: int | None) -> tuple[str, int | None]:
    """Split ``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` (a bare IPv6 address too)."""
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"{text!r} is not HOST[:PORT]")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    if not host:
        raise argparse.ArgumentTypeError(f"{text!r} has no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port must be 1..65535")
    return host, int(port_text)


def _resolver_address(text: str) -> tuple[str, int]:
    host, port = _host_port(text, default_port=53)
    assert port is not None
    return host, port


def _connect_address(text: str) -> tuple[str, int | None]:
    return _host_port(text, default_port=None)


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


# -- DNS ------------------------------------------------------------------------------


class _Lookup(Protocol):
    """One way of asking DNS."""

    where: str

    def query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Answer:
        """The records of ``rdtype`` at the end of ``name``'s CNAME chain."""
        ...


@dataclass(frozen=True)
class _Answer:
    """Records found: the owner at the end of any CNAME chain, and the rdatas."""

    owner: dns.name.Name
    rdatas: tuple[Any, ...]
    ttl: int = 0


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


class _ResolverLookup:
    """The system resolver, or one server given by ``--resolver`` (dnspython)."""

    def __init__(self, server: tuple[str, int] | None, timeout: float) -> None:
        if server is None:
            try:
                self._resolver = dns.resolver.Resolver()
            except dns.exception.DNSException as error:
                raise _CheckError(f"no system resolver ({_one_line(error)})") from None
            self.where = "the system resolver"
        else:
            host, port = server
            address = _address_of(host)
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [address]
            self._resolver.port = port
            self.where = f"{_join(address, port)}"
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        self._resolver.retry_servfail = False

    def query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Answer:
        try:
            answer = self._resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            raise _CheckError(
                f"{_text(name)} does not exist (NXDOMAIN from {self.where})"
            ) from None
        except dns.resolver.LifetimeTimeout:
            raise _CheckError(f"no DNS answer from {self.where} in time") from None
        except dns.resolver.NoNameservers as error:
            raise _CheckError(f"DNS lookup failed: {_one_line(error)}") from None
        except dns.exception.DNSException as error:
            raise _CheckError(f"DNS lookup of {_text(name)} failed: {_one_line(error)}") from None
        rrset = answer.rrset
        if rrset is None:
            return _Answer(answer.canonical_name, ())
        return _Answer(rrset.name, tuple(rrset), rrset.ttl)


class _DoHLookup:
    """RFC 8484 DNS over HTTPS with POST (§4.1), through urllib."""

    def __init__(self, url: str, timeout: float) -> None:
        self._url = url
        self._timeout = timeout
        self.where = url

    def query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Answer:
        query = dns.message.make_query(name, rdtype)
        query.id = 0  # RFC 8484 §4.1: ID 0, for HTTP caches
        request = urllib.request.Request(  # noqa: S310 (the scheme is checked: http or https)
            self._url,
            data=query.to_wire(),
            headers={"Content-Type": _DNS_MESSAGE, "Accept": _DNS_MESSAGE},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                kind = response.headers.get_content_type()
                body = response.read(MAX_DOH_RESPONSE + 1)
        except urllib.error.HTTPError as error:
            raise _CheckError(f"DoH server {self._url} answered HTTP {error.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            raise _CheckError(f"DoH query to {self._url} failed: {_one_line(reason)}") from None
        if kind != _DNS_MESSAGE:
            raise _CheckError(f"DoH server {self._url} answered {kind}, not {_DNS_MESSAGE}")
        if len(body) > MAX_DOH_RESPONSE:
            raise _CheckError(f"DoH server {self._url} sent more than a DNS message")
        try:
            message = dns.message.from_wire(body)
        except dns.exception.DNSException as error:
            raise _CheckError(f"DoH answer does not parse: {_one_line(error)}") from None
        if not isinstance(message, dns.message.QueryMessage) or not query.is_response(message):
            raise _CheckError(f"DoH server {self._url} answered another question")
        rcode = message.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise _CheckError(f"{_text(name)} does not exist (NXDOMAIN from {self._url})")
        if rcode != dns.rcode.NOERROR:
            raise _CheckError(f"DoH server {self._url} answered {dns.rcode.to_text(rcode)}")
        try:
            chain = message.resolve_chaining()
        except dns.exception.DNSException as error:
            raise _CheckError(f"DoH answer is inconsistent: {_one_line(error)}") from None
        if chain.answer is None:
            return _Answer(chain.canonical_name, ())
        return _Answer(chain.answer.name, tuple(chain.answer), chain.answer.ttl)


def _address_of(host: str) -> str:
    """``host`` as an IP address (dnspython needs one for a name server)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError as error:
        raise _CheckError(f"cannot resolve the DNS server name {host!r} ({error})") from None
    return str(infos[0][4][0])


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


# -- step 1: the HTTPS records --------------------------------------------------------


@dataclass
class _Endpoint:
    """A ServiceMode HTTPS record's endpoint and its configs."""

    owner: dns.name.Name
    priority: int
    target: dns.name.Name
    port: int
    hints: list[str]
    configs: list[ECHConfig] = field(default_factory=list)


def _describe_params(record: HTTPS) -> str:
    """SvcParams in presentation form (RFC 9460 §2.1), ``ech`` only by its size."""
    parts = []
    for key, value in sorted(record.params.items()):
        if key == ParamKey.ECH:
            assert isinstance(value, ECHParam)
            parts.append(f"ech=({len(value.ech)} bytes)")
        else:
            text = value.to_text() if value is not None else ""
            if len(text) >= 2 and text[0] == text[-1] == '"' and not set(text[1:-1]) & set(' \\"'):
                text = text[1:-1]  # dnspython quotes every value; zone files need not
            name = ParamKey.to_text(key).replace("_", "-").lower()
            parts.append(f"{name}={text}" if text else name)
    return " ".join(parts) or "(no parameters)"


def _https_records(
    lookup: _Lookup, name: dns.name.Name, findings: Findings
) -> list[_Endpoint] | None:
    """Step 1: find NAME's ServiceMode HTTPS records (following AliasMode) and decode ech."""
    current = name
    for _hop in range(MAX_ALIAS_HOPS + 1):
        answer = lookup.query(current, dns.rdatatype.HTTPS)
        records = sorted(
            (r for r in answer.rdatas if isinstance(r, HTTPS)), key=lambda r: r.priority
        )
        if answer.owner != current:
            findings.ok(f"{_text(current)} is an alias (CNAME) of {_text(answer.owner)}")
        if not records:
            findings.error(f"{_text(answer.owner)} has no HTTPS record (at {lookup.where})")
            return None
        service = [r for r in records if r.priority != 0]
        if service:
            return _service_records(answer, service, findings, lookup.where)
        alias = records[0]
        if alias.target == dns.name.root:
            findings.error(f"{_text(answer.owner)} HTTPS 0 . says the service is unavailable")
            return None
        findings.ok(f"{_text(answer.owner)} HTTPS 0 {alias.target}: AliasMode, following it")
        current = alias.target
    findings.error(f"more than {MAX_ALIAS_HOPS} HTTPS AliasMode records in a chain")
    return None


def _service_records(
    answer: _Answer, records: list[HTTPS], findings: Findings, where: str
) -> list[_Endpoint]:
    """Report ServiceMode records and decode each ``ech`` (RFC 9848, RFC 9849 §4)."""
    owner = answer.owner
    count = len(records)
    findings.ok(
        f"{_text(owner)}: {count} HTTPS record{'s' if count != 1 else ''} "
        f"(TTL {answer.ttl}s, from {where})"
    )
    endpoints = []
    for record in records:
        target = owner if record.target == dns.name.root else record.target
        port_param = record.params.get(ParamKey.PORT)
        port = port_param.port if isinstance(port_param, PortParam) else DEFAULT_PORT
        hints: list[str] = []
        for key in (ParamKey.IPV4HINT, ParamKey.IPV6HINT):
            hint = record.params.get(key)
            if isinstance(hint, IPv4HintParam | IPv6HintParam):
                hints.extend(str(a) for a in hint.addresses)
        endpoint = _Endpoint(owner, record.priority, target, port, hints)
        label = f"HTTPS {record.priority} {record.target}"
        findings.ok(f"{label}: {_describe_params(record)}")
        ech = record.params.get(ParamKey.ECH)
        if not isinstance(ech, ECHParam):
            findings.warning(f"{label} has no ech parameter: clients using it send no ECH")
            endpoints.append(endpoint)
            continue
        try:
            decoded = decode_config_list(ech.ech)
        except ConfigError as error:
            findings.error(f"{label}: ech does not decode as an ECHConfigList ({error})")
            endpoints.append(endpoint)
            continue
        for version in decoded.skipped_versions:
            findings.warning(f"{label}: ech holds a config of unknown version 0x{version:04x}")
        if not decoded.configs:
            findings.error(f"{label}: ech holds no config of version 0xfe0d (RFC 9849)")
        for config in decoded.configs:
            suites = ", ".join(str(s) for s in config.cipher_suites)
            findings.ok(
                f"ech config_id {config.config_id}: {config.kem_name}, public_name "
                f"{config.public_name}, {suites}, maximum_name_length "
                f"{config.maximum_name_length}"
            )
            if config.has_unknown_mandatory_extension:
                findings.warning(
                    f"ech config_id {config.config_id} has a mandatory extension: "
                    "clients that do not know it skip the config (RFC 9849 §4.2)"
                )
        endpoint.configs = list(decoded.configs)
        endpoints.append(endpoint)
    if not any(e.configs for e in endpoints):
        findings.error(f"no HTTPS record of {_text(owner)} has an ech parameter: no ECH")
    return endpoints


# -- step 2: the front's keys ---------------------------------------------------------


def _front_keys(args: argparse.Namespace) -> tuple[list[ECHKey], str] | None:
    """The keys given by ``--config`` or ``--keys``, and a label for messages.

    :raises ConfigError: for an unreadable file (exit 2, like other commands).
    """
    if args.config is not None:
        # Imported here: the configuration pulls in Twisted, which the other
        # ``echfront`` commands (this module is imported for all) never need.
        from echfront.config.schema import load_config_file, load_key_set  # noqa: PLC0415

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


# -- step 3: probing the front ----------------------------------------------------------


def _addresses(lookup: _Lookup, endpoint: _Endpoint, findings: Findings) -> list[str]:
    """The target's A/AAAA addresses; its address hints only if it has none (RFC 9460 §7.3).

    Clients prefer A/AAAA answers to hints, so a hint that is not among them
    is reported: clients that connect before the A/AAAA answer may reach it.
    """
    found: list[str] = []
    failures = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            answer = lookup.query(endpoint.target, rdtype)
        except _CheckError as error:
            failures.append(str(error))
            continue
        found.extend(r.address for r in answer.rdatas if hasattr(r, "address"))
    target = _text(endpoint.target)
    if found:
        stray = [h for h in endpoint.hints if h not in found]
        if stray:
            findings.warning(
                f"address hints {', '.join(stray)} are not addresses of {target}: clients "
                "that use hints may reach another server"
            )
        return found
    if endpoint.hints:
        findings.warning(f"{target} has no A/AAAA record; using the record's address hints")
        return list(endpoint.hints)
    detail = f" ({failures[0]})" if failures else ""
    findings.error(f"{target} has no address to connect to{detail}")
    return []


def _probe_all(
    args: argparse.Namespace,
    name: str,
    lookup: _Lookup,
    endpoints: list[_Endpoint],
    findings: Findings,
) -> None:
    """Step 3: one probe per (config, address), each on its own connection."""
    seen: set[tuple[bytes, str, int]] = set()
    for endpoint in endpoints:
        if not endpoint.configs:
            continue
        if args.connect is not None:
            host, port = args.connect
            addresses, port = [host], port or endpoint.port
        else:
            addresses, port = _addresses(lookup, endpoint, findings), endpoint.port
        unreachable: set[str] = set()
        for config in endpoint.configs:
            for host in addresses[:MAX_ADDRESSES]:
                key = (config.encode(), host, port)
                if key in seen or host in unreachable:
                    continue
                seen.add(key)
                if not _probe_one(
                    name, config, host=host, port=port, timeout=args.timeout, findings=findings
                ):
                    unreachable.add(host)
        if len(addresses) > MAX_ADDRESSES:
            findings.warning(
                f"{_text(endpoint.target)} has {len(addresses)} addresses; probed the first "
                f"{MAX_ADDRESSES}"
            )


def _probe_one(
    name: str, config: ECHConfig, *, host: str, port: int, timeout: float, findings: Findings
) -> bool:
    """Probe one config at one address; False if the address cannot be reached."""
    where = _join(host, port)
    label = f"config_id {config.config_id} ({config.kem_name})"
    try:
        probe = build_probe(name, config)
    except ProbeError as error:
        findings.warning(f"cannot probe {label}: {error}")
        return True
    try:
        result = send_probe(host, port, probe, timeout=timeout)
    except OSError as error:
        reason = error.strerror or _one_line(error)
        findings.error(f"cannot connect to {where}: {reason}")
        return False
    how = "HelloRetryRequest" if result.hello_retry else "ServerHello"
    suite = _SUITE_NAMES.get(result.cipher_suite or 0, "")
    if result.status is ProbeStatus.ACCEPTED:
        findings.ok(f"{where} accepted ECH with {label} for {name} ({how}, {suite})")
    elif result.status is ProbeStatus.REJECTED:
        findings.error(
            f"{where} rejected ECH with {label} for {name} ({how}): the server there cannot "
            "decrypt this config"
        )
    elif result.status is ProbeStatus.ALERT:
        findings.error(f"{where} answered {label} for {name} with {result}")
    else:
        findings.error(f"{where} with {label} for {name}: {result}")
    return True


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
    target = _text(name)
    try:
        lookup: _Lookup = (
            _DoHLookup(args.doh, args.timeout)
            if args.doh is not None
            else _ResolverLookup(args.resolver, args.timeout)
        )
        endpoints = _https_records(lookup, name, findings)
    except _CheckError as error:
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
            _probe_all(args, target, lookup, endpoints, findings)
        except _CheckError as error:
            findings.error(str(error))
    return 1 if findings.errors else 0
