# -*- test-case-name: tests.test_routing -*-
"""The static routing table, the router echfront ships.

The targets it routes to are in :mod:`echfront.targets`.
:class:`StaticRouter` matches the effective server name (exact names first,
then the most specific ``*.`` wildcard, which like a certificate wildcard
stands for exactly one label), then the ALPN list, and applies
``require_ech`` so that a private name is never served in the clear.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zope.interface import implementer

# The module, not its names: echfront.routing.Backend and friends must reach
# the deprecation shim at the bottom instead of being attributes here.
from echfront import targets as _targets
from echfront._moved import moved_names
from echfront.ech.decoder import ClientHelloInfo, ECHStatus
from echfront.errors import ConfigError
from echfront.interfaces import IRouter
from echfront.targets import ECH_REQUIRED_REFUSAL, UNRECOGNIZED

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

__all__ = ["Rule", "StaticRouter", "validate_pattern"]


def validate_pattern(pattern: str) -> str:
    """Return a lower-cased routing pattern, or raise ConfigError.

    A pattern is a host name or ``*.`` followed by a host name.
    """
    lowered = pattern.strip().lower().rstrip(".")
    host = lowered[2:] if lowered.startswith("*.") else lowered
    labels = host.split(".")
    if not host or any(
        not label
        or len(label) > 63
        or not all(c.isascii() and (c.isalnum() or c in "-_") for c in label)
        for label in labels
    ):
        raise ConfigError(f"route name {pattern!r} is not a host name or *.host wildcard")
    return lowered


@dataclass(frozen=True)
class Rule:
    """One row of the static table.

    :ivar pattern: ``name.example`` or ``*.example`` (one label).
    :ivar target: where matching connections go.
    :ivar alpn: when set, the rule only matches a client offering one of these.
    :ivar require_ech: refuse clients that reach this name without ECH.
    """

    pattern: str
    target: _targets.Route
    alpn: frozenset[bytes] | None = None
    require_ech: bool = False

    def __post_init__(self) -> None:
        """Normalise the pattern."""
        object.__setattr__(self, "pattern", validate_pattern(self.pattern))

    def matches_alpn(self, offered: Sequence[bytes]) -> bool:
        """Whether the client's ALPN list satisfies this rule."""
        return self.alpn is None or any(proto in self.alpn for proto in offered)


@implementer(IRouter)
@dataclass(frozen=True)
class StaticRouter:
    """Routes by a fixed table (see the module docstring for the rules).

    :ivar rules: the table; for one pattern, earlier rules win, so list
        ALPN-specific rules before the catch-all for that name.
    :ivar default: the target for names without a rule (and for clients
        that send no server name).
    :ivar rejected: when set, where connections go whose ECH was rejected
        and whose outer name is a public name: an ECH-capable server for
        the public name, which sends the retry configs pyOpenSSL cannot.
    :ivar public_names: the public names of the configs in service.
    """

    rules: tuple[Rule, ...]
    default: _targets.Route = UNRECOGNIZED
    rejected: _targets.Route | None = None
    public_names: frozenset[str] = frozenset()
    _by_pattern: dict[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Index the rules by pattern."""
        by_pattern: dict[str, list[Rule]] = {}
        for rule in self.rules:
            by_pattern.setdefault(rule.pattern, []).append(rule)
        object.__setattr__(self, "_by_pattern", {k: tuple(v) for k, v in by_pattern.items()})

    @classmethod
    def from_rules(
        cls, rules: Iterable[Rule], default: _targets.Route = UNRECOGNIZED
    ) -> StaticRouter:
        """Build a router from any iterable of rules."""
        return cls(tuple(rules), default)

    def find(self, server_name: str | None, alpn: Sequence[bytes]) -> Rule | None:
        """Return the rule for a name and ALPN list, or None.

        The lookup does the same dictionary probes whether a name is routed
        or not, so its timing says little about the inner name (DEC-8).
        """
        if not server_name:
            return None
        candidates = [server_name]
        dot = server_name.find(".")
        if dot > 0:
            candidates.append("*" + server_name[dot:])
        for pattern in candidates:
            for rule in self._by_pattern.get(pattern, ()):
                if rule.matches_alpn(alpn):
                    return rule
        return None

    def route(self, hello: ClientHelloInfo, peer: IAddress) -> _targets.Route:
        """Route by the effective server name and ALPN (IRouter)."""
        if (
            self.rejected is not None
            and hello.status is ECHStatus.REJECTED
            and hello.server_name in self.public_names
        ):
            # RFC 9849 §6.1.6: the client will authenticate the public name
            # and retry with the retry_configs this target sends.
            return self.rejected
        rule = self.find(hello.server_name, hello.alpn)
        if rule is None:
            return self.default
        if rule.require_ech and hello.status is not ECHStatus.ACCEPTED:
            return ECH_REQUIRED_REFUSAL
        return rule.target

    @property
    def targets(self) -> frozenset[_targets.Backend | _targets.Local]:
        """Every connectable target this table can return."""
        found = {r.target for r in self.rules} | {self.default}
        if self.rejected is not None:
            found.add(self.rejected)
        return frozenset(t for t in found if isinstance(t, _targets.Backend | _targets.Local))


#: ``echfront.routing.Backend`` and friends, from before :mod:`echfront.targets`.
__getattr__ = moved_names(
    __name__, dict.fromkeys(("Backend", "Local", "Reject", "Route"), "echfront.targets")
)
