"""The stub's ASGI app: ``POST /v1/messages`` (JSON and SSE), ``count_tokens`` and ``/_stub/*``.

It is the zero-latency baseline of the benchmarks, so a request costs one ``orjson`` parse, a few
dict look-ups and one ``orjson`` dump: no pydantic models, no middleware stack beyond Starlette's.

Control headers, read on every API request (clients set them with ``extra_headers``; the gateway
passes them through untouched):

``x-stub-latency-ms``
    Milliseconds to wait before answering (added to ``latency_ms``).
``x-stub-fail`` / ``x-stub-scenario`` / ``x-stub-retry-after``
    Fail with these statuses (``429,529,500``): in order for the first requests of a scenario id,
    or always the first status without a scenario id. 429 carries ``retry-after``.
``x-stub-tool-use`` / ``x-stub-tool-input``
    Answer with a ``tool_use`` block for that tool (a ``STUB_TOOL_USE <name> <json>`` line in the
    last user message does the same).
``x-stub-stream-error-after``
    In a stream, send an ``error`` event (``overloaded_error``) after that many content deltas.
``x-stub-chunk-delay-ms``
    Milliseconds between two content deltas of this stream (overrides ``stream_chunk_delay_ms``).
``x-stub-reply-text``
    Answer with exactly this text instead of the echo.
``x-stub-first-delta-delay-ms``
    Milliseconds of silence after the first block starts, before its first delta (a model
    thinking; what keep-alive pings are for).

A streamed request's record in ``/_stub/requests`` gets ``stream_outcome``: ``completed``,
``error`` (cut short by ``x-stub-stream-error-after``) or ``disconnected`` (the client went away
mid-stream), so tests can see that a gateway cancelled its upstream request.

``STUB_THINKING`` in the last user message puts a ``thinking`` block first.

Control endpoints (never recorded, never delayed): ``GET /_stub/health``; ``GET /_stub/requests``
(``?contains=`` filters on the body, ``?limit=`` keeps the newest N); ``DELETE /_stub/requests``;
``DELETE /_stub/scenarios`` (restart every failure scenario).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from services.stub_upstream.config import StubSettings
from services.stub_upstream.handlers import (
    JSONObject,
    Reply,
    ScenarioBook,
    StubRequestError,
    error_json,
    estimate_tokens,
    header_count,
    header_milliseconds,
    injected_failure,
    invalid,
    message_json,
    new_request_id,
    parse_json_object,
    parse_status_list,
    plan_reply,
    request_text_length,
    sse_frame,
    stream_error_event,
    stream_events,
    validate_count_tokens_body,
    validate_messages_body,
)

_Handler = Callable[[Request, bytes], Awaitable[Response]]
_CONTROL_PREFIX = "/_stub/"
_ORGANIZATION_ID = "00000000-0000-4000-8000-000000000000"


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def _error_response(error: StubRequestError, request_id: str | None) -> Response:
    return _json(error_json(error.error_type, error.message, request_id), error.status, error.headers)


class StubUpstream:
    """The stub's state (recorded requests, failure scenarios) and its endpoints.

    One instance per app; ``create_app`` exposes it as ``app.state.stub`` so an in-process test
    can read ``records`` directly instead of calling ``GET /_stub/requests``.
    """

    def __init__(self, settings: StubSettings) -> None:
        self.settings = settings
        self.records: deque[JSONObject] = deque(maxlen=settings.max_recorded)
        self.scenarios = ScenarioBook()
        self._seq = 0
        self._api_key = settings.api_key.get_secret_value().encode() if settings.api_key is not None else None

    # ------------------------------------------------------------------ API endpoints

    async def messages(self, request: Request) -> Response:
        """``POST /v1/messages``: a message as JSON, or SSE when the body has ``"stream": true``."""
        return await self._serve(request, self._messages)

    async def count_tokens(self, request: Request) -> Response:
        """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}`` (the chars/4 estimate)."""
        return await self._serve(request, self._count_tokens)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Unknown path (404 ``not_found_error``) or wrong method (405), in Anthropic's shape."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
        path = request.scope["path"]
        if status == 404:
            message = f"Not found: {request.method} {path}"
        elif status == 405:
            message = f"Method {request.method} is not allowed on {path}"
        else:
            message = f"HTTP {status}"
        error = StubRequestError(status, message, headers=headers)
        if path.startswith(_CONTROL_PREFIX):
            return _error_response(error, None)

        async def fail(_request: Request, _raw: bytes) -> Response:
            raise error

        return await self._serve(request, fail)

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        """A bug in the stub: answer 500 ``api_error`` like the real API would."""
        error = StubRequestError(500, f"Stub upstream failed: {type(exc).__name__}: {exc}")
        return _error_response(error, new_request_id())

    async def _serve(self, request: Request, handler: _Handler) -> Response:
        """Record the request, wait the configured latency, run ``handler``, stamp ``request-id``.

        Every answer (including errors) carries a ``request-id`` header; error bodies repeat it
        as ``request_id``, as Anthropic's do.
        """
        raw = await request.body()
        request_id = new_request_id()
        record = self._record(request, raw, request_id)
        request.state.stub_record = record  # read by a stream, to note how it ended
        try:
            extra_ms = header_milliseconds(request.headers, "x-stub-latency-ms") or 0.0
            delay_ms = self.settings.latency_ms + extra_ms
            if delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000)
            response = await handler(request, raw)
        except StubRequestError as exc:
            response = _error_response(exc, request_id)
        response.headers["request-id"] = request_id
        response.headers["anthropic-organization-id"] = _ORGANIZATION_ID
        if record is not None:
            record["status"] = response.status_code
        return response

    async def _messages(self, request: Request, raw: bytes) -> Response:
        headers = request.headers
        self._authenticate(headers)
        self._inject_failure(headers)
        body = parse_json_object(raw)
        validate_messages_body(body)
        reply = plan_reply(body, headers)
        if body.get("stream") is True:
            error_after = header_count(headers, "x-stub-stream-error-after")
            delay_ms = header_milliseconds(headers, "x-stub-chunk-delay-ms")
            if delay_ms is None:
                delay_ms = self.settings.stream_chunk_delay_ms
            first_delay_ms = header_milliseconds(headers, "x-stub-first-delta-delay-ms") or 0.0
            return StreamingResponse(
                self._sse(
                    reply,
                    error_after,
                    delay_ms / 1000,
                    first_delay_ms / 1000,
                    getattr(request.state, "stub_record", None),
                ),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        return _json(message_json(reply))

    async def _count_tokens(self, request: Request, raw: bytes) -> Response:
        self._authenticate(request.headers)
        self._inject_failure(request.headers)
        body = parse_json_object(raw)
        validate_count_tokens_body(body)
        return _json({"input_tokens": estimate_tokens(request_text_length(body))})

    async def _sse(
        self,
        reply: Reply,
        error_after: int | None,
        delay_s: float,
        first_delay_s: float,
        record: JSONObject | None,
    ) -> AsyncIterator[bytes]:
        """Send the reply's events, pausing between content deltas, cut short on request; note
        in ``record`` how the stream ended (a client that disconnects cancels this generator)."""
        deltas = 0
        outcome = "disconnected"
        try:
            for event, data in stream_events(reply, self.settings.stream_chunk_chars):
                if event == "content_block_delta":
                    if error_after is not None and deltas >= error_after:
                        yield sse_frame("error", stream_error_event())
                        outcome = "error"
                        return
                    if deltas == 0 and first_delay_s > 0:
                        await asyncio.sleep(first_delay_s)
                    if delay_s > 0 and deltas > 0:
                        await asyncio.sleep(delay_s)
                    deltas += 1
                yield sse_frame(event, data)
            outcome = "completed"
        finally:
            if record is not None:
                record["stream_outcome"] = outcome

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        """Require a key: ``x-api-key``, or ``Authorization: Bearer <key>``.

        The docs name ``x-api-key``, but the current SDK sends ``api_key`` as a bearer token, so
        both are API keys here (``x-api-key`` wins when a request carries both).
        """
        key = headers.get("x-api-key")
        if not key:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else ""
        if not key:
            raise StubRequestError(401, "x-api-key header is required")
        if self._api_key is not None and not hmac.compare_digest(key.encode(), self._api_key):
            raise StubRequestError(401, "invalid x-api-key")

    def _inject_failure(self, headers: Mapping[str, str]) -> None:
        fail = headers.get("x-stub-fail")
        if fail is None:
            return
        statuses = parse_status_list(fail)
        status = self.scenarios.next_failure(headers.get("x-stub-scenario"), statuses)
        if status is not None:
            raise injected_failure(status, headers)

    def _record(self, request: Request, raw: bytes, request_id: str) -> JSONObject | None:
        if not self.settings.max_recorded:
            return None
        self._seq += 1
        raw_headers = [
            [name.decode("latin-1"), value.decode("latin-1")] for name, value in request.headers.raw
        ]
        headers: dict[str, str] = {}
        for name, value in raw_headers:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        record: JSONObject = {
            "seq": self._seq,
            "time": time.time(),
            "method": request.method,
            "path": request.scope["path"],
            "query": request.scope["query_string"].decode("latin-1"),
            "headers": headers,
            "raw_headers": raw_headers,
            "body": raw.decode("utf-8", "replace"),
            "status": None,
            "request_id": request_id,
        }
        self.records.append(record)
        return record

    # -------------------------------------------------------------- control endpoints

    async def health(self, request: Request) -> Response:
        """``GET /_stub/health``: ``{"ok": true}`` once the server accepts requests."""
        return _json({"ok": True})

    async def list_requests(self, request: Request) -> Response:
        """``GET /_stub/requests``: the recorded requests, oldest first.

        ``?contains=`` keeps those whose body contains the substring; ``?limit=N`` the newest N
        of what remains. Each record has ``seq, time, method, path, query, headers`` (names
        lower-cased, repeated headers joined by ", "), ``raw_headers`` (pairs as received),
        ``body`` (text), ``status`` (None while a handler still runs) and ``request_id``.
        """
        contains = request.query_params.get("contains")
        records: list[JSONObject] = list(self.records)
        if contains is not None:
            records = [r for r in records if contains in r["body"]]
        limit_text = request.query_params.get("limit")
        if limit_text is not None:
            if not limit_text.isdigit():
                return _error_response(invalid("limit: expected a non-negative integer"), None)
            limit = int(limit_text)
            records = records[len(records) - limit :] if limit else []
        return _json(records)

    async def clear_requests(self, request: Request) -> Response:
        """``DELETE /_stub/requests``: forget every recorded request."""
        cleared = len(self.records)
        self.records.clear()
        return _json({"cleared": cleared})

    async def clear_scenarios(self, request: Request) -> Response:
        """``DELETE /_stub/scenarios``: restart every ``x-stub-scenario`` from its first failure."""
        cleared = len(self.scenarios.seen)
        self.scenarios.clear()
        return _json({"cleared": cleared})


def create_app(settings: StubSettings) -> Starlette:
    """Build the stub Messages API as a Starlette app (state in ``app.state.stub``)."""
    stub = StubUpstream(settings)
    routes = [
        Route("/v1/messages", stub.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", stub.count_tokens, methods=["POST"]),
        Route("/_stub/health", stub.health, methods=["GET"]),
        Route("/_stub/requests", stub.list_requests, methods=["GET"]),
        Route("/_stub/requests", stub.clear_requests, methods=["DELETE"]),
        Route("/_stub/scenarios", stub.clear_scenarios, methods=["DELETE"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: stub.http_error, Exception: stub.internal_error},
    )
    app.state.stub = stub
    return app
