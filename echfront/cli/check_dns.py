# -*- test-case-name: tests.test_check -*-
"""``echfront check``, step 1: NAME's HTTPS records, their ECH configs, their addresses.

DNS is asked through a :class:`Lookup`: the system resolver or one server
(:class:`ResolverLookup`, dnspython), or a DoH server (:class:`DoHLookup`,
the one DoH client :class:`~echfront.dns.doh.DoHClient`).
:func:`https_records` follows AliasMode (RFC 9460 §2.4.2) to the
ServiceMode records, reports each one and decodes the ECHConfigList in its
``ech`` SvcParam (RFC 9848, RFC 9849 §4); :func:`addresses` finds where
step 3 connects.

:func:`describe_params` writes SvcParams with dnspython's presentation form
of each value (``to_text()``) but not the rdata's whole ``to_text()``: that
would print the ECHConfigList in base64 (shown here by its size) and quote
every value, where a zone file and RFC 9460's examples need quotes only
around values with spaces or escapes.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

import dns.exception
import dns.message
import dns.name
import dns.rcode
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

from echfront.cli.check_findings import CheckError, Findings, one_line
from echfront.dns.doh import DoHClient, doh_query
from echfront.dns.verify import join_host_port, name_text
from echfront.ech.echconfig import ECHConfig, decode_config_list
from echfront.ech.grease import is_decoy
from echfront.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "MAX_ALIAS_HOPS",
    "Answer",
    "DoHLookup",
    "Endpoint",
    "Lookup",
    "ResolverLookup",
    "addresses",
    "describe_params",
    "https_records",
]

#: The port of an HTTPS record without ``port``: https (RFC 9460 §9).
DEFAULT_PORT = 443
#: RFC 9460 asks clients to bound chains of AliasMode records; 8 hops here.
MAX_ALIAS_HOPS = 8


# -- asking DNS -------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """Records found: the owner at the end of any CNAME chain, and the rdatas."""

    owner: dns.name.Name
    rdatas: tuple[Any, ...]
    ttl: int = 0


class Lookup(Protocol):
    """One way of asking DNS."""

    where: str

    def query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Answer:
        """The records of ``rdtype`` at the end of ``name``'s CNAME chain.

        :raises CheckError: when there is no answer to work with.
        """
        ...


class ResolverLookup:
    """The system resolver, or one server given by ``--resolver`` (dnspython)."""

    def __init__(self, server: tuple[str, int] | None, timeout: float) -> None:
        """Ask ``server`` (host, port), or the system resolver for None."""
        if server is None:
            try:
                self._resolver = dns.resolver.Resolver()
            except dns.exception.DNSException as error:
                raise CheckError(f"no system resolver ({one_line(error)})") from None
            self.where = "the system resolver"
        else:
            host, port = server
            address = _address_of(host)
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [address]
            self._resolver.port = port
            self.where = join_host_port(address, port)
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        self._resolver.retry_servfail = False

    def query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Answer:
        """See :meth:`Lookup.query`."""
        try:
            answer = self._resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            raise CheckError(
                f"{name_text(name)} does not exist (NXDOMAIN from {self.where})"
            ) from None
        except dns.resolver.LifetimeTimeout:
            raise CheckError(f"no DNS answer from {self.where} in time") from None
        except dns.resolver.NoNameservers as error:
            raise CheckError(f"DNS lookup failed: {one_line(error)}") from None
        except dns.exception.DNSException as error:
            raise CheckError(f"DNS lookup of {name_text(name)} failed: {one_line(error)}") from None
        rrset = answer.rrset
        if rrset is None:
            return Answer(answer.canonical_name, ())
        return Answer(rrset.name, tuple(rrset), rrset.ttl)


class DoHLookup:
    """A DNS-over-HTTPS server (RFC 8484), given by ``--doh``."""

    def __init__(self, url: str, timeout: float) -> None:
        """Ask the DoH server at ``url``."""
        self._client = DoHClient(url, timeout)
        self.where = self._client.url

    def query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Answer:
        """See :meth:`Lookup.query`."""
        url = self.where
        question = doh_query(name, rdtype)
        try:
            reply = self._client.exchange(question)
        except OSError as error:
            raise CheckError(f"DoH query to {url} failed: {one_line(error)}") from None
        except ValueError as error:
            raise CheckError(f"DoH server {url}: {one_line(error)}") from None
        if reply.status != 200:
            raise CheckError(f"DoH server {url} answered HTTP {reply.status}")
        try:
            message = reply.message(question)
        except ValueError as error:
            raise CheckError(f"DoH server {url}: {one_line(error)}") from None
        if not isinstance(message, dns.message.QueryMessage):
            raise CheckError(f"DoH server {url} answered another question")
        rcode = message.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise CheckError(f"{name_text(name)} does not exist (NXDOMAIN from {url})")
        if rcode != dns.rcode.NOERROR:
            raise CheckError(f"DoH server {url} answered {dns.rcode.to_text(rcode)}")
        try:
            chain = message.resolve_chaining()
        except dns.exception.DNSException as error:
            raise CheckError(f"DoH answer is inconsistent: {one_line(error)}") from None
        if chain.answer is None:
            return Answer(chain.canonical_name, ())
        return Answer(chain.answer.name, tuple(chain.answer), chain.answer.ttl)


def _address_of(host: str) -> str:
    """``host`` as an IP address (dnspython needs one for a name server)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError as error:
        raise CheckError(f"cannot resolve the DNS server name {host!r} ({error})") from None
    return str(infos[0][4][0])


