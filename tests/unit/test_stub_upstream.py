"""The stub upstream, driven by the official ``anthropic`` SDK over real HTTP (uvicorn, 127.0.0.1).

If the SDK can create, stream, retry and fail against the stub exactly as against
api.anthropic.com, the gateway's tests can trust the stub as "Anthropic". Raw ``httpx`` calls check
what the SDK hides: SSE framing, headers, error bodies and the ``/_stub`` control endpoints.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam, TextBlock, ThinkingBlock, ToolUseBlock
from pydantic import SecretStr

from services.stub_upstream.app import create_app
from services.stub_upstream.config import StubSettings
from services.stub_upstream.handlers import (
    Reply,
    ScenarioBook,
    StubRequestError,
    TextPart,
    ToolUsePart,
    content_text,
    estimate_tokens,
    parse_status_list,
    stream_events,
)
from tests.servers import serve_asgi

MODEL = "claude-stub-test"
CHUNK = 8
STUB_KEY = "stub-secret-key"
HEALTH_PATH = "/_stub/health"
#: Event-loop timers may fire a millisecond or so early; timing asserts keep this margin.
TIMER_SLACK = 0.9


# ------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    """A stub accepting any API key, splitting streamed text into 8-character deltas."""
    app = create_app(StubSettings(stream_chunk_chars=CHUNK))
    with serve_asgi(app, health_path=HEALTH_PATH, name="stub-upstream") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def keyed_stub_url() -> Iterator[str]:
    """A stub that only accepts ``STUB_KEY``."""
    app = create_app(StubSettings(api_key=SecretStr(STUB_KEY)))
    with serve_asgi(app, health_path=HEALTH_PATH, name="stub-upstream") as base_url:
        yield base_url


@pytest.fixture
def client(stub_url: str) -> anthropic.Anthropic:
    """The official SDK pointed at the stub, without retries (tests opt in)."""
    return anthropic.Anthropic(base_url=stub_url, api_key="test-key", max_retries=0)


# ----------------------------------------------------------------------------- helpers


def _user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def _text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if isinstance(block, TextBlock))


def _post(base_url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    """POST /v1/messages with a key (unless ``headers`` replaces it) and a JSON or raw body."""
    all_headers = {"x-api-key": "test-key", **(headers or {})}
    if isinstance(body, bytes):
        return httpx.post(f"{base_url}/v1/messages", content=body, headers=all_headers)
    return httpx.post(f"{base_url}/v1/messages", json=body, headers=all_headers)


def _body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 64, "messages": _user(text), **extra}


def _recorded(base_url: str, marker: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{base_url}/_stub/requests", params={"contains": marker})
    assert response.status_code == 200
    records: list[dict[str, Any]] = response.json()
    return records


def _sse_frames(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Split an SSE body into (event, data), insisting on ``event: X\\ndata: {json}`` frames."""
    frames = []
    assert text.endswith("\n\n")
    for frame in text[:-2].split("\n\n"):
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        frames.append((event_line[len("event: ") :], json.loads(data_line[len("data: ") :])))
    return frames


def _error_body(exc: anthropic.APIStatusError) -> dict[str, Any]:
    assert isinstance(exc.body, dict)
    return exc.body


# ------------------------------------------------------------------------ echo + stream


def test_create_echoes_last_user_text(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=64, messages=_user("hello stub"))
    message = raw.parse()

    assert raw.headers["request-id"].startswith("req_")
    assert message.id.startswith("msg_")
    assert message.model == MODEL
    assert (message.role, message.stop_reason, message.stop_sequence) == (
        "assistant",
        "end_turn",
        None,
    )
    assert len(message.content) == 1 and isinstance(message.content[0], TextBlock)
    assert message.content[0].text == "echo: hello stub"
    assert message.usage.input_tokens == len("hello stub") // 4
    assert message.usage.output_tokens == len("echo: hello stub") // 4


