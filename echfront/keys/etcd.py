# -*- test-case-name: tests.test_etcd -*-
"""An etcd v3 client on the Twisted reactor, through etcd's JSON gRPC gateway.

Why not a library: python-etcd3, the usual choice, has had no release since
0.12.0 (2020); its generated protobuf modules no longer import with
protobuf 4 or later ("Descriptors cannot be created directly",
kragniz/python-etcd3#1957, #2709), and its calls block, so each would need a
thread beside the reactor that serves ClientHellos.  The asyncio clients
would need a second event loop.  Every etcd v3 server (3.4 and later) also
serves its API as JSON over HTTP on the client port: the gRPC gateway under
``/v3/``.  Through ``treq`` that is plain non-blocking HTTP/1.1 and TLS on
the reactor, with nothing to install besides treq (Twisted's own HTTP
client underneath).  The gateway's JSON conventions are hidden in
:mod:`echfront.keys.etcdapi`; a streaming call (the watch) answers with one
JSON object per line, ``{"result": ...}`` or ``{"error": ...}``.
The price: one HTTP connection per watch, and no watch multiplexing.

What is used: ``/v3/kv/range``, ``put``, ``deleterange``, ``txn`` and
``compaction``; ``/v3/watch`` (streamed); ``/v3/lease/grant``,
``keepalive``, ``revoke``; ``/v3/auth/authenticate``.

Failover: requests go to one endpoint until it fails to answer (refused,
timed out, cut off, or etcd's Unavailable such as "no leader"), then to the
next, each endpoint at most once per request.  With a user, the client
authenticates first and again when etcd says the token is no longer valid
(a restarted member forgets simple tokens).  Watches ask etcd to cancel
them when their member loses the raft leader (``hasleader`` metadata), so a
member cut off from the quorum does not leave a silent stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import treq
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from echfront.errors import ConfigError
from echfront.keys.etcdapi import (
    UNAUTHENTICATED,
    EtcdError,
    EtcdSettings,
    EtcdUnavailable,
    KeyValue,
    TxnResult,
    b64,
    error_from_answer,
    header_revision,
    put_op,
)

__all__ = ["EtcdClient", "WatchStream"]


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """Verify etcd servers against the configured CA; present the client certificate."""

    def __init__(self, settings: EtcdSettings) -> None:
        try:
            self._trust = (
                Certificate.loadPEM(settings.ca_file.read_bytes())
                if settings.ca_file is not None
                else None
            )
            # The client certificate goes to pyOpenSSL as cryptography
            # objects: its own X509 and PKey types are deprecated there, and
            # Twisted's clientCertificate argument would hand those over.
            self._client: dict[str, object] = {}
            if settings.cert_file is not None and settings.key_file is not None:
                certificate = x509.load_pem_x509_certificate(settings.cert_file.read_bytes())
                key = serialization.load_pem_private_key(settings.key_file.read_bytes(), None)
                self._client = {"certificate": certificate, "privateKey": key}
        except OSError as error:
            where = error.filename
            raise ConfigError(f"etcd TLS: cannot read {where} ({error.strerror})") from None
        except Exception as error:  # OpenSSL's errors for a malformed PEM file
            raise ConfigError(f"etcd TLS: unreadable certificate or key ({error})") from None
        if self._client and key.public_key() != certificate.public_key():
            # Found here, not by the first TLS handshake, at start-up.
            raise ConfigError(
                f"etcd TLS: {settings.key_file} is not the key of {settings.cert_file}"
            )

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """TLS options for one endpoint (RFC 6125 name check, IP addresses included)."""
        return optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust,
            extraCertificateOptions=dict(self._client),
        )


class _LineStream(Protocol):
    """Splits a streamed gateway answer into JSON messages, one per line."""

    def __init__(self, on_message: Callable[[Mapping[str, Any]], object]) -> None:
        self.on_message = on_message
        self.buffer = b""
        self.done: Deferred[None] = Deferred()
        self.stopping = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip() and not self.stopping:
                self._deliver(line)

    def _deliver(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self._fail(EtcdUnavailable("etcd watch: unreadable message"))
            return
        if not isinstance(message, dict):
            self._fail(EtcdUnavailable("etcd watch: unexpected message"))
            return
        try:
            self.on_message(message)
        except EtcdError as error:
            self._fail(error)

    def _fail(self, error: EtcdError) -> None:
        if not self.done.called:
            self.done.errback(Failure(error))
        self.stop()

    def stop(self) -> None:
        self.stopping = True
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.buffer.strip() and not self.stopping:
            self._deliver(self.buffer)
        if self.done.called:
            return
        if self.stopping or reason.check(ResponseDone):
            self.done.callback(None)
        else:
            cause = reason.getErrorMessage() if reason.value is None else _reason(reason.value)
            lost = EtcdUnavailable(f"etcd stream lost: {cause}")
            self.done.errback(Failure(lost))


class WatchStream:
    """One ``/v3/watch`` stream; :attr:`done` fires when it ends, fails when it breaks."""

    def __init__(self, endpoint: str) -> None:
        """An unconnected stream to ``endpoint``."""
        self.endpoint = endpoint
        self.done: Deferred[None] = Deferred()
        self._protocol: _LineStream | None = None
        self._stopped = False

    def stop(self) -> None:
        """End the stream (its :attr:`done` then fires with None)."""
        self._stopped = True
        if self._protocol is not None:
            self._protocol.stop()


class EtcdClient:
    """etcd v3 over its JSON gateway, on the reactor (see the module docstring).

    :param reactor: the reactor (connections, timeouts).
    :raises ConfigError: for unreadable TLS files.
    """

    def __init__(self, settings: EtcdSettings, reactor: Any) -> None:
        """Prepare connections; nothing is sent until the first request."""
        self.settings = settings
        self.reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 2
        # A request is never re-sent behind our back: a txn whose answer was
        # lost is recognised by the store, which re-reads before retrying.
        self._pool.retryAutomatically = False
        agent = Agent(
            reactor,
            contextFactory=_TLSPolicy(settings),
            connectTimeout=settings.timeout,
            pool=self._pool,
        )
        self._http = HTTPClient(agent)
        self._current = 0
        self._token: str | None = None
        self._streams: set[WatchStream] = set()

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to now."""
        return self.settings.endpoints[self._current]

    def _headers(self) -> dict[bytes | str, list[bytes | str]]:
        headers: dict[bytes | str, list[bytes | str]] = {"Content-Type": ["application/json"]}
        if self._token is not None:
            headers["Authorization"] = [self._token]
        return headers

    async def _post(self, endpoint: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """One request to one endpoint; its JSON answer.

        :raises EtcdUnavailable: no answer, or etcd's Unavailable.
        :raises EtcdError: any other refusal.
        """
        request = self._http.request(
            "POST",
            endpoint + path,
            data=json.dumps(body).encode(),
            headers=self._headers(),
            reactor=self.reactor,
        )
        request.addTimeout(self.settings.timeout, self.reactor)
        try:
            response = await request
            reading = treq.content(response)
            reading.addTimeout(self.settings.timeout, self.reactor)
            raw = await reading
        except _NO_ANSWER as error:
            raise EtcdUnavailable(f"etcd {endpoint}: no answer ({_reason(error)})") from None
        try:
            answer = json.loads(raw)
        except ValueError:
            text = " ".join(raw[:200].decode("utf-8", "replace").split())
            if response.code == 200 or response.code >= 500:
                raise EtcdUnavailable(
                    f"etcd {endpoint}: HTTP {response.code} without JSON "
                    f"(not an etcd v3 gateway?) {text}"
                ) from None
            raise EtcdError(f"etcd {endpoint}: HTTP {response.code}: {text}") from None
        if not isinstance(answer, dict):
            raise EtcdUnavailable(f"etcd {endpoint}: unexpected answer")
        if response.code != 200 or "error" in answer:
            raise error_from_answer(endpoint, answer, response.code)
        return answer

    async def call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the current endpoint, failing over to the others.

        :raises EtcdUnavailable: when no endpoint answered.
        :raises EtcdError: when etcd refused the request.
        """
        errors = []
        endpoints = self.settings.endpoints
        reauthenticated = False
        attempts = 0
        while attempts < len(endpoints):
            endpoint = self.endpoint
            try:
                if self.settings.username is not None and self._token is None:
                    await self._authenticate(endpoint)
                return await self._post(endpoint, path, body)
            except EtcdUnavailable as error:
                errors.append(str(error))
                self._current = (self._current + 1) % len(endpoints)
                attempts += 1
            except EtcdError as error:
                if error.code == UNAUTHENTICATED and self._token and not reauthenticated:
                    self._token = None  # expired or forgotten by a restarted member
                    reauthenticated = True
                    continue
                raise
        raise EtcdUnavailable("; ".join(errors))

    async def _authenticate(self, endpoint: str) -> None:
        answer = await self._post(
            endpoint,
            "/v3/auth/authenticate",
            {"name": self.settings.username, "password": self.settings.password},
        )
        token = answer.get("token")
        if not isinstance(token, str):
            raise EtcdError(f"etcd {endpoint}: authentication gave no token")
        self._token = token

    # -- key-value ------------------------------------------------------------------

    async def range(
        self, key: bytes, range_end: bytes = b"", *, revision: int = 0
    ) -> tuple[list[KeyValue], int]:
        """Read ``key`` (or ``[key, range_end)``): the key-values and the store revision.

        Linearizable: the answer includes every write committed before it.
        """
        body: dict[str, Any] = {"key": b64(key)}
        if range_end:
            body["range_end"] = b64(range_end)
        if revision:
            body["revision"] = revision
        answer = await self.call("/v3/kv/range", body)
        kvs = [KeyValue.from_json(kv) for kv in answer.get("kvs", [])]
        return kvs, header_revision(answer)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write ``value`` at ``key``; the new revision."""
        answer = await self.call("/v3/kv/put", put_op(key, value, lease)["request_put"])
        return header_revision(answer)

    async def delete_range(self, key: bytes, range_end: bytes = b"") -> int:
        """Delete ``key`` (or ``[key, range_end)``); how many keys were deleted."""
        body: dict[str, Any] = {"key": b64(key)}
        if range_end:
            body["range_end"] = b64(range_end)
        answer = await self.call("/v3/kv/deleterange", body)
        return int(answer.get("deleted", 0))

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> TxnResult:
        """If every ``compare`` holds, run ``success``, else ``failure`` (one atomic step)."""
        answer = await self.call(
            "/v3/kv/txn", {"compare": compare, "success": success, "failure": failure or []}
        )
        return TxnResult(
            succeeded=bool(answer.get("succeeded", False)),
            revision=header_revision(answer),
            responses=tuple(answer.get("responses", [])),
        )

    async def compact(self, revision: int) -> None:
        """Discard the history before ``revision`` (physically, before returning)."""
        await self.call("/v3/kv/compaction", {"revision": revision, "physical": True})

    # -- leases ------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        answer = await self.call("/v3/lease/grant", {"TTL": ttl})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its remaining TTL, 0 when it has expired."""
        answer = await self.call("/v3/lease/keepalive", {"ID": lease})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, deleting every key attached to it (gone already: fine)."""
        try:
            await self.call("/v3/lease/revoke", {"ID": lease})
        except EtcdError as error:
            if "lease not found" not in str(error):
                raise

    # -- watch ---------------------------------------------------------------------

    async def watch(
        self,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        on_message: Callable[[Mapping[str, Any]], object],
    ) -> WatchStream:
        """Open a watch of ``[key, range_end)`` from ``start_revision`` on the current endpoint.

        Returns once etcd accepted it; ``on_message`` then gets each
        ``result`` object (events, progress, cancellation), and may raise
        :class:`EtcdError` to end the stream with that error.  The caller
        reconnects; a stream never moves to another endpoint by itself.
        """
        if self.settings.username is not None and self._token is None:
            await self.call("/v3/kv/range", {"key": b64(key), "count_only": True})
        stream = WatchStream(self.endpoint)
        body = {
            "create_request": {
                "key": b64(key),
                "range_end": b64(range_end),
                "start_revision": start_revision,
                "progress_notify": True,
            }
        }
        headers = self._headers()
        headers["Grpc-Metadata-Hasleader"] = ["true"]
        request = self._http.request(
            "POST",
            stream.endpoint + "/v3/watch",
            data=json.dumps(body).encode(),
            headers=headers,
            unbuffered=True,
            reactor=self.reactor,
        )
        request.addTimeout(self.settings.timeout, self.reactor)
        try:
            response: IResponse = await request
        except _NO_ANSWER as error:
            self._current = (self._current + 1) % len(self.settings.endpoints)
            raise EtcdUnavailable(
                f"etcd {stream.endpoint}: watch not opened ({_reason(error)})"
            ) from None
        if response.code != 200:
            raw = await treq.content(response)
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = {}
            raise error_from_answer(stream.endpoint, answer, response.code)

        def message(data: Mapping[str, Any]) -> None:
            if "error" in data:
                raise error_from_answer(stream.endpoint, data, 503)
            result = data.get("result")
            if isinstance(result, dict):
                on_message(result)

        protocol = _LineStream(message)
        stream._protocol = protocol
        protocol.done.chainDeferred(stream.done)
        self._streams.add(stream)

        def forget(result: object) -> object:
            self._streams.discard(stream)
            return result

        stream.done.addBoth(forget)
        response.deliverBody(protocol)
        if stream._stopped:
            protocol.stop()
        return stream

    async def close(self) -> None:
        """Stop every watch stream and close idle connections."""
        for stream in list(self._streams):
            stream.stop()
        for stream in list(self._streams):
            await stream.done.addErrback(lambda failure: None)
        await self._pool.closeCachedConnections()


#: What a request that got no answer raises (refused, timed out, TLS failed, cut off).
_NO_ANSWER = (
    ConnectError,
    ConnectingCancelledError,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    TimeoutError,
    CancelledError,
    OSError,
)


def _reason(error: BaseException) -> str:
    """One line for a failed request; Twisted's HTTP client wraps the real causes."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(" ".join(str(r.getErrorMessage()).split()) for r in reasons)[:200]
    return " ".join(str(error).split())[:200] or type(error).__name__
