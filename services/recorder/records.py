"""The wide ``call_records`` row of a call: what search, replay, export and usage views read.

Pure functions (no I/O). Each event of a call becomes a ``call_parts`` row (see
:mod:`.handlers`); :class:`CallFold` folds those rows in Python with exactly the ``max``/``min``/
union the ``calls`` view applies in ClickHouse, so the recorder builds the wide row from the
batch it is inserting (and the folds of recent calls it keeps) instead of reading the folded
state back from ClickHouse for every batch. :func:`record_row` then adds what only the masked
bodies tell (skills, tools, conversation hashes) and lays the row out in
:data:`CALL_RECORD_COLUMNS` order.

Sessions: a caller may name its session (``x-skillgate-session``); otherwise the ingress uses
the call id. Here a call without a named session whose messages extend an earlier call's
conversation joins that call's session: a Messages API conversation is resent whole each turn,
so turn k+1's messages minus its last two (the assistant answer and the new user turn) are
exactly turn k's messages. ``parent_hash`` of turn k+1 then equals ``conversation_hash`` of
turn k. Hashes are computed on the masked record bodies, which mask the same values the same
way in every turn, and include the caller's subject, so two users' identical prompts never join.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import re2

from services.recorder import handlers

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
    "first_token_ms",
    "counted",
    "version",
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
    if len(call_id) == 36 and call_id[14] == "7":  # the common case, without building a UUID
        try:
            return int(call_id[:8] + call_id[9:13], 16)
        except ValueError:
            pass
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


# ---------------------------------------------------------------------------------------------
# Folding call_parts rows in Python

# Positions in a call_parts row (handlers.CALL_PART_COLUMNS) and in its tuples.
(_P_CALL, _P_MONTH, _P_SESSION, _P_IDENT, _P_REQUEST, _P_SUBMITTED, _P_FIRST, _P_LAST, _P_DECIDED,
 _P_STATE, _P_TERMINAL, _P_APPROVAL, _P_DECISIONS, _P_TYPES, _P_FPS, _P_BLOCKED, _P_MASK,
 _P_TTFT) = range(18)  # fmt: skip
_ID_SUBJECT, _ID_ISSUER, _ID_USERNAME, _ID_EMAIL, _ID_GROUPS, _ID_CLIENT, _ID_TOKEN = range(1, 8)
(_RQ_MODEL, _RQ_MODE, _RQ_STREAM, _RQ_METHOD, _RQ_PATH, _RQ_UPSTREAM, _RQ_CLIENT_IP,
 _RQ_USER_AGENT) = range(1, 9)  # fmt: skip
_DC_AT, _DC_DECISION, _DC_REASON, _DC_RULES, _DC_TAGS, _DC_BUNDLE, _DC_UPSTREAM = range(7)
_DC_ERROR_TYPE, _DC_BODY, _DC_FAIL_OPEN = 8, 9, 10
_ST_RANK, _ST_AUTHORITY, _ST_AT, _ST_NAME, _ST_STATUS = 0, 1, 2, 3, 4
(_TM_UPSTREAM, _TM_BODY, _TM_ERROR_TYPE, _TM_ERROR_MESSAGE, _TM_STAGE, _TM_ATTEMPTS,
 _TM_ATTEMPTS_DETAIL, _TM_IN, _TM_OUT, _TM_LATENCY, _TM_REQUEST_ID, _TM_STOP,
 _TM_MODEL) = range(3, 16)  # fmt: skip
#: Where a call_parts tuple keeps its DateTime64 values (converted when read back from the store).
_TIME_FIELDS = {_P_DECIDED: (_DC_AT,), _P_STATE: (_ST_AT,), _P_TERMINAL: (1,), _P_MASK: (0,)}


def _tuple_key(value: Sequence[Any]) -> tuple[Any, ...]:
    # ClickHouse compares tuples element by element; None (NULL) sorts first here. Only copies
    # of the same event ever tie on the leading rank/time, so NULL order never picks a winner.
    return tuple((0, 0) if v is None else (1, v) for v in value)


def _greater(a: Sequence[Any], b: Sequence[Any]) -> bool:
    if a[0] != b[0]:
        return bool(a[0] > b[0])
    if a == b:
        return False
    return _tuple_key(a) > _tuple_key(b)


#: The tuple columns a fold keeps the greatest of: (attribute, index in a call_parts row).
_FOLDED_TUPLES = (
    ("ident", _P_IDENT), ("request", _P_REQUEST), ("decided", _P_DECIDED), ("state", _P_STATE),
    ("terminal", _P_TERMINAL), ("response_mask", _P_MASK),
)  # fmt: skip


@dataclass(slots=True)
class CallFold:
    """The ``call_parts`` rows of one call folded like the ``calls`` view folds them.

    ``max`` of each tuple, ``min``/``max`` of the times, unions of the arrays: folding a row twice,
    or in any order, gives the same fold, as in ClickHouse. Besides the fold, what the recorder
    learned writing the call: whether a terminal version is already in ``call_records`` (the
    usage views count that version), and the conversation hashes of the request body.
    """

    call_id: str
    session_id: str = ""
    ident: tuple[Any, ...] = handlers.NO_IDENT
    request: tuple[Any, ...] = handlers.NO_REQUEST
    submitted_at: int | None = None
    first_event_at: int | None = None
    last_event_at: int = 0
    decided: tuple[Any, ...] = handlers.NO_DECISION
    state: tuple[Any, ...] = handlers.NO_STATE
    terminal: tuple[Any, ...] = handlers.NO_TERMINAL
    approval_id: str | None = None
    approval_decisions: set[str] = field(default_factory=set)
    masked_types: set[str] = field(default_factory=set)
    masked_fingerprints: set[str] = field(default_factory=set)
    blocked_tools: set[tuple[str, ...]] = field(default_factory=set)
    response_mask: tuple[Any, ...] = handlers.NO_RESPONSE_MASK
    first_token_ms: float | None = None
    #: True once a version in a terminal state was written to call_records.
    recorded_terminal: bool = False
    #: Ids of the stored events of the call this fold has seen (all of them, or it is stale).
    event_ids: set[str] = field(default_factory=set)
    _hashes: tuple[str, Hashes] | None = None

    def add(self, part: Sequence[Any]) -> bool:
        """Fold one ``call_parts`` row in; True when anything :func:`record_row` reads changed
        (the event times alone do not count: a redelivered event must not add a version)."""
        changed = False
        if part[_P_SESSION] > self.session_id:
            self.session_id = part[_P_SESSION]
            changed = True
        for attr, index in _FOLDED_TUPLES:
            if _greater(part[index], getattr(self, attr)):
                setattr(self, attr, tuple(part[index]))
                changed = True
        submitted = part[_P_SUBMITTED]
        if submitted is not None and (self.submitted_at is None or submitted < self.submitted_at):
            self.submitted_at = submitted
            changed = True
        if self.first_event_at is None or part[_P_FIRST] < self.first_event_at:
            self.first_event_at = part[_P_FIRST]
        self.last_event_at = max(self.last_event_at, part[_P_LAST])
        approval = part[_P_APPROVAL]
        if approval is not None and (self.approval_id is None or approval > self.approval_id):
            self.approval_id = approval
            changed = True
        for values, new in (
            (self.approval_decisions, part[_P_DECISIONS]),
            (self.masked_types, part[_P_TYPES]),
            (self.masked_fingerprints, part[_P_FPS]),
        ):
            if new:
                size = len(values)
                values.update(new)
                changed = changed or len(values) != size
        if part[_P_BLOCKED]:
            size = len(self.blocked_tools)
            self.blocked_tools.update(tuple(b) for b in part[_P_BLOCKED])
            changed = changed or len(self.blocked_tools) != size
        ttft = part[_P_TTFT] if len(part) > _P_TTFT else None
        if ttft is not None and (self.first_token_ms is None or ttft > self.first_token_ms):
            self.first_token_ms = ttft
            changed = True
        return changed

    def part_row(self) -> list[Any]:
        """The fold as one ``call_parts`` row (:data:`handlers.CALL_PART_COLUMNS` order).

        Every column aggregates with ``max``/``min``/union, so this one row stands for all the
        rows folded into it: inserting it instead of them leaves the ``calls`` view unchanged.
        """
        return [
            self.call_id, handlers.call_month(self.call_id), self.session_id, self.ident,
            self.request, self.submitted_at, self.first_event_at, self.last_event_at,
            self.decided, self.state, self.terminal, self.approval_id,
            sorted(self.approval_decisions), sorted(self.masked_types),
            sorted(self.masked_fingerprints), sorted(self.blocked_tools), self.response_mask,
            self.first_token_ms,
        ]  # fmt: skip

    def copy(self) -> CallFold:
        """An independent copy: a batch being prepared never changes the fold another batch
        (not yet written) or the cache holds."""
        other = replace(self)
        other.approval_decisions = set(self.approval_decisions)
        other.masked_types = set(self.masked_types)
        other.masked_fingerprints = set(self.masked_fingerprints)
        other.blocked_tools = set(self.blocked_tools)
        other.event_ids = set(self.event_ids)
        return other

    @property
    def terminal_state(self) -> bool:
        """True once the call reached a terminal state (rank >= handlers.TERMINAL_RANK)."""
        return int(self.state[_ST_RANK]) >= handlers.TERMINAL_RANK

    @property
    def request_body(self) -> str:
        """The masked request as recorded ('' until the decision is known)."""
        return str(self.decided[_DC_BODY] or "")

    @property
    def subject(self) -> str:
        """OIDC subject of the caller ('' when no event named one)."""
        return str(self.ident[_ID_SUBJECT] or "")

    def hashes(self) -> Hashes:
        """Conversation hashes of the request body (computed once per body)."""
        body = self.request_body
        if self._hashes is None or self._hashes[0] != body:
            self._hashes = (body, conversation_hashes(self.subject, body))
        return self._hashes[1]

    def time_ms(self) -> int:
        """The call's time for ``call_records.time`` (the UUIDv7 call id's timestamp)."""
        fallback = self.submitted_at if self.submitted_at is not None else self.first_event_at
        return call_time_ms(self.call_id, fallback)


def _micros(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        delta = aware - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return value


def _plain(value: Any) -> Any:
    # clickhouse-connect returns named tuples as dicts.
    return tuple(value.values()) if isinstance(value, dict) else value


#: ``SELECT`` list that reads a call's fold back from call_parts, in CALL_PART_COLUMNS order
#: (read with :func:`fold_parts`).
FOLD_SELECT = (
    "call_id, any(call_month), max(session_id), max(ident), max(request), min(submitted_at), "
    "min(first_event_at), max(last_event_at), max(decided), max(state), max(terminal), "
    "max(approval_id), groupUniqArrayArray(approval_decisions), groupUniqArrayArray(masked_types), "
    "groupUniqArrayArray(masked_fingerprints), groupUniqArrayArray(blocked_tools), "
    "max(response_mask), max(first_token_ms)"
)


def _part_from_store(row: Sequence[Any]) -> list[Any]:
    """A call_parts row as ClickHouse returns it, in the shape :meth:`CallFold.add` takes."""
    part = [_plain(v) for v in row]
    for index in (_P_SUBMITTED, _P_FIRST, _P_LAST):
        part[index] = _micros(part[index])
    for index, positions in _TIME_FIELDS.items():
        values = list(part[index])
        for pos in positions:
            values[pos] = _micros(values[pos])
        part[index] = tuple(values)
    part[_P_BLOCKED] = [_plain(b) for b in part[_P_BLOCKED]]
    return part


def fold_parts(call_id: str, rows: Sequence[Sequence[Any]]) -> CallFold:
    """A :class:`CallFold` from a call's call_parts rows as ClickHouse returns them: raw rows
    (``SELECT`` of CALL_PART_COLUMNS) or one row already folded (``SELECT {FOLD_SELECT}``)."""
    fold = CallFold(call_id)
    for row in rows:
        fold.add(_part_from_store(row))
    return fold


def provisional_state(fold: CallFold) -> str | None:
    """The state to show while a call's end is known only from a hint, else None.

    A caller's reply or the forwarder's ``done`` claim can reach the store a batch before the
    CallCompleted / CallFailed / CallDecided that says how the call ended: the ``calls`` view
    then already shows the terminal state, without the response or the reason. A lookup shows
    the state the authoritative events support so far (``forwarding`` once allowed), so a
    poller keeps polling until the outcome is recorded.
    """
    if not fold.terminal_state or int(fold.state[_ST_AUTHORITY]) > 0:
        return None
    if int(fold.decided[_DC_AT]) <= 0:
        return "submitted"
    state = handlers.DECISION_STATE.get(str(fold.decided[_DC_DECISION]), str(fold.decided[_DC_DECISION]))
    return "forwarding" if state in ("allowed", "approved") else state


def _outcome(fold: CallFold) -> tuple[bool, bool, float | None, Any, Any]:
    """What the ``calls`` view derives from several tuples: whether the decision is known and
    the call ended, its total time, and its error type and message (a refusal's come from the
    decision)."""
    decided, state, terminal = fold.decided, fold.state, fold.terminal
    ended = fold.terminal_state
    refused = state[_ST_NAME] in ("denied", "rate_limited")
    total_ms = None
    if ended and fold.submitted_at is not None:
        total_ms = (int(state[_ST_AT]) - fold.submitted_at) / 1000.0
    return (
        int(decided[_DC_AT]) > 0,
        ended,
        total_ms,
        _coalesce(terminal[_TM_ERROR_TYPE], decided[_DC_ERROR_TYPE] if refused else None),
        _coalesce(terminal[_TM_ERROR_MESSAGE], decided[_DC_REASON] if refused else None),
    )


def _utc(micros: int | None) -> datetime | None:
    if micros is None:
        return None
    return _EPOCH + timedelta(microseconds=int(micros))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def calls_row(fold: CallFold) -> dict[str, Any]:
    """The ``calls`` view's row of a call (migration 0002), computed from its fold.

    The view's own query spends most of its time being planned (~25 ms for one call on chDB);
    async callers poll the state of their calls, so the lookup reads the call's few call_parts
    rows through the primary key and applies the view's expressions here.
    ``tests/unit/test_recorder_rows.py`` holds the two equal, column for column.
    """
    decided_known, ended, total_ms, error_type, error_message = _outcome(fold)
    ident, request, decided = fold.ident, fold.request, fold.decided
    state, terminal = fold.state, fold.terminal
    return {
        "call_id": fold.call_id,
        "session_id": fold.session_id,
        "subject": ident[_ID_SUBJECT],
        "issuer": ident[_ID_ISSUER],
        "username": ident[_ID_USERNAME],
        "email": ident[_ID_EMAIL],
        "groups": list(ident[_ID_GROUPS] or []),
        "client_id": ident[_ID_CLIENT],
        "token_id": ident[_ID_TOKEN],
        "model": _coalesce(request[_RQ_MODEL], terminal[_TM_MODEL]),
        "mode": request[_RQ_MODE],
        "stream": request[_RQ_STREAM],
        "method": request[_RQ_METHOD],
        "path": request[_RQ_PATH],
        "client_ip": request[_RQ_CLIENT_IP],
        "user_agent": request[_RQ_USER_AGENT],
        "submitted_at": _utc(fold.submitted_at),
        "decided_at": _utc(decided[_DC_AT]) if decided_known else None,
        "completed_at": _utc(state[_ST_AT]) if ended else None,
        "decision": decided[_DC_DECISION] if decided_known else None,
        "reason": decided[_DC_REASON] if decided_known else None,
        "rule_ids": list(decided[_DC_RULES] or []),
        "tags": list(decided[_DC_TAGS] or []),
        "bundle_version": decided[_DC_BUNDLE],
        "fail_open": bool(decided[_DC_FAIL_OPEN]) if decided_known else None,
        "upstream": _coalesce(terminal[_TM_UPSTREAM], decided[_DC_UPSTREAM] or None, request[_RQ_UPSTREAM]),
        "state": "unknown" if int(state[_ST_RANK]) == 0 else state[_ST_NAME],
        "status": state[_ST_STATUS] if ended else None,
        "request_body": decided[_DC_BODY],
        "response_body": terminal[_TM_BODY],
        "error_type": error_type,
        "error_message": error_message,
        "error_stage": terminal[_TM_STAGE],
        "attempts": terminal[_TM_ATTEMPTS],
        "attempts_detail": terminal[_TM_ATTEMPTS_DETAIL],
        "input_tokens": terminal[_TM_IN],
        "output_tokens": terminal[_TM_OUT],
        "latency_ms": terminal[_TM_LATENCY],
        "total_ms": total_ms,
        "upstream_request_id": terminal[_TM_REQUEST_ID],
        "stop_reason": terminal[_TM_STOP],
        "response_model": terminal[_TM_MODEL],
        "approval_id": fold.approval_id,
        "approval_decisions": sorted(fold.approval_decisions),
        "masked_types": sorted(fold.masked_types),
        "masked_fingerprints": sorted(fold.masked_fingerprints),
        "first_event_at": _utc(fold.first_event_at),
        "last_event_at": _utc(fold.last_event_at),
        "blocked_tools": [
            dict(zip(handlers.BLOCKED_TOOL_FIELDS, b, strict=True)) for b in sorted(fold.blocked_tools)
        ],
        "response_mask_upstream": list(fold.response_mask[1]),
        "response_mask_record": list(fold.response_mask[2]),
    }


# ---------------------------------------------------------------------------------------------
# What the masked bodies tell

#: A tool_use block in a body that is not one JSON document (e.g. a recorded SSE stream).
_TOOL_USE = re2.compile(r'"type": *"(?:server_)?tool_use"[^}]*?"name": *"([^"]+)"')


def _json(body: str) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _hash(head: bytes, messages: Sequence[bytes]) -> str:
    return hashlib.blake2b(head + b"\x1d" + b"\x1e".join(messages), digest_size=16).hexdigest()


def conversation_hashes(subject: str, request_body: str) -> Hashes:
    """Hashes of a request's conversation and of the conversation it extends (see module doc).

    Each message is re-encoded by orjson, so the same message hashes the same however the
    client spaced its JSON; the caller's subject and the system prompt are part of the hash.
    """
    doc = _json(request_body)
    messages = doc.get("messages") if isinstance(doc, dict) else None
    if not isinstance(messages, list) or not messages:
        return Hashes("", "")
    system = orjson.dumps(doc["system"]) if "system" in doc else b""
    head = subject.encode() + b"\x1f" + system
    raw = [orjson.dumps(m) for m in messages]
    parent = ""
    previous = messages[-2] if len(messages) >= 3 else None
    if isinstance(previous, dict) and previous.get("role") == "assistant":
        parent = _hash(head, raw[:-2])
    return Hashes(_hash(head, raw), parent)


def _names(items: Any, key: str, types: frozenset[str] | None = None) -> list[str]:
    if not isinstance(items, list):
        return []
    return [
        str(item.get(key))
        for item in items
        if isinstance(item, dict) and item.get(key) and (types is None or item.get("type") in types)
    ]


_TOOL_USE_TYPES = frozenset({"tool_use", "server_tool_use"})


def skills_and_tools(request_body: str, response_body: str) -> tuple[list[str], list[str]]:
    """Claude Skills the request named, and tools it declared or the response used (sorted)."""
    request = _json(request_body)
    skills: list[str] = []
    tools: list[str] = []
    if isinstance(request, dict):
        container = request.get("container")
        if isinstance(container, dict):
            skills = _names(container.get("skills"), "skill_id")
        tools = _names(request.get("tools"), "name")
    response = _json(response_body)
    if isinstance(response, dict):
        tools += _names(response.get("content"), "name", _TOOL_USE_TYPES)
    elif response_body:
        tools += _TOOL_USE.findall(response_body)
    return sorted(set(skills)), sorted(set(tools))


def _coalesce(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def record_row(fold: CallFold, session: tuple[str, str], counted: bool, version: int) -> list[Any]:
    """The ``call_records`` row of a fold, in :data:`CALL_RECORD_COLUMNS` order.

    Mirrors the ``calls`` view's columns (migrations 0001/0002) plus skills, tools, hashes and
    the resolved session. Times are integer ticks (ms for ``time``, µs for the others).
    """
    ident, request, decided, state, terminal = (
        fold.ident,
        fold.request,
        fold.decided,
        fold.state,
        fold.terminal,
    )
    decided_known, ended, total_ms, error_type, error_message = _outcome(fold)
    hashes = fold.hashes()
    request_body = fold.request_body
    response_body = str(terminal[_TM_BODY] or "")
    skills, tools = skills_and_tools(request_body, response_body)
    return [
        fold.call_id,
        fold.time_ms(),
        session[0],
        session[1],
        hashes.conversation_hash,
        hashes.parent_hash,
        fold.subject,
        str(ident[_ID_ISSUER] or ""),
        ident[_ID_USERNAME],
        ident[_ID_EMAIL],
        list(ident[_ID_GROUPS] or []),
        ident[_ID_CLIENT],
        str(_coalesce(request[_RQ_MODEL], terminal[_TM_MODEL], "")),
        skills,
        tools,
        str(request[_RQ_MODE] or ""),
        bool(request[_RQ_STREAM]),
        str(request[_RQ_PATH] or ""),
        "unknown" if int(state[_ST_RANK]) == 0 else str(state[_ST_NAME]),
        str(decided[_DC_DECISION]) if decided_known else "",
        str(decided[_DC_REASON]) if decided_known else "",
        list(decided[_DC_RULES] or []),
        list(decided[_DC_TAGS] or []),
        str(decided[_DC_BUNDLE] or ""),
        fold.approval_id or "",
        sorted(fold.approval_decisions),
        state[_ST_STATUS] if ended else None,
        terminal[_TM_IN],
        terminal[_TM_OUT],
        terminal[_TM_LATENCY],
        total_ms,
        terminal[_TM_STOP],
        error_type,
        error_message,
        fold.submitted_at,
        int(state[_ST_AT]) if ended else None,
        request_body,
        response_body,
        sorted(fold.masked_types),
        sorted(fold.masked_fingerprints),
        len(fold.blocked_tools),
        fold.first_token_ms,
        1 if counted else 0,
        version,
    ]
