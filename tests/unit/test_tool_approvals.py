"""Tool calls held for approval in the forwarder's guard: the request, the explanation, grants."""

from __future__ import annotations

import orjson

from services.forwarder.approvals import ToolApprovals, command_digest
from services.forwarder.guard import ResponsePolicy, guard_response
from skillgate import events, topics
from skillgate.policy.bundle import parse_bundle
from skillgate.policy.grants import Grants
from tests import factories

BUNDLE_SOURCE = """
name: tool-approvals
version: "1"
tool_rules:
  - id: deploys
    tools: ["bash*"]
    patterns: ['\\bkubectl\\s+apply\\b']
    action: require_approval
    reason: deploys need a second pair of eyes
    approval: {groups: [sre], timeout_seconds: 120, max_window_seconds: 600}
"""
BUNDLE = parse_bundle(BUNDLE_SOURCE)
POLICY = ResponsePolicy.build(BUNDLE, b"k" * 32)
HEADERS = {"content-type": "application/json"}


def _answer(command: str) -> bytes:
    return orjson.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "stop_reason": "tool_use",
            "content": [
                {"type": "text", "text": "Deploying now."},
                {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"command": command}},
            ],
            "usage": {"input_tokens": 5, "output_tokens": 7},
        }
    )


def _context(grants: Grants | None = None) -> ToolApprovals:
    call = factories.call_decided(identity=factories.identity(subject="ada", username="ada", groups=["eng"]))
    return ToolApprovals(call, grants or Grants(), "https://gate.example.com")


def test_a_held_tool_call_is_explained_and_asked_for() -> None:
    approvals = _context()
    command = "kubectl apply -f deploy.yaml # owner ada@example.com"
    guarded = guard_response(
        POLICY, 200, HEADERS, _answer(command), mask_upstream=[], mask_record=["EMAIL"], approvals=approvals
    )
    caller = orjson.loads(guarded.caller_body)
    [request] = approvals.requests
    assert caller["content"][1]["type"] == "text" and request["approval_id"] in caller["content"][1]["text"]
    assert "gate.example.com/v1/approvals/" in caller["content"][1]["text"]
    assert caller["stop_reason"] == "end_turn"  # nothing left to run
    assert request["kind"] == "tool" and request["tool"] == "bash" and request["rule_id"] == "deploys"
    assert request["approver_groups"] == ["sre"] and request["max_window_seconds"] == 600
    assert request["command_sha256"] == command_digest({"command": command})
    assert "ada@example.com" not in request["excerpt"] and "[EMAIL_1]" in request["excerpt"]
    assert [b["action"] for b in guarded.blocked] == ["require_approval"]
    record = orjson.loads(guarded.record_body)
    assert record["content"][1]["skillgate_blocked"]["approval_id"] == request["approval_id"]


def test_a_credential_in_a_held_command_never_reaches_the_approval_request() -> None:
    """Nothing is masked for the record here, yet the approvers' excerpt (approval events, the
    webhook, chat) shows the command with the key redacted; the digest still covers the command."""
    approvals = _context()
    key = "ghp_Zx9Qw2Er4Ty6Ui8Op0As1Df3Gh5Jk7Lm9Nb2V"
    command = f"GITHUB_TOKEN={key} kubectl apply -f deploy.yaml"
    guard_response(
        POLICY, 200, HEADERS, _answer(command), mask_upstream=[], mask_record=[], approvals=approvals
    )
    [request] = approvals.requests
    assert key not in orjson.dumps(request).decode()
    assert "[GITHUB_TOKEN]" in request["excerpt"] and "kubectl apply" in request["excerpt"]
    assert request["command_sha256"] == command_digest({"command": command})


def _granted(request: events.ApprovalRequested) -> Grants:
    """The grants after an approver approved ``request`` once (a one-time grant)."""
    now = events.now_micros()
    resolved = events.ApprovalResolved(
        **events.envelope(request["call_id"], request["session_id"], request["identity"], None),
        approval_id=request["approval_id"],
        outcome="approved",
        grant="one_time",
        grant_until=now + 3_600_000_000,
        rule_id="deploys",
        deciders=["sam"],
        reason="approved by sam",
        requested_at=now,
        kind="tool",
        command_sha256=request["command_sha256"],
    )
    grants = Grants()
    grants.on_event(topics.APPROVALS_RESOLVED, events.APPROVAL_RESOLVED, resolved)
    return grants


def test_a_grant_never_lets_through_a_command_a_stronger_rule_blocks() -> None:
    """Approved for the deploy rule, the command also hits a block_tool rule: it is blocked,
    and the record does not claim a grant let it through."""
    strict = ResponsePolicy.build(
        parse_bundle(
            BUNDLE_SOURCE
            + """  - id: no-prune
    tools: ["bash*"]
    patterns: ['--prune']
    action: block_tool
    reason: pruning deletes what the manifest forgot
"""
        ),
        b"k" * 32,
    )
    command = "kubectl apply --prune -f deploy.yaml"
    approvals = _context()
    guard_response(
        strict, 200, HEADERS, _answer(command), mask_upstream=[], mask_record=[], approvals=approvals
    )
    assert approvals.requests == []  # blocked outright: nothing to approve
    # Even holding a grant for exactly this command under the deploy rule:
    held = _context()
    guard_response(POLICY, 200, HEADERS, _answer(command), mask_upstream=[], mask_record=[], approvals=held)
    granted = _context(_granted(held.requests[0]))
    blocked = guard_response(
        strict, 200, HEADERS, _answer(command), mask_upstream=[], mask_record=[], approvals=granted
    )
    assert orjson.loads(blocked.caller_body)["content"][1]["type"] == "text"
    assert [(b["action"], b["rule_id"]) for b in blocked.blocked] == [("block_tool", "no-prune")]
    assert granted.granted == []


def test_a_grant_lets_exactly_the_approved_command_through() -> None:
    approvals = _context()
    command = "kubectl apply -f deploy.yaml"
    guard_response(
        POLICY, 200, HEADERS, _answer(command), mask_upstream=[], mask_record=[], approvals=approvals
    )
    [request] = approvals.requests
    grants = _granted(request)
    again = _context(grants)
    passed = guard_response(
        POLICY, 200, HEADERS, _answer(command), mask_upstream=[], mask_record=[], approvals=again
    )
    assert orjson.loads(passed.caller_body)["content"][1]["type"] == "tool_use"
    assert [(b["action"], b["rule_id"]) for b in passed.blocked] == [("allowed_by_grant", "deploys")]
    assert request["approval_id"] in passed.blocked[0]["reason"] and again.requests == []
    other = guard_response(
        POLICY,
        200,
        HEADERS,
        _answer("kubectl apply -f other.yaml"),
        mask_upstream=[],
        mask_record=[],
        approvals=_context(grants),
    )
    assert orjson.loads(other.caller_body)["content"][1]["type"] == "text"  # another command: held
    # A streamed block is checked twice (input complete, then the assembled answer): one entry.
    twice = _context(grants)
    for _ in range(2):
        checked = guard_response(
            POLICY, 200, HEADERS, _answer(command), mask_upstream=[], mask_record=[], approvals=twice
        )
    assert [b["action"] for b in checked.blocked] == ["allowed_by_grant"]


def test_without_a_context_approval_rules_block() -> None:
    guarded = guard_response(
        POLICY, 200, HEADERS, _answer("kubectl apply -f x"), mask_upstream=[], mask_record=[]
    )
    assert orjson.loads(guarded.caller_body)["content"][1]["type"] == "text"
    assert guarded.blocked[0]["action"] == "require_approval"
