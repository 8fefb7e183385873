# -*- test-case-name: tests.test_routing -*-
"""The static routing table, the router echfront ships.

The targets it routes to are in :mod:`echfront.targets`.
:class:`StaticRouter` matches the effective server name (exact names first,
then the most specific ``*.`` wildcard, which like a certificate wildcard
stands for exactly one label), then the ALPN list, and applies
``require_ech`` so that a private name is never served in the clear.

The lookup costs the same for a name the table routes as for one it does
not (RFC 9849 §10.6, checklist DEC-8): the rules are indexed once into
answers per pattern and ALPN protocol, and every lookup makes the same
probes and the same calls; only the answer differs.
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


#: A pattern's precomputed answers: the rank of the first rule that matches
#: each ALPN protocol its rules name, and the rank of its first rule without
#: an ALPN condition (the table's "no rule" rank when it has none).
_Entry = tuple[dict[bytes, int], int]


def _satisfies(rule: Rule, protocol: bytes) -> bool:
    """Whether a client offering ``protocol`` satisfies the rule's ALPN condition."""
    return rule.alpn is None or protocol in rule.alpn


@implementer(IRouter)
@dataclass(frozen=True)
class StaticRouter:
    """Routes by a fixed table (see the module docstring for the rules).

    The lookup does the same work for a routed name as for an unrouted one
    (RFC 9849 §10.6, checklist DEC-8): it always probes the exact name and
    its one-label wildcard, reads each probe's precomputed answer for every
    ALPN protocol the client offered, and picks the winner by arithmetic,
    so a name without rules costs exactly the calls a routed name costs
    (``tests/test_timing_uniform.py`` counts them).

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
    _entries: dict[str, _Entry] = field(init=False, repr=False, compare=False)
    #: Indexed by rank: the rules as exact matches, again as wildcard
    #: matches (rank + len(rules)), then None for "no rule".
    _ranked: tuple[Rule | None, ...] = field(init=False, repr=False, compare=False)
    #: The answer of a pattern without rules: the same shape as a real one.
    _missing: _Entry = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Index the rules by pattern, with each pattern's answer per ALPN protocol."""
        miss = len(self.rules)
        positions: dict[str, list[int]] = {}
        for position, rule in enumerate(self.rules):
            positions.setdefault(rule.pattern, []).append(position)
        entries: dict[str, _Entry] = {}
        for pattern, ranks in positions.items():
            catch_all = min((r for r in ranks if self.rules[r].alpn is None), default=miss)
            protocols = {p for r in ranks for p in self.rules[r].alpn or ()}
            # A protocol's answer is the first rule it satisfies: one naming
            # it, or an earlier rule without an ALPN condition.
            by_protocol = {
                protocol: min(r for r in ranks if _satisfies(self.rules[r], protocol))
                for protocol in protocols
            }
            entries[pattern] = (by_protocol, catch_all)
        object.__setattr__(self, "_entries", entries)
        object.__setattr__(self, "_ranked", (*self.rules, *self.rules, None))
        object.__setattr__(self, "_missing", ({}, miss))

    @classmethod
    def from_rules(
        cls, rules: Iterable[Rule], default: _targets.Route = UNRECOGNIZED
    ) -> StaticRouter:
        """Build a router from any iterable of rules."""
        return cls(tuple(rules), default)

    def find(self, server_name: str | None, alpn: Sequence[bytes]) -> Rule | None:
        """Return the rule for a name and ALPN list, or None.

        Exact names win over the wildcard, which stands for one label. The
        work is the same whether the name is routed or not (DEC-8): both
        probes are made, and a missing pattern answers with an entry of the
        same shape as a real one.
        """
        name = server_name or ""
        dot = name.find(".")
        # "" is never a pattern (validate_pattern refuses it), so a name
        # without a label before a dot probes for nothing, at the same cost.
        wildcard = "*" + name[dot:] if dot > 0 else ""
        entries, missing = self._entries, self._missing
        exact_by_protocol, exact = entries.get(name, missing)
        wild_by_protocol, wild = entries.get(wildcard, missing)
        # Each pattern's first rule the client's ALPN list satisfies: one
        # probe per offered protocol and pattern, whatever the entries hold.
        for protocol in alpn:
            found = exact_by_protocol.get(protocol, exact)
            exact = found if found < exact else exact
            found = wild_by_protocol.get(protocol, wild)
            wild = found if found < wild else wild
        # Any exact rule (a rank below len(rules)) beats the wildcard.
        count = len(self.rules)
        return self._ranked[exact if exact < count else wild + count]

    def route(self, hello: ClientHelloInfo, peer: IAddress) -> _targets.Route:
        """Route by the effective server name and ALPN (IRouter).

        From the lookup to the answer, a routed and an unrouted name take
        the same steps; only the answer differs (DEC-8).
        """
        if (
            self.rejected is not None
            and hello.status is ECHStatus.REJECTED
            and hello.server_name in self.public_names
        ):
            # RFC 9849 §6.1.6: the client will authenticate the public name
            # and retry with the retry_configs this target sends.
            return self.rejected
        rule = self.find(hello.server_name, hello.alpn)
        refused = hello.status is not ECHStatus.ACCEPTED
        target, require_ech = (
            (self.default, False) if rule is None else (rule.target, rule.require_ech)
        )
        return ECH_REQUIRED_REFUSAL if refused & require_ech else target

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
