"""The audit store of issue 6 against a real embedded chDB: schema, search, sessions, replay
timeline, approvals and usage views, export, retention, tamper evidence, and the analysts'
example queries of docs/operations.md.

One store per module (chDB hosts one engine path per process at a time; migrating once keeps
the module fast); every test writes calls of its own subject or marker, so tests do not see each
other's data.
"""

from __future__ import annotations

import io
import random
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from bench.audit_events import CallSpec, records, uuid7
from services.recorder import chain, timeline
from services.recorder.config import ClickHouseSettings, RetentionSettings
from services.recorder.handlers import SourceRecord
from services.recorder.search import CallSearch, InvalidSearch, decode_cursor
from services.recorder.store import AuditStore, load_migrations

KEY = b"checkpoint-key-for-tests-0123456789"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
_offsets: dict[int, int] = {}
_clock = [1_795_000_000_000_000]  # 2026-11-18, microseconds; every call gets a later time


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditStore]:
    directory = tmp_path_factory.mktemp("audit")
    s = AuditStore(ClickHouseSettings(url=f"chdb://{directory / 'audit.chdb'}"), directory, KEY)
    try:
        s.migrate()
        s.apply_retention(RetentionSettings())
        yield s
    finally:
        s.close()


def _next_time(step_us: int = 1_000_000) -> int:
    _clock[0] += step_us
    return _clock[0]


