"""A running stack whose policy bundle is invalid fails calls closed (DESIGN: fail closed).

The stack of this module starts with ``SKILLGATE_POLICY_BUNDLE`` pointing at a bundle RE2
refuses (a backreference). Policy and forwarder both load it: they must keep running and refuse
every call with an Anthropic-shaped ``503 api_error`` naming the cause, nothing may reach the
upstream, and the audit store must record the call as failed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import orjson
import pytest

from services.cli.stack import Stack
from skillgate import events as ev
from skillgate import topics
from skillgate.codec import default_codec
from skillgate.kafka import make_producer
from tests import factories
from tests.conftest import wait_for
from tests.integration.conftest import _session_stack
from tests.integration.helpers import recorded_call, stack_kafka, stub_requests

pytestmark = pytest.mark.integration

#: A bundle that parses as YAML but that no service can apply: RE2 refuses backreferences.
INVALID_BUNDLE = """\
name: broken
version: "b-1"
default_action: allow
rules:
  - id: backreference
    match: {content: ['(a)\\1']}
    action: deny
    reason: never applies
"""

#: What policy and forwarder log when they load a bundle they cannot apply.
INVALID_LOG_LINE = "policy bundle invalid: calls fail closed"


@pytest.fixture(scope="module")
def broken_stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack (own topics, data dir and ports) applying :data:`INVALID_BUNDLE`."""
    bundle = tmp_path_factory.mktemp("invalid-bundle") / "broken.yaml"
    bundle.write_text(INVALID_BUNDLE)
    yield from _session_stack(
        tmp_path_factory, kafka_bootstrap, "f", {"SKILLGATE_POLICY_BUNDLE": str(bundle)}
    )


def _auditor(stack: Stack) -> str:
    return stack.token("audrey", ["auditors"])


def _log(stack: Stack, name: str) -> str:
    path: Path = stack.log_path(name)
    return path.read_text(errors="replace") if path.exists() else ""


def test_services_start_and_report_the_invalid_bundle(broken_stack: Stack) -> None:
    """Stack.start() came up; policy and forwarder run on (not exit) and say why they refuse."""
    for name in ("policy", "forwarder"):

        def reported(service: str = name) -> bool:
            return INVALID_LOG_LINE in _log(broken_stack, service)

        assert wait_for(reported, timeout=60), name
        assert "RE2 refuses this pattern" in _log(broken_stack, name), name
    assert broken_stack.failed() == [], {n: _log(broken_stack, n)[-2000:] for n in broken_stack.failed()}
    for port in (broken_stack.ports.policy_metrics, broken_stack.ports.forwarder_metrics):
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200


def test_call_fails_closed_with_503_and_is_recorded_as_failed(broken_stack: Stack) -> None:
    marker = f"fc-{uuid.uuid4().hex}"
    client = anthropic.Anthropic(
        base_url=broken_stack.ingress_url,
        api_key=broken_stack.token("alice", ["eng"]),
        max_retries=0,
        timeout=120,
    )
    with pytest.raises(anthropic.InternalServerError) as info:
        client.messages.create(
            model="claude-sonnet-5-5", max_tokens=16, messages=[{"role": "user", "content": marker}]
        )
    err = info.value
    assert err.status_code == 503
    assert isinstance(err.body, dict)
    assert err.body["type"] == "error" and err.body["error"]["type"] == "api_error"
    message = str(err.body["error"]["message"])
    assert "policy could not evaluate this call, so it was not forwarded" in message
    assert "bundle is invalid" in message
    assert "RE2" not in message and ".yaml" not in message  # server details stay in logs and the record
    assert err.response.headers.get("request-id")
    call_id = err.response.headers["x-skillgate-call-id"]

    assert stub_requests(broken_stack, marker) == []  # the upstream received nothing
    row = recorded_call(broken_stack, _auditor(broken_stack), call_id)
    assert (row["state"], row["status"], row["error_type"]) == ("failed", 503, "api_error")
    assert row["error_stage"] == "policy"
    # The record keeps what operators and auditors need; the caller got the short form.
    assert "RE2 refuses this pattern" in row["error_message"]
    assert str(row["error_message"]).startswith("policy could not evaluate this call")
    assert row["decision"] is None and row["attempts"] == 0
    assert broken_stack.failed() == []


def test_forwarder_refuses_a_decision_it_cannot_check(broken_stack: Stack) -> None:
    """Defence in depth: a decision that reaches the forwarder anyway (made before the bundle
    broke, or by another policy replica) is not forwarded while the forwarder's bundle is
    invalid; the call is recorded as failed by the forwarder."""
    marker = f"fd-{uuid.uuid4().hex}"
    body = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [
        {"role": "user", "content": marker}
    ]})  # fmt: skip
    decided = factories.call_decided(bundle_version="broken@b-0", body=body, reply_to=None)
    kafka = stack_kafka(broken_stack)

    async def publish() -> None:
        producer = make_producer(kafka)
        await producer.start()
        try:
            await producer.send_and_wait(
                topics.name(kafka, topics.DECIDED),
                default_codec().encode(ev.CALL_DECIDED, decided),
                key=decided["session_id"].encode(),
            )
        finally:
            await producer.stop()

    asyncio.run(publish())
    row = recorded_call(broken_stack, _auditor(broken_stack), decided["call_id"])
    assert (row["state"], row["status"], row["error_type"]) == ("failed", 503, "api_error")
    assert row["error_stage"] == "forwarder"
    assert "no valid policy bundle" in row["error_message"]
    assert "RE2 refuses this pattern" in row["error_message"]
    assert stub_requests(broken_stack, marker) == []
    assert broken_stack.failed() == []
