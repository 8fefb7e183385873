# -*- test-case-name: tests.test_svcb -*-
"""Publishing ECH configs: HTTPS records and the origin-svcb document.

Clients learn an ECHConfigList from the ``ech`` SvcParam (key 5, RFC 9848)
of an HTTPS resource record (RFC 9460).  :func:`https_record` renders one
in zone-file presentation format; :func:`origin_svcb_document` renders the
JSON a zone factory fetches from ``/.well-known/origin-svcb``
(draft-ietf-tls-wkech) to publish the same data.

Why our own rendering and not dnspython's HTTPS rdata ``to_text()``: it
quotes every SvcParam value (``port="8443"``), where zone files and RFC
9460's examples quote only values that need it, and the line printed by
``echfront dns`` is meant to be pasted into a zone file as the operator
reads it.  The configuration schema imports :func:`validate_alpn_id`, so this
module also stays free of dnspython.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

from echfront.errors import ConfigError

__all__ = ["HTTPSRecord", "https_record", "origin_svcb_document", "validate_alpn_id"]

_PRINTABLE = frozenset(range(0x21, 0x7F)) - frozenset(b'",\\;()')


def validate_alpn_id(alpn: str) -> str:
    """Check an ALPN id can be written without escapes, and return it.

    RFC 9460 Appendix A allows escapes, but names that need them (commas,
    quotes, spaces) are never registered ALPN ids; refusing them keeps the
    output readable by every zone-file parser.

    :raises ConfigError: for an empty, over-long or unprintable id.
    """
    raw = alpn.encode("utf-8", "replace")
    if not 1 <= len(raw) <= 255 or not _PRINTABLE.issuperset(raw):
        raise ConfigError(f'ALPN id {alpn!r} must be 1..255 printable characters without ,"\\;()')
    return alpn


@dataclass(frozen=True, slots=True)
class HTTPSRecord:
    """An HTTPS record in ServiceMode (RFC 9460 §2.4.3)."""

    owner: str
    config_list: bytes
    alpn: Sequence[str] = ()
    port: int | None = None
    priority: int = 1
    target: str = "."
    ttl: int = 300

    def presentation(self) -> str:
        """The record as one zone-file line (RFC 9460 §2.1, RFC 9848 §3).

        SvcParams are written in increasing key order (alpn=1, port=3,
        ech=5), as RFC 9460 §2.2 requires on the wire.
        """
        owner = self.owner if self.owner.endswith(".") else self.owner + "."
        target = (
            self.target if self.target == "." or self.target.endswith(".") else self.target + "."
        )
        params = []
        if self.alpn:
            params.append('alpn="' + ",".join(self.alpn) + '"')
        if self.port is not None:
            params.append(f"port={self.port}")
        params.append('ech="' + base64.b64encode(self.config_list).decode("ascii") + '"')
        return f"{owner} {self.ttl} IN HTTPS {self.priority} {target} " + " ".join(params)


def https_record(
    owner: str,
    config_list: bytes,
    *,
    alpn: Sequence[str] = (),
    port: int | None = None,
    priority: int = 1,
    target: str = ".",
    ttl: int = 300,
) -> str:
    """Render an HTTPS record carrying ``config_list``, validating every field.

    :raises ConfigError: for a value that cannot be published.
    """
    for alpn_id in alpn:
        validate_alpn_id(alpn_id)
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is not 1..65535")
    if not 1 <= priority <= 65535:
        raise ConfigError("priority must be 1..65535 (0 is AliasMode, which carries no ech)")
    if not 0 <= ttl <= 2**31 - 1:
        raise ConfigError("ttl must be 0..2147483647")
    return HTTPSRecord(owner, config_list, tuple(alpn), port, priority, target, ttl).presentation()


def origin_svcb_document(
    config_list: bytes,
    *,
    alpn: Sequence[str] = (),
    port: int | None = None,
    regeninterval: int = 3600,
) -> bytes:
    """The ``/.well-known/origin-svcb`` JSON (draft-ietf-tls-wkech §3).

    One endpoint, the origin itself (empty target), with the current
    published ECHConfigList.
    """
    params: dict[str, object] = {"ech": base64.b64encode(config_list).decode("ascii")}
    if alpn:
        params["alpn"] = list(alpn)
    if port is not None:
        params["port"] = port
    document = {
        "regeninterval": regeninterval,
        "endpoints": [{"priority": 1, "target": "", "params": params}],
    }
    return json.dumps(document, indent=2).encode() + b"\n"
