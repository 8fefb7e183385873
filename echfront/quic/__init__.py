"""Sans-IO QUIC Initial handling (RFC 9000, RFC 9001, RFC 9369).

Owns: long-header parsing, Initial packet protection from the client's
Destination Connection ID, CRYPTO frame reassembly, and the rewriting of a
client's Initial packets around a ClientHelloInner.

May import: :mod:`echfront.tls`, :mod:`echfront.ech`, :mod:`echfront.errors`,
the standard library and ``cryptography``.  No Twisted, no sockets.
"""
