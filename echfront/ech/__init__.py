"""Sans-IO Encrypted Client Hello (RFC 9849) and HPKE (RFC 9180).

Owns: the ECHConfig wire format (:mod:`~echfront.ech.echconfig`), the HPKE
recipient and sender (:mod:`~echfront.ech.hpke`), ECH keys and key sets
(:mod:`~echfront.ech.keyset`), GREASE configs and decoys
(:mod:`~echfront.ech.grease`), the ``maximum_name_length`` derived from the
routed names (:mod:`~echfront.ech.padding`), the split-mode decoder that
turns a ClientHelloOuter into routing metadata (:mod:`~echfront.ech.decoder`),
the backend's ServerHello watch for a HelloRetryRequest, shared by both
relays (:mod:`~echfront.ech.hrrwatch`), and the builder and reader of ECH
probes (:mod:`~echfront.ech.probe`).

May import: :mod:`echfront.tls`, :mod:`echfront.errors`, the standard
library and ``cryptography``.  No Twisted, no sockets, no files.
"""
