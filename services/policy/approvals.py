"""The approval workflow's rules: holding a call, judging each decision, ending the approval.

Pure functions over events and a small state record, so every rule (separation of duties, quorum,
one from each group, expiry, duplicates, grants) is testable without Kafka or faust. The policy
service keeps one :class:`ApprovalState` per approval id in a faust table and calls these.

Outcomes: one deny by an eligible approver denies (a veto); approvals by distinct eligible people
count until the quorum (and, with ``each_group``, one per group) is met; the request expires at
``expires_at``, and any decision that arrives later, a second time, from the requester, or from
someone outside the approver groups is refused without changing anything.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from skillgate import events
from skillgate.events import (
    ApprovalDecided,
    ApprovalRequested,
    ApprovalResolved,
    CallDecided,
    CallReply,
    CallSubmitted,
    Identity,
)
from skillgate.policy import quorum
from skillgate.policy.bundle import ApprovalSpec
from skillgate.policy.engine import Verdict, estimate_tokens, prompt_text, skills_of, tools_of
from skillgate.policy.grants import ONE_TIME_TOOL_GRANT_SECONDS
from skillgate.policy.masking import redact_excerpt

#: Longest excerpt of the (masked) prompt shown to approvers.
EXCERPT_CHARS = 500
GRANT_ONE_TIME = "one_time"
GRANT_TIME_WINDOW = "time_window"


def approval_id_for(call_id: str) -> str:
    """The approval id of a held call: derived from the call id, so reprocessing yields the same id."""
    return events.approval_id(call_id, "approval")


def approval_request(
    submitted: CallSubmitted, bundle_label: str, verdict: Verdict, *, now: int | None = None
) -> ApprovalRequested:
    """The approvers' view of a held call: who, what, why, and an excerpt of the masked prompt."""
    call_id = submitted["call_id"]
    spec = verdict.approval or ApprovalSpec()
    ident = submitted["identity"]
    try:  # the excerpt comes from the body as recorded: masked for the record
        excerpt = prompt_text(orjson.loads(verdict.record_body or verdict.body or b""))
    except (orjson.JSONDecodeError, TypeError, AttributeError):
        excerpt = ""
    # Tool and skill names are not masked, so they come from the request as sent.
    try:
        sent = orjson.loads(submitted["body"])
    except orjson.JSONDecodeError:
        sent = None
    request = sent if isinstance(sent, dict) else {}
    tools = sorted({t for t in tools_of(request) if t})
    skills = skills_of(request)
    tokens = estimate_tokens(excerpt)
    who = ident["username"] or ident["email"] or ident["subject"]
    summary = (
        f"{who} ({', '.join(ident['groups']) or 'no groups'}) asks {submitted['model'] or 'a model'}"
        f", ~{tokens} input tokens"
        + (f", skills: {', '.join(skills)}" if skills else "")
        + (f", tools: {', '.join(tools)}" if tools else "")
        + f". Rules: {', '.join(verdict.rule_ids) or '-'}. Why: {verdict.reason}"
    )
    created = now if now is not None else events.now_micros()
    env = events.envelope(
        call_id,
        submitted["session_id"],
        ident,
        bundle_label,
        event_id=events.derived_event_id(call_id, "approval-requested"),
    )
    env["time"] = created
    return ApprovalRequested(
        **env,
        approval_id=approval_id_for(call_id),
        rule_ids=verdict.rule_ids,
        reason=verdict.reason,
        summary=summary[:1000],
        # From the body as recorded (masked for the record), credentials redacted in any case.
        excerpt=redact_excerpt(excerpt, EXCERPT_CHARS),
        approver_groups=list(spec.groups),
        quorum=spec.quorum,
        expires_at=created + spec.timeout_seconds * 1_000_000,
        each_group=spec.each_group,
        max_window_seconds=spec.max_window_seconds,
        rule_id=verdict.approval_rule or "",
        model=submitted["model"],
        skills=skills,
        tools=tools,
        estimated_tokens=tokens,
        request_sha256=events.request_digest(submitted["body"]),
        mode=submitted["mode"],
        kind="call",
        tool="",
        command_sha256="",
    )


@dataclass
class Vote:
    """One counted decision."""

    subject: str
    name: str
    groups: list[str]
    decision: str
    comment: str | None
    grant: str
    window_seconds: int | None
    at: int


