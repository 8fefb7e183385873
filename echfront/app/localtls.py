# -*- test-case-name: tests.test_record_padding -*-
"""The TLS the front terminates itself: record padding, and what it cannot send.

Local services (``[public]``, ``[locals]``) terminate TLS with pyOpenSSL on
the OpenSSL 4.0 that cryptography bundles.  Two rules of RFC 9849 concern
that TLS beyond what a relayed connection needs:

* **Record padding** (§6.1.3, checklist BE-7): the EncryptedExtensions (with
  the chosen ALPN) and the Certificate reveal which name was served unless
  their records are padded.  OpenSSL pads when its configuration says
  ``RecordPadding = N`` in the ``system_default`` section, but neither
  pyOpenSSL nor cryptography binds any call that sets padding or loads a
  configuration, and the bundled OpenSSL reads its configuration once: when
  ``cryptography.hazmat.bindings._rust`` is imported (measured: a file named
  by ``OPENSSL_CONF`` afterwards is never read).  So padding has to be in
  place before that import, and ``twistd echfront`` imports cryptography
  long before echfront's code runs (with ``echfront.tap``, or earlier with
  ``--logger=echfront.logs.json_observer``).  :func:`record_padding`
  therefore starts the process again (``exec``, same PID, the environment
  it was started with) through :func:`boot`, which names a generated configuration
  in ``OPENSSL_CONF`` for that one import only and then runs the original
  command.  ``--workers`` children are started through :func:`boot` at once.
* **retry_configs** (§7.1, checklist REJ-2): pyOpenSSL binds no ECH call,
  and OpenSSL refuses a custom extension of type 0xfe0d (it handles ECH
  itself), so a rejected client that lands on ``[public]`` gets no
  retry_configs; :func:`retry_configs_warning` says so at start-up.

The generated configuration never overrides the operator's: it holds
echfront's three sections, then ``.include`` of the file OpenSSL would have
read (``OPENSSL_CONF``, else the bundled library's own default file if it
exists).  OpenSSL keeps the last value of a name, so a file that names its
own ``openssl_conf`` wins entirely; echfront then reports that padding is
off and how to add it to that file.  The system OpenSSL of the standard
library (``ssl``, ``hashlib``) is loaded before the generated file is
named, so it reads its own configuration as always, and child processes
inherit the environment unchanged.

Whether records are padded is measured, never assumed:
:func:`measured_padding` runs a TLS 1.3 handshake in memory with a fresh
pyOpenSSL server context and reads the size of a one-byte record.

This module imports only the standard library at its top: :func:`boot`
runs before cryptography is imported and must not import it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import runpy
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from OpenSSL import SSL

    from echfront.config.schema import Config

__all__ = [
    "BOOT_CODE",
    "Command",
    "Outcome",
    "boot",
    "boot_argv",
    "initial_environment",
    "measured_padding",
    "openssl_config",
    "original_command",
    "padding_wanted",
    "record_padding",
    "retry_configs_warning",
    "worker_argv",
]

#: The module whose import makes the bundled OpenSSL read its configuration.
_RUST = "cryptography.hazmat.bindings._rust"
#: What ``python -c`` runs to start a process with padding in place.
BOOT_CODE = "from echfront.app.localtls import boot; boot()"
#: The AEAD tag of every TLS 1.3 record (the CCM_8 suite is not enabled).
_TAG = 16

#: Set by :func:`boot` in the process it started: the block size asked for,
#: and why the generated configuration could not be used, if it could not.
_booted: int | None = None
_boot_error: str | None = None


def openssl_config(block: int, include: str | None) -> str:
    """An OpenSSL configuration file: ``RecordPadding = block``, then ``include``.

    echfront's sections come first; ``[default]`` then returns to the
    unnamed section before the ``.include``, so the included file's
    top-level names (``openssl_conf``) land where they would have, and
    replace echfront's when the file has them.
    """
    lines = [
        "# Written by echfront for one import: RFC 9849 §6.1.3 record padding.",
        "openssl_conf = echfront_record_padding_init",
        "[echfront_record_padding_init]",
        "ssl_conf = echfront_record_padding_ssl",
        "[echfront_record_padding_ssl]",
        "system_default = echfront_record_padding_tls",
        "[echfront_record_padding_tls]",
        f"RecordPadding = {block}",
    ]
    if include is not None:
        lines += ["[default]", f".include {include}"]
    return "\n".join(lines) + "\n"


def boot() -> None:
    """Start a process with record padding in the bundled OpenSSL, then run its command.

    Run as ``python -c BOOT_CODE BLOCK DEFAULT_FILE KIND TARGET ARGS...``
    (:func:`boot_argv`): ``KIND`` is ``path``, ``-m`` or ``-c``, ``TARGET``
    the script, module or code, as the original command line had them.
    ``OPENSSL_CONF`` names the generated file only while cryptography's
    native module is imported; the environment is then as it was.
    """
    global _booted, _boot_error  # noqa: PLW0603 (facts about this process, set once)
    block, default_file, kind, target, *rest = sys.argv[1:]
    # Load the standard library's OpenSSL first, so that it reads its own
    # configuration, never the generated one.
    with contextlib.suppress(ImportError):
        importlib.import_module("_hashlib")
    _booted = int(block)
    if _RUST in sys.modules:
        _boot_error = "cryptography was loaded before the padding could be set up"
    else:
        _boot_error = _import_with_padding(int(block), default_file or None)
    _run(kind, target, rest)


def _import_with_padding(block: int, default_file: str | None) -> str | None:
    """Import cryptography's native module with ``OPENSSL_CONF`` naming a generated file.

    :returns: None, or why the file could not be written.
    """
    before = os.environ.get("OPENSSL_CONF")
    if before is not None:
        # Set, even empty (no configuration at all): that is what to keep.
        include = os.path.abspath(before) if before else None
    else:
        include = default_file if default_file and os.path.isfile(default_file) else None
    try:
        handle, path = tempfile.mkstemp(prefix="echfront-openssl-", suffix=".cnf")
    except OSError as error:
        return f"cannot write a temporary file ({error.strerror})"
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(openssl_config(block, include))
        os.environ["OPENSSL_CONF"] = path
        importlib.import_module(_RUST)
    except OSError as error:
        return f"cannot write a temporary file ({error.strerror})"
    finally:
        if before is None:
            os.environ.pop("OPENSSL_CONF", None)
        else:
            os.environ["OPENSSL_CONF"] = before
        os.unlink(path)
    return None


def _run(kind: str, target: str, rest: Sequence[str]) -> None:
    """Run the original command as Python would have (script, ``-m`` or ``-c``)."""
    if kind == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif kind == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
    else:
        sys.argv = [target, *rest]
        sys.path[0] = os.path.dirname(target)
        runpy.run_path(target, run_name="__main__")


@dataclass(frozen=True)
class Command:
    """How this interpreter was started: options, then a script, ``-m`` or ``-c``.

    :ivar options: the interpreter's own options, verbatim (``-X dev``...).
    :ivar kind: ``path``, ``-m`` or ``-c``.
    :ivar target: the script's absolute path, the module, or the code.
    :ivar args: the program's arguments (``sys.argv[1:]``).
    """

    options: tuple[str, ...]
    kind: str
    target: str
    args: tuple[str, ...]


def original_command(
    orig_argv: Sequence[str] | None = None, argv: Sequence[str] | None = None
) -> Command | None:
    """This process's command line as :class:`Command`, or None if it cannot be run again.

    ``sys.orig_argv`` ends with ``sys.argv[1:]``; what is before them is the
    interpreter, its options and the script (or ``-m MODULE``, ``-c CODE``).
    Standard input as the script, or an ``argv`` some code rewrote, is None.
    """
    orig = list(sys.orig_argv if orig_argv is None else orig_argv)
    args = list((sys.argv if argv is None else argv)[1:])
    head = orig[: len(orig) - len(args)]
    if len(head) < 2 or orig[len(head) :] != args:
        return None
    if len(head) >= 3 and head[-2] in ("-m", "-c"):
        return Command(tuple(head[1:-2]), head[-2], head[-1], tuple(args))
    last = head[-1]
    if last.startswith(("-m", "-c")) and len(last) > 2:
        return Command(tuple(head[1:-1]), last[:2], last[2:], tuple(args))
    if last.startswith("-"):
        return None
    return Command(tuple(head[1:-1]), "path", os.path.abspath(last), tuple(args))


def boot_argv(block: int, command: Command, default_file: str | None) -> list[str]:
    """The argv that runs ``command`` again through :func:`boot`."""
    return [
        sys.executable,
        *command.options,
        "-c",
        BOOT_CODE,
        str(block),
        default_file or "",
        command.kind,
        command.target,
        *command.args,
    ]


def worker_argv(argv: Sequence[str], block: int) -> list[str]:
    """A ``--workers`` child's ``python -c CODE ARGS...`` argv, started through :func:`boot`."""
    if len(argv) < 3 or argv[1] != "-c":
        raise ValueError("a worker's argv runs python -c CODE")
    executable, _, code, *rest = argv
    command = Command((), "-c", code, tuple(rest))
    return [executable, *boot_argv(block, command, _bundled_default_file())[1:]]


