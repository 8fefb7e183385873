"""DNS: HTTPS/SVCB records for ECH, publication and verification.

Owns: the HTTPS record and ``origin-svcb`` document (:mod:`~echfront.dns.svcb`),
RFC 2136 and command publishers and the verifier that asks every
authoritative server (:mod:`~echfront.dns.publish`).

May import: :mod:`echfront.ech`, :mod:`echfront.errors`,
:mod:`echfront.interfaces`, dnspython and Twisted.
"""
