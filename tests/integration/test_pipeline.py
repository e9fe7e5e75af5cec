"""One Claude call through the real pipeline: ingress → Kafka → policy → forwarder → stub upstream
→ back, recorded in ClickHouse. Uses the official anthropic SDK with only base_url changed."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from services.cli.stack import Stack
from skillgate import topics
from skillgate.codec import default_codec
from tests.conftest import wait_for
from tests.integration.helpers import (
    metric,
    read_topics,
    recorded_call,
    redeliver_decision,
    stack_kafka,
    stub_requests,
)

pytestmark = pytest.mark.integration


def client(stack: Stack, token: str) -> anthropic.Anthropic:
    """The official SDK pointed at skillgate: only base_url (and the token as key) change."""
    return anthropic.Anthropic(base_url=stack.ingress_url, api_key=token, max_retries=0, timeout=60)


def test_sdk_call_flows_and_is_recorded(stack: Stack, alice_token: str, auditor_token: str) -> None:
    marker = f"hello-{uuid.uuid4().hex}"
    raw = client(stack, alice_token).messages.with_raw_response.create(
        model="claude-sonnet-5-5",
        max_tokens=64,
        messages=[{"role": "user", "content": f"Say {marker}"}],
        extra_headers={"anthropic-beta": "some-future-beta-2099-01-01", "x-custom-thing": "kept"},
        extra_body={"metadata": {"user_id": "u-1"}, "future_field": {"a": 1}},
    )
    message = raw.parse()
    assert marker in message.content[0].text  # type: ignore[union-attr]
    assert raw.headers["request-id"].startswith("req_")
    call_id = raw.headers["x-skillgate-call-id"]

    # The upstream got the caller's body byte for byte, unknown fields and headers included,
    # with skillgate's upstream key, and never the caller's token.
    seen = stub_requests(stack, marker)
    assert len(seen) == 1
    upstream = seen[0]
    body = orjson.loads(upstream["body"])
    assert body["future_field"] == {"a": 1} and body["metadata"] == {"user_id": "u-1"}
    headers = {k.lower(): v for k, v in upstream["headers"].items()}
    assert headers["anthropic-beta"] == "some-future-beta-2099-01-01"
    assert headers["x-custom-thing"] == "kept"
    assert headers["x-api-key"] == stack.stub_key
    assert alice_token not in json.dumps(upstream)

    row = recorded_call(stack, auditor_token, call_id)
    assert row["state"] == "completed"
    assert row["subject"] == "alice" and "eng" in row["groups"]
    assert row["decision"] == "allow" and row["bundle_version"].startswith("default@")
    assert marker in row["request_body"] and marker in row["response_body"]
    assert row["status"] == 200


def test_async_api(stack: Stack, alice_token: str) -> None:
    marker = f"async-{uuid.uuid4().hex}"
    headers = {"authorization": f"Bearer {alice_token}", "anthropic-version": "2023-06-01"}
    body = {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": marker}]}
    resp = httpx.post(f"{stack.ingress_url}/v1/calls", json=body, headers=headers, timeout=30)
    assert resp.status_code == 202, resp.text
    call_id = resp.json()["id"]

    def done() -> dict[str, object] | None:
        r = httpx.get(f"{stack.ingress_url}/v1/calls/{call_id}", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        doc = r.json()
        return doc if doc["state"] == "completed" else None

    doc = wait_for(done, timeout=30)
    assert isinstance(doc, dict)
    assert marker in json.dumps(doc["response"])

    # Another user cannot read alice's call.
    bob = stack.token("bob", ["eng"])
    r = httpx.get(f"{stack.ingress_url}/v1/calls/{call_id}", headers={"authorization": f"Bearer {bob}"})
    assert r.status_code in (403, 404)
    assert r.json()["type"] == "error"


def test_retried_upstream_records_both_attempts(stack: Stack, alice_token: str, auditor_token: str) -> None:
    marker = f"retry-{uuid.uuid4().hex}"
    raw = client(stack, alice_token).messages.with_raw_response.create(
        model="claude-x",
        max_tokens=16,
        messages=[{"role": "user", "content": marker}],
        extra_headers={"x-stub-fail": "429", "x-stub-scenario": marker, "x-stub-retry-after": "0"},
    )
    assert raw.http_response.status_code == 200
    assert len(stub_requests(stack, marker)) == 2
    row = recorded_call(stack, auditor_token, raw.headers["x-skillgate-call-id"])
    assert row["state"] == "completed" and row["attempts"] == 2
    assert "429" in str(row["attempts_detail"]) and "200" in str(row["attempts_detail"])


def test_redelivered_decision_is_not_forwarded_again(stack: Stack, alice_token: str) -> None:
    marker = f"redeliver-{uuid.uuid4().hex}"
    raw = client(stack, alice_token).messages.with_raw_response.create(
        model="claude-x", max_tokens=16, messages=[{"role": "user", "content": marker}]
    )
    call_id = raw.headers["x-skillgate-call-id"]
    assert len(stub_requests(stack, marker)) == 1

    duplicates_before = metric(stack.ports.forwarder_metrics, "skillgate_forwarder_duplicates_total")

    asyncio.run(redeliver_decision(stack, call_id))
    wait_for(
        lambda: (
            metric(stack.ports.forwarder_metrics, "skillgate_forwarder_duplicates_total") > duplicates_before
        ),
        timeout=30,
    )
    assert len(stub_requests(stack, marker)) == 1


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        (b"{not json", 400, "invalid_request_error"),
        (
            b'{"model": "claude-x", "messages": [{"role": "user", "content": "x"}]}',
            400,
            "invalid_request_error",
        ),
        (b"[]", 400, "invalid_request_error"),
        (
            b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"' + b"x" * 300_000 + b'"}]}',
            413,
            "request_too_large",
        ),
    ],
    ids=["malformed-json", "missing-max-tokens", "not-an-object", "oversized"],
)
def test_bad_input_gets_anthropic_error(
    stack: Stack, alice_token: str, body: bytes, status: int, error_type: str
) -> None:
    resp = httpx.post(
        f"{stack.ingress_url}/v1/messages",
        content=body,
        headers={"authorization": f"Bearer {alice_token}", "content-type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == status
    doc = resp.json()
    assert doc["type"] == "error" and doc["error"]["type"] == error_type and doc["error"]["message"]
    assert resp.headers["request-id"] == doc["request_id"]


def test_unknown_path_and_missing_token(stack: Stack, alice_token: str) -> None:
    resp = httpx.post(
        f"{stack.ingress_url}/v1/nope", json={}, headers={"authorization": f"Bearer {alice_token}"}
    )
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"
    resp = httpx.post(f"{stack.ingress_url}/v1/messages", json={"model": "m"})
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    assert resp.headers["www-authenticate"].startswith("Bearer")
    resp = httpx.post(
        f"{stack.ingress_url}/v1/messages", json={"model": "m"}, headers={"authorization": "Bearer not.a.jwt"}
    )
    assert resp.status_code == 401
    # The SDK surfaces these as typed errors with the message.
    with pytest.raises(anthropic.AuthenticationError, match="invalid or expired token"):
        client(stack, "garbage").messages.create(
            model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}]
        )
    # Nothing crashed: a normal call still works.
    ok = client(stack, alice_token).messages.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "still alive"}]
    )
    assert "still alive" in ok.content[0].text  # type: ignore[union-attr]
    assert not stack.failed()


def test_events_readable_by_apache_avro(stack: Stack, alice_token: str) -> None:
    """An independent Avro implementation reads what the services wrote to Kafka."""
    import io

    import avro.io
    import avro.schema
    import fastavro.schema

    marker = f"avro-{uuid.uuid4().hex}"
    client(stack, alice_token).messages.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": marker}]
    )
    kafka = stack_kafka(stack)
    codec = default_codec()
    by_fingerprint = {}
    for name in codec.names:
        full = fastavro.schema.expand_schema(codec.schema(name))
        parsed = avro.schema.parse(json.dumps(full))
        by_fingerprint[bytes(parsed.fingerprint("CRC-64-AVRO"))] = parsed

    def read_all(suffix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for rec in asyncio.run(read_topics(kafka, [suffix])):
            assert rec.value[:2] == b"\xc3\x01"
            schema = by_fingerprint[rec.value[2:10]]
            reader = avro.io.DatumReader(schema)
            datum = reader.read(avro.io.BinaryDecoder(io.BytesIO(rec.value[10:])))
            assert isinstance(datum, dict)
            out.append(datum)
        return out

    def mentions_marker(event: dict[str, Any]) -> bool:
        body = event.get("body")
        return (isinstance(body, bytes) and marker.encode() in body) or marker in json.dumps(
            event, default=str
        )

    for suffix in (topics.SUBMITTED, topics.DECIDED, topics.COMPLETED):

        def matching(topic_suffix: str = suffix) -> list[dict[str, Any]]:
            return [e for e in read_all(topic_suffix) if mentions_marker(e)]

        found = wait_for(matching, timeout=20)
        assert isinstance(found, list)
        event = found[0]
        assert event["identity"]["subject"] == "alice"
        assert event["call_id"] and event["session_id"] and event["event_id"]


def test_caller_cannot_pick_an_upstream_the_bundle_does_not_offer(
    stack: Stack, alice_token: str, auditor_token: str
) -> None:
    """Which upstream connection (key, organisation, billing) a call uses is policy's choice: a
    caller asking for another one is denied with the reason, and nothing is sent anywhere."""
    marker = f"route-{uuid.uuid4().hex}"
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        client(stack, alice_token).messages.create(
            model="m",
            max_tokens=8,
            messages=[{"role": "user", "content": marker}],
            extra_headers={"x-skillgate-upstream": "billing-other-team"},
        )
    assert "upstream connection `billing-other-team` is not one callers may choose" in str(caught.value)
    assert stub_requests(stack, marker) == []
    row = recorded_call(stack, auditor_token, caught.value.response.headers["x-skillgate-call-id"])
    assert row["state"] == "denied" and row["decision"] == "deny"
