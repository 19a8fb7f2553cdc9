"""The shared store: Redis, so that any number of signaling processes act as one.

Key layout (`P` is the prefix, `siplite:` by default; `<user>` and `<call>` are escaped, see `_tag`):

    P{<user>}:devs          hash   device_id -> JSON {"registered_at", "push"}      TTL: newest device + device_ttl
    P{<user>}:b:<device_id> string JSON {"conn_id", "node_id", "expires_at"}      TTL: expires_at
    P{<user>}:n:<device_id> list   JSON notices, oldest first                      TTL: latest notice expires_at
    P{<user>}:w:<device_id> hash   call_id -> JSON CallRef + "expires_at"          TTL: latest expires_at
    Palive:{<node>}         string the heartbeat's expiry (seconds, as text)     TTL: expiry + GC_SLACK
    Pcall:{<call>}          string JSON call record + "expires_at"               TTL: now + ttl
    Ppush:{<call>}:<device> string the claim's expiry (seconds, as text)         TTL: now + ttl

The braces are Redis Cluster hash tags: every key of one user lives in one slot, so the Lua scripts that touch
a user's devices, bindings and notices together stay legal on a cluster, and a call record (with the push
claims of that call) lives in a slot of its own. Each script's keys, the declared ones and the ones it builds
from a prefix, share one tag, and so one slot (Redis Cluster checks that, and the contract suite runs on a real
cluster). No script touches two users or a user and a call.

The store takes any URL `signaling.redis_url` accepts: one server, a Redis Cluster (`redis+cluster://`) or a
master that Sentinel manages (`redis+sentinel://`). The pipelines that span several slots (a heartbeat reading
other nodes' keys, a call record with its parties' waking records, `refresh` of many users' bindings) are
never transactions, only batches: on one server each is one round trip, and on a cluster redis-py splits it
by node and sends the parts at once, one round trip to each node involved.

Logical expiry is in the values and is checked against the injected clock on every read (and inside the
scripts, with `now` passed as an argument). Redis TTLs only collect garbage: each is the logical lifetime
rounded up plus `GC_SLACK` seconds, so processes whose clocks disagree by less than that agree on what exists.

Every method is one round trip (a single command, script, or pipeline), as `signaling.store.base` promises;
on one server the scripts of one method run as one EVALSHA (`_COMBINED`), since redis-py's cost per command is
most of what a call setup costs this process;
on a cluster, one to each node whose slots it touches, concurrently.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import orjson
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from signaling import redis_url
from signaling.clock import Clock
from signaling.errors import StoreUnavailable
from signaling.models import (
    Binding,
    CallPhase,
    CallRecord,
    CallRef,
    Device,
    Notice,
    NoticeKind,
    Platform,
    PushBinding,
    PushEnvironment,
)
from signaling.store.base import MAX_NOTICES, CallOpened, Presence, Registered
from signaling.store.batching import Batcher
from signaling.store.memory import DEFAULT_DEVICE_TTL, check_register_args

__all__ = ["DEFAULT_PREFIX", "GC_SLACK", "RedisStore"]

DEFAULT_PREFIX: Final = "siplite:"

GC_SLACK: Final = 5
"""Seconds a key outlives its logical expiry in Redis, to absorb clock skew between processes."""

_SOCKET_TIMEOUT: Final = 2.0
"""Default bound (seconds) on connecting and on each round trip (`RedisStore(timeout=...)`); a `socket_timeout`
in the URL's query string adds redis-py's own bound on each reply read."""

_Arg = str | int | float
_T = TypeVar("_T")


# --- Lua -------------------------------------------------------------------------------------------------------
# Scripts touch only keys of one user (one hash tag). Binding keys are built from a prefix in ARGV rather than
# declared in KEYS because the device ids are only known inside the script; Redis Cluster accepts this since
# they hash to the same slot as KEYS[1].


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str
    sha: str = field(init=False)
    """Redis names cached scripts by the SHA-1 of their source (computed once: every EVALSHA sends it)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest())


