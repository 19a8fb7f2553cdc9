"""The wire module: golden bytes for every outbound frame, decoding of every inbound one, and every refusal."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signaling import wire
from signaling.errors import PeerError
from signaling.models import Platform, PushBinding, PushEnvironment

ICE = wire.IceCandidate("candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host", "0", 0)

# (frame, seq the connection assigns, the exact JSON text on the wire)
GOLDEN: list[tuple[wire.Outbound, int | None, str]] = [
    (
        wire.Response(3, "register", 200, user="alice", device_id="p1", expires=60),
        None,
        '{"type":"response","seq":3,"code":200,"reason":"OK","method":"register","user":"alice",'
        '"device_id":"p1","expires":60}',
    ),
    (
        wire.Response(4, "invite", 100, "c1"),
        None,
        '{"type":"response","seq":4,"code":100,"reason":"Trying","method":"invite","call_id":"c1"}',
    ),
    (
        wire.Response(4, "invite", 200, "c1", sdp="v=0"),
        None,
        '{"type":"response","seq":4,"code":200,"reason":"OK","method":"invite","call_id":"c1","sdp":"v=0"}',
    ),
    (
        wire.Response(5, "bye", 481, "c1", error="no_such_call", detail="gone"),
        None,
        '{"type":"response","seq":5,"code":481,"reason":"Call/Transaction Does Not Exist","method":"bye",'
        '"call_id":"c1","error":"no_such_call","detail":"gone"}',
    ),
    (
        wire.Response(6, "ice", 503, error="rate_limited", detail="slow down", retry_after=0.5),
        None,
        '{"type":"response","seq":6,"code":503,"reason":"Service Unavailable","method":"ice",'
        '"error":"rate_limited","detail":"slow down","retry_after":0.5}',
    ),
    (
        wire.ErrorNotice(400, "malformed", "not valid msgpack"),
        None,
        '{"type":"error","code":400,"error":"malformed","detail":"not valid msgpack"}',
    ),
    (
        wire.InviteOffer("c1", "alice", "Alice", "v=0", True),
        1,
        '{"seq":1,"call_id":"c1","type":"invite","from":"alice","from_name":"Alice","sdp":"v=0","video":true}',
    ),
    (wire.AckRelay("c1"), 2, '{"seq":2,"call_id":"c1","type":"ack"}'),
    (
        wire.CancelNotice("c1", wire.EndReason.ANSWERED_ELSEWHERE),
        3,
        '{"seq":3,"call_id":"c1","type":"cancel","reason":"answered_elsewhere"}',
    ),
    (
        wire.ByeNotice("c1", wire.EndReason.REMOTE_HANGUP),
        4,
        '{"seq":4,"call_id":"c1","type":"bye","reason":"remote_hangup"}',
    ),
    (wire.UpdateRelay("c1", "v=0"), 5, '{"seq":5,"call_id":"c1","type":"update","sdp":"v=0"}'),
    (
        wire.IceRelay("c1", ICE),
        6,
        '{"seq":6,"call_id":"c1","type":"ice","candidate":"candidate:1 1 udp 2122260223 192.0.2.1 50000 typ '
        'host","mid":"0","mline_index":0}',
    ),
]


@pytest.mark.parametrize(("frame", "seq", "text"), GOLDEN, ids=[type(g[0]).__name__ for g in GOLDEN])
def test_golden_encoding(frame: wire.Outbound, seq: int | None, text: str) -> None:
    assert wire.encode(frame, wire.Encoding.JSON, seq) == text
    packed = wire.encode(frame, wire.Encoding.MSGPACK, seq)
    assert packed == msgpack.packb(json.loads(text), use_bin_type=True)


def frame(**fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


VALID: list[tuple[dict[str, Any], wire.Inbound]] = [
    (
        {
            "type": "register",
            "seq": 1,
            "token": "t",
            "device_id": "phone-1",
            "push": {"bundle_id": "com.example.app", "voip_token": "AB" * 32, "environment": "sandbox"},
        },
        wire.Register(
            1,
            "t",
            "phone-1",
            PushBinding(Platform.IOS, "com.example.app", PushEnvironment.SANDBOX, "ab" * 32, None),
        ),
    ),
    ({"type": "register", "seq": 1, "token": "t", "device_id": "p"}, wire.Register(1, "t", "p", None)),
    (
        {"type": "invite", "seq": 2, "call_id": "c1", "to": "bob@example.com", "sdp": "v=0", "extra": [1]},
        wire.Invite(2, "c1", "bob@example.com", "v=0", False),
    ),
    ({"type": "ack", "seq": 3, "call_id": "c1"}, wire.Ack(3, "c1")),
    ({"type": "cancel", "seq": 3, "call_id": "c1"}, wire.Cancel(3, "c1")),
    ({"type": "bye", "seq": 3, "call_id": "c1", "v": 1}, wire.Bye(3, "c1")),
    ({"type": "update", "seq": 3, "call_id": "c1", "sdp": "v=0"}, wire.Update(3, "c1", "v=0")),
    (
        {"type": "ice", "seq": 3, "call_id": "c1", "candidate": "", "mid": None},
        wire.Ice(3, "c1", wire.IceCandidate("", None, None)),
    ),
    ({"type": "keepalive", "seq": 9}, wire.Keepalive(9)),
    (
        {"type": "response", "seq": 1, "method": "invite", "call_id": "c1", "code": 180},
        wire.Reply(1, "c1", wire.Method.INVITE, 180, None, None),
    ),
]


@pytest.mark.parametrize(("fields", "expected"), VALID, ids=[v[0]["type"] for v in VALID])
def test_decode_both_encodings(fields: dict[str, Any], expected: wire.Inbound) -> None:
    assert wire.decode(frame(**fields)) == expected
    assert wire.decode(json.dumps(fields)) == expected


# (frame, code, error id, offending field)
INVALID: list[tuple[bytes | str, int, str, str | None]] = [
    (b"\xc1", 400, "malformed", None),
    ("{not json", 400, "malformed", None),
    (frame(), 400, "missing_field", "type"),
    (msgpack.packb([1, 2]), 400, "malformed", None),
    (frame(type="dance", seq=1), 400, "unknown_type", None),
    (frame(type="bye", seq=1, call_id="c", v=2), 400, "unsupported_version", None),
    (frame(type=5, seq=1), 400, "invalid_field", "type"),
    (frame(type="bye", call_id="c"), 400, "missing_field", "seq"),
    (frame(type="bye", seq=-1, call_id="c"), 400, "invalid_field", "seq"),
    (frame(type="bye", seq=True, call_id="c"), 400, "invalid_field", "seq"),
    (frame(type="bye", seq="1", call_id="c"), 400, "invalid_field", "seq"),
    (frame(type="bye", seq=1), 400, "missing_field", "call_id"),
    (frame(type="bye", seq=1, call_id="has space"), 400, "invalid_field", "call_id"),
    (frame(type="bye", seq=1, call_id="x" * 129), 400, "invalid_field", "call_id"),
    (frame(type="invite", seq=1, call_id="c", to="bob"), 400, "missing_field", "sdp"),
    (frame(type="invite", seq=1, call_id="c", to="bob", sdp="  "), 400, "invalid_field", "sdp"),
    (frame(type="invite", seq=1, call_id="c", to="bob", sdp=b"v=0"), 400, "invalid_field", "sdp"),
    (frame(type="invite", seq=1, call_id="c", to="b b", sdp="v=0"), 400, "invalid_field", "to"),
    (frame(type="invite", seq=1, call_id="c", to="bob", sdp="v", video="yes"), 400, "invalid_field", "video"),
    # Any token that cannot be verified is an authentication failure, however it is wrong (the connection closes).
    (frame(type="register", seq=1, device_id="d"), 401, "auth_failed", None),
    (frame(type="register", seq=1, token=None, device_id="d"), 401, "auth_failed", None),
    (frame(type="register", seq=1, token=" ", device_id="d"), 401, "auth_failed", None),
    (frame(type="register", seq=1, token=7, device_id="d"), 401, "auth_failed", None),
    (frame(type="register", seq=1, token=["a.b.c"], device_id="d"), 401, "auth_failed", None),
    (frame(type="register", seq=1, token="x" * 8193, device_id="d"), 401, "auth_failed", None),
    (frame(type="register", seq=1, token="t", device_id="d", push=[]), 400, "invalid_field", "push"),
    (
        frame(type="register", seq=1, token="t", device_id="d", push={"bundle_id": "com.x.y"}),
        400,
        "missing_field",
        "push.voip_token",
    ),
    (
        frame(type="register", seq=1, token="t", device_id="d", push={"bundle_id": "com.x", "voip_token": "zz"}),
        400,
        "invalid_field",
        "push.voip_token",
    ),
    (
        frame(type="register", seq=1, token="t", device_id="d", push={"bundle_id": "x", "voip_token": "ab" * 8}),
        400,
        "invalid_field",
        "push.bundle_id",
    ),
    (
        frame(type="register", seq=1, token="t", device_id="d", push={"platform": "android", "bundle_id": "a.b"}),
        400,
        "invalid_field",
        "push.platform",
    ),
    (frame(type="ice", seq=1, call_id="c", candidate="a", mline_index=5000), 400, "invalid_field", "mline_index"),
    (frame(type="response", seq=1, call_id="c", method="bye", code=200), 400, "invalid_field", "method"),
    (frame(type="response", seq=1, call_id="c", method="invite", code=99), 400, "invalid_field", "code"),
    (frame(type="response", seq=1, call_id="c", method="invite", code=200), 400, "missing_field", "sdp"),
    (frame(type="response", seq=1, call_id="c", method="invite"), 400, "missing_field", "code"),
    (frame(type="response", seq=1, call_id="c", method="invite", code=202), 400, "missing_field", "sdp"),
]


@pytest.mark.parametrize(("data", "code", "error", "field"), INVALID)
def test_every_refusal_is_named(data: bytes | str, code: int, error: str, field: str | None) -> None:
    with pytest.raises(PeerError) as refused:
        wire.decode(data)
    assert (refused.value.code, refused.value.error, refused.value.extra.get("field")) == (code, error, field)


def test_refusal_carries_the_requests_seq_and_type() -> None:
    with pytest.raises(PeerError) as refused:
        wire.decode(frame(type="invite", seq=41, call_id="c9", to="bob"))
    assert (refused.value.seq, refused.value.method, refused.value.call_id) == (41, "invite", "c9")


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(PeerError):
        wire.decode(data)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["type", "seq", "call_id", "to", "sdp", "code", "method", "token", "device_id", "push"]),
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.text(max_size=20)
        | st.lists(st.integers(0, 9), max_size=2),
    )
)
def test_arbitrary_maps_are_decoded_or_refused(fields: dict[str, Any]) -> None:
    with contextlib.suppress(PeerError):
        wire.decode(frame(**fields))
