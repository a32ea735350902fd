"""docs/protocol.md must describe the state machines exactly as compiled."""

from __future__ import annotations

import re
from pathlib import Path

from palisade_c import fsm

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _doc_tables() -> dict[str, dict[tuple[str, str], str]]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("State machines as implemented"):]
    rows = re.findall(r"^\| ([CS]_[A-Z_]+) \| ([a-z_]+) \| ([CS]_[A-Z_]+) \|$", section, re.M)
    out: dict[str, dict[tuple[str, str], str]] = {"C": {}, "S": {}}
    for src, event, dst in rows:
        out[src[0]][(src, event)] = dst
    return out


def test_state_tables_in_docs_match_the_compiled_tables() -> None:
    doc = _doc_tables()
    assert doc["C"] == fsm.transition_table(False)
    assert doc["S"] == fsm.transition_table(True)


def test_every_seed_state_is_named() -> None:
    assert len(fsm.CLIENT_STATES) == 11 and len(fsm.SERVER_STATES) == 13
    text = DOC.read_text(encoding="utf-8")
    for state in fsm.CLIENT_STATES + fsm.SERVER_STATES:
        assert state in text
