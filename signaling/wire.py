"""The SIP-lite v1 wire format: frame schema, msgpack/JSON encoding, validation. See docs/PROTOCOL.md.

This is the only module that knows how frames look as bytes. Inbound frames are decoded into typed requests
(`Register`, `Invite`, ... and `Reply`, a client's answer to a server request); outbound frames are typed values
(`Response`, `InviteOffer`, ...) encoded with `encode()`. Every malformed input raises a `PeerError` that carries
the frame's `seq` and `type` when they could be read, so the error response can name the request it answers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import msgpack

from signaling.errors import (
    AuthenticationFailed,
    InvalidField,
    MalformedFrame,
    MissingField,
    PeerError,
    UnknownFrameType,
    UnsupportedVersion,
)
from signaling.models import Platform, PushBinding, PushEnvironment

PROTOCOL_VERSION: Final = 1
MAX_SEQ: Final = 2**53 - 1  # exact in a JSON number everywhere


class Encoding(StrEnum):
    MSGPACK = "msgpack"
    JSON = "json"


SUBPROTOCOLS: Final[dict[str, Encoding]] = {
    "siplite.v1.msgpack": Encoding.MSGPACK,
    "siplite.v1.json": Encoding.JSON,
}
DEFAULT_ENCODING: Final = Encoding.JSON


class Method(StrEnum):
    """Frame types. Requests flow both ways; `response` answers a request of the other side."""

    REGISTER = "register"
    INVITE = "invite"
    ACK = "ack"
    CANCEL = "cancel"
    BYE = "bye"
    UPDATE = "update"
    ICE = "ice"
    KEEPALIVE = "keepalive"
    RESPONSE = "response"


class EndReason(StrEnum):
    """Why a call leg ended, sent with server CANCEL and BYE frames."""

    CALLER_CANCELLED = "caller_cancelled"
    ANSWERED_ELSEWHERE = "answered_elsewhere"
    DECLINED_ELSEWHERE = "declined_elsewhere"
    NO_ANSWER = "no_answer"
    UNREACHABLE = "unreachable"  # no device could be reached (all gone, busy elsewhere, or pushes failed)
    CALLER_GONE = "caller_gone"
    REMOTE_HANGUP = "remote_hangup"
    PEER_GONE = "peer_gone"


class CallKitReason(StrEnum):
    """Why a call ended, for a device that was woken for it: one-to-one with CallKit's CXCallEndedReason."""

    FAILED = "failed"
    REMOTE_ENDED = "remote_ended"
    UNANSWERED = "unanswered"
    ANSWERED_ELSEWHERE = "answered_elsewhere"
    DECLINED_ELSEWHERE = "declined_elsewhere"


class Stage(StrEnum):
    """Where an outgoing call stands, reported to the caller with the server's time (`at`)."""

    PUSH_SENT = "push_sent"  # 183: APNs accepted a VoIP push to a sleeping device
    CALLEE_CONNECTED = "callee_connected"  # 183: a woken device connected and was offered the call
    RINGING = "ringing"  # 180
    ANSWERED = "answered"  # 200


REASON_PHRASES: Final[dict[int, str]] = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    503: "Service Unavailable",
    603: "Decline",
}

# Identifiers a client chooses (device and call ids): URL- and log-safe, bounded.
_TOKEN_ID = re.compile(r"[A-Za-z0-9._~:@+\-]{1,128}")
# User ids come from the app backend (JWT `sub`): any printable text without spaces, bounded.
_USER_ID = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")
_PUSH_TOKEN = re.compile(r"[0-9A-Fa-f]{16,200}")
_BUNDLE_ID = re.compile(r"[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)+")

MAX_TOKEN_LEN: Final = 8192
MAX_REASON_LEN: Final = 256
MAX_CANDIDATE_LEN: Final = 1024
MAX_SDP_LEN: Final = 1 << 20  # the frame size cap is the real bound


def is_user_id(value: str) -> bool:
    return _USER_ID.fullmatch(value) is not None


# ---------------------------------------------------------------------------------------------- inbound frames


@dataclass(frozen=True, slots=True)
class Register:
    seq: int
    token: str
    device_id: str
    push: PushBinding | None


