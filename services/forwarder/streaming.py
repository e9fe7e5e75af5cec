"""Streamed answers (``stream: true``): checked and masked on the fly, relayed over Kafka.

The forwarder reads the upstream's server-sent events, runs each through :class:`StreamGuard`
and hands the frames the caller may see to :class:`ChunkRelay`, which produces them as
``CallReply`` messages of kind ``chunk`` (numbered by ``seq``) to the waiting ingress replica's
reply partition. Nothing leaves the forwarder before the guard saw it:

* **Text** (``text_delta``) is masked with the types policy chose for the caller
  (``response_mask_upstream``) by a :class:`~skillgate.policy.streaming.StreamTextMasker` per
  block: a value split across deltas is still found, and only the tail that could still become a
  value is held back (in prose, the last word), so text keeps flowing.
* **Tool calls** (``tool_use``, ``server_tool_use``, ``mcp_tool_use`` blocks) are held whole,
  from ``content_block_start`` to ``content_block_stop``, and checked against the bundle's
  ``tool_rules`` with the same function as non-streamed answers
  (:func:`~services.forwarder.guard.find_blocked_tools`). A ``block_tool`` match replaces the
  block by a text block with the explanation (same index; a final ``stop_reason: tool_use``
  becomes ``end_turn`` when no tool call is left); a ``block_response`` match ends the stream
  with an ``error`` event (``permission_error`` naming the rule). An allowed tool call is
  relayed as it came, or as one ``input_json_delta`` of its masked input when masking changed it.
* **Thinking** deltas and signatures pass unchanged (signatures must stay valid, and the
  non-streamed path does not mask thinking either); so do ``ping``, ``message_*`` and unknown
  events, which keeps the SDKs' stream helpers working.

Unchanged frames are relayed byte for byte; changed ones are re-serialised. The guard also
assembles the whole message (unmasked, in memory only): when the stream ends, the forwarder
runs the non-streamed response guard over it, so the record of a streamed call has the same
shape, masking and blocked-tool list as that of a non-streamed one.

:class:`ChunkRelay` batches: whatever frames are queued when it sends go out as one chunk
message, with a bounded number of chunks awaiting their ack (pipelined in order by the
producer), so a slow stream goes out delta by delta without waiting and a fast one becomes
fewer, bigger records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition

from services.forwarder.approvals import ToolApprovals
from services.forwarder.guard import (
    TOOL_BLOCKS,
    ResponsePolicy,
    find_blocked_tools,
    refusal_message,
)
from skillgate import events, topics
from skillgate.codec import AvroCodec, CodecError
from skillgate.config import KafkaSettings
from skillgate.errors import sse_error_frame
from skillgate.events import CALL_CANCELLED, CALL_REPLY, CallDecided, CallReply, MaskedValue
from skillgate.kafka import make_consumer, stop_reader
from skillgate.policy.masking import mask_citation, mask_citations
from skillgate.policy.streaming import StreamTextMasker

log = logging.getLogger(__name__)

__all__ = [
    "CancelWatcher",
    "ChunkRelay",
    "SSEEvent",
    "SSEParser",
    "StreamGuard",
    "end_reply",
    "sse_frame",
]


def sse_frame(name: str, data: Any) -> bytes:
    """One server-sent event as the Messages API writes it."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One parsed server-sent event: its name, its data (JSON, or ``None``) and its raw bytes."""

    name: str
    data: Any
    raw: bytes


class SSEParser:
    """Splits a byte stream into server-sent events (any of ``\\n``, ``\\r\\n`` line ends)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Events completed by ``chunk`` (a partial event waits for the next chunk)."""
        self._buffer += chunk
        if b"\r" in self._buffer:
            self._buffer = self._buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[SSEEvent] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return out
            frame, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            event = _parse_frame(frame)
            if event is not None:
                out.append(event)

    @property
    def leftover(self) -> bytes:
        """Bytes of an event that never completed (the stream ended mid-event)."""
        return self._buffer


def _parse_frame(frame: bytes) -> SSEEvent | None:
    name = "message"
    data_lines: list[bytes] = []
    for line in frame.split(b"\n"):
        if not line or line.startswith(b":"):
            continue  # comment / keep-alive
        key, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if key == b"event":
            name = value.decode("utf-8", "replace")
        elif key == b"data":
            data_lines.append(value)
    if not data_lines and name == "message":
        return None
    raw_data = b"\n".join(data_lines)
    try:
        data = orjson.loads(raw_data) if raw_data else None
    except orjson.JSONDecodeError:
        data = None
    return SSEEvent(name, data, frame + b"\n\n")


