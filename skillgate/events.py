"""Typed views of the event contract in ``schemas/`` and helpers to build envelopes.

The Avro schemas are the contract; these TypedDicts mirror them for type checking at no runtime
cost (events stay plain dicts, which is what fastavro reads and writes fastest). Every event
carries the envelope of DESIGN.md invariant 6: event id, call id, session id, time, identity,
policy bundle version.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Literal, NotRequired, TypedDict

# Event names (the schema names under schemas/) and the topic each lives on.
CALL_SUBMITTED = "CallSubmitted"
CALL_DECIDED = "CallDecided"
CALL_COMPLETED = "CallCompleted"
CALL_FAILED = "CallFailed"
CALL_REPLY = "CallReply"
CALL_CANCELLED = "CallCancelled"
APPROVAL_REQUESTED = "ApprovalRequested"
APPROVAL_DECIDED = "ApprovalDecided"
APPROVAL_RESOLVED = "ApprovalResolved"
APPROVAL_NOTIFIED = "ApprovalNotified"
APPROVAL_HELD = "ApprovalHeld"
RATE_CHECK = "RateCheck"
POLICY_BUNDLE_PUBLISHED = "PolicyBundlePublished"
FORWARDER_CLAIM = "ForwarderClaim"
DEAD_LETTER = "DeadLetter"

Decision = Literal["allow", "deny", "require_approval", "rate_limited", "expired"]
TerminalState = Literal["completed", "failed", "denied", "expired", "rate_limited"]


class Identity(TypedDict):
    """Verified caller identity (never the token itself)."""

    subject: str
    issuer: str
    username: str | None
    email: str | None
    groups: list[str]
    client_id: str | None
    token_id: str | None


class ReplyTo(TypedDict):
    """The replies-topic partition a waiting ingress replica reads."""

    topic: str
    partition: int
    instance: str


class UpstreamAttempt(TypedDict):
    """One HTTP attempt against the upstream."""

    number: int
    started_at: int
    duration_ms: float
    status: int
    error: str | None
    retry_after_ms: float | None
    request_id: str | None


class MaskedValue(TypedDict):
    """A masked value, kept only as a keyed fingerprint."""

    type: str
    placeholder: str
    fingerprint: str
    location: str
    start: int
    end: int
    scope: str


class Envelope(TypedDict):
    """Fields every event carries."""

    event_id: str
    call_id: str
    session_id: str
    time: int
    identity: Identity
    bundle_version: str | None


class CallSubmitted(Envelope):
    """calls.submitted"""

    ingress_instance: str
    mode: str
    stream: bool
    reply_to: ReplyTo | None
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    model: str
    upstream: str | None
    client_ip: str | None
    user_agent: str | None
    approval_id: str | None


class CallDecided(Envelope):
    """calls.decided"""

    decision: str
    reason: str
    rule_ids: list[str]
    tags: list[str]
    upstream: str
    status: int
    error_type: str | None
    ingress_instance: str
    mode: str
    stream: bool
    reply_to: ReplyTo | None
    method: str
    path: str
    query: str
    headers: dict[str, str]
    model: str
    body: bytes | None
    record_body: bytes | None
    masked: list[MaskedValue]
    fail_open: bool
    submitted_at: int | None
    approval_id: str | None
    response_mask_upstream: list[str]
    response_mask_record: list[str]


class BlockedTool(TypedDict):
    """A tool_use block stopped by a command guardrail."""

    tool_use_id: str
    tool: str
    rule_id: str
    reason: str
    action: str


class CallCompleted(Envelope):
    """calls.completed: terminal state ``completed``."""

    upstream: str
    status: int
    headers: dict[str, str]
    body: bytes
    attempts: list[UpstreamAttempt]
    latency_ms: float
    request_id: str | None
    model: str
    stop_reason: str | None
    input_tokens: int | None
    output_tokens: int | None
    masked: list[MaskedValue]
    stream: bool
    submitted_at: int | None
    blocked_tools: list[BlockedTool]
    first_token_ms: NotRequired[float | None]
    chunks: NotRequired[int | None]


class CallFailed(Envelope):
    """calls.failed: terminal state ``failed``."""

    stage: str
    error_type: str
    message: str
    status: int
    upstream: str | None
    attempts: list[UpstreamAttempt]
    headers: dict[str, str]
    body: bytes | None
    submitted_at: int | None


class CallReply(Envelope):
    """calls.replies: the answer a waiting ingress replica hands to its caller."""

    kind: str
    seq: int
    status: int
    headers: dict[str, str]
    body: bytes
    terminal_state: str | None


class CallCancelled(Envelope):
    """calls.cancelled: the caller of a streamed call went away; its upstream request is cancelled."""

    reason: str
    ingress_instance: str
    chunks_delivered: int


class ForwarderClaim(Envelope):
    """forwarder.claims: at-most-once bookkeeping of upstream calls."""

    state: str
    terminal_state: str | None


class DeadLetter(Envelope):
    """deadletter: a message a service could not process."""

    service: str
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes
    value_sha256: str


class PolicyBundlePublished(Envelope):
    """policy.bundles: a versioned policy bundle."""

    name: str
    version: str
    sha256: str
    source: str
    rule_count: int


class ApprovalRequested(Envelope):
    """approvals.requested"""

    approval_id: str
    rule_ids: list[str]
    reason: str
    summary: str
    excerpt: str
    approver_groups: list[str]
    quorum: int
    expires_at: int
    each_group: bool
    max_window_seconds: int
    rule_id: str
    model: str
    skills: list[str]
    tools: list[str]
    estimated_tokens: int
    request_sha256: str
    mode: str
    kind: str
    tool: str
    command_sha256: str


class ApprovalDecided(Envelope):
    """approvals.decided"""

    approval_id: str
    decision: str
    comment: str | None
    grant: str
    window_seconds: NotRequired[int | None]


class ApprovalResolved(Envelope):
    """approvals.resolved: how an approval ended (identity: the requester)."""

    approval_id: str
    outcome: str
    grant: str
    grant_until: int | None
    rule_id: str
    deciders: list[str]
    reason: str
    requested_at: int
    kind: str
    command_sha256: str


class ApprovalNotified(Envelope):
    """approvals.notified: one webhook delivery of an approval request."""

    approval_id: str
    group: str
    target: str
    delivered: bool
    attempts: int
    status: int | None
    error: str | None


class RateCharge(TypedDict):
    """One rate-limit counter a call is charged to."""

    key: str
    window_seconds: int
    amount: int
    limit: int


class RateCheck(Envelope):
    """policy.ratelimit: a call on its way through the rate-limit counters (internal)."""

    submitted: bytes
    charges: list[RateCharge]
    index: int
    totals: list[int]


class ApprovalHeld(Envelope):
    """approvals.held: a call waiting for approval, as the policy service keeps it (internal)."""

    approval_id: str
    request: bytes
    release: bytes


def now_micros() -> int:
    """Current UTC time in microseconds since the epoch (the contract's time unit)."""
    return time.time_ns() // 1000


def new_event_id() -> str:
    """A random event id."""
    return str(uuid.uuid4())


def derived_event_id(call_id: str, kind: str) -> str:
    """A deterministic event id for the one event of ``kind`` a call can have.

    Why: services are at-least-once; when a message is reprocessed, the event it produces again has
    the same id, so the audit store (idempotent on event id) keeps one row.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"skillgate:{call_id}:{kind}"))


def approval_id(call_id: str, kind: str) -> str:
    """The id of the approval of ``kind`` a call can need (``apr_`` + 24 hex digits).

    Derived like :func:`derived_event_id`, so reprocessing the call asks for the same approval:
    ``approval`` for a held call (policy), ``tool-approval:<tool_use_id>`` for a held tool call
    (forwarder).
    """
    return "apr_" + derived_event_id(call_id, kind).replace("-", "")[:24]


def request_digest(body: bytes) -> str:
    """SHA-256 (hex) of a request body as the caller sent it: an approval is for that request,
    and a retry that claims the approval must send the same one."""
    return hashlib.sha256(body).hexdigest()


def new_call_id() -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so the audit store's sort key follows arrival time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 64) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


def anonymous_identity(issuer: str = "skillgate") -> Identity:
    """The identity of skillgate itself, for events no person caused (expiry, system publish)."""
    return Identity(
        subject="system:skillgate",
        issuer=issuer,
        username="skillgate",
        email=None,
        groups=[],
        client_id=None,
        token_id=None,
    )


def envelope(
    call_id: str,
    session_id: str,
    identity: Identity,
    bundle_version: str | None,
    event_id: str | None = None,
) -> Envelope:
    """The common envelope fields, to be merged into an event."""
    return Envelope(
        event_id=event_id or new_event_id(),
        call_id=call_id,
        session_id=session_id,
        time=now_micros(),
        identity=identity,
        bundle_version=bundle_version,
    )


def error_reply(
    source: Envelope,
    bundle_version: str | None,
    *,
    status: int,
    message: str,
    error_type: str | None,
    terminal_state: str,
    retry: bool = True,
) -> CallReply:
    """The Anthropic-shaped error a waiting caller gets when its call ends without an answer.

    Its id derives from the call id: whoever ends the call (policy or forwarder), a reprocessed
    message yields the same reply event. ``retry=False`` when the upstream may have processed it.
    """
    from skillgate.errors import error_body, new_request_id

    rid = new_request_id()
    return CallReply(
        **envelope(
            source["call_id"],
            source["session_id"],
            source["identity"],
            bundle_version,
            event_id=derived_event_id(source["call_id"], "reply"),
        ),
        kind="response",
        seq=0,
        status=status,
        headers={
            "content-type": "application/json",
            "request-id": rid,
            # The SDKs retry 5xx on their own; where the upstream may already have processed the
            # call, a retry would be a second (billed) call, so they are told not to.
            **({} if retry else {"x-should-retry": "false"}),
        },
        body=error_body(status, message, rid, error_type),
        terminal_state=terminal_state,
    )


def failed_event(
    source: Envelope,
    bundle_version: str | None,
    *,
    stage: str,
    status: int,
    error_type: str,
    message: str,
    upstream: str | None,
    submitted_at: int | None,
    attempts: list[UpstreamAttempt] | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> CallFailed:
    """The calls.failed record of a call (terminal state ``failed``), with a call-derived id."""
    return CallFailed(
        **envelope(
            source["call_id"],
            source["session_id"],
            source["identity"],
            bundle_version,
            event_id=derived_event_id(source["call_id"], "failed"),
        ),
        stage=stage,
        error_type=error_type,
        message=message,
        status=status,
        upstream=upstream,
        attempts=attempts or [],
        headers=headers or {},
        body=body,
        submitted_at=submitted_at,
    )


def call_failure(
    source: Envelope,
    bundle_version: str | None,
    *,
    waiting: bool,
    stage: str,
    status: int,
    error_type: str,
    message: str,
    upstream: str | None,
    submitted_at: int | None,
    attempts: list[UpstreamAttempt] | None = None,
    retry: bool = True,
) -> tuple[CallFailed, CallReply | None]:
    """A call that ends here without an answer: its recorded failure and, when a caller is
    ``waiting`` (the call has a ``reply_to``), the Anthropic-shaped error it gets."""
    failed = failed_event(
        source,
        bundle_version,
        stage=stage,
        status=status,
        error_type=error_type,
        message=message,
        upstream=upstream,
        submitted_at=submitted_at,
        attempts=attempts,
    )
    reply = None
    if waiting:
        reply = error_reply(
            source,
            bundle_version,
            status=status,
            message=message,
            error_type=error_type,
            terminal_state="failed",
            retry=retry,
        )
    return failed, reply