@dataclass(frozen=True, slots=True)
class Invite:
    seq: int
    call_id: str
    to: str
    sdp: str
    video: bool


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    call_id: str


@dataclass(frozen=True, slots=True)
class Cancel:
    seq: int
    call_id: str


@dataclass(frozen=True, slots=True)
class Bye:
    seq: int
    call_id: str


@dataclass(frozen=True, slots=True)
class Update:
    seq: int
    call_id: str
    sdp: str


@dataclass(frozen=True, slots=True)
class IceCandidate:
    """A trickle ICE candidate (RFC 8838); an empty `candidate` signals end-of-candidates."""

    candidate: str
    mid: str | None
    mline_index: int | None


@dataclass(frozen=True, slots=True)
class Ice:
    seq: int
    call_id: str
    ice: IceCandidate


@dataclass(frozen=True, slots=True)
class Keepalive:
    seq: int


@dataclass(frozen=True, slots=True)
class Reply:
    """A client's response to a request the server sent it (an INVITE or an UPDATE)."""

    seq: int
    call_id: str
    method: Method
    code: int
    reason: str | None
    sdp: str | None


Inbound = Register | Invite | Ack | Cancel | Bye | Update | Ice | Keepalive | Reply

# ---------------------------------------------------------------------------------------------- outbound frames


@dataclass(frozen=True, slots=True)
class Response:
    """The server's final or provisional answer to a client request with sequence number `seq`."""

    seq: int | None
    method: str | None
    code: int
    call_id: str | None = None
    reason: str | None = None
    sdp: str | None = None
    error: str | None = None
    detail: str | None = None
    field: str | None = None
    retry_after: float | None = None
    # REGISTER's 200 carries the identity the server authenticated and the binding's lifetime.
    user: str | None = None
    device_id: str | None = None
    expires: int | None = None
    # Progress of an outgoing call (183/180/200 to the caller), with the server's wall-clock time.
    stage: Stage | None = None
    at: float | None = None


@dataclass(frozen=True, slots=True)
class ErrorNotice:
    """An error about a frame that is not a request the server can answer with a `response`: an undecodable
    frame whose `seq` or `type` could not be read, or a client `response` frame that was refused. `seq` echoes
    the offending frame's, when it had one; being an `error` and not a `response`, it answers none of the
    client's requests even when the number coincides."""

    code: int
    error: str
    detail: str
    seq: int | None = None
    call_id: str | None = None
    field: str | None = None


@dataclass(frozen=True, slots=True)
class InviteOffer:
    """An incoming call delivered to a callee device. `caller` is the authenticated user, never a claim."""

    call_id: str
    caller: str
    caller_name: str | None
    sdp: str
    video: bool


@dataclass(frozen=True, slots=True)
class EndedNotice:
    """Sent right after REGISTER's 200 to a device that was woken for a call which has since ended."""

    call_id: str
    reason: CallKitReason
    caller: str
    caller_name: str | None
    video: bool
    at: float


@dataclass(frozen=True, slots=True)
class MissedNotice:
    """Sent after REGISTER's 200: a call this device missed while it was not connected."""

    call_id: str
    caller: str
    caller_name: str | None
    video: bool
    at: float


@dataclass(frozen=True, slots=True)
class AckRelay:
    call_id: str


@dataclass(frozen=True, slots=True)
class CancelNotice:
    call_id: str
    reason: EndReason


@dataclass(frozen=True, slots=True)
class ByeNotice:
    call_id: str
    reason: EndReason


class PeerState(StrEnum):
    """Whether the other party of an answered call holds a connection right now."""

    RECONNECTING = "reconnecting"  # its socket dropped; the call waits `reattach_grace` for it to come back
    CONNECTED = "connected"  # it is back (or, to a party that just re-attached: it never left)


@dataclass(frozen=True, slots=True)
class PeerNotice:
    """To a party of an answered call: the other party lost its connection, or is back."""

    call_id: str
    state: PeerState


@dataclass(frozen=True, slots=True)
class ReconnectNotice:
    """This server process is going away: connect again (through the load balancer, to another one). The
    connection is closed with 1012 right after; calls re-attach on the new connection."""

    reason: str = "draining"


