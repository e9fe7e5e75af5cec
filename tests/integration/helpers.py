"""Helpers for integration tests: reading the audit store, Kafka topics and metrics."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from aiokafka.structs import ConsumerRecord, TopicPartition

from services.cli.stack import Stack
from skillgate import topics
from skillgate.codec import default_codec
from skillgate.config import KafkaSettings
from skillgate.kafka import make_consumer, make_producer
from tests.conftest import wait_for


def sql(stack: Stack, token: str, query: str) -> list[dict[str, Any]]:
    """Run a read-only query through the recorder's SQL API; rows as dicts."""
    resp = httpx.post(
        f"{stack.recorder_url}/v1/audit/sql",
        json={"query": query, "format": "json"},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    return [dict(zip(doc["columns"], row, strict=True)) for row in doc["rows"]]


def recorded_call(
    stack: Stack, token: str, call_id: str, state: str | None = None, timeout: float = 30
) -> dict[str, Any]:
    """Wait until the call's row is in ClickHouse (in a terminal state, or ``state``).

    A terminal state can show before the events that explain it are stored: the caller's reply
    (a hint) may land in an earlier recorder batch than the CallDecided or CallCompleted. So a
    terminal row counts once its decision is known (a failure may have none) and, for a
    completed call, its response.
    """
    terminal = {"completed", "failed", "denied", "expired", "rate_limited"}

    def explained(row: dict[str, Any]) -> bool:
        if row["state"] not in terminal:
            return True
        if row["decision"] is None and row["state"] != "failed":
            return False
        return row["state"] != "completed" or row["response_body"] is not None

    def probe() -> dict[str, Any] | None:
        rows = sql(stack, token, f"SELECT * FROM calls WHERE call_id = '{call_id}'")  # noqa: S608
        if (
            rows
            and (rows[0]["state"] == state if state else rows[0]["state"] in terminal)
            and explained(rows[0])
        ):
            return rows[0]
        return None

    return wait_for(probe, timeout=timeout)


def recorded_event(stack: Stack, token: str, call_id: str, kind: str = "CallCompleted") -> dict[str, Any]:
    """The payload of the call's ``kind`` event in the audit store's event log (waits for it)."""

    def probe() -> dict[str, Any] | None:
        rows = sql(
            stack,
            token,
            f"SELECT payload FROM events WHERE call_id = '{call_id}' AND event_type = '{kind}'",  # noqa: S608
        )
        return orjson.loads(rows[0]["payload"]) if rows else None

    found = wait_for(probe, timeout=30)
    assert isinstance(found, dict)
    return found


def stub_requests(stack: Stack, contains: str) -> list[dict[str, Any]]:
    """Requests the stub upstream received whose body contains ``contains``."""
    resp = httpx.get(f"{stack.stub_url}/_stub/requests", params={"contains": contains}, timeout=10)
    resp.raise_for_status()
    data = resp.json()
    return list(data if isinstance(data, list) else data.get("requests", []))


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of a Prometheus sample (matching ``labels``) served on 127.0.0.1:``port``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
            continue
        total += float(value)
    return total


async def read_topics(kafka: KafkaSettings, suffixes: list[str]) -> list[ConsumerRecord[bytes, bytes]]:
    """Every message currently on the given skillgate topics, from the beginning."""
    producer = make_producer(kafka)
    await producer.start()
    try:
        tps = [
            TopicPartition(topics.name(kafka, s), p)
            for s in suffixes
            for p in await producer.partitions_for(topics.name(kafka, s))
        ]
    finally:
        await producer.stop()
    consumer = make_consumer(kafka, None)
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                out += records
    finally:
        await consumer.stop()
    return out


def stack_kafka(stack: Stack) -> KafkaSettings:
    """Kafka settings of the running stack (its broker and topic prefix)."""
    return KafkaSettings(bootstrap=stack.env()["SKILLGATE_KAFKA_BOOTSTRAP"], topic_prefix=stack.topic_prefix)


async def redeliver_decision(stack: Stack, call_id: str, suffix: str = topics.DECIDED) -> None:
    """Produce the call's last event on ``suffix`` (its CallDecided) again, byte for byte, as a
    restarted producer would."""
    kafka = stack_kafka(stack)
    decided = topics.name(kafka, suffix)
    found = None
    for record in await read_topics(kafka, [suffix]):
        _, event = default_codec().decode(record.value)
        if event["call_id"] == call_id:
            found = record
    assert found is not None, f"no decision for {call_id} on {decided}"
    producer = make_producer(kafka)
    await producer.start()
    try:
        await producer.send_and_wait(decided, found.value, key=found.key)
    finally:
        await producer.stop()
