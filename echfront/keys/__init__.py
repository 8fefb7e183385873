"""Key storage and lifecycle: key files, the key directory, rotation.

Owns: RFC 9934 PEM key files (:mod:`~echfront.keys.keyfile`), the key
directory with its states (:mod:`~echfront.keys.keydir`), and automatic
rotation (:mod:`~echfront.keys.rotation`).

May import: :mod:`echfront.ech`, :mod:`echfront.errors`,
:mod:`echfront.interfaces`, :mod:`echfront.dns` and Twisted.

``echfront.keys`` was a module before the wings; its names still resolve
here, with a :class:`DeprecationWarning` naming their new home.
"""

from __future__ import annotations

import warnings
from typing import Any

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


def __getattr__(name: str) -> Any:
    """Keep ``echfront.keys.KeySet`` (and the old module's other names) working, with a warning."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"echfront.keys.{name} moved to {module}.{name}", DeprecationWarning, stacklevel=2
    )
    # Imported here, and by name, so the layering test sees these arrows.
    import echfront.ech.keyset  # noqa: PLC0415
    import echfront.keys.keyfile  # noqa: PLC0415

    home = echfront.ech.keyset if module == "echfront.ech.keyset" else echfront.keys.keyfile
    return getattr(home, name)
