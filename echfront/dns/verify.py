# -*- test-case-name: tests.test_publish -*-
"""Checking what DNS serves: the verifier, and the values every publisher shares.

Clients learn an ECHConfigList from the ``ech`` SvcParam (key 5, RFC 9848
§3) of the HTTPS resource records (RFC 9460 §9) of the name they connect
to.  Before a new key is offered as the retry config, or an old one
retired, those records must carry the new list; a publisher
(:mod:`~echfront.dns.rfc2136`, :mod:`~echfront.dns.command`) changes them
and the :class:`Verifier` here checks them, asking every authoritative
server directly and, optionally, a DNS-over-HTTPS resolver
(:mod:`~echfront.dns.doh`) for what clients actually get.

Also here, because every publisher uses them: :class:`PublishError` (every
failure, one line naming the server, name and problem), :class:`DNSServer`,
:func:`check_config_list` and :func:`query_server`; and the one
``host:port`` parser, :func:`split_host_port` (with :func:`join_host_port`),
which the configuration and ``echfront check`` use too.

Everything that blocks (dnspython's and the DoH client's sockets) runs in
the reactor's thread pool; the reactor is always passed in, never imported.
Asking an authoritative server is ``dns.query.udp_with_fallback`` (TCP when
the answer is truncated).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rdtypes.svcbbase
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool

from echfront.dns.doh import DoHClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "DNSServer",
    "Finding",
    "PublishError",
    "Verifier",
    "absolute_name",
    "check_config_list",
    "describe_error",
    "join_host_port",
    "name_text",
    "query_server",
    "split_host_port",
]

#: Seconds one DNS exchange, DoH request or hook run may take.
DEFAULT_TIMEOUT = 10.0

_ECH = dns.rdtypes.svcbbase.ParamKey.ECH
_HTTPS = dns.rdatatype.HTTPS


class PublishError(Exception):
    """Publication or verification failed; the message is one line."""


# -- values -------------------------------------------------------------------


def split_host_port(text: str, *, default_port: int | None) -> tuple[str, int | None]:
    """Split ``HOST``, ``HOST:PORT``, ``[IPv6]``, ``[IPv6]:PORT`` or a bare IPv6 address.

    The one ``host:port`` parser: DNS servers in ``[publish]`` and the
    addresses ``echfront check`` is given.  A text with more than one colon
    and no brackets is a bare IPv6 address (RFC 3986 §3.2.2 puts an IPv6
    literal with a port in brackets).  The host is not checked here.

    :param default_port: the port when the text has none (None: no default).
    :raises ValueError: one line quoting the text, for a missing host, a bad
        bracket, or a port (after a colon) outside 1..65535.
    """
    host, port_text = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not HOST[:PORT] ([IPv6]:PORT with a port)")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"{text!r} has no host")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be 1..65535")
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    """``host:port`` for messages, an IPv6 address in brackets (RFC 3986 §3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class DNSServer:
    """A DNS server's IP address and port."""

    host: str
    port: int = 53

    @classmethod
    def parse(cls, text: str) -> DNSServer:
        """Parse ``"192.0.2.1"``, ``"192.0.2.1:5353"``, ``"::1"`` or ``"[::1]:5353"``.

        Only IP addresses: the server a TSIG key is sent to should not depend
        on a resolver's answer.

        :raises ValueError: with the reason.
        """
        host, port = split_host_port(text, default_port=53)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address with an optional :port") from None
        assert port is not None
        return cls(str(address), port)

    def __str__(self) -> str:
        """``host:port``, IPv6 in brackets."""
        return join_host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason a verification did not pass.

    :ivar source: the server (``host:port``) or DoH URL asked.
    :ivar name: the name whose records were asked for.
    :ivar problem: what was wrong, one line.
    :ivar error: True when the source could not be asked or gave no usable
        answer (unreachable, timeout, SERVFAIL, not authoritative); False
        when it answered and the records differ.
    """

    source: str
    name: str
    problem: str
    error: bool = False

    def __str__(self) -> str:
        """``source: name: problem``."""
        return f"{self.source}: {self.name}: {self.problem}"


def check_config_list(config_list: bytes) -> None:
    """Check the framing of an ECHConfigList (RFC 9849 §4).

    Only the framing: a 2-byte length covering the rest, and one or more
    ECHConfigs of version, length and contents that fill it exactly.  The
    contents are the key manager's business, and a version this code does
    not know may still be one clients know.

    :raises PublishError: naming what is wrong.
    """
    if len(config_list) < 2 or int.from_bytes(config_list[:2], "big") != len(config_list) - 2:
        raise PublishError("the ECHConfigList's length prefix does not match its size")
    pos = 2
    if pos == len(config_list):
        raise PublishError("the ECHConfigList is empty")
    while pos < len(config_list):
        if pos + 4 > len(config_list):
            raise PublishError("the ECHConfigList ends inside an ECHConfig header")
        pos += 4 + int.from_bytes(config_list[pos + 2 : pos + 4], "big")
    if pos != len(config_list):
        raise PublishError("an ECHConfig runs past the end of the ECHConfigList")


def _digest(data: bytes) -> str:
    """A short fingerprint of a config list for one-line messages."""
    return hashlib.sha256(data).hexdigest()[:12]


def absolute_name(name: str) -> dns.name.Name:
    """``name`` as an absolute DNS name (relative names are under the root)."""
    return dns.name.from_text(name, dns.name.root)


def name_text(name: dns.name.Name) -> str:
    """``name`` without its final dot, for messages."""
    return name.to_text(omit_final_dot=True)


def describe_error(error: BaseException) -> str:
    """A one-line description of an exception: its class and message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- asking an authoritative server (blocking: run in the thread pool) --------


def query_server(
    server: DNSServer,
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    timeout: float,
    *,
    tcp: bool = False,
) -> dns.message.Message:
    """Ask ``server`` for (``name``, ``rdtype``): UDP, and TCP when truncated, or TCP only.

    The Recursion Desired bit is cleared: these are questions for the
    zone's own servers (RFC 1035 §4.1.1), whose answers must carry AA.
    ``timeout`` bounds each of the UDP and TCP exchanges.
    """
    query = dns.message.make_query(name, rdtype)
    query.flags &= ~dns.flags.RD
    if tcp:
        return dns.query.tcp(query, server.host, timeout=timeout, port=server.port)
    answer, _tcp = dns.query.udp_with_fallback(
        query, server.host, timeout=timeout, port=server.port
    )
    return answer


# -- the verifier ---------------------------------------------------------------


class Verifier:
    """Checks that the HTTPS records of some names carry a given ECHConfigList.

    Each name's HTTPS RRset (RFC 9460 §9) is asked of every server in
    ``servers`` (the zone's authoritative servers: the primary, and the
    secondaries clients may reach) with recursion not desired, over UDP and
    over TCP when truncated; an answer must be authoritative (AA set).  With
    ``doh``, the same question goes to that DNS-over-HTTPS resolver (RFC
    8484 §4.1, :class:`~echfront.dns.doh.DoHClient`), which shows what
    clients get through caches: it may lag the authoritative servers by
    the records' TTL.

    A name passes when it has at least one ServiceMode record (priority >
    0, RFC 9460 §2.4.3) and every ServiceMode record's ``ech`` SvcParam
    (RFC 9848 §3) equals the expected list byte for byte.  An AliasMode
    record (priority 0, RFC 9460 §2.4.2) fails: clients would follow it
    and never see SvcParams at this name.

    :param reactor: provides ``IReactorThreads``: every question is asked
        in its thread pool.
    """

    def __init__(
        self,
        names: Sequence[str],
        servers: Sequence[DNSServer],
        *,
        reactor: Any,
        timeout: float = DEFAULT_TIMEOUT,
        doh: str | None = None,
    ) -> None:
        """Verify ``names`` against ``servers`` (and ``doh``, a URL or URI template)."""
        if not names:
            raise ValueError("no names to verify")
        if not servers and doh is None:
            raise ValueError("no server to verify against")
        self.names = tuple(absolute_name(name) for name in names)
        self.servers = tuple(servers)
        self.reactor = reactor
        self.timeout = timeout
        self.doh_client = DoHClient(doh, timeout) if doh is not None else None
        #: The DoH URL asked (a URI template's ``{?dns}`` dropped), or None.
        self.doh = self.doh_client.url if self.doh_client is not None else None
        #: The findings of the last :meth:`verify` call.
        self.last_findings: list[Finding] = []

    def check(self, config_list: bytes) -> Deferred[list[Finding]]:
        """Ask every source about every name; fire with what did not pass (never fails).

        An empty list means every source serves exactly ``config_list``.
        """
        checks: list[Deferred[list[Finding]]] = []
        pool = self.reactor.getThreadPool()
        for server in self.servers:
            for name in self.names:
                checks.append(
                    deferToThreadPool(
                        self.reactor, pool, self._ask_server, server, name, config_list
                    )
                )
        if self.doh_client is not None:
            for name in self.names:
                checks.append(
                    deferToThreadPool(
                        self.reactor, pool, self._ask_doh, self.doh_client, name, config_list
                    )
                )
        gathered: Deferred[list[list[Finding]]] = gatherResults(checks, consumeErrors=True)
        return gathered.addCallback(lambda lists: [f for found in lists for f in found])

    def verify(self, config_list: bytes) -> Deferred[bool]:
        """True when every source serves exactly ``config_list`` for every name.

        False when the sources answered and something differs (a record
        without it, with another list, no record); :attr:`last_findings`
        says what.  Fails with :class:`PublishError` (the first problem)
        when a source could not be asked or gave no usable answer, so that
        an unreachable server is not mistaken for a record still to change.
        """

        def judge(findings: list[Finding]) -> bool:
            self.last_findings = findings
            for finding in findings:
                if finding.error:
                    raise PublishError(str(finding))
            return not findings

        return self.check(config_list).addCallback(judge)

    # The two askers run in the thread pool and return findings, never
    # raise: one broken source must not hide what the others say.

    def _ask_server(
        self, server: DNSServer, name: dns.name.Name, config_list: bytes
    ) -> list[Finding]:
        source = str(server)
        try:
            answer = query_server(server, name, _HTTPS, self.timeout)
        except dns.exception.Timeout:
            return [Finding(source, name_text(name), f"no answer in {self.timeout:g}s", True)]
        except (dns.exception.DNSException, OSError, EOFError) as error:
            return [Finding(source, name_text(name), describe_error(error), True)]
        if not answer.flags & dns.flags.AA:
            return [
                Finding(
                    source, name_text(name), "the answer is not authoritative (AA not set)", True
                )
            ]
        return _judge_answer(answer, source, name, config_list)

    def _ask_doh(self, client: DoHClient, name: dns.name.Name, config_list: bytes) -> list[Finding]:
        try:
            answer = client.query(name, _HTTPS)
        except TimeoutError:
            return [Finding(client.url, name_text(name), f"no answer in {self.timeout:g}s", True)]
        except (OSError, ValueError) as error:
            return [Finding(client.url, name_text(name), describe_error(error), True)]
        return _judge_answer(answer, client.url, name, config_list)


def _judge_answer(
    answer: dns.message.Message, source: str, name: dns.name.Name, config_list: bytes
) -> list[Finding]:
    """The findings about ``name`` in one answer to an HTTPS question."""
    owner = name_text(name)
    rcode = answer.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return [Finding(source, owner, "no such name (NXDOMAIN)")]
    if rcode != dns.rcode.NOERROR:
        return [Finding(source, owner, f"answered {dns.rcode.to_text(rcode)}", True)]
    if not isinstance(answer, dns.message.QueryMessage):
        return [Finding(source, owner, "the answer is not a query response", True)]
    try:
        # A resolver answers for a CNAME's target; follow the chain it sent.
        rrset = answer.resolve_chaining().answer
    except dns.exception.DNSException as error:
        return [Finding(source, owner, describe_error(error), True)]
    if rrset is None:
        return [Finding(source, owner, "no HTTPS record")]
    service = [rd for rd in rrset if rd.priority > 0]
    if len(service) < len(rrset):
        return [
            Finding(
                source,
                owner,
                "has an AliasMode HTTPS record (priority 0): ech must be at its target",
            )
        ]
    findings = []
    expected = _digest(config_list)
    for rdata in service:
        param = rdata.params.get(_ECH)
        if param is None:
            problem = "has no ech SvcParam"
        elif param.ech != config_list:
            problem = f"ech is {_digest(param.ech)}, not {expected}"
        else:
            continue
        findings.append(Finding(source, owner, f"record {rdata.priority} {rdata.target} {problem}"))
    return findings