_REGISTER = _Script(
    "register",
    """
-- KEYS: devices hash, this device's binding, this device's notices, this device's waking calls.
-- ARGV: device_id, device_json, binding_json, conn_id, now, binding_ttl, max_devices, device_ttl,
--       binding key prefix, gc slack, notices key prefix, waking key prefix.
-- Returns {replaced binding or nil, the device's pending notices (taken: the list is deleted),
--          HGETALL of its waking calls (left in place; the caller filters expired ones)}.
local device_id, now = ARGV[1], tonumber(ARGV[5])
local max_devices, device_ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
local prefix, slack, notices_prefix, waking_prefix = ARGV[9], tonumber(ARGV[10]), ARGV[11], ARGV[12]

local replaced = false
local previous = redis.call('GET', KEYS[2])
if previous then
  local b = cjson.decode(previous)
  if b.conn_id ~= ARGV[4] and b.expires_at > now then replaced = previous end
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[6])

local newest = cjson.decode(ARGV[2]).registered_at
local others = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local id = fields[i]
  if id ~= device_id then
    local at = cjson.decode(fields[i + 1]).registered_at
    if at + device_ttl <= now then
      redis.call('HDEL', KEYS[1], id)
      redis.call('DEL', prefix .. id)
    else
      others[#others + 1] = {id, at}
    end
  end
end
redis.call('HSET', KEYS[1], device_id, ARGV[2])

-- Oldest first; ties by device id in byte order (Lua's "<" on strings follows the server's locale).
local function older(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  for i = 1, math.min(#a[1], #b[1]) do
    local x, y = string.byte(a[1], i), string.byte(b[1], i)
    if x ~= y then return x < y end
  end
  return #a[1] < #b[1]
end
local excess = #others + 1 - max_devices
if excess > 0 then
  table.sort(others, older)
  for i = 1, excess do
    redis.call('HDEL', KEYS[1], others[i][1])
    redis.call('DEL', prefix .. others[i][1], notices_prefix .. others[i][1], waking_prefix .. others[i][1])
  end
else
  excess = 0
end
for i = excess + 1, #others do
  if others[i][2] > newest then newest = others[i][2] end
end
local ttl = math.max(0, math.ceil(newest + device_ttl - now)) + slack
redis.call('EXPIRE', KEYS[1], string.format('%d', ttl))

-- Expired notices are filtered out by the caller, which has the same `now`.
local notices = redis.call('LRANGE', KEYS[3], 0, -1)
if #notices > 0 then redis.call('DEL', KEYS[3]) end
return {replaced, notices, redis.call('HGETALL', KEYS[4])}
""",
)

_UNREGISTER = _Script(
    "unregister",
    """
-- KEYS: binding. ARGV: conn_id, now. Deletes only a binding owned by conn_id; 1 if it was also still live.
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local b = cjson.decode(current)
if b.conn_id ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if b.expires_at > tonumber(ARGV[2]) then return 1 end
return 0
""",
)

_REFRESH = _Script(
    "refresh",
    """
-- KEYS: binding. ARGV: conn_id, binding_json, ttl, now. Replaces only a live binding owned by conn_id.
-- Returns 1 when refreshed, 0 when another connection owns it, -1 when there is no live binding at all.
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
local b = cjson.decode(current)
if b.expires_at <= tonumber(ARGV[4]) then return -1 end
if b.conn_id ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
""",
)

_PRESENCE = _Script(
    "presence",
    """
-- KEYS: devices hash. ARGV: binding key prefix. Returns {HGETALL of devices, binding or nil per device}.
local fields = redis.call('HGETALL', KEYS[1])
local bindings = {}
for i = 1, #fields, 2 do
  bindings[#bindings + 1] = redis.call('GET', ARGV[1] .. fields[i])
end
return {fields, bindings}
""",
)

_FORGET = _Script(
    "forget_device",
    """
-- KEYS: devices hash, binding, notices, waking calls. ARGV: device_id.
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return 0
""",
)

# A device's notices are a list of JSON strings rather than a sorted set scored by `at`: a sorted set orders
# equal scores by member bytes (not insertion order, which the contract asks for) and merges identical
# notices. The list holds at most MAX_NOTICES short strings, so the script rewrites it whole on every add:
# that one pass drops expired notices, sorts by (`at`, insertion) with an explicit tiebreak (Lua's sort is not
# stable), caps the length and finds the latest expiry for the TTL. Stored strings are pushed back verbatim,
# never re-encoded (cjson would round the timestamps to 14 digits); register then only has to LRANGE and DEL.
_ADD_NOTICES = _Script(
    "add_notices",
    """
-- KEYS: notice lists, one per device of one user. ARGV: now, max_notices, gc slack, then for each key in
-- order a count n followed by n notice JSONs (in insertion order).
local now, max_notices, slack = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function before(x, y)
  if x[1] ~= y[1] then return x[1] < y[1] end
  return x[2] < y[2]
end
local a = 4
for k = 1, #KEYS do
  local entries = {}
  local function keep(raw)
    local n = cjson.decode(raw)
    if n.expires_at > now then entries[#entries + 1] = {n.at, #entries + 1, n.expires_at, raw} end
  end
  for _, raw in ipairs(redis.call('LRANGE', KEYS[k], 0, -1)) do keep(raw) end
  local count = tonumber(ARGV[a])
  for i = a + 1, a + count do keep(ARGV[i]) end
  a = a + count + 1
  table.sort(entries, before)
  redis.call('DEL', KEYS[k])
  local values, latest = {}, now
  for i = math.max(1, #entries - max_notices + 1), #entries do
    values[#values + 1] = entries[i][4]
    if entries[i][3] > latest then latest = entries[i][3] end
  end
  if #values > 0 then
    redis.call('RPUSH', KEYS[k], unpack(values))
    redis.call('EXPIRE', KEYS[k], string.format('%d', math.ceil(latest - now) + slack))
  end
end
return 0
""",
)

