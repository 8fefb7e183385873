# -*- test-case-name: tests.test_try -*-
"""``echfront try``: ECH accepted by a real browser, in one command.

It starts the demo front (:mod:`echfront.app.demo`) on 127.0.0.1, or uses
one already running there with the same state directory, serves a
DNS-over-HTTPS endpoint (:mod:`echfront.dns.dohserver`) whose HTTPS records
carry the front's ECHConfigList, and starts Debian's Chromium with a
throw-away profile that trusts the demo CA and resolves only through that
endpoint.  Chromium then loads ``https://private.localhost:8443/``, whose
page says whether ECH was accepted and what the front saw.  With a display
the page opens in a window; without one Chromium runs headless and the
page's text is printed.  What Chromium needs for that is in
:mod:`echfront.app.chromium`.

The DoH endpoint listens on its own ephemeral loopback port, in this
process, rather than on the demo's public service: production fronts never
grow a DNS endpoint, it works the same whether this command started the
front or found one running, and a port picked by the kernel cannot collide.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from echfront.app.certs import TestCA
from echfront.app.chromium import (
    DNS_SUFFIX,
    INSTALL_HINT,
    ChromiumProcess,
    chromium_command,
    dns_alias,
    find_browser,
    page_text,
    prepare_profile,
)
from echfront.app.demo import (
    DEMO_PORT,
    PRIVATE_NAME,
    PUBLIC_NAME,
    default_state_dir,
    demo_config,
)
from echfront.config.build import build_state
from echfront.config.schema import Config
from echfront.dns.dohserver import BoundedRequest, DoHResource, Zone, demo_zone
from echfront.ech.decoder import ECHDecoder
from echfront.errors import ConfigError
from echfront.front.protocol import FrontFactory
from echfront.front.tlsoptions import load_certificate_options
from echfront.web import QuietSite

__all__ = [
    "TryOptions",
    "add_try_parser",
    "demo_front",
    "probe_running_front",
    "run_try",
    "try_browser",
]

#: Most bytes read from a running front's origin-svcb document.
_MAX_PROBE = 1 << 16
#: The exit status after Ctrl-C, as a shell reports SIGINT (128 + 2).
_INTERRUPTED = 130
_PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class TryOptions:
    """What ``echfront try`` was asked for.

    :ivar headless: None: headless exactly when no display is set.
    :ivar screenshot: also save a PNG of the page here (headless only).
    :ivar timeout: seconds a headless browser may take to load the page.
    """

    state_dir: Path
    port: int = DEMO_PORT
    browser: str | None = None
    headless: bool | None = None
    screenshot: Path | None = None
    timeout: float = 60.0

    def is_headless(self, environ: Mapping[str, str]) -> bool:
        """Headless when asked, when a screenshot is wanted, or when there is no display."""
        if self.headless is not None or self.screenshot is not None:
            return bool(self.headless) or self.screenshot is not None
        return not (environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


def probe_running_front(port: int, ca_cert: Path, timeout: float = _PROBE_TIMEOUT) -> bytes | None:
    """The ECHConfigList of the demo front already on 127.0.0.1:``port``, or None if none is.

    It must present the demo CA's certificate for the public name and serve
    ``/.well-known/origin-svcb`` (draft-ietf-tls-wkech).

    :raises ConfigError: when something else holds the port.
    """
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionRefusedError:
        return None
    except OSError as error:
        raise ConfigError(f"127.0.0.1:{port}: {error.strerror or error}") from None
    context = ssl.create_default_context(cafile=str(ca_cert))
    request = (
        f"GET /.well-known/origin-svcb HTTP/1.1\r\nHost: {PUBLIC_NAME}:{port}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    try:
        with context.wrap_socket(raw, server_hostname=PUBLIC_NAME) as tls:
            tls.sendall(request)
            response = b""
            while len(response) < _MAX_PROBE and (chunk := tls.recv(65536)):
                response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise ValueError(head.split(b"\r\n", 1)[0].decode("latin-1") or "no response")
        ech = json.loads(body)["endpoints"][0]["params"]["ech"]
        return base64.b64decode(ech, validate=True)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise ConfigError(
            f"127.0.0.1:{port} is in use, but not by the demo front of this state "
            f"directory ({error}); stop it or pass --port"
        ) from None


class _Session:
    """One run: the listeners, the profile and the browser, and their clean-up."""

    def __init__(self, reactor: Any, out: TextIO) -> None:
        self.reactor = reactor
        self.out = out
        self.ports: list[IListeningPort] = []
        self.profile: Path | None = None
        self.browser: ChromiumProcess | None = None
        self.interrupted = False
        self._trigger = reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)

    async def listen(self, endpoint: IStreamServerEndpoint, factory: Any) -> IListeningPort:
        """Listen on ``endpoint``; the port is closed by :meth:`close`."""
        port: IListeningPort = await endpoint.listen(factory)
        self.ports.append(port)
        return port

    def _shutdown(self) -> Deferred[None]:
        """The reactor is stopping (Ctrl-C): end the run, and say so."""
        self.interrupted = True
        return self.close()

    def close(self) -> Deferred[None]:
        """Stop the browser (SIGTERM, then SIGKILL), the listeners, and remove the profile.

        Safe to call twice: at the end of a run and at reactor shutdown.
        """
        done: Deferred[None] = Deferred()
        browser = self.browser
        if browser is not None and browser.running:
            transport = browser.transport
            assert transport is not None
            transport.signalProcess("TERM")
            kill = self.reactor.callLater(5.0, transport.signalProcess, "KILL")
            browser.ended.addBoth(lambda _: kill.cancel() if kill.active() else None)
            browser.ended.addBoth(lambda _: self._release(done))
        else:
            self._release(done)
        return done

    def _release(self, done: Deferred[None]) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()
        if self.profile is not None:
            try:
                shutil.rmtree(self.profile)
            except OSError as error:
                self.out.write(f"echfront try: could not remove {self.profile}: {error}\n")
            self.profile = None
        if self._trigger is not None:
            self.reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        done.callback(None)


def demo_front(config: Config, reactor: Any) -> tuple[FrontFactory, Callable[[], bytes]]:
    """The demo front as ``twistd echfront`` serves it (without its listeners).

    :returns: the connection factory, and a function returning the
        ECHConfigList it publishes.
    :raises ConfigError: for unusable demo files.
    """
    decoder: list[ECHDecoder] = []
    state = build_state(replace(config, listen=()), reactor, lambda: decoder[0].keys)
    decoder.append(state.decoder)

    def config_list() -> bytes:
        return decoder[0].keys.retry_config_list or b""

    return FrontFactory(state, reactor), config_list


def _zone_for(config_list: bytes, port: int) -> Zone:
    names = (PUBLIC_NAME, PRIVATE_NAME)
    return demo_zone(
        ("localhost", DNS_SUFFIX),
        [*names, *(dns_alias(name) for name in names)],
        config_list,
        port=port,
    )


async def try_browser(
    reactor: Any,
    options: TryOptions,
    out: TextIO,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run the demo in a browser; the exit status (0: the page says ECH was accepted).

    :raises ConfigError: for anything that stops the run before the browser starts.
    """
    environ = dict(os.environ if environ is None else environ)
    browser_path = find_browser(options.browser)
    certutil = shutil.which("certutil")
    if browser_path is None or certutil is None:
        missing = "Chromium" if browser_path is None else "certutil"
        raise ConfigError(f"{missing} not found; install it: {INSTALL_HINT}")
    config, _lines = demo_config(options.state_dir, options.port)
    ca = TestCA(options.state_dir)
    session = _Session(reactor, out)
    try:
        running = probe_running_front(options.port, ca.cert_path)
        if running is None:
            factory, config_list = demo_front(config, reactor)
            endpoint = TCP4ServerEndpoint(reactor, options.port, interface="127.0.0.1")
            await session.listen(endpoint, factory)
            where = "started here"
        else:
            where = "already running"

            def config_list() -> bytes:
                return running

        zones: dict[bytes, Zone] = {}

        def zone() -> Zone:
            current = config_list()
            if current not in zones:
                zones.clear()
                zones[current] = _zone_for(current, options.port)
            return zones[current]

        doh_cert = ca.issue(["localhost"])
        tls = load_certificate_options(doh_cert.chain, doh_cert.key, alpn=("http/1.1",))
        root = Resource()
        root.putChild(b"dns-query", DoHResource(zone))
        site = QuietSite(root, reactor=reactor)  # type: ignore[no-untyped-call]
        site.requestFactory = BoundedRequest
        site.displayTracebacks = False
        doh = await session.listen(SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1"), site)
        doh_port = cast(IPv4Address, doh.getHost()).port
        doh_template = f"https://localhost:{doh_port}/dns-query{{?dns}}"
        url = f"https://{PRIVATE_NAME}:{options.port}/"
        headless = options.is_headless(environ)
        out.write(
            f"echfront try: demo front on https://127.0.0.1:{options.port}/ ({where}), "
            f"DNS over HTTPS at {doh_template}\n"
        )
        session.profile = Path(tempfile.mkdtemp(prefix="echfront-try-"))
        prepare_profile(session.profile, ca.cert_path, doh_template, certutil)
        argv = chromium_command(
            browser_path,
            session.profile,
            url,
            (PUBLIC_NAME, PRIVATE_NAME),
            headless=headless,
            screenshot=options.screenshot,
            as_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        )
        home = str(session.profile)
        # Everything Chromium writes, temporary files included, stays in the
        # profile and goes with it.
        env = {
            **environ,
            "HOME": home,
            "XDG_CONFIG_HOME": home,
            "XDG_CACHE_HOME": home,
            "TMPDIR": home,
        }
        session.browser = browser = ChromiumProcess()
        reactor.spawnProcess(browser, browser_path, argv, env=env)
        if not headless:
            out.write(f"echfront try: Chromium shows {url}; close its window to stop\n")
            out.flush()
            await browser.ended
            return _INTERRUPTED if session.interrupted else 0
        out.write(f"echfront try: headless Chromium loads {url}\n")
        out.flush()
        timer = reactor.callLater(options.timeout, session.close)
        status = await browser.ended
        timed_out = not timer.active()
        if not timed_out:
            timer.cancel()
        if session.interrupted:
            return _INTERRUPTED
        if timed_out:
            raise ConfigError(f"Chromium did not load the page within {options.timeout:g}s")
        return _report(browser, status, options.screenshot, out)
    finally:
        await session.close()


#: The error code on Chromium's network error page ("ERR_NAME_NOT_RESOLVED"),
#: past the template markers its renderer leaves in the dumped DOM.
_ERROR_PAGE_CODE = re.compile(r'class="error-code">(?:\s|<!--.*?-->)*(?:net::)?(ERR_[A-Z0-9_]+)')


def _report(
    browser: ChromiumProcess, status: int | None, screenshot: Path | None, out: TextIO
) -> int:
    """Print the page and say whether ECH was accepted."""
    document = browser.stdout.decode("utf-8", "replace")
    failed_load = _ERROR_PAGE_CODE.search(document)
    if failed_load is not None:
        # Chromium's own error page (newer versions dump it, where older
        # ones printed nothing): its error code is the verdict.
        raise ConfigError(f"Chromium showed no page: net::{failed_load.group(1)}")
    text = page_text(document)
    if not text:
        lines = [line for line in browser.stderr.decode("utf-8", "replace").splitlines() if line]
        # Chromium's own verdict (a FATAL line, or "Page load failed:
        # net::ERR_...") says most; the rest is noise from a headless start.
        errors = [
            line.rpartition("] ")[2] for line in lines if ":FATAL:" in line or "net::ERR_" in line
        ]
        reason = (errors or lines or [f"exit status {status}"])[-1]
        raise ConfigError(f"Chromium showed no page: {reason}")
    out.write(text + "\n")
    if screenshot is not None:
        if not screenshot.exists():
            raise ConfigError(f"Chromium wrote no screenshot to {screenshot}")
        out.write(f"echfront try: screenshot saved to {screenshot}\n")
    if text.splitlines()[0] != "ECH accepted":
        out.write("echfront try: the page does not say ECH was accepted\n")
        return 1
    return 0


def add_try_parser(commands: Any) -> None:
    """Register ``echfront try`` on the CLI's subcommand parsers."""
    parser = commands.add_parser(
        "try",
        help="see ECH work in a browser: the demo front, DNS over HTTPS and Chromium",
        description="Start the demo front on 127.0.0.1 (or use the one already running "
        "there), serve its ECHConfigList over DNS over HTTPS, and load "
        f"https://{PRIVATE_NAME}:{DEMO_PORT}/ in Debian's Chromium with a throw-away profile "
        "that trusts the demo CA. With a display it opens a window; without one it prints "
        "the page. Needs the Debian packages chromium and libnss3-tools.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the demo's key and certificates (default: as twistd echfront's demo)",
    )
    parser.add_argument("--port", type=int, default=DEMO_PORT, help="the demo front's port")
    parser.add_argument("--browser", help="Chromium executable (default: chromium on $PATH)")
    parser.add_argument(
        "--headless",
        action="store_true",
        default=None,
        help="print the page instead of opening a window (the default without $DISPLAY)",
    )
    parser.add_argument(
        "--screenshot", type=Path, help="also save a PNG of the page here (implies --headless)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to load the page headless (60)"
    )


def run_try(args: Any) -> int:
    """``echfront try``: run the reactor until the browser is done; the exit status.

    Exit status 0 when the page says ECH was accepted (or the window was
    closed), 1 when it does not, 2 with one line on stderr when the run
    cannot start (no browser, port taken, ...).
    """
    from twisted.internet import reactor  # noqa: PLC0415 (installed only when run)

    if not 1 <= args.port <= 65535:
        print(f"echfront try: error: --port {args.port} is not 1..65535", file=sys.stderr)
        return 2
    options = TryOptions(
        state_dir=args.state_dir or default_state_dir(),
        port=args.port,
        browser=args.browser,
        headless=args.headless,
        screenshot=args.screenshot.resolve() if args.screenshot else None,
        timeout=args.timeout,
    )
    outcome: list[int] = []
    # After Ctrl-C the reactor stops by itself, once the run has cleaned up.
    interrupted: list[bool] = []
    reactor.addSystemEventTrigger("before", "shutdown", interrupted.append, True)

    def failed(failure: Failure) -> int:
        error = failure.value
        if isinstance(error, ConfigError | CannotListenError | OSError):
            print(f"echfront try: error: {error}", file=sys.stderr)
            return 2
        failure.printTraceback(file=sys.stderr)
        return 2

    def finish(status: int) -> None:
        outcome.append(status)
        if not interrupted:
            reactor.stop()

    def start() -> None:
        run = Deferred.fromCoroutine(try_browser(reactor, options, sys.stdout))
        run.addErrback(failed)
        run.addCallback(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    return outcome[0] if outcome else _INTERRUPTED
