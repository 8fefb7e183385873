"""echfront: a client-facing TLS front for Encrypted Client Hello (RFC 9849).

The package is layered so that the architecture shows in the file list:

* sans-IO core, no Twisted imports: ``records`` (TLS framing), ``hello``
  (ClientHello/ServerHello), ``echconfig`` (ECHConfig wire format), ``hpke``
  (the HPKE recipient), ``keys`` (key files and key sets), ``decoder`` (the
  split-mode ECH decoder), ``svcb`` (DNS and well-known publication);
* the Twisted front built on it (see the ``front`` and ``relay`` modules and
  the ``twistd echfront`` plugin);
* the ``echfront`` command line (``cli``).
"""

from echfront._version import __version__

__all__ = ["__version__"]