@dataclass(frozen=True, slots=True)
class UpdateRelay:
    call_id: str
    sdp: str


@dataclass(frozen=True, slots=True)
class IceRelay:
    call_id: str
    ice: IceCandidate


Outbound = (
    Response
    | ErrorNotice
    | EndedNotice
    | MissedNotice
    | InviteOffer
    | AckRelay
    | CancelNotice
    | ByeNotice
    | UpdateRelay
    | IceRelay
    | PeerNotice
    | ReconnectNotice
)
# Server requests the client must answer with a `response` frame.
EXPECTS_REPLY: Final = (InviteOffer, UpdateRelay)


# ---------------------------------------------------------------------------------------------- decoding


def _seq(obj: dict[str, Any]) -> int:
    value = obj.get("seq")
    if value is None:
        raise MissingField("seq")
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise InvalidField("seq", f"must be an integer from 0 to {MAX_SEQ}")
    return value


def _check_str(name: str, value: object, max_len: int) -> str:
    if not isinstance(value, str):
        raise InvalidField(name, "must be a string")
    if len(value) > max_len:
        raise InvalidField(name, f"longer than {max_len} characters")
    return value


def _opt_str(obj: dict[str, Any], name: str, max_len: int) -> str | None:
    value = obj.get(name)
    return None if value is None else _check_str(name, value, max_len)


def _req_str(obj: dict[str, Any], name: str, max_len: int) -> str:
    value = obj.get(name)
    if value is None:
        raise MissingField(name)
    return _check_str(name, value, max_len)


def _matching(obj: dict[str, Any], name: str, pattern: re.Pattern[str], what: str) -> str:
    value = _req_str(obj, name, 1024)
    if pattern.fullmatch(value) is None:
        raise InvalidField(name, what)
    return value


def _token(obj: dict[str, Any]) -> str:
    """REGISTER's token. One that is missing, blank, not a string or too long is refused like a forged one (401,
    then close 4401): no REGISTER goes on without proof of who is registering."""
    value = obj.get("token")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise AuthenticationFailed("token missing")
    if not isinstance(value, str):
        raise AuthenticationFailed("token must be a string")
    if len(value) > MAX_TOKEN_LEN:
        raise AuthenticationFailed(f"token longer than {MAX_TOKEN_LEN} characters")
    return value


def _call_id(obj: dict[str, Any]) -> str:
    return _matching(obj, "call_id", _TOKEN_ID, "1-128 characters of A-Z a-z 0-9 . _ ~ : @ + -")


def _sdp(obj: dict[str, Any]) -> str:
    value = _req_str(obj, "sdp", MAX_SDP_LEN)
    if not value.strip():
        raise InvalidField("sdp", "must not be empty")
    return value


def _opt_sdp(obj: dict[str, Any]) -> str | None:
    return None if obj.get("sdp") is None else _sdp(obj)


def _bool(obj: dict[str, Any], name: str, default: bool) -> bool:
    value = obj.get(name, default)
    if not isinstance(value, bool):
        raise InvalidField(name, "must be true or false")
    return value


def _push(value: object) -> PushBinding | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidField("push", "must be a map")
    platform = value.get("platform", "ios")
    if platform != Platform.IOS:
        raise InvalidField("push.platform", "only 'ios' is supported")
    env = value.get("environment", "production")
    if env not in ("production", "sandbox"):
        raise InvalidField("push.environment", "must be 'production' or 'sandbox'")
    bundle = value.get("bundle_id")
    if bundle is None:
        raise MissingField("push.bundle_id")
    if not isinstance(bundle, str) or len(bundle) > 155 or not _BUNDLE_ID.fullmatch(bundle):
        raise InvalidField("push.bundle_id", "must be a reverse-DNS bundle id such as com.example.app")
    tokens: dict[str, str | None] = {}
    for name in ("voip_token", "alert_token"):
        token = value.get(name)
        if token is not None and (not isinstance(token, str) or not _PUSH_TOKEN.fullmatch(token)):
            raise InvalidField(f"push.{name}", "must be 16-200 hexadecimal digits")
        tokens[name] = token.lower() if isinstance(token, str) else None
    if tokens["voip_token"] is None and tokens["alert_token"] is None:
        raise MissingField("push.voip_token")
    return PushBinding(
        platform=Platform.IOS,
        bundle_id=bundle,
        environment=PushEnvironment(env),
        voip_token=tokens["voip_token"],
        alert_token=tokens["alert_token"],
    )


