"""Sans-IO TLS 1.3 (RFC 8446): record framing and handshake messages.

Owns: splitting records and reassembling the first handshake flight
(:mod:`~echfront.tls.records`), and parsing and encoding ClientHello and
ServerHello (:mod:`~echfront.tls.hello`).

May import: the standard library and :mod:`echfront.errors`.  No Twisted,
no I/O: everything here works on bytes, and a test asserts it.
"""
