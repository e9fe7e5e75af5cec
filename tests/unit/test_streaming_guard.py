"""The stream guard and text hold-back on real SSE streams (the stub upstream's own event
generator), cut into pieces at arbitrary byte positions: secrets split across deltas, held
tool calls, blocked commands, and the assembled message that feeds the record."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from services.forwarder.guard import ResponsePolicy, guard_response
from services.forwarder.streaming import SSEEvent, SSEParser, StreamGuard
from services.stub_upstream.handlers import (
    Reply,
    TextPart,
    ToolUsePart,
    sse_frame,
    stream_events,
)
from skillgate.policy.bundle import DEFAULT_BUNDLE, load_bundle, parse_bundle
from skillgate.policy.detectors import DetectorSet
from skillgate.policy.masking import Masker
from skillgate.policy.streaming import StreamTextMasker, holdback_chars, max_match_chars

KEY = b"k" * 32
GITHUB = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"
REFUSE_BUNDLE = """
name: stream-test
version: "1"
tool_rules:
  - id: no-prod-sql
    tools: ["*sql*"]
    patterns: ['(?i)\\bprod\\b']
    action: block_response
    reason: touches production
"""


@pytest.fixture(scope="module")
def policy() -> ResponsePolicy:
    return ResponsePolicy.build(load_bundle(DEFAULT_BUNDLE), KEY)


def stream_bytes(*parts: TextPart | ToolUsePart, chunk_chars: int = 8) -> bytes:
    stop = "tool_use" if any(isinstance(p, ToolUsePart) for p in parts) else "end_turn"
    reply = Reply("msg_1", "claude-test", tuple(parts), stop, 10, 20)
    return b"".join(sse_frame(name, data) for name, data in stream_events(reply, chunk_chars))


def run(
    policy: ResponsePolicy, raw: bytes, types: list[str], seed: int = 0
) -> tuple[list[SSEEvent], StreamGuard]:
    """Feed ``raw`` in random byte pieces through parser and guard; the caller's events."""
    rng = random.Random(seed)
    guard = StreamGuard(policy, types, holdback_cap=256, max_hold=16384)
    parser, out_parser = SSEParser(), SSEParser()
    out: list[SSEEvent] = []
    pos = 0
    while pos < len(raw):
        step = rng.randint(1, 40)
        for event in parser.feed(raw[pos : pos + step]):
            for frame in guard.event(event):
                out += out_parser.feed(frame)
        pos += step
    assert parser.leftover == b"" and out_parser.leftover == b""
    return out, guard


