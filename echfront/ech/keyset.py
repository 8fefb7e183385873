# -*- test-case-name: tests.test_keys -*-
"""ECH keys: generation, RFC 9934 PEM files, and the key set the decoder uses.

An RFC 9934 file holds zero or one PKCS#8 ``PRIVATE KEY`` block followed by
one ``ECHCONFIG`` block, whose base64 content is an ECHConfigList with its
2-byte length (the same string as a DNS ``ech=`` value).  The same files are
read by OpenSSL's ``openssl ech`` tooling and by nginx, haproxy and lighttpd
ECH builds, and by Go's ``tls.Config.EncryptedClientHelloKeys`` after
parsing, so keys move freely between echfront and those servers.

Each loaded key has a role: *published* keys are what clients should use
now: they go into DNS (``echfront dns``), ``/.well-known/origin-svcb``, and
the ``retry_configs`` list (RFC 9849 §7.1) that an ECH-capable public-name
terminator sends; *decrypt-only* keys are older keys kept so that clients
holding a cached config still succeed (§4.1, checklist CFG-5).  echfront
itself cannot send ``retry_configs`` when it terminates the public name
(pyOpenSSL has no ECH API; see docs/security.rst).

Two KEMs are supported: DHKEM(X25519, HKDF-SHA256) and the post-quantum
hybrid MLKEM768-X25519 (X-Wing, draft-ietf-hpke-pq).  An X-Wing private key
is stored as PKCS#8 (RFC 5958 OneAsymmetricKey, version 0) with the
algorithm id-XWing, OID 1.3.6.1.4.1.62253.25722 with absent parameters,
and the 32-byte seed as the privateKey OCTET STRING, exactly as
draft-connolly-cfrg-xwing-kem §5.8.2 and its Appendix D specify.  Neither
OpenSSL 4.0 nor Go's crypto/x509 parses that OID, so this module reads and
writes it itself; the encoding is fixed-length, so it is one 22-byte DER
prefix and the seed.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from echfront.ech.echconfig import (
    KEM_MLKEM768_X25519,
    KEM_X25519_HKDF_SHA256,
    POST_QUANTUM_KEMS,
    ECHConfig,
    ECHConfigExtension,
    SymmetricSuite,
    decode_config_list,
    encode_config_list,
    validate_public_name,
)
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
    "dump_pem",
    "generate_key",
    "load_pem",
    "preference_order",
    "read_key_file",
    "write_key_file",
]

#: RFC 9849 §6.1 / §7.1: HPKE info is "tls ech" || 0x00 || ECHConfig.
ECH_INFO_PREFIX = b"tls ech\x00"

#: DER of an X-Wing OneAsymmetricKey up to the seed: SEQUENCE (52 bytes) {
#: INTEGER 0, SEQUENCE { OID 1.3.6.1.4.1.62253.25722 }, OCTET STRING (32 bytes)
#: } (draft-connolly-cfrg-xwing-kem §5.8.2, Appendix D).  DER is canonical and
#: the draft forbids parameters and the publicKey field, so a valid key is
#: exactly this prefix and 32 bytes.
_XWING_PKCS8_PREFIX = bytes.fromhex("3034020100300d060b2b0601040183e62d81c87a0420")

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END ([A-Z0-9 ]+)-----", re.DOTALL
)


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


def _pem(label: str, der: bytes) -> bytes:
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return (f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n").encode()


def dump_pem(keys: Sequence[ECHKey]) -> bytes:
    """Write keys sharing one private key as an RFC 9934 file.

    The ECHCONFIG block lists every config given; a private key, when the
    keys have one, comes first.

    :raises ValueError: if the keys do not share one private key.
    """
    if not keys:
        raise ValueError("no keys to write")
    recipient = keys[0].recipient
    if any(k.recipient is not recipient for k in keys):
        raise ValueError("an RFC 9934 file holds at most one private key")
    out = b""
    if recipient is not None:
        out += _private_pem(recipient)
    return out + _pem("ECHCONFIG", encode_config_list(k.config for k in keys))


def _private_pem(recipient: RecipientKey) -> bytes:
    """The PKCS#8 PRIVATE KEY block of a key (see the module docstring)."""
    if recipient.kem_id == KEM_MLKEM768_X25519:
        return _pem("PRIVATE KEY", _XWING_PKCS8_PREFIX + recipient.private_bytes)
    private = X25519PrivateKey.from_private_bytes(recipient.private_bytes)
    return private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def load_pem(data: bytes, *, source: str = "", published: bool = True) -> list[ECHKey]:
    """Read an RFC 9934 file's contents.

    With a private key, every ECHConfig in the list must match it (the RFC
    requires at least one match; a config that does not match would be
    published without anyone able to decrypt it, so it is refused).  Without
    a private key the configs are retry-only.  Text after the ECHCONFIG
    block is ignored, as the RFC says.

    :raises ConfigError: one line naming the file and the problem.
    """
    where = source or "key file"
    blocks = [(m.group(1), m.group(2), m.group(3)) for m in _PEM_BLOCK.finditer(data)]
    if not blocks:
        raise ConfigError(f"{where}: no PEM blocks (expected PRIVATE KEY and ECHCONFIG)")
    private: RecipientKey | None = None
    config_list: bytes | None = None
    for begin, body, end in blocks:
        if begin != end:
            raise ConfigError(
                f"{where}: PEM block BEGIN {begin.decode()} ends with END {end.decode()}"
            )
        label = begin.decode()
        if label == "ECHCONFIG":
            config_list = _b64(body, where)
            break  # RFC 9934 §3: anything after the ECHCONFIG block is ignored
        if label == "PRIVATE KEY" and private is None:
            private = _load_private(begin, body, where)
        elif label == "ENCRYPTED PRIVATE KEY":
            raise ConfigError(f"{where}: encrypted private keys are not supported")
        else:
            raise ConfigError(f"{where}: unexpected PEM block {label}")
    if config_list is None:
        raise ConfigError(f"{where}: no ECHCONFIG block")
    try:
        decoded = decode_config_list(config_list)
    except ConfigError as error:
        raise ConfigError(f"{where}: bad ECHConfigList: {error}") from None
    if not decoded.configs:
        raise ConfigError(f"{where}: ECHConfigList holds no version 0xfe0d config")
    keys = []
    for config in decoded.configs:
        if any(suite.aead_id not in SUPPORTED_AEADS for suite in config.cipher_suites):
            # Export-only (0xFFFF) or unknown AEADs can never open a
            # ClientHello; publishing them would only break clients (CFG-8).
            raise ConfigError(
                f"{where}: config_id {config.config_id} lists an AEAD this front cannot use"
            )
        if config.has_unknown_mandatory_extension:
            raise ConfigError(
                f"{where}: config_id {config.config_id} has an unknown mandatory extension"
            )
        if private is not None and config.public_key != private.public_key:
            raise ConfigError(
                f"{where}: config_id {config.config_id} does not match the private key"
            )
        keys.append(ECHKey(config, private, published, where))
    return keys


