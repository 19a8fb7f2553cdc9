"""Every failure SIP-lite can report, as one tree.

    SipLiteError                     code, error (machine id), reason phrase
    ├── PeerError                    the client's fault: answered with an error response
    │   ├── MalformedFrame           400 malformed         frame is not msgpack/JSON, or not a map
    │   ├── UnknownFrameType         400 unknown_type      `type` names no frame this version knows
    │   ├── UnsupportedVersion       400 unsupported_version
    │   ├── MissingField             400 missing_field     a required field is absent
    │   ├── InvalidField             400 invalid_field     a field has the wrong type, length or form
    │   ├── StaleSequence            400 stale_seq         `seq` not greater than the last request's
    │   ├── CallIdInUse              400 call_id_in_use    INVITE reuses an existing call id
    │   ├── AuthenticationFailed     401 auth_failed       closes the socket (4401)
    │   ├── NotRegistered            403 not_registered    request before REGISTER
    │   ├── Forbidden                403 forbidden         e.g. REGISTER as another user on this socket
    │   ├── LimitExceeded            403 limit_exceeded    too many calls on one connection, etc.
    │   ├── NoSuchCall               481 no_such_call      unknown call id, or one this device is no party of
    │   ├── InvalidInState           481 invalid_state     request not allowed in the call's current state
    │   ├── RequestPending           491 request_pending   UPDATE while another UPDATE is unanswered
    │   └── RateLimited              503 rate_limited      too many frames; carries retry_after
    └── ServerError                  our fault: the client may retry
        ├── StoreUnavailable         503 store_unavailable
        └── InternalError            500 internal

`signaling.server` is the one place that turns these into error responses or close codes.
"""

from __future__ import annotations

from typing import ClassVar


class SipLiteError(Exception):
    """Base of every SIP-lite error. `code` is the SIP status sent on the wire, `error` a stable machine id."""

    code: ClassVar[int] = 500
    error: ClassVar[str] = "internal"
    reason: ClassVar[str] = "Server Internal Error"

    def __init__(self, detail: str = "", **extra: object) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason
        self.extra = extra
        # Filled in by whoever knows them, so the error response can name the request it answers.
        self.seq: int | None = None
        self.method: str | None = None
        self.call_id: str | None = None


class PeerError(SipLiteError):
    """The peer sent something wrong. The connection stays open unless the subclass says otherwise."""

    code = 400
    error = "bad_request"
    reason = "Bad Request"


class MalformedFrame(PeerError):
    error = "malformed"


class UnknownFrameType(PeerError):
    error = "unknown_type"


class UnsupportedVersion(PeerError):
    error = "unsupported_version"


class MissingField(PeerError):
    error = "missing_field"

    def __init__(self, field: str) -> None:
        super().__init__(f"missing field {field!r}", field=field)


class InvalidField(PeerError):
    error = "invalid_field"

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"field {field!r}: {why}", field=field)


class StaleSequence(PeerError):
    error = "stale_seq"


class CallIdInUse(PeerError):
    error = "call_id_in_use"


class AuthenticationFailed(PeerError):
    """Closes the connection with close code 4401 after the 401 response."""

    code = 401
    error = "auth_failed"
    reason = "Unauthorized"


class NotRegistered(PeerError):
    code = 403
    error = "not_registered"
    reason = "Forbidden"


class Forbidden(PeerError):
    code = 403
    error = "forbidden"
    reason = "Forbidden"


class LimitExceeded(PeerError):
    code = 403
    error = "limit_exceeded"
    reason = "Forbidden"


class NoSuchCall(PeerError):
    code = 481
    error = "no_such_call"
    reason = "Call/Transaction Does Not Exist"


class InvalidInState(PeerError):
    code = 481
    error = "invalid_state"
    reason = "Call/Transaction Does Not Exist"


class RequestPending(PeerError):
    code = 491
    error = "request_pending"
    reason = "Request Pending"


class RateLimited(PeerError):
    code = 503
    error = "rate_limited"
    reason = "Service Unavailable"


class ServerError(SipLiteError):
    """Our fault, not the peer's. Logged with a stack; the client may retry."""


class StoreUnavailable(ServerError):
    code = 503
    error = "store_unavailable"
    reason = "Service Unavailable"


class Draining(ServerError):
    """This process is shutting down gracefully: connect again (to another process) and retry there."""

    code = 503
    error = "draining"
    reason = "Service Unavailable"


class InternalError(ServerError):
    code = 500
    error = "internal"
    reason = "Server Internal Error"