@dataclass
class ApprovalState:
    """What the policy service keeps per approval (a faust table value, stored as JSON)."""

    request: dict[str, Any]
    release: str  # base64 of the encoded CallDecided to publish once approved
    votes: list[Vote] = field(default_factory=list)
    outcome: str | None = None

    @property
    def requested(self) -> ApprovalRequested:
        """The request event (typed view)."""
        return self.request  # type: ignore[return-value]

    @property
    def release_bytes(self) -> bytes:
        """The encoded release decision."""
        return base64.b64decode(self.release)

    def dumps(self) -> bytes:
        """JSON bytes for the table."""
        return orjson.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes) -> ApprovalState:
        """Inverse of :meth:`dumps`."""
        data = orjson.loads(raw)
        data["votes"] = [Vote(**v) for v in data.get("votes") or []]
        return cls(**data)

    @classmethod
    def held(cls, request: ApprovalRequested, release: bytes) -> ApprovalState:
        """A new pending approval."""
        return cls(request=dict(request), release=base64.b64encode(release).decode())


log = logging.getLogger(__name__)

#: An expiry asked for is asked again only if the approval is still pending this much later.
EXPIRY_RETRY_MICROS = 30_000_000


class ExpiryIndex:
    """Deadlines of the pending approvals a worker holds, for its expiry timer.

    The approvals table keeps ended approvals too (a late decision gets "already decided"), so
    walking and decoding the whole table on every tick grows with every approval ever made.
    The index is updated with each state the worker writes and rebuilt from the table from time
    to time (:meth:`rebuild`), which also picks up the entries a restart or a rebalance brought
    (at the first tick after a start, then every ``rescan_seconds``: the table may still be
    recovering at the first tick, so an approval that expired while the worker was down expires
    at most that much late).
    """

    def __init__(self, rescan_seconds: float = 10.0) -> None:
        self.rescan_seconds = rescan_seconds
        # key -> (expires at, when its expiry was last asked for; 0: never)
        self._deadlines: dict[bytes, tuple[int, int]] = {}
        self._built_at: float | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def needs_rebuild(self, monotonic_now: float) -> bool:
        """True at the first tick and every ``rescan_seconds`` after."""
        return self._built_at is None or monotonic_now - self._built_at >= self.rescan_seconds

    def rebuild(self, items: Iterable[tuple[bytes, bytes]], monotonic_now: float) -> None:
        """Index every pending approval of ``items`` (the table's key/value pairs)."""
        deadlines: dict[bytes, tuple[int, int]] = {}
        for key, raw in items:
            try:
                state = ApprovalState.loads(raw)
            except Exception:  # never let one bad entry stop expiring the others
                log.exception("unreadable pending approval skipped", extra={"key": repr(key)[:80]})
                continue
            if state.outcome is None:
                deadlines[key] = (int(state.requested["expires_at"]), self._asked_at(key))
        self._deadlines = deadlines
        self._built_at = monotonic_now

    def track(self, key: bytes, state: ApprovalState) -> None:
        """Follow a state the worker just wrote: indexed while pending, dropped once ended."""
        if state.outcome is None:
            self._deadlines[key] = (int(state.requested["expires_at"]), self._asked_at(key))
        else:
            self.forget(key)

    def forget(self, key: bytes) -> None:
        """Stop following ``key`` (ended, or no longer held by this worker)."""
        self._deadlines.pop(key, None)

    def due(self, now: int) -> list[bytes]:
        """Keys past their deadline whose expiry was not asked for in the last 30 s."""
        return [
            key
            for key, (expires_at, asked_at) in self._deadlines.items()
            if now >= expires_at and now - asked_at >= EXPIRY_RETRY_MICROS
        ]

    def asked(self, key: bytes, now: int) -> None:
        """Note that the expiry of ``key`` was asked for at ``now``."""
        entry = self._deadlines.get(key)
        if entry is not None:
            self._deadlines[key] = (entry[0], now)

    def _asked_at(self, key: bytes) -> int:
        entry = self._deadlines.get(key)
        return entry[1] if entry is not None else 0


@dataclass(frozen=True)
class Judgement:
    """What one decision does to an approval."""

    counted: bool
    outcome: str | None  # approved, denied, expired (None: still pending)
    note: str  # why refused, or what happened


def _display(ident: Identity) -> str:
    return ident["username"] or ident["email"] or ident["subject"]


