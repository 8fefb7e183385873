# -*- test-case-name: tests.test_keys -*-
"""ECH keys: generation, roles, and the key set the decoder uses (RFC 9849 §4, §7.1).

Each key has a role: *published* keys are what clients should use now: they
go into DNS (``echfront dns``), ``/.well-known/origin-svcb``, and the
``retry_configs`` list (RFC 9849 §7.1) that an ECH-capable public-name
terminator sends; *decrypt-only* keys are older keys kept so that clients
holding a cached config still succeed (§4.1, checklist CFG-5).  echfront
itself cannot send ``retry_configs`` when it terminates the public name
(pyOpenSSL has no ECH API; see docs/security.rst).

Two KEMs are supported: DHKEM(X25519, HKDF-SHA256) and the post-quantum
hybrid MLKEM768-X25519 (X-Wing, draft-ietf-hpke-pq).

GREASE (RFC 9849 §6.2.2, :mod:`echfront.ech.grease`): generated configs
carry a reserved optional extension, and :func:`publication_list` puts a
decoy config ahead of the real ones in every list echfront publishes.

Bytes and objects only: keys are stored in RFC 9934 PEM files by
:mod:`echfront.keys.keyfile`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from echfront.ech.echconfig import (
    KEM_X25519_HKDF_SHA256,
    POST_QUANTUM_KEMS,
    ECHConfig,
    ECHConfigExtension,
    SymmetricSuite,
    encode_config_list,
    validate_public_name,
)
from echfront.ech.grease import GREASE_TYPES, decoy_config, grease_extension, is_decoy
from echfront.ech.hpke import (
    DEFAULT_SUITES,
    SUPPORTED_AEADS,
    SUPPORTED_KDFS,
    SUPPORTED_KEMS,
    RecipientKey,
)
from echfront.errors import ConfigError

__all__ = [
    "ECH_INFO_PREFIX",
    "ECHKey",
    "KeySet",
    "generate_key",
    "preference_order",
    "publication_list",
]

#: RFC 9849 §6.1 / §7.1: HPKE info is "tls ech" || 0x00 || ECHConfig.
ECH_INFO_PREFIX = b"tls ech\x00"


@dataclass(frozen=True, slots=True)
class ECHKey:
    """One ECHConfig, with its private key when this front can decrypt it.

    :ivar config: the ECHConfig clients encrypt to.
    :ivar recipient: the HPKE private key; None for a config that is only
        published (its key lives on another server).
    :ivar published: advertised (DNS, origin-svcb, the retry list); False
        for decrypt-only keys kept for clients with cached configs.
    :ivar source: where it came from (a file path), for messages.
    :ivar info: the HPKE ``info`` for this config, precomputed.
    """

    config: ECHConfig
    recipient: RecipientKey | None
    published: bool = True
    source: str = ""
    info: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check the key matches the config and precompute ``info``."""
        if self.recipient is not None and (
            self.recipient.public_key != self.config.public_key
            or self.recipient.kem_id != self.config.kem_id
        ):
            raise ConfigError(f"{self.source or 'key'}: private key does not match its ECHConfig")
        object.__setattr__(self, "info", ECH_INFO_PREFIX + self.config.encode())

    @property
    def config_id(self) -> int:
        """The config_id of :attr:`config`."""
        return self.config.config_id

    def with_role(self, *, published: bool) -> ECHKey:
        """Return a copy with another role."""
        return ECHKey(self.config, self.recipient, published, self.source)


def generate_key(
    public_name: str,
    *,
    config_id: int | None = None,
    maximum_name_length: int = 0,
    suites: Sequence[SymmetricSuite] = DEFAULT_SUITES,
    taken_ids: Iterable[int] = (),
    extensions: Sequence[ECHConfigExtension] = (),
    kem_id: int = KEM_X25519_HKDF_SHA256,
    grease: bool = True,
) -> ECHKey:
    """Generate an ECH key and its ECHConfig (RFC 9849 §4).

    :param kem_id: DHKEM(X25519, HKDF-SHA256) (0x0020, the default, which
        every ECH client supports) or MLKEM768-X25519 (0x647a,
        post-quantum; draft-ietf-hpke-pq).
    :param config_id: a fixed id, or None to pick a random id not in
        ``taken_ids`` (RFC 9849 §4.1 recommends random ids, distinct among
        the keys a server holds; checklist CFG-6).
    :param maximum_name_length: longest inner name clients should pad to;
        0 when unknown (§4, CFG-4).
    :param grease: add a reserved extension type with the high bit clear,
        of a random type, after ``extensions`` (§6.2.2, CFG-9), unless
        ``extensions`` already holds a reserved type.
    :raises ConfigError: for a bad public name, an exhausted id space, or
        an unsupported KEM or suite.
    """
    if kem_id not in SUPPORTED_KEMS:
        raise ConfigError(f"unsupported KEM 0x{kem_id:04x}")
    name = validate_public_name(public_name)
    taken = set(taken_ids)
    if config_id is None:
        free = [i for i in range(256) if i not in taken]
        if not free:
            raise ConfigError("all 256 config_id values are in use")
        config_id = free[secrets.randbelow(len(free))]
    elif not 0 <= config_id <= 255:
        raise ConfigError("config_id must be 0..255")
    elif config_id in taken:
        raise ConfigError(f"config_id {config_id} is already in use")
    if not 0 <= maximum_name_length <= 255:
        raise ConfigError("maximum_name_length must be 0..255")
    if not suites:
        raise ConfigError("at least one cipher suite is required")
    for suite in suites:
        if suite.kdf_id not in SUPPORTED_KDFS or suite.aead_id not in SUPPORTED_AEADS:
            raise ConfigError(f"unsupported cipher suite {suite}")
    try:
        recipient = RecipientKey.generate(kem_id)
    except ValueError as error:  # a cryptography build without ML-KEM
        raise ConfigError(str(error)) from None
    if grease and not any(ext.type in GREASE_TYPES for ext in extensions):
        extensions = (*extensions, grease_extension())
    config = ECHConfig(
        config_id=config_id,
        kem_id=recipient.kem_id,
        public_key=recipient.public_key,
        cipher_suites=tuple(suites),
        maximum_name_length=maximum_name_length,
        public_name=name,
        extensions=tuple(extensions),
    )
    return ECHKey(config, recipient)


