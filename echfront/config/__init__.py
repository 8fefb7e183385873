"""The configuration: TOML to frozen dataclasses, then to running objects.

Owns: the schema and its validation (:mod:`~echfront.config.schema`),
building a :class:`~echfront.front.state.FrontState` and local services from
it (:mod:`~echfront.config.build`), and endpoint-string helpers
(:mod:`~echfront.config.endpoints`).

May import: every lower wing (``tls``, ``ech``, ``front``, ``keys``, ``dns``)
and the top-level API modules.  Never :mod:`echfront.app` or :mod:`echfront.cli`.
"""
