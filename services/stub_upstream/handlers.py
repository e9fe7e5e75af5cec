"""How the stub builds its answers: validation, reply planning, JSON messages and SSE events.

Everything here is a pure function of the request (plus random ids), except :class:`ScenarioBook`,
which remembers how many requests of each failure scenario it has seen. The ASGI layer in
:mod:`services.stub_upstream.app` only reads bytes, calls these and writes bytes, so the shapes
the official SDK parses (field names, event order, ``usage``) are all decided in this module.

Shapes follow the Anthropic Messages API: a message is ``{"id", "type": "message", "role",
"model", "content", "stop_reason", "stop_sequence", "usage"}``; a stream is ``message_start``,
then per content block ``content_block_start`` / ``content_block_delta``... /
``content_block_stop`` (one ``ping`` after the first block start), then ``message_delta`` and
``message_stop``; an error is ``{"type": "error", "error": {"type", "message"}, "request_id"}``.
"""

from __future__ import annotations

import base64
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from skillgate.errors import error_type_for

JSONObject = dict[str, Any]

#: The ``error.type`` Anthropic uses for each HTTP status.
_ERROR_MESSAGES: Final[Mapping[str, str]] = {
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit "
    "(injected by x-stub-fail)",
    "overloaded_error": "Overloaded (injected by x-stub-fail)",
    "api_error": "Internal server error (injected by x-stub-fail)",
}

DEFAULT_TOOL_INPUT: Final[Mapping[str, Any]] = {"command": "echo hello"}

#: ``STUB_TOOL_USE <name> [<json object to end of line>]`` anywhere in the last user text.
_TOOL_TRIGGER = re.compile(r"STUB_TOOL_USE[ \t]+(\S+)(?:[ \t]+([^\r\n]*))?")
THINKING_TRIGGER: Final = "STUB_THINKING"

_ID_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_MAX_SCENARIOS: Final = 100_000


class StubRequestError(Exception):
    """A request the stub answers with an Anthropic-shaped error instead of a message.

    Raised by validation, authentication and failure injection; the app turns it into a JSON
    error response with ``status``, ``error_type`` and ``message`` (plus ``headers``, e.g.
    ``retry-after`` on a 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or error_type_for_status(status)
        self.headers: dict[str, str] = dict(headers or {})


def invalid(message: str) -> StubRequestError:
    """A 400 ``invalid_request_error`` carrying ``message`` (what the caller got wrong)."""
    return StubRequestError(400, message)


# ----------------------------------------------------------------------------------- ids


def random_id(prefix: str, length: int = 22) -> str:
    """``prefix`` followed by ``length`` random base62 characters (``msg_01…``, ``req_…``).

    Ids only need to be unique and look like Anthropic's; ``os.urandom`` is fast and needs no
    seeding, which matters at benchmark request rates.
    """
    n = int.from_bytes(os.urandom(17), "big")
    chars = []
    for _ in range(length):
        n, r = divmod(n, 62)
        chars.append(_ID_ALPHABET[r])
    return prefix + "".join(chars)


def new_request_id() -> str:
    """A value for the ``request-id`` header and the error bodies' ``request_id``."""
    return random_id("req_01")


def new_signature() -> str:
    """An opaque, base64 thinking-block signature (never verified by anyone)."""
    return base64.b64encode(os.urandom(48)).decode("ascii")


# -------------------------------------------------------------------------------- errors


def error_type_for_status(status: int) -> str:
    """The Anthropic ``error.type`` for an HTTP status (the same table skillgate answers with)."""
    return error_type_for(status)


def error_json(error_type: str, message: str, request_id: str | None) -> JSONObject:
    """The Anthropic error body: ``{"type": "error", "error": {...}, "request_id": ...}``."""
    body: JSONObject = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


# ---------------------------------------------------------------------------- validation


def parse_json_object(raw: bytes) -> JSONObject:
    """Decode a request body that must be a JSON object, or raise a 400 saying why not."""
    if not raw.strip():
        raise invalid("The request body is empty: expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, not {_json_kind(body)}.")
    return body


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__


