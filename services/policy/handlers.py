"""Turning a submitted call into its decision (and, when the call ends here, its reply).

Pure functions over events, so the rules of the service are testable without Kafka or faust.
Fail closed: if the request cannot be evaluated, the call is failed with a clear error and never
reaches the forwarder.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime

import orjson

from skillgate import events
from skillgate.events import ApprovalResolved, CallDecided, CallFailed, CallReply, CallSubmitted
from skillgate.policy.bundle import Bundle
from skillgate.policy.engine import CallContext, RateCounter, Verdict, evaluate
from skillgate.policy.masking import Masker

log = logging.getLogger(__name__)


def decide(
    submitted: CallSubmitted,
    bundle: Bundle,
    masker: Masker | None = None,
    counter: RateCounter | None = None,
) -> Verdict:
    """Evaluate ``submitted`` under ``bundle``; raises on anything that prevents a decision."""
    request = orjson.loads(submitted["body"])
    if not isinstance(request, dict):
        raise ValueError("request body is not a JSON object")
    ctx = CallContext(
        identity=submitted["identity"],
        request=request,
        body=submitted["body"],
        headers=submitted["headers"],
        upstream=submitted["upstream"],
    )
    return evaluate(bundle, ctx, masker, counter)


def granted(verdict: Verdict, grant: ApprovalResolved) -> Verdict:
    """A call the approval rule would hold, allowed by the caller's time-window grant."""
    until = datetime.fromtimestamp((grant["grant_until"] or 0) / 1e6, UTC).strftime("%H:%M:%S UTC")
    return dataclasses.replace(
        verdict,
        decision="allow",
        status=0,
        reason=f"{verdict.reason}; allowed by time-window grant {grant['approval_id']} "
        f"({grant['reason']}) until {until}",
    )


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
        fail_open=verdict.fail_open,
        submitted_at=submitted["time"],
        approval_id=submitted["approval_id"],
        response_mask_upstream=verdict.response_mask_upstream,
        response_mask_record=verdict.response_mask_record,
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
    """Fail-closed outcome when policy cannot decide: a recorded failure and the caller's error.

    The record keeps the full reason for operators and auditors; the caller's message leaves out
    server details (such as the bundle file's path) that only an operator can act on.
    """
    message = f"policy could not evaluate this call, so it was not forwarded: {reason}"
    failed, reply = _ends_here(submitted, bundle_label, 503, "api_error", message)
    if reply is not None and bundle_label is None:
        reply = events.error_reply(
            submitted,
            None,
            status=503,
            error_type="api_error",
            terminal_state="failed",
            message="policy could not evaluate this call, so it was not forwarded: the policy "
            "bundle is invalid or not loaded (operators: see the policy service's log)",
        )
    return failed, reply


def _ends_here(
    submitted: CallSubmitted, bundle_label: str | None, status: int, error_type: str, message: str
) -> tuple[CallFailed, CallReply | None]:
    """A call that ends in policy: its recorded failure, and the error for a waiting caller."""
    return events.call_failure(
        submitted,
        bundle_label,
        waiting=submitted["reply_to"] is not None,
        stage="policy",
        status=status,
        error_type=error_type,
        message=message,
        upstream=None,
        submitted_at=submitted["time"],
    )
