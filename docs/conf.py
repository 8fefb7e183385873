"""Sphinx configuration for the echfront documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``
(warnings are errors; .ci/run does this).  The build needs no network:
intersphinx is not used, and the theme is Sphinx's bundled alabaster.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parent.parent
# autodoc imports echfront from the source tree, so the docs describe the
# code next to them even when another version is installed.
sys.path.insert(0, str(ROOT))

from echfront._version import __version__  # noqa: E402  (needs the path above)

project = "echfront"
author = "the echfront authors"
copyright = "the echfront authors, MIT licence"
version = __version__
release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

# -- sources -------------------------------------------------------------------

root_doc = "index"
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build"]
highlight_language = "none"
nitpicky = False

# -- autodoc -------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": False,
}
# Signatures mention Twisted and zope types that Sphinx cannot resolve
# without intersphinx (no network); the docstrings say what each parameter is.
autodoc_typehints = "none"
autoclass_content = "class"
autodoc_preserve_defaults = True

# -- HTML ----------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"echfront {release}"
html_theme_options = {
    "description": "Encrypted Client Hello (RFC 9849) split-mode TLS front on Twisted",
    "fixed_sidebar": False,
    "show_relbars": True,
}
html_static_path: list[str] = []
html_show_sourcelink = False


# -- zope interfaces -------------------------------------------------------------
# autodoc documents classes, and a zope Interface is not one; this directive
# renders one from its own docstrings, so the page follows the code:
#
#   .. zope-interface:: echfront.interfaces.IRouter


def _interface_rst(dotted: str) -> list[str]:
    module_name, _, name = dotted.rpartition(".")
    interface = getattr(importlib.import_module(module_name), name)
    lines = [f".. py:class:: {dotted}", "", "   *A zope.interface interface.*", ""]
    lines += ["   " + line for line in inspect.cleandoc(interface.__doc__ or "").splitlines()]
    for attribute in interface.names():
        method = interface[attribute]
        lines += ["", f"   .. py:method:: {attribute}{method.getSignatureString()}", ""]
        lines += ["      " + line for line in inspect.cleandoc(method.getDoc() or "").splitlines()]
    return lines


class ZopeInterfaceDirective(SphinxDirective):
    """Document a zope.interface Interface and its methods."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        """Parse the generated reST in place of the directive."""
        container = nodes.container()
        source = StringList(_interface_rst(self.arguments[0]), source=self.arguments[0])
        self.state.nested_parse(source, self.content_offset, container)
        return list(container.children)


def setup(app: Any) -> dict[str, bool]:
    """Register the zope-interface directive."""
    app.add_directive("zope-interface", ZopeInterfaceDirective)
    return {"parallel_read_safe": True}
