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

* a partition is **behind** when it has a backlog in Kafka (:meth:`TimeAlignedBuffer.behind`,
  from its high watermark and how far it was read); the others are caught up;
* the **frontier** is the earliest time up to which every partition behind has been read;
* a batch takes the buffered messages up to the frontier, oldest first, each partition's in
  offset order, so the events of the calls in that time range meet in one batch; a partition
  caught up is cut there too, except for its live traffic (messages read within
  :data:`LIVE_SECONDS` of their time), which is taken whatever its time, and first: live
  traffic is not held back while one partition catches up, say after its leader came back;
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
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: A Kafka partition as aiokafka names it (``TopicPartition``; anything hashable in tests).
Partition = Any
#: A consumed message: aiokafka's ``ConsumerRecord`` (``offset`` and ``timestamp`` are read).
Message = Any
#: A message read within this many seconds of its timestamp is live traffic: a partition caught
#: up does not hold it to the frontier. Older messages of a partition caught up (the few hundred
#: a quiet topic gathered while the recorder was down) are cut at the frontier with the rest of
#: the backlog, so their calls' other events meet them in one batch.
LIVE_SECONDS = 30.0


@dataclass
class _Buffered:
    """One partition's messages not yet in a batch, and how far it has been read."""

    messages: deque[Message] = field(default_factory=deque)
    #: The latest timestamp (ms) read from the partition so far (0: nothing read yet).
    read_until: int = 0
    #: When data last came from the partition (monotonic clock), or when it was assigned.
    heard: float = 0.0
    #: The offset after the last message read since the partition was assigned (None: none
    #: read yet). The consumer's position, known without asking aiokafka, which waits for a
    #: leader when the position must be reset.
    position: int | None = None
    #: The offset of the first live message read since the partition was assigned (None: none
    #: yet); every later message of the partition counts as live too.
    live_from: int | None = None


@dataclass(frozen=True)
class Frontier:
    """Where a batch is cut: at ``time`` for the partitions in ``holds`` (those behind), not at
    all for the others."""

    #: The time (ms) up to which every partition in ``holds`` has been read.
    time: int
    holds: frozenset[Partition]


