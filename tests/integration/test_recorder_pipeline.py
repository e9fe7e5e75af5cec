"""The recorder against a real broker and a real chDB: Kafka → ClickHouse → read API.

Each test gets its own topic prefix (``kafka_settings``) and its own chDB path in ``tmp_path``;
a chDB engine path is per process, so every store is closed before the next test opens one.
Waits are conditions polled with a deadline, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from clickhouse_connect.driver.exceptions import OperationalError
from joserfc import jwt
from joserfc.jwk import RSAKey
from prometheus_client import REGISTRY

from services.recorder import consumer as consumer_module
from services.recorder.api import create_app
from services.recorder.app import serve
from services.recorder.cli import sql_command
from services.recorder.config import ClickHouseSettings, RecorderSettings
from services.recorder.consumer import RecorderConsumer
from services.recorder.handlers import SourceRecord
from services.recorder.store import AuditStore, InsertStats, PreparedBatch
from skillgate import events as ev
from skillgate import topics
from skillgate.codec import default_codec
from skillgate.config import CommonSettings, KafkaSettings, OIDCSettings, RoleSettings
from skillgate.kafka import make_consumer, make_producer
from skillgate.localkafka import free_port
from skillgate.oidc import TokenVerifier
from tests import factories
from tests.conftest import eventually
from tests.servers import serve_asgi

pytestmark = pytest.mark.integration

T = TypeVar("T")
ISSUER = "https://idp.test"
CALLER = factories.identity(
    subject="caller-1",
    issuer=ISSUER,
    username="carol",
    email="carol@example.com",
    groups=["dev"],
    client_id="sdk",
    token_id="jti-c1",
)
UNMASKED = "UNMASKED-SECRET-sk-ant-0000"


# ---------------------------------------------------------------------------------------------
# Events


def _env(call_id: str, session_id: str, kind: str, t: int) -> dict[str, Any]:
    return {
        "event_id": ev.derived_event_id(call_id, kind),
        "call_id": call_id,
        "session_id": session_id,
        "time": t,
        "identity": CALLER,
        "bundle_version": "bundle-1",
    }


def call_events(call_id: str, session_id: str) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(topic suffix, event name, event) for submitted → decided → completed."""
    t = ev.now_micros()
    common: dict[str, Any] = {
        "session_id": session_id,
        "identity": CALLER,
        "bundle_version": "bundle-1",
        "model": "claude-test",
    }
    submitted = factories.call_submitted(
        call_id,
        **common,
        time=t,
        body=f'{{"messages":[{{"role":"user","content":"{UNMASKED}"}}]}}'.encode(),
        client_ip="127.0.0.1",
        user_agent="pytest",
    )
    decided = factories.call_decided(
        call_id,
        **common,
        time=t + 1000,
        rule_ids=["mask-secrets"],
        upstream="anthropic",
        body=b'{"messages":[{"role":"user","content":"[API_KEY_1]"}]}',
        submitted_at=t,
    )
    completed = {
        **_env(call_id, session_id, "completed", t + 2000),
        "upstream": "anthropic",
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": b'{"id":"msg_x","type":"message","content":[{"type":"text","text":"hello"}]}',
        "attempts": [],
        "latency_ms": 1.5,
        "request_id": "req_up",
        "model": "claude-test",
        "stop_reason": "end_turn",
        "input_tokens": 5,
        "output_tokens": 1,
        "masked": [],
        "stream": False,
        "submitted_at": t,
    }
    return [
        (topics.SUBMITTED, ev.CALL_SUBMITTED, submitted),
        (topics.DECIDED, ev.CALL_DECIDED, decided),
        (topics.COMPLETED, ev.CALL_COMPLETED, completed),
    ]


async def produce_call(producer: AIOKafkaProducer, kafka: KafkaSettings, call_id: str) -> None:
    """Publish one call's events, keyed by its session like the services do."""
    session_id = f"sess-{call_id[-6:]}"
    for suffix, name, event in call_events(call_id, session_id):
        await producer.send_and_wait(
            topics.name(kafka, suffix),
            default_codec().encode(name, event),
            key=session_id.encode(),
        )


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    """A migrated chDB store in tmp_path, closed afterwards."""
    with factories.audit_store(tmp_path) as audit:
        yield audit


