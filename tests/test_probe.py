"""The HPKE sender and the ECH probe (echfront/ech/probe.py), offline and against real servers.

Oracles, none of them the code under test:

* RFC 9180 Appendix A.1.1 (enc and ciphertexts for a fixed skE) and
  pyhpke's *recipient* for the sender; echfront's own RecipientKey for
  both KEMs (its correctness is pinned in tests/test_hpke.py and
  tests/test_pq.py);
* RFC 8448's key schedule values for HKDF-Expand-Label;
* echfront.ech.decoder.ECHDecoder for the ClientHelloOuter the probe builds;
* for the acceptance verdict, Go's crypto/tls server: holding the ECH key
  itself (shared mode), and behind ``twistd echfront`` as a keyless
  split-mode backend, each computing the RFC 9849 §7.2 / §7.2.1 signal
  independently of this code.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyhpke
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from echfront.cli.check_probe import send_probe
from echfront.ech.decoder import ECHDecoder, ECHStatus
from echfront.ech.echconfig import (
    KEM_MLKEM768_X25519,
    KEM_X25519_HKDF_SHA256,
    ECHConfig,
    SymmetricSuite,
)
from echfront.ech.hpke import (
    SUPPORTED_AEADS,
    SUPPORTED_KDFS,
    HPKEError,
    RecipientKey,
    _setup_base_s,
    seal_context,
)
from echfront.ech.keyset import KeySet, generate_key
from echfront.ech.probe import (
    ProbeError,
    ProbeHello,
    ProbeResult,
    ProbeStatus,
    ResponseReader,
    accept_confirmation,
    build_probe,
    hkdf_expand_label,
    judge,
)
from echfront.errors import ALERT_NAMES
from echfront.keys.keyfile import read_key_file, write_key_file
from echfront.tls.hello import (
    EXT_ALPN,
    EXT_ECH,
    EXT_ECH_OUTER_EXTENSIONS,
    EXT_KEY_SHARE,
    HRR_RANDOM,
    ClientHello,
    encode_extensions,
    handshake_message,
)
from echfront.tls.records import HandshakeReader
from tests.frontproc import FrontProcess, Pki, make_pki
from tests.gotools import GoBackend, find_go, go_binary

PUBLIC = "public.example"
SECRET = "secret.example"
PRIVATE = "private.example"

# -- the HPKE sender ---------------------------------------------------------------

# RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM.
RFC_SKE = bytes.fromhex("52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736")
RFC_PKR = bytes.fromhex("3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d")
RFC_ENC = bytes.fromhex("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431")
RFC_INFO = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")
RFC_PT = bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")
RFC_SEALED = [
    (
        "436f756e742d30",
        "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a",
    ),
    (
        "436f756e742d31",
        "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab251c03d0c22a56b8ca42c2063b84",
    ),
]

SUITES = [(kdf, aead) for kdf in sorted(SUPPORTED_KDFS) for aead in sorted(SUPPORTED_AEADS)]


def test_sender_reproduces_rfc9180_a11() -> None:
    """With the vector's skE, SetupBaseS gives its enc and seals its ciphertexts in sequence."""
    enc, context = _setup_base_s(0x0020, 1, 1, RFC_PKR, RFC_INFO, ephemeral=RFC_SKE)
    assert enc == RFC_ENC
    for aad, ciphertext in RFC_SEALED:
        assert context.seal(bytes.fromhex(aad), RFC_PT).hex() == ciphertext


