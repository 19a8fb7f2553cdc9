"""APNs payloads for SIP-lite pushes: one builder per push kind, the 5120-byte limit, caller-name truncation.

Pure functions, no I/O: the providers call them and tests check them without a socket.

VoIP push (PushKit; the app must report a CallKit call from it at once, so everything it needs is here):

    {"aps": {}, "siplite": {"v": 1, "type": "incoming_call", "call_id": ..., "call_uuid": ..., "caller_id": ...,
                            "caller_name": ... (omitted when None), "video": bool,
                            "sent_at": ..., "deadline": ...}}

Missed-call alert push (a regular notification, never PushKit):

    {"aps": {"alert": {"title": <caller name or id>, "body": "Missed call"}, "sound": "default"},
     "siplite": {"v": 1, "type": "missed_call", "call_id": ..., "caller_id": ..., "caller_name": ..., "at": ...}}

`call_uuid` is the UUID the app reports the CallKit call with (CallKit takes nothing else): the call id itself,
in canonical lower case, when it is a UUID (as the client library makes them), else a name-based UUID (v5) of
it, so every process derives the same one. Later frames name the call by `call_id`.

Times are epoch seconds (floats). A payload never exceeds `MAX_PAYLOAD_BYTES`: the caller's display name is cut
first (ending in "…"), so a long name can never make a call unpushable; only if the payload is still too big
without any name does a builder return None.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, Final

from push.base import IncomingCallPush, MissedCallAlert

# APNs' limit for VoIP pushes; alert pushes are limited to 4096.
MAX_PAYLOAD_BYTES: Final = 5120
MAX_ALERT_PAYLOAD_BYTES: Final = 4096
PAYLOAD_VERSION: Final = 1
ELLIPSIS: Final = "…"
# Namespace of the name-based call UUIDs of call ids that are not UUIDs themselves.
CALL_UUID_NAMESPACE: Final = uuid.UUID("6f2b4a8e-93c1-5d0e-8a47-3b9e51c2d7f0")


def call_uuid(call_id: str) -> str:
    """The CallKit UUID of a call: `call_id` itself when it is a UUID, else a v5 UUID derived from it."""
    try:
        return str(uuid.UUID(call_id))
    except ValueError:
        return str(uuid.uuid5(CALL_UUID_NAMESPACE, call_id))


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _fit(build: Callable[[str | None], dict[str, Any]], name: str | None, limit: int) -> bytes | None:
    """Encode `build(name)`, cutting `name` to the longest prefix that keeps the payload within `limit` bytes."""
    data = _encode(build(name))
    if len(data) <= limit:
        return data
    if name is None or not name:
        return None
    # Binary search over prefix lengths: the encoded size grows with the prefix.
    lo, hi = 0, len(name) - 1
    best: bytes | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = _encode(build(name[:mid] + ELLIPSIS if mid else None))
        if len(candidate) <= limit:
            best, lo = candidate, mid + 1
        else:
            hi = mid - 1
    return best


def incoming_call_payload(push: IncomingCallPush, limit: int = MAX_PAYLOAD_BYTES) -> bytes | None:
    """The VoIP payload for `push`, within `limit` bytes (caller name cut if needed), or None if impossible."""

    def build(name: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": PAYLOAD_VERSION,
            "type": "incoming_call",
            "call_id": push.call_id,
            "call_uuid": call_uuid(push.call_id),
            "caller_id": push.caller_id,
        }
        if name is not None:
            body["caller_name"] = name
        body.update(video=push.video, sent_at=push.sent_at, deadline=push.deadline)
        return {"aps": {}, "siplite": body}

    return _fit(build, push.caller_name, limit)


def missed_call_payload(alert: MissedCallAlert, limit: int = MAX_ALERT_PAYLOAD_BYTES) -> bytes | None:
    """The alert payload for `alert`, within `limit` bytes (caller name cut if needed), or None if impossible."""

    def build(name: str | None) -> dict[str, Any]:
        return {
            "aps": {"alert": {"title": name or alert.caller_id, "body": "Missed call"}, "sound": "default"},
            "siplite": {
                "v": PAYLOAD_VERSION,
                "type": "missed_call",
                "call_id": alert.call_id,
                "caller_id": alert.caller_id,
                "caller_name": name,
                "at": alert.at,
            },
        }

    return _fit(build, alert.caller_name, limit)
