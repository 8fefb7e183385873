# -*- test-case-name: tests.test_padding -*-
"""The ``maximum_name_length`` a front's keys should carry, from its routed names.

RFC 9849 §4 defines ``maximum_name_length`` as "the longest name of a
backend server, if known", and §6.1.3 tells clients how to use it: with a
server_name of length D in the ClientHelloInner, pad by ``max(0, L - D)``
(``L + 9`` without a server_name), then pad the whole
EncodedClientHelloInner so its length "rounds ... up to a multiple of 32
bytes, reducing the set of possible lengths across all clients".  §10.11:
"Variations in the length of the ClientHelloInner ciphertext could leak
information about the corresponding plaintext."  A config that says 0
leaves clients with only the final 32-byte rounding, so a long private
name and a short one can differ by a whole 32-byte block on the wire.

:func:`derive_maximum_name_length` turns the names a front routes into
that value; :func:`name_length` counts one name or wildcard pattern.  Both
are pure: the configuration reader (:mod:`echfront.config.schema`), the
command line and the demo feed them names.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "NAME_LENGTH_STEP",
    "WILDCARD_LABEL_LENGTH",
    "derive_maximum_name_length",
    "longest_name",
    "name_length",
]

#: The length a ``*`` label of a wildcard route is counted at.  Names under
#: a wildcard are not known in advance; hand-chosen labels are short (``www``,
#: ``api``, a customer name), while the longest labels seen in practice are
#: machine-made: a 128-bit identifier in hex (32 characters: an MD5 digest,
#: a UUID without its dashes) names per-tenant and per-preview hosts.
#: Counting the label at 32 covers those without padding every hello to the
#: DNS maximum of 63.  A longer name still gets the §6.1.3 rounding to 32.
WILDCARD_LABEL_LENGTH = 32

#: The derived value is rounded up to a multiple of this.  RFC 9849 §6.1.3
#: accepts 32-byte buckets as the granularity of the whole inner hello, so
#: finer steps here would hide nothing more on the wire, while this one (a)
#: keeps the published value, which anyone can read from DNS, from telling
#: the exact length of the longest private name, and (b) leaves room for
#: names added before the next key rotation: a name up to the next multiple
#: still pads to the same length.  The cost: the rounded-up inner hello is
#: at most one 32-byte block longer.
NAME_LENGTH_STEP = 32

#: ``maximum_name_length`` is a uint8 (RFC 9849 §4).
_MAXIMUM = 255


def name_length(pattern: str) -> int:
    """The server_name length, in octets, that a routed name or pattern stands for.

    A host name (ASCII, as routes are) counts as written, without a
    trailing dot (the form of the server_name extension, RFC 6066 §3).  A ``*.`` wildcard counts its
    ``*`` label as :data:`WILDCARD_LABEL_LENGTH` octets.
    """
    name = pattern.strip().rstrip(".")
    if name.startswith("*."):
        return WILDCARD_LABEL_LENGTH + len(name) - 1
    return len(name)


def longest_name(names: Iterable[str]) -> tuple[int, int] | None:
    """``(index, length)`` of the longest of ``names`` (the first one on ties); None if none."""
    best: tuple[int, int] | None = None
    for index, name in enumerate(names):
        length = name_length(name)
        if best is None or length > best[1]:
            best = (index, length)
    return best


def derive_maximum_name_length(names: Iterable[str]) -> int:
    """The ``maximum_name_length`` for keys whose front routes ``names`` (RFC 9849 §6.1.3).

    The longest name (wildcards counted as :func:`name_length` says),
    rounded up to a multiple of :data:`NAME_LENGTH_STEP`, at most 255.  With
    no names the length is unknown and the result is 0, which §4 allows.
    """
    longest = longest_name(names)
    if longest is None:
        return 0
    step = NAME_LENGTH_STEP
    return min(_MAXIMUM, -(-longest[1] // step) * step)
