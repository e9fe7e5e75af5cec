"""The recorder's fetch buffer: batches cut at a common time across partitions.

Why: a call's events are on different topics (``calls.submitted``, ``calls.decided``,
``calls.completed``...). When the recorder has a backlog, Kafka hands it data by bytes per
partition, not by time, so a partition of small events (``calls.completed``) runs far ahead of
one of large events (``calls.submitted``). Measured with ``bench.audit_lag --backlog 40000``:
every 10,000-event batch then held one event each of 10,000 different calls, so each call was
folded, rewritten to ``call_records`` (its bodies tokenised again for the text index) and stored
as raw ``call_parts`` rows up to three times.

Kafka Streams meets the same problem by picking records in timestamp order across its partition
buffers and not reading more of the partitions that run ahead; this buffer does that per batch:

* the **frontier** is the earliest time up to which every partition that still has data in
  Kafka has been read (a partition that is caught up does not hold it back);
* a batch takes the buffered messages up to the frontier, oldest first, each partition's in
  offset order, so the events of the calls in that time range meet in one batch;
* the consumer pulls more only from the partitions not past the frontier
  (:meth:`TimeAlignedBuffer.ahead` are left in aiokafka's fetch buffer meanwhile).

Measured with ``bench.audit_lag --backlog 60000``: batches then hold ~3,370 calls per 10,000
events instead of 10,000, and the recorder catches up 1.4-1.65x faster (bench/README.md).

When nothing is behind (the steady state: every partition caught up) there is no frontier and a
batch is simply everything buffered, oldest first, up to the batch size.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: A Kafka partition as aiokafka names it (``TopicPartition``; anything hashable in tests).
Partition = Any
#: A consumed message: aiokafka's ``ConsumerRecord`` (``offset`` and ``timestamp`` are read).
Message = Any


@dataclass
class _Buffered:
    """One partition's messages not yet in a batch, and how far it has been read."""

    messages: deque[Message] = field(default_factory=deque)
    #: The latest timestamp (ms) read from the partition so far (0: nothing read yet).
    read_until: int = 0
    #: When data last came from the partition (monotonic clock), or when it was first seen.
    heard: float = 0.0


class TimeAlignedBuffer:
    """Messages fetched and not yet batched, per partition (see the module doc)."""

    def __init__(self, counts: Callable[[Message], bool] = lambda _: True) -> None:
        """``counts`` tells which messages count as events to store (:attr:`events`)."""
        self._counts = counts
        self._parts: dict[Partition, _Buffered] = {}
        self._size = 0
        #: Buffered messages for which ``counts`` is true.
        self.events = 0

    def __len__(self) -> int:
        return self._size

    def add(self, partition: Partition, messages: Iterable[Message]) -> None:
        """Buffer messages fetched from ``partition`` (in offset order)."""
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Buffered()
        before = self._size
        for message in messages:
            part.messages.append(message)
            part.read_until = max(part.read_until, message.timestamp)
            self._size += 1
            self.events += self._counts(message)
        if self._size > before:
            part.heard = time.monotonic()

    def oldest_timestamp(self) -> int:
        """The earliest timestamp (ms) of a buffered message; 0 when none has one (Kafka gives
        ``-1`` to a message without one). A scan: the consumer asks once per batch."""
        return min(
            (m.timestamp for part in self._parts.values() for m in part.messages if m.timestamp > 0),
            default=0,
        )

    def frontier(self, behind: Iterable[Partition], quiet: float) -> int | None:
        """The time (ms) up to which every partition still behind has been read, or None when
        none is behind.

        ``behind`` are the partitions with a backlog in Kafka (the consumer knows it from their
        high watermarks and its positions); one not read yet holds the frontier at its start.
        A partition behind whose buffer is empty and that has sent nothing for ``quiet``
        seconds no longer counts until it does: whatever the reason (a gap compaction left at
        its end, a fetch that keeps failing), it must not stop the others being read.
        """
        now = time.monotonic()
        times = []
        for partition in behind:
            part = self._parts.get(partition)
            if part is None:
                part = self._parts[partition] = _Buffered(heard=now)
            if part.messages or now - part.heard <= quiet:
                times.append(part.read_until)
        return min(times) if times else None

    def _ready(self, part: _Buffered, frontier: int | None) -> int:
        """How many of a partition's buffered messages, from the first, are up to the frontier."""
        if frontier is None:
            return len(part.messages)
        count = 0
        for message in part.messages:
            if message.timestamp > frontier:
                break
            count += 1
        return count

    def ready(self, frontier: int | None) -> int:
        """How many buffered messages a batch cut at ``frontier`` may take."""
        return sum(self._ready(part, frontier) for part in self._parts.values())

    def ahead(self, frontier: int | None) -> set[Partition]:
        """The partitions read past the frontier: reading more of them only grows the buffer,
        so the consumer reads the others until they catch up."""
        if frontier is None:
            return set()
        return {p for p, part in self._parts.items() if part.read_until > frontier}

    def retain(self, assigned: Container[Partition]) -> None:
        """Forget the partitions not in ``assigned`` (see :meth:`forget`)."""
        self.forget([p for p in self._parts if p not in assigned])

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Forget partitions revoked in a rebalance, buffered messages included: they cannot be
        committed here, and whoever gets the partition next reads them from the last commit."""
        gone = [self._parts.pop(p) for p in partitions if p in self._parts]
        for part in gone:
            self._size -= len(part.messages)
            self.events -= sum(map(self._counts, part.messages))

    def take(self, limit: int, frontier: int | None) -> list[Message]:
        """Remove and return up to ``limit`` messages, oldest first, up to the frontier.

        Each partition's messages stay in offset order (so committing a batch's highest offset
        per partition never passes over a message still buffered). When no message is up to the
        frontier, the oldest messages are taken anyway: a batch is never held back forever.
        """
        counts = [(p, self._ready(part, frontier)) for p, part in self._parts.items()]
        if not any(n for _, n in counts):
            counts = [(p, len(part.messages)) for p, part in self._parts.items()]
        taken = [0] * len(counts)
        batch: list[Message] = []
        inputs = [self._ordered(i, self._parts[p], n) for i, (p, n) in enumerate(counts) if n]
        for (_, index, _), message in heapq.merge(*inputs):
            if len(batch) >= limit:
                break
            batch.append(message)
            taken[index] += 1
        for (partition, _), n in zip(counts, taken, strict=True):
            part = self._parts[partition]
            for _ in range(n):
                self.events -= self._counts(part.messages.popleft())
        self._size -= len(batch)
        return batch

    @staticmethod
    def _ordered(index: int, part: _Buffered, count: int) -> Iterator[tuple[tuple[int, int, int], Message]]:
        # heapq.merge needs each input sorted by its key: the running maximum of the timestamps
        # (a producer clock may step back) is; the input's index settles ties between inputs, so
        # messages are never compared.
        latest = 0
        for message in itertools.islice(part.messages, count):
            latest = max(latest, message.timestamp)
            yield (latest, index, message.offset), message
