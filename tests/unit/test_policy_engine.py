"""The rule engine: every action, every kind of condition, ordering and composition."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from skillgate.policy.bundle import parse_bundle
from skillgate.policy.engine import (
    CallContext,
    DeferredCounter,
    MemoryRateCounter,
    RateCounter,
    ReplayCounter,
    Verdict,
    evaluate,
)
from skillgate.policy.masking import Masker
from tests import factories

GITHUB = "ghp_Zx9Qw2Er4Ty6Ui8Op0As1Df3Gh5Jk7Lm9Nb2V"
EMAIL = "jane.doe@acme-corp.io"


def _request(text: str = "hello", **fields: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-5-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **fields,
    }


def _run(
    rules: str,
    request: dict[str, Any] | None = None,
    *,
    groups: list[str] | None = None,
    headers: dict[str, str] | None = None,
    counter: RateCounter | None = None,
    now: datetime | None = None,
    extra: str = "",
) -> Verdict:
    bundle = parse_bundle(f'name: t\nversion: "1"\n{extra}rules:\n{rules}')
    req = request or _request()
    ctx = CallContext(
        identity=factories.identity(subject="u-1", username="alice", groups=groups or ["eng"]),
        request=req,
        body=orjson.dumps(req),
        headers=headers or {},
        now=now,
    )
    return evaluate(bundle, ctx, Masker(bundle.detectors, b"k"), counter)


def test_no_rule_matches_default_allow_forwards_the_callers_bytes() -> None:
    req = _request()
    body = b'{"model": "claude-sonnet-5-5",  "max_tokens":64, "messages":[{"role":"user","content":"hello"}]}'
    bundle = parse_bundle('name: t\nversion: "1"\n')
    ctx = CallContext(identity=factories.identity(), request=req, body=body)
    verdict = evaluate(bundle, ctx)
    assert verdict.decision == "allow" and verdict.body is body and verdict.rule_ids == []


def test_deny_with_reason_and_first_terminal_rule_wins() -> None:
    verdict = _run(
        "  - {id: no-opus, match: {models: ['claude-opus-*']}, action: deny, reason: opus is reserved}\n"
        "  - {id: ok, action: allow}\n"
        "  - {id: never, action: deny}\n",
        _request(model="claude-opus-5"),
    )
    assert (
        verdict.decision == "deny" and verdict.status == 403 and verdict.reason.startswith("opus is reserved")
    )
    assert verdict.rule_ids == ["no-opus"] and verdict.body is None
    allowed = _run(
        "  - {id: no-opus, match: {models: ['claude-opus-*']}, action: deny}\n  - {id: ok, action: allow}\n  - {id: never, action: deny}\n"
    )
    assert allowed.decision == "allow" and allowed.rule_ids == ["ok"]


def test_mask_upstream_and_record_layers_compose_before_the_terminal_rule() -> None:
    verdict = _run(
        "  - {id: secrets, action: mask, mask: {entities: [secret]}}\n"
        "  - {id: pii, action: mask, mask: {entities: [pii], scope: record, direction: [request]}}\n"
        "  - {id: tag-it, action: tag, tags: [masked]}\n"
        "  - {id: ok, action: allow}\n",
        _request(f"use {GITHUB} and mail {EMAIL}"),
    )
    assert verdict.decision == "allow" and verdict.rule_ids == ["secrets", "pii", "tag-it", "ok"]
    assert verdict.tags == ["masked"]
    assert verdict.body is not None and verdict.record_body is not None
    forwarded, recorded = verdict.body.decode(), verdict.record_body.decode()
    assert GITHUB not in forwarded and "[GITHUB_TOKEN_1]" in forwarded and EMAIL in forwarded
    assert GITHUB not in recorded and EMAIL not in recorded and "[EMAIL_1]" in recorded
    scopes = {m["type"]: m["scope"] for m in verdict.masked}
    assert scopes == {"GITHUB_TOKEN": "upstream", "EMAIL": "record"}
    assert "GITHUB_TOKEN" in verdict.response_mask_upstream and verdict.response_mask_record == []
    assert "masked 2 value(s)" in verdict.reason


def test_rate_limit_per_user_and_window() -> None:
    counter = MemoryRateCounter(clock=lambda: 1000.0)
    rule = "  - {id: rl, action: rate_limit, rate_limit: {requests: 2, window_seconds: 60}}\n"
    decisions = [_run(rule, counter=counter).decision for _ in range(3)]
    assert decisions == ["allow", "allow", "rate_limited"]
    limited = _run(rule, counter=counter)
    assert (
        limited.status == 429 and limited.error_type == "rate_limit_error" and "2 requests" in limited.reason
    )
    other_user = _run(rule, counter=counter, groups=["ops"])  # same subject: still limited
    assert other_user.decision == "rate_limited"


def test_two_pass_counting_decides_like_one_counter() -> None:
    """The policy service's way: pass one records charges, the counters (faust table partitions)
    add them up, pass two decides on the totals; the outcome equals one in-process counter's."""
    rules = (
        "  - {id: per-user, action: rate_limit, rate_limit: {requests: 3, window_seconds: 60}}\n"
        "  - {id: per-group, action: rate_limit, rate_limit: {requests: 5, tokens: 40, by: group}}\n"
    )
    reference = MemoryRateCounter(clock=lambda: 1000.0)
    tables: dict[str, int] = {}  # what the counters' partitions hold, one key each
    for _ in range(5):
        deferred = DeferredCounter()
        assert _run(rules, counter=deferred).decision == "allow"  # pass one never refuses
        assert [c.key.split("|")[0] for c in deferred.charges] == ["per-user", "per-group", "per-group"]
        totals = []
        for charge in deferred.charges:  # as the rates agent does, stopping at the first over
            tables[charge.key] = tables.get(charge.key, 0) + charge.amount
            totals.append(tables[charge.key])
            if totals[-1] > charge.limit:
                break
        replayed = _run(rules, counter=ReplayCounter(deferred.charges, totals))
        expected = _run(rules, counter=reference)
        assert (replayed.decision, replayed.reason) == (expected.decision, expected.reason)
    assert expected.decision == "rate_limited" and "3 requests" in expected.reason


