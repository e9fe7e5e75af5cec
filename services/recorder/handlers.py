"""Turning decoded events into audit rows: one ``events`` row and at most one ``call_parts`` row.

Pure functions (no I/O), so the never-store rules of DESIGN.md invariant 3 are unit-tested here:

* ``events.payload`` is the event as JSON with every ``bytes`` field left out (CallSubmitted.body
  is unmasked; CallDecided.body may hold PII the model was allowed to see; CallReply.body is what
  the caller got; DeadLetter.value/key are unknown bytes) — only their sizes are kept, and for a
  dead letter the ``value_sha256`` the event already carries.
* The only bodies that reach the store are the masked records in ``call_parts``:
  ``CallDecided.record_body`` (else ``CallDecided.body``, which is then the masked request
  itself), ``CallCompleted.body`` and ``CallFailed.body``.
* ``CallCompleted.blocked_tools`` holds no body: its reason is the tool rule's own text, never the
  command the rule refused, so it is stored as it is.

Column order here must match the ``*_COLUMNS`` tuples, which name the table columns.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson

from skillgate import events as ev

#: Lifecycle ranks of call states. ``calls.state`` is the highest-ranked state seen, so events
#: consumed out of order across topics still give the right state; >= TERMINAL_RANK is terminal.
STATE_RANK: dict[str, int] = {
    "submitted": 10,
    "pending_approval": 20,
    "approved": 30,
    "allowed": 40,
    "forwarding": 50,
    "denied": 90,
    "rate_limited": 91,
    "expired": 95,
    "failed": 99,
    "completed": 100,
}
TERMINAL_RANK = 90
_UNKNOWN_DECISION_RANK = 35

DECISION_STATE: dict[str, str] = {
    "allow": "allowed",
    "deny": "denied",
    "require_approval": "pending_approval",
    "rate_limited": "rate_limited",
}

#: Columns of ``events`` written by the recorder (``inserted_at`` is filled by the server).
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "topic",
    "event_type",
    "call_id",
    "session_id",
    "time",
    "subject",
    "issuer",
    "username",
    "email",
    "groups",
    "client_id",
    "token_id",
    "bundle_version",
    "kafka_partition",
    "kafka_offset",
    "payload",
)

#: Columns of ``call_parts``.
CALL_PART_COLUMNS: tuple[str, ...] = (
    "call_id",
    "call_month",
    "session_id",
    "ident",
    "request",
    "submitted_at",
    "first_event_at",
    "last_event_at",
    "decided",
    "state",
    "terminal",
    "approval_id",
    "approval_decisions",
    "masked_types",
    "masked_fingerprints",
    "blocked_tools",
    "response_mask",
    "first_token_ms",
)

# Neutral values of the tuple columns: they sort before any real value, so `max` ignores them.
# Times are integer microseconds (clickhouse-connect writes ints to DateTime64 as raw ticks).
NO_IDENT: tuple[Any, ...] = (0, None, None, None, None, [], None, None)
NO_REQUEST: tuple[Any, ...] = (0, None, None, None, None, None, None, None, None, None)
NO_DECISION: tuple[Any, ...] = (0, "", "", [], [], None, "", 0, None, None, False)
NO_STATE: tuple[Any, ...] = (0, 0, 0, "", None)
NO_TERMINAL: tuple[Any, ...] = (
    0, 0, 0, None, None, None, None, None, 0, "[]", None, None, None, None, None, None
)  # fmt: skip
NO_RESPONSE_MASK: tuple[Any, ...] = (0, [], [])

#: Fields of a ``BlockedTool``, in the order of the ``call_parts.blocked_tools`` tuples.
BLOCKED_TOOL_FIELDS: tuple[str, ...] = ("tool_use_id", "tool", "rule_id", "reason", "action")

_SYSTEM_SUBJECT = ev.anonymous_identity()["subject"]


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A decoded event with where it was read from."""

    topic: str
    partition: int
    offset: int
    event_type: str
    event: Mapping[str, Any]
    #: The Kafka message it came from (to dead-letter it if it cannot be stored).
    origin: Any = field(default=None, compare=False, repr=False)


