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
"""

from __future__ import annotations

from pathlib import Path

from echfront.errors import ConfigError

__all__ = [
    "DEFAULT_BACKLOG",
    "check_listen",
    "default_backlog",
    "split_endpoint_description",
    "tcp_client_address",
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
    """(host, port) of a plain ``tcp:host=H:port=P`` client endpoint string, else None.

    Strings with other options (``bindAddress``) keep the generic endpoint.
    """
    kind, *rest = split_endpoint_description(description)
    if kind != "tcp":
        return None
    options = dict(item.partition("=")[::2] for item in rest)
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
