"""The wide ``call_records`` row of a call: what search, replay, export and usage views read.

Pure functions (no I/O): the store reads the folded ``calls`` view for the calls a batch
touched, and this module adds what only the masked bodies tell (skills, tools, conversation
hashes) and lays the row out in :data:`CALL_RECORD_COLUMNS` order.

Sessions: a caller may name its session (``x-skillgate-session``); otherwise the ingress uses
the call id. Here a call without a named session whose messages extend an earlier call's
conversation joins that call's session: a Messages API conversation is resent whole each turn,
so turn k+1's messages minus its last two (the assistant answer and the new user turn) are
exactly turn k's messages. ``parent_hash`` of turn k+1 then equals ``conversation_hash`` of
turn k. Hashes are computed on the masked record bodies, which mask the same values the same
way in every turn, and include the caller's subject, so two users' identical prompts never join.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Columns of ``call_records`` in the order :func:`record_row` fills them.
CALL_RECORD_COLUMNS: tuple[str, ...] = (
    "call_id",
    "time",
    "session_id",
    "session_source",
    "conversation_hash",
    "parent_hash",
    "subject",
    "issuer",
    "username",
    "email",
    "groups",
    "client_id",
    "model",
    "skills",
    "tools",
    "mode",
    "stream",
    "path",
    "state",
    "decision",
    "reason",
    "rule_ids",
    "tags",
    "bundle_version",
    "approval_id",
    "approval_decisions",
    "status",
    "input_tokens",
    "output_tokens",
    "latency_ms",
    "total_ms",
    "stop_reason",
    "error_type",
    "error_message",
    "submitted_at",
    "completed_at",
    "request_body",
    "response_body",
    "masked_types",
    "masked_fingerprints",
    "blocked_tools",
    "counted",
    "version",
)

#: Expressions over a ``calls`` row, shared by the two statements that build ``call_records``.
#: Hashes are sipHash128 over the raw JSON text of the messages (a client resends a conversation
#: byte for byte, and the masked record masks the same values the same way each turn).
_EXPRESSIONS = r"""
    JSONExtractArrayRaw(ifNull(request_body, ''), 'messages') AS _msgs,
    concat(ifNull(subject, ''), '\x1f', JSONExtractRaw(ifNull(request_body, ''), 'system')) AS _head
"""
HASHES_SELECT = (
    "SELECT call_id, session_id, state, toUnixTimestamp64Micro(coalesce(submitted_at, first_event_at)) AS at_us, "
    "if(empty(_msgs), '', lower(hex(sipHash128(_head, arrayStringConcat(_msgs, '\\x1e'))))) AS conversation_hash, "
    "if(length(_msgs) >= 3 AND JSONExtractString(_msgs[-2], 'role') = 'assistant', "
    "lower(hex(sipHash128(_head, arrayStringConcat(arraySlice(_msgs, 1, length(_msgs) - 2), '\\x1e')))), '') "
    "AS parent_hash"
)
#: The ``call_records`` columns computed in SQL from a ``calls`` row joined with ``m_*`` (session
#: id, session source, counted, time ms: resolved in Python) and ``{version:UInt64}``: the bodies
#: never travel to Python and back.
RECORD_SELECT = """
    call_id,
    fromUnixTimestamp64Milli(m_time, 'UTC') AS time,
    m_session AS session_id,
    m_source AS session_source,
    if(empty(_msgs), '', lower(hex(sipHash128(_head, arrayStringConcat(_msgs, '\\x1e'))))) AS conversation_hash,
    if(length(_msgs) >= 3 AND JSONExtractString(_msgs[-2], 'role') = 'assistant',
        lower(hex(sipHash128(_head, arrayStringConcat(arraySlice(_msgs, 1, length(_msgs) - 2), '\\x1e')))), '')
        AS parent_hash,
    ifNull(subject, '') AS subject,
    ifNull(issuer, '') AS issuer,
    username,
    email,
    groups,
    client_id,
    ifNull(model, '') AS model,
    arraySort(arrayDistinct(arrayFilter(x -> x != '', arrayMap(x -> JSONExtractString(x, 'skill_id'),
        JSONExtractArrayRaw(ifNull(request_body, ''), 'container', 'skills'))))) AS skills,
    arraySort(arrayDistinct(arrayFilter(x -> x != '', arrayConcat(
        arrayMap(x -> JSONExtractString(x, 'name'), JSONExtractArrayRaw(ifNull(request_body, ''), 'tools')),
        arrayMap(x -> if(JSONExtractString(x, 'type') IN ('tool_use', 'server_tool_use'),
            JSONExtractString(x, 'name'), ''), JSONExtractArrayRaw(ifNull(response_body, ''), 'content')),
        extractAll(ifNull(response_body, ''), '"type": *"(?:server_)?tool_use"[^}]*?"name": *"([^"]+)"'))))) AS tools,
    ifNull(mode, '') AS mode,
    ifNull(stream, false) AS stream,
    ifNull(path, '') AS path,
    state,
    ifNull(decision, '') AS decision,
    ifNull(reason, '') AS reason,
    rule_ids,
    tags,
    ifNull(bundle_version, '') AS bundle_version,
    ifNull(approval_id, '') AS approval_id,
    approval_decisions,
    status,
    input_tokens,
    output_tokens,
    latency_ms,
    total_ms,
    stop_reason,
    error_type,
    error_message,
    submitted_at,
    completed_at,
    ifNull(request_body, '') AS request_body,
    ifNull(response_body, '') AS response_body,
    masked_types,
    masked_fingerprints,
    toUInt16(length(blocked_tools)) AS blocked_tools,
    m_counted AS counted,
    {version:UInt64} AS version
