"""BoringSSL as a real ECH client, through curl_cffi (libcurl-impersonate).

The test-suite uses this module to send genuine Encrypted Client Hello
handshakes (RFC 9849) produced by BoringSSL, shaped like a real browser's
(``impersonate="chrome136"``: ech_outer_extensions compression with GREASE
extension types, an X25519MLKEM768 key share, ...).

Every request runs in a **separate Python process** (this file run as a
script, printing one JSON object on stdout), so that:

* a blocking ``curl_easy_perform`` never stalls a Twisted reactor running in
  the test process;
* a crash inside the native library cannot take the test process down.

Use :func:`fetch` from synchronous code (it blocks on the subprocess; from
a trial test, run it with ``deferToThread``), or :func:`fetch_args` plus
:func:`parse_output` to spawn the child yourself (e.g. with
``reactor.spawnProcess(proto, args[0], args, env=None)``; on POSIX
``env=None`` inherits ``os.environ``).

How ECH is requested: ``CURLOPT_ECH`` is first set to ``"hard"`` and then to
``"ecl:<base64 ECHConfigList>"`` (libcurl ORs the two).  ``hard`` matters:
without it a config list that BoringSSL refuses to load is silently
dropped and the request goes out *without* ECH, and curl >= 8.23 (curl_cffi
0.17) retries a rejected ECH without ECH when the server sends no
retry_configs.  With ``hard``, a server that rejects ECH makes BoringSSL
send an ``ech_required`` alert and curl fail with :data:`CURLE_ECH_REQUIRED`
(101) and a message containing :data:`ECH_REJECTED_MARKER`; see
:attr:`FetchResult.ech_rejected`.  Since BoringSSL never completes a
handshake whose ECH was rejected, a successful request that was given an
ECHConfigList proves ECH was accepted.

This module imports nothing from curl_cffi at import time: only the child
process loads the native library.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import importlib.metadata
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CURLE_ECH_REQUIRED",
    "CURLE_NOT_BUILT_IN",
    "CURLE_OPERATION_TIMEDOUT",
    "CURLE_PEER_FAILED_VERIFICATION",
    "CURLE_SSL_CONNECT_ERROR",
    "CURLE_UNKNOWN_OPTION",
    "DEFAULT_IMPERSONATE",
    "ECH_REJECTED_MARKER",
    "HARNESS_ERROR",
    "FetchResult",
    "HttpVersion",
    "curl_available",
    "fetch",
    "fetch_args",
    "main",
    "parse_output",
    "script_path",
]

#: Browser fingerprint used unless told otherwise (Chrome 136: ECH with
#: outer-extension compression, GREASE, X25519MLKEM768 key share).
DEFAULT_IMPERSONATE = "chrome136"

#: curl error for "ECH required": BoringSSL's ECH was rejected by the server
#: (CURLE_ECH_REQUIRED).
CURLE_ECH_REQUIRED = 101
#: curl error for a TLS handshake failure (CURLE_SSL_CONNECT_ERROR).
CURLE_SSL_CONNECT_ERROR = 35
#: curl error for a peer certificate that failed verification
#: (CURLE_PEER_FAILED_VERIFICATION).
CURLE_PEER_FAILED_VERIFICATION = 60
#: curl error for a timeout (CURLE_OPERATION_TIMEDOUT).
CURLE_OPERATION_TIMEDOUT = 28
#: curl error when libcurl was built without ECH (CURLE_NOT_BUILT_IN).
CURLE_NOT_BUILT_IN = 4
#: curl error for an option libcurl does not know (CURLE_UNKNOWN_OPTION).
CURLE_UNKNOWN_OPTION = 48
#: ``FetchResult.error_code`` when the child process itself failed (crashed,
#: timed out, printed no JSON); not a curl error number.
HARNESS_ERROR = -1

#: BoringSSL's reason string in the curl error message when ECH was rejected.
ECH_REJECTED_MARKER = "ECH_REJECTED"

HttpVersion = Literal["1.1", "2"]

_HTTP_VERSION_NAMES = {1: "1.0", 2: "1.1", 3: "2", 30: "3"}
# Seconds the child process gets on top of the request timeout (interpreter
# start-up and the import of curl_cffi).
_SPAWN_GRACE = 20.0


@dataclass(frozen=True)
class FetchResult:
    """Outcome of one request made by BoringSSL through curl_cffi.

    ``error_code`` is curl's error number (``CURLE_*``; 0 on success) or
    :data:`HARNESS_ERROR` when the child process failed.  ``ech_log`` holds
    libcurl's verbose lines that mention ECH, for diagnostics.
    """

    ok: bool
    status: int | None
    body: bytes
    http_version: str | None
    error_code: int
    error: str
    ech_log: tuple[str, ...] = field(default=())

    @property
    def ech_rejected(self) -> bool:
        """Whether BoringSSL aborted the handshake because ECH was rejected."""
        return self.error_code == CURLE_ECH_REQUIRED and ECH_REJECTED_MARKER in self.error


def script_path() -> str:
    """Return the absolute path of this file, which the child process runs."""
    return os.path.abspath(__file__)


def _python_argv(python: str | None) -> list[str]:
    # -P (Python >= 3.11): do not put tests/ on sys.path, so no test module
    # can shadow a standard-library module in the child.
    return [python or sys.executable, "-P", script_path()]


def fetch_args(
    url: str,
    *,
    ech_config_list: bytes | None,
    resolve: Sequence[str] = (),
    cafile: str | None = None,
    impersonate: str | None = DEFAULT_IMPERSONATE,
    timeout: float = 10.0,
    http_version: HttpVersion | None = None,
    headers: Sequence[str] = (),
    verify: bool = True,
    python: str | None = None,
) -> list[str]:
    """Build the argv of a child process that performs one request.

    ``args[0]`` is the interpreter to execute.  The child prints one JSON
    object on stdout; decode it with :func:`parse_output`.  The parameters
    are those of :func:`fetch`; ``python`` overrides the interpreter
    (default: :data:`sys.executable`).
    """
    args = [*_python_argv(python), "--url", url, "--timeout", repr(float(timeout))]
    if ech_config_list is not None:
        args += ["--ech-config-list", base64.b64encode(ech_config_list).decode("ascii")]
    for entry in resolve:
        args += ["--resolve", entry]
    if cafile is not None:
        args += ["--cafile", cafile]
    args += ["--impersonate", impersonate or ""]
    if http_version is not None:
        args += ["--http-version", http_version]
    for header in headers:
        args += ["--header", header]
    if not verify:
        args.append("--insecure")
    return args


def _harness_error(message: str) -> FetchResult:
    return FetchResult(
        ok=False,
        status=None,
        body=b"",
        http_version=None,
        error_code=HARNESS_ERROR,
        error=message,
    )


def _tail(data: bytes, limit: int = 2000) -> str:
    return data[-limit:].decode("utf-8", "replace").strip()


def parse_output(stdout: bytes, stderr: bytes = b"", returncode: int | None = 0) -> FetchResult:
    """Decode what a child process started from :func:`fetch_args` produced.

    A child that crashed, printed no JSON or exited with a non-zero code
    gives a result with ``error_code`` :data:`HARNESS_ERROR`.
    """
    lines = stdout.strip().splitlines()
    if returncode != 0 or not lines:
        return _harness_error(
            f"BoringSSL client process exited with {returncode}: {_tail(stderr) or '(no stderr)'}"
        )
    try:
        data = json.loads(lines[-1])
        return FetchResult(
            ok=bool(data["ok"]),
            status=None if data["status"] is None else int(data["status"]),
            body=base64.b64decode(data["body"]),
            http_version=None if data["http_version"] is None else str(data["http_version"]),
            error_code=int(data["error_code"]),
            error=str(data["error"]),
            ech_log=tuple(str(line) for line in data["ech_log"]),
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        return _harness_error(f"unreadable output from the BoringSSL client process: {e!r}")


def fetch(
    url: str,
    *,
    ech_config_list: bytes | None,
    resolve: Sequence[str] = (),
    cafile: str | None = None,
    impersonate: str | None = DEFAULT_IMPERSONATE,
    timeout: float = 10.0,
    http_version: HttpVersion | None = None,
    headers: Sequence[str] = (),
    verify: bool = True,
    python: str | None = None,
) -> FetchResult:
    """Perform one GET request with BoringSSL, in a child process.

    ``ech_config_list`` is a serialized ECHConfigList (with its 2-byte
    length prefix); ``None`` leaves ECH to the impersonated browser, which
    for Chrome means a GREASE ECH extension.  ``resolve`` takes curl's
    ``host:port:address`` entries (CURLOPT_RESOLVE).  ``cafile`` is a PEM
    bundle of trust anchors (default: certifi's).  ``impersonate`` is a
    curl_cffi target (``None`` or ``""``: plain libcurl ClientHello).
    ``http_version`` restricts ALPN to HTTP/1.1 (``"1.1"``) or asks for
    HTTP/2 (``"2"``); by default the impersonated browser's choice applies.
    ``headers`` are extra ``"Name: value"`` request headers; ``verify=False``
    disables certificate and host name verification.

    Blocks for up to ``timeout`` plus a start-up grace period; never raises
    for network or TLS failures (see :class:`FetchResult`).
    """
    args = fetch_args(
        url,
        ech_config_list=ech_config_list,
        resolve=resolve,
        cafile=cafile,
        impersonate=impersonate,
        timeout=timeout,
        http_version=http_version,
        headers=headers,
        verify=verify,
        python=python,
    )
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout + _SPAWN_GRACE,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return _harness_error(
            f"BoringSSL client process did not finish within {timeout + _SPAWN_GRACE:.0f} s"
        )
    return parse_output(proc.stdout, proc.stderr, proc.returncode)


@functools.cache
def curl_available(impersonate: str | None = DEFAULT_IMPERSONATE) -> str | None:
    """Tell whether the BoringSSL ECH client can be used here.

    Returns ``None`` when it can, else the reason, suitable for
    ``pytest.skip``.  The check runs in a child process (cached per
    ``impersonate``): curl_cffi must import, its libcurl must be built on
    BoringSSL with ECH support and know the ``impersonate`` target.
    """
    args = [*_python_argv(None), "--probe", "--impersonate", impersonate or ""]
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "probing curl_cffi timed out"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return f"probing curl_cffi failed ({proc.returncode}): {_tail(proc.stderr)}"
    try:
        data = json.loads(lines[-1])
        reason = data["reason"]
    except (ValueError, KeyError, TypeError) as e:
        return f"probing curl_cffi gave unreadable output: {e!r}"
    return None if reason is None else str(reason)


# --- child process -----------------------------------------------------------


def _probe(impersonate: str) -> str | None:
    """Check curl_cffi in this (child) process; the reason it is unusable."""
    try:
        # Imported here only: the test process must never load libcurl.
        from curl_cffi.const import CurlOpt  # noqa: PLC0415
        from curl_cffi.curl import Curl, CurlError  # noqa: PLC0415
    except ImportError as e:
        return f"curl_cffi is not installed: {e}"
    package = f"curl_cffi {importlib.metadata.version('curl_cffi')}"
    if not hasattr(CurlOpt, "ECH"):
        return f"{package} has no CURLOPT_ECH"
    curl = Curl()
    try:
        curl_version = curl.version().decode("ascii", "replace")
        if "BoringSSL" not in curl_version:
            return f"{package}: libcurl is not built on BoringSSL: {curl_version}"
        if impersonate and curl.impersonate(impersonate) != 0:
            return f"{package} cannot impersonate {impersonate!r}"
        try:
            curl.setopt(CurlOpt.ECH, "hard")
        except CurlError as e:
            return f"{package}: libcurl ({curl_version}) refuses CURLOPT_ECH: {e}"
    finally:
        curl.close()
    return None


def _strip_curl_cffi_message(message: str, code: int) -> str:
    """Reduce curl_cffi's wrapped error text to libcurl's own message."""
    marker = f"curl: ({code}) "
    start = message.find(marker)
    if start >= 0:
        message = message[start + len(marker) :]
    end = message.find(" See https://curl.se/libcurl")
    if end >= 0:
        message = message[:end]
    return message.removesuffix(".").strip()


class _SetupError(Exception):
    """The request could not be set up (not a curl error)."""


def _perform(ns: argparse.Namespace) -> dict[str, Any]:
    """Perform the request described by the command line; a JSON-able dict."""
    from curl_cffi.const import CurlHttpVersion, CurlInfo, CurlOpt  # noqa: PLC0415
    from curl_cffi.curl import Curl, CurlError  # noqa: PLC0415

    ech_log: list[str] = []

    def on_debug(kind: int, data: bytes) -> None:
        # kind 0 is CURLINFO_TEXT, libcurl's informational lines.
        if kind == 0 and len(ech_log) < 200:
            text = data.decode("utf-8", "replace").strip()
            if "ECH" in text:
                ech_log.append(text)

    body = io.BytesIO()
    error_code, error = 0, ""
    status = version = 0
    curl = Curl(cacert=ns.cafile or "")
    try:
        if ns.impersonate and curl.impersonate(ns.impersonate) != 0:
            raise _SetupError(f"unknown impersonate target {ns.impersonate!r}")
        if ns.ech_config_list is not None:
            # "hard" first: a config BoringSSL cannot load, or a rejected ECH,
            # must fail the request instead of silently going without ECH.
            curl.setopt(CurlOpt.ECH, "hard")
            curl.setopt(CurlOpt.ECH, "ecl:" + ns.ech_config_list)
        curl.setopt(CurlOpt.URL, ns.url)
        if ns.resolve:
            curl.setopt(CurlOpt.RESOLVE, list(ns.resolve))
        curl.setopt(CurlOpt.NOPROXY, "*")
        curl.setopt(CurlOpt.TIMEOUT_MS, max(1, int(ns.timeout * 1000)))
        curl.setopt(CurlOpt.CONNECTTIMEOUT_MS, max(1, int(ns.timeout * 1000)))
        if ns.http_version == "1.1":
            curl.setopt(CurlOpt.HTTP_VERSION, CurlHttpVersion.V1_1)
        elif ns.http_version == "2":
            curl.setopt(CurlOpt.HTTP_VERSION, CurlHttpVersion.V2_0)
        if ns.header:
            curl.setopt(CurlOpt.HTTPHEADER, [h.encode() for h in ns.header])
        if ns.insecure:
            curl.setopt(CurlOpt.SSL_VERIFYPEER, 0)
            curl.setopt(CurlOpt.SSL_VERIFYHOST, 0)
        curl.setopt(CurlOpt.WRITEDATA, body)
        curl.setopt(CurlOpt.VERBOSE, 1)
        curl.setopt(CurlOpt.DEBUGFUNCTION, on_debug)
        try:
            curl.perform()
        finally:
            status = int(curl.getinfo(CurlInfo.RESPONSE_CODE))  # type: ignore[arg-type]
            version = int(curl.getinfo(CurlInfo.HTTP_VERSION))  # type: ignore[arg-type]
    except CurlError as e:  # from setopt (e.g. ECH not built in) or perform
        error_code = int(e.code)
        error = _strip_curl_cffi_message(str(e), error_code)
        if not error:  # libcurl sometimes leaves its error buffer empty
            error = ech_log[-1] if ech_log else f"curl error {error_code}"
    except _SetupError as e:
        error_code, error = HARNESS_ERROR, str(e)
    finally:
        curl.close()
    return {
        "ok": error_code == 0,
        "status": status or None,
        "body": base64.b64encode(body.getvalue()).decode("ascii"),
        "http_version": _HTTP_VERSION_NAMES.get(version),
        "error_code": error_code,
        "error": error,
        "ech_log": ech_log,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the child process: one request (or a probe), one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--probe", action="store_true", help="only check that curl_cffi is usable")
    parser.add_argument("--url")
    parser.add_argument("--ech-config-list", help="base64 ECHConfigList")
    parser.add_argument("--resolve", action="append", default=[], help="host:port:address")
    parser.add_argument("--cafile")
    parser.add_argument("--impersonate", default=DEFAULT_IMPERSONATE)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--http-version", choices=["1.1", "2"])
    parser.add_argument("--header", action="append", default=[], help='"Name: value"')
    parser.add_argument("--insecure", action="store_true")
    ns = parser.parse_args(argv)
    if ns.probe:
        result: dict[str, Any] = {"reason": _probe(ns.impersonate)}
    elif not ns.url:
        parser.error("--url is required")
    else:
        result = _perform(ns)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