def _check_messages(body: JSONObject) -> list[Any]:
    if "model" not in body:
        raise invalid("model: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise invalid("model: Input should be a non-empty string")
    if "messages" not in body:
        raise invalid("messages: Field required")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise invalid(f"messages: Input should be a valid list, not {_json_kind(messages)}")
    if not messages:
        raise invalid("messages: at least one message is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages.{i}: Input should be a valid dictionary")
        if message.get("role") not in ("user", "assistant"):
            raise invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if not isinstance(content, str | list):
            raise invalid(f"messages.{i}.content: Input should be a string or a list of blocks")
    return messages


def validate_messages_body(body: JSONObject) -> None:
    """Check what ``POST /v1/messages`` needs (model, max_tokens ≥ 1, messages), or raise a 400.

    Messages mirror Anthropic's (``max_tokens: Field required``...) so a gateway test can assert
    that the upstream's own validation error reached the caller unchanged.
    """
    _check_messages(body)
    if "max_tokens" not in body:
        raise invalid("max_tokens: Field required")
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise invalid("max_tokens: Input should be greater than or equal to 1")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise invalid("stream: Input should be a valid boolean")


def validate_count_tokens_body(body: JSONObject) -> None:
    """Check what ``POST /v1/messages/count_tokens`` needs (model, messages), or raise a 400."""
    _check_messages(body)


# ------------------------------------------------------------------------- request text


def content_text(content: object) -> str:
    """The text of a message ``content``: the string itself, or its text-bearing blocks.

    ``text`` blocks and ``tool_result`` blocks (whose content is a string or more blocks) count;
    images, documents and the like do not. Blocks are joined with newlines so that a
    ``STUB_TOOL_USE`` line in one block never runs into the next.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if isinstance(text, str):
                parts.append(text)
        elif kind == "tool_result":
            inner = content_text(block.get("content"))
            if inner:
                parts.append(inner)
    return "\n".join(parts)


def last_user_text(messages: list[Any]) -> str:
    """The text of the last ``user`` message (what echo mode repeats and triggers are read from)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def request_text_length(body: JSONObject) -> int:
    """Characters of prompt text in a request: system, every message, tool definitions.

    The basis of the ``input_tokens`` estimate. Tool inputs and schemas count by their JSON size.
    """
    total = 0
    system = body.get("system")
    if isinstance(system, str):
        total += len(system)
    elif isinstance(system, list):
        total += len(content_text(system))
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
            continue
        total += len(content_text(content))
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    total += len(orjson.dumps(block.get("input")))
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                total += len(orjson.dumps(tool))
    return total


def estimate_tokens(chars: int) -> int:
    """Roughly four characters per token, never less than one (as the real API never reports 0)."""
    return max(1, chars // 4)


# ------------------------------------------------------------------- failure injection


def parse_status_list(value: str) -> tuple[int, ...]:
    """Parse ``x-stub-fail`` (``"429,529,500"``) into statuses, or raise a 400 saying why not."""
    statuses: list[int] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 400 <= int(item) <= 599:
            raise invalid(
                f"x-stub-fail: {item!r} is not an HTTP error status (expected a comma-separated "
                "list of 4xx/5xx codes such as '429,529')"
            )
        statuses.append(int(item))
    if not statuses:
        raise invalid("x-stub-fail: expected a comma-separated list of statuses such as '429,529'")
    return tuple(statuses)


@dataclass
class ScenarioBook:
    """How many requests each ``x-stub-scenario`` id has had, to fail only the first few.

    The first request of a scenario gets the first status of its ``x-stub-fail`` list, the
    second the second, and so on; once the list is used up the scenario's requests succeed.
    That lets a test watch a client (or the gateway) retry through 429/529 into a success.
    The oldest scenarios are forgotten past 100 000 ids, so a long benchmark cannot grow it
    without bound.
    """

    seen: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def next_failure(self, scenario: str | None, statuses: tuple[int, ...]) -> int | None:
        """The status this request must fail with, or None if it should succeed.

        Without a scenario id every request fails, with the first status of the list.
        """
        if scenario is None:
            return statuses[0]
        count = self.seen.pop(scenario, 0)
        self.seen[scenario] = count + 1
        if len(self.seen) > _MAX_SCENARIOS:
            self.seen.popitem(last=False)
        return statuses[count] if count < len(statuses) else None

    def clear(self) -> None:
        """Forget every scenario (their next requests fail again from the start of the list)."""
        self.seen.clear()


def injected_failure(status: int, request_headers: Mapping[str, str]) -> StubRequestError:
    """The error for an ``x-stub-fail`` status: 429 carries ``retry-after`` (``x-stub-retry-after``
    seconds, default 0); 529 carries it only when ``x-stub-retry-after`` is given."""
    error_type = error_type_for_status(status)
    message = _ERROR_MESSAGES.get(error_type, f"Injected failure {status} (x-stub-fail)")
    retry_after = request_headers.get("x-stub-retry-after")
    headers: dict[str, str] = {}
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            raise invalid(f"x-stub-retry-after: {retry_after!r} is not a number of seconds") from None
        if seconds < 0:
            raise invalid("x-stub-retry-after: must not be negative")
    if status == 429:
        headers["retry-after"] = retry_after.strip() if retry_after is not None else "0"
    elif retry_after is not None:
        headers["retry-after"] = retry_after.strip()
    return StubRequestError(status, message, error_type=error_type, headers=headers)


def header_milliseconds(headers: Mapping[str, str], name: str) -> float | None:
    """A non-negative number of milliseconds from header ``name``, None if absent, else a 400."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        raise invalid(f"{name}: {value!r} is not a number of milliseconds") from None
    if not ms >= 0:  # also rejects NaN
        raise invalid(f"{name}: must be a non-negative number of milliseconds")
    return ms


def header_count(headers: Mapping[str, str], name: str) -> int | None:
    """A non-negative integer from header ``name``, None if absent, else a 400."""
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise invalid(f"{name}: {value!r} is not a non-negative integer")
    return int(value)


# -------------------------------------------------------------------------- the reply


@dataclass(frozen=True, slots=True)
class TextPart:
    """A ``text`` content block."""

    text: str


@dataclass(frozen=True, slots=True)
class ThinkingPart:
    """A ``thinking`` content block with its (random) signature."""

    thinking: str
    signature: str


@dataclass(frozen=True, slots=True)
class ToolUsePart:
    """A ``tool_use`` content block asking the caller to run ``name`` with ``input``."""

    id: str
    name: str
    input: JSONObject

    def input_json(self) -> str:
        """The input as JSON text, which streaming sends in ``input_json_delta`` pieces."""
        return orjson.dumps(self.input).decode()


Part = TextPart | ThinkingPart | ToolUsePart


@dataclass(frozen=True, slots=True)
class Reply:
    """What the stub answers, independent of JSON vs SSE: blocks, stop reason and usage."""

    id: str
    model: str
    parts: tuple[Part, ...]
    stop_reason: str
    input_tokens: int
    output_tokens: int


def _tool_request(text: str, headers: Mapping[str, str]) -> tuple[str, JSONObject] | None:
    """The tool call asked for by ``x-stub-tool-use`` (first) or a ``STUB_TOOL_USE`` line."""
    name = headers.get("x-stub-tool-use")
    if name is not None:
        name = name.strip()
        if not name:
            raise invalid("x-stub-tool-use: expected a tool name")
        raw_input = headers.get("x-stub-tool-input")
        return name, _tool_input(raw_input, "x-stub-tool-input")
    match = _TOOL_TRIGGER.search(text)
    if match is None:
        return None
    return match.group(1), _tool_input(match.group(2), "STUB_TOOL_USE")


def _tool_input(raw: str | None, source: str) -> JSONObject:
    if raw is None or not raw.strip():
        return dict(DEFAULT_TOOL_INPUT)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"{source}: the tool input is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise invalid(f"{source}: the tool input must be a JSON object, not {_json_kind(value)}")
    return value


def _wants_thinking(body: JSONObject, text: str) -> bool:
    if THINKING_TRIGGER in text:
        return True
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def plan_reply(body: JSONObject, headers: Mapping[str, str]) -> Reply:
    """Decide the answer to a validated Messages request.

    Echo mode answers ``"echo: <last user text>"`` (or exactly the ``x-stub-reply-text`` header,
    to make the "model" say something the request did not contain, such as a leaked key) with
    ``stop_reason: "end_turn"``. A tool call
    (``x-stub-tool-use`` header, or a ``STUB_TOOL_USE <name> <json>`` line in the last user
    text) answers a short text block plus a ``tool_use`` block, ``stop_reason: "tool_use"``.
    ``STUB_THINKING`` in the text (or ``thinking`` enabled in the request) puts a ``thinking``
    block first. Token counts are the chars/4 estimate of the request and of the reply.
    """
    text = last_user_text(body["messages"])
    parts: list[Part] = []
    if _wants_thinking(body, text):
        parts.append(
            ThinkingPart(
                thinking=f"The user sent {len(text)} characters. I will answer as the stub does.",
                signature=new_signature(),
            )
        )
    tool = _tool_request(text, headers)
    reply_text = headers.get("x-stub-reply-text")
    if tool is None:
        parts.append(TextPart(f"echo: {text}" if reply_text is None else reply_text))
        stop_reason = "end_turn"
    else:
        name, tool_input = tool
        parts.append(TextPart(f"I'll use the {name} tool."))
        parts.append(ToolUsePart(id=random_id("toolu_01"), name=name, input=tool_input))
        stop_reason = "tool_use"
    output_chars = 0
    for part in parts:
        if isinstance(part, TextPart):
            output_chars += len(part.text)
        elif isinstance(part, ThinkingPart):
            output_chars += len(part.thinking)
        else:
            output_chars += len(part.input_json())
    return Reply(
        id=random_id("msg_01"),
        model=body["model"],
        parts=tuple(parts),
        stop_reason=stop_reason,
        input_tokens=estimate_tokens(request_text_length(body)),
        output_tokens=estimate_tokens(output_chars),
    )


# ------------------------------------------------------------------------ JSON answer


def usage_json(input_tokens: int, output_tokens: int) -> JSONObject:
    """The ``usage`` object of a message (no prompt caching ever happens at the stub)."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def part_json(part: Part) -> JSONObject:
    """One complete content block as in a non-streamed message."""
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ThinkingPart):
        return {"type": "thinking", "thinking": part.thinking, "signature": part.signature}
    return {"type": "tool_use", "id": part.id, "name": part.name, "input": part.input}


def message_json(reply: Reply) -> JSONObject:
    """The complete message object that a non-streamed ``POST /v1/messages`` returns."""
    return {
        "id": reply.id,
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": [part_json(part) for part in reply.parts],
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": usage_json(reply.input_tokens, reply.output_tokens),
    }


# ------------------------------------------------------------------------- SSE answer


def _chunks(text: str, size: int) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _block_start(part: Part) -> JSONObject:
    if isinstance(part, TextPart):
        return {"type": "text", "text": ""}
    if isinstance(part, ThinkingPart):
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "tool_use", "id": part.id, "name": part.name, "input": {}}