_TAKE_NOTICES = _Script(
    "take_notices",
    """
-- KEYS: a device's notices. Returns the list and deletes it (expired ones are filtered by the caller).
local notices = redis.call('LRANGE', KEYS[1], 0, -1)
if #notices > 0 then redis.call('DEL', KEYS[1]) end
return notices
""",
)

_MARK_WAKING = _Script(
    "mark_waking",
    """
-- KEYS: a device's waking calls. ARGV: call_id, the CallRef JSON (with "expires_at"), now, gc ttl.
-- Records the call, drops entries past their expiry, and keeps the hash until its latest entry expires.
local now = tonumber(ARGV[3])
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if cjson.decode(fields[i + 1]).expires_at <= now then redis.call('HDEL', KEYS[1], fields[i]) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 0
""",
)

_UNMARK_CALL = _Script(
    "unmark_call",
    """
-- KEYS: a device's waking calls. ARGV: call_id.
redis.call('HDEL', KEYS[1], ARGV[1])
return 0
""",
)

_SET_CALL = _Script(
    "set_call",
    """
-- KEYS: call. ARGV: call_json, gc ttl.
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 0
""",
)

_CLAIM = _Script(
    "claim",
    """
-- KEYS: claim. ARGV: now, expires_at, gc ttl. SET NX, except that a claim past its logical expiry (the value)
-- counts as absent, so the claim's lifetime follows the injected clock rather than Redis's.
local held = redis.call('GET', KEYS[1])
if held and tonumber(held) > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
""",
)

_REJECT_TOKEN = _Script(
    "reject_token",
    """
-- KEYS: devices hash. ARGV: device_id, token, invalid_since ('' for none), now, device_ttl.
-- Clears `token` from the device's push binding; 1 if it was there. HSET leaves the hash's TTL alone.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local d = cjson.decode(raw)
if d.registered_at + tonumber(ARGV[5]) <= tonumber(ARGV[4]) then return 0 end
if ARGV[3] ~= '' and d.registered_at > tonumber(ARGV[3]) then return 0 end
local push = d.push
if push == cjson.null then return 0 end
local removed = false
if push.voip_token == ARGV[2] then push.voip_token = cjson.null; removed = true end
if push.alert_token == ARGV[2] then push.alert_token = cjson.null; removed = true end
if not removed then return 0 end
local encoded = 'null'
if push.voip_token ~= cjson.null or push.alert_token ~= cjson.null then encoded = cjson.encode(push) end
-- Splice the new push into the stored text instead of re-encoding the record: cjson would round
-- registered_at to 14 significant digits. The record is {"registered_at":<number>,"push":<push>}.
local at = string.find(raw, ',"push":', 1, true)
redis.call('HSET', KEYS[1], ARGV[1], string.sub(raw, 1, at + 7) .. encoded .. '}')
return 1
""",
)

_CREATE_CALL = _Script(
    "open_call",
    """
-- KEYS: call. ARGV: call_json, now, ttl. SET NX, except that a record past its logical expiry counts as free.
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).expires_at > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
""",
)

_DELETE = _Script(
    "delete",
    """
-- KEYS: a key to delete.
redis.call('DEL', KEYS[1])
return 0
""",
)


def _combined(scripts: Sequence[_Script]) -> _Script:
    """One script that runs several invocations of `scripts` in one EVALSHA, on one Redis server.

    Each script's source becomes a function whose parameters KEYS and ARGV shadow the globals. ARGV: the number
    of invocations, then for each: the script's number (1-based, in `scripts`), its key count, its argument
    count, its arguments; KEYS: every invocation's keys in order. Returns one table per invocation holding the
    script's reply (empty for nil). Not for a cluster: the keys of one EVALSHA must share a slot there."""
    functions = "\n".join(
        f"fns[{i}] = function(KEYS, ARGV)\n{script.source}\nend" for i, script in enumerate(scripts, 1)
    )
    runner = """
local out, k, p = {}, 1, 2
for i = 1, tonumber(ARGV[1]) do
  local which, nk, na = tonumber(ARGV[p]), tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2])
  p = p + 3
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = KEYS[k]; k = k + 1 end
  for j = 1, na do args[j] = ARGV[p]; p = p + 1 end
  out[i] = {fns[which](keys, args)}
end
return out
"""
    return _Script("combined", "local fns = {}\n" + functions + runner)


_PARTS: Final = (
    _REGISTER,
    _UNREGISTER,
    _REFRESH,
    _PRESENCE,
    _FORGET,
    _CREATE_CALL,
    _ADD_NOTICES,
    _TAKE_NOTICES,
    _MARK_WAKING,
    _UNMARK_CALL,
    _SET_CALL,
    _CLAIM,
    _REJECT_TOKEN,
    _DELETE,
)
_COMBINED: Final = _combined(_PARTS)
_PART_NUMBER: Final = {script.name: i for i, script in enumerate(_PARTS, 1)}

_SCRIPTS: Final = (_COMBINED, *_PARTS)