def text(body: bytes | None) -> str | None:
    """A recorded body as text (bodies are JSON or SSE; invalid UTF-8 is replaced, not fatal)."""
    if body is None:
        return None
    return body.decode("utf-8", errors="replace")


def payload_json(event: Mapping[str, Any]) -> str:
    """The event as JSON without any bytes field: only ``<field>_bytes`` sizes remain.

    Dropping every top-level ``bytes`` value (rather than naming the body fields) means a bytes
    field added to a schema later is kept out of the store by default.
    """
    # An exact-type test: this runs for every field of every event, and Avro decodes bytes
    # fields to plain ``bytes``.
    binary = [key for key, value in event.items() if value.__class__ in _BINARY]
    if binary:
        plain = dict(event)
        for key in binary:
            plain[f"{key}_bytes"] = len(plain.pop(key))
        event = plain
    return orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS).decode()


_BINARY = frozenset({bytes, bytearray, memoryview})


@lru_cache(maxsize=65536)
def call_month(call_id: str) -> int:
    """YYYYMM of a UUIDv7 call id's timestamp; 0 for any other id.

    Why from the id: every event of a call must land in the same ``call_parts`` partition
    (merges only fold rows within a partition), and the id is the one thing they all share.
    """
    try:
        parsed = uuid.UUID(call_id)
    except ValueError:
        return 0
    if parsed.version != 7:
        return 0
    when = time.gmtime((parsed.int >> 80) // 1000)
    return when.tm_year * 100 + when.tm_mon


def event_row(record: SourceRecord) -> list[Any]:
    """The ``events`` row of one event (columns of :data:`EVENT_COLUMNS`)."""
    event = record.event
    identity: Mapping[str, Any] = event.get("identity") or {}
    return [
        str(event["event_id"]),
        record.topic,
        record.event_type,
        str(event.get("call_id") or ""),
        str(event.get("session_id") or ""),
        int(event["time"]),
        str(identity.get("subject") or ""),
        str(identity.get("issuer") or ""),
        identity.get("username"),
        identity.get("email"),
        list(identity.get("groups") or []),
        identity.get("client_id"),
        identity.get("token_id"),
        event.get("bundle_version"),
        record.partition,
        record.offset,
        payload_json(event),
    ]


def _ident(prio: int, event: Mapping[str, Any]) -> tuple[Any, ...]:
    identity: Mapping[str, Any] = event.get("identity") or {}
    if not identity.get("subject") or identity.get("subject") == _SYSTEM_SUBJECT:
        # Events skillgate itself caused (expiry, a system failure) do not name the caller.
        return NO_IDENT
    return (
        prio,
        identity.get("subject"),
        identity.get("issuer"),
        identity.get("username"),
        identity.get("email"),
        list(identity.get("groups") or []),
        identity.get("client_id"),
        identity.get("token_id"),
    )


def _request(prio: int, event: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        prio,
        event.get("model"),
        event.get("mode"),
        event.get("stream"),
        event.get("method"),
        event.get("path"),
        event.get("upstream"),
        event.get("client_ip"),
        event.get("user_agent"),
        event.get("ingress_instance"),
    )


def _state(name: str, authority: int, at: int, status: int | None) -> tuple[Any, ...]:
    return (STATE_RANK.get(name, _UNKNOWN_DECISION_RANK), authority, at, name, status)


def _masked(items: Iterable[Mapping[str, Any]] | None) -> tuple[list[str], list[str]]:
    values = list(items or [])
    return (
        sorted({str(m.get("type", "")) for m in values if m.get("type")}),
        sorted({str(m.get("fingerprint", "")) for m in values if m.get("fingerprint")}),
    )


def _blocked_tools(items: Iterable[Mapping[str, Any]] | None) -> list[tuple[str, ...]]:
    """``CallCompleted.blocked_tools`` as ``call_parts.blocked_tools`` tuples, sorted, unique.

    Sorted so the row of an event is the same however often it is built; the store keeps one
    copy of each tuple across redeliveries (``groupUniqArrayArray``).
    """
    return sorted({tuple(str(item.get(name) or "") for name in BLOCKED_TOOL_FIELDS) for item in items or []})


def _attempts_json(attempts: Sequence[Mapping[str, Any]] | None) -> str:
    return orjson.dumps(list(attempts or [])).decode()


def _terminal(event: Mapping[str, Any], completed: bool) -> tuple[Any, ...]:
    attempts = list(event.get("attempts") or [])
    if completed:
        return (
            2,
            int(event["time"]),
            int(event.get("status") or 0),
            event.get("upstream"),
            text(event.get("body")),
            None,
            None,
            None,
            len(attempts),
            _attempts_json(attempts),
            event.get("input_tokens"),
            event.get("output_tokens"),
            event.get("latency_ms"),
            event.get("request_id"),
            event.get("stop_reason"),
            event.get("model"),
        )
    last_request_id = next((a.get("request_id") for a in reversed(attempts) if a.get("request_id")), None)
    return (
        1,
        int(event["time"]),
        int(event.get("status") or 0),
        event.get("upstream"),
        text(event.get("body")),
        event.get("error_type"),
        event.get("message"),
        event.get("stage"),
        len(attempts),
        _attempts_json(attempts),
        None,
        None,
        None,
        last_request_id,
        None,
        None,
    )


def call_part_row(record: SourceRecord) -> list[Any] | None:
    """The ``call_parts`` row of one event, or None when the event says nothing about a call.

    Each event fills only what it knows; everything else stays neutral (see the migration's
    comments), so the rows of one call fold into one by ``max``/``min`` in any order, any number
    of times.
    """
    event = record.event
    kind = record.event_type
    call_id = str(event.get("call_id") or "")
    if not call_id or kind in (ev.DEAD_LETTER, ev.POLICY_BUNDLE_PUBLISHED):
        return None
    at = int(event["time"])
    ident, request, decided, terminal = NO_IDENT, NO_REQUEST, NO_DECISION, NO_TERMINAL
    state: tuple[Any, ...] = NO_STATE
    submitted_at: int | None = event.get("submitted_at")
    approval_id: str | None = event.get("approval_id")
    approval_decisions: list[str] = []
    masked_types: list[str] = []
    masked_fps: list[str] = []
    blocked_tools: list[tuple[str, ...]] = []
    response_mask: tuple[Any, ...] = NO_RESPONSE_MASK
    first_token_ms: float | None = None

    if kind == ev.CALL_SUBMITTED:
        ident, request = _ident(3, event), _request(2, event)
        submitted_at = at
        state = _state("submitted", 1, at, None)
    elif kind == ev.CALL_DECIDED:
        ident, request = _ident(2, event), _request(1, event)
        decision = str(event.get("decision") or "")
        status = int(event.get("status") or 0)
        # The record keeps the record-masked body; CallDecided.body is only used when no
        # separate record body exists (then the upstream-masked body is also the record).
        body = event.get("record_body")
        if body is None:
            body = event.get("body")
        decided = (
            at,
            decision,
            str(event.get("reason") or ""),
            list(event.get("rule_ids") or []),
            list(event.get("tags") or []),
            event.get("bundle_version"),
            str(event.get("upstream") or ""),
            status,
            event.get("error_type"),
            text(body),
            bool(event.get("fail_open")),
        )
        state = _state(DECISION_STATE.get(decision, decision), 1, at, status or None)
        masked_types, masked_fps = _masked(event.get("masked"))
        response_mask = (
            at,
            sorted(str(t) for t in event.get("response_mask_upstream") or []),
            sorted(str(t) for t in event.get("response_mask_record") or []),
        )
    elif kind in (ev.CALL_COMPLETED, ev.CALL_FAILED):
        completed = kind == ev.CALL_COMPLETED
        ident = _ident(1, event)
        terminal = _terminal(event, completed)
        status = int(event.get("status") or 0)
        state = _state("completed" if completed else "failed", 1, at, status)
        if completed:
            masked_types, masked_fps = _masked(event.get("masked"))
            blocked_tools = _blocked_tools(event.get("blocked_tools"))
            first_token_ms = event.get("first_token_ms")
    elif kind == ev.APPROVAL_REQUESTED:
        state = _state("pending_approval", 1, at, None)
    elif kind == ev.APPROVAL_DECIDED:
        decision = str(event.get("decision") or "")
        identity: Mapping[str, Any] = event.get("identity") or {}
        approval_decisions = [f"{decision}:{identity.get('subject') or ''}"]
        # A decision is a vote, not the outcome (a quorum may need more; a late one is refused):
        # only ApprovalResolved and the call's second CallDecided say how it ended.
        state = _state("pending_approval", 1, at, None)
    elif kind == ev.APPROVAL_RESOLVED:
        outcome = str(event.get("outcome") or "")
        state = _state("approved" if outcome == "approved" else outcome, 1, at, None)
    elif kind == ev.FORWARDER_CLAIM:
        terminal_state = event.get("terminal_state")
        if terminal_state in STATE_RANK:
            state = _state(str(terminal_state), 0, at, None)
        else:
            state = _state("forwarding", 0, at, None)
    elif kind == ev.CALL_REPLY:
        # Only the outcome matters; the caller-facing body is never stored.
        terminal_state = event.get("terminal_state")
        if terminal_state not in STATE_RANK:
            return None
        state = _state(str(terminal_state), 0, at, int(event.get("status") or 0) or None)
    else:
        return None

    return [
        call_id,
        call_month(call_id),
        str(event.get("session_id") or ""),
        ident,
        request,
        submitted_at,
        at,
        at,
        decided,
        state,
        terminal,
        approval_id,
        approval_decisions,
        masked_types,
        masked_fps,
        blocked_tools,
        response_mask,
        first_token_ms,
    ]


@dataclass(slots=True)
class BatchRows:
    """Rows of one batch, ready to insert, and the events no row could be built for."""

    events: list[list[Any]] = field(default_factory=list)
    event_keys: list[tuple[str, str]] = field(default_factory=list)
    call_parts: list[list[Any]] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    rejected: list[tuple[SourceRecord, str]] = field(default_factory=list)


def rows_for_batch(records: Iterable[SourceRecord]) -> BatchRows:
    """Rows for a batch; an event id seen twice in the batch (a redelivery) gives one row.

    An event that decodes but cannot be turned into rows (a field of an unexpected shape) is
    set aside in ``rejected`` with the reason, to be dead-lettered, instead of failing the
    batch: one bad event must never block its partition.
    """
    out = BatchRows()
    seen: set[str] = set()
    for record in records:
        if record.event_type == ev.CALL_REPLY and record.event.get("kind") == "chunk":
            # Pieces of a streamed answer: the assembled message is the record (CallCompleted).
            continue
        try:
            row = event_row(record)
            part = call_part_row(record)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            out.rejected.append((record, f"{type(exc).__name__}: {exc}"[:1000]))
            continue
        # Parts of every copy are kept: folding is idempotent, and a service that re-emits an
        # event id with new content (a second decision) must still update the call.
        if part is not None:
            out.call_parts.append(part)
        event_id = row[0]
        if event_id in seen:
            continue
        seen.add(event_id)
        out.events.append(row)
        out.event_keys.append((row[3], event_id))
        out.topics.append(record.topic)
    return out
