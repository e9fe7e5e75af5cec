"""The ingress's approval inbox without Kafka: folding events, states, visibility, waiting."""

from __future__ import annotations

import asyncio

import orjson

from services.ingress.approvals import ApprovalBook, request_matches, visible_to
from services.policy import approvals
from skillgate import events, topics
from skillgate.events import ApprovalDecided
from skillgate.policy.bundle import ApprovalSpec
from skillgate.policy.engine import Verdict
from tests import factories

BOB = factories.identity(subject="bob", username="bob", groups=["approvers"])
EVE = factories.identity(subject="eve", username="eve", groups=["eng"])


def _request(timeout: int = 600) -> events.ApprovalRequested:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hold me"}]})
    submitted = factories.call_submitted(body=body)
    verdict = Verdict(decision="require_approval", reason="r", approval=ApprovalSpec(timeout_seconds=timeout))
    return approvals.approval_request(submitted, "b@1", verdict)


def _decided(request: events.ApprovalRequested, who: events.Identity) -> ApprovalDecided:
    return ApprovalDecided(
        **events.envelope(request["call_id"], request["session_id"], who, "b@1"),
        approval_id=request["approval_id"],
        decision="approve",
        comment=None,
        grant="one_time",
        window_seconds=None,
    )


async def test_decisions_read_before_their_request_are_kept() -> None:
    book = ApprovalBook()
    request = _request()
    book.on_event(topics.APPROVALS_DECIDED, events.APPROVAL_DECIDED, _decided(request, BOB))
    assert book.get(request["approval_id"]) is None
    book.on_event(topics.APPROVALS_REQUESTED, events.APPROVAL_REQUESTED, request)
    view = book.get(request["approval_id"])
    assert view is not None and view.decided_by("bob") and view.state(events.now_micros()) == "pending"
    assert book.by_call[request["call_id"]] == request["approval_id"]
    # A redelivered decision is one decision.
    book.on_event(topics.APPROVALS_DECIDED, events.APPROVAL_DECIDED, view.decisions[0])
    assert len(view.decisions) == 1


async def test_past_its_deadline_an_approval_reads_expired() -> None:
    book = ApprovalBook()
    request = _request(timeout=1)
    book.on_event(topics.APPROVALS_REQUESTED, events.APPROVAL_REQUESTED, request)
    view = book.get(request["approval_id"])
    assert view is not None and view.state(request["expires_at"]) == "expired"
    assert view.document(request["expires_at"], BOB)["can_decide"] is False


async def test_visibility_and_request_digest() -> None:
    book = ApprovalBook()
    request = _request()
    book.on_event(topics.APPROVALS_REQUESTED, events.APPROVAL_REQUESTED, request)
    view = book.get(request["approval_id"])
    assert view is not None
    assert visible_to(view, BOB, admin=False) and not visible_to(view, EVE, admin=False)
    assert visible_to(view, EVE, admin=True)
    sent = factories.call_submitted()["body"]
    assert request_matches(request, sent) is False


async def test_wait_for_wakes_on_the_event_it_waits_for() -> None:
    book = ApprovalBook()
    request = _request()

    async def later() -> None:
        await asyncio.sleep(0)  # let the waiter start first
        book.on_event(topics.APPROVALS_REQUESTED, events.APPROVAL_REQUESTED, request)

    task = asyncio.create_task(later())
    assert await book.wait_for(lambda: book.get(request["approval_id"]) is not None, 5.0)
    await task
    assert not await book.wait_for(lambda: False, 0.01)
