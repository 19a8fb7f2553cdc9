"""APNs provider on aioapns 4.0: VoIP pushes for incoming calls, alert pushes for missed calls.

Every APNs answer goes through one table (`classify`) into delivered / token rejected / temporary / permanent.
A push is retried only when it was certainly not accepted: an HTTP 429 or 5xx answer, a failure to connect, a
stream the server refused (REFUSED_STREAM, or above a GOAWAY's last stream id). A timeout or a connection lost
after the request was written is ambiguous (APNs may have delivered it), so it ends the push as TEMPORARY without
a retry: a device must never ring twice for one call. Retries reuse the push's `apns-id`, back off for tens of
milliseconds, and never run past the push's deadline.

aioapns 4.0 is used for its connection pool, TLS set-up and JWT signing; its HTTP/2 protocol is subclassed
(`_Connection`) to fix what it gets wrong:

(a) no per-request timeout: every attempt is bounded here by min(deadline, `request_timeout`);
(b) once a request was cancelled, a later connection loss raised `InvalidStateError` half-way through failing
    the waiters, leaving the rest waiting forever: our streams are failed one by one, skipping finished futures,
    and a given-up stream is removed (and reset) at once;
(c) received DATA was never acknowledged, so ~64 KiB of error bodies stalled the connection: every DATA frame is
    acknowledged (and bodies are parsed per stream at END_STREAM, not per frame);
(d) clients must be created inside the running loop: they are created lazily, one per environment, on first use;
(e) `key` takes PEM text, not a path: the key file is read (and checked) in `start()`;
(f) idle connections close after 10 s, so a rare call paid a TLS handshake: a keep-warm task PINGs idle
    connections every `keepalive_interval`, closes one whose PING goes unanswered, and reconnects environments
    that lost their connection;
(g) each new connection signed its own JWT (Apple refuses frequent provider-token updates): one signer is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import aioapns
from aioapns.connection import (
    APNsTLSClientProtocol,
    AuthorizationHeaderProvider,
    JWTAuthorizationHeaderProvider,
)
from aioapns.exceptions import ConnectionClosed
from aioapns.exceptions import ConnectionError as ApnsConnectError
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import NoAvailableStreamIDError, ProtocolError
from h2.settings import ChangedSetting, SettingCodes

from push.base import IncomingCallPush, MissedCallAlert, Outcome, PushConfigError, PushResult
from push.payload import incoming_call_payload, missed_call_payload
from signaling.log import get_logger
from signaling.models import PushEnvironment

log = get_logger("push.apns")

PRODUCTION_HOST: Final = "api.push.apple.com"
SANDBOX_HOST: Final = "api.sandbox.push.apple.com"

# APNs device tokens are hex strings; anything else would not even make a valid :path.
_TOKEN_RE: Final = re.compile(r"[0-9a-fA-F]{8,400}")
# Error bodies are tiny JSON documents; a body bigger than this is not from APNs and is not kept.
_MAX_BODY: Final = 64 * 1024
# aioapns insists on a default topic; every request here sets its own `apns-topic`.
_UNUSED_TOPIC: Final = "siplite.topic-set-per-request"


# --- configuration ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApnsConfig:
    """How to reach APNs. Token auth (`key_file` + `key_id` + `team_id`) or certificate auth (`cert_file`)."""

    # Token auth: the .p8 signing key (PEM, EC P-256), its 10-character key id, the developer team id.
    key_file: Path | None = None
    key_id: str | None = None
    team_id: str | None = None
    # Certificate auth: one PEM file holding the client certificate and its private key.
    cert_file: Path | None = None
    # Endpoints per environment (a device binding says which one issued its token); overridable for staging.
    production_host: str = PRODUCTION_HOST
    production_port: int = 443
    sandbox_host: str = SANDBOX_HOST
    sandbox_port: int = 443
    # CA bundle to trust instead of the system's (a staging endpoint, the test server).
    ca_file: Path | None = None
    # Bound on one attempt (connecting included); the push's deadline bounds it too.
    request_timeout: float = 5.0
    # Pushes in flight beyond this fail at once with TEMPORARY "overloaded".
    max_in_flight: int = 1000
    # Attempts per push (only 429/5xx answers and connect failures are retried) and the first backoff.
    max_attempts: int = 3
    retry_backoff: float = 0.05
    # HTTP/2 connections per environment.
    max_connections: int = 4
    # Keep-warm: PING idle connections this often (None: never); a PING unanswered for `keepalive_timeout`
    # closes the connection. Environments listed in `preconnect` are connected at start-up.
    keepalive_interval: float | None = 5.0
    keepalive_timeout: float = 5.0
    preconnect: tuple[PushEnvironment, ...] = ()
    # aioapns closes a connection idle for this long (PINGs count as activity).
    idle_timeout: float = 10.0
    # Missed-call alerts stay deliverable on APNs for this long.
    missed_call_ttl: float = 86400.0

    def endpoint(self, environment: PushEnvironment) -> tuple[str, int]:
        if environment is PushEnvironment.SANDBOX:
            return self.sandbox_host, self.sandbox_port
        return self.production_host, self.production_port


@dataclass(frozen=True, slots=True)
class _Credentials:
    key_pem: str | None
    key_id: str | None
    team_id: str | None
    cert_file: str | None


def _fail(setting: str, message: str) -> PushConfigError:
    return PushConfigError(f"APNs {setting}: {message}", setting=setting)


def _read(setting: str, path: Path) -> bytes:
    # aioapns wants the key's text, so a PEM document pasted where its path belongs is an easy slip: refuse it
    # by name, without echoing the key into an error message or a log.
    if "-----BEGIN" in str(path):
        raise _fail(setting, "holds PEM text, not a path: give the path of the file (it is read at start)")
    try:
        return path.read_bytes()
    except OSError as e:
        raise _fail(setting, f"cannot read {path}: {e.strerror or e}") from e


def load_credentials(config: ApnsConfig) -> _Credentials:
    """Check `config` and read its key or certificate. Raises `PushConfigError` naming the setting at fault."""
    checks: list[tuple[str, bool, str]] = [
        ("request_timeout", config.request_timeout > 0, "must be > 0"),
        ("max_in_flight", config.max_in_flight >= 1, "must be >= 1"),
        ("max_attempts", config.max_attempts >= 1, "must be >= 1"),
        ("retry_backoff", config.retry_backoff >= 0, "must be >= 0"),
        ("max_connections", config.max_connections >= 1, "must be >= 1"),
        ("keepalive_interval", config.keepalive_interval is None or config.keepalive_interval > 0, "must be > 0"),
        ("keepalive_timeout", config.keepalive_timeout > 0, "must be > 0"),
        ("idle_timeout", config.idle_timeout > 0, "must be > 0"),
        ("production_host", bool(config.production_host), "is empty"),
        ("sandbox_host", bool(config.sandbox_host), "is empty"),
        ("production_port", 0 < config.production_port < 65536, "is not a port"),
        ("sandbox_port", 0 < config.sandbox_port < 65536, "is not a port"),
    ]
    for setting, ok, problem in checks:
        if not ok:
            raise _fail(setting, problem)
    if config.ca_file is not None:
        _read("ca_file", config.ca_file)
        try:
            ssl.create_default_context(cafile=str(config.ca_file))
        except ssl.SSLError as e:
            raise _fail("ca_file", f"{config.ca_file} holds no usable CA certificate ({e.reason})") from e

    if config.key_file is not None and config.cert_file is not None:
        raise _fail("cert_file", "set either key_file (token auth) or cert_file (certificate auth), not both")
    if config.cert_file is not None:
        _read("cert_file", config.cert_file)
        try:
            ssl.create_default_context().load_cert_chain(str(config.cert_file))
        except ssl.SSLError as e:
            raise _fail(
                "cert_file", f"{config.cert_file} is not a PEM certificate with its key ({e.reason})"
            ) from e
        return _Credentials(None, None, None, str(config.cert_file))
    if config.key_file is None:
        raise _fail("key_file", "no credentials: set key_file, key_id and team_id (or cert_file)")

    data = _read("key_file", config.key_file)
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise _fail("key_file", f"{config.key_file} is not a PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _fail("key_file", f"{config.key_file} is not an EC P-256 key (APNs signs with ES256)")
    if not (config.key_id or "").strip():
        raise _fail("key_id", "missing (the 10-character id of the signing key)")
    if not (config.team_id or "").strip():
        raise _fail("team_id", "missing (the developer team id)")
    return _Credentials(data.decode("ascii"), config.key_id, config.team_id, None)


# --- classification ---------------------------------------------------------------------------------------------

# (status, reason) -> outcome; a `None` reason matches any reason for that status. Anything absent: 5xx is
# TEMPORARY, the rest PERMANENT.
CLASSIFICATION: Final[dict[tuple[int, str | None], Outcome]] = {
    (200, None): Outcome.DELIVERED,
    # Unregistered / ExpiredToken: the token is dead since the answer's `timestamp`.
    (410, None): Outcome.TOKEN_REJECTED,
    (400, "BadDeviceToken"): Outcome.TOKEN_REJECTED,
    (400, "DeviceTokenNotForTopic"): Outcome.TOKEN_REJECTED,
    (400, "TopicDisallowed"): Outcome.TOKEN_REJECTED,
    (400, None): Outcome.PERMANENT,
    # BadCertificate, ExpiredProviderToken, InvalidProviderToken, MissingProviderToken, Forbidden...
    (403, None): Outcome.PERMANENT,
    (404, None): Outcome.PERMANENT,
    (405, None): Outcome.PERMANENT,
    (413, None): Outcome.PERMANENT,
    # TooManyRequests (for this token), TooManyProviderTokenUpdates.
    (429, None): Outcome.TEMPORARY,
    (500, None): Outcome.TEMPORARY,
    (503, None): Outcome.TEMPORARY,
}


def classify(status: int, reason: str | None) -> Outcome:
    """The outcome of one APNs answer. TEMPORARY answers are the only retryable ones."""
    outcome = CLASSIFICATION.get((status, reason)) or CLASSIFICATION.get((status, None))
    if outcome is not None:
        return outcome
    return Outcome.TEMPORARY if 500 <= status < 600 else Outcome.PERMANENT


# --- one HTTP/2 connection --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApnsRequest:
    """One notification as it goes on the wire. Retries send the same object (same `apns_id`)."""

    token: str
    topic: str
    push_type: str
    priority: int
    expiration: int
    apns_id: str
    payload: bytes
    collapse_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    reason: str | None
    timestamp: float | None  # as APNs sent it: epoch milliseconds


class _NotSent(Exception):
    """The request certainly did not reach APNs (no connection, or refused unprocessed): safe to retry."""


@dataclass(slots=True)
class _Stream:
    future: asyncio.Future[_Answer]
    status: int = 0
    body: bytearray = field(default_factory=bytearray)


class _Connection(APNsTLSClientProtocol):
    """aioapns' protocol with its event handling replaced (see the module docstring, defects b, c, f)."""

    IDLE_TIMEOUT: float = 10.0
    # One JWT signer for every connection of a client (defect g); None for certificate auth.
    SHARED_AUTH: AuthorizationHeaderProvider | None = None

    def __init__(
        self,
        apns_topic: str,
        loop: asyncio.AbstractEventLoop | None = None,
        on_connection_lost: Callable[[Any], Any] | None = None,
        auth_provider: AuthorizationHeaderProvider | None = None,
    ) -> None:
        super().__init__(apns_topic, loop, on_connection_lost, self.SHARED_AUTH or auth_provider)
        self._streams: dict[int, _Stream] = {}
        self._lost = False
        self._window_open = asyncio.Event()
        self._ping_sent_at: float | None = None

    # aioapns' timer closes the connection after IDLE_TIMEOUT without a write; never under a pending request.
    def refresh_inactivity_timer(self) -> None:
        if self.inactivity_timer:
            self.inactivity_timer.cancel()
        self.inactivity_timer = self.loop.call_later(self.IDLE_TIMEOUT, self._idle)

    def _idle(self) -> None:
        if self._streams:
            self.refresh_inactivity_timer()
        else:
            self.close()

    @property
    def usable(self) -> bool:
        return not self._lost and self.transport is not None and not self.transport.is_closing()

    async def send_push(self, request: ApnsRequest) -> _Answer:
        """Send `request` and wait for its answer. Raises `_NotSent` or `ConnectionClosed` (maybe delivered)."""
        try:
            stream_id = await self.free_channels.acquire()
        except ConnectionClosed as e:
            raise _NotSent("connection lost before sending") from e
        except NoAvailableStreamIDError as e:
            self.free_channels.release()
            self.close()
            raise _NotSent("stream ids exhausted") from e
        try:
            return await self._exchange(stream_id, request)
        finally:
            self.free_channels.release()
            # Still pending here means we gave up on it (timeout, cancellation): forget it and tell the server.
            if self._streams.pop(stream_id, None) is not None and self.usable:
                with contextlib.suppress(ProtocolError):
                    self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                    self.flush()

    async def _exchange(self, stream_id: int, request: ApnsRequest) -> _Answer:
        size = len(request.payload)
        while self.usable and min(self.conn.outbound_flow_control_window, self._initial_window()) < size:
            self._window_open.clear()
            await self._window_open.wait()
        if not self.usable:
            raise _NotSent("connection closing")
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", f"/3/device/{request.token}"),
            (":authority", self.APNS_SERVER),
            ("apns-id", request.apns_id),
            ("apns-topic", request.topic),
            ("apns-push-type", request.push_type),
            ("apns-priority", str(request.priority)),
            ("apns-expiration", str(request.expiration)),
        ]
        if request.collapse_id is not None:
            headers.append(("apns-collapse-id", request.collapse_id))
        if self.auth_provider is not None:
            headers.append(("authorization", self.auth_provider.get_header()))
        try:
            self.conn.send_headers(stream_id, headers)
            self.conn.send_data(stream_id, request.payload, end_stream=True)
        except ProtocolError as e:
            # Nothing was flushed; a half-built stream is reset so the server never processes it.
            with contextlib.suppress(ProtocolError):
                self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            raise _NotSent(f"h2 refused the request: {e}") from e
        stream = _Stream(self.loop.create_future())
        self._streams[stream_id] = stream
        self.flush()
        return await stream.future

    def _initial_window(self) -> int:
        return int(self.conn.remote_settings.initial_window_size)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.abort()
            return
        for event in events:
            if isinstance(event, ResponseReceived):
                stream = self._streams.get(event.stream_id or 0)
                if stream is not None:
                    status = dict(event.headers or []).get(b":status", b"")
                    stream.status = int(status) if status.isdigit() else 0
            elif isinstance(event, DataReceived):
                # Defect (c): hand the flow-control window back, or the server stops sending after 64 KiB.
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id or 0)
                stream = self._streams.get(event.stream_id or 0)
                if stream is not None and len(stream.body) < _MAX_BODY:
                    stream.body += event.data or b""
            elif isinstance(event, StreamEnded):
                stream = self._streams.pop(event.stream_id or 0, None)
                if stream is not None and not stream.future.done():
                    stream.future.set_result(_parse_answer(stream.status, bytes(stream.body)))
            elif isinstance(event, StreamReset):
                stream = self._streams.pop(event.stream_id or 0, None)
                if stream is not None and not stream.future.done():
                    refused = event.error_code == ErrorCodes.REFUSED_STREAM
                    exc = _NotSent("stream refused") if refused else ConnectionClosed("stream reset")
                    stream.future.set_exception(exc)
            elif isinstance(event, RemoteSettingsChanged):
                self.on_remote_settings_changed(cast(dict[SettingCodes, ChangedSetting], event.changed_settings))
                self._window_open.set()
            elif isinstance(event, WindowUpdated):
                self._window_open.set()
            elif isinstance(event, PingAckReceived):
                self._ping_sent_at = None
            elif isinstance(event, ConnectionTerminated):
                # GOAWAY: streams above last_stream_id were never processed, so they are safe to retry.
                last = event.last_stream_id if event.last_stream_id is not None else 2**31
                for stream_id in [s for s in self._streams if s > last]:
                    stream = self._streams.pop(stream_id)
                    if not stream.future.done():
                        stream.future.set_exception(_NotSent("GOAWAY"))
                self.close()
        if self.usable:
            self.flush()

    def keepalive_tick(self, now: float, timeout: float) -> None:
        """Keep-warm (defect f): PING when idle; abort if the last PING went unanswered for `timeout`."""
        if not self.usable:
            return
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at > timeout:
                self.abort()
            return
        if not self._streams:
            self.conn.ping(os.urandom(8))
            self._ping_sent_at = now
            self.flush()

    def _forget(self) -> None:
        # Leave the pool now, so no new request is handed a closing connection.
        if self.on_connection_lost is not None:
            with contextlib.suppress(ValueError):
                self.on_connection_lost(self)
            self.on_connection_lost = None

    def close(self) -> None:
        self._forget()
        super().close()

    def abort(self) -> None:
        self._forget()
        if self.inactivity_timer:
            self.inactivity_timer.cancel()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        # Defect (b): fail every waiter, skipping futures already done or cancelled, and never raise here.
        self._lost = True
        if self.inactivity_timer:
            self.inactivity_timer.cancel()
        self._forget()
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            if not stream.future.done():
                stream.future.set_exception(ConnectionClosed(str(exc)))
        self.free_channels.destroy(ConnectionClosed(str(exc)))
        self._window_open.set()


