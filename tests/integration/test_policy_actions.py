"""Every policy action on real calls through the running pipeline (bundle: bundles/actions.yaml)."""

from __future__ import annotations

import json
import uuid

import anthropic
import httpx
import pytest

from services.cli.stack import Stack
from tests.conftest import wait_for
from tests.integration.helpers import recorded_call, sql, stub_requests

pytestmark = pytest.mark.integration

GITHUB = "ghp_Zx9Qw2Er4Ty6Ui8Op0As1Df3Gh5Jk7Lm9Nb2V"
EMAIL = "jane.doe@acme-corp.io"


def _client(stack: Stack, user: str, groups: list[str]) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=stack.ingress_url, api_key=stack.token(user, groups), max_retries=0, timeout=60
    )


def _auditor(stack: Stack) -> str:
    return stack.token("audrey", ["auditors"])


def test_secret_masked_before_the_model_pii_masked_in_the_record(policy_stack: Stack) -> None:
    marker = uuid.uuid4().hex
    raw = _client(policy_stack, "alice", ["eng"]).messages.with_raw_response.create(
        model="m",
        max_tokens=64,
        messages=[{"role": "user", "content": f"{marker} deploy with {GITHUB} and mail {EMAIL}"}],
    )
    text = raw.parse().content[0].text  # type: ignore[union-attr]
    # The model (stub) never saw the secret; it did see the e-mail (record-only masking).
    upstream = stub_requests(policy_stack, marker)
    assert len(upstream) == 1
    assert GITHUB not in upstream[0]["body"] and "[GITHUB_TOKEN_1]" in upstream[0]["body"]
    assert EMAIL in upstream[0]["body"]
    assert GITHUB not in text
    row = recorded_call(policy_stack, _auditor(policy_stack), raw.headers["x-skillgate-call-id"])
    assert GITHUB not in row["request_body"] and EMAIL not in row["request_body"]
    assert "[EMAIL_1]" in row["request_body"] and "[GITHUB_TOKEN_1]" in row["request_body"]
    assert row["rule_ids"][:3] == ["mask-secrets", "pii-record-only", "tag-eng"]
    dump = json.dumps(sql(policy_stack, _auditor(policy_stack), "SELECT * FROM events"), default=str)
    assert GITHUB not in dump and EMAIL not in dump


def test_deny_shows_the_reason_and_nothing_goes_upstream(policy_stack: Stack) -> None:
    marker = uuid.uuid4().hex
    with pytest.raises(anthropic.PermissionDeniedError, match="this model is not approved"):
        _client(policy_stack, "alice", ["eng"]).messages.create(
            model="claude-forbidden-9", max_tokens=8, messages=[{"role": "user", "content": marker}]
        )
    assert stub_requests(policy_stack, marker) == []


def test_tag_and_route(policy_stack: Stack) -> None:
    marker = uuid.uuid4().hex
    raw = _client(policy_stack, "bob", ["batch"]).messages.with_raw_response.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": marker}]
    )
    row = recorded_call(policy_stack, _auditor(policy_stack), raw.headers["x-skillgate-call-id"])
    assert row["upstream"] == "second" and "route-batch" in row["rule_ids"]
    tagged = _client(policy_stack, "carol", ["eng"]).messages.with_raw_response.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": marker}]
    )
    row = recorded_call(policy_stack, _auditor(policy_stack), tagged.headers["x-skillgate-call-id"])
    assert "engineering" in row["tags"] and row["upstream"] == "default"


def test_rate_limit_answers_429_after_the_limit(policy_stack: Stack) -> None:
    client = _client(policy_stack, "limited", ["eng"])
    for _ in range(2):
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.RateLimitError, match="limit-burst"):
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])


def test_require_approval_emits_the_request_and_ends_clearly(policy_stack: Stack) -> None:
    marker = uuid.uuid4().hex
    big = f"{marker} please review {EMAIL} " + "lorem ipsum dolor sit amet " * 100
    with pytest.raises(anthropic.PermissionDeniedError, match="approval") as caught:
        _client(policy_stack, "alice", ["eng"]).messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": big}]
        )
    assert stub_requests(policy_stack, marker) == []
    call_id = caught.value.response.headers["x-skillgate-call-id"]
    auditor = _auditor(policy_stack)

    def approval_row() -> list[dict[str, object]]:
        return sql(
            policy_stack,
            auditor,
            f"SELECT payload FROM events WHERE call_id = '{call_id}' AND event_type = 'ApprovalRequested'",  # noqa: S608
        )

    rows = wait_for(approval_row, timeout=30)
    assert isinstance(rows, list)
    payload = json.loads(str(rows[0]["payload"]))
    assert payload["approval_id"].startswith("apr_") and payload["approver_groups"] == ["approvers"]
    assert "approve-large" in payload["rule_ids"]
    assert EMAIL not in payload["excerpt"]  # the excerpt comes from the body as recorded
    # Nobody decides: the caller was held for the ingress's approval wait, then told the id.
    assert caught.value.response.headers["x-skillgate-approval-state"] == "pending"
    row = recorded_call(policy_stack, auditor, call_id, state="pending_approval")
    assert row["decision"] == "require_approval" and row["approval_id"] == payload["approval_id"]


def test_recorder_read_api_shows_the_bundle_version(policy_stack: Stack) -> None:
    raw = _client(policy_stack, "alice", ["eng"]).messages.with_raw_response.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "v"}]
    )
    doc = httpx.get(
        f"{policy_stack.recorder_url}/v1/calls/{raw.headers['x-skillgate-call-id']}",
        headers={"authorization": f"Bearer {_auditor(policy_stack)}"},
    )
    assert doc.status_code in (200, 404)  # recorded within about a second
    row = recorded_call(policy_stack, _auditor(policy_stack), raw.headers["x-skillgate-call-id"])
    assert str(row["bundle_version"]).startswith("actions@")  # a later test publishes t-2
