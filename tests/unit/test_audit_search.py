"""Pure pieces of the audit search: keyword tokens, cursors, filters, session resolution, and
the transcript the CLI prints."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest

from bench.audit_events import uuid7
from services.cli.audit import transcript
from services.recorder.records import Hashes, call_time_ms, query_tokens, resolve_sessions
from services.recorder.search import CallSearch, InvalidSearch, decode_cursor, encode_cursor, parse_time


def test_query_tokens_match_the_index_tokenizer() -> None:
    # splitByNonAlpha on the lower-cased body: ASCII punctuation separates, non-ASCII does not.
    assert query_tokens("Deploy-KEY rotate_deploy; naïve  deploy") == ["deploy", "key", "rotate", "naïve"]
    assert query_tokens("--- !!!") == []


def test_cursor_round_trip_and_garbage() -> None:
    cursor = encode_cursor(1_795_000_000_123, "01a1-call")
    assert decode_cursor(cursor) == (1_795_000_000_123, "01a1-call")
    for bad in ("", "x", encode_cursor(1, "a")[:-3] + "!!!", "WyJhIiwxXQ"):  # last: ["a",1]
        with pytest.raises(InvalidSearch):
            decode_cursor(bad)


def test_filters_become_parameters_never_sql_text() -> None:
    hostile = "x' OR 1=1 --"
    where, params = CallSearch(user=hostile, model=hostile, q="drop table", skill="pdf").conditions()
    assert hostile not in " ".join(where)
    assert params["user"] == hostile and params["tokens"] == ["drop", "table"]
    with pytest.raises(InvalidSearch, match="at most"):
        CallSearch(q=" ".join(f"w{i}" for i in range(40))).conditions()


def test_parse_time_accepts_z_offsets_and_naive_utc() -> None:
    expected = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    assert parse_time("2026-11-21T10:00:00Z") == expected
    assert parse_time("2026-11-21T11:00:00+01:00") == expected
    assert parse_time("2026-11-21T10:00:00") == expected
    with pytest.raises(InvalidSearch):
        parse_time("yesterday")


def test_call_time_comes_from_the_uuid7_id() -> None:
    call_id = uuid7(1_795_000_000_123, random.Random(1))
    assert call_time_ms(call_id, 5_000_000) == 1_795_000_000_123
    assert call_time_ms("not-a-uuid", 5_000_000) == 5_000


def _call(ms: int, session: str | None = None) -> dict[str, Any]:
    call_id = uuid7(ms, random.Random(ms))
    return {"call_id": call_id, "session_id": session or call_id}


def test_sessions_chain_through_a_batch_in_time_order() -> None:
    a, b, c = _call(1000), _call(2000), _call(3000)
    # Given newest first: resolution still walks oldest first.
    calls = [c, b, a]
    hashes = [Hashes("hc", "hb"), Hashes("hb", "ha"), Hashes("ha", "")]
    assert resolve_sessions(calls, hashes, {}) == [
        (a["call_id"], "conversation"), (a["call_id"], "conversation"), (a["call_id"], "call"),
    ]  # fmt: skip


def test_sessions_from_the_store_and_header_precedence() -> None:
    joined, named, alone = _call(1000), _call(2000, "incident-7"), _call(3000)
    hashes = [Hashes("h2", "h1"), Hashes("h3", "h1"), Hashes("h4", "unknown")]
    assert resolve_sessions([joined, named, alone], hashes, {"h1": "earlier-session"}) == [
        ("earlier-session", "conversation"), ("incident-7", "header"), (alone["call_id"], "call"),
    ]  # fmt: skip


def test_transcript_marks_masked_placeholders() -> None:
    doc = {
        "id": "s1",
        "calls": [{"call_id": "c1"}],
        "timeline": [
            {"at": "2026-11-21T10:00:00Z", "kind": "request", "call_id": "c1", "actor": "alice",
             "model": "claude-sonnet-4-5", "body": {"messages": [{"role": "user", "content": "mail [EMAIL_1] now"}]},
             "masked": [{"type": "email", "placeholder": "[EMAIL_1]", "location": "messages[0].content"}]},
            {"at": "2026-11-21T10:00:01Z", "kind": "approval_resolved", "call_id": "c1", "actor": "bob",
             "outcome": "approved"},
            {"at": "2026-11-21T10:00:02Z", "kind": "response", "call_id": "c1", "status": 200,
             "usage": {"input_tokens": 5, "output_tokens": 2}, "latency_ms": 12.0,
             "body": {"type": "message", "content": [{"type": "text", "text": "done"}]}},
        ],
    }  # fmt: skip
    text = transcript(doc)
    assert "> mail ⟦[EMAIL_1]⟧ now" in text
    assert "masked: email@messages[0].content" in text
    assert '"outcome":"approved"' in text and "< done" in text
