"""The recorder's rows, never-store rules, migrations, idempotent inserts and SQL guard.

Row building is tested as pure functions; the store tests run a real embedded chDB in
``tmp_path`` (one engine path per process at a time, so every store is closed after its test).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from clickhouse_connect.driver.exceptions import DataError

from services.recorder import consumer, handlers, records
from services.recorder.alignment import TimeAlignedBuffer
from services.recorder.app import FingerprintKeyError, serve
from services.recorder.config import ClickHouseSettings, RecorderSettings
from services.recorder.handlers import SourceRecord
from services.recorder.store import (
    AuditStore,
    InsertStats,
    Migration,
    MigrationError,
    SQLRejected,
    StalePrepared,
    StoreError,
    check_readonly_sql,
    load_migrations,
)
from skillgate import events as ev
from skillgate.codec import default_codec
from skillgate.config import CommonSettings, KafkaSettings, OIDCSettings
from tests import factories

T0 = 1_795_000_000_000_000  # 2026-11-18, microseconds
SECRET = "sk-ant-api03-SECRETSECRET"
PII = "alice.private@example.com"
CALLER_FACING = "CALLER-FACING-REPLY"
POISON = "RAW-POISON-VALUE"

IDENT = factories.identity(
    issuer="http://idp.test", username="alice", email="alice@example.com", groups=["dev", "ml"]
)


def _env(call_id: str, kind: str, t: int, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "event_id": ev.derived_event_id(call_id, kind),
        "call_id": call_id,
        "session_id": "sess-1",
        "time": t,
        "identity": identity or IDENT,
        "bundle_version": "bundle-7",
    }


def submitted(call_id: str, t: int = T0) -> ev.CallSubmitted:
    """A CallSubmitted whose unmasked body holds a secret and PII."""
    body = {"model": "claude-test", "messages": [{"role": "user", "content": f"{SECRET} {PII}"}]}
    return factories.call_submitted(
        call_id,
        identity=IDENT,
        time=t,
        body=orjson.dumps(body),
        model="claude-test",
        client_ip="127.0.0.1",
        user_agent="pytest",
    )


def decided(
    call_id: str,
    t: int = T0 + 1000,
    decision: str = "allow",
    record_body: bytes | None = b'{"content":"[API_KEY_1] [EMAIL_1]"}',
    status: int = 0,
) -> ev.CallDecided:
    """A CallDecided: the upstream body still holds PII (allowed to the model), the record not."""
    allowed = decision == "allow"
    return factories.call_decided(
        call_id,
        event_id=ev.derived_event_id(call_id, f"decided-{decision}"),
        identity=IDENT,
        bundle_version="bundle-7",
        time=t,
        decision=decision,
        reason="ok" if allowed else f"policy says {decision}",
        rule_ids=["mask-secrets"] if allowed else ["block-x"],
        tags=["pii"],
        upstream="anthropic",
        status=status,
        error_type=None if allowed else "permission_error",
        model="claude-test",
        body=f'{{"content":"[API_KEY_1] {PII}"}}'.encode() if allowed else None,
        record_body=record_body,
        masked=[
            {
                "type": "AWS_ACCESS_KEY",
                "placeholder": "[API_KEY_1]",
                "fingerprint": "fp-secret",
                "location": "messages[0].content",
                "start": 0,
                "end": 10,
                "scope": "upstream",
            }
        ],
        submitted_at=T0,
    )


def completed(call_id: str, t: int = T0 + 5000) -> dict[str, Any]:
    """A CallCompleted with a masked response body."""
    return {
        **_env(call_id, "completed", t),
        "upstream": "anthropic",
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": b'{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}]}',
        "attempts": [
            {
                "number": 1,
                "started_at": T0 + 2000,
                "duration_ms": 3.5,
                "status": 529,
                "error": None,
                "retry_after_ms": 10.0,
                "request_id": "req_a",
            },
            {
                "number": 2,
                "started_at": T0 + 3000,
                "duration_ms": 2.0,
                "status": 200,
                "error": None,
                "retry_after_ms": None,
                "request_id": "req_b",
            },
        ],
        "latency_ms": 12.5,
        "request_id": "req_b",
        "model": "claude-test-20260101",
        "stop_reason": "end_turn",
        "input_tokens": 11,
        "output_tokens": 3,
        "masked": [],
        "stream": False,
        "submitted_at": T0,
    }


def failed(call_id: str, t: int = T0 + 6000) -> dict[str, Any]:
    """A CallFailed after upstream overload."""
    return {
        **_env(call_id, "failed", t),
        "stage": "forwarder",
        "error_type": "overloaded_error",
        "message": "upstream overloaded after 3 attempts",
        "status": 529,
        "upstream": "anthropic",
        "attempts": [],
        "headers": {},
        "body": b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        "submitted_at": T0,
    }


def reply(call_id: str, t: int = T0 + 5500, terminal: str | None = "completed") -> dict[str, Any]:
    """A CallReply carrying the caller-facing body."""
    return {
        **_env(call_id, f"reply-{terminal}", t),
        "kind": "response",
        "seq": 0,
        "status": 200,
        "headers": {},
        "body": CALLER_FACING.encode(),
        "terminal_state": terminal,
    }


def dead_letter(t: int = T0) -> dict[str, Any]:
    """A DeadLetter about a poison value."""
    return {
        **_env("", "dead", t, ev.anonymous_identity()),
        "event_id": "dead-1",
        "service": "policy",
        "reason": "bad marker",
        "source_topic": "skillgate.calls.submitted",
        "source_partition": 0,
        "source_offset": 7,
        "key": b"sess-1",
        "value": POISON.encode(),
        "value_sha256": "ab" * 32,
    }


def approval_decided(call_id: str, t: int, decision: str = "approve") -> dict[str, Any]:
    """An approver's decision (identity is the approver's)."""
    approver = {**IDENT, "subject": "approver-9", "username": "bob", "email": None}
    return {
        **_env(call_id, f"approval-{decision}", t, approver),
        "approval_id": "appr-1",
        "decision": decision,
        "comment": None,
        "grant": "one_time",
        "window_seconds": None,
    }


def record(name: str, event: Mapping[str, Any], offset: int = 0) -> SourceRecord:
    """A SourceRecord as the consumer builds it: the event after an Avro round trip."""
    codec = default_codec()
    decoded_name, decoded = codec.decode(codec.encode(name, event))
    return SourceRecord(f"t.{name}", 0, offset, decoded_name, decoded)


def call_flow(call_id: str) -> list[SourceRecord]:
    """Submitted → decided → completed (+ the caller's reply) for one call."""
    return [
        record(ev.CALL_SUBMITTED, submitted(call_id), 1),
        record(ev.CALL_DECIDED, decided(call_id), 2),
        record(ev.CALL_COMPLETED, completed(call_id), 3),
        record(ev.CALL_REPLY, reply(call_id), 4),
    ]


# ---------------------------------------------------------------------------------------------
# Pure row building


def test_call_month_from_uuid7_and_other_ids() -> None:
    call_id = ev.new_call_id()
    assert handlers.call_month(call_id) >= 202611
    assert handlers.call_month("0190c7c2-0000-7000-8000-000000000000") == 202407
    assert handlers.call_month("not-a-uuid") == 0
    assert handlers.call_month("6f1c2c3e-1d2b-4c5d-8e9f-0a1b2c3d4e5f") == 0  # UUIDv4


def test_view_and_handlers_agree_on_terminal_states() -> None:
    """The calls view hard-codes what handlers.STATE_RANK defines; keep them in step."""
    sql = load_migrations()[0].sql
    assert f"tupleElement(max(state), 'rank') >= {handlers.TERMINAL_RANK}" in sql
    refused = [s for s, r in handlers.STATE_RANK.items() if r in (90, 91)]
    assert refused == ["denied", "rate_limited"] and "IN ('denied', 'rate_limited')" in sql
    assert min(r for s, r in handlers.STATE_RANK.items() if s != "submitted") > 0


def test_event_row_carries_envelope_and_identity() -> None:
    call_id = ev.new_call_id()
    row = dict(zip(handlers.EVENT_COLUMNS, handlers.event_row(call_flow(call_id)[0]), strict=True))
    assert row["event_id"] == ev.derived_event_id(call_id, "submitted")
    assert row["call_id"] == call_id and row["session_id"] == "sess-1"
    assert row["time"] == T0 and row["event_type"] == ev.CALL_SUBMITTED
    assert row["subject"] == "user-1" and row["groups"] == ["dev", "ml"]
    assert row["kafka_offset"] == 1
    payload = orjson.loads(row["payload"])
    assert "body" not in payload and payload["body_bytes"] > 0
    assert payload["headers"] == {"anthropic-version": "2023-06-01"}


def test_never_store_unmasked_or_caller_facing_bodies() -> None:
    """Invariant 3: no row of any kind holds the unmasked request, the reply or a poison value."""
    call_id = ev.new_call_id()
    records = [*call_flow(call_id), record(ev.DEAD_LETTER, dead_letter())]
    rows = handlers.rows_for_batch(records)
    dumped = repr(rows.events) + repr(rows.call_parts)
    for forbidden in (SECRET, PII, CALLER_FACING, POISON, "sess-1'.encode"):
        assert forbidden not in dumped, forbidden
    dead = orjson.loads(rows.events[-1][handlers.EVENT_COLUMNS.index("payload")])
    assert dead["value_sha256"] == "ab" * 32
    assert "value" not in dead and "key" not in dead and dead["value_bytes"] == len(POISON)
    # What is kept: the masked record and the masked response.
    decided_part = dict(zip(handlers.CALL_PART_COLUMNS, rows.call_parts[1], strict=True))
    assert decided_part["decided"][9] == '{"content":"[API_KEY_1] [EMAIL_1]"}'
    completed_part = dict(zip(handlers.CALL_PART_COLUMNS, rows.call_parts[2], strict=True))
    assert '"text":"hi"' in completed_part["terminal"][4]


def test_decided_without_record_body_records_the_masked_body() -> None:
    call_id = ev.new_call_id()
    event = decided(call_id, record_body=None)
    event["body"] = b'{"content":"[API_KEY_1]"}'
    part = handlers.call_part_row(record(ev.CALL_DECIDED, event))
    assert part is not None
    assert part[handlers.CALL_PART_COLUMNS.index("decided")][9] == '{"content":"[API_KEY_1]"}'


def test_parts_fill_only_what_each_event_knows() -> None:
    call_id = ev.new_call_id()
    approval = handlers.call_part_row(record(ev.APPROVAL_DECIDED, approval_decided(call_id, T0)))
    assert approval is not None
    cols = dict(zip(handlers.CALL_PART_COLUMNS, approval, strict=True))
    assert cols["ident"] == handlers.NO_IDENT  # the approver is not the caller
    assert cols["approval_decisions"] == ["approve:approver-9"]
    assert cols["state"][3] == "pending_approval"  # a vote; the outcome comes with ApprovalResolved
    resolved = approval_decided(call_id, T0 + 1)
    resolved.update(outcome="expired")
    part = handlers.call_part_row(record(ev.APPROVAL_RESOLVED, resolved))
    assert part is not None and part[handlers.CALL_PART_COLUMNS.index("state")][3] == "expired"
    # A system-caused failure does not overwrite the caller's identity.
    system = failed(call_id)
    system["identity"] = ev.anonymous_identity()
    part = handlers.call_part_row(record(ev.CALL_FAILED, system))
    assert part is not None and part[handlers.CALL_PART_COLUMNS.index("ident")] == handlers.NO_IDENT
    # Non-terminal replies, dead letters and bundles say nothing about a call's state.
    assert handlers.call_part_row(record(ev.CALL_REPLY, reply(call_id, terminal=None))) is None
    assert handlers.call_part_row(record(ev.DEAD_LETTER, dead_letter())) is None


def test_batch_dedups_event_ids_and_rejects_unbuildable_events() -> None:
    call_id = ev.new_call_id()
    first = call_flow(call_id)
    broken = SourceRecord("t.x", 0, 9, ev.CALL_COMPLETED, {"event_id": "x", "call_id": call_id})
    rows = handlers.rows_for_batch([*first, *first, broken])
    assert len(rows.events) == len(first)
    assert [r.offset for r, _ in rows.rejected] == [9]
    assert "time" in rows.rejected[0][1]


def test_clickhouse_url_defaults_to_an_absolute_chdb_path(tmp_path: Path) -> None:
    default = ClickHouseSettings()
    assert default.is_chdb
    assert default.resolved_url(tmp_path) == f"chdb://{(tmp_path / 'audit.chdb').resolve()}"
    relative = ClickHouseSettings(url="chdb://data/x.chdb").resolved_url(tmp_path)
    assert relative == f"chdb://{Path('data/x.chdb').resolve()}"
    server = ClickHouseSettings(url="https://ch.example:8443", username="u", password="p")
    assert not server.is_chdb and server.display_url(tmp_path) == "https://ch.example:8443"
    with pytest.raises(ValueError):
        ClickHouseSettings(database="audit; DROP DATABASE x")
    with pytest.raises(ValueError):
        ClickHouseSettings(url="mysql://x")


# ---------------------------------------------------------------------------------------------
# The SQL guard


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO events VALUES (1)",
        "DROP TABLE calls",
        "ALTER TABLE events DELETE WHERE 1",
        "SELECT 1; SELECT 2",
        "SELECT 1; DROP TABLE calls",
        "SELECT * FROM system.tables",
        'SELECT * FROM "system"."tables"',
        "SELECT * FROM `system` . `one`",
        "SELECT * FROM system/**/.one",
        "SELECT * FROM default.t",
        "SELECT * FROM INFORMATION_SCHEMA.tables",
        "SHOW TABLES FROM system",
        "SHOW PROCESSLIST",
        "SHOW CREATE DATABASE skillgate",
        "SHOW CREATE USER default",
        "SHOW GRANTS",
        "SELECT file('/etc/passwd')",
        "SELECT `file`('/etc/passwd')",
        "SELECT * FROM url('http://example.com/x', 'CSV')",
        "SELECT * FROM merge('system', '.*')",
        "SELECT * FROM remote('127.0.0.1', system.one)",
        "SELECT * FROM Python(df)",
        "SELECT dictGet('d', 'x', 1)",
        "SELECT 1 INTO OUTFILE '/tmp/x'",
        "SELECT 1 FORMAT JSON",
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT 1 /* unterminated",
        "SELECT 'unterminated",
        "SELECT $$'$$, 1 FROM system.one --'",
        # ClickHouse reads `a$$` as one name, so `$$` no longer opens a string there: a guard
        # that read it as a heredoc let everything up to `b$$` hide from the checks.
        "SELECT 1 AS a$$, file('/proc/self/environ') AS b$$",
        "SELECT 1 AS a$$, (SELECT count() FROM system.tables) AS b$$",
        "SELECT 1 AS a$$, getServerSetting('path') AS b$$",
        "SELECT 'x' AS a$$ INTO OUTFILE '/tmp/x.pth' -- b$$",
        "SELECT $$system.one$$",
        "SELECT a$b FROM calls",
        "SELECT `sys\\tem`.x",
        "SET readonly = 0",
        "USE system",
        "OPTIMIZE TABLE events FINAL",
        "",
        " ; ",
    ],
)
def test_guard_rejects(sql: str) -> None:
    with pytest.raises(SQLRejected):
        check_readonly_sql(sql, "skillgate")


@pytest.mark.parametrize(
    ("sql", "sent"),
    [
        ("SELECT count() FROM calls", "SELECT count() FROM calls"),
        ("select * from skillgate.events FINAL limit 3;", None),
        ("WITH x AS (SELECT 1 AS a) SELECT a FROM x", None),
        ("(SELECT 1)", None),
        ("SHOW TABLES", None),
        ("SHOW CREATE TABLE calls", None),
        ("DESCRIBE calls", None),
        ("EXPLAIN SELECT 1", None),
        ("SELECT 'system.tables', \"state\" FROM calls", None),
        ("SELECT format('{} {}', 'a', 'b')", None),
        ("SELECT 1 -- FROM system.tables", "SELECT 1"),
        ("SELECT 1; -- trailing", "SELECT 1"),
        ("SELECT 'price: $$5' AS s", None),
        ("SELECT number FROM numbers(10)", None),
    ],
)
def test_guard_accepts(sql: str, sent: str | None) -> None:
    """Including `$` inside a quoted string, which stays allowed."""
    out = check_readonly_sql(sql, "skillgate")
    assert out == (sent if sent is not None else sql.strip().rstrip(";"))


# ---------------------------------------------------------------------------------------------
# The store on a real chDB


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    """A migrated store in tmp_path, closed afterwards (one chDB path per process at a time)."""
    with factories.audit_store(tmp_path) as audit:
        yield audit


def _count(store: AuditStore, sql: str) -> int:
    return int(store.query(sql).rows[0][0])


def test_migrations_apply_once_and_refuse_edits(store: AuditStore, tmp_path: Path) -> None:
    assert store.migrate() == []  # already applied by the fixture
    versions = store.query("SELECT version FROM schema_migrations FINAL ORDER BY version").rows
    assert versions == [[m.version] for m in load_migrations()]
    tables = {r[0] for r in store.query("SHOW TABLES").rows}
    assert {"events", "call_parts", "calls", "schema_migrations"} <= tables
    edited = [Migration(1, "0001_initial", load_migrations()[0].sql + "\n-- edited\n")]
    with pytest.raises(MigrationError):
        store.migrate(edited)
    extra = Migration(9999, "9999_test", "CREATE TABLE IF NOT EXISTS {db}.t (a Int8)\nENGINE = Memory;\n")
    assert store.migrate([*load_migrations(), extra]) == [9999]


def test_same_batch_twice_gives_one_row_per_event_and_one_call(store: AuditStore) -> None:
    call_id = ev.new_call_id()
    batch = [*call_flow(call_id), record(ev.DEAD_LETTER, dead_letter())]
    first = store.insert_batch(batch)
    again = store.insert_batch(batch)
    assert (first.events, first.duplicates) == (5, 0)
    assert (again.events, again.duplicates) == (0, 5)
    assert _count(store, "SELECT count() FROM events") == 5
    assert _count(store, "SELECT count() FROM events FINAL") == 5
    one_call = f"SELECT count() FROM calls WHERE call_id = '{call_id}'"  # noqa: S608 (test ids)
    assert _count(store, one_call) == 1

    call = store.call_state(call_id)
    assert call is not None
    assert (call["subject"], call["username"], call["email"]) == ("user-1", "alice", IDENT["email"])
    assert call["groups"] == ["dev", "ml"] and call["token_id"] == "jti-1"
    assert (call["state"], call["status"], call["decision"]) == ("completed", 200, "allow")
    assert call["request_body"] == '{"content":"[API_KEY_1] [EMAIL_1]"}'
    assert orjson.loads(call["response_body"])["id"] == "msg_1"
    assert (call["mode"], call["stream"], call["model"]) == ("async", False, "claude-test")
    assert (call["attempts"], call["upstream_request_id"]) == (2, "req_b")
    assert [a["status"] for a in orjson.loads(call["attempts_detail"])] == [529, 200]
    assert (call["input_tokens"], call["output_tokens"], call["stop_reason"]) == (11, 3, "end_turn")
    assert call["rule_ids"] == ["mask-secrets"] and call["bundle_version"] == "bundle-7"
    assert call["masked_fingerprints"] == ["fp-secret"]
    assert call["submitted_at"].timestamp() == T0 / 1e6
    assert call["completed_at"].timestamp() == (T0 + 5000) / 1e6
    assert call["error_type"] is None and call["error_message"] is None

    # Never stored, anywhere in the database (every column of every row, as text); the masked
    # record is, which shows the search itself works.
    def rows_containing(table: str, needle: str) -> int:
        where = f"position(formatRow('TSV', *), '{needle}') > 0"
        return _count(store, f"SELECT count() FROM {table} WHERE {where}")  # noqa: S608

    # (call_parts holds several rows per call until merges fold them.)
    assert rows_containing("call_parts", "[EMAIL_1]") > 0
    for forbidden in (SECRET, PII, CALLER_FACING, POISON):
        assert rows_containing("events", forbidden) == 0, forbidden
        assert rows_containing("call_parts", forbidden) == 0, forbidden


def test_state_survives_out_of_order_events_and_approval(store: AuditStore) -> None:
    call_id = ev.new_call_id()
    held = decided(call_id, T0 + 100, decision="require_approval", record_body=b"{}", status=202)
    released = decided(call_id, T0 + 900, decision="allow")
    released["event_id"] = ev.derived_event_id(call_id, "decided-again")
    # Terminal first, then the rest, across separate inserts.
    store.insert_batch([record(ev.CALL_COMPLETED, completed(call_id))])
    partial = store.call_state(call_id)
    assert partial is not None and partial["state"] == "completed" and partial["subject"] == "user-1"
    store.insert_batch(
        [
            record(ev.CALL_DECIDED, released),
            record(ev.APPROVAL_DECIDED, approval_decided(call_id, T0 + 500)),
            record(ev.CALL_DECIDED, held),
            record(ev.CALL_SUBMITTED, submitted(call_id)),
        ]
    )
    call = store.call_state(call_id)
    assert call is not None
    assert (call["state"], call["decision"], call["reason"]) == ("completed", "allow", "ok")
    assert call["approval_decisions"] == ["approve:approver-9"]
    assert call["subject"] == "user-1"  # the caller, not the approver


def test_denied_and_failed_calls(store: AuditStore) -> None:
    denied_id, failed_id = ev.new_call_id(), ev.new_call_id()
    refusal = decided(denied_id, decision="deny", record_body=b'{"masked":true}', status=403)
    store.insert_batch(
        [
            record(ev.CALL_SUBMITTED, submitted(denied_id)),
            record(ev.CALL_DECIDED, refusal),
            record(ev.CALL_SUBMITTED, submitted(failed_id)),
            record(ev.CALL_DECIDED, decided(failed_id)),
            record(ev.CALL_FAILED, failed(failed_id)),
            record(ev.CALL_REPLY, reply(failed_id, terminal="failed")),
        ]
    )
    denied, failure = store.call_state(denied_id), store.call_state(failed_id)
    assert denied is not None and failure is not None
    outcome = ("state", "status", "error_type", "error_message")
    assert [denied[k] for k in outcome] == ["denied", 403, "permission_error", "policy says deny"]
    assert denied["completed_at"] == denied["decided_at"]
    assert denied["request_body"] == '{"masked":true}'
    assert [failure[k] for k in outcome] == [
        "failed",
        529,
        "overloaded_error",
        "upstream overloaded after 3 attempts",
    ]
    assert "Overloaded" in failure["response_body"]
    assert store.call_state("no-such-call") is None


def test_analyst_query_limits_and_errors(store: AuditStore) -> None:
    result = store.query("SELECT number, toString(number) AS s FROM numbers(100)", max_rows=7)
    assert result.columns == ["number", "s"] and result.types == ["UInt64", "String"]
    assert result.row_count == 7 and result.truncated
    empty = store.query("SELECT call_id, state FROM calls WHERE 0")
    assert empty.rows == [] and empty.columns == ["call_id", "state"]
    assert empty.types == ["String", "String"]
    with pytest.raises(StoreError, match="no_such_table"):
        store.query("SELECT * FROM no_such_table")
    with pytest.raises(SQLRejected):
        store.query("SELECT * FROM system.one")
    with pytest.raises(SQLRejected):
        store.query("SELECT * FROM mergeTreeIndex('skillgate', 'events')")


def test_store_never_writes_a_file_for_a_hidden_into_outfile(tmp_path: Path) -> None:
    """The exploit as a whole, against a real chDB: nothing is written, the query is refused."""
    target = tmp_path / "planted.pth"
    with factories.audit_store(tmp_path / "store") as store, pytest.raises((SQLRejected, StoreError)):
        store.query(f"SELECT 'import os' AS a$$ INTO OUTFILE '{target}' -- b$$", max_rows=5, max_seconds=5)
    assert not target.exists()


# ---------------------------------------------------------------------------------------------
# Migration 0002: blocked tools, response masking choices, the find-secret index

BLOCKED = [
    {
        "tool_use_id": "toolu_2",
        "tool": "bash",
        "rule_id": "destructive-shell",
        "reason": "destructive shell command",
        "action": "block_tool",
    },
    {
        "tool_use_id": "toolu_1",
        "tool": "str_replace_editor",
        "rule_id": "no-etc",
        "reason": "writes under /etc",
        "action": "block_tool",
    },
]


def guarded_flow(call_id: str) -> list[SourceRecord]:
    """:func:`call_flow` whose decision asks for response masking and whose answer had two
    tool_use blocks stopped by the forwarder's command guardrails."""
    decision = decided(call_id)
    decision["response_mask_upstream"] = ["GITHUB_TOKEN", "AWS_ACCESS_KEY"]
    decision["response_mask_record"] = ["EMAIL"]
    answer = completed(call_id)
    answer["blocked_tools"] = BLOCKED
    flow = call_flow(call_id)
    flow[1] = record(ev.CALL_DECIDED, decision, 2)
    flow[2] = record(ev.CALL_COMPLETED, answer, 3)
    return flow


def _view_columns(store: AuditStore) -> list[str]:
    return [str(row[0]) for row in store.query("DESCRIBE calls").rows]


def test_view_of_0002_agrees_with_handlers_on_terminal_states() -> None:
    """The latest ``calls`` view (0002 replaces it) hard-codes the same ranks as 0001's."""
    sql = next(m.sql for m in load_migrations() if m.version == 2)
    assert "CREATE OR REPLACE VIEW {db}.calls" in sql
    assert f"tupleElement(max(state), 'rank') >= {handlers.TERMINAL_RANK}" in sql
    assert "IN ('denied', 'rate_limited')" in sql


def test_parts_carry_blocked_tools_and_response_masks() -> None:
    call_id = ev.new_call_id()
    parts = [handlers.call_part_row(r) for r in guarded_flow(call_id)]
    cols = [dict(zip(handlers.CALL_PART_COLUMNS, p, strict=True)) for p in parts if p is not None]
    submitted_part, decided_part, completed_part, reply_part = cols
    assert completed_part["blocked_tools"] == [
        ("toolu_1", "str_replace_editor", "no-etc", "writes under /etc", "block_tool"),
        ("toolu_2", "bash", "destructive-shell", "destructive shell command", "block_tool"),
    ]
    assert decided_part["response_mask"] == (T0 + 1000, ["AWS_ACCESS_KEY", "GITHUB_TOKEN"], ["EMAIL"])
    for neutral in (submitted_part, reply_part):
        assert neutral["blocked_tools"] == [] and neutral["response_mask"] == handlers.NO_RESPONSE_MASK
    assert (
        decided_part["blocked_tools"] == [] and completed_part["response_mask"] == handlers.NO_RESPONSE_MASK
    )


def _merge_batch() -> list[SourceRecord]:
    """Events of four calls interleaved in one batch: a plain flow, a guarded one (blocked
    tools, response masks), an approval with its two decisions, one redelivered event."""
    plain, guarded, held = ev.new_call_id(), ev.new_call_id(), ev.new_call_id()
    flows = [call_flow(plain), guarded_flow(guarded), _approval_flow(held)]
    batch = [r for step in zip(*(f[:4] for f in flows), strict=True) for r in step]
    return [*batch, _approval_flow(held)[4], flows[0][2]]


def test_a_new_call_gets_one_part_row_that_folds_like_its_rows(store: AuditStore) -> None:
    batch = _merge_batch()
    rows = handlers.rows_for_batch(batch).call_parts
    by_call: dict[str, list[list[Any]]] = {}
    for row in rows:
        by_call.setdefault(row[0], []).append(row)
    prepared = store.prepare_batch(batch)
    assert sorted(m[0] for m in prepared.call_parts) == sorted(by_call)  # one row per call
    for row in prepared.call_parts:
        assert records.fold_parts(row[0], [row]) == records.fold_parts(row[0], by_call[row[0]])
        assert row[1] == by_call[row[0]][0][1]  # the partition its rows name

    # A call seen before gets this batch's rows as they are, not its whole fold again: seen
    # in the batch being written (prepared on top of it), then stored.
    plain = batch[0].event["call_id"]
    later = [record(ev.CALL_FAILED, failed(plain), 9), batch[6]]
    on_top = store.prepare_batch(later, after=prepared)
    assert on_top.call_parts == handlers.rows_for_batch(later).call_parts
    store.write_batch(prepared)
    store.write_batch(on_top)
    again = store.prepare_batch(later)
    assert again.call_parts == handlers.rows_for_batch(later).call_parts


def test_calls_view_reads_a_folded_part_row_as_the_rows_it_replaces(store: AuditStore) -> None:
    """The same events stored one row per event, and as the batch's folded rows under other
    call ids, read the same through the calls view."""
    batch = _merge_batch()
    rows = handlers.rows_for_batch(batch).call_parts
    twin = {call_id: ev.new_call_id() for call_id in dict.fromkeys(r[0] for r in rows)}
    folded = [[twin[m[0]], *m[1:]] for m in store.prepare_batch(batch).call_parts]
    with store._use(store._writer):
        store._writer.insert_rows(f"{store.database}.call_parts", rows, handlers.CALL_PART_COLUMNS)
        store._writer.insert_rows(f"{store.database}.call_parts", folded, handlers.CALL_PART_COLUMNS)
    for original, copy in twin.items():
        view = store.query(f"SELECT * EXCEPT call_id FROM calls WHERE call_id IN ('{original}', '{copy}')")  # noqa: S608
        assert len(view.rows) == 2 and view.rows[0] == view.rows[1], original
        assert view.rows[0][view.columns.index("state")] == "completed"
        _assert_call_state_is_the_view(store, copy)
        assert _count(store, f"SELECT count() FROM call_parts WHERE call_id = '{copy}'") == 1  # noqa: S608


def test_blocked_tools_land_in_the_calls_view_once_across_redelivery(store: AuditStore) -> None:
    call_id, plain_id = ev.new_call_id(), ev.new_call_id()
    flow = guarded_flow(call_id)
    store.insert_batch([*flow, *call_flow(plain_id)])
    store.insert_batch(flow)  # the whole batch redelivered
    store.insert_batch([flow[2]])  # and the CallCompleted once more, alone

    call = store.call_state(call_id)
    assert call is not None and call["state"] == "completed"
    assert call["blocked_tools"] == sorted(BLOCKED, key=lambda b: b["tool_use_id"])
    assert call["response_mask_upstream"] == ["AWS_ACCESS_KEY", "GITHUB_TOKEN"]
    assert call["response_mask_record"] == ["EMAIL"]
    plain = store.call_state(plain_id)
    assert plain is not None and plain["blocked_tools"] == [] and plain["response_mask_upstream"] == []

    # After background merges fold the parts, still one entry per blocked block.
    with store._use(store._writer) as client:  # the analyst's readonly client may not OPTIMIZE
        client.command(f"OPTIMIZE TABLE {store.database}.call_parts FINAL")
    assert _count(store, f"SELECT count() FROM call_parts WHERE call_id = '{call_id}'") == 1  # noqa: S608
    folded = store.call_state(call_id)
    assert folded is not None and folded["blocked_tools"] == call["blocked_tools"]

    # Named tuple elements query directly.
    by_rule = store.query(
        "SELECT call_id FROM calls WHERE arrayExists(b -> b.rule_id = 'destructive-shell', blocked_tools)"
    )
    assert by_rule.rows == [[call_id]]


def test_migration_0002_keeps_every_calls_column_and_reruns_cleanly(tmp_path: Path) -> None:
    """0002 on a store at 0001 (with data): the view keeps 0001's columns in order and adds the
    new ones; its statements run again harmlessly, as after an interrupted migration."""
    first, second = load_migrations()[:2]
    store = AuditStore(ClickHouseSettings(url=f"chdb://{tmp_path / 'audit.chdb'}"), tmp_path)
    try:
        assert store.migrate([first]) == [1]
        before = _view_columns(store)
        old_call = ev.new_call_id()
        with store._use(store._writer) as client:  # a row as the 0001 recorder wrote it
            part = handlers.call_part_row(call_flow(old_call)[2])
            assert part is not None
            n = handlers.CALL_PART_COLUMNS.index("blocked_tools")  # 0002 added it and what follows
            client.insert(
                f"{store.database}.call_parts", [part[:n]], column_names=handlers.CALL_PART_COLUMNS[:n]
            )
        assert store.migrate([first, second]) == [2]
        after = _view_columns(store)
        assert after[: len(before)] == before
        assert after[len(before) :] == ["blocked_tools", "response_mask_upstream", "response_mask_record"]
        with store._use(store._writer) as client:
            for statement in second.statements(store.database):
                client.command(statement)
        assert _view_columns(store) == after
        old = store.query(f"SELECT state, blocked_tools FROM calls WHERE call_id = '{old_call}'")  # noqa: S608
        assert old.rows == [["completed", []]]
    finally:
        store.close()


def test_find_secret_lookup_skips_granules_through_the_fingerprint_index(store: AuditStore) -> None:
    """find-secret's ``has(masked_fingerprints, …)`` on call_parts is answered by the bloom filter:
    granules without the fingerprint are not read."""
    for _ in range(3):
        store.insert_batch(call_flow(ev.new_call_id()))  # three parts, each its own granule

    def skip_index_granules(fingerprint: str) -> str:
        plan = store.query(
            f"EXPLAIN indexes = 1 SELECT call_id FROM call_parts WHERE has(masked_fingerprints, '{fingerprint}')"  # noqa: S608
        )
        lines = [str(r[0]).strip() for r in plan.rows]
        start = lines.index("Name: idx_masked_fingerprints")
        return next(ln for ln in lines[start:] if ln.startswith("Granules:"))

    assert skip_index_granules("0" * 64) == "Granules: 0/3"
    assert skip_index_granules("fp-secret") == "Granules: 3/3"
    hits, truncated = store.find_masked("0" * 64)
    assert hits == [] and not truncated


def test_recorder_refuses_to_start_without_its_fingerprint_key(tmp_path: Path) -> None:
    """The key is read at start: an unreadable one stops the recorder before it opens the store."""
    chdb = tmp_path / "never.chdb"
    with pytest.raises(FingerprintKeyError, match="SKILLGATE_FINGERPRINT_KEY is empty"):
        asyncio.run(
            serve(
                RecorderSettings(),
                ClickHouseSettings(url=f"chdb://{chdb}"),
                KafkaSettings(bootstrap="127.0.0.1:1"),
                OIDCSettings(issuer="http://idp.test"),
                common=CommonSettings(data_dir=tmp_path, fingerprint_key=""),
            )
        )
    assert not chdb.exists()


# ---------------------------------------------------------------------------------------------
# call_records built in Python agree with the calls view


#: call_records columns computed from the ``calls`` view, as the recorder's SQL built them before
#: the fold moved to Python: the independent oracle of the Python fold.
_ORACLE = """
    ifNull(subject, '') AS subject, ifNull(issuer, '') AS issuer, username, email, groups, client_id,
    ifNull(model, '') AS model, ifNull(mode, '') AS mode, ifNull(stream, false) AS stream,
    ifNull(path, '') AS path, state, ifNull(decision, '') AS decision, ifNull(reason, '') AS reason,
    rule_ids, tags, ifNull(bundle_version, '') AS bundle_version, ifNull(approval_id, '') AS approval_id,
    approval_decisions, status, input_tokens, output_tokens, latency_ms, total_ms, stop_reason,
    error_type, error_message, submitted_at, completed_at, ifNull(request_body, '') AS request_body,
    ifNull(response_body, '') AS response_body, masked_types, masked_fingerprints,
    toUInt16(length(blocked_tools)) AS blocked_tools
"""
_COMPARED = [
    "subject", "issuer", "username", "email", "groups", "client_id", "model", "mode", "stream", "path",
    "state", "decision", "reason", "rule_ids", "tags", "bundle_version", "approval_id",
    "approval_decisions", "status", "input_tokens", "output_tokens", "latency_ms", "total_ms",
    "stop_reason", "error_type", "error_message", "submitted_at", "completed_at", "request_body",
    "response_body", "masked_types", "masked_fingerprints", "blocked_tools",
]  # fmt: skip


def _oracle_and_record(store: AuditStore, call_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    view = store.query(f"SELECT {_ORACLE} FROM calls WHERE call_id = '{call_id}'")  # noqa: S608
    columns = ", ".join(_COMPARED)
    rec = store.query(f"SELECT {columns} FROM call_records FINAL WHERE call_id = '{call_id}'")  # noqa: S608
    assert len(view.rows) == 1 and len(rec.rows) == 1, call_id
    return dict(zip(view.columns, view.rows[0], strict=True)), dict(
        zip(rec.columns, rec.rows[0], strict=True)
    )


def _assert_call_state_is_the_view(store: AuditStore, call_id: str) -> None:
    """``call_state`` (call_parts folded in Python) returns what ``SELECT * FROM calls`` does."""
    with store._use(store._lookup) as client:
        result = client.query("SELECT * FROM calls WHERE call_id = {id:String}", parameters={"id": call_id})
    [row] = result.result_rows
    view = {
        name: value.replace(tzinfo=UTC) if isinstance(value, datetime) else value
        for name, value in zip(result.column_names, row, strict=True)
    }
    assert store.call_state(call_id) == view, call_id


def _approval_flow(call_id: str) -> list[SourceRecord]:
    return [
        record(ev.CALL_SUBMITTED, submitted(call_id), 1),
        record(ev.CALL_DECIDED, decided(call_id, decision="require_approval"), 2),
        record(ev.APPROVAL_DECIDED, approval_decided(call_id, T0 + 1500), 3),
        record(ev.CALL_DECIDED, decided(call_id, t=T0 + 2000), 4),
        record(ev.CALL_COMPLETED, completed(call_id), 5),
    ]


def _flows(call_ids: list[str]) -> list[list[SourceRecord]]:
    """call_flow of each call, at offsets of its own (as Kafka would number them)."""
    return [
        [dataclasses.replace(r, offset=n * 10 + r.offset) for r in call_flow(call_id)]
        for n, call_id in enumerate(call_ids)
    ]


def _write_pipelined(store: AuditStore, batches: list[list[SourceRecord]]) -> None:
    """Insert ``batches`` the way the recorder does at full speed, each prepared before the
    previous one is written (here always before: the worst case for what the store can see)."""
    previous = None
    for batch in batches:
        prepared = store.prepare_batch(batch, after=previous)
        if previous is not None:
            store.write_batch(previous)
        previous = prepared
    if previous is not None:
        store.write_batch(previous)


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("cache_bytes", [64 * 1024 * 1024, 1], ids=["folds-kept", "folds-evicted"])
def test_call_records_folded_in_python_match_the_calls_view(
    tmp_path: Path, cache_bytes: int, pipelined: bool
) -> None:
    """Whatever the batching, order, redelivery, restart or eviction, call_records says what
    calls says (with a 1-byte cache every fold is evicted at once and read back each batch).
    Pipelined, each batch is prepared before the previous one is stored."""
    ids = [ev.new_call_id() for _ in range(8)]
    flow = {i: call_flow(i) for i in ids}
    s, d, c, r = flow[ids[1]]
    batches: list[list[SourceRecord]] = [
        flow[ids[0]],  # one batch
        [s], [d], [c, r],  # one event per batch
        [flow[ids[2]][2], flow[ids[2]][3]], [flow[ids[2]][0]], [flow[ids[2]][1]],  # completed first
        flow[ids[3]], flow[ids[3]],  # redelivered
        _approval_flow(ids[4])[:2], _approval_flow(ids[4])[2:3], _approval_flow(ids[4])[3:],
        [record(ev.CALL_SUBMITTED, submitted(ids[5]), 1), record(ev.CALL_DECIDED, decided(ids[5], decision="deny"), 2)],
        [record(ev.CALL_SUBMITTED, submitted(ids[6]), 1), record(ev.CALL_DECIDED, decided(ids[6]), 2)],
        [record(ev.CALL_FAILED, failed(ids[6]), 3)],
        flow[ids[7]][:2],
    ]  # fmt: skip
    settings = ClickHouseSettings(url=f"chdb://{tmp_path / 'audit.chdb'}")
    store = AuditStore(settings, tmp_path, fold_cache_bytes=cache_bytes)
    try:
        store.migrate()
        if pipelined:
            _write_pipelined(store, batches)
        else:
            for batch in batches:
                store.insert_batch(batch)
    finally:
        store.close()
    # A restart forgets the folds: the rest of the call is folded from what call_parts holds.
    store = AuditStore(settings, tmp_path, fold_cache_bytes=cache_bytes)
    try:
        store.insert_batch(flow[ids[7]][2:])
        store.insert_batch(flow[ids[7]])  # and a full redelivery after the restart
        for call_id in ids:
            oracle, built = _oracle_and_record(store, call_id)
            assert built == oracle, call_id
            _assert_call_state_is_the_view(store, call_id)
        assert _oracle_and_record(store, ids[4])[1]["approval_decisions"] == ["approve:approver-9"]
        # Every call ended: the usage view (fed at insert time) counted each exactly once.
        assert store.query("SELECT sum(calls) FROM usage_daily").rows[0][0] == len(ids)
    finally:
        store.close()


def test_a_failed_write_makes_the_batch_prepared_on_it_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails halfway (parts and events stored, call_records not) leaves nothing
    wrong behind: the batch prepared on top of it is refused as stale, and storing both again
    gives the rows the calls view gives, with the events stored once and the chain intact."""
    ids = [ev.new_call_id() for _ in range(2)]
    flows = _flows(ids)
    first = flows[0][:2] + flows[1][:1]
    second = flows[0][2:] + flows[1][1:]
    key = b"k" * 32
    store = AuditStore(ClickHouseSettings(url=f"chdb://{tmp_path / 'audit.chdb'}"), tmp_path, key)
    try:
        store.migrate()
        real = store._writer.insert_rows

        def failing(table: str, rows: Any, columns: Any) -> None:
            if table.endswith(".call_records"):
                raise ConnectionError("the store went away")
            real(table, rows, columns)

        prepared_first = store.prepare_batch(first)
        prepared_second = store.prepare_batch(second, after=prepared_first)
        monkeypatch.setattr(store._writer, "insert_rows", failing)
        with pytest.raises(ConnectionError):
            store.write_batch(prepared_first)
        monkeypatch.setattr(store._writer, "insert_rows", real)
        with pytest.raises(StalePrepared):
            store.write_batch(prepared_second)
        # What the recorder then does: both batches again, one by one.
        again = store.insert_batch(first)
        assert again.duplicates == len(first)  # the failed write had stored the events
        store.insert_batch(second)
        for call_id in ids:
            oracle, built = _oracle_and_record(store, call_id)
            assert built == oracle, call_id
        assert store.query("SELECT count() FROM events").rows[0][0] == len(first) + len(second)
        report = store.verify_chain(key, 400, grace_seconds=0)
        assert report.ok, report.document()
        assert report.rows_sealed == len(first) + len(second)
    finally:
        store.close()


def test_pipelined_batches_chain_and_deduplicate_like_sequential_ones(tmp_path: Path) -> None:
    """Prepared while the previous batch is not stored yet, a batch still continues each
    partition's chain from that batch's checkpoint and skips the events it redelivers."""
    key = b"k" * 32
    ids = [ev.new_call_id() for _ in range(3)]
    flows = _flows(ids)
    batches = [flows[0], flows[1], flows[1][1:] + flows[2], flows[2]]
    store = AuditStore(ClickHouseSettings(url=f"chdb://{tmp_path / 'audit.chdb'}"), tmp_path, key)
    try:
        store.migrate()
        _write_pipelined(store, batches)
        expected = sum(len(flow) for flow in flows)
        assert store.query("SELECT count() FROM events").rows[0][0] == expected
        report = store.verify_chain(key, 400, grace_seconds=0)
        assert report.ok, report.document()
        assert report.rows_sealed == expected
        for call_id in ids:
            oracle, built = _oracle_and_record(store, call_id)
            assert built == oracle, call_id
    finally:
        store.close()


def test_a_call_in_flight_with_events_another_replica_stored_is_read_back(tmp_path: Path) -> None:
    """While batch N (this call's start) is being written, another replica stores an approval
    vote for the call: batch N+1, prepared on top of N, must fold that vote in as well as N."""
    call_id = ev.new_call_id()
    flow = _approval_flow(call_id)
    store = AuditStore(ClickHouseSettings(url=f"chdb://{tmp_path / 'audit.chdb'}"), tmp_path)
    try:
        store.migrate()
        first = store.prepare_batch(flow[:2])
        vote = handlers.rows_for_batch([flow[2]])  # stored by another recorder, unseen here
        with store._use(store._writer):
            store._writer.insert_rows(
                f"{store.database}.call_parts", vote.call_parts, handlers.CALL_PART_COLUMNS
            )
            store._writer.insert_rows(f"{store.database}.events", vote.events, handlers.EVENT_COLUMNS)
        second = store.prepare_batch(flow[3:], after=first)
        store.write_batch(first)
        store.write_batch(second)
        oracle, built = _oracle_and_record(store, call_id)
        assert built == oracle
        assert built["approval_decisions"] == ["approve:approver-9"] and built["state"] == "completed"
    finally:
        store.close()


def test_a_lookup_reports_no_end_that_only_a_hint_supports(store: AuditStore) -> None:
    """The caller's reply (or the forwarder's done claim) can be stored a batch before the
    CallCompleted: the calls view already says completed, with no response; the lookup async
    callers poll says forwarding until the outcome itself is stored."""
    call_id = ev.new_call_id()
    s, d, c, r = call_flow(call_id)
    store.insert_batch([s, d, r])
    view = store.query(f"SELECT state FROM calls WHERE call_id = '{call_id}'").rows  # noqa: S608
    assert view == [["completed"]]
    early = store.call_state(call_id)
    assert early is not None and early["state"] == "forwarding" and early["response_body"] is None
    assert early["status"] is None and early["completed_at"] is None
    store.insert_batch([c])
    done = store.call_state(call_id)
    assert done is not None and done["state"] == "completed" and done["response_body"]
    denied_id = ev.new_call_id()
    store.insert_batch(
        [
            record(ev.CALL_SUBMITTED, submitted(denied_id), 1),
            record(ev.CALL_REPLY, reply(denied_id, terminal="denied"), 4),
        ]
    )
    hinted = store.call_state(denied_id)
    assert hinted is not None and hinted["state"] == "submitted"


def test_a_batch_that_changes_nothing_writes_no_new_version(store: AuditStore) -> None:
    """A redelivered batch folds into the same state: no call_records version is added for it."""
    call_id = ev.new_call_id()
    store.insert_batch(call_flow(call_id))
    store.insert_batch(call_flow(call_id))
    versions = store.query(f"SELECT count() FROM call_records WHERE call_id = '{call_id}'").rows[0][0]  # noqa: S608
    assert versions == 1


def test_calls_recorded_before_call_records_existed_are_backfilled(tmp_path: Path) -> None:
    """A store at 0002 with calls in it: migrating on gives those calls their call_records rows."""
    migrations = load_migrations()
    store = AuditStore(ClickHouseSettings(url=f"chdb://{tmp_path / 'audit.chdb'}"), tmp_path)
    try:
        assert store.migrate(migrations[:2]) == [1, 2]
        old = [ev.new_call_id() for _ in range(3)]
        with store._use(store._writer) as client:  # rows as the 0002 recorder wrote them
            n = handlers.CALL_PART_COLUMNS.index("first_token_ms")
            parts = [handlers.call_part_row(r) for call_id in old for r in call_flow(call_id)]
            client.insert(
                f"{store.database}.call_parts",
                [p[:n] for p in parts if p is not None],
                column_names=handlers.CALL_PART_COLUMNS[:n],
            )
        assert store.migrate() == [3, 4]
        for call_id in old:
            oracle, built = _oracle_and_record(store, call_id)
            assert built == oracle and built["state"] == "completed"
        assert store.query("SELECT sum(calls) FROM usage_daily").rows[0][0] == len(old)
        with store._use(store._writer) as client:  # a second run finds nothing to do
            assert store._backfill_call_records(client) == 0
    finally:
        store.close()


def test_streamed_chunks_tagged_by_the_forwarder_are_skipped_without_decoding() -> None:
    """A chunk message (Kafka header) is consumed and committed but never decoded or stored."""
    from skillgate import topics

    kafka = KafkaSettings(topic_prefix="t.")
    recorder = consumer.RecorderConsumer(None, kafka, RecorderSettings())  # type: ignore[arg-type]
    topic = topics.name(kafka, topics.REPLIES)

    def message(offset: int, headers: list[tuple[str, bytes]]) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(topic, 0, offset, 0, 0, b"k", b"not avro", None, 1, 8, headers)

    decoded, dead = recorder._decode([message(1, [(topics.KIND_HEADER, topics.CHUNK_KIND)]), message(2, [])])
    assert decoded == []
    assert [m.offset for m, _ in dead] == [2]  # only the untagged garbage is dead-lettered


class _PausedKafka:
    """What ``_isolate`` asks of aiokafka's consumer while it halves a batch: pause, poll, resume."""

    def __init__(self) -> None:
        self.paused: set[str] = set()
        self.polls = 0

    def assignment(self) -> set[str]:
        return {"t-0", "t-1"}

    def pause(self, *partitions: str) -> None:
        self.paused |= set(partitions)

    def resume(self, *partitions: str) -> None:
        self.paused -= set(partitions)

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[str, list[ConsumerRecord[bytes, bytes]]]:
        assert self.paused == self.assignment()  # polled only to stay in the group
        self.polls += 1
        # What a paused poll can still return (aiokafka: a partition assigned since the pause).
        fetched = ConsumerRecord("t", 0, self.polls, 0, 0, b"k", b"v", None, 1, 1, [])
        return {"t-0": [fetched]}


def test_a_refused_batch_is_halved_down_to_the_event_clickhouse_refuses(
    store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One event ClickHouse cannot take (a status beyond Int32) among 32: found in a handful of
    inserts rather than one per event, every other event stored, and the recorder polling Kafka
    (paused) all along so its group keeps it."""
    batch = [r for flow in _flows([ev.new_call_id() for _ in range(8)]) for r in flow]
    bad = batch[13] = dataclasses.replace(batch[13], event={**batch[13].event, "status": 2**40})
    with pytest.raises(DataError):
        store.insert_batch(batch)
    sizes: list[int] = []
    insert_batch = store.insert_batch

    def counted(part: Sequence[SourceRecord]) -> InsertStats:
        sizes.append(len(part))
        return insert_batch(part)

    recorder = consumer.RecorderConsumer.__new__(consumer.RecorderConsumer)
    recorder._store = store
    recorder._consumer = kafka = _PausedKafka()
    recorder._buffer = TimeAlignedBuffer()
    recorder._settings = RecorderSettings()
    monkeypatch.setattr(store, "insert_batch", counted)
    monkeypatch.setattr(consumer, "ISOLATE_POLL_SECONDS", 0.0)  # poll after every insert
    stats = asyncio.run(recorder._isolate(batch))
    assert [record for record, _ in stats.rejected] == [bad]
    assert "DataError" in stats.rejected[0][1]
    assert len(sizes) <= 2 * 5  # one by one: 32 inserts
    assert stats.events == len(batch) - 1
    stored = {str(row[0]) for row in store.query("SELECT event_id FROM events").rows}
    assert stored == {str(r.event["event_id"]) for r in batch if r is not bad}
    assert kafka.polls == len(sizes) - 1 and not kafka.paused  # polled between inserts, resumed
    assert len(recorder._buffer) == kafka.polls  # what the polls returned is kept for later
