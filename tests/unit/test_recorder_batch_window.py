"""When the recorder inserts a batch: full, or due by the age of its oldest event and its size;
and, with a backlog, which messages it holds (cut at a common time across partitions).

Scripted fetchers stand in for aiokafka's (what is tested is how ``_collect`` decides to stop
collecting; the real consumer is exercised in tests/integration/test_recorder_pipeline.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import pytest

from services.recorder import consumer
from services.recorder.alignment import TimeAlignedBuffer
from services.recorder.config import RecorderSettings
from skillgate import topics

WINDOW = 5.0  # long enough that a test that waited it out would be unmistakable


@dataclass
class _Message:
    offset: int
    timestamp: int  # ms since the epoch, like Kafka's CreateTime
    headers: tuple[tuple[str, bytes], ...] = ()
    value: bytes | None = b"event"


class _Fetcher:
    """Returns the scripted fetches in order, then nothing after a short wait; records each
    call's timeout and refuses the arguments aiokafka refuses."""

    def __init__(self, *fetches: list[_Message], hold: bool = False) -> None:
        self.fetches = deque(fetches)
        self.timeouts: list[int] = []
        #: Hold an empty fetch for its whole timeout, as the broker does (else 10 ms at most).
        self.hold = hold

    def assignment(self) -> set[Any]:
        return {("t", 0)}

    def highwater(self, partition: Any) -> int:
        return 0  # never behind once read from: batches are cut by size and time only

    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[_Message]]:
        assert set(partitions) <= self.assignment()  # nothing ahead: every partition is read
        assert timeout_ms >= 0
        assert max_records is None or max_records >= 1  # aiokafka raises ValueError otherwise
        self.timeouts.append(timeout_ms)
        if self.fetches:
            return {("t", 0): self.fetches.popleft()}
        # Nothing to fetch: wait (part of) the timeout, as the broker would hold the fetch.
        await asyncio.sleep((timeout_ms if self.hold else min(timeout_ms, 10)) / 1000)
        return {}


EARLY = WINDOW / 5
EARLY_EVENTS = 3


def _consumer(fetcher: _Fetcher, window: float = WINDOW, max_events: int = 5000) -> consumer.RecorderConsumer:
    c = consumer.RecorderConsumer.__new__(consumer.RecorderConsumer)
    c._settings = RecorderSettings(
        batch_max_seconds=window,
        batch_early_seconds=EARLY,
        batch_early_events=EARLY_EVENTS,
        batch_max_events=max_events,
    )
    c._consumer = fetcher
    c._buffer = TimeAlignedBuffer(consumer._stored)
    c._stopping = asyncio.Event()
    return c


def _at(seconds_ago: float, offset: int = 0, *, chunk: bool = False) -> _Message:
    headers = ((topics.KIND_HEADER, topics.CHUNK_KIND),) if chunk else ()
    return _Message(offset, int((time.time() - seconds_ago) * 1000), headers)


async def test_messages_that_waited_a_window_are_written_at_once() -> None:
    fetcher = _Fetcher([_at(WINDOW + 1, 0), _at(0.0, 1)])
    batch = await asyncio.wait_for(_consumer(fetcher)._collect(), timeout=WINDOW / 2)
    assert [m.offset for m in batch] == [0, 1]
    assert len(fetcher.timeouts) == 1  # returned after the first fetch, no second wait


async def _stop_after_polls(fetcher: _Fetcher, polls: int, within: float) -> list[_Message]:
    """Starts collecting from ``fetcher``; checks the batch is still open after ``polls`` polls,
    then asks to stop. Returns the batch, which must come within ``within`` seconds."""
    c = _consumer(fetcher)
    task = asyncio.ensure_future(c._collect())
    deadline = time.monotonic() + WINDOW / 2
    while len(fetcher.timeouts) < polls and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    assert not task.done()
    c._stopping.set()
    return await asyncio.wait_for(task, timeout=within)


