"""Key storage and lifecycle: key files, the key directory, rotation.

Owns: RFC 9934 PEM key files, the key directory with its states
(:mod:`~echfront.keys.keydir`), and automatic rotation
(:mod:`~echfront.keys.rotation`).

May import: :mod:`echfront.ech`, :mod:`echfront.errors`,
:mod:`echfront.interfaces`, :mod:`echfront.dns` and Twisted.
"""
