"""The forwarder's response guard on real calls through the running pipeline (default bundle):
response masking for the caller and the record, and tool command guardrails on ``tool_use``.

The stub upstream echoes the last user message, and answers with a ``tool_use`` block when the
prompt holds ``STUB_TOOL_USE <name> <json>``; what it received is kept for the assertions.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid

import httpx
import orjson
import pytest

from services.cli.stack import Stack
from tests.integration.helpers import recorded_call, recorded_event, stub_requests

pytestmark = pytest.mark.integration


def call(stack: Stack, token: str, prompt: str) -> httpx.Response:
    """One synchronous Messages call through the ingress."""
    return httpx.post(
        f"{stack.ingress_url}/v1/messages",
        json={
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": prompt}],
        },
        headers={"authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"},
        timeout=60,
    )


def test_echoed_pii_reaches_the_caller_and_record_masked(
    stack: Stack, alice_token: str, auditor_token: str
) -> None:
    """The default bundle lets the model see an e-mail address but masks PII in responses."""
    marker = uuid.uuid4().hex[:12]
    email = f"ada.{marker}@example.org"
    resp = call(stack, alice_token, f"Please write to {email} about {marker}.")
    assert resp.status_code == 200, resp.text
    text = resp.json()["content"][0]["text"]
    assert email not in resp.text
    assert text == f"echo: Please write to [EMAIL_1] about {marker}."

    # The model (the stub) was allowed to see the real address.
    seen = stub_requests(stack, marker)
    assert len(seen) == 1 and email in seen[0]["body"]

    call_id = resp.headers["x-skillgate-call-id"]
    row = recorded_call(stack, auditor_token, call_id)
    assert row["state"] == "completed"
    assert "[EMAIL_1]" in row["response_body"] and email not in row["response_body"]
    assert email not in row["request_body"]
    completed = recorded_event(stack, auditor_token, call_id)
    assert [(m["type"], m["scope"]) for m in completed["masked"]] == [("EMAIL", "upstream")]
    assert email not in json.dumps(completed)


def test_secret_in_an_echo_never_comes_back(stack: Stack, alice_token: str, auditor_token: str) -> None:
    """A GitHub token in the prompt: masked before the model sees it, so the echo cannot carry it."""
    token = "ghp_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(36))
    marker = uuid.uuid4().hex[:12]
    resp = call(stack, alice_token, f"{marker}: my token is {token}")
    assert resp.status_code == 200, resp.text
    assert token not in resp.text and "[GITHUB_TOKEN_1]" in resp.json()["content"][0]["text"]
    seen = stub_requests(stack, marker)
    assert len(seen) == 1 and token not in seen[0]["body"]
    row = recorded_call(stack, auditor_token, resp.headers["x-skillgate-call-id"])
    assert token not in json.dumps(row, default=str)


def test_destructive_tool_use_is_blocked_and_recorded(
    stack: Stack, alice_token: str, auditor_token: str
) -> None:
    marker = uuid.uuid4().hex[:12]
    resp = call(stack, alice_token, f'{marker}\nSTUB_TOOL_USE bash {{"command": "rm -rf /"}}')
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert [b["type"] for b in doc["content"]] == ["text", "text"]
    assert doc["content"][1]["text"] == (
        "[skillgate blocked tool call bash: destructive shell command (rule destructive-shell)]"
    )
    assert doc["stop_reason"] == "end_turn"
    assert "rm -rf" not in resp.text

    call_id = resp.headers["x-skillgate-call-id"]
    completed = recorded_event(stack, auditor_token, call_id)
    [blocked] = completed["blocked_tools"]
    assert blocked["tool"] == "bash" and blocked["rule_id"] == "destructive-shell"
    assert blocked["action"] == "block_tool" and blocked["tool_use_id"].startswith("toolu_")
    # The recorded response shows what the caller got and the command that was stopped.
    row = recorded_call(stack, auditor_token, call_id)
    recorded = orjson.loads(row["response_body"])
    stopped = recorded["content"][1]["skillgate_blocked"]
    assert stopped["rule_id"] == "destructive-shell"
    assert stopped["blocks"][0]["input"] == {"command": "rm -rf /"}
    assert row["stop_reason"] == "end_turn"


def test_harmless_tool_use_passes_unchanged(stack: Stack, alice_token: str, auditor_token: str) -> None:
    marker = uuid.uuid4().hex[:12]
    resp = call(stack, alice_token, f'{marker}\nSTUB_TOOL_USE bash {{"command": "ls -la"}}')
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["stop_reason"] == "tool_use"
    tool = doc["content"][1]
    assert tool["type"] == "tool_use" and tool["name"] == "bash" and tool["input"] == {"command": "ls -la"}
    completed = recorded_event(stack, auditor_token, resp.headers["x-skillgate-call-id"])
    assert completed["blocked_tools"] == [] and completed["masked"] == []
