"""Filters of call search and export, and the keyset cursor.

A :class:`CallSearch` turns into parameterised SQL conditions on ``call_records``: values always
travel as query parameters, never spliced into the text. The cursor is the (time, call_id) of
the last row of a page, so the next page is ``(time, call_id) < cursor`` in key order: a
primary-key range read at any depth.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from services.recorder.records import query_tokens

#: Columns a search result lists (bodies are left out; fetch a call for them).
SEARCH_COLUMNS = (
    "call_id, time, session_id, session_source, subject, username, groups, model, skills, tools, "
    "state, decision, reason, rule_ids, bundle_version, approval_id, status, input_tokens, "
    "output_tokens, latency_ms, total_ms, first_token_ms, stop_reason, error_type, masked_types, "
    "substring(request_body, 1, 200) AS request_excerpt, substring(response_body, 1, 200) AS response_excerpt"
)
#: Export formats and the ClickHouse output format of each.
EXPORT_FORMATS = {"jsonl": "JSONEachRow", "parquet": "Parquet"}
#: Most tokens one keyword query may hold.
MAX_TOKENS = 16


class InvalidSearch(ValueError):
    """A search parameter that cannot be used (bad cursor, time, or too many tokens)."""


def encode_cursor(time_ms: int, call_id: str) -> str:
    """An opaque cursor for the row (time, call_id)."""
    return base64.urlsafe_b64encode(orjson.dumps([time_ms, call_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The (time ms, call_id) of a cursor, or :class:`InvalidSearch`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        time_ms, call_id = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError) as exc:
        raise InvalidSearch("invalid cursor") from exc
    if not isinstance(time_ms, int) or not isinstance(call_id, str):
        raise InvalidSearch("invalid cursor")
    return time_ms, call_id


def parse_time(value: str) -> datetime:
    """An ISO-8601 time (``Z`` or an offset; naive means UTC), or :class:`InvalidSearch`."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidSearch(f"invalid time {value[:40]!r}: use ISO 8601, e.g. 2026-11-21T10:00:00Z") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


@dataclass(frozen=True)
class CallSearch:
    """What to look for among recorded calls; every field is optional and they combine with AND."""

    user: str | None = None
    group: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    model: str | None = None
    skill: str | None = None
    decision: str | None = None
    state: str | None = None
    session: str | None = None
    q: str | None = None
    limit: int = 50
    cursor: str | None = None

    def conditions(self) -> tuple[list[str], dict[str, Any]]:
        """SQL conditions on ``call_records`` and their parameters."""
        where: list[str] = []
        params: dict[str, Any] = {}
        if self.since is not None:
            where.append("time >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')")
            params["since"] = _ms(self.since)
        if self.until is not None:
            where.append("time < fromUnixTimestamp64Milli({until:Int64}, 'UTC')")
            params["until"] = _ms(self.until)
        if self.cursor:
            time_ms, call_id = decode_cursor(self.cursor)
            where.append(
                "time <= fromUnixTimestamp64Milli({c_time:Int64}, 'UTC') AND "
                "(time < fromUnixTimestamp64Milli({c_time:Int64}, 'UTC') OR call_id < {c_id:String})"
            )
            params["c_time"], params["c_id"] = time_ms, call_id
        if self.user:
            where.append("(subject = {user:String} OR username = {user:String})")
            params["user"] = self.user
        if self.group:
            where.append("has(groups, {group:String})")
            params["group"] = self.group
        if self.model:
            where.append("model = {model:String}")
            params["model"] = self.model
        if self.skill:
            where.append("has(skills, {skill:String})")
            params["skill"] = self.skill
        if self.decision:
            where.append("decision = {decision:String}")
            params["decision"] = self.decision
        if self.state:
            where.append("state = {state:String}")
            params["state"] = self.state
        if self.session:
            where.append("session_id = {session:String}")
            params["session"] = self.session
        if self.q:
            tokens = query_tokens(self.q)
            if not tokens:
                raise InvalidSearch("q holds no searchable word (letters or digits)")
            if len(tokens) > MAX_TOKENS:
                raise InvalidSearch(f"q may hold at most {MAX_TOKENS} words")
            where.append(
                "(hasAllTokens(lower(request_body), {tokens:Array(String)}) "
                "OR hasAllTokens(lower(response_body), {tokens:Array(String)}))"
            )
            params["tokens"] = tokens
        return where, params
