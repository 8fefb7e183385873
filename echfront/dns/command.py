# -*- test-case-name: tests.test_publish -*-
"""Publishing by running an operator's program (a provider's API client, ``knsupdate``...).

:class:`CommandPublisher` hands the base64 ECHConfigList (the ``ech``
SvcParam's presentation form, RFC 9848 §3) to a program of the operator's
and checks the result with a :class:`~echfront.dns.verify.Verifier`.  The
program runs under the reactor (``IReactorProcess``), without a shell and
with stdin closed, bounded by a timeout; every failure is one
:class:`~echfront.dns.verify.PublishError` line.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from echfront.dns.verify import (
    DEFAULT_TIMEOUT,
    PublishError,
    Verifier,
    check_config_list,
    describe_error,
)
from echfront.interfaces import IPublisher

__all__ = ["CommandPublisher"]

#: How long a hook killed with SIGTERM gets before SIGKILL.
_KILL_GRACE = 2.0
#: How much of a hook's stderr is kept (only its last line is reported).
_STDERR_KEPT = 4096


class _HookProtocol(ProcessProtocol):
    """Collects a hook's stderr tail and fires ``ended`` with how it ended."""

    def __init__(self) -> None:
        # Fired with the exception, not the Failure: a Deferred given a
        # Failure as its result would run the errbacks.
        self.ended: Deferred[BaseException] = Deferred()
        self.stderr = bytearray()

    def connectionMade(self) -> None:
        # The hook gets no input; an open stdin could make it wait forever.
        assert self.transport is not None
        self.transport.closeStdin()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        del self.stderr[:-_STDERR_KEPT]

    def outReceived(self, data: bytes) -> None:
        """Drained and dropped: the hook's output is not ours to interpret."""

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value or ProcessDone(0))

    def last_line(self) -> str:
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if lines else ""


@implementer(IPublisher)
class CommandPublisher:
    """Publishes by running an operator's program.

    Every element of ``argv`` has ``{config_list}`` replaced with the
    base64 ECHConfigList (the ``ech`` value's presentation form, RFC 9848
    §3) and ``{names}`` with the names, space-separated, as configured.
    Other braces are left alone.  The same two values are in the
    environment as ``ECHFRONT_CONFIG_LIST`` and ``ECHFRONT_NAMES``, on top
    of echfront's own environment.  The program runs without a shell,
    with stdin closed; it succeeds by exiting 0.  A non-zero exit fails
    with the status and the last line of stderr; after ``timeout`` seconds
    it is sent SIGTERM, then SIGKILL, and publication fails.

    The program must make the change the same way :class:`RFC2136Publisher`
    does (only the ``ech`` SvcParam); ``verifier`` then checks it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        names: Sequence[str],
        *,
        reactor: Any,
        verifier: Verifier,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Run ``argv`` to publish ``names``; check with ``verifier``."""
        if not argv:
            raise ValueError("empty command")
        if not names:
            raise ValueError("no names to publish")
        self.argv = tuple(argv)
        self.names = tuple(names)
        self.reactor = reactor
        self.verifier = verifier
        self.timeout = timeout

    def __repr__(self) -> str:
        """The program this runs."""
        return f"<CommandPublisher {self.argv[0]} for {' '.join(self.names)}>"

    def publish(self, config_list: bytes) -> Deferred[None]:
        """Run the program with ``config_list``; :class:`PublishError` unless it exits 0."""
        try:
            check_config_list(config_list)
        except PublishError as error:
            return fail(error)
        encoded = base64.b64encode(config_list).decode("ascii")
        names = " ".join(self.names)
        argv = [a.replace("{config_list}", encoded).replace("{names}", names) for a in self.argv]
        env = dict(os.environ, ECHFRONT_CONFIG_LIST=encoded, ECHFRONT_NAMES=names)
        executable = shutil.which(argv[0], path=env.get("PATH"))
        program = self.argv[0]
        if executable is None:
            return fail(PublishError(f"publish.command: {program}: program not found"))
        protocol = _HookProtocol()
        try:
            transport = self.reactor.spawnProcess(protocol, executable, argv, env=env)
        except OSError as error:
            return fail(PublishError(f"publish.command: {program}: {describe_error(error)}"))
        timed_out: list[bool] = []

        def terminate() -> None:
            timed_out.append(True)
            _signal(transport, "TERM")
            kills.append(self.reactor.callLater(_KILL_GRACE, _signal, transport, "KILL"))
            # A child of the hook may still hold its stdout or stderr open,
            # which would keep processEnded from firing: close our ends.
            kills.append(self.reactor.callLater(2 * _KILL_GRACE, transport.loseConnection))

        kills = [self.reactor.callLater(self.timeout, terminate)]

        def ended(reason: BaseException) -> None:
            for call in kills:
                if call.active():
                    call.cancel()
            if timed_out:
                raise PublishError(
                    f"publish.command: {program} did not finish in {self.timeout:g}s (killed)"
                )
            if isinstance(reason, ProcessDone):
                return
            status = "ended"
            if isinstance(reason, ProcessTerminated):
                if reason.signal is not None:
                    status = f"was killed by signal {reason.signal}"
                else:
                    status = f"exited with status {reason.exitCode}"
            line = protocol.last_line()
            raise PublishError(
                f"publish.command: {program} {status}" + (f": {line}" if line else "")
            )

        return protocol.ended.addCallback(ended)

    def verify(self, config_list: bytes) -> Deferred[bool]:
        """Ask the verifier (see :meth:`Verifier.verify`)."""
        return self.verifier.verify(config_list)


def _signal(transport: Any, name: str) -> None:
    # ProcessExitedAlready: it ended on its own meanwhile.
    with contextlib.suppress(ProcessExitedAlready):
        transport.signalProcess(name)