class TimeAlignedBuffer:
    """Messages fetched and not yet batched, per partition (see the module doc)."""

    def __init__(
        self,
        counts: Callable[[Message], bool] = lambda _: True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``counts`` tells which messages count as events to store (:attr:`events`);
        ``wall_clock`` (seconds since the epoch) tells live messages (:data:`LIVE_SECONDS`)."""
        self._counts = counts
        self._wall_clock = wall_clock
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
        live_since = int((self._wall_clock() - LIVE_SECONDS) * 1000)
        for message in messages:
            if part.live_from is None and message.timestamp >= live_since:
                part.live_from = message.offset
            part.messages.append(message)
            part.read_until = max(part.read_until, message.timestamp)
            self._size += 1
            self.events += self._counts(message)
        if self._size > before:
            part.heard = time.monotonic()
            part.position = part.messages[-1].offset + 1

    def assign(self, partitions: Iterable[Partition]) -> None:
        """Start ``partitions`` afresh, as assigned just now: nothing read, not heard from since
        now. (aiokafka reads them from the last commit; anything still buffered of them would be
        read twice.)"""
        partitions = list(partitions)
        self.forget(partitions)
        now = time.monotonic()
        for partition in partitions:
            self._parts[partition] = _Buffered(heard=now)

    def behind(
        self, ends: Mapping[Partition, int | None], min_lag: int, grace: float
    ) -> tuple[list[Partition], bool]:
        """The partitions behind, and whether the backlog of any is not known yet.

        ``ends`` are the assigned partitions' high watermarks (None until a fetch answered).
        A partition is behind when at least ``min_lag`` messages lie between where it was read
        to and its high watermark. Until both are known (a message read since its assignment),
        its backlog is unknown: for ``grace`` seconds after its assignment it then counts as
        behind and not read yet, so that it holds the frontier at its start (a backlog's first
        batch is cut in time too, not by which partition answered first); after that as caught
        up, so that a partition that sends nothing (idle, or its leader down) never holds the
        others back for longer.
        """
        now = time.monotonic()
        behind: list[Partition] = []
        unknown = False
        for partition, end in ends.items():
            part = self._parts.get(partition)
            if part is None:
                part = self._parts[partition] = _Buffered(heard=now)
            if end is not None and part.position is not None:
                if end - part.position >= min_lag:
                    behind.append(partition)
            elif now - part.heard <= grace:
                behind.append(partition)
                unknown = True
        return behind, unknown

    def oldest_timestamp(self) -> int:
        """The earliest timestamp (ms) of a buffered message; 0 when none has one (Kafka gives
        ``-1`` to a message without one). A scan: the consumer asks once per batch."""
        return min(
            (m.timestamp for part in self._parts.values() for m in part.messages if m.timestamp > 0),
            default=0,
        )

    def frontier(self, behind: Iterable[Partition], quiet: float) -> Frontier | None:
        """The time up to which every partition still behind has been read, or None when none
        is behind.

        ``behind`` are the partitions with a backlog in Kafka (:meth:`behind`); one not read yet
        holds the frontier at its start. A partition behind whose buffer is empty and that has
        sent nothing for ``quiet`` seconds no longer counts until it does: whatever the reason
        (a gap compaction left at its end, a fetch that keeps failing), it must not stop the
        others being read.
        """
        now = time.monotonic()
        holds: dict[Partition, int] = {}
        for partition in behind:
            part = self._parts.get(partition)
            if part is None:
                part = self._parts[partition] = _Buffered(heard=now)
            if part.messages or now - part.heard <= quiet:
                holds[partition] = part.read_until
        return Frontier(min(holds.values()), frozenset(holds)) if holds else None

    @staticmethod
    def _ready(partition: Partition, part: _Buffered, frontier: Frontier | None) -> int:
        """How many of a partition's buffered messages, from the first, are up to the frontier
        (or live, for a partition caught up)."""
        if frontier is None:
            return len(part.messages)
        live_from = part.live_from if partition not in frontier.holds else None
        count = 0
        for message in part.messages:
            if message.timestamp > frontier.time and (live_from is None or message.offset < live_from):
                break
            count += 1
        return count

    def ready(self, frontier: Frontier | None) -> int:
        """How many buffered messages a batch cut at ``frontier`` may take: of each partition,
        those up to the frontier, and of a partition caught up its live ones too."""
        return sum(self._ready(p, part, frontier) for p, part in self._parts.items())

    def ahead(self, frontier: Frontier | None) -> set[Partition]:
        """The partitions read past the frontier: those behind read beyond its time, and those
        caught up with a message held to it (all they send after it waits too). Reading more of
        them only grows the buffer, so the consumer reads the others until they catch up."""
        if frontier is None:
            return set()
        return {
            p
            for p, part in self._parts.items()
            if (
                part.read_until > frontier.time
                if p in frontier.holds
                else self._ready(p, part, frontier) < len(part.messages)
            )
        }

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

    def take(self, limit: int, frontier: Frontier | None) -> list[Message]:
        """Remove and return up to ``limit`` messages that are ready (:meth:`ready`): first
        those of the partitions caught up, then those of the partitions behind, each group
        oldest first.

        Caught-up partitions come first so that live traffic is recorded while one partition
        catches up on a long backlog, not after it. Each partition's messages stay in offset
        order (so committing a batch's highest offset per partition never passes over a message
        still buffered). When no message is ready, the oldest messages are taken anyway: a
        batch is never held back forever.
        """
        counts = [(p, self._ready(p, part, frontier)) for p, part in self._parts.items()]
        if not any(n for _, n in counts):
            counts = [(p, len(part.messages)) for p, part in self._parts.items()]
        holds = frontier.holds if frontier is not None else frozenset()
        taken = [0] * len(counts)
        batch: list[Message] = []
        inputs = [self._ordered(p in holds, i, self._parts[p], n) for i, (p, n) in enumerate(counts) if n]
        for (_, _, index, _), message in heapq.merge(*inputs):
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
    def _ordered(
        behind: bool, index: int, part: _Buffered, count: int
    ) -> Iterator[tuple[tuple[bool, int, int, int], Message]]:
        # heapq.merge needs each input sorted by its key: whether the partition is behind is
        # constant, and the running maximum of the timestamps (a producer clock may step back)
        # rises; the input's index settles ties between inputs, so messages are never compared.
        latest = 0
        for message in itertools.islice(part.messages, count):
            latest = max(latest, message.timestamp)
            yield (behind, latest, index, message.offset), message