def test_echo_reads_text_and_tool_result_blocks_of_the_last_user_turn(
    client: anthropic.Anthropic,
) -> None:
    messages: list[MessageParam] = [
        {"role": "user", "content": "an old question that must not be echoed"},
        {"role": "assistant", "content": "an old answer"},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "file contents"},
                {"type": "text", "text": "now summarise"},
            ],
        },
    ]
    message = client.messages.create(model=MODEL, max_tokens=64, system="be brief " * 10, messages=messages)

    assert _text_of(message) == "echo: file contents\nnow summarise"
    prompt_chars = len("be brief " * 10) + len("an old question that must not be echoed")
    prompt_chars += len("an old answer") + len("file contents\nnow summarise")
    assert message.usage.input_tokens == prompt_chars // 4


def test_stream_text_matches_the_non_streamed_message(client: anthropic.Anthropic) -> None:
    prompt = "stream this sentence back in several small pieces"
    created = client.messages.create(model=MODEL, max_tokens=64, messages=_user(prompt))

    with client.messages.stream(model=MODEL, max_tokens=64, messages=_user(prompt)) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()

    assert len(pieces) == -(-len(f"echo: {prompt}") // CHUNK)
    assert all(0 < len(piece) <= CHUNK for piece in pieces)
    assert "".join(pieces) == _text_of(final) == _text_of(created) == f"echo: {prompt}"
    assert final.stop_reason == "end_turn"
    assert final.id.startswith("msg_") and final.id != created.id
    assert final.usage.input_tokens == created.usage.input_tokens
    assert final.usage.output_tokens == created.usage.output_tokens


async def test_async_client_streams_too(stub_url: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=stub_url, api_key="test-key", max_retries=0)
    async with client.messages.stream(model=MODEL, max_tokens=64, messages=_user("async hello")) as stream:
        pieces = [piece async for piece in stream.text_stream]
    await client.close()
    assert "".join(pieces) == "echo: async hello"


def test_raw_sse_follows_anthropics_event_sequence(stub_url: str) -> None:
    response = _post(stub_url, _body("raw frames please", stream=True))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["request-id"].startswith("req_")
    frames = _sse_frames(response.text)
    names = [name for name, _ in frames]
    text = "echo: raw frames please"
    deltas = -(-len(text) // CHUNK)
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in frames)
    start = frames[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["model"] == MODEL
    assert start["usage"]["output_tokens"] == 1
    assert start["usage"]["input_tokens"] == len("raw frames please") // 4
    assert frames[1][1]["content_block"] == {"type": "text", "text": ""}
    deltas_data = [data["delta"] for name, data in frames if name == "content_block_delta"]
    assert "".join(delta["text"] for delta in deltas_data) == text
    message_delta = frames[-2][1]
    assert message_delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert message_delta["usage"]["output_tokens"] == len(text) // 4


# ---------------------------------------------------------------------------- tool_use


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("trigger", ["header", "prompt"])
def test_tool_use_reply(client: anthropic.Anthropic, trigger: str, streamed: bool) -> None:
    tool_input = {"path": "/etc/hosts", "lines": [1, 2, 3]}
    if trigger == "header":
        headers = {"x-stub-tool-use": "read_file", "x-stub-tool-input": json.dumps(tool_input)}
        prompt = "read the file"
    else:
        headers = {}
        prompt = f"read the file\nSTUB_TOOL_USE read_file {json.dumps(tool_input)}\nthanks"

    partials: list[str] = []
    if streamed:
        with client.messages.stream(
            model=MODEL, max_tokens=64, messages=_user(prompt), extra_headers=headers
        ) as stream:
            for event in stream:
                if event.type == "input_json":
                    partials.append(event.partial_json)
            message: anthropic.types.Message = stream.get_final_message()
        assert len(partials) > 2
        assert json.loads("".join(partials)) == tool_input
    else:
        message = client.messages.create(
            model=MODEL, max_tokens=64, messages=_user(prompt), extra_headers=headers
        )

    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["text", "tool_use"]
    tool = message.content[1]
    assert isinstance(tool, ToolUseBlock)
    assert tool.id.startswith("toolu_")
    assert (tool.name, tool.input) == ("read_file", tool_input)


def test_tool_use_header_alone_uses_the_default_input(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=64, messages=_user("go"), extra_headers={"x-stub-tool-use": "bash"}
    )
    tool = message.content[-1]
    assert isinstance(tool, ToolUseBlock)
    assert (tool.name, tool.input) == ("bash", {"command": "echo hello"})


def test_tool_result_turn_ends_the_tool_loop(client: anthropic.Anthropic) -> None:
    """After the caller sends the tool result, the stub answers text (no endless tool loop)."""
    first = client.messages.create(model=MODEL, max_tokens=64, messages=_user("list\nSTUB_TOOL_USE bash"))
    tool = first.content[-1]
    assert isinstance(tool, ToolUseBlock) and tool.input == {"command": "echo hello"}
    second = client.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[
            *_user("list\nSTUB_TOOL_USE bash"),
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "hello"}],
            },
        ],
    )
    assert second.stop_reason == "end_turn"
    assert _text_of(second) == "echo: hello"


