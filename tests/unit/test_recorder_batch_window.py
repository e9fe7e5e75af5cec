"""When the recorder inserts a batch: full, or due by the age of its oldest event and its size.

A scripted fetcher stands in for aiokafka's (what is tested is how ``_collect`` decides to stop
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
from services.recorder.config import RecorderSettings
from skillgate import topics

WINDOW = 5.0  # long enough that a test that waited it out would be unmistakable


@dataclass
class _Message:
    offset: int
    timestamp: int  # ms since the epoch, like Kafka's CreateTime
    headers: tuple[tuple[str, bytes], ...] = ()


class _Fetcher:
    """Returns the scripted fetches in order, then nothing; records each call's timeout."""

    def __init__(self, *fetches: list[_Message]) -> None:
        self.fetches = deque(fetches)
        self.timeouts: list[int] = []

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[_Message]]:
        self.timeouts.append(timeout_ms)
        if self.fetches:
            return {("t", 0): self.fetches.popleft()}
        await asyncio.sleep(0)  # an empty fetch returns at once here: the loop must not spin on it
        return {}


EARLY = WINDOW / 5
EARLY_EVENTS = 3


def _consumer(fetcher: _Fetcher, window: float = WINDOW) -> consumer.RecorderConsumer:
    c = consumer.RecorderConsumer.__new__(consumer.RecorderConsumer)
    c._settings = RecorderSettings(
        batch_max_seconds=window, batch_early_seconds=EARLY, batch_early_events=EARLY_EVENTS
    )
    c._consumer = fetcher
    c._carry = []
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


async def _still_collecting(*fetches: list[_Message]) -> tuple[int, int]:
    """Starts collecting ``fetches``; checks the batch is still open after a few polls, then
    stops it. Returns how long (ms) the second poll was to wait, and how many messages the batch
    held when stopped."""
    fetcher = _Fetcher(*fetches)
    c = _consumer(fetcher)
    task = asyncio.ensure_future(c._collect())
    deadline = time.monotonic() + WINDOW / 2
    while len(fetcher.timeouts) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0)
    assert not task.done()
    c._stopping.set()
    return fetcher.timeouts[1], len(await asyncio.wait_for(task, timeout=WINDOW))


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


@pytest.mark.parametrize("chunks", [0, EARLY_EVENTS * 2])
async def test_a_small_batch_waits_past_the_early_window(chunks: int) -> None:
    # Streamed chunks are not stored: however many come along, they do not make a batch busy.
    waited_ms, held = await _still_collecting(
        [_at(EARLY + 0.5, 0)] + [_at(EARLY + 0.5, n, chunk=True) for n in range(1, chunks + 1)]
    )
    # It waits for what is left of the full window, not of the early one.
    assert (WINDOW - EARLY - 0.5) * 1000 * 0.8 < waited_ms <= (WINDOW - EARLY) * 1000
    assert held == 1 + chunks


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
    left = c._due(c._produced([_at(produced_ago)], now), size) - now
    assert left == pytest.approx(expected_left, abs=0.05)


def test_the_oldest_message_counts_and_missing_timestamps_count_as_now() -> None:
    c = _consumer(_Fetcher())
    now = time.monotonic()
    assert c._produced([_at(0.0, 0), _at(WINDOW, 1)], now) == pytest.approx(now - WINDOW, abs=0.05)
    assert c._produced([_Message(0, -1)], now) == pytest.approx(now, abs=0.05)


def test_the_early_window_never_exceeds_the_full_one() -> None:
    c = _consumer(_Fetcher(), window=EARLY / 2)
    now = time.monotonic()
    assert c._due(now, EARLY_EVENTS) == pytest.approx(now + EARLY / 2)
