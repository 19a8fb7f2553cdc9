"""Configuration: defaults, then an optional TOML file, then `SIPLITE_*` environment variables.

Every setting is a field of `Settings`; its environment variable is `SIPLITE_` + the field name in upper case,
and its TOML key is the field name. The README's configuration table lists them all. Values are checked at
start-up, and a bad one stops the server with a message naming the variable.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

import jwt

from signaling import redis_url

# Used only when no JWT key is configured. The server then binds to loopback and says so loudly.
DEV_JWT_SECRET: Final = "sip-lite-development-secret-do-not-use-in-production"  # noqa: S105 - dev only


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Redis URL: redis://, rediss://, unix://, redis+cluster://, redis+sentinel:// (see signaling.redis_url).
    # Unset: the embedded in-memory store (one process only).
    redis_url: str | None = None
    redis_prefix: str = "siplite:"
    # JWT verification: a shared secret (HS256) or a PEM public key file (ES256/RS256).
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 30.0
    # Seconds a registration stays valid without a keepalive; also the presence TTL in the store.
    presence_ttl: float = 60.0
    # Seconds a new connection may take to send REGISTER before it is closed (4408).
    register_timeout: float = 10.0
    # Seconds between WebSocket pings from the server (keeps NAT bindings open; detects dead peers).
    heartbeat: float = 25.0
    ring_timeout: float = 60.0
    # Seconds an online device has to acknowledge an INVITE (any response) before it is treated as asleep and
    # woken with a VoIP push, once.
    ack_grace: float = 2.0
    # Seconds a process counts as alive after its last heartbeat (it beats every third of this); calls that
    # depended on a process silent for longer end for their surviving parties.
    node_ttl: float = 10.0
    # Seconds a party of an answered call whose socket dropped has to register again (on any node) before the
    # call ends for the other party; 0 ends it at once.
    reattach_grace: float = 15.0
    # Seconds a missed call waits for the device's next registration.
    missed_call_ttl: float = 7 * 86400.0
    # Also send an alert push (not VoIP) to a device's alert token when it misses a call.
    missed_call_alerts: bool = False
    update_timeout: float = 30.0
    max_frame_bytes: int = 65536
    # Bytes waiting to be written to a connection that is not reading, before it is disconnected.
    max_send_buffer: int = 1 << 20
    max_devices_per_user: int = 10
    max_calls_per_connection: int = 4
    # Seconds a device record (with its push tokens) is kept after its last registration.
    device_ttl: float = 30 * 86400.0
    # Per-connection frame rate: sustained frames per second and burst size.
    rate_limit: float = 50.0
    rate_burst: int = 100
    # Consecutive rejected frames after which the connection is closed (1008).
    max_consecutive_errors: int = 10
    # APNs: token auth (.p8 key file, key id, team id) or certificate auth (one PEM with certificate and key).
    # With neither, pushes go to the development recorder (logged, never sent).
    apns_key_file: str | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_cert_file: str | None = None
    # APNs endpoints (Apple's by default), for staging or a local stand-in, and a CA file to trust for them.
    apns_production_host: str = "api.push.apple.com"
    apns_sandbox_host: str = "api.sandbox.push.apple.com"
    apns_port: int = 443
    apns_ca_file: str | None = None
    # Seconds one push attempt may take before it counts as failed (the ring deadline bounds it too).
    push_timeout: float = 5.0
    # Seconds between HTTP/2 PINGs that keep an idle APNs connection open (0 disables).
    apns_keepalive: float = 5.0
    # Pushes in flight at once; beyond it a push fails at once as "overloaded".
    push_max_in_flight: int = 1000
    # Seconds SIGTERM waits, after sending every client elsewhere, for the calls this process owns to end.
    drain_timeout: float = 25.0
    # Seconds to wait for open sockets to close on shutdown.
    shutdown_timeout: float = 5.0
    node_id: str = field(default_factory=_default_node_id)
    # "asyncio" (the standard library's event loop) or "uvloop" (`pip install 'sip-lite[uvloop]'`).
    event_loop: str = "asyncio"
    log_level: str = "info"
    log_format: str = "auto"

    @property
    def uses_apns(self) -> bool:
        return self.apns_key_file is not None or self.apns_cert_file is not None

    @property
    def uses_dev_secret(self) -> bool:
        return self.jwt_secret is None and self.jwt_public_key_file is None

    def jwt_key(self) -> str:
        """The key tokens are verified with (the public key file's text, or the secret)."""
        if self.jwt_public_key_file is not None:
            try:
                return Path(self.jwt_public_key_file).read_text()
            except OSError as exc:
                raise ConfigError(f"SIPLITE_JWT_PUBLIC_KEY_FILE: cannot read it: {exc.strerror}") from None
        return self.jwt_secret if self.jwt_secret is not None else DEV_JWT_SECRET

    def algorithms(self) -> tuple[str, ...]:
        if self.jwt_algorithms:
            return self.jwt_algorithms
        return ("ES256", "RS256") if self.jwt_public_key_file is not None else ("HS256",)

    def validate(self) -> Settings:
        positive = (
            "presence_ttl",
            "register_timeout",
            "heartbeat",
            "ring_timeout",
            "ack_grace",
            "node_ttl",
            "missed_call_ttl",
            "update_timeout",
            "max_frame_bytes",
            "max_send_buffer",
            "max_devices_per_user",
            "max_calls_per_connection",
            "device_ttl",
            "rate_limit",
            "rate_burst",
            "max_consecutive_errors",
            "push_timeout",
            "push_max_in_flight",
        )
        if self.reattach_grace < 0:
            raise ConfigError("SIPLITE_REATTACH_GRACE must be 0 or more")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"SIPLITE_{name.upper()} must be greater than 0")
        if not 1 <= self.port <= 65535 and self.port != 0:
            raise ConfigError("SIPLITE_PORT must be from 1 to 65535")
        if self.max_frame_bytes < 4096:
            raise ConfigError("SIPLITE_MAX_FRAME_BYTES must be at least 4096 (an SDP offer needs room)")
        if self.jwt_secret is not None and len(self.jwt_secret) < 32:
            raise ConfigError("SIPLITE_JWT_SECRET must be at least 32 characters")
        if self.jwt_secret is not None and self.jwt_public_key_file is not None:
            raise ConfigError("set SIPLITE_JWT_SECRET or SIPLITE_JWT_PUBLIC_KEY_FILE, not both")
        self._check_algorithms()
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ConfigError("SIPLITE_EVENT_LOOP must be uvloop or asyncio")
        if self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ConfigError("SIPLITE_EVENT_LOOP is uvloop, but uvloop is not installed")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("SIPLITE_LOG_FORMAT must be auto, json or console")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("SIPLITE_LOG_LEVEL must be debug, info, warning or error")
        if self.redis_url is not None:
            try:
                redis_url.parse(self.redis_url)
            except ValueError as exc:
                raise ConfigError(f"SIPLITE_REDIS_URL: {exc}") from None
        return self

    def _check_algorithms(self) -> None:
        """Each accepted algorithm must be one the configured key can verify: an HMAC secret for HS*, a public key
        for the others. A mix is refused, so that a public key is never used as an HMAC secret (the classic
        algorithm confusion) and no setting silently refuses every token."""
        known = set(jwt.algorithms.get_default_algorithms()) - {"none"}
        for name in self.algorithms():
            if name.lower() == "none":
                raise ConfigError("SIPLITE_JWT_ALGORITHMS: 'none' (unsigned tokens) is never accepted")
            if name not in known:
                raise ConfigError(
                    f"SIPLITE_JWT_ALGORITHMS: unknown algorithm {name!r}; use {', '.join(sorted(known))}"
                )
            if name.startswith("HS") and self.jwt_public_key_file is not None:
                raise ConfigError(
                    f"SIPLITE_JWT_ALGORITHMS: {name} needs a shared secret (SIPLITE_JWT_SECRET), "
                    "not a public key file"
                )
            if not name.startswith("HS") and self.jwt_public_key_file is None:
                raise ConfigError(f"SIPLITE_JWT_ALGORITHMS: {name} needs SIPLITE_JWT_PUBLIC_KEY_FILE")


def _convert(name: str, kind: Any, raw: Any) -> Any:
    text_kind = str(kind)
    try:
        if "tuple" in text_kind:
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return tuple(str(item).strip() for item in items if str(item).strip())
        if text_kind == "bool":
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if "int" in text_kind and "float" not in text_kind:
            return int(raw)
        if "float" in text_kind:
            return float(raw)
        return None if raw in ("", None) else str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"SIPLITE_{name.upper()}: {raw!r} is not a valid {text_kind}") from None


def load(environ: Mapping[str, str] | None = None, config_file: str | None = None) -> Settings:
    """Build settings from an optional TOML file and the environment (which wins), and validate them."""
    env = os.environ if environ is None else environ
    path = config_file or env.get("SIPLITE_CONFIG")
    values: dict[str, Any] = {}
    known = {f.name: f.type for f in fields(Settings)}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for key, raw in data.items():
            if key not in known:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _convert(key, known[key], raw)
    for key, kind in known.items():
        raw = env.get(f"SIPLITE_{key.upper()}")
        if raw is not None:
            values[key] = _convert(key, kind, raw)
    return replace(Settings(), **values).validate()
