# -*- test-case-name: tests.test_keys -*-
"""RFC 9934 PEM key files: ECH keys on disk.

An RFC 9934 file holds zero or one PKCS#8 ``PRIVATE KEY`` block followed by
one ``ECHCONFIG`` block, whose base64 content is an ECHConfigList with its
2-byte length (the same string as a DNS ``ech=`` value).  The same files are
read by OpenSSL's ``openssl ech`` tooling and by nginx, haproxy and lighttpd
ECH builds, and by Go's ``tls.Config.EncryptedClientHelloKeys`` after
parsing, so keys move freely between echfront and those servers.

An X-Wing (MLKEM768-X25519) private key is stored as PKCS#8 (RFC 5958
OneAsymmetricKey, version 0) with the algorithm id-XWing, OID
1.3.6.1.4.1.62253.25722 with absent parameters, and the 32-byte seed as the
privateKey OCTET STRING, exactly as draft-connolly-cfrg-xwing-kem §5.8.2 and
its Appendix D specify.  Neither OpenSSL 4.0 nor Go's crypto/x509 parses that
OID, so this module reads and writes it itself; the encoding is fixed-length,
so it is one 22-byte DER prefix and the seed.

:func:`dump_pem` and :func:`load_pem` work on bytes; :func:`read_key_file`
and :func:`write_key_file` add the file I/O (atomic, owner-only writes).
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
from collections.abc import Sequence
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
    decode_config_list,
    encode_config_list,
)
from echfront.ech.hpke import SUPPORTED_AEADS, RecipientKey
from echfront.ech.keyset import ECHKey
from echfront.errors import ConfigError

__all__ = ["dump_pem", "load_pem", "read_key_file", "write_key_file"]

#: DER of an X-Wing OneAsymmetricKey up to the seed: SEQUENCE (52 bytes) {
#: INTEGER 0, SEQUENCE { OID 1.3.6.1.4.1.62253.25722 }, OCTET STRING (32 bytes)
#: } (draft-connolly-cfrg-xwing-kem §5.8.2, Appendix D).  DER is canonical and
#: the draft forbids parameters and the publicKey field, so a valid key is
#: exactly this prefix and 32 bytes.
_XWING_PKCS8_PREFIX = bytes.fromhex("3034020100300d060b2b0601040183e62d81c87a0420")

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END ([A-Z0-9 ]+)-----", re.DOTALL
)


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
