# -*- test-case-name: tests.test_check -*-
"""What ``echfront check`` reports: findings, one line each, and the error that ends a step.

The bottom of the ``check`` modules: :mod:`~echfront.cli.check_dns`,
:mod:`~echfront.cli.check_probe` and :mod:`~echfront.cli.check` report
through :class:`Findings` and stop a step with :class:`CheckError`.
"""

from __future__ import annotations

from typing import TextIO

__all__ = ["CheckError", "Findings", "one_line"]


class CheckError(Exception):
    """A step cannot go on; the message is one line for an ``error:`` finding."""


def one_line(error: object) -> str:
    """``error`` as one line of at most 300 characters (its class name if empty)."""
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


class Findings:
    """Prints findings as they come and counts the errors."""

    def __init__(self, out: TextIO) -> None:
        """Print to ``out``."""
        self._out = out
        self.errors = 0
        self.warnings = 0

    def _line(self, kind: str, text: str) -> None:
        print(f"{kind}: {' '.join(text.split())}", file=self._out, flush=True)

    def ok(self, text: str) -> None:
        """Report something that is as it should be."""
        self._line("ok", text)

    def warning(self, text: str) -> None:
        """Report something that works but should be fixed."""
        self.warnings += 1
        self._line("warning", text)

    def error(self, text: str) -> None:
        """Report something that breaks ECH for clients."""
        self.errors += 1
        self._line("error", text)
