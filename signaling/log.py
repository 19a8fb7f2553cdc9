"""Logging: structlog, JSON when not on a terminal, readable on one. Secrets are redacted here, not by memory.

Event names form one vocabulary (`conn.opened`, `call.state_changed`, ...) and field names are the ones in
`FIELDS`; the `redact` processor shortens anything that could carry a secret or a session description before
it is rendered, whatever the call site passed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import orjson
import structlog

FIELDS: Final = ("call_id", "user_id", "device_id", "node_id", "conn_id", "code", "error", "duration_ms")

# Keys whose values are secrets: only a short prefix is kept, enough to tell two tokens apart in a log.
SECRET_KEYS: Final = frozenset({"token", "voip_token", "alert_token", "authorization", "jwt", "secret", "key"})
# Keys whose values are session descriptions or candidates: only their size is kept (they carry IP addresses).
SDP_KEYS: Final = frozenset({"sdp", "offer", "answer", "candidate"})


def _redact_value(key: str, value: Any) -> Any:
    if key in SECRET_KEYS and isinstance(value, str | bytes):
        return f"{value[:6]!s}…({len(value)})" if len(value) > 6 else "…"
    if key in SDP_KEYS and isinstance(value, str | bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    return value


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: shorten secrets and SDP bodies, at any depth of nested maps."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(key, value)
    return event_dict


def _json(obj: Any, **_: Any) -> str:
    # orjson renders a log line in about a third of the time of the standard json module; anything it cannot
    # encode natively is logged as its str().
    return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def configure(level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None, cache: bool = True) -> None:
    """Set up structlog. `fmt` is "json", "console", or "auto" (console on a terminal, JSON otherwise)."""
    out = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer(serializer=_json)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=cache,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
