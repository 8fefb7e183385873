"""One client connection, on Twisted: accept, first flight, decision, hand-off.

Owns: the hand-off protocols and connection facts
(:mod:`~echfront.front.connection`), the settings and state a connection is
decided with (:mod:`~echfront.front.state`), the first-flight protocol and
its factory (:mod:`~echfront.front.protocol`), the relay to backends, the
backend connect and its zero-copy engine (:mod:`~echfront.front.relay`,
:mod:`~echfront.front.backend`, :mod:`~echfront.front.splice`), local TLS
termination and its certificate options (:mod:`~echfront.front.local`,
:mod:`~echfront.front.tlsoptions`), listening and refusing
(:mod:`~echfront.front.accept`), PROXY headers both ways
(:mod:`~echfront.front.proxyproto`), limits (:mod:`~echfront.front.limits`),
metrics counted cheaply and sampled at scrape time
(:mod:`~echfront.front.metrics`, :mod:`~echfront.front.fastmetrics`), the
batched connection log (:mod:`~echfront.front.connlog`), and the trusted
link of an exit front (:mod:`~echfront.front.exitlink`).

The lean engine serves plain TCP under the same protocol with one private
epoll per reactor: :mod:`~echfront.front.engine` (with
:mod:`~echfront.front.deadlines`), :mod:`~echfront.front.leanport`,
:mod:`~echfront.front.leantransport`, :mod:`~echfront.front.leanrelay`,
:mod:`~echfront.front.leansplice`.  QUIC flows are relayed by
:mod:`~echfront.front.datagram`, driving the sans-IO :mod:`echfront.quic`.

Inside the wing, arrows run from the protocol down to the handlers (relay,
local) and from them to ``connection``/``state``; the handlers never import
the protocol, they are handed a :class:`~echfront.front.connection.ClientSide`.

May import: :mod:`echfront.tls`, :mod:`echfront.ech`, :mod:`echfront.quic`,
:mod:`echfront.errors`,
:mod:`echfront.interfaces`, :mod:`echfront.targets`, Twisted and pyOpenSSL.
Never :mod:`echfront.config`, :mod:`echfront.app` or :mod:`echfront.cli`.
"""
