"""Key storage and lifecycle: key files, the key directory, rotation.

Owns: RFC 9934 PEM key files (:mod:`~echfront.keys.keyfile`), the key
directory with its states (:mod:`~echfront.keys.keydir`), and automatic
rotation (:mod:`~echfront.keys.rotation`); the key stores behind
:class:`~echfront.interfaces.IKeyStore` (:mod:`~echfront.keys.stores`, and
etcd: :mod:`~echfront.keys.etcd`, :mod:`~echfront.keys.etcdapi`,
:mod:`~echfront.keys.etcdstore`, :mod:`~echfront.keys.etcdwatch`, with
:mod:`~echfront.keys.sealing`); and a fleet's rotation
(:mod:`~echfront.keys.fleet`, :mod:`~echfront.keys.fleetleader`,
:mod:`~echfront.keys.fleetmember`, :mod:`~echfront.keys.etcdfleet`).

May import: :mod:`echfront.ech`, :mod:`echfront.errors`,
:mod:`echfront.interfaces`, :mod:`echfront.dns` and Twisted.

``echfront.keys`` was a module before the wings; its names still resolve
here, with a :class:`DeprecationWarning` naming their new home.
"""

from __future__ import annotations

from echfront._moved import moved_names

#: Names the old ``echfront.keys`` module defined -> the module defining them now.
_MOVED = {
    "ECH_INFO_PREFIX": "echfront.ech.keyset",
    "ECHKey": "echfront.ech.keyset",
    "KeySet": "echfront.ech.keyset",
    "generate_key": "echfront.ech.keyset",
    "preference_order": "echfront.ech.keyset",
    "dump_pem": "echfront.keys.keyfile",
    "load_pem": "echfront.keys.keyfile",
    "read_key_file": "echfront.keys.keyfile",
    "write_key_file": "echfront.keys.keyfile",
}


__getattr__ = moved_names(__name__, _MOVED)
