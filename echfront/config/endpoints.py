# -*- test-case-name: tests.test_config -*-
"""Twisted endpoint strings, taken apart where echfront needs more than Twisted does.

:func:`split_endpoint_description` and :func:`tcp_client_address` read
endpoint strings (``tcp:host=H:port=P``) for the direct TCP path to a
backend and for the ``--workers`` listeners.  ``host:port`` text (DNS
servers, ``echfront check`` addresses) has one parser too, below every
user of it: :func:`echfront.dns.verify.split_host_port`.

Listening endpoints get two checks of their own: :func:`check_listen`
refuses ``haproxy:`` (``[proxy] listen`` is echfront's own PROXY protocol
support) and :func:`with_backlog` gives ``tcp:``, ``tcp6:`` and ``unix:``
endpoints that do not set ``backlog=`` a queue fit for a front
(:func:`default_backlog`) instead of Twisted's 50.

QUIC has no Twisted endpoint strings: :func:`udp_listen_address` reads
``listen_quic`` entries (``udp:PORT[:interface=ADDR]``, the shape of a
``tcp:`` server endpoint), :func:`quic_address` a ``quic_endpoint``
(``IP:PORT``), and :func:`stream_host_port` the host and port of a
backend's ``tcp:``/``tcp6:`` endpoint, which ``quic_endpoint`` defaults to.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from echfront.dns.verify import split_host_port
from echfront.errors import ConfigError

__all__ = [
    "DEFAULT_BACKLOG",
    "check_listen",
    "default_backlog",
    "quic_address",
    "split_endpoint_description",
    "stream_host_port",
    "tcp_client_address",
    "udp_listen_address",
    "with_backlog",
]


def split_endpoint_description(description: str) -> list[str]:
    r"""Split a Twisted endpoint string on unescaped colons, unescaping ``\:``."""
    parts: list[str] = []
    current = ""
    escaped = False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def tcp_client_address(description: str) -> tuple[str, int] | None:
    """(host, port) of a plain ``tcp:`` client endpoint string, else None.

    Both of Twisted's spellings count: ``tcp:host=H:port=P`` and the
    positional ``tcp:H:P``.  Strings with other options (``bindAddress``)
    keep the generic endpoint.
    """
    kind, *rest = split_endpoint_description(description)
    if kind != "tcp":
        return None
    positional = [item for item in rest if "=" not in item]
    options = dict(item.partition("=")[::2] for item in rest if "=" in item)
    if len(positional) > 2:
        return None
    for name, value in zip(("host", "port"), positional, strict=False):
        if name in options:
            return None  # given twice: let Twisted's parser say so
        options[name] = value
    options.pop("timeout", None)  # the backend's connect_timeout applies
    host, port = options.pop("host", ""), options.pop("port", "")
    if options or not host or not port.isdigit():
        return None
    return host, int(port)


#: The listen backlog echfront asks for when an endpoint string sets none.
DEFAULT_BACKLOG = 4096
#: Where Linux says how far it caps any listen(2) backlog.
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
#: Endpoint kinds whose Twisted parser takes ``backlog=``.
_BACKLOG_KINDS = frozenset({"tcp", "tcp6", "unix"})


def default_backlog(somaxconn: Path = SOMAXCONN) -> int:
    """:data:`DEFAULT_BACKLOG`, capped by the kernel's ``net.core.somaxconn``.

    Linux caps every listen(2) backlog at ``net.core.somaxconn`` without a
    word; asking for the capped value keeps what echfront says it uses true.
    Twisted's own default, 50, drops the SYNs of a burst of connects and
    makes good clients wait 1 to 3 s for their retransmission.
    """
    try:
        limit = int(somaxconn.read_text().strip())
    except (OSError, ValueError):
        return DEFAULT_BACKLOG
    return max(1, min(DEFAULT_BACKLOG, limit))


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``:backlog=N`` added when its kind takes one and it sets none.

    ``tcp:``, ``tcp6:`` and ``unix:`` server endpoints only: a ``systemd:``
    socket is listening already (its unit's ``Backlog=`` sized it).
    """
    kind, *rest = split_endpoint_description(description)
    if kind not in _BACKLOG_KINDS or any(item.startswith("backlog=") for item in rest):
        return description
    return f"{description}:backlog={backlog}"


def check_listen(description: str, where: str) -> None:
    """Refuse a listen string echfront cannot serve: Twisted's ``haproxy:`` wrapper.

    That wrapper gives limits, logs and metrics the balancer's address only
    where it is asked for, leaves refused sockets open and turns a client's
    FIN into a full close; ``[proxy] listen`` reads PROXY headers properly.

    :raises ConfigError: one line pointing at ``[proxy]``.
    """
    kind = split_endpoint_description(description)[0].strip().lower()
    if kind == "haproxy":
        raise ConfigError(
            f"{where}: {description!r}: haproxy: endpoints are not supported; put the "
            "endpoint in [proxy] listen and the balancers' networks in [proxy] from"
        )


def _options(rest: list[str], positional: tuple[str, ...]) -> dict[str, str]:
    """``key=value`` items and leading positional ones (named by ``positional``)."""
    options: dict[str, str] = {}
    for index, item in enumerate(rest):
        key, sep, value = item.partition("=")
        if sep:
            options[key] = value
        elif index < len(positional):
            options[positional[index]] = item
        else:
            raise ValueError(f"unexpected {item!r}")
    return options


def udp_listen_address(description: str) -> tuple[int, str]:
    """(port, interface) of ``udp:PORT[:interface=ADDR]`` (or ``udp:port=PORT``).

    The interface is an IP address; "" (the default) is every IPv4 address,
    ``::`` every IPv6 one (and IPv4 too where the system maps it).

    :raises ValueError: one line saying what is wrong.
    """
    kind, *rest = split_endpoint_description(description)
    if kind != "udp":
        raise ValueError(f"{description!r} is not udp:PORT[:interface=ADDRESS]")
    options = _options(rest, ("port",))
    port = options.pop("port", "")
    interface = options.pop("interface", "")
    if options:
        raise ValueError(f"{description!r}: unknown option {sorted(options)[0]!r}")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{description!r}: port must be 1..65535")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ValueError(f"{description!r}: interface must be an IP address") from None
    return int(port), interface


def quic_address(text: str) -> tuple[str, int]:
    """(IP, port) of a ``quic_endpoint``: ``IP:PORT`` or ``[IPv6]:PORT``.

    The host must be an IP address: a flow's backend socket is connected
    when the flow starts, and a name would need a lookup there.

    :raises ValueError: one line quoting the text.
    """
    host, port = split_host_port(text, default_port=None)
    if port is None:
        raise ValueError(f"{text!r} has no port (IP:PORT)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: the host must be an IP address") from None
    return host, port


def stream_host_port(description: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp:``/``tcp6:`` client endpoint string, other options allowed.

    None for any other kind of endpoint, or one this cannot read.
    """
    kind, *rest = split_endpoint_description(description)
    if kind not in ("tcp", "tcp6"):
        return None
    try:
        options = _options(rest, ("host", "port"))
    except ValueError:
        return None
    host, port = options.get("host", ""), options.get("port", "")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return None
    return host, int(port)