async def _still_collecting(*fetches: list[_Message]) -> tuple[int, int]:
    """Collects ``fetches``, stopped after three polls. Returns how long (ms) the second poll
    was to wait, and how many messages the batch held when stopped."""
    fetcher = _Fetcher(*fetches)
    held = len(await _stop_after_polls(fetcher, 3, within=WINDOW))
    return fetcher.timeouts[1], held


@pytest.fixture
def long_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls as long as the window: how long a poll waits then shows when the batch is due."""
    monkeypatch.setattr(consumer, "STOP_POLL_MS", int(WINDOW * 1000) * 10)


@pytest.mark.usefixtures("long_polls")
async def test_fresh_messages_wait_for_the_rest_of_their_window() -> None:
    waited_ms, held = await _still_collecting([_at(0.0)])
    # Each later poll waits what is left of the window, close to the whole of it.
    assert WINDOW * 1000 * 0.8 < waited_ms <= WINDOW * 1000
    assert held == 1


async def test_a_busy_batch_is_due_early() -> None:
    # Three events whose oldest is past the early window but far from the full one.
    fetcher = _Fetcher([_at(EARLY + 0.5, 0)], [_at(0.0, 1), _at(0.0, 2)])
    batch = await asyncio.wait_for(_consumer(fetcher)._collect(), timeout=WINDOW / 2)
    assert [m.offset for m in batch] == [0, 1, 2]


def _tombstone(offset: int) -> _Message:
    return _Message(offset, int(time.time() * 1000), value=None)


@pytest.mark.usefixtures("long_polls")
@pytest.mark.parametrize("unstored", [0, EARLY_EVENTS * 2])
async def test_a_small_batch_waits_past_the_early_window(unstored: int) -> None:
    # Streamed chunks and tombstones are not stored: however many come along, they do not make
    # a batch busy.
    extra = [_at(EARLY + 0.5, n, chunk=True) if n % 2 else _tombstone(n) for n in range(1, unstored + 1)]
    waited_ms, held = await _still_collecting([_at(EARLY + 0.5, 0), *extra])
    # It waits for what is left of the full window, not of the early one.
    assert (WINDOW - EARLY - 0.5) * 1000 * 0.8 < waited_ms <= (WINDOW - EARLY) * 1000
    assert held == 1 + unstored


async def test_a_full_carried_over_batch_is_returned_without_fetching() -> None:
    fetcher = _Fetcher()
    c = _consumer(fetcher, max_events=4)
    c._buffer.add(("t", 0), [_at(0.0, n) for n in range(4)])
    batch = await asyncio.wait_for(c._collect(), timeout=WINDOW / 2)
    assert [m.offset for m in batch] == [0, 1, 2, 3]
    assert fetcher.timeouts == []


async def test_a_timestamp_ahead_of_our_clock_does_not_put_the_batch_off() -> None:
    # A producer clock a minute ahead: the message counts as produced when it was read, once;
    # worked out again at every poll it would stay a window away for good.
    fetcher = _Fetcher([_at(-60.0, 0)])
    started = time.monotonic()
    batch = await asyncio.wait_for(_consumer(fetcher, window=0.3)._collect(), timeout=WINDOW / 2)
    assert [m.offset for m in batch] == [0]
    assert time.monotonic() - started < WINDOW / 4


@pytest.mark.parametrize(
    ("produced_ago", "size", "expected_left"),
    [
        (0.0, 1, WINDOW),  # just produced: the whole window
        (WINDOW / 2, 1, WINDOW / 2),  # half of it spent waiting in the fetcher
        (WINDOW * 3, 1, 0.0),  # long overdue: now, never before now
        (-60.0, 1, WINDOW),  # a producer clock ahead of ours: never more than a window
        (0.0, EARLY_EVENTS, EARLY),  # busy: the early window
        (EARLY / 2, EARLY_EVENTS, EARLY / 2),
    ],
)
def test_due_counts_from_production(produced_ago: float, size: int, expected_left: float) -> None:
    c = _consumer(_Fetcher())
    now = time.monotonic()
    left = c._due(c._produced(_at(produced_ago).timestamp, now), size) - now
    assert left == pytest.approx(expected_left, abs=0.05)


def test_the_oldest_message_counts_and_missing_timestamps_do_not() -> None:
    c = _consumer(_Fetcher())
    now = time.monotonic()

    def produced(*messages: _Message) -> float:
        buffer = TimeAlignedBuffer()
        buffer.add(("t", 0), messages)
        return c._produced(buffer.oldest_timestamp(), now)

    assert produced(_at(0.0, 0), _at(WINDOW, 1)) == pytest.approx(now - WINDOW, abs=0.05)
    # A message without a timestamp does not hide an older one beside it ...
    assert produced(_Message(0, -1), _at(WINDOW / 2, 1)) == pytest.approx(now - WINDOW / 2, abs=0.05)
    # ... and alone counts as produced now.
    assert produced(_Message(0, -1)) == pytest.approx(now, abs=0.05)


def test_the_early_window_never_exceeds_the_full_one() -> None:
    c = _consumer(_Fetcher(), window=EARLY / 2)
    now = time.monotonic()
    assert c._due(now, EARLY_EVENTS) == pytest.approx(now + EARLY / 2)


@pytest.mark.parametrize("open_batch", [True, False])
async def test_a_stop_request_is_seen_within_one_short_poll(open_batch: bool) -> None:
    # The broker holds each fetch for the whole timeout asked for: no poll may ask for the rest
    # of the window (or the idle wait), or a stop request would wait that long.
    fetcher = _Fetcher(*([[_at(0.0)]] if open_batch else []), hold=True)
    batch = await _stop_after_polls(fetcher, 2 if open_batch else 1, within=WINDOW / 2)
    assert len(batch) == (1 if open_batch else 0)
    assert max(fetcher.timeouts) <= consumer.STOP_POLL_MS < WINDOW * 1000 / 2


async def test_messages_fetched_as_the_stop_comes_are_kept() -> None:
    c = _consumer(_Fetcher())

    class _StopDuringFetch(_Fetcher):
        async def getmany(
            self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
        ) -> dict[Any, list[_Message]]:
            c._stopping.set()  # the stop request arrives while this fetch is under way
            return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)

    c._consumer = _StopDuringFetch([_at(0.0, 7)])
    batch = await asyncio.wait_for(c._collect(), timeout=WINDOW / 2)
    assert [m.offset for m in batch] == [7]


@dataclass
class _Event:
    """A message of a call: ``call`` says which, ``timestamp`` is the call's time on every topic."""

    offset: int
    timestamp: int
    call: int
    headers: tuple[tuple[str, bytes], ...] = ()
    value: bytes | None = b"event"