def _block_deltas(part: Part, chunk_chars: int) -> Iterator[JSONObject]:
    if isinstance(part, TextPart):
        for piece in _chunks(part.text, chunk_chars):
            yield {"type": "text_delta", "text": piece}
    elif isinstance(part, ThinkingPart):
        for piece in _chunks(part.thinking, chunk_chars):
            yield {"type": "thinking_delta", "thinking": piece}
        yield {"type": "signature_delta", "signature": part.signature}
    else:
        yield {"type": "input_json_delta", "partial_json": ""}
        for piece in _chunks(part.input_json(), chunk_chars):
            yield {"type": "input_json_delta", "partial_json": piece}


def stream_events(reply: Reply, chunk_chars: int) -> Iterator[tuple[str, JSONObject]]:
    """The SSE events of a streamed reply, as ``(event name, data)`` in Anthropic's order.

    ``message_start`` (empty content, ``output_tokens: 1``); for each block
    ``content_block_start``, its deltas and ``content_block_stop``, with one ``ping`` right after
    the first block starts (where the real API sends it); then ``message_delta`` with the stop
    reason and cumulative usage, and ``message_stop``.
    """
    start_message: JSONObject = {
        "id": reply.id,
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage_json(reply.input_tokens, 1),
    }
    yield "message_start", {"type": "message_start", "message": start_message}
    for index, part in enumerate(reply.parts):
        yield (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": _block_start(part)},
        )
        if index == 0:
            yield "ping", {"type": "ping"}
        for delta in _block_deltas(part, chunk_chars):
            yield (
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
            "usage": {
                "input_tokens": reply.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": reply.output_tokens,
            },
        },
    )
    yield "message_stop", {"type": "message_stop"}


def sse_frame(event: str, data: JSONObject) -> bytes:
    """One server-sent event: ``event: <name>\\ndata: <json>\\n\\n``."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def stream_error_event() -> JSONObject:
    """The ``error`` event data sent when ``x-stub-stream-error-after`` cuts a stream short."""
    return error_json("overloaded_error", "Overloaded (injected by x-stub-stream-error-after)", None)