@pytest.mark.parametrize("kem_id", [KEM_X25519_HKDF_SHA256, KEM_MLKEM768_X25519])
@pytest.mark.parametrize(("kdf_id", "aead_id"), SUITES)
def test_sealed_messages_open_with_recipient_key(kem_id: int, kdf_id: int, aead_id: int) -> None:
    key = RecipientKey.generate(kem_id)
    enc, sender = seal_context(kem_id, kdf_id, aead_id, key.public_key, b"tls ech\x00cfg")
    assert len(enc) == (32 if kem_id == KEM_X25519_HKDF_SHA256 else 1120)
    receiver = key.setup(kdf_id, aead_id, enc, b"tls ech\x00cfg")
    # Three messages: sequence numbers 0, 1, 2 stay in step (the second
    # ClientHello after a HelloRetryRequest is sequence 1).
    for i in range(3):
        aad, plaintext = b"aad%d" % i, b"hello %d" % i * 40
        assert receiver.open(aad, sender.seal(aad, plaintext)) == plaintext


@pytest.mark.parametrize("kem_id", [KEM_X25519_HKDF_SHA256, KEM_MLKEM768_X25519])
def test_sealed_message_does_not_open_with_another_key_or_info(kem_id: int) -> None:
    key = RecipientKey.generate(kem_id)
    enc, sender = seal_context(kem_id, 1, 1, key.public_key, b"info")
    sealed = sender.seal(b"aad", b"secret")
    with pytest.raises(HPKEError):
        RecipientKey.generate(kem_id).setup(1, 1, enc, b"info").open(b"aad", sealed)
    with pytest.raises(HPKEError):
        key.setup(1, 1, enc, b"other info").open(b"aad", sealed)
    with pytest.raises(HPKEError):
        key.setup(1, 1, enc, b"info").open(b"other aad", sealed)


