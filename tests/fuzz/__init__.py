"""Coverage-guided fuzz targets (atheris, libFuzzer) for the parsers that read network bytes.

Each target is a module here with two functions:

* ``test_one_input(data: bytes) -> None`` runs one input and raises
  (``AssertionError`` or whatever escaped the code under test) only on a
  finding: an exception other than an :class:`echfront.errors.AlertError`
  subclass, a broken invariant, or memory beyond the documented bounds;
* ``seeds() -> list[bytes]``, the starting corpus.

Run one for real from the repository root (see docs/conformance.rst)::

    nice -n 19 .venv/bin/python -m tests.fuzz.clienthello CORPUS_DIR -max_total_time=600

``tests/test_fuzz_targets.py`` runs every module named in :data:`TARGETS` in CI,
bounded: the seeds and fixed mutations in process, then a short atheris run.

``initial.py`` does the same for client datagrams into the QUIC wing
(admission, then an Initial flow through the ECH decision).
"""

#: Target modules in this package; tests/test_fuzz_targets.py runs each one.
TARGETS: tuple[str, ...] = ("clienthello", "initial")
