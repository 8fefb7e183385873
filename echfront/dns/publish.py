# -*- test-case-name: tests.test_publish -*-
"""Publishing ECH configs in DNS, and checking what DNS serves.

Clients learn an ECHConfigList from the ``ech`` SvcParam (key 5, RFC 9848
§3) of the HTTPS resource records (RFC 9460 §9) of the name they connect
to.  Before a new key is offered as the retry config, or an old one
retired, those records must carry the new list; this module changes them
(:class:`IPublisher`) and checks them (:class:`Verifier`).

Two publishers:

* :class:`RFC2136Publisher` edits the records on the zone's primary server
  with a TSIG-signed (RFC 8945) dynamic UPDATE (RFC 2136).  It reads each
  name's HTTPS RRset, replaces only the ``ech`` SvcParam of every
  ServiceMode record (priority, target, other SvcParams and TTL stay), and
  sends one UPDATE per zone whose prerequisite is the RRset exactly as
  read, so a concurrent edit makes the update fail instead of being
  overwritten.
* :class:`CommandPublisher` runs a program of the operator's (a provider's
  API client, ``knsupdate``, a commit to a zone repository...) with the
  base64 ECHConfigList.

Both verify with a :class:`Verifier`, which asks the authoritative
server(s) directly and, optionally, a DNS-over-HTTPS resolver (RFC 8484)
for what clients actually get.

Everything that blocks (dnspython's sockets) runs in the reactor's thread
pool; the reactor is always passed in, never imported.  Every failure
reaches the caller as one :class:`PublishError` line naming the server,
name and problem.  :func:`publisher_from_config` builds a publisher from
the ``[publish]`` table.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.HTTPS
import dns.rdtypes.svcbbase
import dns.rrset
import dns.tsig
import dns.update
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from echfront.errors import ConfigError
from echfront.interfaces import IPublisher

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_TTL",
    "PUBLISH_KEYS",
    "TSIG_ALGORITHMS",
    "CommandPublisher",
    "DNSServer",
    "Finding",
    "PublishError",
    "RFC2136Publisher",
    "TSIGKey",
    "Verifier",
    "check_config_list",
    "parse_tsig_secret_file",
    "publisher_from_config",
]

#: Seconds one DNS exchange, DoH request or hook run may take.
DEFAULT_TIMEOUT = 10.0
#: TTL of an HTTPS record the RFC 2136 publisher has to create.
DEFAULT_TTL = 300
#: Keys of the ``[publish]`` table.
PUBLISH_KEYS = (
    "method",
    "server",
    "zone",
    "tsig_key_name",
    "tsig_algorithm",
    "tsig_secret_file",
    "ttl",
    "command",
    "timeout",
    "verify_servers",
    "doh",
)
#: TSIG algorithms accepted (RFC 8945 §6): the SHA-2 HMACs.  hmac-md5 and
#: hmac-sha1 are refused: RFC 8945 §6 says MUST NOT / NOT RECOMMENDED for use.
TSIG_ALGORITHMS = ("hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512")

_ECH = dns.rdtypes.svcbbase.ParamKey.ECH
_HTTPS = dns.rdatatype.HTTPS
_IN = dns.rdataclass.IN
#: A DNS message over TCP or DoH is at most 65535 octets (RFC 1035 §4.2.2,
#: RFC 8484 §6); a longer DoH body is not a DNS answer.
_MAX_MESSAGE = 65535
#: How long a hook killed with SIGTERM gets before SIGKILL.
_KILL_GRACE = 2.0
#: How much of a hook's stderr is kept (only its last line is reported).
_STDERR_KEPT = 4096
#: RFC 8484 §6: the media type of a DoH request and answer.
_DNS_MESSAGE = b"application/dns-message"

_T = TypeVar("_T")


class PublishError(Exception):
    """Publication or verification failed; the message is one line."""


# -- values -------------------------------------------------------------------


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
        host, port = text, 53
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"{text!r} is not [IPv6]:port")
            if rest:
                port = _port(rest[1:], text)
        elif text.count(":") == 1:
            host, _, rest = text.partition(":")
            port = _port(rest, text)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address with an optional :port") from None
        return cls(str(address), port)

    def __str__(self) -> str:
        """``host:port``, IPv6 in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r} has no valid port")
    return int(text)


@dataclass(frozen=True, slots=True)
class TSIGKey:
    """A TSIG key (RFC 8945 §4): name, algorithm and shared secret."""

    name: str
    secret: bytes
    algorithm: str = "hmac-sha256"

    def dnspython(self) -> dns.tsig.Key:
        """The key as dnspython signs with it."""
        return dns.tsig.Key(self.name, self.secret, self.algorithm)


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


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name, dns.name.root)


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


# -- blocking DNS helpers (run in the reactor's thread pool) ------------------


def _query(
    server: DNSServer,
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    timeout: float,
    *,
    tcp: bool = False,
) -> dns.message.Message:
    """Ask ``server`` for (``name``, ``rdtype``), UDP first and TCP on truncation.

    The Recursion Desired bit is cleared: these are questions for the
    zone's own servers (RFC 1035 §4.1.1), whose answers must carry AA.
    """
    query = dns.message.make_query(name, rdtype)
    query.flags &= ~dns.flags.RD
    deadline = time.monotonic() + timeout
    if not tcp:
        try:
            return dns.query.udp(
                query, server.host, timeout=timeout, port=server.port, raise_on_truncation=True
            )
        except dns.message.Truncated:
            pass
    return dns.query.tcp(
        query, server.host, timeout=max(0.1, deadline - time.monotonic()), port=server.port
    )


