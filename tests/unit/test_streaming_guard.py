"""The stream guard and text hold-back on real SSE streams (the stub upstream's own event
generator), cut into pieces at arbitrary byte positions: secrets split across deltas, held
tool calls, blocked commands, and the assembled message that feeds the record."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
import re2

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
from skillgate.policy.streaming import (
    StreamTextMasker,
    holdback_chars,
    live_tail,
    max_match_chars,
    prefix_pattern,
)

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


def record_of(policy: ResponsePolicy, guard: StreamGuard) -> Any:
    """What the forwarder records for a stream: the assembled answer through the ordinary guard."""
    return guard_response(
        policy,
        200,
        {"content-type": "application/json"},
        orjson.dumps(guard.assembled()),
        mask_upstream=secret_types(policy),
        mask_record=[],
    )


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
    record = record_of(policy, guard)
    assert GITHUB.encode() not in record.record_body
    assert {m["type"] for m in record.masked} == {"GITHUB_TOKEN", "EMAIL"}


def test_text_flows_before_the_block_ends(policy: ResponsePolicy) -> None:
    """Only what could still become a value is held: prose is released delta by delta, at most
    its last (unfinished) word behind the model."""
    text = "The quick brown fox jumps over the lazy dog. " * 20
    raw = stream_bytes(TextPart(text), chunk_chars=8)
    guard = StreamGuard(policy, secret_types(policy), holdback_cap=256, max_hold=16384)
    received, released = 0, ""
    for event in SSEParser().feed(raw):
        frames = guard.event(event)
        if event.name == "content_block_delta":
            received += len(event.data["delta"]["text"])
            for frame in frames:
                released += orjson.loads(frame.split(b"data: ", 1)[1])["delta"]["text"]
            assert received - len(released) <= len("jumps") + 8  # the unfinished word, at most
    assert released == text[: len(released)] and len(released) >= len(text) - 8


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
    stream = StreamTextMasker(masker.session(), detectors, types)
    pieces: list[Any] = [stream.feed(text[i : i + size]) for i in range(0, len(text), size)]
    pieces.append(stream.flush())
    assert "".join(pieces) == whole
    assert GITHUB not in "".join(pieces)


def test_a_value_still_growing_is_held_until_it_ends() -> None:
    detectors = DetectorSet()
    masker = Masker(detectors, KEY)
    stream = StreamTextMasker(masker.session(), detectors, ["GITHUB_TOKEN"])
    out = stream.feed("x " * 20 + GITHUB)
    assert out == "x " * 20 and "ghp_" not in out and stream.held == len(GITHUB)
    out += stream.feed("ZZZZ more text " * 3) + stream.flush()
    assert GITHUB not in out and "[GITHUB_TOKEN_1]" in out


# Values of many types, each in a sentence: every one must be masked wherever the stream cuts.
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu3aozN3tihPmljnnudb9G3HcjdL3\n"
    "T0sSV2UJ0Y1NCfAOvTx0fQ0yUjHmqx1v8lfnpmvZkqVyNRaEIuBw5ZaYbFoYxSzd\n-----END RSA PRIVATE KEY-----"
)
SAMPLES = [
    f"Use {GITHUB} for the repo.",
    "The AWS key is AKIAIOSFODNN7EXAMPLF, rotate it.",
    "export ANTHROPIC_API_KEY=sk-ant-api03-Zx8Qw2Lk9Jh7Gf5Ds3Ap1Mn6Bv4Cx0Zq8Wr done",
    f"Here it is:\n{PEM}\nKeep it safe.",
    "Write to ada.lovelace@example.org today.",
    "Call me at +44 20 7946 0958 tonight.",
    "password = Tr0ub4dor&3xK9!qZ and more",
    "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U end",
]


def masked_whole(masker: Masker, types: frozenset[str], text: str) -> str:
    return masker.session().mask_text(text, types=types).text


@pytest.mark.parametrize("sample", SAMPLES)
def test_a_value_split_at_every_point_is_masked(sample: str) -> None:
    """Two deltas, cut at every position of the text (so inside every value): the caller gets
    exactly what masking the whole text gives, and never a piece of the value."""
    detectors = DetectorSet()
    masker = Masker(detectors, KEY)
    types = detectors.types_for(["secret", "pii"])
    whole = masked_whole(masker, types, sample)
    assert whole != sample  # the sample does hold a value
    found = [f.value for f in detectors.scan(sample, types=types)]
    for cut in range(1, len(sample)):
        stream = StreamTextMasker(masker.session(), detectors, types)
        first = stream.feed(sample[:cut])
        out = first + stream.feed(sample[cut:]) + stream.flush()
        assert out == whole, cut
        for value in found:
            # nothing released early holds a start of the value that the rest completes
            assert not any(value[:n] in first for n in range(4, len(value) + 1) if value[:n] not in whole)


@pytest.mark.parametrize("sample", SAMPLES)
def test_a_value_fed_character_by_character_is_masked(sample: str) -> None:
    detectors = DetectorSet()
    masker = Masker(detectors, KEY)
    types = detectors.types_for(["secret", "pii"])
    stream = StreamTextMasker(masker.session(), detectors, types)
    out = "".join(stream.feed(ch) for ch in sample) + stream.flush()
    assert out == masked_whole(masker, types, sample)


def test_a_pem_block_is_held_from_its_begin_line_until_it_ends() -> None:
    detectors = DetectorSet()
    masker = Masker(detectors, KEY)
    stream = StreamTextMasker(masker.session(), detectors, ["PRIVATE_KEY"])
    text = f"Here it is:\n{PEM}\nKeep it safe."
    end = text.index("-----END")
    out = stream.feed(text[:end])
    assert out == "Here it is:\n"  # the block is held whole while it streams
    out += stream.feed(text[end:]) + stream.flush()
    assert "MIIE" not in out and out.startswith("Here it is:\n[PRIVATE_KEY_1]")


def test_prefix_patterns_accept_every_prefix_of_every_match() -> None:
    """The hold-back rests on :func:`prefix_pattern`: each prefix of a real match of a
    built-in pattern is one of its prefixes (else a cut there would release part of it)."""
    detectors = DetectorSet()
    text = " \n ".join(SAMPLES) + " 4111 1111 1111 1111 DE89 3704 0044 0532 0130 00 123-45-6789 10.1.2.3"
    checked = 0
    for patterns in detectors.patterns().values():
        for pattern in patterns:
            prefix = prefix_pattern(pattern)
            assert prefix is not None, pattern
            regex, whole = re2.compile(f"(?:{prefix})"), re2.compile(pattern)
            for match in whole.finditer(text):
                value = match.group(0)
                for n in range(len(value) + 1):
                    assert regex.fullmatch(value[:n]) is not None, (pattern, n)
                checked += 1
    assert checked >= len(SAMPLES)


def test_live_tail_holds_only_what_could_still_be_a_value() -> None:
    detectors = DetectorSet()
    types = detectors.types_for(["secret", "pii"])
    patterns = detectors.patterns()
    tail = live_tail(frozenset(p for t in types for p in patterns[t]))
    assert tail.cap == 0  # every built-in pattern is analysed
    for text, held in [
        ("The quick brown fox jumps", "jumps"),
        ("The quick brown fox jumps ", ""),
        ("the key ghp_aB3", "ghp_aB3"),
        ("see -----BEGIN RSA PRI", "-----BEGIN RSA PRI"),
        ("mail ada.lovelace@exa", "ada.lovelace@exa"),
    ]:
        assert text[tail.start(text) :] == held, text


def test_unanalysable_patterns_fall_back_to_the_window() -> None:
    assert prefix_pattern(r"[[:alpha:]]{30,}") is None
    tail = live_tail(frozenset({r"[[:alpha:]]{30,}"}), 100)
    assert tail.cap == 100 and tail.start("x" * 150) == 50


# -- citations --------------------------------------------------------------------------------------

CITED = "Ada's address is ada.lovelace@example.org and her key " + GITHUB


def cited_stream() -> bytes:
    """A cited answer as the API streams it: the citation arrives whole in a citations_delta."""
    citation = {
        "type": "char_location",
        "cited_text": CITED,
        "document_index": 0,
        "document_title": "notes of ada.lovelace@example.org",
        "start_char_index": 0,
        "end_char_index": len(CITED),
    }
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "m",
                    "usage": {},
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": "", "citations": []},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "citations_delta", "citation": citation},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "She lives there."},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(sse_frame(name, data) for name, data in events)


def test_streamed_citations_are_masked(policy: ResponsePolicy) -> None:
    events, guard = run(policy, cited_stream(), secret_types(policy))
    deltas = [e.data["delta"] for e in events if e.name == "content_block_delta"]
    citation = next(d["citation"] for d in deltas if d["type"] == "citations_delta")
    assert citation["cited_text"] == "Ada's address is [EMAIL_1] and her key [GITHUB_TOKEN_1]"
    assert citation["document_title"] == "notes of [EMAIL_1]"
    assert citation["end_char_index"] == len(CITED)  # positions refer to the source: unchanged
    caller = b"".join(e.raw for e in events)
    assert b"example.org" not in caller and GITHUB.encode() not in caller
    # the record: the assembled answer keeps the citation, masked by the ordinary guard
    assert guard.assembled()["content"][0]["citations"][0]["cited_text"] == CITED
    record = record_of(policy, guard)
    assert b"example.org" not in record.record_body and GITHUB.encode() not in record.record_body


def test_whole_answer_citations_are_masked(policy: ResponsePolicy) -> None:
    body = {
        "content": [
            {
                "type": "text",
                "text": "She lives there.",
                "citations": [
                    {
                        "type": "web_search_result_location",
                        "cited_text": CITED,
                        "url": "https://example.com/ada",
                        "title": "ada.lovelace@example.org",
                        "encrypted_index": "abc",
                    }
                ],
            },
        ]
    }
    masked = policy.masker.mask_response(body, types=secret_types(policy))
    citation = masked.body["content"][0]["citations"][0]
    assert citation["cited_text"] == "Ada's address is [EMAIL_1] and her key [GITHUB_TOKEN_1]"
    assert citation["title"] == "[EMAIL_1]" and citation["encrypted_index"] == "abc"
    assert masked.body["content"][0]["text"] == "She lives there."
    assert {m["location"] for m in masked.masked} == {
        "content[0].citations[0].cited_text",
        "content[0].citations[0].title",
    }
