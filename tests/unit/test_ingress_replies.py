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
        waiter.orphan()
        orphaned = await waiter.next(5.0)
        return [first["kind"], second["kind"], timed_out, left, orphaned, len(waiter.replies)]

    assert asyncio.run(scenario()) == ["approval_pending", "response", None, None, None, 0]


def test_a_reply_that_arrives_with_the_orphan_signal_is_not_dropped() -> None:
    """The partition moving away and the answer arriving at once: the answer wins, and nothing
    taken off the queue is lost."""

    async def scenario() -> CallReply | None:
        waiter = Waiter("c", 0)
        waiter.orphan()
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


def test_the_caller_leaving_with_a_reply_in_the_same_turn_does_not_end_the_next_wait() -> None:
    """A reply and the disconnect in one turn of the loop: the reply is returned, and the
    disconnect's callback, already queued by then, must not cut the next wait short (the
    handler waits again at once, e.g. for an approval, as StreamCall.run does)."""

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        waiter = Waiter("c", 0)
        gone: asyncio.Future[None] = loop.create_future()

        def both() -> None:
            waiter.put(_reply("approval_pending"))
            gone.set_result(None)

        loop.call_soon(both)
        first = await waiter.next(60.0, gone)
        loop.call_later(0.05, waiter.put, _reply())  # the decision, a little later
        second = await waiter.next(60.0)  # waits again in the same step: no `gone` any more
        return [first["kind"] if first else None, second["kind"] if second else None]

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == ["approval_pending", "response"]


def test_a_reply_already_there_is_returned_without_waiting_even_with_no_time_left() -> None:
    async def scenario() -> list[Any]:
        waiter = Waiter("c", 0)
        waiter.put(_reply())
        got = await waiter.next(0.0)
        return [got["kind"] if got else None, await waiter.next(-1.0)]

    assert asyncio.run(scenario()) == ["response", None]


def test_one_wait_at_a_time() -> None:
    async def scenario() -> str:
        waiter = Waiter("c", 0)
        first = asyncio.ensure_future(waiter.next(60.0))
        await asyncio.sleep(0)  # one turn: the first wait begins
        try:
            await waiter.next(60.0)
        except RuntimeError as exc:
            return str(exc)
        finally:
            first.cancel()
        return "no error"

    assert "already being waited for" in asyncio.run(scenario())