class _Backlog:
    """Partitions with a backlog in Kafka, handed out like aiokafka's fetcher does: partition
    after partition, whatever their timestamps, as much as ``max_records`` allows."""

    def __init__(self, logs: dict[str, list[_Event]]) -> None:
        self.logs = logs
        self.read = dict.fromkeys(logs, 0)

    def assignment(self) -> set[str]:
        return set(self.logs)

    def highwater(self, partition: str) -> int:
        return len(self.logs[partition])

    async def position(self, partition: str) -> int:
        # As aiokafka's while a partition's offset is reset and its leader is down: it never
        # returns, so the loop must know how far it read without asking.
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def getmany(
        self, *partitions: str, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[str, list[_Event]]:
        budget = max_records or 10**9
        out: dict[str, list[_Event]] = {}
        for partition in partitions or sorted(self.logs):
            start = self.read[partition]
            chunk = self.logs[partition][start : start + budget]
            if chunk:
                out[partition] = chunk
                self.read[partition] += len(chunk)
                budget -= len(chunk)
            if not budget:
                break
        return out


async def test_with_a_backlog_a_batch_holds_whole_calls_across_topics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 300 calls, each an event on three topics at the same time: read partition by partition,
    # a 90-event batch would be 90 calls' "completed" events; cut at the time frontier it is
    # 30 whole calls, in time order.
    monkeypatch.setattr(consumer, "ALIGN_MIN_LAG", 1)
    base = int(time.time() * 1000) - 60_000  # a backlog: long overdue
    logs = {
        topic: [_Event(offset=i, timestamp=base + i, call=i) for i in range(300)]
        for topic in ("calls.completed", "calls.decided", "calls.submitted")
    }
    c = _consumer(_Fetcher(), max_events=90)
    c._consumer = _Backlog(logs)
    c._buffer = TimeAlignedBuffer(consumer._stored)
    for first in (0, 30, 60):
        batch = await asyncio.wait_for(c._collect(), timeout=WINDOW / 2)
        calls = sorted(m.call for m in batch)
        assert calls == sorted(list(range(first, first + 30)) * 3)
    assert len(c._buffer) <= 2 * 90  # never more than two batches buffered


async def test_without_a_backlog_batches_are_cut_by_size_as_read() -> None:
    # No partition far behind (5 messages, fewer than ALIGN_MIN_LAG): no frontier, the batch is
    # the oldest messages buffered, whichever topic they came from.
    base = int(time.time() * 1000) - 60_000
    logs = {
        "a": [_Event(i, base + i, i) for i in range(5)],
        "b": [_Event(i, base + 100 + i, i) for i in range(5)],
    }
    c = _consumer(_Fetcher(), max_events=6)
    c._consumer = _Backlog(logs)
    c._buffer = TimeAlignedBuffer(consumer._stored)
    # The first batch: one message each, read while each partition's backlog was unknown (the
    # first read of "a" is held until "b" has sent); then, both known, nothing holds.
    batches = [await asyncio.wait_for(c._collect(), timeout=WINDOW / 2) for _ in range(2)]
    assert [[(m.timestamp - base) for m in batch] for batch in batches] == [[0, 100], [1, 2, 3, 4, 101, 102]]


async def test_a_partition_catching_up_does_not_hold_back_the_live_ones() -> None:
    # "late" has a backlog of a minute (its leader came back, say); "live" is caught up. The
    # live events are read and recorded in the first batch, not after "late" caught up.
    now = int(time.time() * 1000)
    logs = {
        "late": [_Event(i, now - 60_000 + i, i) for i in range(2000)],
        "live": [_Event(i, now - 10 + i, 10_000 + i) for i in range(4)],
    }
    c = _consumer(_Fetcher(), max_events=90)
    c._consumer = _Backlog(logs)
    batch = await asyncio.wait_for(c._collect(), timeout=WINDOW / 2)
    assert len(batch) == 90
    assert sorted(m.call for m in batch if m.call >= 10_000) == list(range(10_000, 10_004))
    late = [m.offset for m in batch if m.call < 10_000]
    assert late == list(range(86))  # and the rest from the backlog, in order


def test_the_rebalance_listener_keeps_the_buffer_to_the_assignment() -> None:
    # Revoked: what was buffered is dropped (the next owner reads it from the last commit).
    # Assigned: read afresh from the last commit, its backlog unknown until it sends.
    buffer = TimeAlignedBuffer(consumer._stored)
    listener = consumer._TrackAssignment(buffer)
    now = int(time.time() * 1000)
    buffer.add("a", [_Message(0, now), _Message(1, now)])
    buffer.add("b", [_Message(7, now)])
    assert buffer.behind({"a": 2, "b": 8}, 1, WINDOW) == ([], False)

    listener.on_partitions_revoked(["a"])
    assert (len(buffer), buffer.events) == (1, 1)
    listener.on_partitions_assigned(["a"])
    assert buffer.behind({"a": 2, "b": 8}, 1, WINDOW) == (["a"], True)
    assert [m.offset for m in buffer.take(10, None)] == [7]
