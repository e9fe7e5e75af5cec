"""Waiting for a call's replies in the ingress (``replies.Waiter.next``)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from services.ingress.replies import Waiter
from skillgate.events import CallReply


def _reply(kind: str = "response") -> CallReply:
    return cast(CallReply, {"call_id": "c", "kind": kind, "seq": 0})


def test_next_returns_replies_in_order_and_none_on_timeout_orphan_or_departure() -> None:
    async def scenario() -> list[Any]:
        waiter = Waiter("c", 0)
        waiter.queue.put_nowait(_reply("approval_pending"))
        waiter.queue.put_nowait(_reply())
        first, second = await waiter.next(1.0), await waiter.next(1.0)
        assert first is not None and second is not None
        timed_out = await waiter.next(0.01)
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        gone.set_result(None)
        left = await waiter.next(5.0, gone)
        waiter.orphaned.set()
        orphaned = await waiter.next(5.0)
        return [first["kind"], second["kind"], timed_out, left, orphaned, waiter.queue.qsize()]

    assert asyncio.run(scenario()) == ["approval_pending", "response", None, None, None, 0]


def test_a_reply_that_arrives_with_the_orphan_signal_is_not_dropped() -> None:
    """The partition moving away and the answer arriving at once: the answer wins, and nothing
    taken off the queue is lost."""

    async def scenario() -> CallReply | None:
        waiter = Waiter("c", 0)
        waiter.orphaned.set()
        waiter.queue.put_nowait(_reply())
        return await waiter.next(5.0)

    got = asyncio.run(scenario())
    assert got is not None and got["kind"] == "response"
