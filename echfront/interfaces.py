# -*- test-case-name: tests.test_routing -*-
"""The extension API: every seam where an operator plugs in their own code.

* :class:`IRouter` decides where a connection goes once its first
  ClientHello is decoded.  echfront ships a static table
  (:class:`echfront.routing.StaticRouter`); a custom router is any object
  providing :class:`IRouter`, made by a factory named by dotted path in the
  configuration (see ``docs/routing.rst``).
* :class:`IPublisher` puts ECHConfigLists into the DNS and checks them; key
  rotation drives it (:class:`echfront.keys.rotation.Rotator`).
* :class:`ServiceContext` is what a router factory or local service factory
  named in the configuration is given.
* :class:`IKeyStore` keeps a deployment's ECH keys with their states; the
  key directory (:class:`echfront.keys.stores.DirectoryKeyStore`) and etcd
  (:class:`echfront.keys.etcdstore.EtcdKeyStore`) provide it, with the value
  types it speaks in (:class:`StoredKey`, :class:`StoreSnapshot`,
  :class:`MemberStatus`, :class:`StateChange`, :class:`Fence`).

This module is the top of nothing and the bottom of much: it imports no other
echfront module at run time, so every wing may depend on it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IAddress

    from echfront.ech.decoder import ClientHelloInfo
    from echfront.ech.keyset import ECHKey, KeySet
    from echfront.keys.keydir import KeyState
    from echfront.targets import Backend, Local, Route

__all__ = [
    "Fence",
    "IKeyStore",
    "IKeyWatch",
    "IMembership",
    "IPublisher",
    "IRouter",
    "MemberStatus",
    "ServiceContext",
    "StateChange",
    "StoreSnapshot",
    "StoredKey",
]


class IRouter(Interface):
    """Chooses the target of a connection from its decoded ClientHello."""

    def route(hello: ClientHelloInfo, peer: IAddress) -> Route | Deferred[Route]:
        """Return the route for this connection, or a Deferred firing with it.

        :param hello: the decoded first ClientHello.  ``hello.server_name``
            and ``hello.alpn`` are the effective values: from the
            ClientHelloInner when ECH was accepted, else from the outer hello.
            ``hello.status`` tells which.
        :param peer: the client's address.
        :returns: a :class:`~echfront.targets.Backend` or
            :class:`~echfront.targets.Local` target *that the router was given
            by the configuration* (the front refuses any other: it is never an
            open proxy), or a :class:`~echfront.targets.Reject`.
        """


class IPublisher(Interface):
    """Puts an ECHConfigList into the DNS and checks that it is there."""

    def publish(config_list: bytes) -> Deferred[None]:
        """Make the HTTPS records of every configured name carry ``config_list``.

        ``config_list`` is an ECHConfigList with its 2-byte length (RFC 9849
        §4), which becomes the ``ech`` SvcParam (RFC 9848 §3, key 5) of the
        records, keeping every other SvcParam, priority, target and TTL of
        each existing record.  Fails with
        :class:`~echfront.dns.verify.PublishError`.
        """

    def verify(config_list: bytes) -> Deferred[bool]:
        """True when every configured name's records carry exactly ``config_list``.

        The records are queried from the authoritative server(s), and from
        the DoH resolver when one is configured.  False when answers came
        back without it; fails with :class:`~echfront.dns.verify.PublishError`
        when a source could not be asked.
        """


@dataclass(frozen=True)
class ServiceContext:
    """What a local factory or router factory named in the config is given.

    :ivar reactor: the reactor (use it; never import the global one).
    :ivar options: the ``options`` table of its section.
    :ivar keys: returns the key set currently in service (changes on reload).
    :ivar public_name: the public name, if known.
    :ivar alpn: the ALPN ids configured for the service.
    :ivar backends: for routers: configured backends by name.
    :ivar locals: for routers: configured local services by name; the
        public-name service, when configured, is ``locals["public"]``.
    :ivar static: for routers: the router built from ``[[routes]]``, to
        delegate to.
    """

    reactor: Any
    options: Mapping[str, Any]
    keys: Callable[[], KeySet]
    public_name: str | None = None
    alpn: tuple[str, ...] = ()
    backends: Mapping[str, Backend] = field(default_factory=dict)
    locals: Mapping[str, Local] = field(default_factory=dict)
    static: IRouter | None = None


# -- key stores ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredKey:
    """One private key and its ECHConfigs, and where it is in its life (RFC 9849 §4.1).

    :ivar key_id: unique in the store and never reused while the key exists
        (``ech-<created>-<config_id>``, the key directory's file stem).
    :ivar keys: the configs sharing this private key, as loaded keys;
        ``published`` is true exactly when :attr:`state` is active.
    :ivar state: pending (decrypt-only, not yet published), active
        (published) or retired (decrypt-only until :attr:`retire_after`).
    :ivar created: when the key was made (UTC, to the second).
    :ivar retire_after: for a retired key, when it may be deleted.
    """

    key_id: str
    keys: tuple[ECHKey, ...]
    state: KeyState
    created: datetime.datetime
    retire_after: datetime.datetime | None = None

    @property
    def config_ids(self) -> tuple[int, ...]:
        """The config_ids of :attr:`keys`."""
        return tuple(key.config_id for key in self.keys)


@dataclass(frozen=True)
class MemberStatus:
    """One registered front, as it last reported itself (the load barrier reads this).

    :ivar name: the member's name, unique in the fleet.
    :ivar loaded: key ids of every key the member has in service (its
        current key set, pending ones included).
    :ivar revision: the store revision of the snapshot it loaded (etcd's
        revision; 0 for the key directory).
    :ivar reported: when it last reported (seconds since the epoch, its clock).
    :ivar info: what it said about itself at registration (host, pid, version).
    """

    name: str
    loaded: frozenset[str]
    revision: int
    reported: float
    info: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreSnapshot:
    """The whole key set and the live members, read at one point in the store's history.

    :ivar keys: every key, oldest first.
    :ivar members: every live member, by name.
    :ivar revision: the store revision the snapshot reflects (etcd's header
        revision: it grows with every change; 0 for the key directory).
    """

    keys: tuple[StoredKey, ...]
    members: tuple[MemberStatus, ...]
    revision: int

    def in_state(self, state: KeyState) -> tuple[StoredKey, ...]:
        """The keys in ``state``, oldest first."""
        return tuple(key for key in self.keys if key.state is state)

    @property
    def key_ids(self) -> frozenset[str]:
        """The id of every key."""
        return frozenset(key.key_id for key in self.keys)

    def ech_keys(self) -> list[ECHKey]:
        """Every loaded key, in key order: what a front builds its KeySet from."""
        return [ech for key in self.keys for ech in key.keys]

    def taken_ids(self) -> frozenset[int]:
        """Every config_id in use."""
        return frozenset(i for key in self.keys for i in key.config_ids)


@dataclass(frozen=True)
class StateChange:
    """Move one key from ``expected`` to ``state`` (see :meth:`IKeyStore.change_states`)."""

    key_id: str
    expected: KeyState
    state: KeyState
    retire_after: datetime.datetime | None = None


@dataclass(frozen=True)
class Fence:
    """A write condition that stops a deposed leader (lease fencing).

    A write carrying a fence happens only while the store entry ``key``
    (a name under the store's prefix: the election's leader entry) exists
    with creation revision ``revision``.  The entry is tied to the leader's
    lease, so once that lease is gone no write of the old leader can land,
    whatever its clock or its view of the world says.
    """

    key: str
    revision: int


class IKeyWatch(Interface):
    """A running watch of a key store (:meth:`IKeyStore.watch`)."""

    connected = Attribute("True while changes stream in; False while resynchronising.")
    revision = Attribute("The store revision of the last snapshot delivered (0: none yet).")

    def stop() -> Deferred[None]:
        """Stop watching; no callback runs once the Deferred fires."""


class IMembership(Interface):
    """A front's registration in a fleet (:meth:`IKeyStore.register`)."""

    name = Attribute("The member's name.")

    def report(loaded: Iterable[str], revision: int) -> Deferred[None]:
        """Say which keys this member has in service, from the snapshot at ``revision``.

        Report after every key set the front has actually put into service
        (never before): the load barrier trusts it.  The last report is
        kept and re-sent when the registration is renewed after it lapsed.
        Fails with :class:`~echfront.keys.stores.KeyStoreError` when the
        store cannot be reached.
        """

    def leave() -> Deferred[None]:
        """Stop renewing and remove the registration now (shutdown).

        When the store cannot be reached, the registration lapses by itself
        after its TTL.
        """


class IKeyStore(Interface):
    """Where a deployment's ECH keys live, with their states and the fleet's members.

    The lifecycle it supports (RFC 9849 §4.1, §8.1; checklist CFG-5, CFG-10):
    a leader adds a *pending* key (every front loads it, so it decrypts
    before any client can learn it), waits until every live member
    reports it loaded (load barrier), publishes it and, once the DNS shows
    it (DNS barrier), makes it *active* and the previous active key
    *retired* in one atomic change; retired keys are deleted after their
    grace.  Every write is idempotent under retries: a leader that lost its
    answer (or a new leader resuming) re-reads the snapshot and repeats.

    Writes take an optional :class:`Fence`; without one, the caller must
    be the only writer by other means (the key directory's lock).
    Failures are :class:`~echfront.keys.stores.KeyStoreError` (the store
    cannot be reached or refused the request, one-line message);
    :class:`~echfront.keys.stores.FenceLost` when a fence no longer holds.
    """

    def load() -> Deferred[StoreSnapshot]:
        """Read the whole key set and the live members, consistently.

        All of it comes from one revision (etcd: one linearizable read), so
        a front never starts with a partial set.  Fails, and never returns a
        partial or empty set instead, when the store cannot be reached or a
        key cannot be opened (a key sealed under a KEK this front lacks).
        """

    def watch(
        on_change: Callable[[StoreSnapshot], object],
        on_error: Callable[[str], object] | None = None,
    ) -> IKeyWatch:
        """Follow the store: ``on_change`` gets a full snapshot after every change.

        The first call brings the whole set (as :meth:`load`); then one
        call per committed change to keys or members (changes committed
        together arrive together), in revision order, within about a
        second of the commit while the store is reachable.  When the
        connection is lost or the history was compacted, the watch reads
        everything again and calls ``on_change`` once if anything differs;
        meanwhile there is no call, so the consumer keeps serving its last
        keys.  ``on_error`` gets a one-line reason for each lost connection
        or failed attempt; it retries on its own until :meth:`IKeyWatch.stop`.
        """

    def add_key(
        build: Callable[[frozenset[int]], Sequence[ECHKey]],
        state: KeyState,
        *,
        created: datetime.datetime | None = None,
        fence: Fence | None = None,
    ) -> Deferred[StoredKey]:
        """Add a key whose config_ids are unique in the store.

        ``build`` gets the config_ids in use and returns the configs of one
        new private key with config_ids outside that set
        (:func:`~echfront.ech.keyset.generate_key` with ``taken_ids``).  The
        ids are claimed by compare-and-swap together with the key: if
        another writer claimed one first, ``build`` is called again with
        the new set (a bounded number of times).  So two writers never hold
        the same config_id, even concurrently on different machines.
        """

    def change_states(
        changes: Sequence[StateChange], *, fence: Fence | None = None
    ) -> Deferred[bool]:
        """Apply every change, or none, atomically.

        True when applied, or when every key already is in its new state
        with its new ``retire_after`` (a retry); False, with nothing
        changed, when some key is missing or in neither state.  Watchers
        see all the changes in one snapshot: there is never a moment with
        the new key active and the old one not yet retired.
        """

    def delete_key(
        key_id: str, expected: KeyState, *, fence: Fence | None = None
    ) -> Deferred[bool]:
        """Delete a key in state ``expected`` and free its config_ids.

        True when deleted or already gone; False when it is in another state.
        """

    def register(
        name: str, ttl: float, info: Mapping[str, str] | None = None
    ) -> Deferred[IMembership]:
        """Register this front as member ``name`` (unique in the fleet) for ``ttl`` seconds.

        The registration is renewed every ``ttl``/3 seconds while the
        process lives and lapses ``ttl`` seconds after it stops being
        renewed (a crashed or cut-off front drops out of the load barrier
        by itself).  A registration under the same name replaces the
        previous one (a restarted front).
        """

    def close() -> Deferred[None]:
        """Stop every watch and registration of this store object and release its connections."""