def eligible(request: ApprovalRequested, approver: Identity, admin_groups: list[str]) -> bool:
    """Whether ``approver`` may decide: a member of a group the request is routed to (or an
    admin), and never the requester (separation of duties)."""
    if approver["subject"] == request["identity"]["subject"]:
        return False
    groups = set(approver["groups"])
    return bool(groups.intersection(request["approver_groups"]) or groups.intersection(admin_groups))


def quorum_met(request: ApprovalRequested, votes: list[Vote]) -> bool:
    """Whether the approvals among ``votes`` satisfy the request's quorum rule."""
    return quorum.quorum_met(
        request["quorum"],
        request["approver_groups"],
        request["each_group"],
        [(v.subject, v.groups) for v in votes if v.decision == "approve"],
    )


def judge(state: ApprovalState, decided: ApprovalDecided, now: int, admin_groups: list[str]) -> Judgement:
    """Apply one decision (a person's approve/deny, or skillgate's expire) to ``state``.

    Mutates ``state`` (votes, outcome) only when the decision counts.
    """
    request = state.requested
    if state.outcome is not None:
        return Judgement(False, None, f"approval already {state.outcome}")
    if now >= request["expires_at"]:
        state.outcome = "expired"
        why = "expired" if decided["decision"] == "expire" else "arrived after the request expired"
        return Judgement(decided["decision"] == "expire", "expired", why)
    decision = decided["decision"]
    if decision == "expire":
        return Judgement(False, None, "not expired yet")
    approver = decided["identity"]
    if approver["subject"] == request["identity"]["subject"]:
        return Judgement(False, None, "a requester cannot decide on their own call")
    if not eligible(request, approver, admin_groups):
        return Judgement(False, None, "the approver is not in a group this request is routed to")
    if any(v.subject == approver["subject"] for v in state.votes):
        return Judgement(False, None, "this approver already decided")
    if decision not in ("approve", "deny"):
        return Judgement(False, None, f"unknown decision {decision!r}")
    state.votes.append(
        Vote(
            subject=approver["subject"],
            name=_display(approver),
            groups=list(approver["groups"]),
            decision=decision,
            comment=decided["comment"],
            grant=decided["grant"]
            if decided["grant"] in (GRANT_ONE_TIME, GRANT_TIME_WINDOW)
            else GRANT_ONE_TIME,
            window_seconds=decided.get("window_seconds"),
            at=decided["time"],
        )
    )
    if decision == "deny":
        state.outcome = "denied"
        return Judgement(True, "denied", "denied")
    if quorum_met(request, state.votes):
        state.outcome = "approved"
        return Judgement(True, "approved", "approved")
    return Judgement(True, None, "approval counted; waiting for more")


def grant_of(state: ApprovalState) -> tuple[str, int | None]:
    """The grant an approved request gives: a time window only if every approver chose one (the
    shortest asked for, capped by the rule's ``max_window_seconds``), else one-time."""
    approvals = [v for v in state.votes if v.decision == "approve"]
    cap = state.requested["max_window_seconds"]
    windows = [v.window_seconds for v in approvals if v.grant == GRANT_TIME_WINDOW and v.window_seconds]
    if cap <= 0 or not approvals or len(windows) != len(approvals):
        return GRANT_ONE_TIME, None
    return GRANT_TIME_WINDOW, min(min(windows), cap)


def outcome_reason(state: ApprovalState) -> str:
    """One line saying how the approval ended and by whom."""
    request = state.requested
    if state.outcome == "expired":
        timeout = (request["expires_at"] - request["time"]) // 1_000_000
        return f"approval {request['approval_id']} expired after {timeout} s without a decision"
    counted = [v for v in state.votes if v.decision == ("deny" if state.outcome == "denied" else "approve")]
    by = ", ".join(f"{v.name}" + (f" ({v.comment})" if v.comment else "") for v in counted)
    return f"{state.outcome} by {by}" if by else str(state.outcome)