@dataclass(frozen=True, slots=True)
class _Eval:
    script: _Script
    keys: tuple[str, ...]
    args: tuple[_Arg, ...]


# --- keys --------------------------------------------------------------------------------------------------------


def _tag(value: str) -> str:
    """Escape an id for use inside a hash tag, injectively.

    A tag ends at the first "}", so braces are escaped, and "%" too so that distinct ids stay distinct. The
    empty id becomes a lone "%" (which no escaped id can be) because an empty tag "{}" would make Redis
    Cluster hash the whole key and scatter the user's keys over several slots.
    """
    if not value:
        return "%"
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


@dataclass(frozen=True, slots=True)
class _Keys:
    prefix: str

    def devices(self, user_id: str) -> str:
        return f"{self.prefix}{{{_tag(user_id)}}}:devs"

    def binding_prefix(self, user_id: str) -> str:
        # The device id is the key's tail after a fixed separator, so it needs no escaping.
        return f"{self.prefix}{{{_tag(user_id)}}}:b:"

    def binding(self, user_id: str, device_id: str) -> str:
        return self.binding_prefix(user_id) + device_id

    def notices_prefix(self, user_id: str) -> str:
        return f"{self.prefix}{{{_tag(user_id)}}}:n:"

    def notices(self, user_id: str, device_id: str) -> str:
        return self.notices_prefix(user_id) + device_id

    def waking_prefix(self, user_id: str) -> str:
        return f"{self.prefix}{{{_tag(user_id)}}}:w:"

    def waking(self, user_id: str, device_id: str) -> str:
        return self.waking_prefix(user_id) + device_id

    def node(self, node_id: str) -> str:
        return f"{self.prefix}alive:{{{_tag(node_id)}}}"

    def call(self, call_id: str) -> str:
        return f"{self.prefix}call:{{{_tag(call_id)}}}"

    def push_claim(self, call_id: str, device_id: str) -> str:
        return f"{self.prefix}push:{{{_tag(call_id)}}}:{device_id}"


# --- values ------------------------------------------------------------------------------------------------------


def _dumps(value: dict[str, Any]) -> str:
    # orjson: compact and UTF-8 like json.dumps(separators=(",", ":"), ensure_ascii=False), in a third of the
    # time (the Redis call-setup profile had 3% of the server in the json module).
    return orjson.dumps(value).decode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _gc_ttl(lifetime: float) -> int:
    """Redis TTL (whole seconds, at least `GC_SLACK`) for something that logically lives `lifetime` more."""
    return max(0, math.ceil(lifetime)) + GC_SLACK


def _encode_device(device: Device) -> str:
    # The reject_token script relies on this exact shape: "registered_at" first, then "push", compact.
    push = device.push
    return _dumps(
        {
            "registered_at": device.registered_at,
            "push": None
            if push is None
            else {
                "platform": push.platform.value,
                "bundle_id": push.bundle_id,
                "environment": push.environment.value,
                "voip_token": push.voip_token,
                "alert_token": push.alert_token,
            },
        }
    )


def _decode_device(user_id: str, device_id: str, raw: bytes | str) -> Device:
    data = orjson.loads(raw)
    push = data["push"]
    return Device(
        user_id=user_id,
        device_id=device_id,
        push=None
        if push is None
        else PushBinding(
            platform=Platform(push["platform"]),
            bundle_id=push["bundle_id"],
            environment=PushEnvironment(push["environment"]),
            voip_token=push["voip_token"],
            alert_token=push["alert_token"],
        ),
        registered_at=float(data["registered_at"]),
    )


def _encode_binding(binding: Binding) -> str:
    return _dumps({"conn_id": binding.conn_id, "node_id": binding.node_id, "expires_at": binding.expires_at})


def _decode_binding(user_id: str, device_id: str, raw: bytes | str) -> Binding:
    data = orjson.loads(raw)
    return Binding(
        user_id=user_id,
        device_id=device_id,
        conn_id=data["conn_id"],
        node_id=data["node_id"],
        expires_at=float(data["expires_at"]),
    )


def _encode_call(record: CallRecord, expires_at: float) -> str:
    return _dumps(
        {
            "call_id": record.call_id,
            "caller_user": record.caller_user,
            "caller_device": record.caller_device,
            "callee_user": record.callee_user,
            "node_id": record.node_id,
            "phase": record.phase.value,
            "created_at": record.created_at,
            "answered_by": record.answered_by,
            "expires_at": expires_at,
        }
    )


def _decode_call(raw: bytes | str) -> tuple[CallRecord, float]:
    data = orjson.loads(raw)
    record = CallRecord(
        call_id=data["call_id"],
        caller_user=data["caller_user"],
        caller_device=data["caller_device"],
        callee_user=data["callee_user"],
        node_id=data["node_id"],
        phase=CallPhase(data["phase"]),
        created_at=float(data["created_at"]),
        answered_by=data["answered_by"],
    )
    return record, float(data["expires_at"])


