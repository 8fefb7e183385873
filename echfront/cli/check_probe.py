# -*- test-case-name: tests.test_check,tests.test_probe -*-
"""``echfront check``, step 3: whether the front accepts ECH with each published config.

For each config in DNS, a real ClientHelloOuter for NAME
(:func:`echfront.ech.probe.build_probe`) is sent on its own connection to
the record's endpoint, and the first handshake message says whether ECH
was accepted (RFC 9849 §6.1.4): the backend, or the front's local service,
confirmed the decrypted ClientHelloInner.

:func:`send_probe` is the blocking socket I/O around the sans-IO
:class:`~echfront.ech.probe.ResponseReader`; it lives here, with the
command line, so that :mod:`echfront.ech` stays free of I/O.
"""

from __future__ import annotations

import socket
import time

from echfront.cli.check_dns import Endpoint, Lookup, addresses
from echfront.cli.check_findings import Findings, one_line
from echfront.dns.verify import join_host_port, name_text
from echfront.ech.echconfig import ECHConfig
from echfront.ech.probe import (
    ProbeError,
    ProbeHello,
    ProbeResult,
    ProbeStatus,
    ResponseReader,
    build_probe,
)
from echfront.tls.records import MAX_CIPHERTEXT

__all__ = ["MAX_ADDRESSES", "probe_all", "send_probe"]

#: Addresses probed per endpoint, so a large record set stays quick.
MAX_ADDRESSES = 4
_SUITE_NAMES = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
}


def send_probe(host: str, port: int, probe: ProbeHello, *, timeout: float) -> ProbeResult:
    """Connect, send ``probe`` and judge the answer; a blocking helper.

    The whole exchange, connecting included, is bounded by ``timeout``
    seconds.  Reading stops at the first handshake message and the socket
    is closed without an alert.

    :raises OSError: if the connection cannot be made.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(probe.records)
        reader = ResponseReader(probe)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                data = sock.recv(MAX_CIPHERTEXT)
            except TimeoutError:
                break
            except ConnectionResetError:
                return ProbeResult(ProbeStatus.NO_ANSWER, "connection reset by the server")
            if not data:
                return reader.eof()
            result = reader.feed(data)
            if result is not None:
                return result
    return ProbeResult(ProbeStatus.NO_ANSWER, f"no answer within {timeout:g}s")


def probe_all(
    name: str,
    lookup: Lookup,
    endpoints: list[Endpoint],
    findings: Findings,
    *,
    connect: tuple[str, int | None] | None,
    timeout: float,
) -> None:
    """Step 3: one probe per (config, address), each on its own connection.

    :param connect: ``--connect``: probe this host (and port, else the
        record's) instead of the records' targets.
    :param timeout: bound on each probe, connecting included.
    """
    seen: set[tuple[bytes, str, int]] = set()
    for endpoint in endpoints:
        if not endpoint.configs:
            continue
        if connect is not None:
            host, given_port = connect
            hosts, port = [host], given_port or endpoint.port
        else:
            hosts, port = addresses(lookup, endpoint, findings), endpoint.port
        unreachable: set[str] = set()
        for config in endpoint.configs:
            for host in hosts[:MAX_ADDRESSES]:
                key = (config.encode(), host, port)
                if key in seen or host in unreachable:
                    continue
                seen.add(key)
                if not _probe_one(
                    name, config, host=host, port=port, timeout=timeout, findings=findings
                ):
                    unreachable.add(host)
        if len(hosts) > MAX_ADDRESSES:
            findings.warning(
                f"{name_text(endpoint.target)} has {len(hosts)} addresses; probed the first "
                f"{MAX_ADDRESSES}"
            )


def _probe_one(
    name: str, config: ECHConfig, *, host: str, port: int, timeout: float, findings: Findings
) -> bool:
    """Probe one config at one address; False if the address cannot be reached."""
    where = join_host_port(host, port)
    label = f"config_id {config.config_id} ({config.kem_name})"
    try:
        probe = build_probe(name, config)
    except ProbeError as error:
        findings.warning(f"cannot probe {label}: {error}")
        return True
    try:
        result = send_probe(host, port, probe, timeout=timeout)
    except OSError as error:
        reason = error.strerror or one_line(error)
        findings.error(f"cannot connect to {where}: {reason}")
        return False
    how = "HelloRetryRequest" if result.hello_retry else "ServerHello"
    suite = _SUITE_NAMES.get(result.cipher_suite or 0, "")
    if result.status is ProbeStatus.ACCEPTED:
        findings.ok(f"{where} accepted ECH with {label} for {name} ({how}, {suite})")
    elif result.status is ProbeStatus.REJECTED:
        findings.error(
            f"{where} rejected ECH with {label} for {name} ({how}): the server there cannot "
            "decrypt this config"
        )
    elif result.status is ProbeStatus.ALERT:
        findings.error(f"{where} answered {label} for {name} with {result}")
    else:
        findings.error(f"{where} with {label} for {name}: {result}")
    return True
