"""Stopping the subprocesses the tests and benchmarks start."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["stop_process"]


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM ``proc`` by its PID, SIGKILL it after ``timeout`` seconds; its exit status.

    Only this one process is signalled, never a group, and nothing that
    already exited.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode
