# -*- test-case-name: tests.test_try -*-
"""Running Debian's Chromium for ``echfront try``: profile, flags, page text.

What Chromium 156 needs to use ECH with the demo (tests.test_try checks it):

* **Trust**: Chromium on Linux reads the NSS database ``$HOME/.pki/nssdb``;
  the browser runs with ``HOME`` set to the profile, where ``certutil``
  (Debian's libnss3-tools) has added the demo CA.
* **Secure DNS**: the profile's ``Local State`` sets
  ``dns_over_https.mode = "secure"`` and the template.  Chromium uses ECH
  only with an HTTPS record that came over secure DNS.
* **A name that reaches DNS**: Chromium resolves ``localhost`` and every
  ``*.localhost`` name to loopback by itself and never asks DNS about them,
  so it never sees their HTTPS record and never offers ECH.
  ``--host-resolver-rules=MAP private.localhost private.localhost.echfront.test``
  makes it look the name up as that alias (A, AAAA and HTTPS at
  ``_8443._https.``, RFC 9460 §9.1), which only the DoH endpoint answers;
  the URL, the TLS server name and the certificate stay
  ``private.localhost``.
* As root, ``--no-sandbox``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from echfront.errors import ConfigError

__all__ = [
    "BROWSERS",
    "DNS_SUFFIX",
    "INSTALL_HINT",
    "ChromiumProcess",
    "chromium_command",
    "dns_alias",
    "find_browser",
    "page_text",
    "prepare_profile",
]

#: Executable names of Chromium, Debian's first.
BROWSERS = ("chromium", "chromium-browser")
#: What to install when the browser or certutil is missing (Debian package names).
INSTALL_HINT = "apt-get install chromium libnss3-tools"
#: The DNS-only alias of each demo name (RFC 6761 §6.2: never delegated).
DNS_SUFFIX = "echfront.test"
#: Chromium's flags for a quiet, throw-away run: nothing starts that the
#: page does not need (the DoH endpoint answers NXDOMAIN for anything else).
_QUIET_FLAGS = (
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-gpu",
)
#: Chromium's window: a screenshot holds the page and no more; a window has room.
_HEADLESS_SIZE = (1000, 500)
_WINDOW_SIZE = (1000, 760)
#: Most bytes of page and of diagnostics kept from the browser.
_MAX_PAGE = 1 << 20
_MAX_DIAGNOSTICS = 1 << 16


def dns_alias(name: str) -> str:
    """The name Chromium is made to look up for ``name`` (see the module docstring)."""
    return f"{name}.{DNS_SUFFIX}"


def find_browser(explicit: str | None = None) -> str | None:
    """The browser executable: ``explicit`` if it runs, else Chromium on $PATH."""
    if explicit is not None:
        return shutil.which(explicit)
    for name in BROWSERS:
        if (found := shutil.which(name)) is not None:
            return found
    return None


def prepare_profile(
    profile: Path, ca_cert: Path, doh_template: str, certutil: str, timeout: float = 30.0
) -> None:
    """Make ``profile`` a Chromium user-data directory and HOME for one run.

    :raises ConfigError: when certutil fails (its message, one line).
    """
    nssdb = profile / ".pki" / "nssdb"
    nssdb.mkdir(parents=True, mode=0o700)
    database = f"sql:{nssdb}"
    for command in (
        [certutil, "-N", "-d", database, "--empty-password"],
        [certutil, "-A", "-d", database, "-n", "echfront demo CA", "-t", "C,,", "-i", str(ca_cert)],
    ):
        try:
            done = subprocess.run(  # noqa: S603 (a fixed argument vector, no shell)
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ConfigError(f"certutil failed: {error}") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise ConfigError(f"certutil failed: {detail[-1] if detail else done.returncode}")
    # Chromium keeps browser-wide preferences, secure DNS among them, in
    # "Local State" at the top of the user-data directory.
    local_state = {"dns_over_https": {"mode": "secure", "templates": doh_template}}
    (profile / "Local State").write_text(json.dumps(local_state), encoding="utf-8")


def chromium_command(
    browser: str,
    profile: Path,
    url: str,
    names: Sequence[str],
    *,
    headless: bool,
    screenshot: Path | None = None,
    window_size: tuple[int, int] | None = None,
    as_root: bool = False,
) -> list[str]:
    """Chromium's argument vector for loading ``url`` with ``names`` looked up by alias."""
    rules = ", ".join(f"MAP {name} {dns_alias(name)}" for name in names)
    args = [browser, *_QUIET_FLAGS, f"--user-data-dir={profile}", f"--host-resolver-rules={rules}"]
    if as_root:
        args.append("--no-sandbox")  # Chromium refuses to start its sandbox as root
    width, height = window_size or (_HEADLESS_SIZE if headless else _WINDOW_SIZE)
    args.append(f"--window-size={width},{height}")
    if headless:
        args += ["--headless", "--dump-dom"]
        if screenshot is not None:
            args.append(f"--screenshot={screenshot}")
    else:
        args.append("--new-window")
    args.append(url)
    return args


class _PageText(HTMLParser):
    """Headings, paragraphs and ``th: td`` rows of a page, one per line."""

    _BLOCKS = frozenset({"h1", "h2", "h3", "p", "li", "div"})

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._cells: list[str] = []
        self._text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script", "title"):
            self._skip += 1
        elif tag in ("th", "td"):
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "title"):
            self._skip -= 1
        elif tag in ("th", "td"):
            self._cells.append("".join(self._text).strip())
            self._text = []
        elif tag == "tr":
            if self._cells:
                head, *rest = self._cells
                self.lines.append(f"  {head + ':':<28} {' '.join(rest)}".rstrip())
            self._cells = []
        elif tag in self._BLOCKS and (text := "".join(self._text).strip()):
            self.lines.append(text)
            self._text = []

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._text.append(data)


def page_text(document: str) -> str:
    """The readable text of the status page (or any simple page)."""
    parser = _PageText()
    parser.feed(document)
    parser.close()
    return "\n".join(parser.lines)


class ChromiumProcess(ProcessProtocol):
    """Collects a browser's output (bounded) and fires ``ended`` with its exit status."""

    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.ended: Deferred[int | None] = Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        """Keep the first MiB of the page."""
        self.stdout += data[: _MAX_PAGE - len(self.stdout)]

    def errReceived(self, data: bytes) -> None:
        """Keep the last 64 KiB of diagnostics (stderr)."""
        self.stderr = (self.stderr + data)[-_MAX_DIAGNOSTICS:]

    def processEnded(self, reason: Failure) -> None:
        """The browser is gone (exit status, or None when killed by a signal)."""
        self.running = False
        self.ended.callback(getattr(reason.value, "exitCode", None))
