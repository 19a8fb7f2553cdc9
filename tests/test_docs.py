"""docs/PROTOCOL.md against the code: the generated state table, and every id, reason, type, code and default."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from push.base import Outcome
from signaling import docs, errors, wire
from signaling.call import PUSH_FAILED, TRANSITIONS, CallState
from signaling.config import Settings

TEXT = docs.PROTOCOL_MD.read_text(encoding="utf-8")


def section(heading: str) -> str:
    """The text of the section under `heading` (a whole heading line), up to the next heading of any level."""
    start = TEXT.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(r"^#{1,6} ", TEXT[start:], flags=re.MULTILINE)
    return TEXT[start : start + following.start()] if following else TEXT[start:]


def error_ids() -> set[str]:
    found: set[str] = set()
    pending: list[type[errors.SipLiteError]] = [errors.SipLiteError]
    while pending:
        cls = pending.pop()
        found.add(cls.error)
        pending.extend(cls.__subclasses__())
    return found


def test_state_table_is_generated_from_the_transitions() -> None:
    assert docs.current_block(TEXT) == docs.state_table(), "run `python -m signaling.docs` and commit the result"


def test_check_mode_passes_on_the_committed_file() -> None:
    assert docs.main(["--check"]) == 0


def test_every_error_id_is_documented() -> None:
    table = section("### 4.2 Error ids")
    missing = sorted(e for e in error_ids() if f"| `{e}` |" not in table)
    assert missing == []


def test_the_push_failed_error_id_and_its_outcome_classes_are_documented() -> None:
    assert f"| `{PUSH_FAILED}` | 480 |" in section("### 4.2 Error ids")
    stages = section("### 8.2 What the caller sees")
    missing = [o.value for o in Outcome if o is not Outcome.DELIVERED and f"| `{o.value}` |" not in stages]
    assert missing == []


def test_every_end_reason_is_documented() -> None:
    table = section("## 5. End reasons")
    missing = [r.value for r in wire.EndReason if f"| `{r.value}` |" not in table]
    assert missing == []


def test_every_frame_type_is_documented() -> None:
    missing = [m.value for m in wire.Method if f"**`{m.value}`**" not in TEXT and f"| `{m.value}` |" not in TEXT]
    assert missing == []
    assert "### 3.6 Server `error`" in TEXT


def test_every_status_code_is_in_the_status_table() -> None:
    table = section("### 4.1 Status codes")
    rows = {int(code): phrase for code, phrase in re.findall(r"^\| (\d{3}) \| ([^|]+?) \|", table, re.MULTILINE)}
    assert rows == wire.REASON_PHRASES


def test_documented_defaults_match_the_settings() -> None:
    table = section("### 1.5 Limits")
    rows = re.findall(r"^\| `([a-z_]+)` \| ([0-9.]+) \|", table, re.MULTILINE)
    assert len(rows) >= 10
    defaults = Settings()
    names = {f.name for f in fields(Settings)}
    for name, value in rows:
        assert name in names, f"{name} is not a setting"
        assert float(value) == float(getattr(defaults, name)), name


def test_the_frame_size_cap_quoted_in_the_overview_is_the_default() -> None:
    assert f"(default {Settings().max_frame_bytes} bytes of payload)" in TEXT


def test_main_rewrites_only_the_block_and_check_reports_a_stale_file(tmp_path: Path) -> None:
    stale = TEXT.replace(docs.current_block(TEXT), "| out of date |\n")
    path = tmp_path / "PROTOCOL.md"
    path.write_text(stale, encoding="utf-8")
    assert docs.main(["--check", "--file", str(path)]) == 1
    assert path.read_text(encoding="utf-8") == stale
    assert docs.main(["--file", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == docs.render(TEXT, docs.state_table())
    assert docs.main(["--check", "--file", str(path)]) == 0


@pytest.mark.parametrize(
    "document",
    [
        "no markers at all\n",
        f"{docs.BEGIN}\nonly the beginning\n",
        f"{docs.END}\n{docs.BEGIN}\n",
        f"{docs.BEGIN}\n{docs.END}\n{docs.BEGIN}\n{docs.END}\n",
    ],
    ids=["none", "no-end", "reversed", "twice"],
)
def test_misplaced_markers_are_an_error(tmp_path: Path, document: str) -> None:
    with pytest.raises(ValueError):
        docs.render(document, "| table |\n")
    path = tmp_path / "PROTOCOL.md"
    path.write_text(document, encoding="utf-8")
    assert docs.main(["--check", "--file", str(path)]) == 2


def test_every_pair_of_the_table_has_a_row_and_every_state_its_refusals() -> None:
    table = docs.state_table()
    for (state, event), handler in TRANSITIONS.items():
        row = f"| `{state.value}` | `{event.__name__}` |"
        assert row in table and f"`{handler.__name__}`" in table
    for state in CallState:
        assert sum(line.startswith(f"| `{state.value}` |") for line in table.splitlines()) >= 1


def test_every_setting_has_a_row_in_the_readme_configuration_table() -> None:
    readme = (docs.PROTOCOL_MD.parent.parent / "README.md").read_text(encoding="utf-8")
    missing = [f.name for f in fields(Settings) if f"| `SIPLITE_{f.name.upper()}` |" not in readme]
    assert missing == []