def test_bad_tool_input_is_a_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="x-stub-tool-input"):
        client.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=_user("go"),
            extra_headers={"x-stub-tool-use": "bash", "x-stub-tool-input": "[1, 2]"},
        )


# ---------------------------------------------------------------------------- thinking


def test_thinking_stream_sends_thinking_and_signature_deltas(client: anthropic.Anthropic) -> None:
    thinking_pieces: list[str] = []
    signatures: list[str] = []
    with client.messages.stream(
        model=MODEL, max_tokens=64, messages=_user("ponder this STUB_THINKING")
    ) as stream:
        for event in stream:
            if event.type == "thinking":
                thinking_pieces.append(event.thinking)
            elif event.type == "signature":
                signatures.append(event.signature)
        final = stream.get_final_message()

    assert [block.type for block in final.content] == ["thinking", "text"]
    thinking = final.content[0]
    assert isinstance(thinking, ThinkingBlock)
    assert len(thinking_pieces) > 1
    assert "".join(thinking_pieces) == thinking.thinking
    assert len(signatures) == 1 and signatures[0] == thinking.signature != ""
    assert _text_of(final) == "echo: ponder this STUB_THINKING"


# ---------------------------------------------------------------------- failure control


def test_sdk_retries_through_an_injected_429(client: anthropic.Anthropic, stub_url: str) -> None:
    marker = f"retry-{uuid.uuid4()}"
    message = client.with_options(max_retries=2).messages.create(
        model=MODEL,
        max_tokens=64,
        messages=_user(marker),
        extra_headers={"x-stub-fail": "429", "x-stub-scenario": marker},
    )

    assert _text_of(message) == f"echo: {marker}"
    records = _recorded(stub_url, marker)
    assert [record["status"] for record in records] == [429, 200]
    assert [record["headers"]["x-stainless-retry-count"] for record in records] == ["0", "1"]


def test_429_carries_retry_after_and_the_error_shape(stub_url: str) -> None:
    response = _post(
        stub_url,
        _body("limited"),
        {"x-stub-fail": "429", "x-stub-retry-after": "7", "x-stub-scenario": str(uuid.uuid4())},
    )

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["message"]
    assert body["request_id"] == response.headers["request-id"]


def test_scenario_fails_in_order_then_succeeds(stub_url: str) -> None:
    headers = {"x-stub-fail": "429, 529,500", "x-stub-scenario": str(uuid.uuid4())}
    responses = [_post(stub_url, _body("in order"), headers) for _ in range(5)]

    assert [r.status_code for r in responses] == [429, 529, 500, 200, 200]
    assert [r.json()["error"]["type"] for r in responses[:3]] == [
        "rate_limit_error",
        "overloaded_error",
        "api_error",
    ]
    assert responses[0].headers["retry-after"] == "0"
    assert "retry-after" not in responses[1].headers


