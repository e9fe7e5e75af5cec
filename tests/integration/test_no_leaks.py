"""Invariant 2: the upstream key and the caller's token never appear in a log line, an event or a
record. Scans every log file, every message on every skillgate topic, and the audit tables."""

from __future__ import annotations

import asyncio
import json
import uuid

import anthropic
import pytest

from services.cli.stack import Stack
from skillgate import topics
from tests.integration.helpers import read_topics, recorded_call, sql, stack_kafka

pytestmark = pytest.mark.integration


def test_token_and_key_never_leak(stack: Stack, auditor_token: str) -> None:
    token = stack.token(f"leak-{uuid.uuid4().hex[:6]}", ["eng"])
    marker = f"leakcheck-{uuid.uuid4().hex}"
    c = anthropic.Anthropic(base_url=stack.ingress_url, api_key=token, max_retries=0)
    raw = c.messages.with_raw_response.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": marker}]
    )
    recorded_call(stack, auditor_token, raw.headers["x-skillgate-call-id"])
    # A refused call with a bad token logs a refusal: the bad token must not be logged either.
    bad = token[:-6] + "AAAAAA"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=stack.ingress_url, api_key=bad, max_retries=0).messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    secrets = {"caller token": token, "bad token": bad, "upstream key": stack.stub_key}
    token_signature = token.rsplit(".", 1)[1]

    # Logs of every service (the stub's own log is the stand-in internet, not skillgate).
    for log in (stack.data_dir / "logs").glob("*.log"):
        if log.name.startswith("stub-upstream"):
            continue
        text = log.read_text(errors="replace")
        for what, value in secrets.items():
            assert value not in text, f"{what} found in {log.name}"
        assert token_signature not in text

    # Every event on every topic.
    records = asyncio.run(read_topics(stack_kafka(stack), list(topics.EVENT_OF_TOPIC)))
    values = [(r.key or b"") + b"|" + (r.value or b"") for r in records]
    assert any(marker.encode() in v for v in values)  # the scan does see this call's events
    for what, value in secrets.items():
        assert not any(value.encode() in v for v in values), f"{what} found in Kafka"

    # Every record in the audit store.
    for table in ("events", "calls"):
        dump = json.dumps(sql(stack, auditor_token, f"SELECT * FROM {table}"), default=str)  # noqa: S608
        assert marker in dump or table == "events"
        for what, value in secrets.items():
            assert value not in dump, f"{what} found in {table}"
