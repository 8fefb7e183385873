"""DNS: HTTPS/SVCB records for ECH, publication and verification.

Owns: the HTTPS record and ``origin-svcb`` document (:mod:`~echfront.dns.svcb`);
the verifier that asks every authoritative server, and the values the
publishers share (:mod:`~echfront.dns.verify`); the one DNS-over-HTTPS
client (:mod:`~echfront.dns.doh`); the RFC 2136 publisher
(:mod:`~echfront.dns.rfc2136`) and the command publisher
(:mod:`~echfront.dns.command`), which :mod:`echfront.config.build` builds
from ``[publish]``.  The DoH responder of ``echfront try`` (:mod:`~echfront.dns.dohserver`).

May import: :mod:`echfront.ech`, :mod:`echfront.errors`,
:mod:`echfront.interfaces`, dnspython and Twisted.
"""
