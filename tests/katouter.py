"""ClientHelloOuters shaped like the Go known-answer vector's, sealed around any inner.

Shared by the hypothesis fuzz tests (tests/test_fuzz.py) and the atheris
target (tests/fuzz/clienthello.py): the outer keeps the vector's random,
session id, cipher suites and extensions, and its ECH payload is sealed with
the AAD RFC 9849 §5.2 prescribes (the outer with the payload zeroed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from echfront.ech.echconfig import ECHConfig
from echfront.tls.hello import EXT_ECH, ClientHello, encode_client_hello_body

__all__ = ["KAT_CONFIG", "KAT_OUTER", "outer_with_payload", "seal_into_outer"]

_KAT: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "ech-kat-go-client.json").read_text()
)
KAT_OUTER = ClientHello.parse(bytes.fromhex(_KAT["record"])[9:])
KAT_CONFIG = ECHConfig.decode(bytes.fromhex(_KAT["echconfig"]))
#: The AEAD tag every sealed payload carries (AES-128-GCM in the vector).
_TAG_LENGTH = 16


def outer_with_payload(enc: bytes, payload_len: int) -> tuple[bytes, int]:
    """A ClientHelloOuter like the KAT's with a zeroed payload; and the payload offset."""
    ech = (
        b"\x00\x00\x01\x00\x01"
        + bytes((KAT_CONFIG.config_id,))
        + len(enc).to_bytes(2, "big")
        + enc
        + payload_len.to_bytes(2, "big")
        + bytes(payload_len)
    )
    body = encode_client_hello_body(
        random=KAT_OUTER.random,
        session_id=KAT_OUTER.session_id,
        cipher_suites=KAT_OUTER.cipher_suites,
        extensions=[(e.type, ech if e.type == EXT_ECH else e.data) for e in KAT_OUTER.extensions],
    )
    extension = ClientHello.parse(body).get(EXT_ECH)
    assert extension is not None
    return body, extension.offset + 8 + len(enc) + 2


def seal_into_outer(context: Any, enc: bytes, encoded: bytes) -> bytes:
    """Seal ``encoded`` with ``context`` into a fresh outer body (AAD computed as §5.2)."""
    body, at = outer_with_payload(enc, len(encoded) + _TAG_LENGTH)
    ciphertext = bytes(context.seal(encoded, aad=body))
    return body[:at] + ciphertext + body[at + len(ciphertext) :]