def test_route_and_require_approval_on_estimated_tokens() -> None:
    rules = (
        "  - {id: batch, match: {groups: [batch]}, action: route, route: bulk}\n"
        "  - {id: big, match: {input_tokens: {gt: 100}}, action: require_approval,"
        " approval: {groups: [leads], quorum: 2}}\n"
    )
    small = _run(rules, groups=["batch"], extra="caller_upstreams: [default, bulk]\n")
    assert small.decision == "allow" and small.upstream == "bulk"
    big = _run(rules, _request("x" * 800))
    assert big.decision == "require_approval" and big.approval is not None
    assert big.approval.groups == ["leads"] and big.approval.quorum == 2


@pytest.mark.parametrize(
    ("match", "request_fields", "headers", "hit"),
    [
        ("{users: [ali*]}", {}, {}, True),
        ("{users: [bob]}", {}, {}, False),
        ("{groups: [eng]}", {}, {}, True),
        ("{tools: [bash]}", {"tools": [{"name": "bash", "input_schema": {}}]}, {}, True),
        ("{tools: [bash]}", {}, {}, False),
        (
            "{skills: [pptx]}",
            {"container": {"skills": [{"type": "anthropic", "skill_id": "pptx"}]}},
            {},
            True,
        ),
        ("{betas: ['files-api-*']}", {}, {"anthropic-beta": "x-1, files-api-2025-04-14"}, True),
        ("{max_tokens: {gte: 64}}", {}, {}, True),
        ("{max_tokens: {gt: 64}}", {}, {}, False),
        (
            "{content: ['(?i)drop\\s+table']}",
            {"messages": [{"role": "user", "content": "DROP  TABLE x"}]},
            {},
            True,
        ),
        ("{entities: [EMAIL]}", {"messages": [{"role": "user", "content": f"to {EMAIL}"}]}, {}, True),
        ("{entities: [secret]}", {"messages": [{"role": "user", "content": f"to {EMAIL}"}]}, {}, False),
        ("{groups: [eng], not: {users: [alice]}}", {}, {}, False),
        ("{time: {days: [sat, sun]}}", {}, {}, True),  # 2026-11-21 is a Saturday
        ("{time: {start: '09:00', end: '17:00'}}", {}, {}, False),  # 20:30 UTC
    ],
)
def test_conditions(match: str, request_fields: dict[str, Any], headers: dict[str, str], hit: bool) -> None:
    verdict = _run(
        f"  - {{id: r, match: {match}, action: deny}}\n",
        _request(**request_fields),
        headers=headers,
        now=datetime(2026, 11, 21, 20, 30, tzinfo=UTC),
    )
    assert (verdict.decision == "deny") is hit


def test_evaluation_failure_needs_a_masker_rather_than_forwarding_unmasked() -> None:
    bundle = parse_bundle(
        'name: t\nversion: "1"\nrules:\n  - {id: m, action: mask, mask: {entities: [secret]}}\n'
    )
    ctx = CallContext(identity=factories.identity(), request=_request(GITHUB), body=b"{}")
    with pytest.raises(RuntimeError, match="masker"):
        evaluate(bundle, ctx)


@pytest.mark.parametrize("outcome", ["refused-upstream", "rate-limited", "deny-before-mask"])
def test_every_outcome_records_a_masked_body(outcome: str) -> None:
    """Invariant 3 whatever the decision: the record never holds what a mask rule covers."""
    mask = "  - {id: secrets, action: mask, mask: {entities: [secret]}}\n"
    req = _request(f"deploy with {GITHUB}")
    if outcome == "rate-limited":
        rules = "  - {id: rl, action: rate_limit, rate_limit: {requests: 1}}\n" + mask
        counter = MemoryRateCounter(clock=lambda: 5.0)
        _run(rules, req, counter=counter)
        verdict = _run(rules, req, counter=counter)
        assert verdict.decision == "rate_limited"
    elif outcome == "deny-before-mask":
        verdict = _run("  - {id: stop, action: deny}\n" + mask, req)
        assert verdict.decision == "deny"
    else:
        bundle = parse_bundle(f'name: t\nversion: "1"\nrules:\n{mask}')
        ctx = CallContext(
            identity=factories.identity(), request=req, body=orjson.dumps(req), upstream="other"
        )
        verdict = evaluate(bundle, ctx, Masker(bundle.detectors, b"k"))
        assert verdict.decision == "deny"
    assert verdict.body is None
    assert verdict.record_body is not None and GITHUB.encode() not in verdict.record_body
    assert b"[GITHUB_TOKEN_1]" in verdict.record_body and "secrets" in verdict.rule_ids
