"""Fuzz target: client datagrams into the QUIC wing (RFC 9000 §5.2, §14.1, §17.2; RFC 9001 §4-5).

What the datagram relay does with a client's first datagrams, sans-IO and
with a real ECH key: :func:`~echfront.quic.admission.admit` decides whether
the first datagram starts a flow, :class:`~echfront.quic.flow.InitialFlow`
takes every datagram in order, and once the ClientHello is whole it is
decoded (:func:`~echfront.quic.hello.decode_first_hello`) and released
(rewritten when ECH is accepted, relayed otherwise), the driving loop of
``echfront/quic/flow.py``'s docstring; later datagrams go through the
translating or passthrough phase, a second ClientHello included.

The first input byte picks what the rest is; the rest is up to
:data:`MAX_DATAGRAMS` pieces, each a 2-byte length and that many bytes:

* ``0``: the pieces are client datagrams as sent, already protected (a
  mutation lands *after* protection: header fields, packet numbers,
  coalescing; most fail authentication and are dropped).  Second byte odd:
  short ones are zero-padded to 1200 bytes, past the §14.1 size check.
* ``1``: the pieces are Initial *plaintexts* (frames), each protected here
  with the wing's own :func:`~echfront.quic.protection.protect` into one
  padded datagram (a mutation lands *before* protection, so it reaches the
  frame parser, the CRYPTO reassembler and the ECH decoder).  Second byte:
  bit 0 picks QUIC v2 over v1, bit 1 refuses decryption (the rate limit).

A finding is any exception other than what the wing documents (a
:class:`FlowOutput`, a drop, a QUIC close with a transport or CRYPTO_ERROR
code, an :class:`~echfront.errors.AlertError` turned into one), or a broken
invariant: a close without a CONNECTION_CLOSE datagram, held bytes or
CRYPTO bytes beyond :class:`~echfront.quic.flow.FlowLimits`.
"""

from __future__ import annotations

import sys

from tests.fuzz.harness import fuzz_main, instrumented

with instrumented():
    from echfront.ech.decoder import ECHDecoder
    from echfront.ech.keyset import KeySet
    from echfront.errors import AlertError
    from echfront.quic.admission import admit
    from echfront.quic.errors import QuicError, TransportErrorCode
    from echfront.quic.flow import FlowLimits, FlowOutput, FlowPhase, InitialFlow
    from echfront.quic.frames import encode_crypto
    from echfront.quic.hello import decode_first_hello, release
    from echfront.quic.packets import VERSION_1, VERSION_2, QuicVersion
    from tests.echhello import seal_hello
    from tests.fuzz.clienthello import KAT_CONFIG, KAT_KEY
    from tests.test_quic_flow import DCID, SCID, SPEC
    from tests.test_quic_packets import initial

__all__ = ["seeds", "test_one_input"]

MODE_PROTECTED, MODE_PLAIN = range(2)
#: Datagrams per input: enough for a two-packet hello, an ACK and a second hello.
MAX_DATAGRAMS = 8
#: Plaintext of one packet padded to this, so the datagram reaches 1200 bytes.
PLAIN_PAD = 1180
LIMITS = FlowLimits(max_held_packets=8)
#: The Go-client vector's key: fixed, so seeds kept in a corpus still decrypt.
DECODER = ECHDecoder(KeySet([KAT_KEY]))
#: Codes a flow closes with: the wing's transport errors and CRYPTO_ERROR (RFC 9001 §4.8).
CLOSE_CODES = frozenset(
    (
        TransportErrorCode.FRAME_ENCODING_ERROR,
        TransportErrorCode.PROTOCOL_VIOLATION,
        TransportErrorCode.CRYPTO_BUFFER_EXCEEDED,
    )
)


def _pieces(data: bytes) -> list[bytes]:
    """Split ``data`` into length-prefixed pieces (a short last length takes what is left)."""
    pieces: list[bytes] = []
    pos = 0
    while pos + 2 <= len(data) and len(pieces) < MAX_DATAGRAMS:
        length = int.from_bytes(data[pos : pos + 2], "big")
        pieces.append(data[pos + 2 : pos + 2 + length])
        pos += 2 + length
    return pieces


