"""The ``echfront`` command line: keys, DNS records, inspection, diagnosis.

Owns: the argument parser and subcommands (:mod:`~echfront.cli.main`),
``echfront check`` (:mod:`~echfront.cli.check`) and ``echfront fleet``
(:mod:`~echfront.cli.fleet`).  The top of the arrows: it
may import any wing, and nothing imports it.

``echfront.cli:main`` is the console entry point, so :func:`main` is
re-exported here.
"""

from echfront.cli.main import main

__all__ = ["main"]