def preference_order(configs: Iterable[ECHConfig]) -> list[ECHConfig]:
    """Post-quantum configs first, each group in the order given.

    An ECHConfigList lists configs "in decreasing order of preference"
    (RFC 9849 §4), and clients take the first one they support (Go's
    ``pickECHConfig``, BoringSSL's ``ssl_select_ech_config``).  A front that
    holds a post-quantum key always prefers it: clients without
    MLKEM768-X25519 skip it and use the X25519 config after it, while a
    client that supports both but sees X25519 first would never use the
    post-quantum one.  So the order is enforced here rather than left to
    the order of key files in a configuration.
    """
    return sorted(configs, key=_classical)


def _classical(config: ECHConfig) -> bool:
    """Sort key of :func:`preference_order`: False (first) for post-quantum KEMs."""
    return config.kem_id not in POST_QUANTUM_KEMS


def publication_list(configs: Iterable[ECHConfig], *, grease: bool = True) -> bytes:
    """The ECHConfigList to publish for ``configs`` (DNS, origin-svcb; RFC 9849 §4, §6.2.2).

    The configs in :func:`preference_order`, each once, led by a GREASE
    decoy (:func:`echfront.ech.grease.decoy_config`) unless ``grease`` is
    False.  The decoy comes first so that a client which ignores the
    mandatory bit uses it and fails at once, where it would otherwise never
    reach it; a correct client skips it and uses the next config.  Decoys
    already among ``configs`` (a list read back from DNS) are dropped and
    derived anew, so the result depends only on the real configs.

    :raises ValueError: when ``configs`` holds no real config.
    """
    real: list[ECHConfig] = []
    for config in preference_order(configs):
        if not is_decoy(config) and config not in real:
            real.append(config)
    decoy = decoy_config(real) if grease else None
    return encode_config_list([decoy, *real] if decoy is not None else real)


class KeySet:
    """The ECH keys one front holds, indexed for the decoder (RFC 9849 §7.1).

    Candidates are chosen by config_id (checklist DEC-1); several keys may
    share an id (the RFC only says SHOULD be distinct), and all of them are
    tried.  The set is immutable: a reload builds a new one, and connections
    in progress keep the set they started with.
    """

    __slots__ = (
        "_by_id",
        "_decrypting",
        "_publication_list",
        "_published",
        "_retry_config_list",
        "keys",
    )

    def __init__(self, keys: Iterable[ECHKey] = (), *, grease: bool = True) -> None:
        """Index ``keys``; retry-only configs (no private key) are never candidates.

        :param grease: lead :attr:`publication_list` with a GREASE decoy
            (RFC 9849 §6.2.2; ``[ech] grease``).
        """
        self.keys: tuple[ECHKey, ...] = tuple(keys)
        by_id: dict[int, list[ECHKey]] = {}
        for key in self.keys:
            if key.recipient is not None:
                by_id.setdefault(key.config_id, []).append(key)
        self._by_id = {cid: tuple(found) for cid, found in by_id.items()}
        self._decrypting = tuple(k for k in self.keys if k.recipient is not None)
        self._published = tuple(
            sorted((k for k in self.keys if k.published), key=lambda k: _classical(k.config))
        )
        published = [k.config for k in self._published]
        self._retry_config_list = encode_config_list(published) if published else None
        self._publication_list = publication_list(published, grease=grease) if published else None

    def __len__(self) -> int:
        """Number of configs held."""
        return len(self.keys)

    def __bool__(self) -> bool:
        """Whether any config is held."""
        return bool(self.keys)

    def candidates(self, config_id: int) -> tuple[ECHKey, ...]:
        """Keys whose config_id matches (checklist DEC-1)."""
        return self._by_id.get(config_id, ())

    @property
    def decrypting(self) -> tuple[ECHKey, ...]:
        """Every key with a private key (trial decryption, DEC-2)."""
        return self._decrypting

    @property
    def published(self) -> tuple[ECHKey, ...]:
        """Keys whose configs are advertised (DNS, origin-svcb, the retry list).

        In :func:`preference_order`: post-quantum configs first.
        """
        return self._published

    @property
    def retry_config_list(self) -> bytes | None:
        """The ECHConfigList of :attr:`published` configs, or None if there are none.

        One list, post-quantum configs first, so every client finds the best
        config it supports; :attr:`publication_list` adds the GREASE decoy.
        """
        return self._retry_config_list

    @property
    def publication_list(self) -> bytes | None:
        """What ``/.well-known/origin-svcb`` serves: :attr:`published` as :func:`publication_list`.

        The same bytes as DNS carries for this key set: a GREASE decoy (unless
        turned off), then :attr:`retry_config_list`'s configs.  None when no
        config is published.
        """
        return self._publication_list

    @property
    def config_ids(self) -> frozenset[int]:
        """config_ids in use."""
        return frozenset(k.config_id for k in self.keys)