def _frame(pieces: list[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(2, "big") + p for p in pieces)


def _protected(version: QuicVersion, payloads: list[bytes]) -> list[bytes]:
    """One padded Initial datagram per plaintext, numbered from 0, as a client sends them."""
    return [
        initial(version, dcid=DCID, scid=SCID, payload=p.ljust(PLAIN_PAD, b"\0"), packet_number=n)
        for n, p in enumerate(payloads)
    ]


def _check(flow: InitialFlow, out: FlowOutput) -> None:
    """What every call's output must satisfy (module docstring)."""
    assert isinstance(out, FlowOutput)
    if out.error is not None:
        assert out.to_client and flow.closed, out.error
        code = out.error.code
        assert code in CLOSE_CODES or 0x100 <= code <= 0x1FF, (code, str(out.error))
    # Memory: what a flow holds stays within its limits (the flow's own
    # counters, read here because no public property exposes them).
    assert flow._held_bytes <= LIMITS.max_held_bytes
    assert flow._held_packets <= LIMITS.max_held_packets
    assert flow._stream.highest <= LIMITS.max_crypto_bytes


def _drive(datagrams: list[bytes], may_decrypt: bool) -> None:
    """The relay's loop (echfront/quic/flow.py) over one client's datagrams."""
    if not datagrams:
        return
    admission = admit(datagrams[0], random=bytes)
    if admission.header is None:
        assert admission.reason
        assert admission.reply is None or len(admission.reply) > 7
        return
    assert admission.reply is None and not admission.reason
    flow = InitialFlow(admission.header, now=0.0, limits=LIMITS)
    for step, datagram in enumerate(datagrams):
        out = flow.client_datagram(datagram, step * 0.1)
        _check(flow, out)
        if out.hello is not None:
            assert flow.phase is FlowPhase.DECIDING
            try:
                info = decode_first_hello(DECODER, out.hello, may_decrypt=lambda: may_decrypt)
                out = release(flow, info)
            except AlertError as error:
                out = flow.refuse(QuicError.from_alert(error))
            _check(flow, out)
        if flow.closed:
            assert flow.client_datagram(datagram, step * 0.1).dropped == 1
            return


def test_one_input(data: bytes) -> None:
    """Run one input; raise only on a finding (see the module docstring)."""
    if len(data) < 2:
        return
    mode, knob, rest = data[0] % 2, data[1], _pieces(data[2:])
    if mode == MODE_PROTECTED:
        pad = knob & 1
        _drive([d.ljust(1200, b"\0") if pad else d for d in rest], may_decrypt=True)
    else:
        version = VERSION_2 if knob & 1 else VERSION_1
        _drive(_protected(version, rest), may_decrypt=not knob & 2)


def seeds() -> list[bytes]:
    """Real client Initials: v1 and v2, one- and two-packet ClientHellos, a second hello."""
    first = seal_hello(KAT_CONFIG, SPEC, session_id=b"")  # RFC 9001 §8.4: empty session id
    hello = first.outer_message
    half = len(hello) // 2
    one = [encode_crypto(0, hello)]
    two = [b"\x01" + encode_crypto(0, hello[:half]), encode_crypto(half, hello[half:])]
    second = first.second(SPEC).outer_message
    ack = bytes.fromhex("0200000000")
    retried = [*one, ack, encode_crypto(len(hello), second)]
    corpus: list[bytes] = []
    for version, knob in ((VERSION_1, 0), (VERSION_2, 1)):
        for payloads in (one, two):
            corpus.append(bytes((MODE_PLAIN, knob)) + _frame(payloads))
            corpus.append(bytes((MODE_PROTECTED, 0)) + _frame(_protected(version, payloads)))
    corpus.append(bytes((MODE_PLAIN, 0)) + _frame(retried))
    corpus.append(bytes((MODE_PLAIN, 2)) + _frame(one))
    return corpus


if __name__ == "__main__":
    fuzz_main("initial", test_one_input, seeds())
    sys.exit(0)