def _exchange_tcp(server: DNSServer, wire: bytes, timeout: float) -> bytes:
    """Send one DNS message over TCP (RFC 1035 §4.2.2) and return the answer's octets.

    dnspython's ``dns.query.tcp`` parses the answer itself and raises
    before returning the RCODE when a server answers a signed UPDATE
    without a TSIG (as servers do for zones they do not serve); reading the
    octets here lets :func:`_update_result` report that RCODE.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(struct.pack("!H", len(wire)) + wire)

        def read(count: int) -> bytes:
            data = bytearray()
            while len(data) < count:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(count - len(data))
                if not chunk:
                    raise EOFError("connection closed before the whole answer arrived")
                data += chunk
            return bytes(data)

        (length,) = struct.unpack("!H", read(2))
        return read(length)


def _update_result(update: dns.update.UpdateMessage, wire: bytes, where: str) -> None:
    """Check the answer to a signed UPDATE; raise :class:`PublishError` unless NOERROR.

    A server that rejects the request's TSIG answers NOTAUTH with a TSIG
    whose error field says why (BADSIG, BADKEY, BADTIME) and whose MAC is
    empty (RFC 8945 §5.3.2); dnspython raises a ``PeerError`` for those.
    Answers that are not signed at all (a zone the server does not serve)
    are read without verification, only to name their RCODE.
    """
    try:
        answer = dns.message.from_wire(wire, keyring=update.keyring, request_mac=update.mac)
    except dns.tsig.PeerError as error:
        unsigned = dns.message.from_wire(wire, keyring=False)
        tsig_error = _tsig_error_text(unsigned.tsig_error) if unsigned.tsig else "?"
        raise PublishError(
            f"{where}: {dns.rcode.to_text(unsigned.rcode())} (TSIG error {tsig_error}: "
            f"{error}); check the TSIG key and the server's update ACL"
        ) from None
    except dns.exception.FormError as error:
        unsigned = dns.message.from_wire(wire, keyring=False)
        if not update.is_response(unsigned):
            raise PublishError(f"{where}: the answer does not match the UPDATE") from None
        rcode = unsigned.rcode()
        if rcode != dns.rcode.NOERROR:
            raise PublishError(
                f"{where}: {dns.rcode.to_text(rcode)} (unsigned answer: the server may not "
                "be the primary of this zone)"
            ) from None
        raise PublishError(f"{where}: unusable answer ({error})") from None
    if not update.is_response(answer):
        raise PublishError(f"{where}: the answer does not match the UPDATE")
    rcode = answer.rcode()
    if rcode == dns.rcode.NXRRSET:
        # RFC 2136 §3.2.5: the RRset changed between our read and the update.
        raise PublishError(
            f"{where}: NXRRSET (the HTTPS records changed while publishing; nothing was "
            "changed, try again)"
        )
    if rcode == dns.rcode.YXRRSET:
        raise PublishError(
            f"{where}: YXRRSET (an HTTPS record was added while publishing; nothing was "
            "changed, try again)"
        )
    if rcode != dns.rcode.NOERROR:
        raise PublishError(f"{where}: {dns.rcode.to_text(rcode)}")


#: TSIG error codes (RFC 8945 §3, §5.2): 16 is BADSIG here, where
#: ``dns.rcode`` would call it BADVERS (the EDNS meaning of 16).
_TSIG_ERRORS = {16: "BADSIG", 17: "BADKEY", 18: "BADTIME", 22: "BADTRUNC"}


def _tsig_error_text(value: int | None) -> str:
    return _TSIG_ERRORS.get(value or 0) or dns.rcode.to_text(dns.rcode.Rcode.make(value or 0))


def _ech_param(config_list: bytes) -> Any:
    """The ``ech`` SvcParam (RFC 9848 §3) carrying ``config_list``."""
    return dns.rdtypes.svcbbase.ECHParam(config_list)  # type: ignore[no-untyped-call]


def _with_ech(rdata: Any, config_list: bytes) -> Any:
    """``rdata`` (HTTPS) with its ``ech`` SvcParam set to ``config_list``.

    Priority, target and every other SvcParam are kept as they are; the
    wire order of SvcParams (RFC 9460 §2.2) is dnspython's to keep.
    """
    params = dict(rdata.params)
    params[_ECH] = _ech_param(config_list)
    return rdata.replace(params=params)


# -- verification -------------------------------------------------------------


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory.

    ``FileBodyProducer`` would schedule its writes on the global
    cooperator, and so on the global reactor; this writes at once.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body was written in one call."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class _BoundedBody(Protocol):
    """Collects a response body of at most ``limit`` octets.

    ``readBody`` would collect any size; a DoH answer longer than a DNS
    message can be is an error, and is not kept in memory.
    """

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.data = bytearray()
        self.failed = False

    def dataReceived(self, data: bytes) -> None:
        if self.failed:
            return
        self.data += data
        if len(self.data) > self.limit:
            self.failed = True
            transport: Any = self.transport
            transport.stopProducing()
            self.finished.errback(ValueError(f"body longer than {self.limit} octets"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.failed:
            return
        # Without Content-Length an HTTP/1.0 body ends with the connection:
        # PotentialDataLoss then is the normal end, and the DNS parser will
        # catch a truncated message.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(bytes(self.data))
        else:
            self.finished.errback(reason)


def _read_bounded(response: IResponse, limit: int) -> Deferred[bytes]:
    def cancel(d: Deferred[bytes]) -> None:
        protocol.failed = True
        transport: Any = protocol.transport
        if transport is not None:
            transport.stopProducing()

    finished: Deferred[bytes] = Deferred(cancel)
    protocol = _BoundedBody(finished, limit)
    response.deliverBody(protocol)
    return finished


class Verifier:
    """Checks that the HTTPS records of some names carry a given ECHConfigList.

    Each name's HTTPS RRset (RFC 9460 §9) is asked of every server in
    ``servers`` (the zone's authoritative servers: the primary, and the
    secondaries clients may reach) with recursion not desired, over UDP and
    over TCP when truncated; an answer must be authoritative (AA set).  With
    ``doh``, the same question goes to that DNS-over-HTTPS resolver (RFC
    8484 §4.1: POST, ``application/dns-message``, ID 0), which shows what
    clients get through caches: it may lag the authoritative servers by
    the records' TTL.

    A name passes when it has at least one ServiceMode record (priority >
    0, RFC 9460 §2.4.3) and every ServiceMode record's ``ech`` SvcParam
    (RFC 9848 §3) equals the expected list byte for byte.  An AliasMode
    record (priority 0, RFC 9460 §2.4.2) fails: clients would follow it
    and never see SvcParams at this name.

    :param reactor: provides ``IReactorThreads``, ``IReactorTime`` and,
        with ``doh``, ``IReactorTCP`` (``IReactorSSL`` for https).
    :param doh_agent: an ``IAgent`` for the DoH requests (default: a
        non-persistent ``Agent`` on ``reactor``).
    """

    def __init__(
        self,
        names: Sequence[str],
        servers: Sequence[DNSServer],
        *,
        reactor: Any,
        timeout: float = DEFAULT_TIMEOUT,
        doh: str | None = None,
        doh_agent: Any = None,
    ) -> None:
        """Verify ``names`` against ``servers`` (and ``doh``, a URL)."""
        if not names:
            raise ValueError("no names to verify")
        if not servers and doh is None:
            raise ValueError("no server to verify against")
        self.names = tuple(_absolute(name) for name in names)
        self.servers = tuple(servers)
        self.reactor = reactor
        self.timeout = timeout
        # RFC 8484 §4.1 gives DoH servers as URI templates with {?dns} for
        # GET; a POST goes to the template's base.
        self.doh = doh.replace("{?dns}", "") if doh is not None else None
        if self.doh is not None and doh_agent is None:
            # Not persistent: an idle kept-alive connection would outlive
            # each check (and trial reports it as a dirty reactor).
            pool = HTTPConnectionPool(reactor, persistent=False)
            doh_agent = Agent(reactor, connectTimeout=timeout, pool=pool)
        self.doh_agent = doh_agent
        #: The findings of the last :meth:`verify` call.
        self.last_findings: list[Finding] = []

    def check(self, config_list: bytes) -> Deferred[list[Finding]]:
        """Ask every source about every name; fire with what did not pass (never fails).

        An empty list means every source serves exactly ``config_list``.
        """
        checks: list[Deferred[list[Finding]]] = []
        for server in self.servers:
            for name in self.names:
                d = deferToThreadPool(
                    self.reactor,
                    self.reactor.getThreadPool(),
                    self._ask_server,
                    server,
                    name,
                    config_list,
                )
                checks.append(d)
        if self.doh is not None:
            for name in self.names:
                checks.append(self._ask_doh(self.doh, name, config_list))
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

    # The two askers return findings, never raise: one broken source must
    # not hide what the others say.

    def _ask_server(
        self, server: DNSServer, name: dns.name.Name, config_list: bytes
    ) -> list[Finding]:
        source = str(server)
        try:
            answer = _query(server, name, _HTTPS, self.timeout)
        except dns.exception.Timeout:
            return [Finding(source, _text(name), f"no answer in {self.timeout:g}s", True)]
        except (dns.exception.DNSException, OSError, EOFError) as error:
            return [Finding(source, _text(name), _describe(error), True)]
        if not answer.flags & dns.flags.AA:
            return [
                Finding(source, _text(name), "the answer is not authoritative (AA not set)", True)
            ]
        return _judge_answer(answer, source, name, config_list)

    def _ask_doh(
        self, url: str, name: dns.name.Name, config_list: bytes
    ) -> Deferred[list[Finding]]:
        query = dns.message.make_query(name, _HTTPS)
        # RFC 8484 §4.1: ID 0 keeps answers cacheable by HTTP caches.
        query.id = 0
        headers = Headers(
            {b"content-type": [_DNS_MESSAGE], b"accept": [_DNS_MESSAGE]},
        )
        d: Deferred[IResponse] = self.doh_agent.request(
            b"POST", url.encode("ascii"), headers, _BytesProducer(query.to_wire())
        )

        def got_response(response: IResponse) -> Deferred[tuple[IResponse, bytes]]:
            # The body is read even for an error status: an unread body
            # would hold the connection open.
            return _read_bounded(response, _MAX_MESSAGE).addCallback(lambda body: (response, body))

        def got_body(result: tuple[IResponse, bytes]) -> list[Finding]:
            response, body = result
            if response.code != 200:
                raise ValueError(f"HTTP status {response.code}")
            kinds = response.headers.getRawHeaders(b"content-type") or []
            if not any(k.split(b";")[0].strip().lower() == _DNS_MESSAGE for k in kinds):
                raise ValueError("the answer is not application/dns-message")
            answer = dns.message.from_wire(body)
            if not query.is_response(answer):
                raise ValueError("the answer does not match the question")
            return _judge_answer(answer, url, name, config_list)

        def failed(reason: Failure) -> list[Finding]:
            # Cancelling a request makes the Agent fail it with
            # ResponseNeverReceived (or the body read with CancelledError),
            # not the TimeoutError of Deferred.addTimeout: keep our own flag.
            if timer.called:
                problem = f"no answer in {self.timeout:g}s"
            else:
                problem = _describe(reason.value) if reason.value else reason.getErrorMessage()
            return [Finding(url, _text(name), problem, True)]

        def done(result: list[Finding]) -> list[Finding]:
            if timer.active():
                timer.cancel()
            return result

        asked: Deferred[Any] = d.addCallback(got_response)
        asked.addCallback(got_body)
        timer = self.reactor.callLater(self.timeout, asked.cancel)
        judged: Deferred[list[Finding]] = asked.addErrback(failed)
        return judged.addBoth(done)


def _describe(error: BaseException) -> str:
    """A one-line description of an exception."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _judge_answer(
    answer: dns.message.Message, source: str, name: dns.name.Name, config_list: bytes
) -> list[Finding]:
    """The findings about ``name`` in one answer to an HTTPS question."""
    rcode = answer.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return [Finding(source, _text(name), "no such name (NXDOMAIN)")]
    if rcode != dns.rcode.NOERROR:
        return [Finding(source, _text(name), f"answered {dns.rcode.to_text(rcode)}", True)]
    if not isinstance(answer, dns.message.QueryMessage):
        return [Finding(source, _text(name), "the answer is not a query response", True)]
    try:
        # A resolver answers for a CNAME's target; follow the chain it sent.
        rrset = answer.resolve_chaining().answer
    except dns.exception.DNSException as error:
        return [Finding(source, _text(name), _describe(error), True)]
    if rrset is None:
        return [Finding(source, _text(name), "no HTTPS record")]
    service = [rd for rd in rrset if rd.priority > 0]
    if len(service) < len(rrset):
        return [
            Finding(
                source,
                _text(name),
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
        findings.append(
            Finding(source, _text(name), f"record {rdata.priority} {rdata.target} {problem}")
        )
    return findings


# -- RFC 2136 -----------------------------------------------------------------


@implementer(IPublisher)
class RFC2136Publisher:
    """Publishes by TSIG-signed dynamic UPDATE (RFC 2136, RFC 8945) to the primary.

    For each zone (``zone``, or found by asking the primary for each name's
    SOA, see :meth:`zone_of`):

    1. read each name's HTTPS RRset from ``server`` (a TCP query: the
       primary is the one that applies the update, so it must also be the
       one read);
    2. build the new records: every ServiceMode record with its ``ech``
       SvcParam replaced or added (RFC 9848 §3), priority, target, other
       SvcParams and the RRset's TTL unchanged.  A name with no HTTPS
       record gets one ``1 . ech=...`` record with TTL ``ttl``, which makes
       clients use the name's own A/AAAA addresses and default ports
       (RFC 9460 §2.5.2); a name that is a CNAME, or has an AliasMode
       record, is an error (the records to change live elsewhere);
    3. send one UPDATE for the zone (RFC 2136 §2) whose prerequisites are
       each name's RRset exactly as read (RFC 2136 §2.4.2, "RRset exists,
       value dependent"; §2.4.3 "RRset does not exist" for names without
       one), which deletes the changed records (§2.5.4) and adds their
       replacements (§2.5.1).  The server applies all of it or nothing
       (RFC 2136 §3.4), so a record edited between the read and the update
       makes the update fail with NXRRSET instead of losing the edit.

    Names already carrying ``config_list`` are left alone; a zone with
    nothing to change gets no UPDATE.  Zones are updated one after the
    other: if a later zone fails, earlier ones keep the new list, which is
    harmless (the old keys still decrypt until verification succeeds) and
    the error says which zones were updated.

    :param key: the TSIG key the UPDATE is signed with (RFC 8945 §5.1).
    """

    def __init__(
        self,
        names: Sequence[str],
        server: DNSServer,
        key: TSIGKey,
        *,
        reactor: Any,
        zone: str | None = None,
        ttl: int = DEFAULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        verifier: Verifier | None = None,
    ) -> None:
        """Publish ``names`` through ``server``; verify with ``verifier`` (default: ``server``)."""
        if not names:
            raise ValueError("no names to publish")
        self.names = tuple(_absolute(name) for name in names)
        self.server = server
        self.key = key
        self.reactor = reactor
        self.zone = _absolute(zone) if zone is not None else None
        if self.zone is not None:
            outside = [_text(n) for n in self.names if not n.is_subdomain(self.zone)]
            if outside:
                raise ValueError(f"{outside[0]} is not in zone {_text(self.zone)}")
        self.ttl = ttl
        self.timeout = timeout
        self.verifier = verifier or Verifier(names, [server], reactor=reactor, timeout=timeout)

    def __repr__(self) -> str:
        """Where and what this publishes."""
        names = " ".join(_text(n) for n in self.names)
        return f"<RFC2136Publisher {names} via {self.server} key {self.key.name}>"

    def publish(self, config_list: bytes) -> Deferred[None]:
        """Make every name's HTTPS records carry ``config_list`` (see the class)."""
        try:
            check_config_list(config_list)
        except PublishError as error:
            return fail(error)
        return self._in_thread(self.publish_blocking, config_list)

    def verify(self, config_list: bytes) -> Deferred[bool]:
        """Ask the verifier (see :meth:`Verifier.verify`)."""
        return self.verifier.verify(config_list)

    def _in_thread(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        result: Deferred[_T] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args
        )
        return result

    # -- the blocking steps, in a worker thread; subclasses may wrap them --

    def publish_blocking(self, config_list: bytes) -> None:
        """The whole publication, blocking; raises only :class:`PublishError`."""
        done: list[str] = []
        try:
            for zone, names in self.zones().items():
                try:
                    current = self.read(zone, names)
                    update = self.build_update(zone, current, config_list)
                    if update is not None:
                        self.send(zone, update)
                except PublishError as error:
                    if done:
                        updated = ", ".join(done)
                        raise PublishError(f"{error} (zones already updated: {updated})") from None
                    raise
                done.append(_text(zone))
        except PublishError:
            raise
        except dns.exception.Timeout:
            raise PublishError(f"{self.server}: no answer in {self.timeout:g}s") from None
        except (dns.exception.DNSException, OSError, EOFError, ValueError) as error:
            raise PublishError(f"{self.server}: {_describe(error)}") from None

    def zones(self) -> dict[dns.name.Name, list[dns.name.Name]]:
        """The names grouped by zone, in the order configured."""
        zones: dict[dns.name.Name, list[dns.name.Name]] = {}
        for name in self.names:
            zones.setdefault(self.zone or self.zone_of(name), []).append(name)
        return zones

    def zone_of(self, name: dns.name.Name) -> dns.name.Name:
        """The apex of the zone holding ``name``, as the primary says.

        Asks ``server`` for ``name``'s SOA: the apex answers with it, any
        other name in the zone with the zone's SOA in the authority section
        (RFC 2308 §2.2, §3), both authoritative.
        """
        answer = _query(self.server, name, dns.rdatatype.SOA, self.timeout, tcp=True)
        where = f"{self.server}: {_text(name)}"
        if answer.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise PublishError(
                f"{where}: SOA query answered {dns.rcode.to_text(answer.rcode())} "
                "(does the server serve its zone? set publish.zone)"
            )
        if not answer.flags & dns.flags.AA:
            raise PublishError(f"{where}: the server is not authoritative for it")
        for section in (answer.answer, answer.authority):
            for rrset in section:
                if rrset.rdtype == dns.rdatatype.SOA and name.is_subdomain(rrset.name):
                    return rrset.name
        raise PublishError(f"{where}: no SOA in the answer (set publish.zone)")

    def read(
        self, zone: dns.name.Name, names: Sequence[dns.name.Name]
    ) -> dict[dns.name.Name, dns.rrset.RRset | None]:
        """Each name's HTTPS RRset on the primary (None: the name has none)."""
        current: dict[dns.name.Name, dns.rrset.RRset | None] = {}
        for name in names:
            where = f"{self.server}: {_text(name)}"
            answer = _query(self.server, name, _HTTPS, self.timeout, tcp=True)
            rcode = answer.rcode()
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                raise PublishError(
                    f"{where}: HTTPS query answered {dns.rcode.to_text(rcode)} "
                    "(does the server serve this name's zone?)"
                )
            if not answer.flags & dns.flags.AA:
                raise PublishError(f"{where}: the answer is not authoritative (AA not set)")
            if answer.get_rrset(answer.answer, name, _IN, dns.rdatatype.CNAME) is not None:
                raise PublishError(f"{where}: is a CNAME; publish at its target instead")
            rrset = answer.get_rrset(answer.answer, name, _IN, _HTTPS)
            if rrset is not None and any(rd.priority == 0 for rd in rrset):
                raise PublishError(
                    f"{where}: has an AliasMode HTTPS record (priority 0, RFC 9460 §2.4.2); "
                    "publish at its target instead"
                )
            current[name] = rrset
        return current

    def build_update(
        self,
        zone: dns.name.Name,
        current: Mapping[dns.name.Name, dns.rrset.RRset | None],
        config_list: bytes,
    ) -> dns.update.UpdateMessage | None:
        """The signed UPDATE that puts ``config_list`` into ``current``; None if nothing changes."""
        update = dns.update.UpdateMessage(zone)
        changed = False
        for name, rrset in current.items():
            if rrset is None:
                # RFC 2136 §2.4.3: "RRset does not exist", then §2.5.1 add.
                update.absent(name, _HTTPS)
                fresh = dns.rdtypes.IN.HTTPS.HTTPS(  # type: ignore[no-untyped-call]
                    _IN, _HTTPS, 1, dns.name.root, {_ECH: _ech_param(config_list)}
                )
                update.add(name, self.ttl, fresh)
                changed = True
                continue
            replacements = [(old, _with_ech(old, config_list)) for old in rrset]
            pairs = [(old, new) for old, new in replacements if old != new]
            if not pairs:
                continue
            # RFC 2136 §2.4.2: the whole RRset, value dependent, TTL 0
            # (dnspython writes prerequisite rdatas with TTL 0).
            update.present(name, *rrset)
            for old, new in pairs:
                update.delete(name, old)
                update.add(name, rrset.ttl, new)
            changed = True
        if not changed:
            return None
        # RFC 8945 §5.1: sign last, once the message is complete.
        update.use_tsig(self.key.dnspython())
        return update

    def send(self, zone: dns.name.Name, update: dns.update.UpdateMessage) -> None:
        """Send ``update`` to the primary over TCP; raise unless it answers NOERROR."""
        wire = update.to_wire()
        _update_result(
            update,
            _exchange_tcp(self.server, wire, self.timeout),
            f"{self.server}: UPDATE of zone {_text(zone)}",
        )


# -- command hook -------------------------------------------------------------


class _HookProtocol(ProcessProtocol):
    """Collects a hook's stderr tail and fires ``ended`` with how it ended."""

    def __init__(self) -> None:
        # Fired with the exception, not the Failure: a Deferred given a
        # Failure as its result would run the errbacks.
        self.ended: Deferred[BaseException] = Deferred()
        self.stderr = bytearray()

    def connectionMade(self) -> None:
        # The hook gets no input; an open stdin could make it wait forever.
        assert self.transport is not None
        self.transport.closeStdin()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        del self.stderr[:-_STDERR_KEPT]

    def outReceived(self, data: bytes) -> None:
        """Drained and dropped: the hook's output is not ours to interpret."""

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value or ProcessDone(0))

    def last_line(self) -> str:
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if lines else ""


@implementer(IPublisher)
class CommandPublisher:
    """Publishes by running an operator's program.

    Every element of ``argv`` has ``{config_list}`` replaced with the
    base64 ECHConfigList (the ``ech`` value's presentation form, RFC 9848
    §3) and ``{names}`` with the names, space-separated, as configured.
    Other braces are left alone.  The same two values are in the
    environment as ``ECHFRONT_CONFIG_LIST`` and ``ECHFRONT_NAMES``, on top
    of echfront's own environment.  The program runs without a shell,
    with stdin closed; it succeeds by exiting 0.  A non-zero exit fails
    with the status and the last line of stderr; after ``timeout`` seconds
    it is sent SIGTERM, then SIGKILL, and publication fails.

    The program must make the change the same way :class:`RFC2136Publisher`
    does (only the ``ech`` SvcParam); ``verifier`` then checks it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        names: Sequence[str],
        *,
        reactor: Any,
        verifier: Verifier,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Run ``argv`` to publish ``names``; check with ``verifier``."""
        if not argv:
            raise ValueError("empty command")
        if not names:
            raise ValueError("no names to publish")
        self.argv = tuple(argv)
        self.names = tuple(names)
        self.reactor = reactor
        self.verifier = verifier
        self.timeout = timeout

    def __repr__(self) -> str:
        """The program this runs."""
        return f"<CommandPublisher {self.argv[0]} for {' '.join(self.names)}>"

    def publish(self, config_list: bytes) -> Deferred[None]:
        """Run the program with ``config_list``; :class:`PublishError` unless it exits 0."""
        try:
            check_config_list(config_list)
        except PublishError as error:
            return fail(error)
        encoded = base64.b64encode(config_list).decode("ascii")
        names = " ".join(self.names)
        argv = [a.replace("{config_list}", encoded).replace("{names}", names) for a in self.argv]
        env = dict(os.environ, ECHFRONT_CONFIG_LIST=encoded, ECHFRONT_NAMES=names)
        executable = shutil.which(argv[0], path=env.get("PATH"))
        program = self.argv[0]
        if executable is None:
            return fail(PublishError(f"publish.command: {program}: program not found"))
        protocol = _HookProtocol()
        try:
            transport = self.reactor.spawnProcess(protocol, executable, argv, env=env)
        except OSError as error:
            return fail(PublishError(f"publish.command: {program}: {_describe(error)}"))
        timed_out: list[bool] = []

        def terminate() -> None:
            timed_out.append(True)
            _signal(transport, "TERM")
            kills.append(self.reactor.callLater(_KILL_GRACE, _signal, transport, "KILL"))
            # A child of the hook may still hold its stdout or stderr open,
            # which would keep processEnded from firing: close our ends.
            kills.append(self.reactor.callLater(2 * _KILL_GRACE, transport.loseConnection))

        kills = [self.reactor.callLater(self.timeout, terminate)]

        def ended(reason: BaseException) -> None:
            for call in kills:
                if call.active():
                    call.cancel()
            if timed_out:
                raise PublishError(
                    f"publish.command: {program} did not finish in {self.timeout:g}s (killed)"
                )
            if isinstance(reason, ProcessDone):
                return
            status = "ended"
            if isinstance(reason, ProcessTerminated):
                if reason.signal is not None:
                    status = f"was killed by signal {reason.signal}"
                else:
                    status = f"exited with status {reason.exitCode}"
            line = protocol.last_line()
            raise PublishError(
                f"publish.command: {program} {status}" + (f": {line}" if line else "")
            )

        return protocol.ended.addCallback(ended)

    def verify(self, config_list: bytes) -> Deferred[bool]:
        """Ask the verifier (see :meth:`Verifier.verify`)."""
        return self.verifier.verify(config_list)


def _signal(transport: Any, name: str) -> None:
    # ProcessExitedAlready: it ended on its own meanwhile.
    with contextlib.suppress(ProcessExitedAlready):
        transport.signalProcess(name)


# -- configuration ------------------------------------------------------------


def parse_tsig_secret_file(text: str) -> list[tuple[str | None, str | None, bytes]]:
    """Read the TSIG keys in a secret file: ``[(name, algorithm, secret), ...]``.

    Accepted formats (name and algorithm are None when the format has none):

    * a bare base64 secret, alone in the file;
    * ``[algorithm:]name:secret`` on one line (``kdig -y`` / ``knsupdate -y``);
    * Knot DNS key configuration, as ``keymgr -t NAME`` prints it
      (``key:`` / ``- id:`` / ``algorithm:`` / ``secret:``);
    * BIND ``key "NAME" { algorithm ...; secret "..."; };`` blocks, as
      ``tsig-keygen``, ``ddns-confgen`` and ``rndc-confgen`` write them.

    :raises ValueError: when no key is found or a secret is not base64.
    """
    lines = [
        line
        for line in text.splitlines()
        if not line.lstrip().startswith(("#", "//", ";")) and line.strip()
    ]
    body = "\n".join(lines)
    keys: list[tuple[str | None, str | None, str]] = []
    if re.search(r"^\s*key\s+\S+\s*\{", body, re.MULTILINE):
        for match in re.finditer(r"\bkey\s+\"?([^\"\s{]+)\"?\s*\{(.*?)\}\s*;", body, re.DOTALL):
            inner = match.group(2)
            found_algorithm = re.search(r"\balgorithm\s+\"?([\w.-]+)\"?\s*;", inner)
            found_secret = re.search(r"\bsecret\s+\"([^\"]+)\"\s*;", inner)
            if found_secret is None:
                raise ValueError(f"key {match.group(1)} has no secret")
            keys.append(
                (
                    match.group(1),
                    found_algorithm.group(1) if found_algorithm else None,
                    found_secret.group(1),
                )
            )
    elif re.search(r"^\s*(-\s*)?secret\s*:", body, re.MULTILINE):
        entry: dict[str, str] = {}
        entries = [entry]
        for line in lines:
            item = re.match(r"\s*(-\s*)?(id|algorithm|secret)\s*:\s*\"?([^\"\s]+)\"?\s*$", line)
            if item is None:
                continue
            if item.group(1) and entry:
                entry = {}
                entries.append(entry)
            entry[item.group(2)] = item.group(3)
        for found in entries:
            if found:
                if "secret" not in found:
                    raise ValueError(f"key {found.get('id', '?')} has no secret")
                keys.append((found.get("id"), found.get("algorithm"), found["secret"]))
    else:
        tokens = body.split()
        if len(tokens) != 1:
            raise ValueError("expected one base64 secret, [algorithm:]name:secret, or a key file")
        parts = tokens[0].split(":")
        if len(parts) == 1:
            keys.append((None, None, parts[0]))
        elif len(parts) == 2:
            keys.append((parts[0], None, parts[1]))
        elif len(parts) == 3:
            keys.append((parts[1], parts[0], parts[2]))
        else:
            raise ValueError("expected [algorithm:]name:secret")
    if not keys:
        raise ValueError("no key found")
    decoded = []
    for name, algorithm, secret in keys:
        try:
            raw = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"the secret of key {name or '?'} is not base64") from None
        if not raw:
            raise ValueError(f"the secret of key {name or '?'} is empty")
        decoded.append((name, algorithm.lower() if algorithm else None, raw))
    return decoded


