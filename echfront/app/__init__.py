"""The running application: the service tree, workers, the demo.

Owns: the demo's keys, CA and configuration (:mod:`~echfront.app.demo`,
:mod:`~echfront.app.certs`) and the ``--workers`` supervisor
(:mod:`~echfront.app.workers`).

May import: every wing below it (``config``, ``front``, ``keys``, ``dns``,
``ech``, ``tls``).  Only :mod:`echfront.tap` and :mod:`echfront.cli` import it.
"""