@dataclass
class _HeldTool:
    """A tool block held until it is complete: its start event, input JSON text, raw frames."""

    start: dict[str, Any]
    json_parts: list[str] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)


class StreamGuard:
    """Applies the response guard to one stream, event by event (see the module docstring).

    ``event`` returns the frames the caller may get now. ``message`` is the assembled answer
    (unmasked: it only feeds the record's guard, in memory). After ``refused`` (a
    ``block_response`` rule) or ``error`` (the upstream sent an ``error`` event) the caller's
    stream is over. Raises (like :func:`~services.forwarder.guard.guard_response`) when a
    block cannot be checked; the forwarder then ends the stream with an ``error`` event.
    """

    def __init__(
        self,
        policy: ResponsePolicy,
        mask_upstream: Collection[str],
        *,
        holdback_cap: int,
        max_hold: int,
        seed: Collection[MaskedValue] = (),
        approvals: ToolApprovals | None = None,
    ) -> None:
        detectors = policy.masker.detectors
        self._policy = policy
        self._approvals = approvals
        self._types = detectors.types_for(None, mask_upstream) if mask_upstream else frozenset()
        self._session = policy.masker.session(seed)
        self._holdback_cap = holdback_cap
        self._max_hold = max_hold
        self._maskers: dict[int, StreamTextMasker] = {}
        self._held: dict[int, _HeldTool] = {}
        self._check_tools = bool(policy.bundle.tool_rules) or bool(self._types)
        self.message: dict[str, Any] = {}
        self._blocks: dict[int, dict[str, Any]] = {}
        #: Text and thinking deltas of each block, joined only when assembled (appending to a
        #: growing string would copy the whole answer at every delta).
        self._grown: dict[tuple[int, str], list[str]] = {}
        self._json: dict[int, list[str]] = {}
        self.tools_blocked = 0
        self.tools_passed = 0
        self.refused = False
        self.error: dict[str, Any] | None = None
        self.stopped = False  # message_stop seen

    # -- events ------------------------------------------------------------------------------

    def event(self, ev: SSEEvent) -> list[bytes]:
        """The frames for the caller that ``ev`` releases (in order)."""
        if self.refused or self.error is not None:
            return []
        data = ev.data if isinstance(ev.data, dict) else {}
        kind = data.get("type", ev.name)
        if kind == "message_start":
            message = data.get("message")
            self.message = dict(message) if isinstance(message, dict) else {}
            return [ev.raw]
        if kind == "content_block_start":
            return self._block_start(ev, data)
        if kind == "content_block_delta":
            return self._block_delta(ev, data)
        if kind == "content_block_stop":
            return self._block_stop(ev, data)
        if kind == "message_delta":
            return self._message_delta(ev, data)
        if kind == "message_stop":
            self.stopped = True
            return [ev.raw]
        if kind == "error":
            self.error = data.get("error") if isinstance(data.get("error"), dict) else {"type": "api_error"}
            return [ev.raw]
        return [ev.raw]  # ping and events this version does not know: relayed as they came

    def assembled(self) -> dict[str, Any]:
        """The whole answer as a non-streamed response would carry it (for the record)."""
        message = dict(self.message)
        message["content"] = [self.assembled_block(index) for index in sorted(self._blocks)]
        return message

    # -- blocks ------------------------------------------------------------------------------

    def _block_start(self, ev: SSEEvent, data: dict[str, Any]) -> list[bytes]:
        index = int(data.get("index", len(self._blocks)))
        block = data.get("content_block") if isinstance(data.get("content_block"), dict) else {}
        assert isinstance(block, dict)
        self._blocks[index] = dict(block)
        btype = block.get("type")
        if btype in TOOL_BLOCKS:
            self._json[index] = []
            if self._check_tools:
                self._held[index] = _HeldTool(start=data, frames=[ev.raw])
                return []
        elif btype == "text" and self._types:
            masked_block = mask_citations(block, f"content[{index}]", self._mask_text)
            if masked_block is not block:
                changed = {**data, "content_block": masked_block}
                ev = SSEEvent(ev.name, changed, sse_frame("content_block_start", changed))
            self._maskers[index] = StreamTextMasker(
                self._session,
                self._policy.masker.detectors,
                self._types,
                cap=self._holdback_cap,
                max_hold=self._max_hold,
                location=f"content[{index}].text",
            )
        return [ev.raw]

    def _block_delta(self, ev: SSEEvent, data: dict[str, Any]) -> list[bytes]:
        index = int(data.get("index", 0))
        delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
        assert isinstance(delta, dict)
        dtype = delta.get("type")
        block = self._blocks.setdefault(index, {"type": "text", "text": ""})
        if dtype == "text_delta":
            text = str(delta.get("text", ""))
            self._grown.setdefault((index, "text"), []).append(text)
            masker = self._maskers.get(index)
            if masker is None:
                return [ev.raw]
            released = masker.feed(text)
            return [_text_delta(index, released)] if released else []
        if dtype == "input_json_delta":
            self._json.setdefault(index, []).append(str(delta.get("partial_json", "")))
            held = self._held.get(index)
            if held is not None:
                held.frames.append(ev.raw)
                return []
            return [ev.raw]
        if dtype == "thinking_delta":
            self._grown.setdefault((index, "thinking"), []).append(str(delta.get("thinking", "")))
        elif dtype == "signature_delta":
            block["signature"] = str(delta.get("signature", ""))
        elif dtype == "citations_delta":
            citations = block.setdefault("citations", [])
            if isinstance(citations, list):
                citations.append(delta.get("citation"))
                masked = self._mask_citation(delta.get("citation"), index, len(citations) - 1)
                if masked is not delta.get("citation"):
                    changed = {**data, "delta": {**delta, "citation": masked}}
                    return [*self._flush_text(index), sse_frame("content_block_delta", changed)]
        held = self._held.get(index)
        if held is not None:
            held.frames.append(ev.raw)
            return []
        # Anything else in a text block comes after the text released so far.
        return [*self._flush_text(index), ev.raw]

    def _mask_citation(self, citation: Any, index: int, number: int) -> Any:
        """A citation with its quoted text, titles and URL masked as a whole answer's would be
        (:func:`~skillgate.policy.masking.mask_citation`); itself when nothing changed."""
        if not self._types:
            return citation
        return mask_citation(citation, f"content[{index}].citations[{number}]", self._mask_text)

    def _mask_text(self, text: str, location: str) -> str:
        """``text`` masked for the caller (itself when nothing was found)."""
        result = self._session.mask_text(text, location=location, types=self._types)
        return result.text if result.masked else text

    def _block_stop(self, ev: SSEEvent, data: dict[str, Any]) -> list[bytes]:
        index = int(data.get("index", 0))
        held = self._held.pop(index, None)
        if held is not None:
            return self._tool_done(index, held, ev)
        return [*self._flush_text(index), ev.raw]

    def _flush_text(self, index: int) -> list[bytes]:
        masker = self._maskers.get(index)
        if masker is None:
            return []
        rest = masker.flush()
        return [_text_delta(index, rest)] if rest else []

    def _tool_done(self, index: int, held: _HeldTool, stop: SSEEvent) -> list[bytes]:
        """A held tool block is complete: check it, then release it, replace it or refuse."""
        block = self.assembled_block(index)
        matches = find_blocked_tools(self._policy.bundle.tool_rules, [block], self._approvals)
        if matches and matches[0].action == "block_response":
            self.refused = True
            self.tools_blocked += 1
            return [sse_error_frame("permission_error", refusal_message(matches))]
        if matches:
            self.tools_blocked += 1
            explanation = matches[0].explanation
            return [
                sse_frame(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                ),
                _text_delta(index, explanation),
                stop.raw,
            ]
        self.tools_passed += 1 if block.get("type") == "tool_use" else 0
        if self._types:
            masked = self._session.mask_response({"content": [block]}, types=self._types)
            if masked.masked:
                new_input = masked.body["content"][0].get("input", {})
                start = dict(held.start)
                start["content_block"] = {**block, "input": {}}
                return [
                    sse_frame("content_block_start", start),
                    sse_frame(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {
                                "type": "input_json_delta",
                                "partial_json": orjson.dumps(new_input).decode(),
                            },
                        },
                    ),
                    stop.raw,
                ]
        return [*held.frames, stop.raw]

    def assembled_block(self, index: int) -> dict[str, Any]:
        """Block ``index`` as assembled so far (text joined, tool input parsed)."""
        block = dict(self._blocks.get(index, {}))
        for name in ("text", "thinking"):
            grown = self._grown.get((index, name))
            if grown is not None:
                block[name] = str(block.get(name, "")) + "".join(grown)
        parts = self._json.get(index)
        if parts is not None:
            text = "".join(parts)
            try:
                block["input"] = orjson.loads(text) if text.strip() else {}
            except orjson.JSONDecodeError:
                block["input"] = {"partial_json": text}
        return block

    def _message_delta(self, ev: SSEEvent, data: dict[str, Any]) -> list[bytes]:
        delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
        assert isinstance(delta, dict)
        for key in ("stop_reason", "stop_sequence"):
            if key in delta:
                self.message[key] = delta[key]
        usage = data.get("usage")
        if isinstance(usage, dict):
            merged = dict(self.message.get("usage") or {})
            merged.update({k: v for k, v in usage.items() if v is not None})
            self.message["usage"] = merged
        if delta.get("stop_reason") == "tool_use" and self.tools_blocked and not self.tools_passed:
            self.message["stop_reason"] = "end_turn"  # nothing left for the caller to run
            changed = dict(data)
            changed["delta"] = {**delta, "stop_reason": "end_turn"}
            return [sse_frame("message_delta", changed)]
        return [ev.raw]


