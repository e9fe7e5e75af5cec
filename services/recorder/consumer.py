"""The recorder's batching loop: every skillgate topic → ClickHouse, then commit.

The model is Sentry's arroyo/snuba consumers: accumulate messages until ``batch_max_events``,
or until the oldest is ``batch_max_seconds`` old (``batch_early_seconds`` once the batch holds
``batch_early_events`` events to store, see :meth:`RecorderConsumer._due`), insert the batch in
one statement per table, and only then commit the offsets (DESIGN.md invariant 5: nothing
acknowledged is lost). Inserts are idempotent on the event id, so the at-least-once redelivery
that follows a crash between insert and commit never duplicates a record. Like arroyo's pipelined
steps, the next batch is decoded and prepared while the previous one is being written; offsets
are still committed in order, each after its own write.

* A value that is not a skillgate event (``CodecError``), or one the recorder cannot turn into
  rows, goes to the dead-letter topic with the reason; the offset is committed past it, so it
  never blocks its partition (invariant 7). The dead-letter event then comes back through the
  ``deadletter`` topic and is recorded like any other event (without the raw value).
* When ClickHouse is unavailable the batch is retried with exponential backoff and nothing is
  committed. Consumption is paused meanwhile, but ``getmany`` keeps being called so the group
  does not evict this member for exceeding ``max_poll_interval_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from clickhouse_connect.driver.exceptions import DataError
from prometheus_client import Counter, Gauge, Histogram

from services.recorder.alignment import TimeAlignedBuffer
from services.recorder.config import RecorderSettings
from services.recorder.handlers import SourceRecord
from services.recorder.store import AuditStore, InsertStats, PreparedBatch
from skillgate import events, topics
from skillgate.codec import AvroCodec, CodecError, default_codec
from skillgate.config import KafkaSettings
from skillgate.kafka import DeadLetterer, make_consumer, make_producer
from skillgate.metrics import DEAD_LETTERS, EVENTS_CONSUMED, LATENCY_BUCKETS

log = logging.getLogger(__name__)

SERVICE = "recorder"
T = TypeVar("T")
#: A consumed Kafka message (aiokafka ships no type information, so this is Any to mypy).
Message: TypeAlias = ConsumerRecord

EVENTS_INSERTED = Counter(
    "skillgate_recorder_events_inserted_total",
    "Events stored in the audit store (redelivered duplicates excluded)",
    ["topic"],
)
DUPLICATES = Counter(
    "skillgate_recorder_duplicates_total", "Redelivered events skipped because already stored"
)
BATCH_SIZE = Histogram(
    "skillgate_recorder_batch_size",
    "Messages per insert batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 7500, 10000, 15000, 20000, 50000),
)
INSERT_SECONDS = Histogram(
    "skillgate_recorder_insert_seconds",
    "Time to insert one batch into ClickHouse (successful attempts)",
    buckets=LATENCY_BUCKETS,
)
INSERT_FAILURES = Counter("skillgate_recorder_insert_failures_total", "Failed insert attempts (retried)")
#: Record-lag buckets fine enough around the 2 s objective (issue 6) to tell which side it is on.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
RECORD_LAG = Histogram(
    "skillgate_recorder_record_lag_seconds",
    "Seconds from an event's time to its insert into the audit store",
    buckets=LAG_BUCKETS,
)
LAST_LAG = Gauge(
    "skillgate_recorder_last_record_lag_seconds",
    "Record lag of the newest event of the last inserted batch",
)

#: Longest wait of one poll (and the wait when idle), so a stop request is seen that soon rather
#: after a batch window (up to ``batch_max_seconds``). Polling again is cheap: the broker's fetch
#: runs on its own. (Cancelling a poll instead would leave aiokafka counting a fetch in progress
#: for good, which turns off its ``max_poll_interval`` liveness check.)
STOP_POLL_MS = 200
#: Longest the broker may hold one of the recorder's fetches waiting for more data.
MAX_FETCH_WAIT_MS = 1000
#: Insert attempts still made once a stop is requested, before giving up without committing.
STOP_ATTEMPTS = 3
#: While a refused batch is inserted by halves, how often the recorder polls Kafka (paused) to
#: stay in its group: well under aiokafka's max_poll_interval (300 s).
ISOLATE_POLL_SECONDS = 10.0
#: How many messages a partition must have left in Kafka to count as behind, holding batches
#: to the time frontier: a backlog, not the few messages that arrive while a fetch is answered
#: (nor a gap compaction left at the end of a partition, which no fetch ever fills).
ALIGN_MIN_LAG = 500
#: With a backlog, a batch is pulled from the fetcher in this many parts (at least), so that no
#: partition runs more than a part ahead of the frontier.
ALIGN_PULLS = 20
#: Errors that say the batch's data (not the store) is the problem: the batch is split to find
#: the offending events instead of being retried forever.
DATA_ERRORS = (TypeError, ValueError, OverflowError, DataError)


@dataclass
class _Step:
    """One batch on its way through the pipeline: decoded, prepared, being written."""

    batch: list[Message]
    records: list[SourceRecord]
    dead: list[tuple[Message, str]]
    prepared: PreparedBatch | None = None
    write: asyncio.Future[InsertStats] | None = None


class StopRequested(Exception):
    """Raised out of a retry loop when the recorder stops before ClickHouse came back."""


def _stored(message: Message) -> bool:
    """Whether a message becomes a stored event: not a tombstone on a compacted topic (no event),
    not a chunk of a streamed answer (CallCompleted records the whole message)."""
    return message.value is not None and (topics.KIND_HEADER, topics.CHUNK_KIND) not in (
        message.headers or ()
    )


class _TrackAssignment(ConsumerRebalanceListener):  # type: ignore[misc]
    """Drops revoked partitions from the buffer at once, before they may be assigned again and
    read from the last commit (their buffered messages would then be read twice, out of order),
    and notes when partitions were assigned (see :meth:`TimeAlignedBuffer.behind`)."""

    def __init__(self, buffer: TimeAlignedBuffer) -> None:
        self._buffer = buffer

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._buffer.forget(revoked)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._buffer.assign(assigned)  # read from their committed offsets, from now


class RecorderConsumer:
    """Consumes every skillgate topic and writes it to the audit store."""

    def __init__(
        self,
        store: AuditStore,
        kafka: KafkaSettings,
        settings: RecorderSettings,
        codec: AvroCodec | None = None,
    ) -> None:
        self._store = store
        self._kafka = kafka
        self._settings = settings
        self._codec = codec or default_codec()
        self._suffix = {topics.name(kafka, s): s for s in topics.EVENT_OF_TOPIC if s not in topics.UNRECORDED}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._deadletterer: DeadLetterer | None = None
        self._stopping = asyncio.Event()
        #: Messages fetched and not yet in a batch (see _collect), also anything a poll returned
        #: while a retry had everything paused: never dropped.
        self._buffer = TimeAlignedBuffer(_stored)
        #: Messages this instance has committed past (for tests and logs).
        self.committed_messages = 0

    async def start(self) -> None:
        """Connect to Kafka and join the group (subscribed to every topic of the prefix)."""
        self._producer = make_producer(self._kafka)
        await self._producer.start()
        self._deadletterer = DeadLetterer(self._producer, self._kafka, SERVICE, self._codec)
        # The recorder inserts in batches anyway, so let the broker accumulate data for up to the
        # early batch window (1 s at most) instead of answering a fetch per message: at low rates
        # one fetch per message across every partition of every topic cost more CPU (here and in
        # the broker) than the inserts. Capped: the broker answers a connection's requests in
        # order, so a held fetch delays this consumer's offset lookups, and one held past the
        # request timeout (40 s) would be dropped with its connection.
        self._consumer = make_consumer(
            self._kafka,
            self._settings.group_id,
            fetch_min_bytes=256 * 1024,
            fetch_max_wait_ms=min(MAX_FETCH_WAIT_MS, max(10, int(self._early_seconds * 1000))),
        )
        try:
            self._consumer.subscribe(sorted(self._suffix), listener=_TrackAssignment(self._buffer))
            await self._consumer.start()
        except BaseException:
            await self._producer.stop()
            raise

    @property
    def paused_partitions(self) -> int:
        """Partitions paused while a write is being retried (0 in normal operation)."""
        return len(self._consumer.paused()) if self._consumer is not None else 0

    def request_stop(self) -> None:
        """Ask :meth:`run` to finish the current batch, commit it and return."""
        self._stopping.set()

    async def close(self) -> None:
        """Leave the group and close the Kafka clients (after :meth:`run` returned)."""
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def run(self) -> None:
        """Batch, insert and commit until :meth:`request_stop`.

        Pipelined: each batch is decoded and prepared (rows, folds, checkpoints: Python work)
        while the previous one is written (ClickHouse inserts, which chDB runs without the GIL),
        so the two use both cores. Only one write is in flight, and a batch's offsets are
        committed once its write has succeeded, so nothing acknowledged is ever lost.
        """
        inflight: _Step | None = None
        try:
            while not self._stopping.is_set():
                batch = await self._collect()
                if inflight is not None and (not batch or not self._can_prepare_on(inflight)):
                    await self._finish(inflight)
                    inflight = None
                if not batch:
                    continue
                step = await self._prepare(batch, inflight)
                if inflight is not None:
                    await self._finish(inflight)
                self._start_write(step)
                inflight = step
            if inflight is not None:
                await self._finish(inflight)
        except StopRequested:
            log.error(
                "stopping with an uncommitted batch: the audit store is unavailable; "
                "the batch will be consumed again on restart",
                extra={"messages": len(inflight.batch) if inflight is not None else 0},
            )
        finally:
            if inflight is not None and inflight.write is not None and not inflight.write.done():
                # Leaving on an error: let the write in its thread end before the store closes.
                with contextlib.suppress(Exception):
                    await asyncio.shield(inflight.write)

    def _can_prepare_on(self, inflight: _Step) -> bool:
        """Whether the next batch may be prepared while ``inflight`` is written.

        Not when ``inflight`` is not being written (its preparation failed, or it holds no
        events) or its write failed (or will be refused as stale): it is then stored again on
        its own first, and a batch prepared before that would not see it.
        """
        prepared = inflight.prepared
        return prepared is not None and prepared.generation == self._store.generation

    # -- batching -----------------------------------------------------------------------------

    @property
    def _kafka_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("RecorderConsumer.start() was not called")
        return self._consumer

    async def _collect(self) -> list[Message]:
        """The next batch (see :mod:`services.recorder.alignment`).

        Fetched messages wait in the buffer, at most two batches' worth. With no partition far
        behind (the steady state), a batch is taken once ``batch_max_events`` messages are
        buffered or the oldest is due (:meth:`_due`). With a backlog, messages are pulled only
        from the partitions not ahead of the time frontier, a little at a time, and a batch is
        taken once ``batch_max_events`` of them are ready (up to the frontier, or live ones of
        a partition caught up), or the buffer is full, or after ``batch_max_seconds`` of waiting
        for it (messages of a backlog are overdue anyway); the same while some partition
        assigned less than ``batch_max_seconds`` ago has sent nothing yet (at a start or after
        a rebalance), so the first batch of a backlog is cut in time too. A stop request takes
        what is ready at once; the rest of the buffer is read again after a restart.
        """
        consumer = self._kafka_consumer
        buffer = self._buffer
        limit = self._settings.batch_max_events
        capacity = 2 * limit
        started = time.monotonic()
        patience = started + self._settings.batch_max_seconds
        # When the oldest message was produced, fixed as messages are read: worked out again at
        # every pass, a timestamp ahead of this clock (or none) would move the due time on.
        produced = self._produced(buffer.oldest_timestamp(), started) if len(buffer) else math.inf
        while True:
            buffer.retain(consumer.assignment())
            behind, unknown = self._behind()
            frontier = buffer.frontier(behind, self._settings.batch_max_seconds)
            assigned = consumer.assignment()
            due: float | None = None
            if len(buffer):
                now = time.monotonic()
                due = self._due(produced, buffer.events)
                if frontier is not None or unknown:
                    # Behind, or not knowing yet which partitions are: a backlog is overdue
                    # anyway, so the batch waits (up to patience) to be cut in time.
                    due = max(due, patience)
                if (
                    now >= due
                    or self._stopping.is_set()
                    or len(buffer) >= capacity
                    or buffer.ready(frontier) >= limit
                ):
                    return buffer.take(limit, frontier)
            # Rounded up: rounding down would poll without waiting in the last millisecond.
            wait_ms = STOP_POLL_MS if due is None else math.ceil((due - time.monotonic()) * 1000)
            room = capacity - len(buffer)
            if frontier is not None or unknown:
                # Small pulls keep any one partition from running far ahead (and, while some
                # partition's backlog is unknown, from filling the buffer before it is known
                # which are behind).
                room = min(room, max(1, limit // ALIGN_PULLS))
            wanted: list[TopicPartition] = []
            if frontier is not None:
                # What aiokafka fetched for the partitions ahead stays in its buffer meanwhile
                # (it fetches a partition again only once that is consumed): nothing is dropped
                # or fetched twice. (Never empty, as no partition is ahead of the frontier it
                # sets; an empty list would mean every partition to aiokafka.)
                wanted = sorted(assigned - buffer.ahead(frontier))
            fetched = await consumer.getmany(
                *wanted, timeout_ms=min(STOP_POLL_MS, max(0, wait_ms)), max_records=room
            )
            read_at = time.monotonic()
            for partition, messages in fetched.items():
                if messages:
                    buffer.add(partition, messages)
                    oldest_ms = min((m.timestamp for m in messages if m.timestamp > 0), default=0)
                    produced = min(produced, self._produced(oldest_ms, read_at))
            if not len(buffer):
                return []  # idle: let run() check for a stop request

    def _behind(self) -> tuple[list[TopicPartition], bool]:
        """The assigned partitions with at least ``ALIGN_MIN_LAG`` messages in Kafka past what
        was read (high watermarks as of the last fetch), and whether any one's backlog is not
        known yet (see :meth:`TimeAlignedBuffer.behind`).

        Positions come from the buffer, not aiokafka's ``position()``: that waits while a
        partition's offset is being reset, for as long as its leader is down, and the whole
        loop with it.
        """
        consumer = self._kafka_consumer
        ends = {p: consumer.highwater(p) for p in consumer.assignment()}
        return self._buffer.behind(ends, ALIGN_MIN_LAG, self._settings.batch_max_seconds)

    def _due(self, produced: float, size: int) -> float:
        """When a batch of ``size`` events to store, whose oldest message was produced at
        ``produced`` (monotonic clock), must be inserted.

        ``batch_max_seconds`` after that event at the latest, and ``batch_early_seconds`` after
        it once the batch holds ``batch_early_events``: an insert costs roughly the same whatever
        its size (measured on embedded chDB: ~0.1 s of CPU for a one-call batch), so at low
        traffic the recorder waits longer and inserts less often, while at busy times the lag
        stays short. The window runs from when the event was produced, not from when this loop
        got to it: events that waited in the fetcher while the previous batch was prepared and
        written have already spent their window, so a busy recorder writes them at once.
        """
        if size >= self._settings.batch_early_events:
            return produced + self._early_seconds
        return produced + self._settings.batch_max_seconds

    @property
    def _early_seconds(self) -> float:
        return min(self._settings.batch_early_seconds, self._settings.batch_max_seconds)

    def _produced(self, oldest_ms: int, now: float) -> float:
        """When the oldest buffered message was produced, on the monotonic clock, from its Kafka
        timestamp ``oldest_ms``; never later than ``now`` (a producer clock ahead of ours), never
        earlier than one ``batch_max_seconds`` before it (so no batch is due before it was read).
        0 (no message has a timestamp) counts as produced now.
        """
        age = time.time() - oldest_ms / 1000 if oldest_ms > 0 else 0.0
        return now - min(self._settings.batch_max_seconds, max(0.0, age))

    async def _prepare(self, batch: list[Message], inflight: _Step | None) -> _Step:
        """Decode a batch and prepare its rows on top of the batch being written (if any)."""
        # Decoding and preparing a few thousand events takes a while: done in a worker thread,
        # so the read API sharing this event loop stays responsive.
        records, dead = await asyncio.to_thread(self._decode, batch)
        BATCH_SIZE.observe(len(batch))
        step = _Step(batch, records, dead)
        if records:
            after = inflight.prepared if inflight is not None else None
            try:
                step.prepared = await asyncio.to_thread(self._store.prepare_batch, records, after)
            except Exception as exc:  # the store is down, or the data is refused: see _finish
                log.warning(
                    "preparing a batch failed; it will be written one step at a time",
                    extra={"error": f"{type(exc).__name__}: {exc}"[:500]},
                )
        return step

    def _start_write(self, step: _Step) -> None:
        if step.prepared is not None:
            step.write = asyncio.ensure_future(asyncio.to_thread(self._write, step.prepared))

    def _write(self, prepared: PreparedBatch) -> InsertStats:
        started = time.perf_counter()
        stats = self._store.write_batch(prepared)
        INSERT_SECONDS.observe(time.perf_counter() - started)
        return stats

    async def _finish(self, step: _Step) -> None:
        """Wait for a batch's write (or redo it), dead-letter what cannot be stored, commit."""
        stats: InsertStats | None = None
        if step.write is not None:
            try:
                stats = await step.write
            except Exception as exc:  # retried below, with backoff and consumption paused
                INSERT_FAILURES.inc()
                log.warning(
                    "audit store write failed; retrying",
                    extra={"error": f"{type(exc).__name__}: {exc}"[:500], "attempt": 1},
                )
        if stats is None and step.records:
            # Prepared again from what the store holds now: the failed write may have stored a
            # part of the batch, and a batch prepared on top of it is stale.
            stats = await self._retrying(partial(self._insert, step.records))
        dead = list(step.dead)
        if stats is not None:
            for record, reason in stats.rejected:
                dead.append((record.origin, f"recorder could not store the event: {reason}"))
            self._observe(stats, step.records)
        for message, reason in dead:
            try:
                await self._retrying(partial(self._dead_letter, message, reason))
            except DATA_ERRORS:
                # The dead letter itself cannot be encoded: say so loudly and move on rather
                # than block the partition forever.
                log.exception(
                    "could not dead-letter a message; skipping it",
                    extra={
                        "topic": message.topic,
                        "partition": message.partition,
                        "offset": message.offset,
                        "reason": reason[:500],
                    },
                )
        await self._commit(step.batch)

    def _decode(self, batch: Sequence[Message]) -> tuple[list[SourceRecord], list[tuple[Message, str]]]:
        """Decoded events, and the messages that are not skillgate events (with the reason)."""
        records: list[SourceRecord] = []
        dead: list[tuple[Message, str]] = []
        consumed: dict[str, int] = {}
        for message in batch:
            suffix = self._suffix.get(message.topic, "")
            consumed[suffix] = consumed.get(suffix, 0) + 1
            if not _stored(message):
                continue  # a tombstone (compacted topic) or a streamed chunk: nothing to record
            try:
                name, event = self._codec.decode(message.value, topics.EVENT_OF_TOPIC.get(suffix))
            except CodecError as exc:
                dead.append((message, f"recorder could not decode the value: {exc}"))
                continue
            records.append(
                SourceRecord(message.topic, message.partition, message.offset, name, event, origin=message)
            )
        for suffix, count in consumed.items():
            EVENTS_CONSUMED.labels(SERVICE, suffix).inc(count)
        return records, dead

    async def _insert(self, records: Sequence[SourceRecord]) -> InsertStats:
        started = time.perf_counter()
        try:
            stats = await asyncio.to_thread(self._store.insert_batch, records)
        except DATA_ERRORS as exc:
            log.warning(
                "batch refused as data; isolating the offending events",
                extra={"error": f"{type(exc).__name__}: {exc}"[:500]},
            )
            stats = await self._isolate(records)
        INSERT_SECONDS.observe(time.perf_counter() - started)
        return stats

    async def _isolate(self, records: Sequence[SourceRecord]) -> InsertStats:
        """Insert a refused batch by halves, in order, down to the events ClickHouse refuses
        (rejected, to be dead-lettered).

        Halving finds k bad events among n in about 2·k·log2(n/k) inserts; one by one, a full
        batch of 10,000 would take ~1,000 s at ~0.1 s per insert on chDB. However long it takes,
        the recorder stays a live group member: every ``ISOLATE_POLL_SECONDS`` it polls Kafka
        with its partitions paused (what that fetches is kept for the next batch), so
        ``max_poll_interval`` never evicts it. Inserts are idempotent, so retrying a half that
        failed after storing some of its rows stores nothing twice; a refused event may still
        leave rows in the tables inserted before the one that refused it.
        """

        def halves(part: Sequence[SourceRecord]) -> list[Sequence[SourceRecord]]:
            # Second half first: pending is a stack, so the batch is inserted in order.
            middle = len(part) // 2
            return [part[middle:], part[:middle]]

        total = InsertStats()
        pending = halves(records) if len(records) > 1 else [records]
        polled = time.monotonic()
        paused = False
        try:
            while pending:
                part = pending.pop()
                try:
                    stats = await asyncio.to_thread(self._store.insert_batch, part)
                except DATA_ERRORS as exc:
                    if len(part) == 1:
                        total.rejected.append((part[0], f"{type(exc).__name__}: {exc}"[:1000]))
                    else:
                        pending.extend(halves(part))
                else:
                    total.merge(stats)
                if pending and time.monotonic() - polled > ISOLATE_POLL_SECONDS:
                    await self._poll_paused()
                    paused, polled = True, time.monotonic()
        finally:
            if paused:
                self._resume_all()
        return total

    async def _dead_letter(self, message: Message | None, reason: str) -> None:
        if message is None or self._deadletterer is None:
            return
        await self._deadletterer.send(message, reason)
        DEAD_LETTERS.labels(SERVICE).inc()

    def _observe(self, stats: InsertStats, records: Sequence[SourceRecord]) -> None:
        for topic, count in stats.per_topic.items():
            EVENTS_INSERTED.labels(self._suffix.get(topic, topic)).inc(count)
        DUPLICATES.inc(stats.duplicates)
        now = events.now_micros()
        newest = 0
        for record in records:
            at = int(record.event.get("time") or 0)
            if at:
                RECORD_LAG.observe(max(0.0, (now - at) / 1e6))
                newest = max(newest, at)
        if newest:
            LAST_LAG.set(max(0.0, (now - newest) / 1e6))

    async def _commit(self, batch: Sequence[Message]) -> None:
        consumer = self._kafka_consumer
        offsets: dict[TopicPartition, int] = {}
        for message in batch:
            tp = TopicPartition(message.topic, message.partition)
            offsets[tp] = max(offsets.get(tp, 0), message.offset + 1)
        # After a rebalance some partitions may belong to another member now: it consumes them
        # again from the last commit, which the idempotent inserts make harmless.
        assigned = consumer.assignment()
        owned = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not owned:
            return
        try:
            await consumer.commit(owned)
        except KafkaError as exc:
            log.warning(
                "offset commit failed; the batch will be consumed again (idempotent)",
                extra={"error": f"{type(exc).__name__}: {exc}"[:500]},
            )
            return
        self.committed_messages += sum(1 for m in batch if TopicPartition(m.topic, m.partition) in owned)

    # -- retries ------------------------------------------------------------------------------

    async def _retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` until it succeeds, pausing consumption while it keeps failing."""
        delay = 0.2
        attempts = 0
        paused = False
        try:
            while True:
                try:
                    return await operation()
                except DATA_ERRORS:
                    raise
                except Exception as exc:  # the store or broker is down: wait and try again
                    attempts += 1
                    INSERT_FAILURES.inc()
                    if self._stopping.is_set() and attempts >= STOP_ATTEMPTS:
                        raise StopRequested from exc
                    log.warning(
                        "audit store write failed; retrying",
                        extra={
                            "error": f"{type(exc).__name__}: {exc}"[:500],
                            "attempt": attempts,
                            "retry_in_s": delay,
                        },
                    )
                    paused = True
                    await self._idle(delay)
                    delay = min(delay * 2, self._settings.retry_max_backoff_seconds)
        finally:
            if paused:
                self._resume_all()

    async def _poll_paused(self) -> None:
        """Poll Kafka with every partition paused: the group sees a live member. aiokafka returns
        nothing of a paused partition (it drops what it had fetched, to fetch it again once
        resumed); whatever a poll does return is kept for the next batch. The caller resumes
        (:meth:`_resume_all`)."""
        consumer = self._kafka_consumer
        # Pause before every poll: a rebalance may have assigned new, unpaused partitions.
        consumer.pause(*consumer.assignment())
        room = max(1, 2 * self._settings.batch_max_events - len(self._buffer))
        fetched: dict[Any, list[Message]] = await consumer.getmany(timeout_ms=0, max_records=room)
        for partition, messages in fetched.items():
            self._buffer.add(partition, messages)

    def _resume_all(self) -> None:
        """Resume every assigned partition, after :meth:`_poll_paused`."""
        if self._consumer is not None:
            self._consumer.resume(*self._consumer.assignment())

    async def _idle(self, seconds: float) -> None:
        """Back off for ``seconds`` while staying a live group member and fetching nothing.

        A stop request ends the wait early (the caller then makes its last attempts).
        """
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            await self._poll_paused()
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
            return
