# -*- test-case-name: tests.test_keystore_sealing -*-
"""Encryption at rest of ECH private keys kept in a shared store (etcd).

A shared store is read by every front and backed up, snapshotted and
replicated by its operators; an ECH private key found there decrypts every
ClientHelloInner sent to that config (RFC 9849 §10.10: the inner name is
what ECH exists to hide).  So the etcd store (:mod:`echfront.keys.etcdstore`)
never writes a private key, in PEM or raw: it writes the key *sealed* with
AES-256-GCM (NIST SP 800-38D) under a key-encryption key (KEK) that stays in
a local file on each front and never enters the store.

The associated data binds each sealed key to its place: the store's key id
and the ECHConfigList it belongs to (which carries every config_id, the KEM
and the public key, RFC 9849 §4).  A sealed value copied to another key id,
or paired with another config (a different config_id or public_name to
publish), fails to open instead of loading.

Generating the KEK file (32 random bytes, the same file on every front of a
fleet, readable by the front's user only)::

    umask 077 && head -c 32 /dev/urandom > /etc/echfront/etcd-kek
    # or: openssl rand -out /etc/echfront/etcd-kek 32

Distribute it like a TLS private key (configuration management, a
Kubernetes Secret with ``defaultMode: 0400``).  A file that others can read
is refused.  To change the KEK, give the new one as the sealing key and the
old one as a *previous* key: values sealed under either open, and values
written from then on use the new one (each sealed value names its KEK by a
fingerprint that reveals nothing about it).

Sealed value: ``version (1 byte, 1) || nonce (12 bytes) || ciphertext+tag``,
with a fresh random nonce per seal (a fleet seals a few keys a day, far
below the 2**32 messages per key that random 96-bit nonces allow).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from echfront.errors import ConfigError

__all__ = ["KEK_LENGTH", "SealError", "Sealer", "read_kek_file", "sealing_context"]

#: A KEK is an AES-256 key.
KEK_LENGTH = 32
_VERSION = 1
_NONCE_LENGTH = 12
_FINGERPRINT_LABEL = b"echfront etcd key-encryption key fingerprint"
_AAD_LABEL = b"echfront sealed ECH key v1\x00"


class SealError(ValueError):
    """A sealed value that does not open: wrong KEK, tampered with, or moved."""


def read_kek_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key-encryption key: a file of exactly 32 bytes, not readable by others.

    :raises ConfigError: one line naming the file and the problem.
    """
    where = os.fspath(path)
    try:
        with open(where, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(KEK_LENGTH + 1)
    except OSError as error:
        raise ConfigError(f"{where}: cannot read key-encryption key ({error.strerror})") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            f"{where}: key-encryption key is accessible by other users (chmod 600 or 400)"
        )
    if len(data) != KEK_LENGTH:
        raise ConfigError(
            f"{where}: key-encryption key must be exactly {KEK_LENGTH} bytes "
            "(make one with: head -c 32 /dev/urandom)"
        )
    return data


def sealing_context(key_id: str, config_list: bytes) -> bytes:
    """The associated data of a sealed key: its id and ECHConfigList (see the module docstring)."""
    name = key_id.encode("utf-8")
    return _AAD_LABEL + len(name).to_bytes(2, "big") + name + config_list


class Sealer:
    """Seals and opens private keys with AES-256-GCM under a KEK (see the module docstring).

    :param kek: the key new values are sealed with (32 bytes).
    :param previous: older KEKs whose values still open (KEK rotation).
    """

    def __init__(self, kek: bytes, previous: Sequence[bytes] = ()) -> None:
        """Use ``kek`` (and accept ``previous`` ones for opening)."""
        for key in (kek, *previous):
            if len(key) != KEK_LENGTH:
                raise ValueError(f"a key-encryption key is {KEK_LENGTH} bytes")
        self._sealing = (self.fingerprint_of(kek), AESGCM(kek))
        self._opening = {self.fingerprint_of(k): AESGCM(k) for k in (kek, *previous)}

    @classmethod
    def from_files(
        cls, path: str | os.PathLike[str], previous: Sequence[str | os.PathLike[str]] = ()
    ) -> Sealer:
        """A sealer from KEK files (:func:`read_kek_file`).

        :raises ConfigError: for an unreadable, exposed or malformed file.
        """
        return cls(read_kek_file(path), [read_kek_file(Path(p)) for p in previous])

    @staticmethod
    def fingerprint_of(kek: bytes) -> str:
        """A public name for ``kek``: 8 bytes of HMAC-SHA256 keyed by it, in hex.

        It tells which KEK sealed a value and reveals nothing about the KEK.
        """
        return hmac.new(kek, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the KEK new values are sealed with."""
        return self._sealing[0]

    def seal(self, secret: bytes, context: bytes) -> tuple[str, bytes]:
        """Seal ``secret`` bound to ``context``; the KEK fingerprint and the sealed value."""
        fingerprint, aead = self._sealing
        nonce = secrets.token_bytes(_NONCE_LENGTH)
        return fingerprint, bytes([_VERSION]) + nonce + aead.encrypt(nonce, secret, context)

    def open(self, fingerprint: str, sealed: bytes, context: bytes) -> bytes:
        """Open a value sealed by :meth:`seal` with the same ``context``.

        :raises SealError: for an unknown KEK, a malformed value, or one
            that does not authenticate (tampered with, or under another
            context).
        """
        aead = self._opening.get(fingerprint)
        if aead is None:
            raise SealError(f"sealed with key-encryption key {fingerprint}, which this front lacks")
        if len(sealed) < 1 + _NONCE_LENGTH + 16 or sealed[0] != _VERSION:
            raise SealError("malformed sealed value")
        nonce = sealed[1 : 1 + _NONCE_LENGTH]
        try:
            return aead.decrypt(nonce, sealed[1 + _NONCE_LENGTH :], context)
        except InvalidTag:
            raise SealError("sealed value does not authenticate (tampered with or moved)") from None