def _text_delta(index: int, text: str) -> bytes:
    return sse_frame(
        "content_block_delta",
        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}},
    )


# -- relaying chunks over Kafka -------------------------------------------------------------------


class ChunkRelay:
    """Produces a stream's frames as ``CallReply`` chunks to the caller's reply partition.

    Frames queued while the relay is busy go out together as the next chunk (up to
    ``max_chunk_bytes``). Up to ``in_flight`` chunk messages may await their ack at once: the
    producer pipelines them in order (one batch per partition in flight, idempotent), so a chunk
    does not wait a whole broker round trip for the one before it; beyond that, the relay waits
    for the oldest ack and frames accumulate into bigger chunks. ``seq`` numbers the messages
    from 0; the first carries the status and headers. :meth:`close` waits for every ack.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        codec: AvroCodec,
        decided: CallDecided,
        headers: dict[str, str],
        *,
        max_chunk_bytes: int,
        in_flight: int = 8,
    ) -> None:
        self._producer = producer
        self._in_flight = max(1, in_flight)
        self._codec = codec
        self._decided = decided
        self._headers = headers
        self._max = max_chunk_bytes
        self._frames: list[bytes] = []
        self._wake = asyncio.Event()
        self._closed = False
        self.seq = 0
        self.frames_sent = 0
        self._task = asyncio.create_task(self._run(), name=f"relay-{decided['call_id']}")

    def add(self, frames: list[bytes]) -> None:
        """Queue frames for the caller (sent as soon as the previous chunk is acked)."""
        if frames:
            self._frames.extend(frames)
            self._wake.set()

    async def close(self) -> None:
        """Send what is queued and wait for every ack (raises if Kafka refused a chunk)."""
        self._closed = True
        self._wake.set()
        await self._task

    async def abort(self) -> None:
        """Stop relaying (the caller is gone): queued frames are dropped."""
        self._frames.clear()
        self._closed = True
        self._wake.set()
        with contextlib.suppress(Exception):
            await self._task

    async def _run(self) -> None:
        reply_to = self._decided["reply_to"]
        acks: deque[asyncio.Future[Any]] = deque()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while acks and acks[0].done():
                acks.popleft().result()  # raises if Kafka refused a chunk
            while self._frames:
                take, size = 0, 0
                while take < len(self._frames) and (take == 0 or size + len(self._frames[take]) <= self._max):
                    size += len(self._frames[take])
                    take += 1
                body = b"".join(self._frames[:take])
                del self._frames[:take]
                if reply_to is not None:
                    reply = self._reply(body)
                    acks.append(
                        await self._producer.send(
                            reply_to["topic"],
                            self._codec.encode(CALL_REPLY, reply),
                            key=self._decided["session_id"].encode(),
                            partition=reply_to["partition"],
                            headers=[(topics.KIND_HEADER, topics.CHUNK_KIND)],
                        )
                    )
                    while len(acks) >= self._in_flight:
                        await acks.popleft()
                self.seq += 1
                self.frames_sent += take
            if self._closed:
                while acks:
                    await acks.popleft()
                return

    def _reply(self, body: bytes) -> CallReply:
        d = self._decided
        return CallReply(
            **events.envelope(
                d["call_id"],
                d["session_id"],
                d["identity"],
                d["bundle_version"],
                event_id=events.derived_event_id(d["call_id"], f"chunk-{self.seq}"),
            ),
            kind="chunk",
            seq=self.seq,
            status=200,
            headers=self._headers if self.seq == 0 else {},
            body=body,
            terminal_state=None,
        )


def end_reply(decided: CallDecided, seq: int, terminal_state: str) -> CallReply:
    """The last message of a stream: nothing more follows ``seq - 1`` (its id derives from the
    call, so a reprocessed call yields the same event)."""
    return CallReply(
        **events.envelope(
            decided["call_id"],
            decided["session_id"],
            decided["identity"],
            decided["bundle_version"],
            event_id=events.derived_event_id(decided["call_id"], "reply"),
        ),
        kind="end",
        seq=seq,
        status=200,
        headers={},
        body=b"",
        terminal_state=terminal_state,
    )


# -- cancellations ----------------------------------------------------------------------------------


class CancelWatcher:
    """Reads ``calls.cancelled`` (all partitions, no group: every replica sees every message)
    and tells the stream of a cancelled call to stop.

    A cancellation may arrive before its call's stream starts here (policy still deciding, or
    this replica was down or still starting when the caller left): cancellations are
    remembered for ``remember_seconds``, and :meth:`start` reads those of the last
    ``remember_seconds`` up to the end of the topic before it returns, so a decision handled
    after the start sees every cancellation produced before it, and its stream stops (or never
    starts) as it should.
    """

    def __init__(
        self, kafka: KafkaSettings, topic: str, codec: AvroCodec, remember_seconds: float = 600.0
    ) -> None:
        self._kafka = kafka
        self._topic = topic
        self._codec = codec
        self._remember = remember_seconds
        self._streams: dict[str, asyncio.Event] = {}
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    def watch(self, call_id: str) -> asyncio.Event:
        """An event set when ``call_id`` is cancelled (already set if it was)."""
        event = asyncio.Event()
        if call_id in self._recent:
            event.set()
        self._streams[call_id] = event
        return event

    def unwatch(self, call_id: str) -> None:
        """The stream of ``call_id`` ended."""
        self._streams.pop(call_id, None)

    def cancel(self, call_id: str) -> None:
        """Mark ``call_id`` cancelled (what a ``CallCancelled`` message does)."""
        now = time.monotonic()
        self._recent[call_id] = now
        while self._recent and next(iter(self._recent.values())) < now - self._remember:
            self._recent.popitem(last=False)
        event = self._streams.get(call_id)
        if event is not None:
            event.set()

    async def start(self, catch_up_seconds: float = 30.0) -> None:
        """Read the cancellations of the last ``remember_seconds`` up to the topic's end, then
        follow it.

        Why not just "from the end": a caller that left while this replica was down or starting
        (its call still queued) would be missed, and its call forwarded for nobody. Subscribed
        without a group, the consumer gets every partition (and those a growing topic adds, read
        from their start). Catching up is bounded by ``catch_up_seconds``; past it the replica
        starts anyway (a missed cancellation costs an unneeded upstream call, not a leak) and
        says so.
        """
        consumer = make_consumer(self._kafka, None, auto_offset_reset="earliest", fetch_max_wait_ms=50)
        await consumer.start()
        consumer.subscribe([self._topic])
        self._consumer = consumer
        try:
            await asyncio.wait_for(self._catch_up(), catch_up_seconds)
        except TimeoutError:
            log.warning("cancellations not read up to the end in time; following from here")
        self._task = asyncio.create_task(self._run(), name="cancel-watcher")

    async def _catch_up(self) -> None:
        """Seek every partition to ``remember_seconds`` ago and read up to its end offset."""
        assert self._consumer is not None
        consumer = self._consumer
        while not consumer.assignment():  # the group-less assignment follows the first metadata
            self._read(await consumer.getmany(timeout_ms=100))
        tps = sorted(consumer.assignment())
        since_ms = int((time.time() - self._remember) * 1000)
        found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            offset = found.get(tp)
            consumer.seek(tp, offset.offset if offset is not None else ends[tp])
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                self._read(await consumer.getmany(tp, timeout_ms=500))

    async def stop(self) -> None:
        """Stop reading."""
        await stop_reader(self._task, self._consumer)

    def _read(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        for records in batches.values():
            for record in records:
                try:
                    _, event = self._codec.decode(record.value, expected=CALL_CANCELLED)
                except CodecError:
                    continue
                self.cancel(str(event["call_id"]))

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading cancellations failed; retrying")
                await asyncio.sleep(0.5)  # retry backoff while Kafka is unreachable
                continue
            self._read(batches)
