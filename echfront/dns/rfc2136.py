# -*- test-case-name: tests.test_publish -*-
"""Publishing by TSIG-signed dynamic UPDATE (RFC 2136, RFC 8945) to the zone's primary.

:class:`RFC2136Publisher` reads each name's HTTPS RRset (RFC 9460 §9) from
the primary, replaces only the ``ech`` SvcParam (RFC 9848 §3) of every
ServiceMode record (priority, target, other SvcParams and TTL stay), and
sends one UPDATE per zone whose prerequisite is the RRset exactly as read,
so a concurrent edit makes the update fail instead of being overwritten.
:class:`TSIGKey` and :func:`parse_tsig_secret_file` are the key it signs
with and the key files it reads (``kdig -y``, Knot, BIND formats).

dnspython builds, signs and parses the messages and asks the questions.
Our own code sends the UPDATE (:func:`_exchange_tcp`): ``dns.query.tcp``
parses the answer itself and raises before the RCODE can be read when a
server answers a signed UPDATE without a TSIG (as servers do for zones they
do not serve), and that RCODE is what the operator needs to see.

The blocking steps run in the reactor's thread pool; every failure is one
:class:`~echfront.dns.verify.PublishError` line naming the server, zone or
name, and problem.
"""

from __future__ import annotations

import base64
import binascii
import re
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.HTTPS
import dns.rdtypes.svcbbase
import dns.rrset
import dns.tsig
import dns.update
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from echfront.dns.verify import (
    DEFAULT_TIMEOUT,
    DNSServer,
    PublishError,
    Verifier,
    absolute_name,
    check_config_list,
    describe_error,
    name_text,
    query_server,
)
from echfront.interfaces import IPublisher

__all__ = [
    "DEFAULT_TTL",
    "TSIG_ALGORITHMS",
    "RFC2136Publisher",
    "TSIGKey",
    "parse_tsig_secret_file",
]

#: TTL of an HTTPS record the RFC 2136 publisher has to create.
DEFAULT_TTL = 300
#: TSIG algorithms accepted (RFC 8945 §6): the SHA-2 HMACs.  hmac-md5 and
#: hmac-sha1 are refused: RFC 8945 §6 says MUST NOT / NOT RECOMMENDED for use.
TSIG_ALGORITHMS = ("hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512")

_ECH = dns.rdtypes.svcbbase.ParamKey.ECH
_HTTPS = dns.rdatatype.HTTPS
_IN = dns.rdataclass.IN

_T = TypeVar("_T")


# -- the TSIG key -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TSIGKey:
    """A TSIG key (RFC 8945 §4): name, algorithm and shared secret."""

    name: str
    secret: bytes
    algorithm: str = "hmac-sha256"

    def dnspython(self) -> dns.tsig.Key:
        """The key as dnspython signs with it."""
        return dns.tsig.Key(self.name, self.secret, self.algorithm)


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


# -- blocking DNS helpers (run in the reactor's thread pool) ------------------


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
        self.names = tuple(absolute_name(name) for name in names)
        self.server = server
        self.key = key
        self.reactor = reactor
        self.zone = absolute_name(zone) if zone is not None else None
        if self.zone is not None:
            outside = [name_text(n) for n in self.names if not n.is_subdomain(self.zone)]
            if outside:
                raise ValueError(f"{outside[0]} is not in zone {name_text(self.zone)}")
        self.ttl = ttl
        self.timeout = timeout
        self.verifier = verifier or Verifier(names, [server], reactor=reactor, timeout=timeout)

    def __repr__(self) -> str:
        """Where and what this publishes."""
        names = " ".join(name_text(n) for n in self.names)
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
                done.append(name_text(zone))
        except PublishError:
            raise
        except dns.exception.Timeout:
            raise PublishError(f"{self.server}: no answer in {self.timeout:g}s") from None
        except (dns.exception.DNSException, OSError, EOFError, ValueError) as error:
            raise PublishError(f"{self.server}: {describe_error(error)}") from None

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
        answer = query_server(self.server, name, dns.rdatatype.SOA, self.timeout, tcp=True)
        where = f"{self.server}: {name_text(name)}"
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
            where = f"{self.server}: {name_text(name)}"
            answer = query_server(self.server, name, _HTTPS, self.timeout, tcp=True)
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
            f"{self.server}: UPDATE of zone {name_text(zone)}",
        )