@pytest.fixture
async def producer(kafka_settings: KafkaSettings) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer."""
    prod = make_producer(kafka_settings)
    await prod.start()
    try:
        yield prod
    finally:
        await prod.stop()


@contextlib.asynccontextmanager
async def running(
    store: AuditStore, kafka: KafkaSettings, group_id: str, **settings: Any
) -> AsyncIterator[RecorderConsumer]:
    """A recorder consumer running in a task; stopped (batch committed) on exit. ``settings``
    override the recorder's (a short batch window by default)."""
    options: dict[str, Any] = {"batch_max_seconds": 0.05, **settings}
    consumer = RecorderConsumer(store, kafka, RecorderSettings(group_id=group_id, **options))
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        yield consumer
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 30)
        await consumer.close()


def _count(store: AuditStore, sql: str) -> int:
    return int(store.query(sql).rows[0][0])


async def call_row(store: AuditStore, call_id: str, state: str) -> dict[str, Any] | None:
    """The call's row once it reached ``state``."""
    row = await asyncio.to_thread(store.call_state, call_id)
    return row if row is not None and row["state"] == state else None


# ---------------------------------------------------------------------------------------------
# The pipeline


async def test_records_calls_dead_letters_garbage_and_never_duplicates(
    store: AuditStore, kafka_settings: KafkaSettings, producer: AIOKafkaProducer
) -> None:
    call_id = ev.new_call_id()
    session = f"sess-{call_id[-6:]}"
    submitted_topic = topics.name(kafka_settings, topics.SUBMITTED)
    # Garbage first, on the call's own partition: it must not hold the call back.
    garbage = await producer.send_and_wait(submitted_topic, b"definitely not avro", key=session.encode())
    await produce_call(producer, kafka_settings, call_id)
    group = f"recorder-{uuid.uuid4().hex[:8]}"

    async with running(store, kafka_settings, group) as first:
        row = await eventually(lambda: call_row(store, call_id, "completed"))
        # The dead letter came back through the deadletter topic and was recorded too.
        dead_sql = (
            "SELECT JSONExtractString(payload, 'reason'), JSONExtractInt(payload, 'source_offset') "
            "FROM events WHERE event_type = 'DeadLetter'"
        )

        async def recorded_dead_letter() -> list[list[Any]]:
            return (await asyncio.to_thread(store.query, dead_sql)).rows

        dead = await eventually(recorded_dead_letter)
    assert first.committed_messages >= 5  # 4 messages + the dead letter
    assert dead == [[dead[0][0], garbage.offset]] and "decode" in dead[0][0]

    assert (row["subject"], row["username"], row["email"]) == ("caller-1", "carol", CALLER["email"])
    assert row["groups"] == ["dev"] and row["client_id"] == "sdk" and row["token_id"] == "jti-c1"
    assert (row["decision"], row["reason"], row["status"]) == ("allow", "allowed by default", 200)
    assert row["request_body"] == '{"messages":[{"role":"user","content":"[API_KEY_1]"}]}'
    assert orjson.loads(row["response_body"])["content"][0]["text"] == "hello"
    assert row["session_id"] == session and row["mode"] == "async"

    # The dead letter itself is on the topic, with the reason and the untouched value.
    dl_consumer = make_consumer(kafka_settings, None, topics.name(kafka_settings, topics.DEADLETTER))
    await dl_consumer.start()
    try:
        message = await asyncio.wait_for(dl_consumer.getone(), 30)
    finally:
        await dl_consumer.stop()
    _, letter = default_codec().decode(message.value)
    assert letter["value"] == b"definitely not avro" and letter["service"] == "recorder"
    assert (letter["source_topic"], letter["source_offset"]) == (submitted_topic, garbage.offset)

    # Nothing unmasked or raw was stored.
    for needle in (UNMASKED, "definitely not avro"):
        for table in ("events", "call_parts"):
            where = f"position(formatRow('TSV', *), '{needle}') > 0"
            assert _count(store, f"SELECT count() FROM {table} WHERE {where}") == 0  # noqa: S608

    # Restart with the same group: only the new call is consumed, nothing is duplicated.
    second_call = ev.new_call_id()
    async with running(store, kafka_settings, group) as second:
        await produce_call(producer, kafka_settings, second_call)
        await eventually(lambda: call_row(store, second_call, "completed"))
    assert second.committed_messages == 3

    # A fresh group re-reads every topic from the start: everything is redelivered (the garbage
    # is dead-lettered again, under the same derived event id), and no row is added.
    async with running(store, kafka_settings, f"replay-{uuid.uuid4().hex[:8]}") as replay:

        async def replayed_all() -> bool:
            return replay.committed_messages >= 9  # 8 messages + the new dead letter

        await eventually(replayed_all)
    assert _count(store, "SELECT count() FROM events") == 7  # 2 calls x 3 + 1 dead letter
    assert _count(store, "SELECT count() FROM events FINAL") == 7
    assert _count(store, "SELECT count() FROM calls") == 2


