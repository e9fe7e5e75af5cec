"""Approvals on the ingress: the approvers' inbox and decisions, and what a held caller is told.

Every ingress replica follows approvals.requested / approvals.decided / approvals.resolved from
their beginning into an :class:`ApprovalBook` (approvals are human-scale), so any replica can list
and check approvals without a database. A decision is checked here for a clear answer (role,
routing to the approver's groups, separation of duties, state, a second decision by the same
person) and then published to approvals.decided; the policy service judges it again, in order
with every other decision on the approval, and is the one that releases, denies or expires the
call — so two approvers clicking at once, a redelivered decision or a stale replica never cause
a second release.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from skillgate import events, topics
from skillgate.errors import GatewayError
from skillgate.events import (
    APPROVAL_DECIDED,
    ApprovalDecided,
    ApprovalRequested,
    ApprovalResolved,
    Identity,
)
from skillgate.identity import Role, roles_for
from skillgate.policy.quorum import quorum_met

#: States an approval can be in, as the API shows them.
STATES = ("pending", "approved", "denied", "expired")


@dataclass
class ApprovalView:
    """Everything known about one approval."""

    request: ApprovalRequested
    decisions: list[ApprovalDecided] = field(default_factory=list)
    resolved: ApprovalResolved | None = None

    def state(self, now: int) -> str:
        """``pending``, ``approved``, ``denied`` or ``expired`` (past its deadline counts as
        expired at once, even before the policy service has recorded it)."""
        if self.resolved is not None:
            return self.resolved["outcome"]
        return "expired" if now >= self.request["expires_at"] else "pending"

    def decided_by(self, subject: str) -> bool:
        """Whether ``subject`` already decided on it."""
        return any(d["identity"]["subject"] == subject for d in self.decisions if d["decision"] != "expire")

    def document(self, now: int, viewer: Identity | None = None) -> dict[str, Any]:
        """The API's JSON form."""
        r = self.request
        ident = r["identity"]
        doc: dict[str, Any] = {
            "id": r["approval_id"],
            "type": "approval",
            "kind": r["kind"],
            "tool": r["tool"] or None,
            "state": self.state(now),
            "call_id": r["call_id"],
            "session_id": r["session_id"],
            "requester": {
                "subject": ident["subject"],
                "username": ident["username"],
                "email": ident["email"],
                "groups": ident["groups"],
                "client_id": ident["client_id"],
            },
            "model": r["model"],
            "skills": r["skills"],
            "tools": r["tools"],
            "estimated_tokens": r["estimated_tokens"],
            "rule_ids": r["rule_ids"],
            "rule_id": r["rule_id"],
            "reason": r["reason"],
            "summary": r["summary"],
            "excerpt": r["excerpt"],
            "approver_groups": r["approver_groups"],
            "quorum": r["quorum"],
            "each_group": r["each_group"],
            "max_window_seconds": r["max_window_seconds"],
            "bundle_version": r["bundle_version"],
            "requested_at": _iso(r["time"]),
            "expires_at": _iso(r["expires_at"]),
            "decisions": [
                {
                    "decision": d["decision"],
                    "by": d["identity"]["username"] or d["identity"]["subject"],
                    "subject": d["identity"]["subject"],
                    "comment": d["comment"],
                    "grant": d["grant"],
                    "window_seconds": d.get("window_seconds"),
                    "at": _iso(d["time"]),
                }
                for d in self.decisions
            ],
            "outcome": None,
        }
        if self.resolved is not None:
            res = self.resolved
            doc["outcome"] = {
                "outcome": res["outcome"],
                "reason": res["reason"],
                "grant": res["grant"],
                "grant_until": _iso(res["grant_until"]) if res["grant_until"] else None,
                "deciders": res["deciders"],
                "at": _iso(res["time"]),
            }
        if viewer is not None:
            doc["can_decide"] = doc["state"] == "pending" and ident["subject"] != viewer["subject"]
        return doc


def _iso(micros: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(micros / 1e6)) + f".{micros % 1_000_000:06d}Z"


