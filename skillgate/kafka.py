"""Kafka clients configured the way every skillgate service needs them.

Producers are idempotent with ``acks=all``: a service tells its caller (or commits its input) only
after the broker acknowledged the write. Consumers never auto-commit: each service commits offsets
only after the effect of a message is durable (DESIGN.md invariant 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Iterable
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, TopicPartition

from skillgate import events, topics
from skillgate.codec import AvroCodec, default_codec
from skillgate.config import KafkaSettings
from skillgate.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)


class PartitionOwner(Protocol):
    """Something that keeps per-partition state across consumer-group rebalances."""

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Partitions taken away (finish or hand over their work)."""

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Partitions given to this member."""


class RebalanceRelay(ConsumerRebalanceListener):  # type: ignore[misc]
    """An aiokafka rebalance listener that hands both events to a :class:`PartitionOwner`."""

    def __init__(self, owner: PartitionOwner) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._owner.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._owner.on_assigned(list(assigned))


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Connection arguments shared by producers, consumers and the admin client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    if settings.sasl_mechanism:
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return kwargs


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent, ``acks=all`` producer.

    ``linger_ms`` stays 0: aiokafka already batches whatever accumulates while a request is in
    flight, so a lone call is not delayed and a burst still goes out in few requests.
    """
    kwargs: dict[str, Any] = {
        **client_kwargs(settings),
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 0,
        "max_request_size": 64 * 1024 * 1024,
        "request_timeout_ms": 30000,
    }
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


def make_consumer(
    settings: KafkaSettings, group_id: str | None, *topic_names: str, **overrides: Any
) -> AIOKafkaConsumer:
    """A manually committing consumer tuned for low latency.

    ``fetch_max_wait_ms`` bounds how long the broker holds a fetch when nothing is there; data that
    arrives during the wait is returned at once (``fetch_min_bytes=1``), so it costs no latency.
    """
    kwargs: dict[str, Any] = {
        **client_kwargs(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": 100,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "max_partition_fetch_bytes": 16 * 1024 * 1024,
        "isolation_level": "read_uncommitted",
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(*topic_names, **kwargs)


def dead_letter_value(
    *,
    codec: AvroCodec,
    service: str,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    partial: dict[str, Any] | None = None,
) -> bytes:
    """The encoded DeadLetter event for a message a service gave up on.

    ``partial`` is whatever envelope the service could read (call id, identity), if any. The event
    id derives from the message's position, so dead-lettering it twice records it once.
    """
    raw = value or b""
    known = partial or {}
    identity = known.get("identity") or events.anonymous_identity()
    event = {
        **events.envelope(
            str(known.get("call_id") or ""),
            str(known.get("session_id") or ""),
            identity,
            known.get("bundle_version"),
            event_id=events.derived_event_id(f"{topic}/{partition}/{offset}", "deadletter"),
        ),
        "service": service,
        "reason": reason[:2000],
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "key": key,
        "value": raw,
        "value_sha256": hashlib.sha256(raw).hexdigest(),
    }
    return codec.encode(events.DEAD_LETTER, event)


class DeadLetterer:
    """Sends messages a service cannot process to the dead-letter topic, with the reason.

    A poison message must never block its partition (invariant 7): the service dead-letters it,
    then carries on and commits past it.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        settings: KafkaSettings,
        service: str,
        codec: AvroCodec | None = None,
    ) -> None:
        self._producer = producer
        self._topic = topics.name(settings, topics.DEADLETTER)
        self._service = service
        self._codec = codec or default_codec()

    async def send(
        self,
        record: ConsumerRecord[bytes, bytes],
        reason: str,
        partial: dict[str, Any] | None = None,
    ) -> None:
        """Dead-letter ``record`` and wait for the broker's ack."""
        value = dead_letter_value(
            codec=self._codec,
            service=self._service,
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            partial=partial,
        )
        await self._producer.send_and_wait(self._topic, value, key=record.key)
        DEAD_LETTERS.labels(self._service).inc()
        log.warning(
            "dead-lettered message",
            extra={
                "reason": reason[:500],
                "source_topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
        )


class OffsetTracker:
    """Per partition: offsets in flight, and the highest offset seen, for in-order commits.

    For consumers that process many messages at once (the forwarder's calls, the policy's
    decisions): a partition's offset is committed only up to the oldest message still in flight,
    so a crash redelivers exactly the unfinished work.
    """

    def __init__(self) -> None:
        self._in_flight: dict[TopicPartition, set[int]] = {}
        self._high: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        """Note that ``offset`` is being processed."""
        self._in_flight.setdefault(tp, set()).add(offset)
        self._high[tp] = max(self._high.get(tp, -1), offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        """Note that ``offset``'s effect is durable."""
        self._in_flight.get(tp, set()).discard(offset)

    def in_flight(self, tps: Iterable[TopicPartition] | None = None) -> int:
        """How many messages are in flight (in ``tps`` or overall)."""
        keys = self._in_flight.keys() if tps is None else tps
        return sum(len(self._in_flight.get(tp, ())) for tp in keys)

    def committable(self) -> dict[TopicPartition, int]:
        """Next offset to commit per partition, where it moved since the last commit."""
        out: dict[TopicPartition, int] = {}
        for tp, high in self._high.items():
            pending = self._in_flight.get(tp)
            nxt = min(pending) if pending else high + 1
            if nxt > self._committed.get(tp, -1):
                out[tp] = nxt
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Record a successful commit."""
        self._committed.update(offsets)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop state of partitions no longer owned."""
        for tp in tps:
            self._in_flight.pop(tp, None)
            self._high.pop(tp, None)
            self._committed.pop(tp, None)


async def stop_reader(task: asyncio.Task[None] | None, consumer: AIOKafkaConsumer | None) -> None:
    """Stop a background reading task, then close its consumer (either may be None)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if consumer is not None:
        await consumer.stop()
