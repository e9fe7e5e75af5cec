"""Follow whole topics from their beginning into in-memory state (no consumer group, no commits).

For small, human-scale topics that every replica must see completely: the approval requests,
decisions and outcomes. Each replica reads every partition from the earliest retained offset and
hands each decoded event to a callback, so a restarted replica rebuilds its view from Kafka alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from skillgate import topics
from skillgate.codec import AvroCodec, CodecError, default_codec
from skillgate.config import KafkaSettings
from skillgate.kafka import make_consumer, stop_reader

log = logging.getLogger(__name__)

#: Called with (topic suffix, event name, event) for every readable event.
EventCallback = Callable[[str, str, Mapping[str, Any]], None]


class TopicFollower:
    """Reads ``suffixes`` (topic suffixes such as ``approvals.requested``) into ``on_event``.

    :meth:`wait_caught_up` returns once everything present at :meth:`start` was handed over, so
    a service can answer from a complete view. An undecodable message is logged and skipped (its
    writer dead-letters nothing here: this is a reader of events others own).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        suffixes: Iterable[str],
        on_event: EventCallback,
        *,
        codec: AvroCodec | None = None,
        poll_timeout_ms: int = 200,
    ) -> None:
        self._kafka = kafka
        self._suffix = {topics.name(kafka, s): s for s in suffixes}
        self._on_event = on_event
        self._codec = codec or default_codec()
        self._poll_timeout_ms = poll_timeout_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._end_at_start: dict[TopicPartition, int] = {}
        self._caught_up = asyncio.Event()

    @property
    def caught_up(self) -> bool:
        """Whether everything present at start has been handed to the callback."""
        return self._caught_up.is_set()

    async def start(self) -> None:
        """Assign every partition of the topics from the beginning and start reading.

        Raises Kafka's error if the broker cannot be reached; once started, errors are retried.
        """
        consumer = make_consumer(self._kafka, None, fetch_max_wait_ms=self._poll_timeout_ms)
        await consumer.start()
        try:
            # consumer.topics() would not update the client's own metadata, so ask directly.
            cluster = await consumer._client.fetch_all_metadata()
            parts = [
                TopicPartition(topic, p)
                for topic in self._suffix
                for p in sorted(cluster.partitions_for_topic(topic) or ())
            ]
            missing = [t for t in self._suffix if not cluster.partitions_for_topic(t)]
            if missing:
                log.warning("topics to follow do not exist (yet)", extra={"topics": missing})
            consumer.assign(parts)
            if parts:
                await consumer.seek_to_beginning(*parts)
            self._end_at_start = dict(await consumer.end_offsets(parts)) if parts else {}
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name="topic-follower")

    async def wait_caught_up(self) -> None:
        """Wait until caught up; bound it with ``asyncio.timeout`` (it waits while Kafka is down)."""
        await self._caught_up.wait()

    async def _check_caught_up(self) -> None:
        assert self._consumer is not None
        for tp, end in self._end_at_start.items():
            if await self._consumer.position(tp) < end:
                return
        self._caught_up.set()

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        backoff = 0.1
        while True:
            try:
                if not self._caught_up.is_set():
                    await self._check_caught_up()
                batches = await consumer.getmany(timeout_ms=self._poll_timeout_ms)
                backoff = 0.1
            except Exception as exc:  # Kafka errors and anything else: retry, never die
                log.warning(
                    "reading topics failed; retrying", extra={"error": f"{type(exc).__name__}: {exc}"}
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for tp, messages in batches.items():
                suffix = self._suffix.get(tp.topic, "")
                for message in messages:
                    self._hand_over(suffix, message.value)

    def _hand_over(self, suffix: str, value: bytes | None) -> None:
        if value is None:
            return
        try:
            name, event = self._codec.decode(value, topics.EVENT_OF_TOPIC.get(suffix))
        except CodecError as exc:
            log.warning("skipped an unreadable event", extra={"topic": suffix, "error": str(exc)})
            return
        try:
            self._on_event(suffix, name, event)
        except Exception:
            log.exception("event handler failed", extra={"topic": suffix})

    async def stop(self) -> None:
        """Stop reading and close the consumer."""
        await stop_reader(self._task, self._consumer)
