"""Sans-IO QUIC Initial handling (RFC 9000, RFC 9001, RFC 9369).

Owns: long-header parsing, Initial packet protection from the client's
Destination Connection ID, CRYPTO frame reassembly, and the rewriting of a
client's Initial packets around a ClientHelloInner.

May import: :mod:`echfront.tls`, :mod:`echfront.ech`, :mod:`echfront.errors`,
the standard library and ``cryptography``.  No Twisted, no sockets.

Modules, lowest first: ``errors`` (drops and QUIC connection errors),
``packets`` (versions, long headers, packet numbers, Version Negotiation),
``protection`` (Initial keys, packet and header protection, Retry),
``frames``, ``crypto_stream`` (CRYPTO reassembly), ``incoming`` (a client
datagram taken apart), ``rewrite`` (Initial packets rebuilt around new
CRYPTO data), ``admission`` (datagrams of no flow), ``flow`` (the per-flow
state object a datagram relay drives), ``hello`` (the ECH decoder on a
ClientHello from QUIC) and ``table`` (a relay's flows by client address and
connection ID).
"""
