# -*- test-case-name: tests.test_config -*-
"""Twisted endpoint strings, taken apart where echfront needs more than Twisted does.

:func:`split_endpoint_description` and :func:`tcp_client_address` read
endpoint strings (``tcp:host=H:port=P``) for the direct TCP path to a
backend and for the ``--workers`` listeners.  ``host:port`` text (DNS
servers, ``echfront check`` addresses) has one parser too, below every
user of it: :func:`echfront.dns.verify.split_host_port`.
"""

from __future__ import annotations

__all__ = ["split_endpoint_description", "tcp_client_address"]


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