def spec(
    subject: str,
    text: str,
    *,
    history: Sequence[dict[str, Any]] = (),
    session: str | None = None,
    decision: str = "allow",
    tools: Sequence[str] = (),
    skills: Sequence[str] = (),
    model: str = "claude-sonnet-4-5",
    groups: Sequence[str] = ("eng",),
) -> CallSpec:
    """A call (new UUIDv7 id, later than every earlier one) asking ``text`` after ``history``."""
    t = _next_time()
    call_id = uuid7(t // 1000, random.Random(t))
    messages = [*history, {"role": "user", "content": text}]
    return CallSpec(call_id, session or call_id, subject, list(groups), model, t, messages,
                    f"answer to {text}", list(tools), list(skills), decision)  # fmt: skip


def store_calls(store: AuditStore, *specs: CallSpec, partition: int = 0) -> list[SourceRecord]:
    """Record the calls' events as the recorder does (offsets continue per partition)."""
    out: list[SourceRecord] = []
    for s in specs:
        for rec in records(s, partition, _offsets.get(partition, 0), topic_prefix="t"):
            out.append(
                SourceRecord(rec.topic, partition, _offsets.get(partition, 0), rec.event_type, rec.event)
            )
            _offsets[partition] = _offsets.get(partition, 0) + 1
    store.insert_batch(out)
    return out


def event(topic: str, event_type: str, call: CallSpec, partition: int = 0, **fields: Any) -> SourceRecord:
    """Any other event about ``call`` (approvals, ...) on ``t.<topic>``."""
    body = {
        "event_id": str(uuid.uuid4()),
        "call_id": call.call_id,
        "session_id": call.session_id,
        "time": _next_time(),
        "identity": {"subject": fields.pop("actor", call.subject), "issuer": "i", "username": None,
                     "email": None, "groups": [], "client_id": None, "token_id": None},
        "bundle_version": "default@1",
        **fields,
    }  # fmt: skip
    offset = _offsets.get(partition, 0)
    _offsets[partition] = offset + 1
    return SourceRecord(f"t.{topic}", partition, offset, event_type, body)


def who() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


# -- schema ------------------------------------------------------------------------------------


def test_migration_0003_is_idempotent_and_creates_the_tables(store: AuditStore) -> None:
    migration = next(m for m in load_migrations() if m.version == 3)
    with store._use(store._writer) as client:
        for statement in migration.statements(store.database):
            if not statement.lstrip().upper().startswith("INSERT"):
                client.command(statement)  # a second run of every DDL statement changes nothing
    tables = {r[0] for r in store.query("SHOW TABLES").rows}
    assert {"call_records", "usage_daily", "usage_group_daily", "usage_skill_daily", "denials_daily",
            "approval_parts", "approvals", "approval_turnaround_daily", "policy_bundles",
            "audit_checkpoints"} <= tables  # fmt: skip
    ddl = store.query("SHOW CREATE TABLE call_records").rows[0][0]
    assert "TYPE text(tokenizer = splitByNonAlpha)" in ddl
    assert "CODEC(ZSTD(3))" in ddl and "PARTITION BY toYYYYMM(time)" in ddl
    assert "ORDER BY (time, call_id)" in ddl


def test_retention_ttls_follow_the_settings(store: AuditStore) -> None:
    store.apply_retention(RetentionSettings(bodies_days=30, metadata_days=200, aggregates_days=500))
    try:
        ddl = store.query("SHOW CREATE TABLE call_records").rows[0][0]
        assert "TTL toDateTime(time) + toIntervalDay(200)" in ddl
        assert ddl.count("TTL toDateTime(time) + toIntervalDay(30)") == 2  # both body columns
        assert "toIntervalDay(200)" in store.query("SHOW CREATE TABLE events").rows[0][0]
        assert "toIntervalDay(500)" in store.query("SHOW CREATE TABLE usage_daily").rows[0][0]
    finally:
        store.apply_retention(RetentionSettings())
    with pytest.raises(ValueError, match="must not exceed"):
        RetentionSettings(bodies_days=500, metadata_days=400)


def test_expired_bodies_are_emptied_and_metadata_kept(tmp_path: Path, store: AuditStore) -> None:
    # Calls recorded 2026-11-18 (the clock of this module); bodies kept 1 day, metadata 400.
    subject = who()
    call = spec(subject, "retention-probe words")
    store_calls(store, call)
    with store._use(store._writer) as client:
        client.command(
            f"ALTER TABLE {store.database}.call_records MODIFY COLUMN request_body "
            "TTL toDateTime(time) + INTERVAL 1 DAY",
            settings={"materialize_ttl_after_modify": 0},
        )
        # What an operator runs to apply a shortened TTL at once instead of at the next merges.
        client.command(
            f"ALTER TABLE {store.database}.call_records MATERIALIZE TTL", settings={"mutations_sync": 2}
        )
    try:
        row = store.call_record(call.call_id)
        assert row is not None and row["subject"] == subject
        assert row["request_body"] == ""  # expired (the call is days older than 1 day)
        assert "answer to retention-probe" in row["response_body"]  # still within 90 days
    finally:
        store.apply_retention(RetentionSettings())


# -- search ------------------------------------------------------------------------------------


def test_search_filters_and_keywords(store: AuditStore) -> None:
    subject = who()
    marker = f"zebra{uuid.uuid4().hex[:8]}"
    a = spec(
        subject, f"please check {marker} deployment", tools=["bash"], skills=["pdf"], groups=("ml", "eng")
    )
    b = spec(subject, "nothing special here", model="claude-haiku-4-5")
    c = spec(subject, f"{marker} again but denied", decision="deny")
    store_calls(store, a, b, c)

    def ids(**kw: Any) -> list[str]:
        rows, _ = store.search_calls(CallSearch(user=subject, **kw))
        return [r["call_id"] for r in rows]

    assert ids() == [c.call_id, b.call_id, a.call_id]  # newest first
    assert ids(q=marker) == [c.call_id, a.call_id]
    assert ids(q=f"{marker.upper()} DEPLOYMENT") == [a.call_id]  # every word, any case
    assert ids(q="max_tokens end_turn") == []  # words split between request and response do not match
    assert ids(q="special") == [b.call_id]
    assert ids(model="claude-haiku-4-5") == [b.call_id]
    assert ids(skill="pdf") == [a.call_id]
    assert ids(group="ml") == [a.call_id]
    assert ids(decision="deny") == [c.call_id]
    assert ids(state="denied") == [c.call_id]
    rows, _ = store.search_calls(CallSearch(user=subject, q=marker))
    assert rows[1]["tools"] == ["bash"] and rows[1]["skills"] == ["pdf"]
    assert store.search_calls(CallSearch(user="nobody-" + subject, q=marker))[0] == []
    with pytest.raises(InvalidSearch):
        CallSearch(q="!!! ---").conditions()


def test_keyset_pagination_visits_every_call_once_in_order(store: AuditStore) -> None:
    subject = who()
    specs = [spec(subject, f"page probe {i}") for i in range(47)]
    store_calls(store, *specs)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        rows, cursor = store.search_calls(CallSearch(user=subject, limit=5, cursor=cursor))
        seen.extend(r["call_id"] for r in rows)
        pages += 1
        if cursor is None:
            break
        assert decode_cursor(cursor)[1] == rows[-1]["call_id"]
    assert pages == 10
    assert seen == [s.call_id for s in reversed(specs)]


def test_time_range_filter(store: AuditStore) -> None:
    subject = who()
    specs = [spec(subject, f"range probe {i}") for i in range(4)]
    store_calls(store, *specs)
    from datetime import UTC, datetime

    since = datetime.fromtimestamp(specs[1].time_us / 1e6, UTC)
    until = datetime.fromtimestamp(specs[3].time_us / 1e6, UTC)
    rows, _ = store.search_calls(CallSearch(user=subject, since=since, until=until))
    assert [r["call_id"] for r in rows] == [specs[2].call_id, specs[1].call_id]


# -- sessions and replay -----------------------------------------------------------------------


def _conversation(subject: str, turns: int, words: str) -> list[CallSpec]:
    out: list[CallSpec] = []
    history: list[dict[str, Any]] = []
    for i in range(turns):
        s = spec(subject, f"{words} turn {i}", history=history)
        out.append(s)
        history = [*s.messages, {"role": "assistant", "content": s.answer}]
    return out


def _sessions(store: AuditStore, calls: Sequence[CallSpec]) -> list[tuple[str, str]]:
    out = []
    for c in calls:
        row = store.call_record(c.call_id)
        assert row is not None
        out.append((row["session_id"], row["session_source"]))
    return out


def test_calls_extending_a_conversation_join_its_session(store: AuditStore) -> None:
    subject = who()
    convo = _conversation(subject, 3, "how do I rotate keys")
    other = _conversation(subject, 2, "unrelated question")
    # Turn 0 in one batch, turns 1-2 (and the other conversation) in a later one.
    store_calls(store, convo[0])
    store_calls(store, other[0], convo[1], other[1], convo[2])
    assert _sessions(store, convo) == [
        (convo[0].call_id, "call"), (convo[0].call_id, "conversation"), (convo[0].call_id, "conversation"),
    ]  # fmt: skip
    assert _sessions(store, other) == [(other[0].call_id, "call"), (other[0].call_id, "conversation")]


def test_same_conversation_of_another_user_or_with_a_header_does_not_join(store: AuditStore) -> None:
    alice, bob = who(), who()
    first = _conversation(alice, 1, "shared prompt text")[0]
    history = [*first.messages, {"role": "assistant", "content": first.answer}]
    bobs = spec(bob, "follow up", history=history)
    named = spec(alice, "follow up", history=history, session="incident-42")
    store_calls(store, first, bobs, named)
    assert _sessions(store, [bobs, named]) == [(bobs.call_id, "call"), ("incident-42", "header")]


def test_session_timeline_orders_requests_decisions_approvals_and_responses(store: AuditStore) -> None:
    subject = who()
    convo = _conversation(subject, 2, "timeline probe")
    approval_id = f"ap-{uuid.uuid4().hex[:8]}"
    masked = [{"type": "email", "placeholder": "[EMAIL_1]", "fingerprint": "f" * 64,
               "location": "messages[0].content", "start": 3, "end": 12, "scope": "record"}]  # fmt: skip
    first = [
        SourceRecord(r.topic, 3, 10**6 + i, r.event_type,
                     dict(r.event) | {"masked": masked} if r.event_type == "CallDecided" else r.event)
        for i, r in enumerate(records(convo[0], 3, 0, topic_prefix="t"))
    ]  # fmt: skip
    store.insert_batch(first)
    # The second turn is held for approval between its decision and its response.
    at = convo[1].time_us
    store.insert_batch([
        event("approvals.requested", "ApprovalRequested", convo[1], approval_id=approval_id, rule_ids=["r1"],
              reason="risky", summary="s", excerpt="e", approver_groups=["approvers"], quorum=1,
              expires_at=at + 10**9, time=at + 100_000),
        event("approvals.decided", "ApprovalDecided", convo[1], actor="boss", approval_id=approval_id,
              decision="approve", comment="ok", grant="once", time=at + 200_000),
        event("approvals.resolved", "ApprovalResolved", convo[1], approval_id=approval_id, outcome="approved",
              grant="once", grant_until=None, rule_id="r1", deciders=["boss"], reason="", requested_at=0,
              time=at + 300_000),
    ])  # fmt: skip
    store_calls(store, convo[1])
    found = store.session_timeline(convo[0].call_id)
    assert found is not None
    doc = timeline.document(convo[0].call_id, found["calls"], found["events"])
    assert [c["call_id"] for c in doc["calls"]] == [convo[0].call_id, convo[1].call_id]
    kinds = [(e["kind"], e["call_id"]) for e in doc["timeline"]]
    c0, c1 = convo[0].call_id, convo[1].call_id
    assert kinds == [
        ("request", c0), ("decision", c0), ("response", c0),
        ("request", c1), ("decision", c1),
        ("approval_requested", c1), ("approval_decided", c1), ("approval_resolved", c1),
        ("response", c1),
    ]  # fmt: skip
    assert doc["timeline"][1]["masked"][0]["placeholder"] == "[EMAIL_1]"
    assert doc["timeline"][0]["masked"][0]["type"] == "email"  # the request is marked too
    assert doc["timeline"][6]["actor"] == "boss" and doc["timeline"][6]["decision"] == "approve"
    assert doc["timeline"][7]["outcome"] == "approved"
    assert doc["timeline"][3]["body"]["messages"][-1]["content"] == "timeline probe turn 1"
    assert store.session_timeline("no-such-session") is None


def test_approvals_view_folds_the_events_by_approval_id(store: AuditStore) -> None:
    call = spec(who(), "needs approval")
    store_calls(store, call)
    approval_id = f"ap-{uuid.uuid4().hex[:8]}"
    requested = event("approvals.requested", "ApprovalRequested", call, approval_id=approval_id,
                      rule_ids=["prod-deploy"], approver_groups=["sre"], quorum=2, expires_at=0,
                      reason="r", summary="s", excerpt="e")  # fmt: skip
    votes = [event("approvals.decided", "ApprovalDecided", call, actor=a, approval_id=approval_id,
                   decision="approve", comment=None, grant="once") for a in ("ann", "ben")]  # fmt: skip
    notified = event("approvals.notified", "ApprovalNotified", call, approval_id=approval_id, group="sre",
                     target="https://hooks.example", delivered=True, attempts=1, status=200, error=None)  # fmt: skip
    resolved = event("approvals.resolved", "ApprovalResolved", call, approval_id=approval_id, outcome="approved",
                     grant="once", grant_until=None, rule_id="prod-deploy", deciders=["ann", "ben"],
                     reason="", requested_at=0, future_field="kept")  # fmt: skip
    store.insert_batch([requested, *votes, notified])
    store.insert_batch([resolved, votes[0]])  # a redelivered vote changes nothing
    rows = store.query(
        "SELECT call_id, requester, rule_ids, quorum, decisions, outcome, notifications, "  # noqa: S608
        f"turnaround_seconds FROM approvals WHERE approval_id = '{approval_id}'"
    ).rows
    assert len(rows) == 1
    call_id, requester, rule_ids, quorum, decisions, outcome, notifications, turnaround = rows[0]
    assert (call_id, requester, rule_ids, quorum) == (call.call_id, call.subject, ["prod-deploy"], 2)
    assert decisions == ["approve:ann", "approve:ben"]
    assert (outcome, notifications) == ("approved", 1)
    expected = (resolved.event["time"] - requested.event["time"]) / 1e6
    assert turnaround == pytest.approx(expected)


def test_usage_and_denial_views_count_each_call_once(store: AuditStore) -> None:
    subject = who()
    ok = [spec(subject, f"usage {i}", model="claude-opus-4-1", skills=["xlsx"], groups=("finance",))
          for i in range(3)]  # fmt: skip
    denied = spec(subject, "usage denied", model="claude-opus-4-1", decision="deny")
    recs = store_calls(store, *ok, denied)
    store.insert_batch(recs)  # the whole batch redelivered
    usage = store.query(
        "SELECT sum(calls), sum(denied), sum(input_tokens) FROM usage_daily "  # noqa: S608
        f"WHERE subject = '{subject}' AND model = 'claude-opus-4-1'"
    ).rows[0]
    tokens = sum(r.event["input_tokens"] for r in recs if r.event_type == "CallCompleted")
    assert list(usage) == [4, 1, tokens]
    skill = store.query(
        "SELECT sum(calls) FROM usage_skill_daily WHERE skill = 'xlsx' AND day = toDate(fromUnixTimestamp64Micro("  # noqa: S608
        f"{ok[0].time_us}))"
    ).rows[0][0]
    assert skill >= 3
    denials = store.query(
        f"SELECT rule_id, sum(denials) FROM denials_daily WHERE subject = '{subject}' GROUP BY rule_id"  # noqa: S608
    ).rows
    assert denials == [["no-secrets", 1]]


def test_policy_bundle_versions_are_kept(store: AuditStore) -> None:
    version = f"v{uuid.uuid4().hex[:6]}"
    published = SourceRecord(
        "t.policy.bundles", 0, 10**9 + random.randrange(10**6), "PolicyBundlePublished",
        {"event_id": str(uuid.uuid4()), "call_id": "", "session_id": "", "time": _next_time(),
         "identity": {"subject": "admin-1", "issuer": "i", "groups": []}, "bundle_version": version,
         "name": "default", "version": version, "sha256": "ab" * 32, "source": "rules: []", "rule_count": 0},
    )  # fmt: skip
    store.insert_batch([published])
    rows = store.query(
        f"SELECT name, publisher, rule_count FROM policy_bundles WHERE version = '{version}'"  # noqa: S608
    ).rows
    assert rows == [["default", "admin-1", 0]]


# -- export ------------------------------------------------------------------------------------


def test_export_jsonl_and_parquet(store: AuditStore) -> None:
    subject = who()
    specs = [spec(subject, f"export probe {i}") for i in range(3)]
    store_calls(store, *specs)
    lines = store.export(CallSearch(user=subject), "jsonl", 100).splitlines()
    docs = [orjson.loads(line) for line in lines]
    assert [d["call_id"] for d in docs] == [s.call_id for s in specs]  # oldest first
    assert "export probe 0" in docs[0]["request_body"] and "version" not in docs[0]
    table = pq.read_table(io.BytesIO(store.export(CallSearch(user=subject), "parquet", 2)))
    assert table.num_rows == 2
    assert [str(x) for x in table.column("subject").to_pylist()] == [subject, subject]


# -- tamper evidence ---------------------------------------------------------------------------


def _verify(store: AuditStore) -> chain.VerifyReport:
    return store.verify_chain(KEY, 400, grace_seconds=0)


def _own_database(store: AuditStore) -> AuditStore:
    """A store on the module's engine with a database of its own (chDB: one engine per process)."""
    settings = ClickHouseSettings(url=store.settings.url, database=f"v_{uuid.uuid4().hex[:12]}")
    return AuditStore(settings, Path(str(store.settings.url)[len("chdb://") :]).parent, KEY)


def test_verify_reports_rows_deleted_altered_and_inserted(store: AuditStore) -> None:
    s = _own_database(store)
    try:
        s.migrate()
        calls = [spec(who(), f"sealed {i}") for i in range(6)]
        recs = store_calls(s, *calls[:3], partition=1) + store_calls(s, *calls[3:], partition=2)
        s.insert_batch(recs)  # a redelivered batch seals nothing twice
        report = _verify(s)
        assert report.ok, report.document()
        assert report.rows_checked == report.rows_sealed == len(recs)
        # One checkpoint per (topic, partition) of the batch: 3 topics x 2 partitions.
        assert s.query("SELECT count() FROM audit_checkpoints").rows[0][0] == 6

        db = s.database
        victim, altered = recs[2].event["event_id"], recs[4].event["event_id"]
        with s._use(s._writer) as client:
            client.command(f"DELETE FROM {db}.events WHERE event_id = '{victim}'")  # noqa: S608
            client.command(
                f"ALTER TABLE {db}.events UPDATE payload = concat(payload, ' ') WHERE event_id = '{altered}'",
                settings={"mutations_sync": 2},
            )
            client.command(
                f"INSERT INTO {db}.events (event_id, topic, event_type, call_id, session_id, time, subject, "  # noqa: S608
                "issuer, groups, kafka_partition, kafka_offset, payload) VALUES "
                "('forged-1', 't.calls.completed', 'CallCompleted', 'c-x', 's-x', now64(6), 'mallory', 'i', [], "
                "1, 3, '{}')"
            )
        report = _verify(s)
        assert not report.ok
        assert [d["event_id"] for d in report.deleted] == [victim]
        assert [d["event_id"] for d in report.altered] == [altered]
        assert [d["event_id"] for d in report.inserted] == ["forged-1"]  # offset 3 of partition 1 is sealed
        assert report.broken_checkpoints == []
    finally:
        s.close()


def test_verify_reports_forged_and_removed_checkpoints(store: AuditStore) -> None:
    s = _own_database(store)
    try:
        s.migrate()
        for i in range(3):
            store_calls(s, spec(who(), f"batch {i}"), partition=5)
        assert _verify(s).ok
        db = s.database
        first = s.query("SELECT min(first_offset) FROM audit_checkpoints WHERE partition = 5").rows[0][0]
        middle = s.query(
            "SELECT first_offset FROM audit_checkpoints WHERE partition = 5 ORDER BY first_offset LIMIT 1 OFFSET 1"
        ).rows[0][0]
        with s._use(s._writer) as client:
            client.command(
                f"DELETE FROM {db}.audit_checkpoints WHERE first_offset = {middle} AND partition = 5"  # noqa: S608
            )
            client.command(
                f"ALTER TABLE {db}.audit_checkpoints UPDATE row_count = row_count, chain = repeat('0', 64) "
                f"WHERE first_offset = {first} AND partition = 5",
                settings={"mutations_sync": 2},
            )
        problems = [b["problem"] for b in _verify(s).broken_checkpoints]
        assert any("signature" in p for p in problems)
        assert any("does not link" in p or "missing" in p for p in problems)
        # Wrong key: every checkpoint fails.
        assert all("signature" in b["problem"] for b in s.verify_chain(b"other", 400).broken_checkpoints)
    finally:
        s.close()


def test_chain_fold_and_signature_are_deterministic() -> None:
    rows = [["e1", "t", "X", "c", "s", 1, "u", "i", None, None, ["g"], None, None, None, 0, 5, "{}"],
            ["e2", "t", "X", "c", "s", 2, "u", "i", None, None, [], None, None, None, 0, 6, "{}"]]  # fmt: skip
    (cp,) = chain.seal(rows, {}, KEY)
    assert cp.offsets == (5, 6) and cp.prev_chain == ""
    assert cp.chain == chain.fold("", [chain.row_digest(r) for r in rows])
    assert cp.signature_ok(KEY) and not cp.signature_ok(KEY + b"x")
    assert chain.seal(rows, {("t", 0): (cp.chain, 6)}, KEY) == []  # already sealed
    (nxt,) = chain.seal([[*rows[1][:15], 7, "{}"]], {("t", 0): (cp.chain, 6)}, KEY)
    assert nxt.prev_chain == cp.chain


# -- the analysts' example queries ---------------------------------------------------------------


def _doc_queries() -> list[str]:
    text = DOCS.read_text("utf-8")
    section = text.split("<!-- audit-examples:start -->", 1)[1].split("<!-- audit-examples:end -->", 1)[0]
    return [q.strip() for q in re.findall(r"```sql\n(.*?)```", section, re.DOTALL)]


def test_docs_give_ten_example_queries() -> None:
    assert len(_doc_queries()) >= 10


@pytest.mark.parametrize("index", range(10))
def test_docs_example_query_runs_read_only(store: AuditStore, index: int) -> None:
    # Some data in every table the examples read.
    call = spec(who(), "example data", skills=["pdf"])
    store_calls(store, call, spec(call.subject, "example denied", decision="deny"))
    query = _doc_queries()[index]
    result = store.query(query, max_rows=1000, max_seconds=30)  # through the analysts' guard
    assert result.columns, query


# -- the cluster variant -----------------------------------------------------------------------


def test_cluster_variant_parses_and_keeps_a_call_on_one_shard(store: AuditStore) -> None:
    from services.recorder.cluster import cluster_schema

    statements = cluster_schema("prod", "skillgate")
    with store._use(store._writer) as client:
        for statement in statements:  # ClickHouse's own parser accepts every statement
            client.query("SELECT formatQuery({q:String})", parameters={"q": statement})
    text = "\n".join(statements)
    for table in ("events", "call_parts", "call_records"):
        assert (
            f"CREATE TABLE IF NOT EXISTS skillgate.{table} ON CLUSTER 'prod' AS skillgate.{table}_local "
            f"ENGINE = Distributed('prod', 'skillgate', '{table}_local', cityHash64(call_id))"
        ) in text
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/skillgate/call_records_local', '{replica}', version)"
        in text
    )
    assert (
        "ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/skillgate/call_parts_local', '{replica}')"
        in text
    )
    mv = next(s for s in statements if "usage_daily_mv" in s)
    assert "TO skillgate.usage_daily_local" in mv and "FROM skillgate.call_records_local" in mv
    # Indexes exist on the shards' tables only; new columns on both.
    assert not any(s.startswith("ALTER TABLE skillgate.call_parts ") and "INDEX" in s for s in statements)
    # 0002: blocked_tools and response_mask; 0004: first_token_ms.
    assert sum(s.startswith("ALTER TABLE skillgate.call_parts ON CLUSTER") for s in statements) == 3
    assert not any(s.startswith("ALTER TABLE skillgate.call_parts ") and "SETTING" in s for s in statements)


