"""The approval rules without Kafka: who may decide, quorum, expiry, grants, the events emitted."""

from __future__ import annotations

import orjson
import pytest

from services.policy import approvals
from services.policy.approvals import ApprovalState
from skillgate import events, topics
from skillgate.codec import default_codec
from skillgate.events import ApprovalDecided, CallSubmitted, Identity
from skillgate.policy.bundle import ApprovalSpec
from skillgate.policy.engine import Verdict
from skillgate.policy.grants import Grants
from skillgate.policy.quorum import quorum_met
from tests import factories

NOW = 1_800_000_000_000_000


def _person(subject: str, groups: list[str]) -> Identity:
    return factories.identity(subject=subject, username=subject, groups=groups)


def _submitted(identity: Identity, text: str = "deploy to prod please") -> CallSubmitted:
    body = orjson.dumps(
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 8,
            "tools": [{"name": "bash", "type": "bash_20250124"}],
            "container": {"skills": [{"type": "anthropic", "skill_id": "pptx"}]},
            "messages": [{"role": "user", "content": text}],
        }
    )
    call_id = events.new_call_id()
    return factories.call_submitted(call_id, identity=identity, body=body, model="claude-sonnet-4-5")


def _state(spec: ApprovalSpec, requester: Identity | None = None) -> ApprovalState:
    submitted = _submitted(requester or _person("alice", ["eng"]))
    verdict = Verdict(
        decision="require_approval",
        reason="needs a human",
        rule_ids=["mask-secrets", "hold"],
        body=submitted["body"],
        record_body=orjson.dumps({"messages": [{"role": "user", "content": "deploy [EMAIL_1]"}]}),
        approval=spec,
        approval_rule="hold",
    )
    request = approvals.approval_request(submitted, "b@1", verdict, now=NOW)
    return ApprovalState.held(request, b"release")


def _decision(
    state: ApprovalState, who: Identity, decision: str = "approve", **kw: object
) -> ApprovalDecided:
    request = state.requested
    return ApprovalDecided(
        **events.envelope(request["call_id"], request["session_id"], who, "b@1"),
        approval_id=request["approval_id"],
        decision=decision,
        comment=kw.get("comment"),  # type: ignore[typeddict-item]
        grant=str(kw.get("grant", "one_time")),
        window_seconds=kw.get("window_seconds"),  # type: ignore[typeddict-item]
    )


BOB = _person("bob", ["approvers"])
CAROL = _person("carol", ["approvers"])
SAM = _person("sam", ["security"])
ADA = _person("ada", ["approvers", "security"])


def test_request_is_a_concise_summary_from_the_record_masked_body() -> None:
    state = _state(ApprovalSpec(groups=["approvers"], quorum=2, timeout_seconds=60))
    r = state.requested
    assert r["excerpt"] == "deploy [EMAIL_1]"  # the record-masked prompt, never the raw one
    assert r["expires_at"] == NOW + 60_000_000 and r["quorum"] == 2 and r["rule_id"] == "hold"
    assert r["model"] == "claude-sonnet-4-5" and r["skills"] == ["pptx"]
    assert r["tools"] == ["bash", "bash_20250124"] and r["estimated_tokens"] > 0
    assert "alice" in r["summary"] and "needs a human" in r["summary"] and "pptx" in r["summary"]
    assert r["approval_id"] == approvals.approval_id_for(r["call_id"])
    assert len(r["request_sha256"]) == 64
    # The state survives the faust table's JSON round trip.
    assert ApprovalState.loads(state.dumps()) == state


def test_credentials_never_reach_an_excerpt_even_when_the_bundle_keeps_them() -> None:
    """A bundle that masks nothing for the record still never shows approvers a credential:
    excerpts reach events, webhooks and chat. A key cut by the excerpt's end is not half kept."""
    token = "ghp_Zx9Qw2Er4Ty6Ui8Op0As1Df3Gh5Jk7Lm9Nb2V"
    text = "x" * (approvals.EXCERPT_CHARS - 10) + f" {token} deploy with this"
    submitted = _submitted(_person("alice", ["eng"]), text)
    verdict = Verdict(
        decision="require_approval",
        reason="needs a human",
        rule_ids=["hold"],
        body=submitted["body"],
        record_body=None,  # the record keeps the prompt as sent
        approval=ApprovalSpec(),
        approval_rule="hold",
    )
    request = approvals.approval_request(submitted, "b@1", verdict, now=NOW)
    excerpt = request["excerpt"]
    assert token[:9] not in excerpt and excerpt.endswith(" [GITHUB_T")  # cut inside the placeholder
    assert len(excerpt) == approvals.EXCERPT_CHARS


