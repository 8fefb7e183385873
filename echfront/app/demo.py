# -*- test-case-name: tests.test_tap -*-
"""The self-contained demo that ``twistd -n echfront`` runs when given nothing.

It creates, once, in a state directory: an ECH key for ``public.localhost``,
a private CA, and certificates for ``public.localhost`` and
``private.localhost``.  Names under ``localhost`` resolve to the loopback
address in curl and browsers (RFC 6761 §6.3), so the demo is reachable at
once.  Both names are served locally by the status page; the private name
requires ECH, so without ECH it is refused rather than served in the clear.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from echfront.app.certs import TestCA
from echfront.config.schema import Config, KeyFileConfig, LocalConfig, RouteConfig
from echfront.ech.keyset import generate_key, publication_list
from echfront.ech.padding import derive_maximum_name_length
from echfront.keys.keyfile import read_key_file, write_key_file

__all__ = ["DEMO_PORT", "PRIVATE_NAME", "PUBLIC_NAME", "default_state_dir", "demo_config"]

PUBLIC_NAME = "public.localhost"
PRIVATE_NAME = "private.localhost"
DEMO_PORT = 8443
_FACTORY = "echfront.web:public_service"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/echfront-demo``, else ``~/.local/state/echfront-demo``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "echfront-demo"


def demo_config(state_dir: Path, port: int = DEMO_PORT) -> tuple[Config, list[str]]:
    """Create the demo's files if missing; return its config and lines to print."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = state_dir / "ech.pem"
    routes = (RouteConfig(PRIVATE_NAME, "local:private", require_ech=True),)
    if not key_path.exists():
        # Padded to the demo's routed names (RFC 9849 §6.1.3).
        length = derive_maximum_name_length(route.name for route in routes)
        write_key_file(key_path, [generate_key(PUBLIC_NAME, maximum_name_length=length)])
    (key,) = read_key_file(key_path)
    ca = TestCA(state_dir)
    public = ca.issue([PUBLIC_NAME])
    private = ca.issue([PRIVATE_NAME])
    config = Config(
        listen=(f"tcp:{port}:interface=127.0.0.1",),
        keys=(KeyFileConfig(key_path),),
        public_name=PUBLIC_NAME,
        public=LocalConfig("public", public.chain, public.key, _FACTORY, ("http/1.1",)),
        locals={
            "private": LocalConfig("private", private.chain, private.key, _FACTORY, ("http/1.1",))
        },
        routes=routes,
        default="public",
    )
    config_list = base64.b64encode(publication_list([key.config])).decode()
    lines = [
        f"echfront demo: no configuration given; state in {state_dir}",
        f"  listening on https://127.0.0.1:{port}/ ({PUBLIC_NAME} and {PRIVATE_NAME})",
        f"  private name {PRIVATE_NAME} is served only with ECH",
        f"  CA certificate: {ca.cert_path}",
        f"  ECHConfigList: {config_list}",
        "  see ECH work in a browser (Debian's chromium):  echfront try",
        "  or (curl built with ECH support, e.g. curl >= 8.8 with OpenSSL 4 or BoringSSL):",
        f"    curl --cacert {ca.cert_path} --ech ecl:{config_list} https://{PRIVATE_NAME}:{port}/",
        f"  without ECH:  curl --cacert {ca.cert_path} https://{PUBLIC_NAME}:{port}/",
    ]
    return config, lines
