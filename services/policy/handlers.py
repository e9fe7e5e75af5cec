"""Turning a submitted call into its decision (and, when the call ends here, its reply).

Pure functions over events, so the rules of the service are testable without Kafka or faust.
Fail closed: if the request cannot be evaluated, the call is failed with a clear error and never
reaches the forwarder.
"""

from __future__ import annotations

import logging

import orjson

from skillgate import events
from skillgate.events import CallDecided, CallFailed, CallReply, CallSubmitted
from skillgate.policy.bundle import Bundle
from skillgate.policy.engine import Verdict, evaluate

log = logging.getLogger(__name__)


def decide(submitted: CallSubmitted, bundle: Bundle) -> Verdict:
    """Evaluate ``submitted`` under ``bundle``; raises on anything that prevents a decision."""
    request = orjson.loads(submitted["body"])
    if not isinstance(request, dict):
        raise ValueError("request body is not a JSON object")
    return evaluate(bundle, submitted["body"], request, submitted["upstream"])


def decided_event(submitted: CallSubmitted, bundle: Bundle, verdict: Verdict) -> CallDecided:
    """The calls.decided event; its id derives from the call id, so reprocessing is idempotent."""
    call_id = submitted["call_id"]
    return CallDecided(
        **events.envelope(
            call_id,
            submitted["session_id"],
            submitted["identity"],
            bundle.label,
            event_id=events.derived_event_id(call_id, "decided"),
        ),
        decision=verdict.decision,
        reason=verdict.reason,
        rule_ids=verdict.rule_ids,
        tags=verdict.tags,
        upstream=verdict.upstream,
        status=verdict.status,
        error_type=verdict.error_type,
        ingress_instance=submitted["ingress_instance"],
        mode=submitted["mode"],
        stream=submitted["stream"],
        reply_to=submitted["reply_to"],
        method=submitted["method"],
        path=submitted["path"],
        query=submitted["query"],
        headers=submitted["headers"],
        model=submitted["model"],
        body=verdict.body if verdict.decision == "allow" else None,
        record_body=verdict.record_body,
        masked=verdict.masked,
        fail_open=False,
        submitted_at=submitted["time"],
        approval_id=submitted["approval_id"],
    )


def refusal_reply(decided: CallDecided) -> CallReply | None:
    """The answer for a waiting caller whose call policy did not allow (None when async)."""
    if decided["decision"] == "allow" or decided["reply_to"] is None:
        return None
    return events.error_reply(
        decided,
        decided["bundle_version"],
        status=decided["status"] or 403,
        message=decided["reason"],
        error_type=decided["error_type"],
        terminal_state="rate_limited" if decided["decision"] == "rate_limited" else "denied",
    )


def failure_events(
    submitted: CallSubmitted, bundle_label: str | None, reason: str
) -> tuple[CallFailed, CallReply | None]:
    """Fail-closed outcome when policy cannot decide: a recorded failure and the caller's error."""
    message = f"policy could not evaluate this call, so it was not forwarded: {reason}"
    failed = events.failed_event(
        submitted,
        bundle_label,
        stage="policy",
        status=503,
        error_type="api_error",
        message=message,
        upstream=None,
        submitted_at=submitted["time"],
    )
    reply = None
    if submitted["reply_to"] is not None:
        reply = events.error_reply(
            submitted,
            bundle_label,
            status=503,
            message=message,
            error_type="api_error",
            terminal_state="failed",
        )
    return failed, reply
