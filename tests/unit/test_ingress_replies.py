"""Waiting for a call's replies in the ingress (``replies.Waiter.next``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

from services.ingress.replies import Waiter
from skillgate.events import CallReply


def _reply(kind: str = "response") -> CallReply:
    return cast(CallReply, {"call_id": "c", "kind": kind, "seq": 0})


def test_next_returns_replies_in_order_and_none_on_timeout_orphan_or_departure() -> None:
    async def scenario() -> list[Any]:
        waiter = Waiter("c", 0)
        waiter.put(_reply("approval_pending"))
        waiter.put(_reply())
        first, second = await waiter.next(1.0), await waiter.next(1.0)
        assert first is not None and second is not None
        timed_out = await waiter.next(0.01)
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        gone.set_result(None)
        left = await waiter.next(5.0, gone)
        waiter.orphaned.set()
        orphaned = await waiter.next(5.0)
        return [first["kind"], second["kind"], timed_out, left, orphaned, len(waiter.replies)]

    assert asyncio.run(scenario()) == ["approval_pending", "response", None, None, None, 0]


def test_a_reply_that_arrives_with_the_orphan_signal_is_not_dropped() -> None:
    """The partition moving away and the answer arriving at once: the answer wins, and nothing
    taken off the queue is lost."""

    async def scenario() -> CallReply | None:
        waiter = Waiter("c", 0)
        waiter.orphaned.set()
        waiter.put(_reply())
        return await waiter.next(5.0)

    got = asyncio.run(scenario())
    assert got is not None and got["kind"] == "response"


def test_a_wait_in_progress_ends_with_a_reply_the_orphan_signal_or_the_caller_leaving() -> None:
    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        waiter = Waiter("c", 0)
        outcomes: list[Any] = []
        # Each wait is long; what ends it comes from elsewhere once the wait has begun.
        loop.call_soon(waiter.put, _reply("chunk"))
        got = await waiter.next(60.0)
        outcomes.append(got["kind"] if got else None)
        gone: asyncio.Future[None] = loop.create_future()
        loop.call_soon(gone.set_result, None)
        outcomes.append(await waiter.next(60.0, gone))
        loop.call_soon(waiter.orphan)
        outcomes.append(await waiter.next(60.0))
        return outcomes

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == ["chunk", None, None]


def test_a_cancelled_wait_loses_no_reply_and_leaves_nothing_behind() -> None:
    async def scenario() -> list[Any]:
        waiter = Waiter("c", 0)
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        first = asyncio.ensure_future(waiter.next(60.0, gone))
        await asyncio.sleep(0)  # one turn of the loop: the task runs up to its wait
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        second = asyncio.ensure_future(waiter.next(60.0))
        await asyncio.sleep(0)
        gone.set_result(None)  # the cancelled wait's caller leaving must not end this wait
        for _ in range(3):
            await asyncio.sleep(0)
        ended_early = second.done()
        waiter.put(_reply("chunk"))
        got = await asyncio.wait_for(second, 5)
        return [first.cancelled(), ended_early, got["kind"] if got else None, len(waiter.replies)]

    assert asyncio.run(scenario()) == [True, False, "chunk", 0]
