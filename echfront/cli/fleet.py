# -*- test-case-name: tests.test_fleet_units -*-
"""``echfront fleet status``: a fleet's members, keys, leader and rotation, read from etcd.

It reads the ``[keys.etcd]`` table of the front's configuration file to
reach the cluster (endpoints, TLS, user), reads everything under the
prefix at one revision and prints it; no key is opened, so the KEK file is
not needed.  ``--json`` prints one JSON object instead, for scripts.

Exit status: 0 when read, 2 with one line on stderr when it cannot be
(no ``store = "etcd"`` in the file, etcd unreachable).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from echfront.app.fleet import etcd_settings
from echfront.config.schema import load_config_file
from echfront.errors import ConfigError
from echfront.keys.etcd import EtcdClient
from echfront.keys.etcdfleet import FleetStatus, read_fleet, utc_text
from echfront.keys.stores import KeyStoreError

__all__ = ["add_fleet_parser", "render_status", "run_fleet", "status_document"]


def add_fleet_parser(commands: Any) -> None:
    """Add ``echfront fleet`` to the command line's subcommands."""
    fleet = commands.add_parser(
        "fleet",
        help='show a fleet sharing its ECH keys in etcd ([keys] store = "etcd")',
        description="Read a fleet's state from etcd: its members and the keys each has "
        "loaded, the leader, the rotation phase and how long its barriers waited.",
    )
    # The subparsers are of the parent's class (one-line errors, exit status 2).
    actions = fleet.add_subparsers(dest="action", required=True)
    status = actions.add_parser(
        "status",
        help="members, the keys each has loaded, leader, rotation phase, barrier waits",
        description="Print the fleet as etcd holds it now (one read, at one revision).",
    )
    status.add_argument(
        "--config", required=True, type=Path, help="a front's configuration file ([keys.etcd])"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")


def status_document(status: FleetStatus, now: float) -> dict[str, Any]:
    """The status as one JSON-ready object (``--json``)."""
    all_keys = {key.key_id for key in status.keys}
    record = status.record
    return {
        "revision": status.revision,
        "leader": status.leader,
        "leader_since": status.leader_since,
        "rotation": None
        if record is None
        else {
            "phase": record.phase.value,
            "recorded_by": record.leader,
            "since": record.since,
            "pending": list(record.pending),
            "waiting_for": list(record.waiting),
            "barrier_since": record.barrier_since,
            "last_rotation": record.last_rotation,
            "load_wait": record.load_wait,
            "dns_wait": record.dns_wait,
        },
        "keys": [
            {
                "key_id": key.key_id,
                "state": key.state,
                "created": key.created,
                "retire_after": key.retire_after,
                "config_ids": list(key.config_ids),
                "kems": list(key.kems),
            }
            for key in status.keys
        ],
        "members": [
            {
                "name": member.name,
                "loaded": sorted(member.loaded),
                "missing": sorted(all_keys - member.loaded),
                "revision": member.revision,
                "reported_ago": None if not member.reported else now - member.reported,
                "info": dict(member.info),
            }
            for member in status.members
        ],
        "problems": list(status.problems),
    }


def _ago(seconds: float | None, now: float) -> str:
    return "-" if seconds is None else f"{utc_text(seconds)} ({max(0.0, now - seconds):.0f}s ago)"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def render_status(status: FleetStatus, now: float, prefix: str, out: TextIO) -> None:
    """Print the status for people."""
    print(f"fleet under {prefix} at etcd revision {status.revision}", file=out)
    if status.leader is None:
        print("leader: none (no front leads the rotation now)", file=out)
    else:
        print(f"leader: {status.leader}, since {_ago(status.leader_since, now)}", file=out)
    record = status.record
    if record is None:
        print("rotation: nothing recorded yet", file=out)
    else:
        line = f"rotation: {record.phase.value} for {max(0.0, now - record.since):.1f}s"
        if record.pending:
            line += f"; pending {', '.join(record.pending)}"
        if record.waiting:
            line += f"; load barrier waits for {', '.join(record.waiting)}"
        if record.barrier_since is not None:
            line += f" ({max(0.0, now - record.barrier_since):.1f}s so far)"
        print(line, file=out)
        print(
            f"last rotation: {_ago(record.last_rotation, now)}; last barrier waits: "
            f"load {_seconds(record.load_wait)}, dns {_seconds(record.dns_wait)}",
            file=out,
        )
    print(f"keys ({len(status.keys)}):", file=out)
    for key in status.keys:
        until = f" until {key.retire_after}" if key.retire_after else ""
        ids = ",".join(map(str, key.config_ids))
        print(
            f"  {key.key_id}  {key.state}{until}  config_id {ids}  {','.join(key.kems)}  "
            f"created {key.created}",
            file=out,
        )
    all_keys = {key.key_id for key in status.keys}
    print(f"members ({len(status.members)}):", file=out)
    for member in status.members:
        missing = sorted(all_keys - member.loaded)
        loaded = ", ".join(sorted(member.loaded)) or "nothing"
        state = f"missing {', '.join(missing)}" if missing else "has every key"
        reported = f"{max(0.0, now - member.reported):.0f}s ago" if member.reported else "never"
        where = " ".join(f"{k}={v}" for k, v in sorted(member.info.items()))
        print(f"  {member.name}: {state}; loaded {loaded}", file=out)
        print(f"    revision {member.revision}, reported {reported}; {where}", file=out)
    for problem in status.problems:
        print(f"problem: {problem}", file=out)


async def _status(args: Any, reactor: Any, out: TextIO) -> None:
    config = load_config_file(args.config)
    if config.fleet is None:
        raise ConfigError(f'{args.config}: no [keys] store = "etcd" (not a fleet member)')
    settings = etcd_settings(config.fleet)
    client = EtcdClient(settings, reactor)
    try:
        status = await read_fleet(client, settings.prefix)
    finally:
        await client.close()
    now = time.time()
    if args.json:
        print(json.dumps(status_document(status, now), indent=2, sort_keys=True), file=out)
    else:
        render_status(status, now, settings.prefix, out)


def run_fleet(args: Any, out: TextIO | None = None) -> int:
    """Run ``echfront fleet ACTION``; the exit status (see the module docstring)."""
    from twisted.internet import reactor  # noqa: PLC0415 (installed only when run)

    stream = out if out is not None else sys.stdout
    outcome: list[int] = []

    def failed(failure: Failure) -> int:
        if failure.check(ConfigError, KeyStoreError) is not None:
            print(f"echfront fleet: error: {failure.getErrorMessage()}", file=sys.stderr)
            return 2
        failure.printTraceback(file=sys.stderr)
        return 2

    def finish(status: int) -> None:
        outcome.append(status)
        reactor.stop()

    async def status() -> int:
        await _status(args, reactor, stream)
        return 0

    def start() -> None:
        run = Deferred.fromCoroutine(status())
        run.addErrback(failed)
        run.addCallback(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    return outcome[0] if outcome else 2
