"""Shared plumbing for the fuzz targets: instrumentation and the atheris entry point.

Kept free of echfront imports: a target imports echfront inside
:func:`instrumented`, so that atheris adds its coverage hooks to echfront's
code (and only to it) when the target runs as a fuzzer.  Under pytest, or
without atheris, the same imports run uninstrumented.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["fuzz_main", "instrumented"]


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Instrument echfront modules imported inside the block, when fuzzing.

    Only when atheris is installed and echfront is not loaded yet (a fresh
    fuzzing process): inside pytest the modules are already imported and
    coverage hooks would only slow the bounded CI runs down.
    """
    fresh = not any(name == "echfront" or name.startswith("echfront.") for name in sys.modules)
    if fresh and importlib.util.find_spec("atheris") is not None:
        atheris = importlib.import_module("atheris")
        with atheris.instrument_imports(include=["echfront"]):
            yield
    else:
        yield


def fuzz_main(name: str, test_one_input: Callable[[bytes], None], seeds: list[bytes]) -> None:
    """Run ``test_one_input`` under atheris with ``sys.argv`` as libFuzzer flags.

    Positional arguments are corpus directories, as for libFuzzer; the
    first is created if missing and, when empty, filled with ``seeds``, so
    that every run starts from real ClientHellos rather than from nothing.
    With none given, ``$TMPDIR/echfront-fuzz-NAME`` is used and kept, so
    successive runs build on each other's corpus.  libFuzzer ends the
    process itself (exit status 0, or 1 with a crash file on a finding).
    """
    atheris = importlib.import_module("atheris")
    argv = list(sys.argv)
    corpora = [arg for arg in argv[1:] if not arg.startswith("-")]
    if not corpora:
        corpora = [str(Path(tempfile.gettempdir()) / f"echfront-fuzz-{name}")]
        argv.append(corpora[0])
    first = Path(corpora[0])
    first.mkdir(parents=True, exist_ok=True)
    if not any(first.iterdir()):
        _write_seeds(first, seeds)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def _write_seeds(directory: Path, seeds: list[bytes]) -> None:
    for index, seed in enumerate(seeds):
        (directory / f"seed-{index:03d}").write_bytes(seed)