class _Table:
    """Checked access to the ``[publish]`` table; errors name ``publish.KEY``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        unknown = sorted(set(data) - set(PUBLISH_KEYS))
        if unknown:
            raise ConfigError(f"publish.{unknown[0]}: unknown key")

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"publish.{key}: {problem}")

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "required")
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {type(value).__name__}")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise self.error(key, "expected a non-empty list of strings")
        if not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "expected a list of non-empty strings")
        return list(value)

    def number(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {type(value).__name__}")
        if not 0 < value <= 3600:
            raise self.error(key, "must be more than 0 and at most 3600 seconds")
        return float(value)

    def server(self, key: str, text: str) -> DNSServer:
        try:
            return DNSServer.parse(text)
        except ValueError as error:
            raise self.error(key, str(error)) from None

    def name(self, key: str, text: str) -> str:
        try:
            _absolute(text)
        except dns.exception.DNSException as error:
            raise self.error(key, f"{text!r} is not a domain name ({error})") from None
        return text


_METHOD_KEYS = {
    "rfc2136": {"server", "zone", "tsig_key_name", "tsig_algorithm", "tsig_secret_file", "ttl"},
    "command": {"command"},
}


def publisher_from_config(
    table: Mapping[str, Any], *, base: Path, names: Sequence[str], reactor: Any
) -> IPublisher | None:
    """Build the publisher the ``[publish]`` table describes; None for ``method = "none"``.

    Keys (all optional unless said):

    ``method``
        ``"rfc2136"``, ``"command"`` or ``"none"``; required when the table
        has any other key.  An empty table is ``"none"``.  With ``"none"``
        the other keys are only checked for being known, so publication can
        be switched off without deleting them.
    ``server`` (rfc2136, required)
        the zone's primary, ``"192.0.2.1:53"``, ``"[2001:db8::1]:53"``
        (port 53 when omitted); an IP address, not a host name.
    ``zone`` (rfc2136)
        the zone every name is in.  Without it, each name's zone is found
        at publication time by asking ``server`` for the name's SOA.
    ``tsig_key_name``, ``tsig_algorithm``, ``tsig_secret_file`` (rfc2136)
        the TSIG key (RFC 8945).  The file (relative to ``base``) is read
        now, see :func:`parse_tsig_secret_file` for its formats; the name
        and algorithm default to the file's when it names exactly one key,
        the algorithm then to ``hmac-sha256``.  Only SHA-2 HMACs.
    ``ttl`` (rfc2136)
        TTL of a record created for a name that has no HTTPS record
        (default 300).
    ``command`` (command, required)
        the program and its arguments, see :class:`CommandPublisher`.
    ``timeout``
        seconds for each DNS exchange, DoH request, or the whole command
        (default 10).
    ``verify_servers``
        the authoritative servers to verify against (default: ``[server]``;
        required with ``command``).
    ``doh``
        a DoH resolver URL to verify against as well.  ``https://`` (plain
        ``http://`` only to a loopback address, for tests and local
        resolvers).

    :raises ConfigError: one line naming the key.
    """
    section = _Table(table)
    method = section.string("method", required=bool(table)) or "none"
    if method not in ("rfc2136", "command", "none"):
        raise section.error("method", f'expected "rfc2136", "command" or "none", got {method!r}')
    if method == "none":
        return None
    for other, keys in _METHOD_KEYS.items():
        if other != method:
            for key in sorted(keys & set(table)):
                raise section.error(key, f'only used with method = "{other}"')
    if not names:
        raise ConfigError("publish: no names to publish")
    for name in names:
        try:
            _absolute(name)
        except dns.exception.DNSException as error:
            raise ConfigError(f"publish: {name!r} is not a domain name ({error})") from None
    timeout = section.number("timeout", DEFAULT_TIMEOUT)
    server_text = section.string("server", required=method == "rfc2136")
    server = section.server("server", server_text) if server_text is not None else None
    verify_texts = section.strings("verify_servers")
    if verify_texts is not None:
        verify_servers = [section.server("verify_servers", text) for text in verify_texts]
    elif server is not None:
        verify_servers = [server]
    else:
        raise section.error("verify_servers", f'required with method = "{method}"')
    doh = section.string("doh")
    if doh is not None:
        _check_doh(section, doh)
    verifier = Verifier(names, verify_servers, reactor=reactor, timeout=timeout, doh=doh)
    if method == "command":
        argv = section.strings("command")
        if argv is None:
            raise section.error("command", 'required with method = "command"')
        program = Path(argv[0]).expanduser()
        if "/" in argv[0] and not program.is_absolute():
            # Like every other path in the configuration: relative to it.
            argv[0] = str(base / program)
        if shutil.which(argv[0]) is None:
            raise section.error("command", f"{argv[0]}: program not found")
        return CommandPublisher(argv, names, reactor=reactor, verifier=verifier, timeout=timeout)
    assert server is not None
    zone = section.string("zone")
    if zone is not None:
        section.name("zone", zone)
        apex = _absolute(zone)
        for name in names:
            if not _absolute(name).is_subdomain(apex):
                raise section.error("zone", f"{name} is not in zone {zone}")
    ttl = table.get("ttl", DEFAULT_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 0x7FFFFFFF:
        raise section.error("ttl", "expected a whole number of seconds, 0 to 2147483647")
    tsig_key = _tsig_key(section, base)
    return RFC2136Publisher(
        names,
        server,
        tsig_key,
        reactor=reactor,
        zone=zone,
        ttl=ttl,
        timeout=timeout,
        verifier=verifier,
    )


def _check_doh(section: _Table, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise section.error("doh", f"{url!r} is not an https:// URL")
    if parts.scheme == "http":
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise section.error("doh", "plain http:// is only allowed to a loopback address")


def _tsig_key(section: _Table, base: Path) -> TSIGKey:
    file_text = section.string("tsig_secret_file", required=True)
    assert file_text is not None
    path = Path(file_text).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise section.error("tsig_secret_file", f"cannot read ({_describe(error)})") from None
    try:
        keys = parse_tsig_secret_file(text)
    except ValueError as error:
        raise section.error("tsig_secret_file", f"{path}: {error}") from None
    name = section.string("tsig_key_name")
    if name is not None:
        section.name("tsig_key_name", name)
        wanted = _absolute(name)
        named = [k for k in keys if k[0] is None or _absolute(k[0]) == wanted]
        if not named:
            raise section.error("tsig_key_name", f"{name} is not in {path}")
        keys = named
    if len(keys) != 1:
        raise section.error("tsig_key_name", f"{path} holds several keys: name one")
    (file_name, file_algorithm, secret) = keys[0]
    name = name or file_name
    if name is None:
        raise section.error("tsig_key_name", f"required ({path} does not name the key)")
    algorithm = section.string("tsig_algorithm") or file_algorithm or "hmac-sha256"
    algorithm = algorithm.lower().rstrip(".")
    if algorithm not in TSIG_ALGORITHMS:
        raise section.error(
            "tsig_algorithm", f"{algorithm!r} is not one of {', '.join(TSIG_ALGORITHMS)}"
        )
    if file_algorithm is not None and file_algorithm.rstrip(".") != algorithm:
        raise section.error("tsig_algorithm", f"{path} says the key is {file_algorithm}")
    return TSIGKey(name, secret, algorithm)
