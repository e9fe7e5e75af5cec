"""A bundle published to the running stack applies to the next calls, without a restart."""

from __future__ import annotations

import asyncio
import uuid

import anthropic
import pytest

from services.cli.stack import Stack
from skillgate import events
from skillgate.policy.distribution import publish_bundle
from tests.conftest import wait_for
from tests.integration.conftest import ACTIONS_BUNDLE
from tests.integration.helpers import recorded_call, stack_kafka

pytestmark = pytest.mark.integration


def test_published_bundle_applies_without_restart(policy_stack: Stack) -> None:
    client = anthropic.Anthropic(
        base_url=policy_stack.ingress_url, api_key=policy_stack.token("alice", ["eng"]), max_retries=0
    )
    before = client.messages.create(
        model="claude-hot-1", max_tokens=8, messages=[{"role": "user", "content": "a"}]
    )
    assert before.content  # allowed under actions@t-1
    source = ACTIONS_BUNDLE.read_text().replace('version: "t-1"', 'version: "t-2"') + (
        "  - id: no-hot-models\n"
        "    match: {models: ['claude-hot-*']}\n"
        "    action: deny\n"
        "    reason: hot models were withdrawn\n"
    )
    publisher = events.anonymous_identity()
    asyncio.run(publish_bundle(stack_kafka(policy_stack), source, "test", publisher))

    marker = uuid.uuid4().hex

    def denied() -> str | None:
        try:
            client.messages.create(
                model="claude-hot-1", max_tokens=8, messages=[{"role": "user", "content": marker}]
            )
        except anthropic.PermissionDeniedError as exc:
            return str(exc.response.headers["x-skillgate-call-id"])
        return None

    call_id = wait_for(denied, timeout=30, interval=0.5)
    assert isinstance(call_id, str)
    row = recorded_call(policy_stack, policy_stack.token("audrey", ["auditors"]), call_id)
    assert row["bundle_version"] == "actions@t-2" and "no-hot-models" in row["rule_ids"]
