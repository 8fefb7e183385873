# -*- test-case-name: tests.test_grease -*-
"""GREASE for ECH configurations (RFC 9849 §6.2.2, §11.3; checklist CFG-9).

RFC 9849 §11.3 reserves sixteen ECHConfig extension types that will never
be registered: 0x0000 and 0x1A1A, 0x2A2A, ... 0xFAFA.  Servers use them to
keep clients honest about §4.2, which says a client ignores an extension it
does not know, unless the type's high bit marks it mandatory, in which case
it skips the whole config:

* every config echfront generates carries one reserved type with the high
  bit clear (0x0000 ... 0x7A7A), picked at random per config, so clients
  meet unknown optional extensions in every list (:func:`grease_extension`);
* every list echfront publishes starts with a *decoy*: a config carrying a
  reserved type with the high bit set (0x8A8A ... 0xFAFA), which a correct
  client skips (:func:`decoy_config`).  It is built to fail if a client
  uses it anyway (§6.2.2): its config_id is none of the real ones, so the
  front finds no key and takes the rejection path, and its public key is a
  hash output whose private key nobody has.

A decoy is derived from the real configs it goes with, not drawn at random:
the same key set then gives the same bytes on every publication path (DNS,
``echfront dns``, ``/.well-known/origin-svcb``) and in every worker, so a
republication or a DNS check never sees a change that is not a key change.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence

from echfront.ech.echconfig import (
    GREASE_EXTENSION_TYPES,
    KEM_X25519_HKDF_SHA256,
    ECHConfig,
    ECHConfigExtension,
)

__all__ = [
    "GREASE_MANDATORY_TYPES",
    "GREASE_OPTIONAL_TYPES",
    "GREASE_TYPES",
    "decoy_config",
    "grease_extension",
    "is_decoy",
]

#: RFC 9849 §11.3: the reserved types with the high bit clear (clients ignore them):
#: 0x0000, 0x1A1A ... 0x7A7A.
GREASE_OPTIONAL_TYPES = tuple(t for t in GREASE_EXTENSION_TYPES if not t & 0x8000)
#: RFC 9849 §11.3: the reserved types with the high bit set (clients skip the config):
#: 0x8A8A ... 0xFAFA.
GREASE_MANDATORY_TYPES = tuple(t for t in GREASE_EXTENSION_TYPES if t & 0x8000)
#: Every reserved ECHConfig extension type.
GREASE_TYPES = frozenset(GREASE_EXTENSION_TYPES)

#: GREASE extension data is 0 to this many bytes: enough to exercise a
#: client's length handling, small beside a config (~70 bytes for X25519).
_MAX_DATA = 8
_DECOY_LABEL = b"echfront ECH GREASE decoy\x00"


def grease_extension(
    *, mandatory: bool = False, randbelow: Callable[[int], int] = secrets.randbelow
) -> ECHConfigExtension:
    """A reserved extension of a random type and 0 to 8 random bytes (RFC 9849 §6.2.2).

    :param mandatory: pick among the high-bit types, which make a client
        skip the config (only for decoys); else among the optional ones.
    :param randbelow: the source of randomness (tests pass a seeded one).
    """
    types = GREASE_MANDATORY_TYPES if mandatory else GREASE_OPTIONAL_TYPES
    data = bytes(randbelow(256) for _ in range(randbelow(_MAX_DATA + 1)))
    return ECHConfigExtension(types[randbelow(len(types))], data)


def is_decoy(config: ECHConfig) -> bool:
    """Whether ``config`` carries a reserved mandatory type: a decoy no client should use."""
    return any(ext.type in GREASE_MANDATORY_TYPES for ext in config.extensions)


def decoy_config(configs: Sequence[ECHConfig]) -> ECHConfig | None:
    """The decoy published ahead of ``configs`` (RFC 9849 §6.2.2), or None.

    Everything is derived from a hash of ``configs`` (see the module
    docstring): a config_id none of them uses, a mandatory reserved type
    with 0 to 8 bytes of data, and an X25519 public key that is a hash
    output.  The public name, name length and cipher suites are the first
    config's, so the decoy looks like the real ones.

    :param configs: the real configs, in published order.
    :returns: None when there is none, or when all 256 config_ids are taken.
    """
    if not configs:
        return None
    seed = hashlib.sha256(_DECOY_LABEL + b"".join(c.encode() for c in configs)).digest()

    def derive(label: bytes) -> bytes:
        return hashlib.sha256(seed + label).digest()

    taken = {c.config_id for c in configs}
    free = [i for i in range(256) if i not in taken]
    if not free:
        return None
    picks = derive(b"id type data")
    data_bytes = derive(b"data")
    first = configs[0]
    return ECHConfig(
        config_id=free[int.from_bytes(picks[:4], "big") % len(free)],
        kem_id=KEM_X25519_HKDF_SHA256,
        public_key=derive(b"public key"),
        cipher_suites=first.cipher_suites,
        maximum_name_length=first.maximum_name_length,
        public_name=first.public_name,
        extensions=(
            ECHConfigExtension(
                GREASE_MANDATORY_TYPES[picks[4] % len(GREASE_MANDATORY_TYPES)],
                data_bytes[: picks[5] % (_MAX_DATA + 1)],
            ),
        ),
    )