def _b64(body: bytes, where: str) -> bytes:
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except ValueError:
        raise ConfigError(f"{where}: PEM block is not valid base64") from None


def _load_private(begin: bytes, body: bytes, where: str) -> RecipientKey:
    der = _b64(body, where)
    if der.startswith(_XWING_PKCS8_PREFIX):
        # The prefix's SEQUENCE length already fixes the total at 54 bytes.
        if len(der) != len(_XWING_PKCS8_PREFIX) + 32:
            raise ConfigError(f"{where}: malformed MLKEM768-X25519 (X-Wing) private key")
        try:
            return RecipientKey(KEM_MLKEM768_X25519, der[len(_XWING_PKCS8_PREFIX) :])
        except ValueError as error:  # a cryptography build without ML-KEM
            raise ConfigError(f"{where}: {error}") from None
    pem = b"-----BEGIN " + begin + b"-----\n" + body + b"\n-----END " + begin + b"-----\n"
    try:
        key = load_pem_private_key(pem, password=None)
    except Exception as error:  # ValueError, TypeError, UnsupportedAlgorithm, InternalError
        # Library messages can span lines (OpenSSL error stacks); keep one.
        detail = " ".join(str(error).split())[:160]
        raise ConfigError(f"{where}: unreadable private key ({detail})") from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(
            f"{where}: private key is neither X25519 nor X-Wing "
            "(DHKEM(X25519, HKDF-SHA256) or MLKEM768-X25519)"
        )
    return RecipientKey(KEM_X25519_HKDF_SHA256, key.private_bytes_raw())


def read_key_file(path: str | os.PathLike[str], *, published: bool = True) -> list[ECHKey]:
    """Load an RFC 9934 file from disk.

    :raises ConfigError: if it cannot be read or parsed.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{os.fspath(path)}: cannot read key file ({error.strerror})") from None
    return load_pem(data, source=os.fspath(path), published=published)


def write_key_file(
    path: str | os.PathLike[str], keys: Sequence[ECHKey], *, overwrite: bool = False
) -> None:
    """Write keys to ``path`` atomically, readable by the owner only.

    The file is written under a temporary name in the same directory with
    mode 0600 and renamed into place, so a reader never sees half a key and
    the private key is never world-readable, even briefly.

    :raises ConfigError: if the file exists (without ``overwrite``) or
        cannot be written.
    """
    target = Path(path)
    data = dump_pem(keys)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(prefix=".echkey-", dir=directory)
    except OSError as error:
        raise ConfigError(f"{target}: cannot write key file ({error.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:  # mkstemp creates the file with mode 0600
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temp, target)
        else:
            # link() fails if the target exists, so a key created meanwhile
            # by someone else is never replaced (no check-then-act race).
            os.link(temp, target)
            os.unlink(temp)
        _fsync_directory(directory)
    except FileExistsError:
        Path(temp).unlink(missing_ok=True)
        raise ConfigError(f"{target}: already exists (refusing to overwrite a key)") from None
    except OSError as error:
        Path(temp).unlink(missing_ok=True)
        raise ConfigError(f"{target}: cannot write key file ({error.strerror})") from None


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data is already synced
    finally:
        os.close(fd)


class KeySet:
    """The ECH keys one front holds, indexed for the decoder (RFC 9849 §7.1).

    Candidates are chosen by config_id (checklist DEC-1); several keys may
    share an id (the RFC only says SHOULD be distinct), and all of them are
    tried.  The set is immutable: a reload builds a new one, and connections
    in progress keep the set they started with.
    """

    __slots__ = ("_by_id", "_decrypting", "_published", "_retry_config_list", "keys")

    def __init__(self, keys: Iterable[ECHKey] = ()) -> None:
        """Index ``keys``; retry-only configs (no private key) are never candidates."""
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

        Also what ``/.well-known/origin-svcb`` serves: one list, post-quantum
        configs first, so every client finds the best config it supports.
        """
        return self._retry_config_list

    @property
    def config_ids(self) -> frozenset[int]:
        """config_ids in use."""
        return frozenset(k.config_id for k in self.keys)