def test_requester_and_outsiders_cannot_decide() -> None:
    requester = _person("dave", ["eng", "approvers"])
    state = _state(ApprovalSpec(), requester)
    own = approvals.judge(state, _decision(state, requester), NOW + 1, [])
    assert not own.counted and "own call" in own.note
    outsider = approvals.judge(state, _decision(state, _person("eve", ["eng"])), NOW + 1, [])
    assert not outsider.counted and "not in a group" in outsider.note
    admin = approvals.judge(state, _decision(state, _person("root", ["admins"])), NOW + 1, ["admins"])
    assert admin.counted and admin.outcome == "approved"


def test_quorum_of_two_counts_distinct_people_once() -> None:
    state = _state(ApprovalSpec(quorum=2))
    assert approvals.judge(state, _decision(state, BOB), NOW + 1, []).outcome is None
    again = approvals.judge(state, _decision(state, BOB), NOW + 2, [])
    assert not again.counted and "already decided" in again.note
    assert approvals.judge(state, _decision(state, CAROL), NOW + 3, []).outcome == "approved"
    late = approvals.judge(state, _decision(state, ADA), NOW + 4, [])
    assert not late.counted and late.note == "approval already approved"


def test_one_deny_is_a_veto() -> None:
    state = _state(ApprovalSpec(quorum=2))
    approvals.judge(state, _decision(state, BOB), NOW + 1, [])
    assert approvals.judge(state, _decision(state, CAROL, "deny"), NOW + 2, []).outcome == "denied"
    assert "denied by carol" in approvals.outcome_reason(state)


@pytest.mark.parametrize(
    ("approvers", "met"),
    [
        ([("bob", ["approvers"]), ("carol", ["approvers"])], False),  # nobody from security
        ([("ada", ["approvers", "security"])], False),  # one person never covers two groups
        ([("ada", ["approvers", "security"]), ("bob", ["approvers"])], True),  # ada → security
        ([("bob", ["approvers"]), ("sam", ["security"])], True),
    ],
)
def test_one_from_each_group_is_a_matching(approvers: list[tuple[str, list[str]]], met: bool) -> None:
    assert quorum_met(1, ["approvers", "security"], True, approvers) is met


def test_expiry_and_late_decisions() -> None:
    state = _state(ApprovalSpec(timeout_seconds=10))
    early = approvals.judge(state, approvals.expire_decision(state, NOW + 1), NOW + 1, [])
    assert not early.counted and early.note == "not expired yet"
    late = approvals.judge(state, _decision(state, BOB), NOW + 10_000_001, [])
    assert late.outcome == "expired" and not late.counted and "after the request expired" in late.note
    assert "expired after 10 s" in approvals.outcome_reason(state)


def test_release_and_endings_name_the_approval() -> None:
    codec = default_codec()
    state = _state(ApprovalSpec())
    submitted = _submitted(_person("alice", ["eng"]))
    release = factories.call_decided(
        state.requested["call_id"],
        decision="allow",
        body=b"{}",
        reply_to={"topic": "calls.replies", "partition": 3, "instance": "ingress-1"},
    )
    approvals.judge(state, _decision(state, BOB, comment="ok"), NOW + 1, [])
    second = approvals.release_decision(state, release, NOW + 2)
    assert second["decision"] == "allow" and second["approval_id"] == state.requested["approval_id"]
    assert second["event_id"] != release["event_id"] and "approved by bob (ok)" in second["reason"]
    assert codec.decode(codec.encode(events.CALL_DECIDED, second))[1]["body"] == release["body"]
    resolved = approvals.resolved_event(state, NOW + 2)
    assert resolved["outcome"] == "approved" and resolved["deciders"] == ["bob"]
    assert resolved["identity"] == state.requested["identity"]  # the requester, not the approver
    denied_state = _state(ApprovalSpec())
    approvals.judge(denied_state, _decision(denied_state, BOB, "deny"), NOW + 1, [])
    denial = approvals.release_decision(denied_state, release, NOW + 2)
    assert denial["decision"] == "deny" and denial["body"] is None and denial["status"] == 403
    reply = approvals.ending_reply(denied_state, denial)
    assert reply is not None and reply["terminal_state"] == "denied"
    assert reply["headers"]["x-skillgate-approval-state"] == "denied"
    del submitted


