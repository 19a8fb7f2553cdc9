"""Documentation generated from the code, so it cannot drift: the call-state table of docs/PROTOCOL.md.

    python -m signaling.docs           rewrite the table between the markers in docs/PROTOCOL.md
    python -m signaling.docs --check   exit 1 (and change nothing) if the table there is out of date

The table has one row per `(state, event)` pair of `signaling.call.TRANSITIONS`, plus one row per state naming
the events it refuses. "Can move to" is read from the handler's source (every `self.state = CallState.X` it, or
a `Call` method it calls, can reach), so it follows the code; "What happens" is the handler's docstring, or a
summary kept below, or a phrase made from the handler's name.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from signaling.call import EVENT_TYPES, TRANSITIONS, Call, CallState

BEGIN: Final = "<!-- state-table:begin -->"
END: Final = "<!-- state-table:end -->"
PROTOCOL_MD: Final = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

# How each core event reaches the call, in wire terms (server.py does the mapping).
TRIGGERS: Final[dict[str, str]] = {
    "LegProgressed": "device `response` 180/183 to `invite`",
    "LegAnswered": "device `response` 2xx with `sdp` to `invite`",
    "LegRejected": "device `response` 300-699 to `invite`",
    "LegLost": "a callee device's connection closed",
    "CallerAcked": "caller `ack`",
    "CallerCancelled": "caller `cancel`",
    "CallerLost": "the caller's connection closed",
    "HangupReceived": "`bye` from the caller or a device",
    "UpdateReceived": "`update` from the caller or a device",
    "UpdateAnswered": "`response` to a server `update`",
    "IceReceived": "`ice` from the caller or a device",
    "TimerFired": "ring, update or `ack_grace` timer",
    "PushAccepted": "APNs accepted the VoIP push to a device",
    "PushFailed": "the VoIP push to a device failed (surely, or maybe: a timeout or a lost connection)",
    "DeviceConnected": "a callee device registered on a new connection (woken, or back on a fresh socket)",
    "PartyReattached": "the caller or the answering device registered again on a new connection (any node)",
}

# What a handler does, for handlers without a docstring. Wire terms; keep each to a sentence or three.
SUMMARIES: Final[dict[str, str]] = {
    "_on_progress": "The first 180 or 183 of the call is relayed to the caller; later 180s are dropped; every 183 "
    "is relayed with its `sdp`. Any other 1xx is refused (481 `invalid_state`); a 183 with `sdp` from a device "
    "that owes an answer to an `update` is refused as a 200 would be.",
    "_on_answer": "This device wins: 200 with its `sdp` to the caller, then the device's held ICE candidates, "
    "then `cancel` `answered_elsewhere` to every other ringing device. From a device that has not answered "
    "every `update` the caller sent while it rang: refused (491 `request_pending`), and it keeps ringing.",
    "_on_reject": "603: 603 to the caller, `cancel` `declined_elsewhere` to the other ringing devices. Other "
    "codes: this leg fails; once no device is left ringing the caller gets 486 if any device sent 486, "
    "else 488 if any sent 488, else 480.",
    "_on_leg_lost": "This leg fails; once no device is left ringing the caller gets 486, 488 or 480 as for a "
    "rejection.",
    "_on_cancel": "From the caller (`cancel`, or `bye` before an answer): 200 to it, 487 to its `invite`, "
    "`cancel` `caller_cancelled` to every ringing device. A `bye` from a ringing device is refused "
    "(481 `invalid_state`).",
    "_on_caller_lost_ringing": "`cancel` `caller_gone` to every ringing device.",
    "_on_ring_timer": "Ring timeout: 408 to the caller's `invite`, `cancel` `no_answer` to every ringing device, "
    "`ended` `unanswered` (and `missed`) held for every device still waking. `ack_grace`: a connected device "
    "with a `voip_token` that never answered the `invite` is pushed, once. Any other timer: nothing.",
    "_on_push_accepted": "The first accepted push of the call: 183 `push_sent` to the caller. Later ones: "
    "nothing.",
    "_on_push_failed": "A push that surely failed ends that leg; one that may have arrived leaves it waiting. "
    "Once no leg can answer, the caller gets 480 (or 486/488 as for rejections) and every waking device's `ended` "
    "`failed` is held for it.",
    "_on_device_connected": "The device is offered the call: `invite` with the caller's offer, then every `ice` "
    "candidate the caller sent; the first woken device also gives the caller 183 `callee_connected`. A device "
    "whose leg already ended: nothing.",
    "_on_ice_ringing": "From the caller: 200, relayed to every ringing device. From a ringing device: 200, "
    "held, and relayed to the caller only if that device answers. At most 64 per party before the "
    "answer (then 481 `invalid_state`).",
    "_on_ack": "Relayed to the answering device as `ack`.",
    "_on_hangup": "200 to the sender, `bye` `remote_hangup` to the other party.",
    "_on_party_lost": "The caller or the answering device lost its connection: `peer` `reconnecting` to the "
    "other party, and `reattach_grace` to come back (with no grace: `bye` `peer_gone` to the other party at "
    "once). A device that lost the race: nothing.",
    "_on_reattached": "The party is back: `peer` `connected` to both parties (to the one that came back: "
    "`reconnecting` if the other is away too). A party that was never seen to drop: nothing.",
    "_on_answered_timer": "Update timeout: 408 to the pending UPDATE. Re-attach timeout: `bye` `peer_gone` to "
    "the other party, and the call ends. Any other timer: nothing.",
    "_on_update": "Relayed to the other party as `update`; the update timer starts. While another UPDATE is "
    "pending, either way: 491 `request_pending`.",
    "_on_update_answer": "From the party the UPDATE was relayed to: a 1xx is dropped; a final code is relayed "
    "(with its `sdp`) as the final response to the UPDATE. From a device that lost the answer race, answering "
    "an `update` sent while it rang: nothing. Otherwise 481 `invalid_state`.",
    "_on_update_ringing": "From the caller: its `sdp` replaces the offer. 200 to it at once; `update` with the "
    "new offer to every ringing device (a device woken later gets it in its `invite`). The answer to it comes in "
    "the 200 to the `invite`. From a ringing device: 481 `invalid_state`.",
    "_on_update_answer_ringing": "From a ringing device that owes an answer to an `update`: 100-299 takes the "
    "new offer (nothing is relayed); 300-699 rejects the call as that code in a `response` to the `invite` "
    "would. Otherwise 481 `invalid_state`.",
    "_on_update_timer": "Update timeout: 408 to the pending UPDATE. Any other timer: nothing.",
    "_on_ice_connected": "200 to the sender, relayed to the other party.",
}

Handler = Callable[..., Any]


def _first_line(doc: str | None) -> str | None:
    if not doc or not doc.strip():
        return None
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(paragraph.split())


def _name_of(handler: Handler) -> str:
    return str(getattr(handler, "__name__", repr(handler)))


def summary(handler: Handler) -> str:
    """What `handler` does: its docstring's first paragraph, else `SUMMARIES`, else a phrase from its name."""
    name = _name_of(handler)
    text = _first_line(inspect.getdoc(handler)) or SUMMARIES.get(name)
    if text is None:
        text = name.removeprefix("_on_").replace("_", " ").capitalize() + "."
    return text.replace("|", "\\|")


