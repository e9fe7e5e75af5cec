"""How the recorder's fetch buffer cuts batches at a common time across partitions.

With a backlog, Kafka hands the recorder far more of a partition of small events than of one of
large events, so a batch cut by count alone holds one event each of many calls, and each call is
folded and rewritten several times. :class:`TimeAlignedBuffer` cuts batches at the frontier (how
far every partition still behind has been read) instead. What must hold whatever the frontier:
each partition's messages come out in offset order (the recorder commits a batch's highest
offsets), none is lost or taken twice, and a batch is never held back forever. Plain tuples stand
for aiokafka's ``TopicPartition`` and a small dataclass for its ``ConsumerRecord``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest

from services.recorder.alignment import LIVE_SECONDS, Frontier, TimeAlignedBuffer

Part = tuple[str, int]

SUBMITTED: Part = ("calls.submitted", 0)
DECIDED: Part = ("calls.decided", 0)
COMPLETED: Part = ("calls.completed", 0)
FAILED: Part = ("calls.failed", 0)
#: Seconds a partition behind may send nothing before it stops holding the frontier.
QUIET = 1.0
EVERY: frozenset[Part] = frozenset({SUBMITTED, DECIDED, COMPLETED, FAILED})


def _cut(ms: int, *behind: Part) -> Frontier:
    """A frontier at ``ms`` holding ``behind`` (every partition when none is named)."""
    return Frontier(ms, frozenset(behind) or EVERY)


@dataclass(frozen=True)
class _Message:
    partition: Part
    offset: int
    timestamp: int  # ms, like Kafka's CreateTime; -1 when the message has none
    stored: bool = True  # what the buffer's ``counts`` predicate reads
    call: int = -1


def _messages(partition: Part, timestamps: Iterable[int], start: int = 0) -> list[_Message]:
    """Messages of ``partition`` at consecutive offsets from ``start``."""
    return [_Message(partition, start + i, ts) for i, ts in enumerate(timestamps)]


def _buffer(*batches: Sequence[_Message]) -> TimeAlignedBuffer:
    """A buffer counting the ``stored`` messages, holding ``batches`` (each of one partition)."""
    buffer = TimeAlignedBuffer(lambda m: bool(m.stored))
    for messages in batches:
        buffer.add(messages[0].partition, messages)
    return buffer


def _keys(batch: Iterable[_Message]) -> list[tuple[str, int]]:
    """A batch as (topic, offset) pairs: a failure then shows which messages came out where."""
    return [(m.partition[0], m.offset) for m in batch]


def _by_partition(batch: Iterable[_Message]) -> dict[Part, list[int]]:
    offsets: dict[Part, list[int]] = {}
    for m in batch:
        offsets.setdefault(m.partition, []).append(m.offset)
    return offsets


def test_with_nothing_behind_a_batch_is_everything_oldest_first() -> None:
    a = _messages(SUBMITTED, [100, 400, 700])
    b = _messages(DECIDED, [200, 500, 800])
    c = [*_messages(COMPLETED, [300, 600]), _Message(COMPLETED, 2, 900, stored=False)]
    buffer = _buffer(a, b, c)
    assert (len(buffer), buffer.events) == (9, 8)

    assert buffer.frontier([], QUIET) is None  # every partition read up to its end
    assert buffer.ready(None) == 9
    assert buffer.ahead(None) == set()

    first = buffer.take(4, None)
    assert [m.timestamp for m in first] == [100, 200, 300, 400]
    assert (len(buffer), buffer.events) == (5, 4)

    rest = buffer.take(100, None)
    assert [m.timestamp for m in rest] == [500, 600, 700, 800, 900]
    assert _by_partition(first + rest) == {SUBMITTED: [0, 1, 2], DECIDED: [0, 1, 2], COMPLETED: [0, 1, 2]}
    assert (len(buffer), buffer.events) == (0, 0)
    assert buffer.take(100, None) == []


def test_the_frontier_is_the_earliest_read_until_of_the_partitions_behind() -> None:
    buffer = _buffer(
        _messages(SUBMITTED, [100, 300, 250]),  # read until 300 (the clock went back)
        _messages(DECIDED, [150, 200]),  # read until 200
        _messages(COMPLETED, [50]),  # read until 50, but caught up: holds nothing back
    )
    assert buffer.frontier([SUBMITTED, DECIDED], QUIET) == _cut(200, SUBMITTED, DECIDED)
    assert buffer.frontier([SUBMITTED], QUIET) == _cut(300, SUBMITTED)
    assert buffer.frontier([SUBMITTED, DECIDED, COMPLETED], QUIET) == _cut(50, SUBMITTED, DECIDED, COMPLETED)
    # A partition behind that nothing was read from yet holds the frontier at its start.
    assert buffer.frontier([SUBMITTED, FAILED], QUIET) == _cut(0, SUBMITTED, FAILED)

    # Taking messages does not unread them: the frontier stays where the reading got to.
    buffer.take(100, None)
    assert len(buffer) == 0
    assert buffer.frontier([SUBMITTED, DECIDED], QUIET) == _cut(200, SUBMITTED, DECIDED)

    # Reading more of a partition moves its read-until.
    buffer.add(DECIDED, _messages(DECIDED, [260, 280], start=2))
    assert buffer.frontier([SUBMITTED, DECIDED], QUIET) == _cut(280, SUBMITTED, DECIDED)


def test_a_partition_behind_that_sends_nothing_stops_holding_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # E.g. a gap compaction left at the end of a partition: its high watermark says there is
    # more, yet no fetch ever returns anything.
    clock = [1000.0]
    monkeypatch.setattr("services.recorder.alignment.time.monotonic", lambda: clock[0])
    buffer = _buffer(_messages(SUBMITTED, [100, 200]), _messages(DECIDED, [50]))
    buffer.take(1, None)  # DECIDED's buffer is now empty, SUBMITTED still holds both
    assert buffer.frontier([SUBMITTED, DECIDED], QUIET) == _cut(50, SUBMITTED, DECIDED)
    clock[0] += QUIET + 0.1  # DECIDED silent for longer than QUIET
    assert buffer.frontier([SUBMITTED, DECIDED], QUIET) == _cut(
        200, SUBMITTED
    )  # SUBMITTED still has a message
    assert buffer.frontier([DECIDED, FAILED], QUIET) == _cut(0, FAILED)  # FAILED first seen just now
    clock[0] += QUIET + 0.1
    assert buffer.frontier([DECIDED, FAILED], QUIET) is None
    buffer.add(DECIDED, _messages(DECIDED, [400], start=1))  # it speaks again: it counts again
    assert buffer.frontier([DECIDED, FAILED], QUIET) == _cut(400, DECIDED)  # and FAILED has been quiet


def test_revoked_partitions_are_forgotten_with_their_messages() -> None:
    buffer = _buffer(_messages(SUBMITTED, [100, 200]), _messages(DECIDED, [50, 150]))
    buffer.forget([DECIDED, FAILED])  # FAILED was never seen: nothing to do
    assert (len(buffer), buffer.events, buffer.oldest_timestamp()) == (2, 2, 100)
    buffer.retain({COMPLETED})
    assert (len(buffer), buffer.events, buffer.oldest_timestamp()) == (0, 0, 0)
    assert buffer.take(10, None) == []


def test_a_batch_takes_each_partition_up_to_the_frontier_and_never_skips() -> None:
    # SUBMITTED's 30 and 40 are before the frontier but after 50, which is past it: they wait.
    a = _messages(SUBMITTED, [10, 20, 50, 30, 40])
    b = _messages(DECIDED, [15, 25, 35, 45])
    buffer = _buffer(a, b)
    assert buffer.ready(_cut(40)) == 5

    first = buffer.take(4, _cut(40))
    assert _keys(first) == [
        ("calls.submitted", 0),
        ("calls.decided", 0),
        ("calls.submitted", 1),
        ("calls.decided", 1),
    ]
    assert buffer.ready(_cut(40)) == 1
    second = buffer.take(4, _cut(40))
    assert _keys(second) == [("calls.decided", 2)]
    assert buffer.ready(_cut(40)) == 0  # SUBMITTED's next (50) and DECIDED's next (45) are past it

    third = buffer.take(2, _cut(50))
    assert _keys(third) == [("calls.decided", 3), ("calls.submitted", 2)]
    rest = buffer.take(100, _cut(50))  # 30 and 40 follow 50: in offset order, as soon as they can
    assert _keys(rest) == [("calls.submitted", 3), ("calls.submitted", 4)]

    taken = first + second + third + rest
    assert _by_partition(taken) == {SUBMITTED: [0, 1, 2, 3, 4], DECIDED: [0, 1, 2, 3]}
    assert len(buffer) == 0


def _calls(partition: Part, calls: range, delay: int) -> list[_Message]:
    """One event of each of ``calls`` on ``partition``: call ``i`` starts at 1000 + 10 i ms and
    its event on this topic is ``delay`` ms later."""
    return [_Message(partition, i, 1000 + 10 * i + delay, call=i) for i in calls]


def test_a_partition_read_far_ahead_waits_for_the_ones_behind() -> None:
    # Large SUBMITTED events are read slowly, small COMPLETED ones fast; all three have a backlog.
    buffer = _buffer(
        _calls(SUBMITTED, range(10), 0),  # read until call 9: 1090
        _calls(DECIDED, range(12), 3),  # read until call 11: 1113
        _calls(COMPLETED, range(80), 6),  # read until call 79: 1796
    )
    frontier = buffer.frontier([SUBMITTED, DECIDED, COMPLETED], QUIET)
    assert frontier == _cut(1090, SUBMITTED, DECIDED, COMPLETED)  # SUBMITTED's read-until: the slowest
    assert buffer.ahead(frontier) == {DECIDED, COMPLETED}  # the consumer reads SUBMITTED only

    ready = buffer.ready(frontier)
    batch = buffer.take(10_000, frontier)
    assert len(batch) == ready == 10 + 9 + 9
    assert frontier is not None and max(m.timestamp for m in batch) <= frontier.time
    assert [m.timestamp for m in batch] == sorted(m.timestamp for m in batch)
    # Calls 0..8 are whole in this batch; only call 9's start, nothing of any later call.
    assert {m.call for m in batch} == set(range(10))
    assert all(sum(m.call == i for m in batch) == 3 for i in range(9))
    assert len(buffer) == 3 + 71

    # Left for later batches: exactly DECIDED's calls 9..11 and COMPLETED's 9..79.
    assert buffer.ahead(frontier) == {DECIDED, COMPLETED}
    assert buffer.ready(frontier) == 0
    left = buffer.take(10_000, None)
    assert _by_partition(left) == {DECIDED: [9, 10, 11], COMPLETED: list(range(9, 80))}


def test_a_partition_caught_up_holds_nothing_back_and_its_live_traffic_goes_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SUBMITTED has a long backlog (its leader came back, say). DECIDED is caught up and live.
    # COMPLETED is caught up too, but what it gathered while the recorder was down is old.
    clock = [1000.0]
    monkeypatch.setattr("services.recorder.alignment.time.monotonic", lambda: clock[0])
    now_ms = 10_000 + int(LIVE_SECONDS * 1000)  # live: read within LIVE_SECONDS, from 10,000 ms
    buffer = TimeAlignedBuffer(wall_clock=lambda: now_ms / 1000)
    buffer.assign([SUBMITTED, DECIDED, COMPLETED])
    buffer.add(SUBMITTED, _messages(SUBMITTED, [100, 200, 300]))
    buffer.add(DECIDED, _messages(DECIDED, [now_ms - 200, now_ms - 100]))
    buffer.add(COMPLETED, _messages(COMPLETED, [150, 9_000, now_ms - 150]))
    ends = {SUBMITTED: 5000, DECIDED: 2, COMPLETED: 3}

    behind, unknown = buffer.behind(ends, 500, QUIET)
    assert (behind, unknown) == ([SUBMITTED], False)
    frontier = buffer.frontier(behind, QUIET)
    assert frontier == _cut(300, SUBMITTED)
    # DECIDED is read on, though far past the frontier; COMPLETED is not (its old 9,000 waits for
    # the frontier, and whatever it sends next would wait behind it) ...
    assert buffer.ahead(frontier) == {COMPLETED}
    # ... and ready: DECIDED's live messages whatever their time; COMPLETED's up to the
    # frontier (150), then its old 9,000 waits for the frontier, and its live message behind it.
    assert buffer.ready(frontier) == 3 + 2 + 1
    # Caught-up partitions first: live traffic is recorded while SUBMITTED catches up.
    assert _keys(buffer.take(3, frontier)) == [
        ("calls.completed", 0),
        ("calls.decided", 0),
        ("calls.decided", 1),
    ]
    assert [m.timestamp for m in buffer.take(10, frontier)] == [100, 200, 300]
    assert buffer.ready(frontier) == 0

    buffer.add(SUBMITTED, _messages(SUBMITTED, [9_100], start=3))
    frontier = buffer.frontier(behind, QUIET)
    assert frontier == _cut(9_100, SUBMITTED)
    assert [m.timestamp for m in buffer.take(10, frontier)] == [9_000, now_ms - 150, 9_100]


def test_assigning_a_partition_again_drops_what_was_buffered_of_it() -> None:
    buffer = _buffer(_messages(SUBMITTED, [100, 200]), _messages(DECIDED, [150]))
    buffer.assign([SUBMITTED, FAILED])  # aiokafka reads SUBMITTED again from the last commit
    assert (len(buffer), buffer.events, buffer.oldest_timestamp()) == (1, 1, 150)
    assert _keys(buffer.take(10, None)) == [("calls.decided", 0)]
    assert buffer.behind({SUBMITTED: 900, DECIDED: 1}, 500, QUIET) == ([SUBMITTED], True)


def test_behind_is_told_by_offsets_read_and_unknown_backlogs_count_for_a_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("services.recorder.alignment.time.monotonic", lambda: clock[0])
    buffer = TimeAlignedBuffer()
    buffer.assign([SUBMITTED, DECIDED, COMPLETED, FAILED])
    # Offsets as a compacted topic has them: the position is after the last one read.
    buffer.add(SUBMITTED, [_Message(SUBMITTED, 0, 100), _Message(SUBMITTED, 7, 110)])
    buffer.add(DECIDED, _messages(DECIDED, [100, 120], start=40))
    ends = {SUBMITTED: 508, DECIDED: 541, COMPLETED: None, FAILED: 900}

    # SUBMITTED: 500 left past offset 8; DECIDED: 499 past 42. COMPLETED has not been fetched
    # and FAILED has sent nothing since its assignment: their backlogs are unknown, so for now
    # they count as behind and not read (holding the frontier at their start).
    assert buffer.behind(ends, 500, QUIET) == ([SUBMITTED, COMPLETED, FAILED], True)
    assert buffer.behind(ends, 499, QUIET) == ([SUBMITTED, DECIDED, COMPLETED, FAILED], True)
    assert buffer.frontier([SUBMITTED, COMPLETED, FAILED], QUIET) == _cut(0, SUBMITTED, COMPLETED, FAILED)

    # After the grace, a partition that sent nothing counts as caught up: idle, or unreachable,
    # it holds no batch back for longer.
    clock[0] += QUIET + 0.1
    assert buffer.behind(ends, 500, QUIET) == ([SUBMITTED], False)
    # Taking messages does not move the position back; being assigned again starts afresh.
    buffer.take(100, None)
    assert buffer.behind(ends, 500, QUIET) == ([SUBMITTED], False)
    buffer.assign([SUBMITTED])
    assert buffer.behind(ends, 500, QUIET) == ([SUBMITTED], True)
    buffer.add(SUBMITTED, [_Message(SUBMITTED, 300, 150)])
    assert buffer.behind(ends, 500, QUIET) == ([], False)  # 207 left: caught up


def test_a_batch_is_never_held_back_forever() -> None:
    buffer = _buffer(_messages(SUBMITTED, [300, 500]), _messages(DECIDED, [200, 400, 600]))
    assert buffer.ready(_cut(100)) == 0  # the frontier is before every buffered message

    batch = buffer.take(3, _cut(100))
    assert [m.timestamp for m in batch] == [200, 300, 400]  # the oldest, up to the limit
    assert len(buffer) == 2
    assert [m.timestamp for m in buffer.take(3, _cut(100))] == [500, 600]
    assert len(buffer) == 0


def test_a_clock_going_backwards_keeps_each_partition_in_offset_order() -> None:
    a = _messages(SUBMITTED, [100, 300, 200, 250, 400])
    b = _messages(DECIDED, [150, 260, 350])

    # SUBMITTED's 200 and 250 come after its 300 (the running maximum), never before it.
    everything = _buffer(a, b).take(100, None)
    assert [m.timestamp for m in everything] == [100, 150, 260, 300, 200, 250, 350, 400]

    buffer = _buffer(a, b)
    assert [m.timestamp for m in buffer.take(100, _cut(250))] == [100, 150]  # 300 stops SUBMITTED
    taken: list[_Message] = []
    while len(buffer):
        batch = buffer.take(2, None)
        assert batch
        taken += batch
    assert [m.timestamp for m in taken] == [260, 300, 200, 250, 350, 400]
    assert _by_partition(taken) == {SUBMITTED: [1, 2, 3, 4], DECIDED: [1, 2]}


def test_oldest_timestamp_skips_messages_without_one_and_follows_takes() -> None:
    buffer = TimeAlignedBuffer(lambda m: bool(m.stored))
    assert (buffer.oldest_timestamp(), buffer.events) == (0, 0)

    buffer.add(SUBMITTED, [_Message(SUBMITTED, 0, -1), _Message(SUBMITTED, 1, 0)])
    assert buffer.oldest_timestamp() == 0  # no buffered message has a timestamp
    buffer.add(
        DECIDED,
        [_Message(DECIDED, 0, 700), _Message(DECIDED, 1, 300, stored=False), _Message(DECIDED, 2, 500)],
    )
    buffer.add(COMPLETED, [_Message(COMPLETED, 0, 400, stored=False), _Message(COMPLETED, 1, -1)])
    assert buffer.oldest_timestamp() == 300
    assert (len(buffer), buffer.events) == (7, 5)

    first = buffer.take(3, None)
    assert _keys(first) == [("calls.submitted", 0), ("calls.submitted", 1), ("calls.completed", 0)]
    assert buffer.oldest_timestamp() == 300
    assert (len(buffer), buffer.events) == (4, 3)

    second = buffer.take(2, None)
    assert _keys(second) == [("calls.completed", 1), ("calls.decided", 0)]
    assert buffer.oldest_timestamp() == 300
    assert (len(buffer), buffer.events) == (2, 1)

    third = buffer.take(1, None)
    assert _keys(third) == [("calls.decided", 1)]  # the 300 not counted as an event
    assert buffer.oldest_timestamp() == 500  # recomputed from what is left
    assert (len(buffer), buffer.events) == (1, 1)

    buffer.take(1, None)
    assert (buffer.oldest_timestamp(), len(buffer), buffer.events) == (0, 0, 0)


def _random_partition(rng: random.Random, partition: Part) -> list[_Message]:
    """A partition's messages: timestamps mostly rising, sometimes going back, sometimes -1."""
    messages = []
    clock = rng.randrange(1000, 1100)
    for offset in range(rng.randrange(0, 60)):
        clock += rng.randrange(-30, 60)
        timestamp = -1 if rng.random() < 0.05 else clock
        messages.append(_Message(partition, offset, timestamp, stored=rng.random() < 0.8))
    return messages