def resolved_event(state: ApprovalState, now: int) -> ApprovalResolved:
    """The approvals.resolved record of the outcome (identity: the requester).

    A one-time approval of a tool command is a grant of that one command (for
    :data:`~skillgate.policy.grants.ONE_TIME_TOOL_GRANT_SECONDS`): the call that produced it is
    over, and the requester's next call runs it.
    """
    request = state.requested
    grant, window = grant_of(state) if state.outcome == "approved" else (GRANT_ONE_TIME, None)
    tool = request["kind"] == "tool"
    if tool and state.outcome == "approved" and grant == GRANT_ONE_TIME:
        window = ONE_TIME_TOOL_GRANT_SECONDS
    env = events.envelope(
        request["call_id"],
        request["session_id"],
        request["identity"],
        request["bundle_version"],
        event_id=events.derived_event_id(request["call_id"], f"approval-resolved:{request['approval_id']}"),
    )
    env["time"] = now
    deciding = "deny" if state.outcome == "denied" else "approve"
    return ApprovalResolved(
        **env,
        approval_id=request["approval_id"],
        outcome=str(state.outcome),
        grant=grant,
        grant_until=now + window * 1_000_000 if window else None,
        rule_id=request["rule_id"],
        deciders=[v.subject for v in state.votes if v.decision == deciding],
        reason=outcome_reason(state),
        requested_at=request["time"],
        kind=request["kind"],
        command_sha256=request["command_sha256"] if tool and grant == GRANT_ONE_TIME else "",
    )


def release_decision(state: ApprovalState, release: CallDecided, now: int) -> CallDecided:
    """The call's second decision, once the approval ended: ``allow`` (the held body goes to the
    forwarder), ``deny`` or ``expired`` (the call ends here). Its id derives from the call id, so
    publishing it again is the same event and the forwarder's claims keep it to one upstream call."""
    out = CallDecided(**release)
    out["event_id"] = events.derived_event_id(release["call_id"], "decided-after-approval")
    out["time"] = now
    out["approval_id"] = state.requested["approval_id"]
    reason = outcome_reason(state)
    if state.outcome == "approved":
        out["decision"] = "allow"
        out["reason"] = f"{reason}; first decision: {release['reason']}"
        out["status"] = 0
        out["error_type"] = None
        return out
    out["decision"] = "deny" if state.outcome == "denied" else "expired"
    out["reason"] = reason
    out["status"] = 403
    out["error_type"] = "permission_error"
    out["body"] = None
    return out


def ending_reply(state: ApprovalState, decided: CallDecided) -> CallReply | None:
    """The error a waiting caller gets when the approval was denied or expired."""
    if decided["reply_to"] is None or state.outcome == "approved":
        return None
    approval_id = state.requested["approval_id"]
    reply = events.error_reply(
        decided,
        decided["bundle_version"],
        status=403,
        message=f"{decided['reason']}; the call was not forwarded",
        error_type="permission_error",
        terminal_state="denied" if state.outcome == "denied" else "expired",
        retry=False,
    )
    reply["headers"]["x-skillgate-approval-id"] = approval_id
    reply["headers"]["x-skillgate-approval-state"] = str(state.outcome)
    return reply


def pending_reply(state: ApprovalState, release: CallDecided) -> CallReply | None:
    """A notice to the waiting ingress replica that its call is held (not an answer: the caller
    keeps waiting, up to the ingress's approval wait)."""
    if release["reply_to"] is None:
        return None
    request = state.requested
    return CallReply(
        **events.envelope(
            release["call_id"],
            release["session_id"],
            release["identity"],
            release["bundle_version"],
            event_id=events.derived_event_id(release["call_id"], "reply-approval-pending"),
        ),
        kind="approval_pending",
        seq=0,
        status=202,
        headers={"content-type": "application/json"},
        body=orjson.dumps(
            {
                "approval_id": request["approval_id"],
                "expires_at": request["expires_at"],
                "reason": request["reason"],
                "approver_groups": request["approver_groups"],
            }
        ),
        terminal_state=None,
    )


def expire_decision(state: ApprovalState, now: int) -> ApprovalDecided:
    """skillgate's own ``expire`` decision for an approval past its deadline (one id per approval,
    so several replicas or ticks asking at once are one event)."""
    request = state.requested
    env = events.envelope(
        request["call_id"],
        request["session_id"],
        events.anonymous_identity(),
        request["bundle_version"],
        event_id=events.derived_event_id(request["call_id"], f"approval-expire:{request['approval_id']}"),
    )
    env["time"] = now
    return ApprovalDecided(
        **env,
        approval_id=request["approval_id"],
        decision="expire",
        comment=None,
        grant=GRANT_ONE_TIME,
        window_seconds=None,
    )