class ApprovalBook:
    """Approvals by id (and by call), fed by a :class:`skillgate.follow.TopicFollower`."""

    SUFFIXES = (topics.APPROVALS_REQUESTED, topics.APPROVALS_DECIDED, topics.APPROVALS_RESOLVED)

    def __init__(self) -> None:
        self.by_id: dict[str, ApprovalView] = {}
        self.by_call: dict[str, str] = {}
        self._early: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
        # Set and replaced on every change: a waiter re-checks its condition each time.
        self._changed = asyncio.Event()

    def on_event(self, suffix: str, name: str, event: Mapping[str, Any]) -> None:
        """Apply one event (decisions may be read before their request: they wait for it)."""
        approval_id = str(event.get("approval_id") or "")
        if suffix == topics.APPROVALS_REQUESTED:
            request: ApprovalRequested = event  # type: ignore[assignment]
            if approval_id not in self.by_id:
                self.by_id[approval_id] = ApprovalView(request)
                self.by_call[request["call_id"]] = approval_id
                for early_suffix, early in self._early.pop(approval_id, []):
                    self.on_event(early_suffix, name, early)
        else:
            view = self.by_id.get(approval_id)
            if view is None:
                self._early.setdefault(approval_id, []).append((suffix, event))
                return
            if suffix == topics.APPROVALS_DECIDED:
                decided: ApprovalDecided = event  # type: ignore[assignment]
                if all(d["event_id"] != decided["event_id"] for d in view.decisions):
                    view.decisions.append(decided)
            elif suffix == topics.APPROVALS_RESOLVED:
                view.resolved = event  # type: ignore[assignment]
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[], bool], within: float) -> bool:
        """Wait until ``predicate()`` holds (re-checked on every change) or ``within`` seconds pass."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not predicate():
                    await self._changed.wait()
        return predicate()

    def get(self, approval_id: str) -> ApprovalView | None:
        """The approval, if known."""
        return self.by_id.get(approval_id)


def visible_to(view: ApprovalView, identity: Identity, admin: bool) -> bool:
    """Approvers see requests routed to their groups; admins see all."""
    return admin or bool(set(identity["groups"]).intersection(view.request["approver_groups"]))


def request_matches(request: ApprovalRequested, body: bytes) -> bool | None:
    """Whether ``body`` is the request the approval is for (None: the request names no digest)."""
    if not request["request_sha256"]:
        return None
    return events.request_digest(body) == request["request_sha256"]


def pending_error(approval_id: str, reason: str, approvals_url: str, call_id: str) -> GatewayError:
    """The 403 a caller gets while its call waits for approval: the approval id, where to
    decide, how to retry, and headers that keep the SDKs from retrying on their own."""
    return GatewayError(
        403,
        pending_message(approval_id, reason, approvals_url),
        error_type="permission_error",
        headers={
            "x-skillgate-approval-id": approval_id,
            "x-skillgate-approval-state": "pending",
            "x-skillgate-call-id": call_id,
            "x-should-retry": "false",
        },
    )


def pending_message(approval_id: str, reason: str, approvals_url: str) -> str:
    """What a caller whose call still waits for approval is told: the id, where, how to retry."""
    return (
        f"this call is waiting for a human's approval ({reason}); approval id {approval_id}. An "
        f"approver can decide at {approvals_url.rstrip('/')}/v1/approvals/{approval_id}. Once approved, "
        f"send the same request again with header `x-skillgate-approval: {approval_id}` to get its result."
    )


def create_router(deps_dependency: Any, authenticated: Any) -> APIRouter:
    """The ``/v1/approvals`` routes (dependencies come from the app, which owns them)."""
    router = APIRouter()

    def _approver(identity: Identity, deps: Any) -> bool:
        roles = roles_for(identity, deps.roles)
        if Role.APPROVER not in roles:
            raise GatewayError(
                403, "your identity lacks the `approver` role needed to see or decide approvals"
            )
        return Role.ADMIN in roles

    @router.get("/v1/approvals")
    async def list_approvals(
        identity: Annotated[Identity, Depends(authenticated)],
        deps: Annotated[Any, Depends(deps_dependency)],
        state: Annotated[str, Query(pattern=f"^({'|'.join((*STATES, 'all'))})$")] = "pending",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        """Approvals routed to the caller's groups, newest first, by state (default: pending)."""
        admin = _approver(identity, deps)
        now = events.now_micros()
        book: ApprovalBook = deps.book
        views = [
            v
            for v in book.by_id.values()
            if visible_to(v, identity, admin) and (state == "all" or v.state(now) == state)
        ]
        views.sort(key=lambda v: v.request["time"], reverse=True)
        data = [v.document(now, identity) for v in views[:limit]]
        return Response(
            content=orjson.dumps({"data": data, "has_more": len(views) > limit}),
            media_type="application/json",
        )

    @router.get("/v1/approvals/{approval_id}")
    async def get_approval(
        approval_id: str,
        identity: Annotated[Identity, Depends(authenticated)],
        deps: Annotated[Any, Depends(deps_dependency)],
    ) -> Response:
        """One approval: for approvers it is routed to, and for the requester (to follow it)."""
        view = deps.book.get(approval_id)
        roles = roles_for(identity, deps.roles)
        mine = view is not None and view.request["identity"]["subject"] == identity["subject"]
        if view is None or not (
            mine or (Role.APPROVER in roles and visible_to(view, identity, Role.ADMIN in roles))
        ):
            raise GatewayError(404, f"no approval {approval_id} that you may see")
        return Response(
            content=orjson.dumps(view.document(events.now_micros(), identity)),
            media_type="application/json",
        )

    async def _decide(
        approval_id: str, decision: str, request: Request, identity: Identity, deps: Any
    ) -> Response:
        admin = _approver(identity, deps)
        body = await request.body()
        try:
            options = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            raise GatewayError(
                400, 'the body must be JSON: {"comment": ..., "grant": ..., "window_minutes": ...}'
            ) from None
        if not isinstance(options, dict):
            raise GatewayError(400, "the body must be a JSON object")
        comment = options.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise GatewayError(400, "comment: must be a string")
        grant = options.get("grant", "one_time")
        window_minutes = options.get("window_minutes")
        book: ApprovalBook = deps.book
        view = book.get(approval_id)
        if view is None or not visible_to(view, identity, admin):
            raise GatewayError(404, f"no approval {approval_id} routed to your groups")
        request_ = view.request
        if request_["identity"]["subject"] == identity["subject"]:
            raise GatewayError(403, "separation of duties: you cannot decide on your own call")
        now = events.now_micros()
        state = view.state(now)
        if state != "pending":
            raise GatewayError(409, f"approval {approval_id} is already {state}; nothing was changed")
        if view.decided_by(identity["subject"]):
            raise GatewayError(409, f"you already decided on approval {approval_id}; nothing was changed")
        window_seconds: int | None = None
        if decision == "approve":
            if grant not in ("one_time", "time_window"):
                raise GatewayError(400, "grant: must be `one_time` or `time_window`")
            if grant == "time_window":
                cap = request_["max_window_seconds"]
                if cap <= 0:
                    raise GatewayError(400, "the rule of this approval allows one-time grants only")
                if (
                    not isinstance(window_minutes, int)
                    or isinstance(window_minutes, bool)
                    or window_minutes < 1
                ):
                    raise GatewayError(
                        400, "window_minutes: a positive integer is required for a time-window grant"
                    )
                window_seconds = window_minutes * 60
                if window_seconds > cap:
                    raise GatewayError(400, f"window_minutes: at most {cap // 60} for this rule")
        else:
            grant = "one_time"
        decided = ApprovalDecided(
            **events.envelope(
                request_["call_id"], request_["session_id"], identity, request_["bundle_version"]
            ),
            approval_id=approval_id,
            decision=decision,
            comment=comment[:2000] if comment else None,
            grant=grant,
            window_seconds=window_seconds,
        )
        try:
            await deps.producer.send_and_wait(
                deps.approvals_decided_topic,
                deps.codec.encode(APPROVAL_DECIDED, decided),
                key=approval_id.encode(),
            )
        except Exception as exc:
            raise GatewayError(
                503, "skillgate could not record the decision (Kafka unavailable); retry"
            ) from exc
        # Answer with the state after the policy service judged it (usually milliseconds): when
        # this decision ends the approval, wait for the outcome; if that takes longer than the
        # wait, the decision is recorded anyway and the answer still says pending.
        approvals = [
            (d["identity"]["subject"], d["identity"]["groups"])
            for d in [*view.decisions, decided]
            if d["decision"] == "approve"
        ]
        ends = decision == "deny" or quorum_met(
            request_["quorum"], request_["approver_groups"], request_["each_group"], approvals
        )
        await book.wait_for(
            lambda: (
                view.resolved is not None
                or (not ends and any(d["event_id"] == decided["event_id"] for d in view.decisions))
            ),
            deps.settings.approval_decision_wait_seconds,
        )
        return Response(
            content=orjson.dumps(view.document(events.now_micros(), identity)),
            media_type="application/json",
        )

    @router.post("/v1/approvals/{approval_id}/approve")
    async def approve(
        approval_id: str,
        request: Request,
        identity: Annotated[Identity, Depends(authenticated)],
        deps: Annotated[Any, Depends(deps_dependency)],
    ) -> Response:
        """Approve (body, optional: ``comment``, ``grant`` one_time|time_window, ``window_minutes``)."""
        return await _decide(approval_id, "approve", request, identity, deps)

    @router.post("/v1/approvals/{approval_id}/deny")
    async def deny(
        approval_id: str,
        request: Request,
        identity: Annotated[Identity, Depends(authenticated)],
        deps: Annotated[Any, Depends(deps_dependency)],
    ) -> Response:
        """Deny (body, optional: ``comment``)."""
        return await _decide(approval_id, "deny", request, identity, deps)

    return router