@pytest.mark.parametrize("seed", range(40))
def test_any_adds_and_takes_give_every_message_once_in_offset_order(seed: int) -> None:
    rng = random.Random(seed)
    partitions: list[Part] = [(f"topic{i}", rng.randrange(3)) for i in range(rng.randrange(1, 5))]
    source = {p: _random_partition(rng, p) for p in partitions}
    read = dict.fromkeys(partitions, 0)  # how many of each partition's messages were added
    out: dict[Part, list[_Message]] = {p: [] for p in partitions}
    buffer = TimeAlignedBuffer(lambda m: bool(m.stored))

    def check() -> None:
        buffered = [m for p in partitions for m in source[p][len(out[p]) : read[p]]]
        assert len(buffer) == len(buffered)
        assert buffer.events == sum(m.stored for m in buffered)
        assert buffer.oldest_timestamp() == min((m.timestamp for m in buffered if m.timestamp > 0), default=0)

    def take(limit: int, frontier: Frontier | None) -> None:
        size, ready = len(buffer), buffer.ready(frontier)
        batch = buffer.take(limit, frontier)
        if ready:
            assert len(batch) == min(limit, ready)
            if frontier is not None:
                behind = [m.partition in frontier.holds for m in batch]
                assert behind == sorted(behind)  # the partitions caught up first
                assert all(m.timestamp <= frontier.time for m in batch if m.partition in frontier.holds)
        else:
            assert len(batch) == min(limit, size)  # never held back
        for m in batch:
            out[m.partition].append(m)
        for p in partitions:  # a prefix of what was read: in order, nothing skipped or repeated
            assert out[p] == source[p][: len(out[p])]
            assert len(out[p]) <= read[p]
        check()

    for _ in range(200):
        if rng.random() < 0.5:
            p = rng.choice(partitions)
            n = rng.randrange(0, 8)
            buffer.add(p, source[p][read[p] : read[p] + n])
            read[p] = min(read[p] + n, len(source[p]))
            check()
        else:
            behind = rng.sample(partitions, rng.randrange(0, len(partitions) + 1))
            cut = Frontier(rng.randrange(900, 3000), frozenset(behind))
            frontier = rng.choice([None, cut, buffer.frontier(behind, QUIET)])
            take(rng.randrange(0, 12), frontier)

    for p in partitions:  # read the rest, then drain
        buffer.add(p, source[p][read[p] :])
        read[p] = len(source[p])
    while len(buffer):
        take(rng.randrange(1, 12), rng.choice([None, Frontier(1000, frozenset(partitions))]))
    assert out == source