def caller_text(events: list[SSEEvent]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for e in events:
        if e.name == "content_block_delta" and e.data["delta"]["type"] == "text_delta":
            texts[e.data["index"]] = texts.get(e.data["index"], "") + e.data["delta"]["text"]
    return texts


def secret_types(policy: ResponsePolicy) -> list[str]:
    return sorted(policy.masker.detectors.types_for(["secret", "pii"]))


@pytest.mark.parametrize("seed", range(5))
def test_secret_split_across_deltas_is_masked(policy: ResponsePolicy, seed: int) -> None:
    text = f"Here is the key {GITHUB} and mail ada.lovelace@example.org, bye."
    events, guard = run(policy, stream_bytes(TextPart(text), chunk_chars=5), secret_types(policy), seed)
    out = caller_text(events)[0]
    assert GITHUB not in out and GITHUB[:12] not in out and "example.org" not in out
    assert out == "Here is the key [GITHUB_TOKEN_1] and mail [EMAIL_1], bye."
    # the event sequence is the Anthropic one, whole
    names = [e.name for e in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 1
    # the record is assembled from the unmasked stream and masked by the ordinary guard
    assert guard.assembled()["content"][0]["text"] == text
    record = guard_response(
        policy,
        200,
        {"content-type": "application/json"},
        orjson.dumps(guard.assembled()),
        mask_upstream=secret_types(policy),
        mask_record=[],
    )
    assert GITHUB.encode() not in record.record_body
    assert {m["type"] for m in record.masked} == {"GITHUB_TOKEN", "EMAIL"}


def test_text_flows_before_the_block_ends(policy: ResponsePolicy) -> None:
    """Only the hold-back window is held: a long answer is released while it streams."""
    text = "word " * 400
    raw = stream_bytes(TextPart(text), chunk_chars=8)
    guard = StreamGuard(policy, secret_types(policy), holdback_cap=256, max_hold=16384)
    released_before_stop = 0
    for event in SSEParser().feed(raw):
        frames = guard.event(event)
        if event.name == "content_block_delta":
            released_before_stop += sum(len(f) for f in frames)
    assert guard.holdback == 256
    assert released_before_stop > len(text) - guard.holdback  # all but the window, in flight


def test_nothing_masked_means_byte_for_byte(policy: ResponsePolicy) -> None:
    raw = stream_bytes(TextPart("plain words only"), chunk_chars=4)
    events, _ = run(policy, raw, [])
    assert b"".join(e.raw for e in events) == raw


def test_blocked_command_never_reaches_the_caller(policy: ResponsePolicy) -> None:
    raw = stream_bytes(
        TextPart("I'll use the bash tool."),
        ToolUsePart("toolu_1", "bash", {"command": "rm -rf / --no-preserve-root"}),
        chunk_chars=3,
    )
    events, guard = run(policy, raw, secret_types(policy))
    joined = b"".join(e.raw for e in events)
    assert b"rm -rf" not in joined and b"input_json_delta" not in joined
    texts = caller_text(events)
    assert texts[1].startswith("[skillgate blocked tool call bash: destructive shell command")
    starts = [e.data["content_block"]["type"] for e in events if e.name == "content_block_start"]
    assert starts == ["text", "text"]
    [delta] = [e.data["delta"] for e in events if e.name == "message_delta"]
    assert delta["stop_reason"] == "end_turn"
    assert guard.tools_blocked == 1


def test_allowed_tool_call_is_released_whole_after_its_check(policy: ResponsePolicy) -> None:
    tool_input = {"command": "ls -la /tmp"}
    raw = stream_bytes(ToolUsePart("toolu_2", "bash", tool_input), chunk_chars=3)
    guard = StreamGuard(policy, secret_types(policy), holdback_cap=256, max_hold=16384)
    released: list[bytes] = []
    for event in SSEParser().feed(raw):
        frames = guard.event(event)
        if event.name == "content_block_delta":
            assert frames == []  # held until the block is complete
        released += frames
    out = SSEParser().feed(b"".join(released))
    partial = "".join(
        e.data["delta"]["partial_json"]
        for e in out
        if e.name == "content_block_delta" and e.data["delta"]["type"] == "input_json_delta"
    )
    assert orjson.loads(partial) == tool_input
    [delta] = [e.data["delta"] for e in out if e.name == "message_delta"]
    assert delta["stop_reason"] == "tool_use"


def test_secret_in_tool_input_is_masked(policy: ResponsePolicy) -> None:
    raw = stream_bytes(ToolUsePart("toolu_3", "http_get", {"token": GITHUB}), chunk_chars=3)
    events, _ = run(policy, raw, secret_types(policy))
    joined = b"".join(e.raw for e in events)
    assert GITHUB.encode() not in joined and b"[GITHUB_TOKEN_1]" in joined


def test_block_response_ends_the_stream_with_an_error() -> None:
    policy = ResponsePolicy.build(parse_bundle(REFUSE_BUNDLE, "t.yaml"), KEY)
    raw = stream_bytes(TextPart("ok"), ToolUsePart("toolu_4", "run_sql", {"q": "drop table prod.users"}))
    events, guard = run(policy, raw, [])
    assert events[-1].name == "error"
    assert events[-1].data["error"]["type"] == "permission_error"
    assert "no-prod-sql" in events[-1].data["error"]["message"]
    assert guard.refused and b"prod.users" not in b"".join(e.raw for e in events)


def test_upstream_error_event_is_relayed_and_remembered(policy: ResponsePolicy) -> None:
    raw = stream_bytes(TextPart("hello there"))
    cut = raw.index(b"event: content_block_stop")
    error = sse_frame(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    events, guard = run(policy, raw[:cut] + error, secret_types(policy))
    assert events[-1].name == "error" and guard.error == {"type": "overloaded_error", "message": "Overloaded"}
    assert not guard.stopped


def test_parser_handles_crlf_and_comments() -> None:
    parser = SSEParser()
    got = parser.feed(b': keep-alive\r\n\r\nevent: ping\r\ndata: {"type": "ping"}\r\n\r\nevent: x\r\nda')
    assert [(e.name, e.data) for e in got] == [("ping", {"type": "ping"})]
    assert parser.leftover.startswith(b"event: x")


# -- the hold-back window ---------------------------------------------------------------------------


def test_pattern_widths() -> None:
    assert max_match_chars(r"AKIA[0-9A-Z]{16}", 256) == 20
    assert max_match_chars(r"sk-ant-[A-Za-z0-9]{20,}", 256) == 256
    assert max_match_chars(r"[\x{00C0}-\x{024F}]{2,5}", 256) == 5
    detectors = DetectorSet()
    assert holdback_chars(detectors, [], 256) == 0
    assert holdback_chars(detectors, ["AWS_ACCESS_KEY"], 256) == 20
    assert holdback_chars(detectors, ["EMAIL"], 100) == 100


@pytest.mark.parametrize("size", [1, 2, 7, 19, 64])
def test_masker_output_equals_whole_text_masking(size: int) -> None:
    detectors = DetectorSet()
    masker = Masker(detectors, KEY)
    types = detectors.types_for(["secret", "pii"])
    text = (f"token {GITHUB}; mail bob@example.com; call +44 20 7946 0958. " * 4) + "tail " * 60
    whole = masker.session().mask_text(text, types=types).text
    stream = StreamTextMasker(masker.session(), detectors, types, holdback=holdback_chars(detectors, types))
    pieces: list[Any] = [stream.feed(text[i : i + size]) for i in range(0, len(text), size)]
    pieces.append(stream.flush())
    assert "".join(pieces) == whole
    assert GITHUB not in "".join(pieces)


def test_a_value_still_growing_is_held_past_the_window() -> None:
    detectors = DetectorSet()
    masker = Masker(detectors, KEY)
    stream = StreamTextMasker(masker.session(), detectors, ["GITHUB_TOKEN"], holdback=10)
    out = stream.feed("x " * 20 + GITHUB)
    assert "ghp_" not in out and stream.held >= len(GITHUB)
    out += stream.feed("ZZZZ more text " * 3) + stream.flush()
    assert GITHUB not in out and "[GITHUB_TOKEN_1]" in out
