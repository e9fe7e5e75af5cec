"""Routing answers to the ingress replica whose caller is waiting.

How it works: the replies topic has many partitions; ingress replicas share them through a Kafka
consumer group, so each partition is read by exactly one replica. When a replica accepts a sync
call it writes one of *its own* partitions into the event (``reply_to``); the forwarder (or the
policy, for denials) produces the answer to exactly that partition. So each replica reads only
the replies meant for it, however many replicas run, and streamed chunks (ordered within one
partition) follow the same path.

When the group rebalances (a replica joins or leaves), a partition may move away while a caller
waits on it. Those waiters are told (:meth:`Waiter.orphan`) and fall back to polling the call's
recorded state, so the answer is still delivered, only later.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from prometheus_client import Counter

from skillgate import topics
from skillgate.codec import CodecError, default_codec
from skillgate.config import KafkaSettings
from skillgate.errors import GatewayError
from skillgate.events import CALL_REPLY, CallReply, ReplyTo
from skillgate.kafka import RebalanceRelay, make_consumer, stop_reader

log = logging.getLogger(__name__)

UNCLAIMED = Counter(
    "skillgate_ingress_unclaimed_replies_total",
    "Answers no waiting caller took (caller gone, or its partition moved in a rebalance)",
)


class Waiter:
    """Replies for one call, in arrival order (several chunks when streaming), and an orphan flag.

    One future per wait, resolved by whichever comes first (a reply, the orphan signal, the
    timeout, the caller leaving), rather than a queue and a task per wait: a streamed answer is
    dozens of replies, and each task and wake-up the event loop schedules delays the first byte
    and costs CPU on every chunk.
    """

    __slots__ = ("_wake", "call_id", "orphaned", "partition", "replies")

    def __init__(self, call_id: str, partition: int) -> None:
        self.call_id = call_id
        self.partition = partition
        #: Replies not yet taken by :meth:`next`.
        self.replies: deque[CallReply] = deque()
        #: Set once the reply partition moved to another replica (set it with :meth:`orphan`,
        #: which also ends a wait in progress).
        self.orphaned = asyncio.Event()
        self._wake: asyncio.Future[None] | None = None

    def put(self, reply: CallReply) -> None:
        """Hand a reply to the call (from the router) and wake its wait, if any."""
        self.replies.append(reply)
        self._resume()

    def orphan(self) -> None:
        """The reply partition moved away: a wait in progress ends now."""
        self.orphaned.set()
        self._resume()

    def _resume(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def next(self, within: float, gone: asyncio.Future[None] | None = None) -> CallReply | None:
        """The next reply; None after ``within`` seconds, once the reply partition moved away
        (:attr:`orphaned`), or once ``gone`` completes (the caller left). A reply that is
        already there is returned first, whatever else happened. One wait at a time."""
        if self._wake is not None:
            raise RuntimeError(f"call {self.call_id} is already being waited for")
        if (
            not self.replies
            and not self.orphaned.is_set()
            and within > 0
            and not (gone is not None and gone.done())
        ):
            loop = asyncio.get_running_loop()
            wake = self._wake = loop.create_future()

            # The timer and the caller leaving end this wait only: a callback already queued
            # when this wait ends must not end the next one.
            def resume(_: object = None) -> None:
                if not wake.done():
                    wake.set_result(None)

            timer = loop.call_later(within, resume)
            if gone is not None:
                gone.add_done_callback(resume)
            try:
                await wake
            finally:
                self._wake = None
                timer.cancel()
                if gone is not None:
                    gone.remove_done_callback(resume)
        return self.replies.popleft() if self.replies else None


class ReplyRouter:
    """Owns this replica's share of the replies topic and dispatches answers to waiters."""

    def __init__(self, settings: KafkaSettings, group_id: str, instance_id: str) -> None:
        self._settings = settings
        self._topic = topics.name(settings, topics.REPLIES)
        self._group = group_id
        self._instance = instance_id
        self._codec = default_codec()
        self._owned: list[int] = []
        self._cycle: itertools.cycle[int] | None = None
        self._waiters: dict[str, Waiter] = {}
        self._assigned = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Reply partitions given to this replica: new calls may name them."""
        partitions = {tp.partition for tp in assigned}
        self._owned = sorted(set(self._owned) | partitions)
        self._cycle = itertools.cycle(self._owned) if self._owned else None
        if self._owned:
            self._assigned.set()
        log.info("reply partitions assigned", extra={"partitions": self._owned})

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Reply partitions taken away: the calls waiting on them are orphaned."""
        partitions = {tp.partition for tp in revoked}
        self._owned = [p for p in self._owned if p not in partitions]
        self._cycle = itertools.cycle(self._owned) if self._owned else None
        if not self._owned:
            self._assigned.clear()
        for waiter in self._waiters.values():
            if waiter.partition in partitions:
                waiter.orphan()

    async def start(self, wait_seconds: float = 60.0) -> None:
        """Join the group and wait until this replica owns at least one reply partition."""
        self._consumer = make_consumer(
            self._settings,
            self._group,
            auto_offset_reset="latest",
            fetch_max_wait_ms=50,
        )
        await self._consumer.start()
        self._consumer.subscribe([self._topic], listener=RebalanceRelay(self))
        self._task = asyncio.create_task(self._run(), name="reply-router")
        await asyncio.wait_for(self._assigned.wait(), wait_seconds)

    async def stop(self) -> None:
        """Leave the group (its partitions move to the other replicas at once)."""
        await stop_reader(self._task, self._consumer)

    @property
    def ready(self) -> bool:
        """True while this replica owns reply partitions (and so can take sync calls)."""
        return bool(self._owned)

    def register(self, call_id: str) -> tuple[Waiter, ReplyTo]:
        """Register a waiter before publishing the call, so even an instant answer is caught."""
        if self._cycle is None:
            # Between a revocation and the next assignment (a replica joined or left).
            raise GatewayError(
                503,
                "skillgate is rebalancing its reply channels; retry in a moment",
                headers={"retry-after": "1"},
            )
        partition = next(self._cycle)
        waiter = Waiter(call_id, partition)
        self._waiters[call_id] = waiter
        return waiter, ReplyTo(topic=self._topic, partition=partition, instance=self._instance)

    def unregister(self, call_id: str) -> None:
        """Forget a waiter (answered, timed out or disconnected)."""
        self._waiters.pop(call_id, None)

    async def _run(self) -> None:
        assert self._consumer is not None
        backoff = 0.1
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=1000, max_records=1000)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Kafka trouble must not end the loop silently (every waiting caller would hang
                # until its timeout); keep trying, and say so.
                log.exception("reading replies failed; retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            for records in batches.values():
                for record in records:
                    self._dispatch(record.value)

    def _dispatch(self, value: Any) -> None:
        try:
            _, reply = self._codec.decode(value, expected=CALL_REPLY)
        except CodecError as exc:
            log.warning("unreadable reply skipped", extra={"error": str(exc)})
            return
        waiter = self._waiters.get(reply["call_id"])
        if waiter is None:
            # The caller gave up or this partition changed hands; the call's outcome is
            # recorded anyway (calls.completed / calls.failed).
            UNCLAIMED.inc()
            return
        waiter.put(reply)  # type: ignore[arg-type]