"""


def hashes_query(database: str) -> str:
    """Conversation hashes of the calls named by the JSON array parameter ``ids``."""
    return (
        f"WITH {_EXPRESSIONS} {HASHES_SELECT} FROM {database}.calls "
        "WHERE call_id IN (SELECT arrayJoin(JSONExtract({ids:String}, 'Array(String)')))"
    )


def insert_query(database: str) -> str:
    """``INSERT ... SELECT`` of the ``call_records`` rows of the calls in the ``m`` parameter.

    ``m`` is a JSON array of [call id, session id, session source, counted, time ms]; it is
    joined (a hash join: a Map lookup per row would be linear in the batch size).
    """
    return (
        f"INSERT INTO {database}.call_records ({', '.join(CALL_RECORD_COLUMNS)}) "  # noqa: S608
        f"WITH {_EXPRESSIONS} SELECT {RECORD_SELECT} FROM {database}.calls "
        "INNER JOIN (SELECT tupleElement(x, 1) AS m_call_id, tupleElement(x, 2) AS m_session, "
        "tupleElement(x, 3) AS m_source, tupleElement(x, 4) AS m_counted, tupleElement(x, 5) AS m_time "
        "FROM (SELECT arrayJoin(JSONExtract({m:String}, 'Array(Tuple(String, String, String, UInt8, Int64))')) AS x)) "
        "AS m ON call_id = m.m_call_id "
        "WHERE call_id IN (SELECT arrayJoin(JSONExtract({ids:String}, 'Array(String)')))"
    )


#: States that end a call: the first call_records version in one of them is the one the usage
#: views count.
TERMINAL_STATES = frozenset({"completed", "failed", "denied", "rate_limited", "expired"})

#: Tokens as ClickHouse's ``splitByNonAlpha`` tokenizer cuts them (ASCII letters and digits;
#: bytes of non-ASCII characters are part of tokens), lower-cased like the indexed expression.
_TOKEN = re.compile(r"[A-Za-z0-9\u0080-\U0010ffff]+")


def query_tokens(q: str) -> list[str]:
    """The tokens a keyword query looks for in the ``text`` indexes (lower-case, in order, unique)."""
    seen: dict[str, None] = {}
    for token in _TOKEN.findall(q.lower()):
        seen.setdefault(token, None)
    return list(seen)


def call_time_ms(call_id: str, fallback_us: int | None) -> int:
    """Milliseconds of a UUIDv7 call id's timestamp; else ``fallback_us`` (else 0).

    The id's time never changes between versions of a row, which the replacing key needs.
    """
    try:
        parsed = uuid.UUID(call_id)
    except ValueError:
        parsed = None
    if parsed is not None and parsed.version == 7:
        return parsed.int >> 80
    return (fallback_us or 0) // 1000


@dataclass(frozen=True, slots=True)
class Hashes:
    """Conversation hashes of one call (see the module docstring)."""

    conversation_hash: str
    parent_hash: str


def resolve_sessions(
    calls: Sequence[Mapping[str, Any]],
    facts: Sequence[Hashes],
    known: Mapping[str, str],
) -> list[tuple[str, str]]:
    """(session id, source) of each call, in the order given.

    ``known`` maps conversation hashes of earlier calls to their resolved sessions (from the
    store). Calls are resolved oldest first, so a conversation whose turns all arrive in one
    batch still chains turn to turn. A named session (one that is not the call's own id) always
    wins.
    """
    table = dict(known)
    order = sorted(range(len(calls)), key=lambda i: call_time_ms(str(calls[i]["call_id"]), None))
    out: list[tuple[str, str]] = [("", "")] * len(calls)
    for i in order:
        call, fact = calls[i], facts[i]
        call_id = str(call["call_id"])
        given = str(call.get("session_id") or "")
        if given and given != call_id:
            session = (given, "header")
        elif fact.parent_hash and fact.parent_hash in table:
            session = (table[fact.parent_hash], "conversation")
        else:
            session = (call_id, "call")
        out[i] = session
        if fact.conversation_hash:
            table.setdefault(fact.conversation_hash, session[0])
    return out