def test_529_surfaces_as_overloaded_without_retries(client: anthropic.Anthropic) -> None:
    for _ in range(2):  # no scenario id: every request fails, not only the first
        with pytest.raises(anthropic.InternalServerError) as caught:
            client.messages.create(
                model=MODEL,
                max_tokens=64,
                messages=_user("busy?"),
                extra_headers={"x-stub-fail": "529"},
            )
        assert caught.value.status_code == 529
        assert _error_body(caught.value)["error"]["type"] == "overloaded_error"
        assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")


def test_mid_stream_error_event_raises_in_the_sdk(client: anthropic.Anthropic) -> None:
    pieces: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        client.messages.stream(
            model=MODEL,
            max_tokens=64,
            messages=_user("a long prompt that will be cut"),
            extra_headers={"x-stub-stream-error-after": "2"},
        ) as stream,
    ):
        for piece in stream.text_stream:
            pieces.append(piece)

    assert pieces == ["echo: a ", "long pro"]
    assert _error_body(caught.value)["error"]["type"] == "overloaded_error"


def test_bad_control_header_is_a_400(stub_url: str) -> None:
    response = _post(stub_url, _body("x"), {"x-stub-fail": "teapot"})
    assert response.status_code == 400
    assert "x-stub-fail" in response.json()["error"]["message"]


# ------------------------------------------------------------------- auth, 400s, 404s


