"""One client connection, on Twisted: accept, first flight, decision, hand-off.

Owns: the hand-off protocols and connection facts
(:mod:`~echfront.front.connection`), the settings and state a connection is
decided with (:mod:`~echfront.front.state`), the first-flight protocol and
its factory (:mod:`~echfront.front.protocol`), the relay to backends and its
zero-copy engine (:mod:`~echfront.front.relay`,
:mod:`~echfront.front.splice`), local TLS termination
(:mod:`~echfront.front.local`), PROXY headers, limits and metrics.

May import: :mod:`echfront.tls`, :mod:`echfront.ech`, :mod:`echfront.errors`,
:mod:`echfront.interfaces`, :mod:`echfront.targets`, Twisted and pyOpenSSL.
Never :mod:`echfront.config`, :mod:`echfront.app` or :mod:`echfront.cli`.
"""