def _ice(obj: dict[str, Any]) -> IceCandidate:
    candidate = _req_str(obj, "candidate", MAX_CANDIDATE_LEN)
    mid = _opt_str(obj, "mid", 64)
    index = obj.get("mline_index")
    if index is not None and (type(index) is not int or not 0 <= index < 1024):
        raise InvalidField("mline_index", "must be an integer from 0 to 1023")
    return IceCandidate(candidate=candidate, mid=mid, mline_index=index)


def _reply(obj: dict[str, Any], seq: int) -> Reply:
    method = obj.get("method")
    if method not in (Method.INVITE, Method.UPDATE):
        raise InvalidField("method", "a response answers 'invite' or 'update'")
    code = obj.get("code")
    if code is None:
        raise MissingField("code")
    if type(code) is not int or not 100 <= code <= 699:
        raise InvalidField("code", "must be a status code from 100 to 699")
    sdp = _opt_sdp(obj)
    if 200 <= code < 300 and sdp is None:
        raise MissingField("sdp")
    return Reply(
        seq=seq,
        call_id=_call_id(obj),
        method=Method(method),
        code=code,
        reason=_opt_str(obj, "reason", MAX_REASON_LEN),
        sdp=sdp,
    )


def _parse(obj: dict[str, Any], kind: str, seq: int) -> Inbound:
    if kind == Method.REGISTER:
        return Register(
            seq=seq,
            token=_token(obj),
            device_id=_matching(obj, "device_id", _TOKEN_ID, "1-128 characters of A-Z a-z 0-9 . _ ~ : @ + -"),
            push=_push(obj.get("push")),
        )
    if kind == Method.INVITE:
        return Invite(
            seq=seq,
            call_id=_call_id(obj),
            to=_matching(obj, "to", _USER_ID, "1-128 printable characters without spaces"),
            sdp=_sdp(obj),
            video=_bool(obj, "video", False),
        )
    if kind == Method.ACK:
        return Ack(seq=seq, call_id=_call_id(obj))
    if kind == Method.CANCEL:
        return Cancel(seq=seq, call_id=_call_id(obj))
    if kind == Method.BYE:
        return Bye(seq=seq, call_id=_call_id(obj))
    if kind == Method.UPDATE:
        return Update(seq=seq, call_id=_call_id(obj), sdp=_sdp(obj))
    if kind == Method.ICE:
        return Ice(seq=seq, call_id=_call_id(obj), ice=_ice(obj))
    if kind == Method.KEEPALIVE:
        return Keepalive(seq=seq)
    if kind == Method.RESPONSE:
        return _reply(obj, seq)
    raise UnknownFrameType(f"unknown frame type {kind!r}")


def _load(data: bytes | str) -> object:
    try:
        if isinstance(data, str):
            return json.loads(data)
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        kind = "JSON" if isinstance(data, str) else "msgpack"
        raise MalformedFrame(f"not valid {kind}: {type(exc).__name__}") from None
    except RecursionError:
        raise MalformedFrame("nested too deeply") from None


def loads(data: bytes | str) -> object:
    """Decode a frame to a plain map without checking its schema (the client library reads with this)."""
    return _load(data)