def test_missing_key_is_401(stub_url: str) -> None:
    response = httpx.post(f"{stub_url}/v1/messages", json=_body("no key"))
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_configured_key_is_enforced(keyed_stub_url: str) -> None:
    wrong = anthropic.Anthropic(base_url=keyed_stub_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model=MODEL, max_tokens=8, messages=_user("hi"))

    right = anthropic.Anthropic(base_url=keyed_stub_url, api_key=STUB_KEY, max_retries=0)
    assert _text_of(right.messages.create(model=MODEL, max_tokens=8, messages=_user("hi"))) == ("echo: hi")
    by_header = _post(keyed_stub_url, _body("hi"), {"x-api-key": STUB_KEY})
    assert by_header.status_code == 200
    wrong_header = _post(keyed_stub_url, _body("hi"), {"x-api-key": "nope"})
    assert wrong_header.status_code == 401


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        ({"max_tokens": 8, "messages": _user("x")}, "model: Field required"),
        ({"model": MODEL, "messages": _user("x")}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": 0, "messages": _user("x")}, "greater than or equal to 1"),
        ({"model": MODEL, "max_tokens": True, "messages": _user("x")}, "valid integer"),
        ({"model": MODEL, "max_tokens": 8}, "messages: Field required"),
        ({"model": MODEL, "max_tokens": 8, "messages": []}, "at least one message"),
        ({"model": MODEL, "max_tokens": 8, "messages": "x"}, "messages: Input should be a valid"),
        ({"model": MODEL, "max_tokens": 8, "messages": [{"content": "x"}]}, "messages.0.role"),
    ],
    ids=lambda value: value if isinstance(value, str) else "body",
)
def test_bad_body_is_a_precise_400(stub_url: str, body: Any, message: str) -> None:
    response = _post(stub_url, body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert message in error["error"]["message"]


def test_sdk_sees_bad_request(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model=MODEL, max_tokens=0, messages=_user("x"))


def test_unknown_path_is_a_404_in_anthropics_shape(client: anthropic.Anthropic, stub_url: str) -> None:
    response = httpx.get(f"{stub_url}/v1/no-such-thing")
    assert response.status_code == 404
    body = response.json()
    assert body["error"]["type"] == "not_found_error"
    assert body["request_id"] == response.headers["request-id"]
    with pytest.raises(anthropic.NotFoundError):
        client.models.list()

    wrong_method = httpx.get(f"{stub_url}/v1/messages")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_count_tokens_uses_the_same_estimate(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, messages=_user("x" * 41))
    assert counted.input_tokens == 10
    created = client.messages.create(model=MODEL, max_tokens=8, messages=_user("x" * 41))
    assert created.usage.input_tokens == counted.input_tokens


# ------------------------------------------------------------------ recording + pacing


def test_requests_are_recorded_with_headers_and_body(stub_url: str) -> None:
    marker = f"record-{uuid.uuid4()}"
    response = httpx.post(
        f"{stub_url}/v1/messages?beta=true",
        json=_body(marker),
        headers={"x-api-key": "test-key", "x-trace-id": marker, "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 200

    (record,) = _recorded(stub_url, marker)
    assert (record["method"], record["path"], record["query"]) == (
        "POST",
        "/v1/messages",
        "beta=true",
    )
    assert record["headers"]["x-trace-id"] == marker
    assert record["headers"]["anthropic-version"] == "2023-06-01"
    assert ["x-api-key", "test-key"] in record["raw_headers"]
    assert json.loads(record["body"]) == _body(marker)
    assert record["status"] == 200
    assert record["request_id"] == response.headers["request-id"]

    latest = httpx.get(f"{stub_url}/_stub/requests", params={"limit": "1"}).json()
    assert [r["request_id"] for r in latest] == [record["request_id"]]


def test_delete_clears_the_record(stub_url: str) -> None:
    marker = f"clear-{uuid.uuid4()}"
    assert _post(stub_url, _body(marker)).status_code == 200
    assert len(_recorded(stub_url, marker)) == 1

    cleared = httpx.delete(f"{stub_url}/_stub/requests")
    assert cleared.status_code == 200 and cleared.json()["cleared"] >= 1
    assert httpx.get(f"{stub_url}/_stub/requests").json() == []


def test_latency_header_delays_the_answer(stub_url: str) -> None:
    started = time.monotonic()
    response = _post(stub_url, _body("slow"), {"x-stub-latency-ms": "150"})
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.15 * TIMER_SLACK


def test_chunk_delay_paces_the_stream(stub_url: str) -> None:
    text = "echo: paced stream"  # 18 characters: 3 deltas, so 2 pauses
    started = time.monotonic()
    response = _post(stub_url, _body("paced stream", stream=True), {"x-stub-chunk-delay-ms": "60"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    deltas = [data for name, data in _sse_frames(response.text) if name == "content_block_delta"]
    assert len(deltas) == -(-len(text) // CHUNK) == 3
    assert elapsed >= 2 * 0.06 * TIMER_SLACK


# ---------------------------------------------------------------------- pure functions


def test_content_text_and_estimates() -> None:
    assert content_text("plain") == "plain"
    blocks = [
        {"type": "text", "text": "a"},
        {"type": "image", "source": {}},
        {"type": "tool_result", "content": [{"type": "text", "text": "b"}]},
    ]
    assert content_text(blocks) == "a\nb"
    assert estimate_tokens(0) == 1 and estimate_tokens(9) == 2


def test_scenario_book_and_status_list() -> None:
    book = ScenarioBook()
    statuses = parse_status_list("429,529")
    assert [book.next_failure("s", statuses) for _ in range(3)] == [429, 529, None]
    assert book.next_failure(None, statuses) == 429
    with pytest.raises(StubRequestError):
        parse_status_list("200")


def test_stream_events_split_tool_input_into_json_deltas() -> None:
    reply = Reply(
        id="msg_x",
        model=MODEL,
        parts=(TextPart("hi"), ToolUsePart(id="toolu_x", name="t", input={"k": "value"})),
        stop_reason="tool_use",
        input_tokens=1,
        output_tokens=2,
    )
    events = list(stream_events(reply, 4))
    tool_deltas = [
        data["delta"]["partial_json"]
        for name, data in events
        if name == "content_block_delta" and data["index"] == 1
    ]
    assert tool_deltas[0] == "" and "".join(tool_deltas) == '{"k":"value"}'
    assert [name for name, _ in events].count("ping") == 1
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKILLGATE_STUB_PORT", "9123")
    monkeypatch.setenv("SKILLGATE_STUB_API_KEY", "from-env")
    settings = StubSettings()
    assert settings.port == 9123
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "from-env"
    assert settings.stream_chunk_chars == 8