def _encode_notice(notice: Notice) -> str:
    return _dumps(
        {
            "kind": notice.kind.value,
            "call_id": notice.call_id,
            "caller_id": notice.caller_id,
            "caller_name": notice.caller_name,
            "video": notice.video,
            "at": notice.at,
            "expires_at": notice.expires_at,
            "reason": notice.reason,
        }
    )


def _encode_ref(ref: CallRef, expires_at: float) -> str:
    return _dumps(
        {
            "node": ref.node_id,
            "expires_at": expires_at,
            "party": ref.party,
            "caller": ref.caller_id,
            "caller_name": ref.caller_name,
            "video": ref.video,
        }
    )


def _decode_ref(call_id: str, value: dict[str, Any]) -> CallRef:
    return CallRef(
        call_id=call_id,
        node_id=str(value["node"]),
        party=bool(value["party"]),
        caller_id=str(value["caller"]),
        caller_name=value["caller_name"],
        video=bool(value["video"]),
    )


def _decode_notice(raw: bytes | str) -> Notice:
    data = orjson.loads(raw)
    return Notice(
        kind=NoticeKind(data["kind"]),
        call_id=data["call_id"],
        caller_id=data["caller_id"],
        caller_name=data["caller_name"],
        video=bool(data["video"]),
        at=float(data["at"]),
        expires_at=float(data["expires_at"]),
        reason=data["reason"],
    )


