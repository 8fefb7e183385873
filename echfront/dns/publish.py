# -*- test-case-name: tests.test_publish -*-
"""Building a publisher from the ``[publish]`` table.

:func:`publisher_from_config` checks the table (errors name
``publish.KEY``) and builds an :class:`~echfront.dns.rfc2136.RFC2136Publisher`
or a :class:`~echfront.dns.command.CommandPublisher`, each with a
:class:`~echfront.dns.verify.Verifier`.

This module is on its way out: ``[publish]`` parsing moves to
:mod:`echfront.config` with the rest of the configuration, and this module
is then deleted.  The publishers, the verifier and the DoH client live in
:mod:`~echfront.dns.rfc2136`, :mod:`~echfront.dns.command`,
:mod:`~echfront.dns.verify` and :mod:`~echfront.dns.doh`.
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dns.exception

from echfront.dns.command import CommandPublisher
from echfront.dns.rfc2136 import (
    DEFAULT_TTL,
    TSIG_ALGORITHMS,
    RFC2136Publisher,
    TSIGKey,
    parse_tsig_secret_file,
)
from echfront.dns.verify import (
    DEFAULT_TIMEOUT,
    DNSServer,
    Verifier,
    absolute_name,
    describe_error,
)
from echfront.errors import ConfigError
from echfront.interfaces import IPublisher

__all__ = ["PUBLISH_KEYS", "publisher_from_config"]

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
            absolute_name(text)
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
            absolute_name(name)
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
        apex = absolute_name(zone)
        for name in names:
            if not absolute_name(name).is_subdomain(apex):
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
        raise section.error("tsig_secret_file", f"cannot read ({describe_error(error)})") from None
    try:
        keys = parse_tsig_secret_file(text)
    except ValueError as error:
        raise section.error("tsig_secret_file", f"{path}: {error}") from None
    name = section.string("tsig_key_name")
    if name is not None:
        section.name("tsig_key_name", name)
        wanted = absolute_name(name)
        named = [k for k in keys if k[0] is None or absolute_name(k[0]) == wanted]
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