# -- the HTTPS records ------------------------------------------------------------------


@dataclass
class Endpoint:
    """A ServiceMode HTTPS record's endpoint and its configs."""

    owner: dns.name.Name
    priority: int
    target: dns.name.Name
    port: int
    hints: list[str]
    configs: list[ECHConfig] = field(default_factory=list)


def describe_params(record: HTTPS) -> str:
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


def https_records(lookup: Lookup, name: dns.name.Name, findings: Findings) -> list[Endpoint] | None:
    """Step 1: find NAME's ServiceMode HTTPS records (following AliasMode) and decode ech."""
    current = name
    for _hop in range(MAX_ALIAS_HOPS + 1):
        answer = lookup.query(current, dns.rdatatype.HTTPS)
        records = sorted(
            (r for r in answer.rdatas if isinstance(r, HTTPS)), key=lambda r: r.priority
        )
        if answer.owner != current:
            findings.ok(f"{name_text(current)} is an alias (CNAME) of {name_text(answer.owner)}")
        if not records:
            findings.error(f"{name_text(answer.owner)} has no HTTPS record (at {lookup.where})")
            return None
        service = [r for r in records if r.priority != 0]
        if service:
            return _service_records(answer, service, findings, lookup.where)
        alias = records[0]
        if alias.target == dns.name.root:
            findings.error(f"{name_text(answer.owner)} HTTPS 0 . says the service is unavailable")
            return None
        findings.ok(f"{name_text(answer.owner)} HTTPS 0 {alias.target}: AliasMode, following it")
        current = alias.target
    findings.error(f"more than {MAX_ALIAS_HOPS} HTTPS AliasMode records in a chain")
    return None


def _service_records(
    answer: Answer, records: list[HTTPS], findings: Findings, where: str
) -> list[Endpoint]:
    """Report ServiceMode records and decode each ``ech`` (RFC 9848, RFC 9849 §4)."""
    owner = answer.owner
    count = len(records)
    findings.ok(
        f"{name_text(owner)}: {count} HTTPS record{'s' if count != 1 else ''} "
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
        endpoint = Endpoint(owner, record.priority, target, port, hints)
        label = f"HTTPS {record.priority} {record.target}"
        findings.ok(f"{label}: {describe_params(record)}")
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
        configs = []
        for config in decoded.configs:
            if is_decoy(config):
                # Skipped by correct clients, held by nobody: nothing to probe or compare.
                findings.ok(
                    f"ech config_id {config.config_id} is a GREASE decoy that clients skip "
                    "(RFC 9849 §6.2.2)"
                )
                continue
            configs.append(config)
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
        endpoint.configs = configs
        endpoints.append(endpoint)
    if not any(e.configs for e in endpoints):
        findings.error(f"no HTTPS record of {name_text(owner)} has an ech parameter: no ECH")
    return endpoints


# -- the addresses to probe (step 3) ------------------------------------------------------


def addresses(lookup: Lookup, endpoint: Endpoint, findings: Findings) -> list[str]:
    """The target's A/AAAA addresses; its address hints only if it has none (RFC 9460 §7.3).

    Clients prefer A/AAAA answers to hints, so a hint that is not among them
    is reported: clients that connect before the A/AAAA answer may reach it.
    """
    found: list[str] = []
    failures = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            answer = lookup.query(endpoint.target, rdtype)
        except CheckError as error:
            failures.append(str(error))
            continue
        found.extend(r.address for r in answer.rdatas if hasattr(r, "address"))
    target = name_text(endpoint.target)
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