def _bundled_default_file() -> str | None:
    """The file the bundled OpenSSL reads without ``OPENSSL_CONF`` (OPENSSLDIR), if any."""
    from OpenSSL._util import ffi, lib  # noqa: PLC0415 (cryptography is loaded by now)

    text = ffi.string(lib.OpenSSL_version(lib.OPENSSL_DIR)).decode(errors="replace")
    directory = text.partition('"')[2].rpartition('"')[0]  # OPENSSLDIR: "/path"
    path = os.path.join(directory, "openssl.cnf")
    return path if directory and os.path.isfile(path) else None


def measured_padding() -> int:
    """The block a new pyOpenSSL server context pads TLS 1.3 records to here; 0 for none.

    A handshake in memory with a throwaway certificate, then one byte of
    application data: unpadded, its record holds the byte, the content
    type and the tag; padded to N, the byte and type fill N.
    """
    # Imported here: this module must stay importable before cryptography.
    import datetime  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from OpenSSL import SSL  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "padding.invalid")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(minutes=1))
        .sign(key, hashes.SHA256())
    )
    server_context = SSL.Context(SSL.TLS_METHOD)
    server_context.set_min_proto_version(SSL.TLS1_3_VERSION)
    server_context.use_certificate(certificate)
    server_context.use_privatekey(key)
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_connect_state()
    for _ in range(8):
        for connection in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                connection.do_handshake()
        moved = _move(client, server) + _move(server, client)
        if not moved:
            break
    _drain(server)  # session tickets, if any are still queued
    server.send(b"x")
    length = _last_record_length(_drain(server))
    return 0 if length <= 2 + _TAG else length - _TAG