async def test_a_stop_writes_and_commits_the_open_batch_without_waiting_its_window(
    store: AuditStore, kafka_settings: KafkaSettings, producer: AIOKafkaProducer
) -> None:
    call_id = ev.new_call_id()
    await produce_call(producer, kafka_settings, call_id)
    window = 600.0  # a stop that waited out the window would time this test out
    group = f"stop-{uuid.uuid4().hex[:8]}"
    async with running(
        store, kafka_settings, group, batch_max_seconds=window, batch_early_seconds=window
    ) as recorder:
        reader = recorder._kafka_consumer

        async def batch_open() -> bool:
            # The recorder took every message from Kafka: they wait in its open batch.
            assigned = list(reader.assignment())
            ends = await reader.end_offsets(assigned) if assigned else {}
            taken = [await reader.position(tp) >= end for tp, end in ends.items()]
            return sum(ends.values()) >= 3 and all(taken)

        await eventually(batch_open)
        assert await call_row(store, call_id, "completed") is None  # not written before its window
    assert recorder.committed_messages == 3
    assert await call_row(store, call_id, "completed") is not None


async def test_a_backlog_is_cut_in_time_across_topics_so_calls_meet_in_one_batch(
    store: AuditStore,
    kafka_settings: KafkaSettings,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backlog read partition by partition would give each batch one event each of many calls
    (every call then folded and rewritten three times); cut at the time frontier, a call's three
    events on three topics land in the same batch, and nothing is lost or stored twice."""
    calls = 300
    monkeypatch.setattr(consumer_module, "ALIGN_MIN_LAG", 10)  # a backlog at this small scale
    sends = []
    for _ in range(calls):
        call_id = ev.new_call_id()
        for suffix, name, event in call_events(call_id, f"sess-{call_id[-6:]}"):
            value = default_codec().encode(name, event)
            sends.append(
                await producer.send(topics.name(kafka_settings, suffix), value, key=call_id.encode())
            )
    await asyncio.gather(*sends)

    batches: list[dict[str, int]] = []  # per prepared batch: events of each call
    prepare = store.prepare_batch

    def counted(records: Any, after: Any = None) -> PreparedBatch:
        per_call: dict[str, int] = {}
        for record in records:
            call = str(record.event.get("call_id"))
            per_call[call] = per_call.get(call, 0) + 1
        batches.append(per_call)
        return prepare(records, after)

    monkeypatch.setattr(store, "prepare_batch", counted)
    group = f"align-{uuid.uuid4().hex[:8]}"
    async with running(store, kafka_settings, group, batch_max_events=150, batch_max_seconds=0.5) as recorder:

        async def all_stored() -> bool:
            return await asyncio.to_thread(_count, store, "SELECT count() FROM events") >= 3 * calls

        await eventually(all_stored)
    assert _count(store, "SELECT count() FROM events") == 3 * calls  # none lost, none twice
    assert _count(store, "SELECT uniqExact(call_id) FROM events") == calls
    assert recorder.committed_messages == 3 * calls
    whole = sum(1 for batch in batches for n in batch.values() if n == 3)
    # Read partition by partition, hardly any call would be whole in a batch; a few are split
    # at the cut between two batches (and the first batch is cut before every partition's
    # high watermark is known).
    assert whole >= 0.8 * calls, f"{whole} of {calls} calls whole in one batch: {[len(b) for b in batches]}"


async def test_a_partition_catching_up_does_not_hold_back_live_calls(
    store: AuditStore,
    kafka_settings: KafkaSettings,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One partition with a backlog of ten minutes ago (its leader came back, say) and a call
    happening now on caught-up partitions: the live call is recorded in the first batches, not
    after the backlog (which takes ~15 batches here)."""
    backlog = 1500
    ten_minutes_ago = int(time.time() * 1000) - 600_000
    sends = []
    for i in range(backlog):
        call_id = ev.new_call_id()
        _, name, event = call_events(call_id, "sess-backlog")[0]  # CallSubmitted
        value = default_codec().encode(name, event)
        topic = topics.name(kafka_settings, topics.SUBMITTED)
        # One key: one partition holds the whole backlog.
        sends.append(await producer.send(topic, value, key=b"backlog", timestamp_ms=ten_minutes_ago + i))
    await asyncio.gather(*sends)
    live = ev.new_call_id()
    for suffix, name, event in call_events(live, "sess-live")[1:]:  # decided, completed: now
        await producer.send_and_wait(topics.name(kafka_settings, suffix), default_codec().encode(name, event))

    batches: list[set[str]] = []  # per prepared batch: its call ids
    prepare = store.prepare_batch

    def noted(records: Any, after: Any = None) -> PreparedBatch:
        batches.append({str(record.event.get("call_id")) for record in records})
        return prepare(records, after)

    monkeypatch.setattr(store, "prepare_batch", noted)
    group = f"live-{uuid.uuid4().hex[:8]}"
    async with running(store, kafka_settings, group, batch_max_events=100, batch_max_seconds=0.5):

        async def all_stored() -> bool:
            return await asyncio.to_thread(_count, store, "SELECT count() FROM events") >= backlog + 2

        await eventually(all_stored)
    first = next(i for i, calls in enumerate(batches) if live in calls)
    # Held at the backlog's frontier, the live call would come once the backlog partition is
    # within ALIGN_MIN_LAG of its end: after ~10 batches of 100.
    assert first <= 2, f"the live call came in batch {first} of {len(batches)}"
    assert len(batches) >= backlog // 100
    assert _count(store, "SELECT count() FROM events") == backlog + 2


async def test_store_outage_pauses_consumption_and_commits_nothing(
    store: AuditStore,
    kafka_settings: KafkaSettings,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_write = store.write_batch
    healthy = threading.Event()
    attempts = 0

    def flaky_write(prepared: PreparedBatch) -> InsertStats:
        nonlocal attempts
        attempts += 1
        if not healthy.is_set():
            raise OperationalError("ClickHouse is unreachable (test)")
        return real_write(prepared)

    monkeypatch.setattr(store, "write_batch", flaky_write)
    call_id = ev.new_call_id()
    await produce_call(producer, kafka_settings, call_id)
    async with running(store, kafka_settings, f"outage-{uuid.uuid4().hex[:8]}") as consumer:

        async def retried_while_paused() -> bool:
            return attempts >= 3 and consumer.paused_partitions > 0

        await eventually(retried_while_paused)
        assert consumer.committed_messages == 0  # nothing acknowledged while the store is down
        healthy.set()
        row = await eventually(lambda: call_row(store, call_id, "completed"))

        async def committed() -> bool:
            return consumer.committed_messages == 3

        await eventually(committed)
        assert consumer.paused_partitions == 0
    assert row["subject"] == "caller-1"


# ---------------------------------------------------------------------------------------------
# The read API and the CLI


class Issuer:
    """A signing key and a verifier that fetches its JWKS through an in-memory transport."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "test-key", "alg": "RS256"})
        public = self.key.as_dict(private=False)

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/.well-known/openid-configuration":
                return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks"})
            if request.url.path == "/jwks":
                return httpx.Response(200, json={"keys": [public]})
            return httpx.Response(404)

        self.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        self.verifier = TokenVerifier(OIDCSettings(issuer=ISSUER, audience="skillgate"), self.http)

    def token(self, subject: str, groups: list[str]) -> str:
        """A valid access token for ``subject``."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": "skillgate",
            "sub": subject,
            "groups": groups,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode({"alg": "RS256", "kid": "test-key"}, claims, self.key)


@contextlib.asynccontextmanager
async def api_server(store: AuditStore, issuer: Issuer) -> AsyncIterator[str]:
    """The read API served by uvicorn on a free port (its own thread and loop); yields its base URL."""
    app = create_app(store, issuer.verifier, RecorderSettings(sql_max_rows=50), RoleSettings())
    try:
        with serve_asgi(
            app, health_path="/healthz", name="recorder-api", deadline_s=30.0, log_config=None
        ) as base:
            yield base
    finally:
        await issuer.http.aclose()


async def test_read_api_auth_call_state_and_sql(store: AuditStore) -> None:
    call_id = ev.new_call_id()
    codec = default_codec()
    records = []
    for offset, (suffix, name, event) in enumerate(call_events(call_id, "sess-api")):
        decoded_name, decoded = codec.decode(codec.encode(name, event))
        records.append(SourceRecord(f"t.{suffix}", 0, offset, decoded_name, decoded))
    await asyncio.to_thread(store.insert_batch, records)
    issuer = Issuer()
    owner = issuer.token("caller-1", ["dev"])
    stranger = issuer.token("someone-else", ["dev"])
    auditor = issuer.token("auditor-1", ["auditors"])

    async with api_server(store, issuer) as base, httpx.AsyncClient(base_url=base) as http:
        # 401 without a token, in the Anthropic shape, with a request id and a challenge.
        resp = await http.get(f"/v1/calls/{call_id}")
        assert resp.status_code == 401
        body = resp.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        assert body["request_id"] == resp.headers["request-id"]
        assert resp.headers["www-authenticate"].startswith("Bearer")
        bad = await http.get(f"/v1/calls/{call_id}", headers={"x-api-key": "not.a.jwt"})
        assert bad.status_code == 401 and bad.json()["error"]["message"] == "invalid token"

        # The caller sees the call; a stranger does not learn it exists; an auditor sees it.
        mine = await http.get(f"/v1/calls/{call_id}", headers={"authorization": f"Bearer {owner}"})
        assert mine.status_code == 200, mine.text
        doc = mine.json()
        assert (doc["id"], doc["type"], doc["state"], doc["status"]) == (
            call_id,
            "call",
            "completed",
            200,
        )
        assert doc["response"]["content"][0]["text"] == "hello" and doc["error"] is None
        assert doc["decision"] == "allow" and doc["submitted_at"].endswith("Z")
        other = await http.get(f"/v1/calls/{call_id}", headers={"x-api-key": stranger})
        assert other.status_code == 404 and other.json()["error"]["type"] == "not_found_error"
        seen = await http.get(f"/v1/calls/{call_id}", headers={"x-api-key": auditor})
        assert seen.status_code == 200
        missing = await http.get("/v1/calls/nope", headers={"x-api-key": auditor})
        assert missing.status_code == 404

        # SQL: auditors only; guarded; ClickHouse errors come back as 400 with the message.
        query = {"query": "SELECT call_id, state, status FROM calls"}
        denied = await http.post("/v1/audit/sql", json=query, headers={"x-api-key": owner})
        assert denied.status_code == 403
        assert denied.json()["error"]["type"] == "permission_error"
        ok = await http.post("/v1/audit/sql", json=query, headers={"x-api-key": auditor})
        assert ok.status_code == 200, ok.text
        result = ok.json()
        assert result["columns"] == ["call_id", "state", "status"]
        assert result["types"] == ["String", "String", "Nullable(Int32)"]
        assert result["rows"] == [[call_id, "completed", 200]] and result["row_count"] == 1
        assert result["elapsed_ms"] >= 0
        as_tsv = await http.post(
            "/v1/audit/sql", json={**query, "format": "tsv"}, headers={"x-api-key": auditor}
        )
        assert as_tsv.text == f"call_id\tstate\tstatus\n{call_id}\tcompleted\t200\n"
        for sql, fragment in (
            ("DROP TABLE calls", "only SELECT"),
            ("SELECT * FROM system.tables", "only read the skillgate database"),
            ("SELECT nope FROM calls", "nope"),
        ):
            rejected = await http.post("/v1/audit/sql", json={"query": sql}, headers={"x-api-key": auditor})
            assert rejected.status_code == 400, rejected.text
            assert rejected.json()["error"]["type"] == "invalid_request_error"
            assert fragment in rejected.json()["error"]["message"]
        malformed = await http.post("/v1/audit/sql", json={}, headers={"x-api-key": auditor})
        assert malformed.status_code == 400 and "query" in malformed.json()["error"]["message"]

        metrics = await http.get("/metrics")
        assert "skillgate_recorder_batch_size" in metrics.text

        # The CLI prints a table or JSON lines through the same API (it is synchronous).
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(
            sql_command, "SELECT call_id, state FROM calls", "table", base, auditor, out, err
        )
        assert code == 0, err.getvalue()
        assert "call_id" in out.getvalue() and "completed" in out.getvalue()
        assert "(1 row," in out.getvalue()
        out = io.StringIO()
        code = await asyncio.to_thread(
            sql_command, "SELECT call_id, state FROM calls", "json", base, auditor, out, err
        )
        assert code == 0 and orjson.loads(out.getvalue()) == {
            "call_id": call_id,
            "state": "completed",
        }
        err = io.StringIO()
        code = await asyncio.to_thread(
            sql_command, "DROP TABLE calls", "table", base, auditor, io.StringIO(), err
        )
        assert code == 1 and "only SELECT" in err.getvalue()

    err = io.StringIO()
    code = await asyncio.to_thread(
        sql_command, "SELECT 1", "table", f"http://127.0.0.1:{free_port()}", "t", io.StringIO(), err
    )
    assert code == 2 and "not reachable" in err.getvalue()


# ---------------------------------------------------------------------------------------------
# The whole process


async def test_serve_runs_consumer_and_api_and_stops_cleanly(
    tmp_path: Path, kafka_settings: KafkaSettings, producer: AIOKafkaProducer
) -> None:
    port = free_port()
    clickhouse = ClickHouseSettings(url=f"chdb://{tmp_path / 'served.chdb'}")
    settings = RecorderSettings(port=port, group_id=f"served-{uuid.uuid4().hex[:8]}", batch_max_seconds=0.05)
    stop = asyncio.Event()
    inserted = "skillgate_recorder_events_inserted_total"
    labels = {"topic": topics.COMPLETED}
    before = REGISTRY.get_sample_value(inserted, labels) or 0.0
    task = asyncio.create_task(
        serve(
            settings,
            clickhouse,
            kafka_settings,
            OIDCSettings(issuer=ISSUER),
            RoleSettings(),
            CommonSettings(data_dir=tmp_path),
            stop=stop,
        )
    )
    call_id = ev.new_call_id()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def healthy() -> bool:
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    assert not task.done(), task
                    return False

            await eventually(healthy)
            await produce_call(producer, kafka_settings, call_id)

            async def recorded() -> bool:
                return (REGISTRY.get_sample_value(inserted, labels) or 0.0) > before

            await eventually(recorded)
            metrics = await http.get("/metrics")
            assert "skillgate_recorder_last_record_lag_seconds" in metrics.text
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)

    # The store was closed (the path is free again) and the call is in it.
    reopened = AuditStore(clickhouse, tmp_path)
    try:
        row = await asyncio.to_thread(reopened.call_state, call_id)
        assert row is not None and row["state"] == "completed"
    finally:
        reopened.close()