@pytest.mark.parametrize(("kdf_id", "aead_id"), SUITES)
def test_pyhpke_recipient_opens_what_the_sender_seals(kdf_id: int, aead_id: int) -> None:
    """An independent implementation's recipient (X25519; pyhpke has no ML-KEM)."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    enc, sender = seal_context(KEM_X25519_HKDF_SHA256, kdf_id, aead_id, public, b"tls ech\x00x")
    reference = pyhpke.CipherSuite.new(
        pyhpke.KEMId.DHKEM_X25519_HKDF_SHA256, pyhpke.KDFId(kdf_id), pyhpke.AEADId(aead_id)
    )
    receiver = reference.create_recipient_context(
        enc, pyhpke.KEMKey.from_pyca_cryptography_key(private), info=b"tls ech\x00x"
    )
    for i in range(2):
        aad, plaintext = b"aad%d" % i, b"plaintext %d" % i
        assert receiver.open(sender.seal(aad, plaintext), aad=aad) == plaintext


@pytest.mark.parametrize(
    ("kem_id", "kdf_id", "aead_id", "public_key"),
    [
        (0x0010, 1, 1, bytes(65)),  # DHKEM(P-256): not supported
        (0x0020, 9, 1, RFC_PKR),  # unknown KDF
        (0x0020, 1, 0xFFFF, RFC_PKR),  # export-only AEAD cannot seal
        (0x0020, 1, 1, RFC_PKR[:31]),  # short key
        (0x0020, 1, 1, bytes(32)),  # low-order point: all-zero shared secret
        (0x647A, 1, 1, bytes(1215)),  # short X-Wing key
    ],
)
def test_bad_sender_setups_are_hpke_errors(
    kem_id: int, kdf_id: int, aead_id: int, public_key: bytes
) -> None:
    with pytest.raises(HPKEError):
        seal_context(kem_id, kdf_id, aead_id, public_key, b"info")


# -- HKDF-Expand-Label and the confirmation ----------------------------------------


def test_hkdf_expand_label_matches_rfc8448() -> None:
    """RFC 8448 §3: Derive-Secret(early_secret, "derived", "") of the simple 1-RTT trace."""
    early_secret = bytes.fromhex("33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a")
    derived = hkdf_expand_label(
        "sha256", early_secret, b"derived", hashlib.sha256(b"").digest(), 32
    )
    assert derived.hex() == "6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba"
    # Longer than one block, and SHA-384: lengths as RFC 5869 counts them.
    assert len(hkdf_expand_label("sha384", early_secret, b"x", b"", 100)) == 100


def test_accept_confirmation_labels_differ() -> None:
    random, transcript = bytes(range(32)), hashlib.sha256(b"t").digest()
    plain = accept_confirmation("sha256", random, transcript)
    retry = accept_confirmation("sha256", random, transcript, hello_retry=True)
    assert len(plain) == len(retry) == 8
    assert plain != retry
    assert accept_confirmation("sha384", random, hashlib.sha384(b"t").digest()) != plain


# -- building the probe ------------------------------------------------------------


def _flight(probe: ProbeHello) -> Any:
    flight = HandshakeReader(1).feed(probe.records)
    assert flight is not None and not flight.rest
    return flight


@pytest.mark.parametrize("kem_id", [KEM_X25519_HKDF_SHA256, KEM_MLKEM768_X25519])
def test_probe_decodes_with_the_key(kem_id: int) -> None:
    key = generate_key(PUBLIC, kem_id=kem_id)
    probe = build_probe(SECRET, key.config)
    info = ECHDecoder(KeySet([key])).decode(_flight(probe))
    assert info.status is ECHStatus.ACCEPTED
    assert info.server_name == SECRET
    assert info.outer.server_name() == PUBLIC
    assert info.alpn == (b"h2", b"http/1.1")
    assert info.inner is not None
    # What the front forwards is byte for byte the hello the probe hashes.
    assert info.inner.message == probe.inner
    assert info.inner.supported_versions() == (0x0304,)
    assert info.outer.supported_versions() == (0x0304, 0x0303)
    # The outer carries its own random and key share, and the inner's session id.
    assert info.outer.random != info.inner.random
    assert info.outer.get(EXT_KEY_SHARE) != info.inner.get(EXT_KEY_SHARE)
    assert info.outer.session_id == info.inner.session_id
    assert len(info.inner.session_id) == 32
    assert EXT_ECH_OUTER_EXTENSIONS not in info.outer


@pytest.mark.parametrize("kem_id", [KEM_X25519_HKDF_SHA256, KEM_MLKEM768_X25519])
def test_probe_is_rejected_by_another_key(kem_id: int) -> None:
    key = generate_key(PUBLIC, kem_id=kem_id)
    probe = build_probe(SECRET, key.config)
    same_id = generate_key(PUBLIC, kem_id=kem_id, config_id=key.config_id)
    other_id = generate_key(PUBLIC, kem_id=kem_id, taken_ids=[key.config_id])
    for keys in ([same_id], [other_id]):
        info = ECHDecoder(KeySet(keys)).decode(_flight(probe))
        assert info.status is ECHStatus.REJECTED
        assert info.server_name == PUBLIC


def _payload_length(probe: ProbeHello) -> int:
    outer = ClientHello.from_message(probe.outer)
    extension = outer.get(EXT_ECH)
    assert extension is not None
    # type, kdf, aead, config_id, enc<2>, payload<2>
    enc_length = int.from_bytes(extension.data[6:8], "big")
    return int.from_bytes(extension.data[8 + enc_length : 10 + enc_length], "big")


def test_padding_follows_rfc9849_6_1_3() -> None:
    """Names up to maximum_name_length give one payload length, a multiple of 32 plus the tag."""
    key = generate_key(PUBLIC, maximum_name_length=40)
    lengths = {_payload_length(build_probe(n, key.config)) for n in ("a.example", "b" * 30 + ".ex")}
    assert len(lengths) == 1
    (length,) = lengths
    assert (length - 16) % 32 == 0
    # Without a maximum_name_length only the 32-byte rounding applies.
    unpadded = generate_key(PUBLIC)
    assert (_payload_length(build_probe("a.example", unpadded.config)) - 16) % 32 == 0


def test_probe_options() -> None:
    key = generate_key(PUBLIC, suites=[SymmetricSuite(1, 3), SymmetricSuite(1, 1)])
    probe = build_probe("Secret.Example.", key.config, alpn=(), cipher_suites=(0x1302,))
    assert probe.target == SECRET
    assert probe.suite == SymmetricSuite(1, 3)  # the config's first suite
    info = ECHDecoder(KeySet([key])).decode(_flight(probe))
    assert info.inner is not None
    assert info.inner.cipher_suites == b"\x13\x02"
    assert EXT_ALPN not in info.inner
    explicit = build_probe(SECRET, key.config, suite=SymmetricSuite(1, 1))
    assert ECHDecoder(KeySet([key])).decode(_flight(explicit)).status is ECHStatus.ACCEPTED


def test_unusable_configs_and_names_are_probe_errors() -> None:
    key = generate_key(PUBLIC)
    config = key.config
    p256 = ECHConfig(1, 0x0010, bytes(65), config.cipher_suites, 0, PUBLIC)
    with pytest.raises(ProbeError, match="DHKEM\\(P-256\\)"):
        build_probe(SECRET, p256)
    unknown_suite = ECHConfig(1, 0x0020, config.public_key, (SymmetricSuite(7, 7),), 0, PUBLIC)
    with pytest.raises(ProbeError, match="no cipher suite"):
        build_probe(SECRET, unknown_suite)
    low_order = ECHConfig(1, 0x0020, bytes(32), config.cipher_suites, 0, PUBLIC)
    with pytest.raises(ProbeError, match="encapsulation"):
        build_probe(SECRET, low_order)
    for name in ("bad name", "a..b", ""):
        with pytest.raises(ProbeError, match="not a host name"):
            build_probe(name, config)
    with pytest.raises(ValueError, match=r"TLS 1\.3"):
        build_probe(SECRET, config, cipher_suites=(0xC02F,))


# -- judging answers offline ------------------------------------------------------


def _server_hello(
    *,
    random: bytes,
    suite: int = 0x1301,
    extensions: list[tuple[int, bytes]] | None = None,
    session_id: bytes = b"",
) -> bytes:
    if extensions is None:
        extensions = [(0x002B, b"\x03\x04"), (0x0033, b"\x00\x1d\x00\x20" + bytes(32))]
    body = (
        b"\x03\x03"
        + random
        + bytes((len(session_id),))
        + session_id
        + suite.to_bytes(2, "big")
        + b"\x00"
        + encode_extensions(extensions)
    )
    return handshake_message(2, body)


def _confirmed_server_hello(probe: ProbeHello, suite: int, hash_name: str) -> bytes:
    """A ServerHello whose random ends in the §7.2 signal, computed step by step."""
    zeroed = _server_hello(random=bytes(range(24)) + bytes(8), suite=suite)
    transcript = hashlib.new(hash_name, probe.inner + zeroed).digest()
    signal = accept_confirmation(hash_name, probe.inner_random, transcript)
    return _server_hello(random=bytes(range(24)) + signal, suite=suite)


@pytest.mark.parametrize(("suite", "hash_name"), [(0x1301, "sha256"), (0x1302, "sha384")])
def test_judge_server_hello(suite: int, hash_name: str) -> None:
    probe = build_probe(SECRET, generate_key(PUBLIC).config)
    message = _confirmed_server_hello(probe, suite, hash_name)
    assert judge(probe, message) == ProbeResult(ProbeStatus.ACCEPTED, cipher_suite=suite)
    flipped = bytearray(message)
    flipped[37] ^= 1  # the last byte of the random
    assert judge(probe, bytes(flipped)).status is ProbeStatus.REJECTED
    # Another probe's inner hello does not confirm this ServerHello.
    other = build_probe(SECRET, generate_key(PUBLIC).config)
    assert judge(other, message).status is ProbeStatus.REJECTED


def test_judge_hello_retry_request() -> None:
    probe = build_probe(SECRET, generate_key(PUBLIC).config)
    key_share = (0x0033, b"\x00\x17")
    versions = (0x002B, b"\x03\x04")
    zeroed = _server_hello(random=HRR_RANDOM, extensions=[versions, key_share, (EXT_ECH, bytes(8))])
    # RFC 8446 §4.4.1: ClientHelloInner1 enters the transcript as message_hash.
    inner_hash = hashlib.sha256(probe.inner).digest()
    transcript = hashlib.sha256(b"\xfe\x00\x00\x20" + inner_hash + zeroed).digest()
    signal = accept_confirmation("sha256", probe.inner_random, transcript, hello_retry=True)
    hrr = _server_hello(random=HRR_RANDOM, extensions=[versions, key_share, (EXT_ECH, signal)])
    result = judge(probe, hrr)
    assert result.status is ProbeStatus.ACCEPTED and result.hello_retry
    wrong = _server_hello(random=HRR_RANDOM, extensions=[versions, key_share, (EXT_ECH, bytes(8))])
    assert judge(probe, wrong).status is ProbeStatus.REJECTED
    plain = _server_hello(random=HRR_RANDOM, extensions=[versions, key_share])
    assert judge(probe, plain) == ProbeResult(
        ProbeStatus.REJECTED, hello_retry=True, cipher_suite=0x1301
    )
    short = _server_hello(random=HRR_RANDOM, extensions=[versions, (EXT_ECH, bytes(7))])
    assert judge(probe, short).status is ProbeStatus.INVALID


def test_judge_other_answers() -> None:
    probe = build_probe(SECRET, generate_key(PUBLIC).config)
    tls12 = _server_hello(random=bytes(32), suite=0xC02F, extensions=[])
    result = judge(probe, tls12)
    assert result.status is ProbeStatus.NOT_TLS13
    assert str(result) == "not TLS 1.3 (version 0x0303)"
    not_offered = _server_hello(random=bytes(32), suite=0x1304)
    assert judge(probe, not_offered).status is ProbeStatus.INVALID
    assert judge(probe, b"\x02\x00\x00\x01\x00").status is ProbeStatus.INVALID


def _read(probe: ProbeHello, *chunks: bytes) -> ProbeResult | None:
    reader = ResponseReader(probe)
    result = None
    for chunk in chunks:
        result = reader.feed(chunk)
    return result


def test_response_reader() -> None:
    probe = build_probe(SECRET, generate_key(PUBLIC).config)
    hello = _confirmed_server_hello(probe, 0x1301, "sha256")
    record = b"\x16\x03\x03" + len(hello).to_bytes(2, "big") + hello
    # Byte by byte, and with the rest of a flight after it.
    reader = ResponseReader(probe)
    results = [reader.feed(record[i : i + 1]) for i in range(len(record))]
    assert results[:-1] == [None] * (len(record) - 1)
    assert results[-1] is not None and results[-1].status is ProbeStatus.ACCEPTED
    with pytest.raises(RuntimeError):
        reader.feed(b"more")
    after = _read(probe, record + b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x05hello")
    assert after is not None and after.status is ProbeStatus.ACCEPTED

    alert = _read(probe, b"\x15\x03\x03\x00", b"\x02\x02\x70")
    assert alert == ProbeResult(ProbeStatus.ALERT, alert=112)
    assert str(alert) == "server alert 112 (unrecognized_name)"
    assert ALERT_NAMES[121] == "ech_required"
    http = _read(probe, b"HTTP/1.1 400 Bad Request\r\n")
    assert http is not None and http.status is ProbeStatus.INVALID and "HTTP" in http.detail
    wrong_type = _read(probe, b"\x16\x03\x03\x00\x04\x01\x00\x00\x00")
    assert wrong_type is not None and wrong_type.status is ProbeStatus.INVALID

    partial = ResponseReader(probe)
    assert partial.feed(record[:20]) is None
    assert partial.eof().status is ProbeStatus.NO_ANSWER
    assert "20 bytes" in partial.eof().detail
    assert ResponseReader(probe).eof().detail == "connection closed without an answer"


def test_send_probe_is_bounded() -> None:
    """A server that accepts and says nothing: NO_ANSWER within the timeout."""
    probe = build_probe(SECRET, generate_key(PUBLIC).config)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []

        def accept() -> None:
            server.settimeout(5)
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

        thread = threading.Thread(target=accept)
        thread.start()
        result = send_probe("127.0.0.1", port, probe, timeout=0.5)
        thread.join(5)
        for conn in accepted:
            conn.close()
    assert result.status is ProbeStatus.NO_ANSWER
    assert result.detail == "no answer within 0.5s"


def test_send_probe_connection_refused() -> None:
    probe = build_probe(SECRET, generate_key(PUBLIC).config)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ConnectionRefusedError):
            send_probe("127.0.0.1", port, probe, timeout=2)


# -- against real servers ------------------------------------------------------------


def _config(path: Path) -> ECHConfig:
    return read_key_file(path)[0].config


def _probe(address: tuple[str, int], config: ECHConfig, **options: Any) -> ProbeResult:
    name = options.pop("name", SECRET)
    return send_probe(*address, build_probe(name, config, **options), timeout=10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if find_go() is not None:
        go_binary()
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def pq_key(pki: Pki) -> Path:
    taken = [_config(pki.ech_key).config_id, _config(pki.stale_key).config_id]
    key = generate_key(PUBLIC, kem_id=KEM_MLKEM768_X25519, taken_ids=taken)
    path = pki.ech_key.parent / "ech-pq.pem"
    write_key_file(path, [key], overwrite=True)
    return path


@pytest.fixture(scope="module")
def go_servers(pki: Pki, pq_key: Path) -> Iterator[dict[str, GoBackend]]:
    """Go servers holding the ECH keys themselves (shared mode), and keyless backends."""
    if find_go() is None:
        pytest.skip("Go toolchain not found")
    certs = [pki.pair(SECRET), pki.pair(PUBLIC)]
    keys = [pki.ech_key, pq_key]
    with contextlib.ExitStack() as stack:
        yield {
            "shared": stack.enter_context(GoBackend(certs, ident="shared", ech_keys=keys)),
            "shared_hrr": stack.enter_context(
                GoBackend(certs, ident="shared-hrr", ech_keys=keys, curves=["p256"])
            ),
            "backend": stack.enter_context(GoBackend([pki.pair(SECRET)], ident="backend")),
            "backend_hrr": stack.enter_context(
                GoBackend([pki.pair(SECRET)], ident="backend-hrr", curves=["p256"])
            ),
        }


@pytest.fixture(scope="module")
def front(
    pki: Pki,
    pq_key: Path,
    go_servers: dict[str, GoBackend],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FrontProcess]:
    """``twistd echfront``: secret.example to a keyless Go backend, hrr.* to a P-256-only
    one, private.example to a local pyOpenSSL service."""

    def endpoint(name: str) -> str:
        return f"tcp:host=127.0.0.1:port={go_servers[name].port}"

    config = {
        "public_name": PUBLIC,
        "ech": {"keys": [{"file": str(pki.ech_key)}, {"file": str(pq_key)}]},
        "public": {"cert": str(pki.certs[PUBLIC].combined)},
        "backends": {
            "b": {"endpoint": endpoint("backend")},
            "h": {"endpoint": endpoint("backend_hrr")},
        },
        "locals": {
            "priv": {
                "cert": str(pki.certs[PRIVATE].chain),
                "key": str(pki.certs[PRIVATE].key),
                "factory": "tests.localapp:echo_factory",
                "alpn": ["http/1.1"],
            }
        },
        "routes": [
            {"name": SECRET, "backend": "b"},
            {"name": "hrr.wild.example", "backend": "h"},
            {"name": PRIVATE, "local": "priv"},
        ],
    }
    with FrontProcess(tmp_path_factory.mktemp("front"), config) as proc:
        yield proc


def _address(server: GoBackend | FrontProcess) -> tuple[str, int]:
    if isinstance(server, FrontProcess):
        return "127.0.0.1", server.port
    return server.host, server.port


@pytest.mark.interop
@pytest.mark.parametrize("suite", [0x1301, 0x1302, 0x1303])
def test_go_server_holding_the_key_accepts(
    pki: Pki, pq_key: Path, go_servers: dict[str, GoBackend], suite: int
) -> None:
    """Go computes the §7.2 signal; SHA-384 for TLS_AES_256_GCM_SHA384."""
    shared = _address(go_servers["shared"])
    for key_file in (pki.ech_key, pq_key):
        result = _probe(shared, _config(key_file), cipher_suites=(suite,))
        assert result == ProbeResult(ProbeStatus.ACCEPTED, cipher_suite=suite), key_file


@pytest.mark.interop
def test_go_server_with_other_keys_rejects(pki: Pki, go_servers: dict[str, GoBackend]) -> None:
    result = _probe(_address(go_servers["shared"]), _config(pki.stale_key))
    assert result.status is ProbeStatus.REJECTED and not result.hello_retry


@pytest.mark.interop
def test_go_server_hello_retry_request(pki: Pki, go_servers: dict[str, GoBackend]) -> None:
    """P-256 only against an x25519 key share: a HelloRetryRequest carries the §7.2.1 signal."""
    shared_hrr = _address(go_servers["shared_hrr"])
    accepted = _probe(shared_hrr, _config(pki.ech_key))
    assert accepted.status is ProbeStatus.ACCEPTED and accepted.hello_retry
    rejected = _probe(shared_hrr, _config(pki.stale_key))
    assert rejected.status is ProbeStatus.REJECTED and rejected.hello_retry


@pytest.mark.interop
def test_front_with_keyless_backend(
    pki: Pki, pq_key: Path, front: FrontProcess, go_servers: dict[str, GoBackend]
) -> None:
    """Split mode: the front decrypts, the Go backend confirms from the ClientHelloInner."""
    address = _address(front)
    for key_file in (pki.ech_key, pq_key):
        for suite in (0x1301, 0x1302):
            result = _probe(address, _config(key_file), cipher_suites=(suite,))
            assert result == ProbeResult(ProbeStatus.ACCEPTED, cipher_suite=suite)
    # Each probe reached the backend, which saw the client go away after its
    # ServerHello: the probe completes no handshake (Go logs "handshake: EOF").
    reports = go_servers["backend"].wait_reports(4)
    assert [r.get("error") for r in reports] == ["handshake: EOF"] * 4


@pytest.mark.interop
def test_front_rejects_a_stale_config(pki: Pki, front: FrontProcess) -> None:
    """The rejected hello goes to the local public service (pyOpenSSL): no signal."""
    result = _probe(_address(front), _config(pki.stale_key))
    assert result.status is ProbeStatus.REJECTED and not result.hello_retry


@pytest.mark.interop
def test_front_hello_retry_from_split_mode_backend(pki: Pki, front: FrontProcess) -> None:
    """The keyless backend's HelloRetryRequest carries the signal in its ECH extension."""
    result = _probe(_address(front), _config(pki.ech_key), name="hrr.wild.example")
    assert result.status is ProbeStatus.ACCEPTED and result.hello_retry


@pytest.mark.interop
def test_front_alert_for_a_name_without_route(pki: Pki, front: FrontProcess) -> None:
    result = _probe(_address(front), _config(pki.ech_key), name="nobody.example")
    assert result == ProbeResult(ProbeStatus.ALERT, alert=112)


@pytest.mark.interop
def test_front_local_service_confirms(pki: Pki, front: FrontProcess) -> None:
    """A name the front terminates itself: OpenSSL 4.0, fed the ClientHelloInner, confirms ECH."""
    result = _probe(_address(front), _config(pki.ech_key), name=PRIVATE)
    assert result.status is ProbeStatus.ACCEPTED