def trigger(event: type) -> str:
    """How `event` arrives, in wire terms: `TRIGGERS`, else the event's docstring, else nothing."""
    text = TRIGGERS.get(event.__name__) or _first_line(event.__doc__) or ""
    return text.replace("|", "\\|")


def _is_self_attr(node: ast.expr, attr: str | None = None) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and (attr is None or node.attr == attr)
    )


def states_reached(handler: Handler, _seen: set[str] | None = None) -> set[CallState]:
    """Every state `handler` may set, following the `Call` methods it calls. Raises `ValueError` when it sets
    the state to something other than a `CallState` member, which this reader cannot follow."""
    seen = set() if _seen is None else _seen
    name = _name_of(handler)
    if name in seen:
        return set()
    seen.add(name)
    tree = ast.parse(textwrap.dedent(inspect.getsource(handler)))
    states: set[CallState] = set()
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        if any(_is_self_attr(t, "state") for t in targets):
            value = getattr(node, "value", None)
            if not (
                isinstance(value, ast.Attribute)
                and isinstance(value.value, ast.Name)
                and value.value.id == "CallState"
                and value.attr in CallState.__members__
            ):
                raise ValueError(f"{name} sets the call state from an expression; name a CallState member")
            states.add(CallState[value.attr])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_self_attr(node.func):
            callee = inspect.getattr_static(Call, node.func.attr, None)
            if inspect.isfunction(callee):
                states |= states_reached(callee, seen)
    return states


def _code(text: str) -> str:
    return f"`{text}`"


def state_table() -> str:
    """The call-state table, as Markdown, generated from `signaling.call.TRANSITIONS`."""
    lines = [
        "| State | Event | Arrives as | Handler | Can move to | What happens |",
        "|---|---|---|---|---|---|",
    ]
    for state in CallState:
        for event in EVENT_TYPES:
            handler: Handler | None = TRANSITIONS.get((state, event))
            if handler is None:
                continue
            reached = [s for s in CallState if s in states_reached(handler) and s is not state]
            moves = ", ".join(_code(s.value) for s in reached) or "-"
            cells = [
                _code(state.value),
                _code(event.__name__),
                trigger(event),
                _code(_name_of(handler)),
                moves,
                summary(handler),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        refused = [_code(e.__name__) for e in EVENT_TYPES if (state, e) not in TRANSITIONS]
        if refused:
            which = "every event" if len(refused) == len(EVENT_TYPES) else "any other: " + ", ".join(refused)
            cells = [
                _code(state.value),
                which,
                "",
                "",
                "-",
                "Refused: 481 `invalid_state` (`no_such_call` if the sender is no party of the call). "
                "The call is left exactly as it was.",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(document: str, table: str) -> str:
    """`document` with the text between the state-table markers replaced by `table`. Raises `ValueError`
    unless each marker appears exactly once, begin before end."""
    if document.count(BEGIN) != 1 or document.count(END) != 1:
        raise ValueError(f"expected one {BEGIN} and one {END} marker")
    head, rest = document.split(BEGIN)
    _, tail = rest.split(END)
    if END in head:
        raise ValueError(f"{END} comes before {BEGIN}")
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def current_block(document: str) -> str:
    """The text between the state-table markers, without the newline that follows the begin marker."""
    _, rest = document.split(BEGIN, 1)
    block, _ = rest.split(END, 1)
    return block.removeprefix("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m signaling.docs", description="Regenerate the call-state table of docs/PROTOCOL.md."
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date; write nothing")
    parser.add_argument("--file", type=Path, default=PROTOCOL_MD, help="the Markdown file (docs/PROTOCOL.md)")
    args = parser.parse_args(argv)
    path: Path = args.file
    try:
        document = path.read_text(encoding="utf-8")
        updated = render(document, state_table())
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if updated == document:
        return 0
    if args.check:
        print(f"{path}: the call-state table is out of date; run `python -m signaling.docs`", file=sys.stderr)
        return 1
    path.write_text(updated, encoding="utf-8")
    print(f"{path}: call-state table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