def test_a_call_denied_after_approval_is_counted_once(store: AuditStore) -> None:
    # Held for approval, then denied: policy re-emits CallDecided with the same event id at a
    # new offset. The call is counted when it first reaches a terminal state, and only then.
    subject = who()
    held = spec(subject, "needs a human", model="claude-haiku-4-5")
    submitted, decided, _ = records(held, 4, 0, topic_prefix="t")
    first = dict(decided.event) | {"decision": "require_approval", "rule_ids": ["prod"], "status": 0}
    later = decided.event["time"] + 60_000_000  # the approver said no a minute later
    second = dict(decided.event) | {"decision": "deny", "rule_ids": ["prod"], "status": 403, "time": later}
    batch1 = [
        SourceRecord(submitted.topic, 4, 5_000_000, "CallSubmitted", submitted.event),
        SourceRecord(decided.topic, 4, 5_000_001, "CallDecided", first),
    ]
    batch2 = [SourceRecord(decided.topic, 4, 5_000_002, "CallDecided", second)]
    store.insert_batch(batch1)
    store.insert_batch(batch2)
    store.insert_batch(batch1 + batch2)  # everything redelivered
    row = store.call_record(held.call_id)
    assert row is not None and row["state"] == "denied" and row["decision"] == "deny"
    counts = store.query(
        "SELECT sum(calls), sum(denied) FROM usage_daily "  # noqa: S608
        f"WHERE subject = '{subject}' AND model = 'claude-haiku-4-5'"
    ).rows[0]
    assert list(counts) == [1, 1]
    denials = store.query(
        f"SELECT rule_id, sum(denials) FROM denials_daily WHERE subject = '{subject}' GROUP BY rule_id"  # noqa: S608
    ).rows
    assert denials == [["prod", 1]]