def decode(data: bytes | str) -> Inbound:
    """Decode one frame: `bytes` as msgpack, `str` as JSON. Raises a `PeerError` describing what is wrong."""
    obj = _load(data)
    if not isinstance(obj, dict):
        raise MalformedFrame("a frame must be a map")
    raw_seq = obj.get("seq")
    raw_kind = obj.get("type")
    try:
        version = obj.get("v", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION or type(version) is not int:
            raise UnsupportedVersion(f"protocol version {version!r} is not supported; this server speaks 1")
        if raw_kind is None:
            raise MissingField("type")
        if not isinstance(raw_kind, str):
            raise InvalidField("type", "must be a string")
        return _parse(obj, raw_kind, _seq(obj))
    except PeerError as exc:
        if type(raw_seq) is int and 0 <= raw_seq <= MAX_SEQ:
            exc.seq = raw_seq
        if isinstance(raw_kind, str) and raw_kind != Method.RESPONSE:
            # Even an unknown type is echoed, so the client can match the 400 to what it sent.
            exc.method = raw_kind[:32]
        call_id = obj.get("call_id")
        if isinstance(call_id, str) and _TOKEN_ID.fullmatch(call_id):
            exc.call_id = call_id
        raise


# ---------------------------------------------------------------------------------------------- encoding


def _ice_fields(frame: dict[str, Any], ice: IceCandidate) -> None:
    frame["candidate"] = ice.candidate
    if ice.mid is not None:
        frame["mid"] = ice.mid
    if ice.mline_index is not None:
        frame["mline_index"] = ice.mline_index


def to_map(frame: Outbound, seq: int | None = None) -> dict[str, Any]:
    """The map a frame is encoded from. Server requests take the connection's next `seq`."""
    out: dict[str, Any]
    if isinstance(frame, Response):
        out = {"type": "response", "seq": frame.seq, "code": frame.code}
        out["reason"] = frame.reason or REASON_PHRASES.get(frame.code, "")
        for name in (
            "method",
            "call_id",
            "sdp",
            "error",
            "detail",
            "field",
            "retry_after",
            "user",
            "device_id",
            "expires",
            "stage",
            "at",
        ):
            value = getattr(frame, name)
            if value is not None:
                out[name] = value
        return out
    if isinstance(frame, ErrorNotice):
        out = {"type": "error", "code": frame.code, "error": frame.error, "detail": frame.detail}
        for name in ("seq", "call_id", "field"):
            value = getattr(frame, name)
            if value is not None:
                out[name] = value
        return out
    if isinstance(frame, ReconnectNotice):
        return {"seq": seq, "type": "reconnect", "reason": frame.reason}
    out = {"seq": seq, "call_id": frame.call_id}
    if isinstance(frame, InviteOffer):
        out["type"] = "invite"
        out["from"] = frame.caller
        if frame.caller_name is not None:
            out["from_name"] = frame.caller_name
        out["sdp"] = frame.sdp
        out["video"] = frame.video
    elif isinstance(frame, EndedNotice | MissedNotice):
        out["type"] = "ended" if isinstance(frame, EndedNotice) else "missed"
        if isinstance(frame, EndedNotice):
            out["reason"] = frame.reason.value
        out["from"] = frame.caller
        if frame.caller_name is not None:
            out["from_name"] = frame.caller_name
        out["video"] = frame.video
        out["at"] = frame.at
    elif isinstance(frame, AckRelay):
        out["type"] = "ack"
    elif isinstance(frame, CancelNotice):
        out["type"] = "cancel"
        out["reason"] = frame.reason.value
    elif isinstance(frame, ByeNotice):
        out["type"] = "bye"
        out["reason"] = frame.reason.value
    elif isinstance(frame, UpdateRelay):
        out["type"] = "update"
        out["sdp"] = frame.sdp
    elif isinstance(frame, PeerNotice):
        out["type"] = "peer"
        out["state"] = frame.state.value
    else:
        out["type"] = "ice"
        _ice_fields(out, frame.ice)
    return out


_packer = msgpack.Packer(use_bin_type=True)


def dumps(obj: dict[str, Any], encoding: Encoding) -> bytes | str:
    """Encode a frame map: msgpack bytes, or compact JSON text."""
    if encoding is Encoding.MSGPACK:
        return _packer.pack(obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(frame: Outbound, encoding: Encoding, seq: int | None = None) -> bytes | str:
    return dumps(to_map(frame, seq), encoding)


def retry_after(seconds: float) -> float:
    """Round a retry hint up to the tenth of a second, as sent on the wire."""
    return math.ceil(seconds * 10) / 10