def _drain(connection: SSL.Connection) -> bytes:
    """Everything ``connection`` has written to its memory BIO."""
    from OpenSSL import SSL  # noqa: PLC0415

    out = b""
    while True:
        try:
            out += connection.bio_read(65536)
        except SSL.WantReadError:
            return out


def _move(source: SSL.Connection, sink: SSL.Connection) -> int:
    """Hand what ``source`` wrote to ``sink``; the byte count."""
    data = _drain(source)
    if data:
        sink.bio_write(data)
    return len(data)


def _last_record_length(data: bytes) -> int:
    """The length field of the last TLS record in ``data`` (0 for none)."""
    position, length = 0, 0
    while position + 5 <= len(data):
        length = int.from_bytes(data[position + 3 : position + 5], "big")
        position += 5 + length
    return length


def padding_wanted(config: Config) -> int:
    """The block size to pad to: ``[front] record_padding`` when a local service exists, else 0."""
    if config.public is None and not config.locals:
        return 0
    return config.record_padding


@dataclass(frozen=True)
class Outcome:
    """What :func:`record_padding` found: one line for the log, and its weight."""

    message: str
    warning: bool


def record_padding(block: int, *, command: Command | None = None) -> Outcome:
    """Make sure locally terminated TLS pads its records; may ``exec`` this process.

    When records are already padded (by :func:`boot`, or by the operator's
    own OpenSSL configuration), or when this process was started by
    :func:`boot` and the operator's configuration still wins, it says so.
    Otherwise it starts the process again through :func:`boot` and does
    not return; when that cannot be done, it says why.
    """
    try:
        observed = measured_padding()
    except Exception as error:  # an OpenSSL configuration without TLS 1.3, say
        return Outcome(
            f"local TLS record padding could not be measured ({error!r}); not padding "
            "(RFC 9849 §6.1.3)",
            warning=True,
        )
    if observed:
        source = "" if observed == _booted else " (set by the OpenSSL configuration)"
        return Outcome(
            f"local TLS pads its records to multiples of {observed} bytes{source} "
            "(RFC 9849 §6.1.3)",
            warning=False,
        )
    conf = os.environ.get("OPENSSL_CONF")
    if _booted is not None and _boot_error is not None:
        return Outcome(
            f"local TLS records are not padded: {_boot_error} (RFC 9849 §6.1.3)", warning=True
        )
    if _booted is not None:
        where = f"OPENSSL_CONF={conf}" if conf else "the bundled OpenSSL's default file"
        return Outcome(
            f"local TLS records are not padded: {where} names its own openssl_conf "
            "section, which echfront leaves as it is; add RecordPadding = "
            f"{block} to its system_default section, or set [front] record_padding = 0 "
            "(RFC 9849 §6.1.3)",
            warning=True,
        )
    command = command or original_command()
    if command is None:
        return Outcome(
            "local TLS records are not padded: this process's command line cannot be "
            "run again with padding (RFC 9849 §6.1.3)",
            warning=True,
        )
    argv = boot_argv(block, command, _bundled_default_file())
    environment = initial_environment()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # The same interpreter, its own argv: no shell, nothing from outside.
        os.execve(sys.executable, argv, environment)  # noqa: S606
    except OSError as error:
        return Outcome(
            f"local TLS records are not padded: restarting with padding failed ({error})",
            warning=True,
        )
    raise AssertionError("exec returned")  # pragma: no cover