def test_time_window_grant_is_the_shortest_asked_and_capped() -> None:
    state = _state(ApprovalSpec(quorum=2, max_window_seconds=1800))
    approvals.judge(state, _decision(state, BOB, grant="time_window", window_seconds=3600), NOW + 1, [])
    approvals.judge(state, _decision(state, CAROL, grant="time_window", window_seconds=1200), NOW + 2, [])
    assert approvals.grant_of(state) == ("time_window", 1200)
    mixed = _state(ApprovalSpec(quorum=2))
    approvals.judge(mixed, _decision(mixed, BOB, grant="time_window", window_seconds=600), NOW + 1, [])
    approvals.judge(mixed, _decision(mixed, CAROL), NOW + 2, [])
    assert approvals.grant_of(mixed) == ("one_time", None)  # one approver wanted this call only


def test_grants_cover_the_requester_and_rule_until_they_end() -> None:
    state = _state(ApprovalSpec(max_window_seconds=600))
    approvals.judge(state, _decision(state, BOB, grant="time_window", window_seconds=600), NOW + 1, [])
    resolved = approvals.resolved_event(state, NOW + 2)
    grants = Grants()
    grants.on_event(topics.APPROVALS_RESOLVED, events.APPROVAL_RESOLVED, resolved)
    assert grants.active("alice", "hold", NOW + 3) == resolved
    assert grants.active("alice", "other-rule", NOW + 3) is None
    assert grants.active("bob", "hold", NOW + 3) is None
    assert grants.active("alice", "hold", NOW + 2 + 600_000_001) is None


def test_the_notified_event_names_only_the_webhook_host() -> None:
    from services.policy.notify import _host

    assert (
        _host("https://user:s3cret@hooks.example.com:8443/services/T0/B0/XyZ?token=abc")
        == "hooks.example.com:8443"
    )
    assert _host("https://hooks.slack.com/services/T0/B0/XyZ") == "hooks.slack.com"


def test_expiry_index_follows_pending_approvals_without_rereading_the_table() -> None:
    """The expiry timer's index: due once past the deadline, asked again only 30 s later,
    dropped when the approval ends; a rebuild from the table keeps only pending approvals."""
    index = approvals.ExpiryIndex(rescan_seconds=60)
    assert index.needs_rebuild(0.0)
    pending = _state(ApprovalSpec(timeout_seconds=60))
    ended = _state(ApprovalSpec(timeout_seconds=60))
    ended.outcome = "approved"
    index.rebuild([(b"p", pending.dumps()), (b"e", ended.dumps()), (b"bad", b"{not json")], 10.0)
    assert len(index) == 1 and not index.needs_rebuild(69.9) and index.needs_rebuild(70.0)
    deadline = pending.requested["expires_at"]
    assert index.due(deadline - 1) == [] and index.due(deadline) == [b"p"]
    index.asked(b"p", deadline)
    assert index.due(deadline + approvals.EXPIRY_RETRY_MICROS - 1) == []
    assert index.due(deadline + approvals.EXPIRY_RETRY_MICROS) == [b"p"]
    pending.outcome = "expired"
    index.track(b"p", pending)
    assert len(index) == 0 and index.due(deadline + 10**9) == []
    held = _state(ApprovalSpec(timeout_seconds=5))
    index.track(b"h", held)
    assert index.due(held.requested["expires_at"]) == [b"h"]
    index.forget(b"h")
    assert len(index) == 0