def _parse_answer(status: int, body: bytes) -> _Answer:
    reason: str | None = None
    timestamp: float | None = None
    if body:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            raw_reason, raw_ts = doc.get("reason"), doc.get("timestamp")
            reason = raw_reason if isinstance(raw_reason, str) else None
            if isinstance(raw_ts, int | float) and not isinstance(raw_ts, bool):
                timestamp = float(raw_ts)
    return _Answer(status, reason, timestamp)


def _connection_class(host: str, port: int, idle_timeout: float, auth: AuthorizationHeaderProvider | None) -> type:
    class Connection(_Connection):
        APNS_SERVER = host
        APNS_PORT = port
        IDLE_TIMEOUT = idle_timeout
        SHARED_AUTH = auth

    return Connection


# --- the provider -----------------------------------------------------------------------------------------------


class ApnsProvider:
    """`PushProvider` on APNs. Create it anywhere; `start()` (inside the event loop) checks the configuration."""

    name = "apns"

    def __init__(self, config: ApnsConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._credentials: _Credentials | None = None
        self._clients: dict[PushEnvironment, aioapns.APNs] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def start(self) -> None:
        """Check the configuration and read the credentials; raises `PushConfigError` naming the setting."""
        self._credentials = load_credentials(self.config)
        if self.config.keepalive_interval is not None or self.config.preconnect:
            for environment in self.config.preconnect:
                self._client(environment)
            self._keepalive = asyncio.create_task(self._keep_warm(), name="apns-keep-warm")

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None
        for client in self._clients.values():
            client.pool.close()
        self._clients.clear()

    async def send_incoming_call(self, push: IncomingCallPush) -> PushResult:
        request = ApnsRequest(
            token=push.token,
            topic=f"{push.bundle_id}.voip",
            push_type="voip",
            priority=10,
            # Floor, so APNs never holds the push past the ring deadline.
            expiration=int(push.deadline),
            apns_id=str(uuid.uuid4()),
            payload=incoming_call_payload(push) or b"",
        )
        return await self._send(request, push.environment, push.deadline, "incoming_call", push.call_id)

    async def send_missed_call(self, alert: MissedCallAlert) -> PushResult:
        expires = self._clock() + self.config.missed_call_ttl
        request = ApnsRequest(
            token=alert.token,
            topic=alert.bundle_id,
            push_type="alert",
            priority=10,
            expiration=int(expires),
            apns_id=str(uuid.uuid4()),
            payload=missed_call_payload(alert) or b"",
            # A resent notice for the same call replaces the first on the device.
            collapse_id=alert.call_id if len(alert.call_id.encode()) <= 64 else None,
        )
        return await self._send(request, alert.environment, expires, "missed_call", alert.call_id)

    # -- internals --

    def _client(self, environment: PushEnvironment) -> aioapns.APNs:
        # Defect (d): aioapns binds its pool to the running loop when created, so create clients on first use.
        client = self._clients.get(environment)
        if client is not None:
            return client
        credentials = self._credentials
        if credentials is None:
            raise RuntimeError("ApnsProvider.start() was not called")
        config = self.config
        context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        context.set_alpn_protocols(["h2"])
        common: dict[str, Any] = {
            "topic": _UNUSED_TOPIC,
            "max_connections": config.max_connections,
            "max_connection_attempts": 1,
            "use_sandbox": environment is PushEnvironment.SANDBOX,
            "ssl_context": context,
        }
        auth: AuthorizationHeaderProvider | None = None
        if credentials.cert_file is not None:
            client = aioapns.APNs(client_cert=credentials.cert_file, **common)
        else:
            # Defect (e): `key` is the PEM text, read in start().
            client = aioapns.APNs(
                key=credentials.key_pem, key_id=credentials.key_id, team_id=credentials.team_id, **common
            )
            auth = cast(
                AuthorizationHeaderProvider,
                JWTAuthorizationHeaderProvider(credentials.key_pem, credentials.key_id, credentials.team_id),
            )
        host, port = config.endpoint(environment)
        client.pool.protocol_class = _connection_class(host, port, config.idle_timeout, auth)
        self._clients[environment] = client
        return client

    async def _send(
        self, request: ApnsRequest, environment: PushEnvironment, deadline: float, kind: str, call_id: str
    ) -> PushResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        fields: dict[str, Any] = {
            "kind": kind,
            "call_id": call_id,
            "apns_id": request.apns_id,
            "environment": str(environment),
            "token": request.token,
        }

        def done(
            outcome: Outcome, status: int | None, reason: str | None, attempts: int, **extra: Any
        ) -> PushResult:
            result = PushResult(
                outcome=outcome,
                apns_id=request.apns_id,
                status=status,
                reason=reason,
                attempts=attempts,
                latency=loop.time() - started,
                **extra,
            )
            duration_ms = round(result.latency * 1000, 1)
            if outcome is Outcome.DELIVERED:
                log.info("push.sent", status=status, attempts=attempts, duration_ms=duration_ms, **fields)
            elif outcome is Outcome.TOKEN_REJECTED:
                log.warning(
                    "push.token_rejected",
                    status=status,
                    reason=reason,
                    token_invalid_since=result.token_invalid_since,
                    attempts=attempts,
                    **fields,
                )
            else:
                log.warning(
                    "push.failed",
                    outcome=str(outcome),
                    status=status,
                    reason=reason,
                    attempts=attempts,
                    duration_ms=duration_ms,
                    **fields,
                )
            return result

        if not request.payload:
            return done(Outcome.PERMANENT, None, "payload_too_large", 0)
        if not _TOKEN_RE.fullmatch(request.token):
            return done(Outcome.TOKEN_REJECTED, None, "BadDeviceToken", 0)
        if self._in_flight >= self.config.max_in_flight:
            return done(Outcome.TEMPORARY, None, "overloaded", 0)
        self._in_flight += 1
        try:
            client = self._client(environment)
            attempts = 0
            status: int | None = None
            reason: str | None = None
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return done(Outcome.TEMPORARY, status, reason or "deadline", attempts)
                attempts += 1
                try:
                    answer = await asyncio.wait_for(
                        self._attempt(client, request), min(remaining, self.config.request_timeout)
                    )
                except TimeoutError:
                    return done(Outcome.TEMPORARY, None, "timeout", attempts)
                except ConnectionClosed:
                    return done(Outcome.TEMPORARY, None, "connection", attempts)
                except _NotSent:
                    status, reason = None, "connection"
                else:
                    status, reason = answer.status, answer.reason
                    outcome = classify(answer.status, answer.reason)
                    if outcome is not Outcome.TEMPORARY:
                        since = answer.timestamp / 1000 if answer.status == 410 and answer.timestamp else None
                        return done(outcome, status, reason, attempts, token_invalid_since=since)
                backoff = self.config.retry_backoff * 2 ** (attempts - 1)
                if attempts >= self.config.max_attempts or self._clock() + backoff >= deadline:
                    return done(Outcome.TEMPORARY, status, reason, attempts)
                log.info(
                    "push.retry",
                    attempt=attempts,
                    status=status,
                    reason=reason,
                    backoff_ms=backoff * 1000,
                    **fields,
                )
                await asyncio.sleep(backoff)
        finally:
            self._in_flight -= 1

    async def _attempt(self, client: aioapns.APNs, request: ApnsRequest) -> _Answer:
        try:
            connection = await client.pool.acquire()
        except ApnsConnectError as e:
            raise _NotSent("could not connect") from e
        return await cast(_Connection, connection).send_push(request)

    async def _keep_warm(self) -> None:
        interval = self.config.keepalive_interval
        loop = asyncio.get_running_loop()
        while True:
            for environment, client in list(self._clients.items()):
                try:
                    if not client.pool.connections:
                        # Reconnect now, so the next call does not pay the TLS handshake.
                        with contextlib.suppress(ApnsConnectError, TimeoutError):
                            await asyncio.wait_for(client.pool.acquire(), self.config.request_timeout)
                        continue
                    if interval is not None:
                        for connection in list(client.pool.connections):
                            if isinstance(connection, _Connection):
                                connection.keepalive_tick(loop.time(), self.config.keepalive_timeout)
                except Exception:
                    log.exception("push.keepalive_failed", environment=str(environment))
            if interval is None:
                return
            await asyncio.sleep(interval)
