"""Count the Python bytecodes a front executes, per function (benchmarks/opcount.py).

Loaded as ``sitecustomize`` by a front that ``opcount.py`` starts with this
directory first on ``PYTHONPATH``; does nothing unless
``ECHFRONT_OPCOUNT_DIR`` names a directory.  A thread watches that
directory: the file ``on`` starts counting, ``off`` stops it and writes
``counts.<pid>.json`` (per function: bytecodes executed and calls).

Counting uses ``sys.settrace`` with per-opcode events (``f_trace_opcodes``)
on frames entered while on, and on the main thread's frames running when
it starts; it makes the front many times slower, but the counts are exact
and do not depend on what else the machine is doing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from types import CodeType, FrameType
from typing import Any

_DIRECTORY = os.environ.get("ECHFRONT_OPCOUNT_DIR", "")
#: Whether frames entered now are counted (a list: the watcher thread flips it).
_counting = [False]
_opcodes: Counter[CodeType] = Counter()
_calls: Counter[CodeType] = Counter()


def _local(frame: FrameType, event: str, arg: Any) -> Any:
    if not _counting[0]:
        return None
    if event == "opcode":
        _opcodes[frame.f_code] += 1
    return _local


def _trace_running_frames() -> None:
    """Count the main thread's frames already running too (its event loop).

    ``sys.settrace`` reaches only frames entered from now on; a front's
    loop runs in a frame entered long before (``bare``'s poll loop, the
    reactor's main loop), whose own bytecodes would otherwise be missed.
    """
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        frame.f_trace = _local
        frame.f_trace_opcodes = True
        frame = frame.f_back


def _global(frame: FrameType, event: str, arg: Any) -> Any:
    if not _counting[0]:
        return None
    _calls[frame.f_code] += 1
    frame.f_trace_opcodes = True
    return _local


def _name(code: CodeType) -> str:
    path = code.co_filename
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.relpath(path, root) if os.path.isabs(path) else path
    return f"{path}:{code.co_firstlineno}:{code.co_qualname}"


def _watch() -> None:
    on = os.path.join(_DIRECTORY, "on")
    off = os.path.join(_DIRECTORY, "off")
    while not os.path.exists(on):
        time.sleep(0.05)
    _counting[0] = True
    _trace_running_frames()
    while not os.path.exists(off):
        time.sleep(0.05)
    _counting[0] = False
    time.sleep(0.2)  # frames entered while on finish their opcodes
    counts = {_name(code): [count, _calls[code]] for code, count in list(_opcodes.items())}
    path = os.path.join(_DIRECTORY, f"counts.{os.getpid()}.json")
    with open(path + ".tmp", "w") as out:
        json.dump(counts, out)
    os.replace(path + ".tmp", path)


if _DIRECTORY:
    sys.settrace(_global)
    threading.Thread(target=_watch, name="opcount", daemon=True).start()