class RedisStore:
    """A `Store` in Redis, shared by every process that uses the same server and prefix.

    `url` is one of the forms `signaling.redis_url` describes: one server (`redis://[:password@]host:port/db`,
    `rediss://`, `unix://`), a Redis Cluster (`redis+cluster://host:port,host:port`) or a master that Sentinel
    manages (`redis+sentinel://host:port/<master>`); a malformed one raises `ValueError`. It also names the
    server in error messages, with any password removed. `client` replaces the client built from `url`; the
    store then leaves closing it to its owner. Device records expire `device_ttl` seconds after their
    `registered_at`. Every method raises `StoreUnavailable` when Redis fails, except `ping`.
    """

    def __init__(
        self,
        url: str,
        clock: Clock,
        *,
        prefix: str = DEFAULT_PREFIX,
        device_ttl: float = DEFAULT_DEVICE_TTL,
        client: redis_url.Client | None = None,
        timeout: float = _SOCKET_TIMEOUT,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces (they delimit hash tags)")
        if device_ttl <= 0:
            raise ValueError("device_ttl must be positive")
        self._clock = clock
        self.url = url
        self.prefix = prefix
        self._keys = _Keys(prefix)
        self._device_ttl = device_ttl
        target = redis_url.parse(url)
        self._target = target
        self._where = target.where
        self._owned: redis_url.RedisClient | None = None
        if client is None:
            # One retry, on connection errors only: it hides a pooled connection that died (say, Redis
            # restarted) without re-running a command that may have executed before a timeout. (A cluster
            # client retries by its own rules, after refreshing its map of the slots.)
            # No socket_timeout: every round trip is bounded by `timeout` as a whole (the batcher's, and the
            # direct calls' below), instead of redis-py opening a timeout context for each reply it reads.
            self._owned = target.connect(
                decode_responses=True,
                socket_timeout=None,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
            )
            client = self._owned.client
        self._client = client
        # Every command goes through the batcher: those issued in one event-loop iteration share a round trip.
        self._timeout = timeout
        self._batch = Batcher(client, timeout=timeout)
        self.combines_scripts = not isinstance(client, redis.asyncio.RedisCluster)
        """Whether the scripts of one operation run as one EVALSHA (on one server; on a cluster the keys of one
        EVALSHA must share a slot, so each runs on its own)."""
        # Heartbeats: the nodes this store has beaten for, and when one of their own beats was last found lapsed
        # (see `heartbeat`).
        self._beaten: set[str] = set()
        self._lapsed_at: dict[str, float] = {}

    async def start(self) -> None:
        """Check Redis answers and load the scripts (on every master of a cluster); raise `StoreUnavailable`
        naming where Redis was looked for otherwise. A plain URL that leads to a cluster node is refused: the
        keys of other nodes' slots would fail one by one at run time."""
        try:
            async with asyncio.timeout(self._timeout):
                if isinstance(self._client, redis.asyncio.RedisCluster):
                    # A cluster client refuses PING and SCRIPT LOAD in a pipeline: they are not keyed to a slot.
                    await self._client.ping(target_nodes=redis.asyncio.RedisCluster.PRIMARIES)
                    await self._load_scripts(_SCRIPTS)
                    return
                pipe = self._client.pipeline(transaction=False)
                pipe.ping()
                pipe.info("cluster")
                for script in _SCRIPTS:
                    pipe.script_load(script.source)
                _, cluster, *_ = await pipe.execute()
        except redis_url.ERRORS as exc:
            raise StoreUnavailable(f"cannot reach Redis at {self._where}: {self._scrub(exc)}") from exc
        if cluster.get("cluster_enabled"):
            raise StoreUnavailable(
                f"Redis at {self._where} is a Redis Cluster node: use a redis+cluster:// URL for a cluster"
            )

    async def close(self) -> None:
        """Close the client if this store built it (an injected client belongs to the caller)."""
        await self._batch.close()
        if self._owned is not None:
            with self._translate("close"):
                await self._owned.aclose()

    async def ping(self) -> bool:
        """True when Redis (every master of a cluster) answers PING now; never raises."""
        try:
            async with asyncio.timeout(self._timeout):
                if isinstance(self._client, redis.asyncio.RedisCluster):
                    return bool(await self._client.ping(target_nodes=redis.asyncio.RedisCluster.PRIMARIES))
                return bool(await self._client.ping())
        except Exception:
            return False

    async def register(self, binding: Binding, device: Device, max_devices: int) -> Registered:
        """See `Store.register`: one script, which also takes the device's notices. Raises `ValueError` if
        binding and device disagree."""
        check_register_args(binding, device, max_devices)
        now = self._clock.now()
        user_id, device_id = device.user_id, device.device_id
        ((previous, raw_notices, raw_waking),) = await self._eval(
            "register",
            _Eval(
                _REGISTER,
                (
                    self._keys.devices(user_id),
                    self._keys.binding(user_id, device_id),
                    self._keys.notices(user_id, device_id),
                    self._keys.waking(user_id, device_id),
                ),
                (
                    device_id,
                    _encode_device(device),
                    _encode_binding(binding),
                    binding.conn_id,
                    repr(now),
                    _gc_ttl(binding.expires_at - now),
                    max_devices,
                    repr(float(self._device_ttl)),
                    self._keys.binding_prefix(user_id),
                    GC_SLACK,
                    self._keys.notices_prefix(user_id),
                    self._keys.waking_prefix(user_id),
                ),
            ),
        )

        def decode() -> Registered:
            replaced = None if previous is None else _decode_binding(user_id, device_id, previous)
            notices = (_decode_notice(raw) for raw in raw_notices)
            entries = []
            for i in range(0, len(raw_waking), 2):
                value = orjson.loads(raw_waking[i + 1])
                if value["expires_at"] > now:
                    entries.append((float(value["expires_at"]), _decode_ref(_text(raw_waking[i]), value)))
            entries.sort(key=lambda entry: (entry[0], entry[1].call_id))
            return Registered(
                replaced=replaced,
                notices=tuple(n for n in notices if n.expires_at > now),
                waking=tuple(ref for _, ref in entries),
            )

        return self._decode(decode)

    async def add_notices(self, user_id: str, notices: Sequence[tuple[str, Notice]]) -> None:
        """See `Store.add_notices`: one script for every device named. Notices already expired are not kept."""
        if not notices:
            return
        by_device: dict[str, list[str]] = {}
        for device_id, notice in notices:
            by_device.setdefault(device_id, []).append(_encode_notice(notice))
        args: list[_Arg] = [repr(self._clock.now()), MAX_NOTICES, GC_SLACK]
        for encoded in by_device.values():
            args += [len(encoded), *encoded]
        await self._eval(
            "add_notices",
            _Eval(_ADD_NOTICES, tuple(self._keys.notices(user_id, d) for d in by_device), tuple(args)),
        )

    async def heartbeat(self, node_id: str, ttl: float, watch: Collection[str]) -> frozenset[str]:
        """See `Store.heartbeat`: one pipeline of a GET and a SET of this node's beat and a GET per watched
        node. Liveness is the expiry in the value, read against the clock, as for every other record here.

        A node whose beat lapsed (expired, or so long ago that Redis collected it) is gone, unless this node's own
        beat lapsed too: then Redis lost its data (a restart: it keeps nothing on disk) or was out of reach, for
        everyone as likely as for us, and for `ttl` from then no node counts as gone: every live node beats
        again sooner.
        """
        now = self._clock.now()
        nodes = sorted(set(watch))
        previous, _, *values = await self._run(
            "heartbeat",
            [
                ("GET", self._keys.node(node_id)),
                ("SET", self._keys.node(node_id), repr(now + ttl), "EX", _gc_ttl(ttl)),
                *(("GET", self._keys.node(node)) for node in nodes),
            ],
        )
        if node_id in self._beaten and (previous is None or float(previous) <= now):
            self._lapsed_at[node_id] = now
        self._beaten.add(node_id)
        if now - self._lapsed_at.get(node_id, -math.inf) < ttl:
            return frozenset()
        return frozenset(n for n, v in zip(nodes, values, strict=True) if v is None or float(v) <= now)

    async def take_notices(self, user_id: str, device_id: str) -> tuple[Notice, ...]:
        """See `Store.take_notices`: one script (LRANGE and DEL)."""
        now = self._clock.now()
        (raw_notices,) = await self._eval(
            "take_notices", _Eval(_TAKE_NOTICES, (self._keys.notices(user_id, device_id),), ())
        )
        return self._decode(lambda: tuple(n for n in map(_decode_notice, raw_notices) if n.expires_at > now))

    async def claim_push(
        self, call_id: str, device_id: str, ttl: float, *, waking: tuple[str, CallRef] | None = None
    ) -> bool:
        """See `Store.claim_push`: one script, and with `waking` a second in the same pipeline (the two keys
        live in different hash slots, so they are not one script). The claim's expiry is in the value."""
        now = self._clock.now()
        calls = [
            _Eval(
                _CLAIM,
                (self._keys.push_claim(call_id, device_id),),
                (repr(now), repr(float(now + ttl)), _gc_ttl(ttl)),
            )
        ]
        if waking is not None:
            user_id, ref = waking
            value = _encode_ref(ref, now + ttl)
            calls.append(
                _Eval(
                    _MARK_WAKING,
                    (self._keys.waking(user_id, device_id),),
                    (call_id, value, repr(now), _gc_ttl(ttl)),
                )
            )
        claimed, *_ = await self._eval("claim_push", *calls)
        return bool(claimed)

    async def reject_token(self, user_id: str, device_id: str, token: str, invalid_since: float | None) -> bool:
        """See `Store.reject_token`: one script. A push binding left with no token becomes None; the record
        keeps its `registered_at` and its TTL. An unknown or expired device has nothing to remove."""
        (removed,) = await self._eval(
            "reject_token",
            _Eval(
                _REJECT_TOKEN,
                (self._keys.devices(user_id),),
                (
                    device_id,
                    token,
                    "" if invalid_since is None else repr(float(invalid_since)),
                    repr(self._clock.now()),
                    repr(float(self._device_ttl)),
                ),
            ),
        )
        return bool(removed)

    async def unregister(self, user_id: str, device_id: str, conn_id: str) -> bool:
        """See `Store.unregister`: one compare-and-delete script."""
        (removed,) = await self._eval(
            "unregister",
            _Eval(
                _UNREGISTER,
                (self._keys.binding(user_id, device_id),),
                (conn_id, repr(self._clock.now())),
            ),
        )
        return bool(removed)

    async def refresh(self, bindings: Sequence[Binding]) -> list[Binding]:
        """See `Store.refresh`: one pipeline of compare-and-set scripts. Expired bindings are not revived here:
        they are returned."""
        if not bindings:
            return []
        now = self._clock.now()
        replies = await self._eval(
            "refresh",
            *(
                _Eval(
                    _REFRESH,
                    (self._keys.binding(b.user_id, b.device_id),),
                    (b.conn_id, _encode_binding(b), _gc_ttl(b.expires_at - now), repr(now)),
                )
                for b in bindings
            ),
        )
        return [b for b, reply in zip(bindings, replies, strict=True) if int(reply) < 0]

    async def presence(self, user_id: str) -> Presence:
        """See `Store.presence`: one script. Devices are ordered by device id; bindings follow their devices."""
        now = self._clock.now()
        (reply,) = await self._eval("presence", self._presence_eval(user_id))
        return self._decode(lambda: self._decode_presence(user_id, reply, now))

    async def forget_device(self, user_id: str, device_id: str) -> None:
        """See `Store.forget_device`: one script. Forgetting an unknown device is not an error."""
        await self._eval(
            "forget_device",
            _Eval(
                _FORGET,
                (
                    self._keys.devices(user_id),
                    self._keys.binding(user_id, device_id),
                    self._keys.notices(user_id, device_id),
                    self._keys.waking(user_id, device_id),
                ),
                (device_id,),
            ),
        )

    async def open_call(self, record: CallRecord, ttl: float) -> CallOpened:
        """See `Store.open_call`: one pipeline of the create script and the callee's presence script.

        An expired record with the same id counts as free, as in `MemoryStore`.
        """
        now = self._clock.now()
        created, reply = await self._eval(
            "open_call",
            _Eval(
                _CREATE_CALL,
                (self._keys.call(record.call_id),),
                (_encode_call(record, now + ttl), repr(now), _gc_ttl(ttl)),
            ),
            self._presence_eval(record.callee_user),
        )
        callee = self._decode(lambda: self._decode_presence(record.callee_user, reply, now))
        return CallOpened(created=bool(created), callee=callee)

    async def update_call(
        self, record: CallRecord, ttl: float, *, parties: Sequence[tuple[str, str]] = ()
    ) -> None:
        """See `Store.update_call`: one SET, or with `parties` one pipeline of a SET script and one marking
        script per party."""
        now = self._clock.now()
        if not parties:
            key = self._keys.call(record.call_id)
            await self._run("update_call", [("SET", key, _encode_call(record, now + ttl), "EX", _gc_ttl(ttl))])
            return
        value = _encode_ref(CallRef(record.call_id, record.node_id, party=True), now + ttl)
        await self._eval(
            "update_call",
            _Eval(_SET_CALL, (self._keys.call(record.call_id),), (_encode_call(record, now + ttl), _gc_ttl(ttl))),
            *(
                _Eval(_MARK_WAKING, (self._keys.waking(u, d),), (record.call_id, value, repr(now), _gc_ttl(ttl)))
                for u, d in parties
            ),
        )

    async def get_call(self, call_id: str) -> CallRecord | None:
        """The call record (one GET), or None if it was never opened, was closed, or has expired."""
        (raw,) = await self._run("get_call", [("GET", self._keys.call(call_id))])
        if raw is None:
            return None
        record, expires_at = self._decode(lambda: _decode_call(raw))
        return record if expires_at > self._clock.now() else None

    async def close_call(self, call_id: str, *, parties: Sequence[tuple[str, str]] = ()) -> None:
        """See `Store.close_call`: one DEL, or with `parties` a DEL script and an HDEL script each (one EVALSHA
        on one server, see `combines_scripts`)."""
        if not parties:
            await self._run("close_call", [("DEL", self._keys.call(call_id))])
            return
        await self._eval(
            "close_call",
            _Eval(_DELETE, (self._keys.call(call_id),), ()),
            *(_Eval(_UNMARK_CALL, (self._keys.waking(u, d),), (call_id,)) for u, d in parties),
        )

    # --- internals ---------------------------------------------------------------------------------------------

    def _presence_eval(self, user_id: str) -> _Eval:
        return _Eval(_PRESENCE, (self._keys.devices(user_id),), (self._keys.binding_prefix(user_id),))

    def _decode_presence(self, user_id: str, reply: Any, now: float) -> Presence:
        fields, raw_bindings = reply
        entries = sorted((_text(fields[i]), fields[i + 1], raw_bindings[i // 2]) for i in range(0, len(fields), 2))
        devices: list[Device] = []
        bindings: list[Binding] = []
        for device_id, raw_device, raw_binding in entries:
            device = _decode_device(user_id, device_id, raw_device)
            if device.registered_at + self._device_ttl <= now:
                continue
            devices.append(device)
            if raw_binding is not None:
                binding = _decode_binding(user_id, device_id, raw_binding)
                if binding.expires_at > now:
                    bindings.append(binding)
        return Presence(devices=tuple(devices), bindings=tuple(bindings))

    async def _eval(self, op: str, *calls: _Eval) -> list[Any]:
        """Run scripts by SHA in one pipeline and return their replies; one round trip unless the server has
        lost its script cache (restart, failover, SCRIPT FLUSH), when the missing scripts are loaded and only
        the calls that did not run are sent again."""
        with self._translate(op):
            replies = await self._evalsha(calls)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                # A combined call is missing the combined script, and a part may be missing too.
                await self._load_scripts({_COMBINED, *(calls[i].script for i in missing)})
                for i, reply in zip(missing, await self._evalsha([calls[i] for i in missing]), strict=True):
                    replies[i] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies

    async def _load_scripts(self, scripts: Collection[_Script]) -> None:
        """SCRIPT LOAD each script: in one pipeline, or on a cluster one command each, sent to every master."""
        async with asyncio.timeout(self._timeout):
            if isinstance(self._client, redis.asyncio.RedisCluster):
                cluster = self._client
                await asyncio.gather(*(cluster.script_load(script.source) for script in scripts))
                return
            pipe = self._client.pipeline(transaction=False)
            for script in scripts:
                pipe.script_load(script.source)
            await pipe.execute()

    async def _evalsha(self, calls: Sequence[_Eval]) -> list[Any]:
        if self.combines_scripts and len(calls) > 1:
            # One EVALSHA for all of them: redis-py's cost per command is most of what a call setup costs here.
            keys: list[_Arg] = []
            args: list[_Arg] = [len(calls)]
            for call in calls:
                keys += call.keys
                args += [_PART_NUMBER[call.script.name], len(call.keys), len(call.args), *call.args]
            (reply,) = await self._batch.execute([("EVALSHA", _COMBINED.sha, len(keys), *keys, *args)])
            if isinstance(reply, Exception):
                return [reply] * len(calls)
            return [part[0] if part else None for part in reply]
        return await self._batch.execute(
            [("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args) for call in calls]
        )

    async def _run(self, op: str, commands: Sequence[tuple[_Arg, ...]]) -> list[Any]:
        """Send plain commands as one batch; their replies, or `StoreUnavailable` if any of them failed."""
        with self._translate(op):
            replies = await self._batch.execute(commands)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies

    @contextmanager
    def _translate(self, op: str) -> Iterator[None]:
        try:
            yield
        except redis_url.ERRORS as exc:
            raise StoreUnavailable(f"Redis {op} failed at {self._where}: {self._scrub(exc)}") from exc

    def _decode(self, decode: Callable[[], _T]) -> _T:
        # A value we cannot read means another version or another program wrote under our prefix.
        try:
            return decode()
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise StoreUnavailable(
                f"unreadable value in Redis at {self._where}: {type(exc).__name__}: {exc}"
            ) from exc

    def _scrub(self, exc: BaseException) -> str:
        return self._target.explain(exc)
