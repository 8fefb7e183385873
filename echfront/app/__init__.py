"""The running application: the service tree, workers, the demo.

Owns: the running front with its reload, shutdown and key-rotation schedule
(:mod:`~echfront.app.service`), its listening services
(:mod:`~echfront.app.listeners`), a front's part in a fleet
(:mod:`~echfront.app.fleet`), the ``--workers`` supervisor
(:mod:`~echfront.app.workers`), record padding for the TLS the front
terminates itself (:mod:`~echfront.app.localtls`), the demo's keys, CA and configuration
(:mod:`~echfront.app.demo`, :mod:`~echfront.app.certs`), and ``echfront try``
showing the demo in Chromium (:mod:`~echfront.app.trybrowser`,
:mod:`~echfront.app.chromium`).

May import: every wing below it (``config``, ``front``, ``keys``, ``dns``,
``ech``, ``tls``).  Only :mod:`echfront.tap` and :mod:`echfront.cli` import it.
"""