def initial_environment() -> Mapping[bytes, bytes]:
    """The environment this process was started with, to start it again with.

    Start-up may consume variables: Twisted's ``systemd:`` endpoint deletes
    ``LISTEN_PID`` and ``LISTEN_FDS`` from ``os.environ`` once it has read
    them, and the restarted process needs them again (same PID, the same
    inherited sockets).  Linux keeps the initial block in
    ``/proc/self/environ``; elsewhere, the current environment.
    """
    try:
        with open("/proc/self/environ", "rb") as stream:
            block = stream.read()
    except OSError:
        return dict(os.environb)
    pairs = (item.partition(b"=") for item in block.split(b"\0") if b"=" in item)
    return {name: value for name, _, value in pairs}


def retry_configs_warning(config: Config) -> str | None:
    """One line when rejected ECH clients land on the local ``[public]`` service (REJ-2).

    pyOpenSSL cannot send ``retry_configs`` (RFC 9849 §7.1); the conformant
    set-up is ``rejected = "backend:NAME"``, an ECH-capable server for the
    public name.  Said when ECH keys are configured, ``[public]`` serves the
    public name, no ``rejected`` target is set and the static router is in
    use (a ``[router] factory`` decides for itself).
    """
    has_keys = bool(config.keys) or config.key_directory is not None or config.fleet is not None
    if not has_keys or config.public is None or config.rejected is not None or config.router:
        return None
    name = config.public_name
    if name is not None and any(
        route.name == name and route.target != "public" for route in config.routes
    ):
        return None  # the public name is routed elsewhere, rejections with it
    return (
        "ECH retry configs: clients whose ECH is rejected (a stale config) reach the local "
        "[public] service, which cannot send retry_configs (RFC 9849 §7.1: pyOpenSSL has no "
        'ECH API); set rejected = "backend:NAME" to an ECH-capable server for the public '
        "name (docs/security.rst)"
    )
