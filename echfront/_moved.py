"""Old dotted names that keep working after the move into wings, with a warning.

Version 0.1 was one flat package; names a router, a local service or a
deployment script could have imported from there (``echfront.routing.Backend``,
``echfront.config.ServiceContext``, ``echfront.keys.KeySet``,
``echfront.tap.FrontService``) still resolve through a module ``__getattr__``
(PEP 562) that warns with the new home.  docs/architecture.rst lists them.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_names"]


def moved_names(old_module: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving moved names with a DeprecationWarning.

    :param old_module: the module the names used to be in, for the message
        and for the AttributeError of any other name.
    :param homes: each moved name -> the dotted module that defines it now;
        imported on first use, so the old module loads nothing extra.
    """

    def resolve(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            f"{old_module}.{name} moved to {home}.{name}", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module(home), name)

    return resolve
