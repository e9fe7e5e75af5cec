"""The recorder consumer's pipeline order: each batch prepared while the previous one is written.

Kafka and ClickHouse are replaced here by a recording store and a scripted batch source: what is
tested is the order the consumer calls prepare / write / commit in, when a preparation or a write
fails. (The pipeline itself, with real Kafka and chDB, is tested in
tests/integration/test_recorder_pipeline.py; the store's side in tests/unit/test_recorder_rows.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.recorder import consumer
from services.recorder.alignment import TimeAlignedBuffer
from services.recorder.config import RecorderSettings
from services.recorder.store import InsertStats, PreparedBatch, StalePrepared


@dataclass
class _Prepared(PreparedBatch):
    number: int = 0
    seen: frozenset[int] = frozenset()  # batches the store held, or were in flight, when prepared


@dataclass
class RecordingStore:
    """Batches are numbers; a batch's rows are right only if it was prepared seeing every
    earlier batch (stored, or in flight as ``after``)."""

    fail_prepare: set[int] = field(default_factory=set)
    fail_write: set[int] = field(default_factory=set)
    generation: int = 0
    stored: list[int] = field(default_factory=list)
    written_seeing: dict[int, frozenset[int]] = field(default_factory=dict)
    stale: int = 0

    def prepare_batch(self, records: Sequence[Any], after: PreparedBatch | None = None) -> PreparedBatch:
        number = int(records[0])
        if number in self.fail_prepare:
            self.fail_prepare.discard(number)
            raise ConnectionError("the store did not answer (test)")
        seen = set(self.stored)
        if isinstance(after, _Prepared):
            seen.add(after.number)
        generation = after.generation if after is not None else self.generation
        return _Prepared(InsertStats(), generation, number=number, seen=frozenset(seen))

    def write_batch(self, prepared: PreparedBatch) -> InsertStats:
        assert isinstance(prepared, _Prepared)
        if prepared.generation != self.generation:
            self.stale += 1
            raise StalePrepared("stale (test)")
        if prepared.number in self.fail_write:
            self.fail_write.discard(prepared.number)
            self.generation += 1
            raise ConnectionError("the store went away (test)")
        self.stored.append(prepared.number)
        self.written_seeing[prepared.number] = prepared.seen
        return InsertStats()

    def insert_batch(self, records: Sequence[Any]) -> InsertStats:
        return self.write_batch(self.prepare_batch(records))


@dataclass
class _Message:
    offset: int
    topic: str = "t"
    partition: int = 0


async def _run(store: RecordingStore, batches: int) -> list[int]:
    """Drive RecorderConsumer.run over ``batches`` one-message batches; returns the commits."""
    c = consumer.RecorderConsumer.__new__(consumer.RecorderConsumer)
    c._store = store  # type: ignore[assignment]
    c._stopping = asyncio.Event()
    c._buffer = TimeAlignedBuffer()
    c._settings = RecorderSettings(retry_max_backoff_seconds=0.01)
    c._consumer = None
    source = iter(range(1, batches + 1))
    commits: list[int] = []

    async def collect() -> list[_Message]:
        number = next(source, None)
        if number is None:
            c._stopping.set()
            return []
        return [_Message(number)]

    async def commit(batch: Sequence[_Message]) -> None:
        commits.extend(m.offset for m in batch)

    async def idle(seconds: float) -> None:
        await asyncio.sleep(0)

    c._collect = collect  # type: ignore[method-assign]
    c._decode = lambda batch: ([m.offset for m in batch], [])  # type: ignore[method-assign]
    c._commit = commit  # type: ignore[method-assign]
    c._observe = lambda stats, records: None  # type: ignore[method-assign]
    c._idle = idle  # type: ignore[method-assign]
    await c.run()
    return commits


@pytest.mark.parametrize(
    "store",
    [
        RecordingStore(),
        RecordingStore(fail_prepare={2}),
        RecordingStore(fail_write={2}),
        RecordingStore(fail_write={2, 5}, fail_prepare={3}),
    ],
    ids=["healthy", "prepare-fails", "write-fails", "both"],
)
def test_every_batch_is_written_seeing_every_earlier_batch_and_committed_in_order(
    store: RecordingStore,
) -> None:
    commits = asyncio.run(_run(store, 8))
    assert commits == list(range(1, 9))
    assert store.stored == list(range(1, 9))
    for number, seen in store.written_seeing.items():
        assert set(range(1, number)) <= seen, (
            f"batch {number} was prepared without {sorted(set(range(1, number)) - seen)}"
        )


def test_after_a_failed_write_pipelining_resumes() -> None:
    """One failure costs at most one batch prepared twice, not every batch after it."""
    store = RecordingStore(fail_write={2})
    asyncio.run(_run(store, 10))
    assert store.stale <= 1
