"""The forwarder's upstream client (``services/forwarder/upstream.py``) against the real stub
upstream served by uvicorn on 127.0.0.1: retries, backoff, retry-after, unreachable upstreams and
where the key goes.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from services.forwarder.config import ForwarderSettings, UpstreamConfig
from services.forwarder.upstream import (
    RETRYABLE_STATUS,
    UnknownUpstream,
    Upstreams,
    relay_headers,
    retry_after_seconds,
)
from services.stub_upstream.app import create_app
from services.stub_upstream.config import StubSettings
from tests.servers import serve_asgi

KEY = "k"
PATH = "/v1/messages"


# ------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    app = create_app(StubSettings(api_key=SecretStr(KEY)))
    with serve_asgi(app, health_path="/_stub/health", name="stub") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def refused_url() -> Iterator[str]:
    """A port bound but not listening (kept bound so nobody else takes it): connections are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _settings(base_url: str, **overrides: Any) -> ForwarderSettings:
    upstream: dict[str, Any] = {"base_url": base_url, "api_key": SecretStr(KEY), "api_key_env": None}
    upstream.update(overrides.pop("upstream", {}))
    values: dict[str, Any] = {
        "upstreams": {"default": UpstreamConfig(**upstream)},
        "backoff_initial_seconds": 0.01,
        "max_attempts": 3,
    }
    values.update(overrides)
    return ForwarderSettings(**values)


@pytest.fixture
async def upstreams(stub_url: str) -> AsyncIterator[Upstreams]:
    ups = Upstreams(_settings(stub_url))
    try:
        yield ups
    finally:
        await ups.close()


def _marker() -> str:
    return f"marker-{uuid.uuid4().hex}"


def _request(marker: str, **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "model": "claude-stub-test",
            "max_tokens": 32,
            "messages": [{"role": "user", "content": f"hello {marker}"}],
            **extra,
        }
    )


def _seen(stub_url: str, marker: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stub_url}/_stub/requests", params={"contains": marker}, timeout=5.0)
    response.raise_for_status()
    records = response.json()
    assert isinstance(records, list)
    return records


def _base_headers(**extra: str) -> dict[str, str]:
    return {"anthropic-version": "2023-06-01", "content-type": "application/json", **extra}


# ------------------------------------------------------------------------------- tests


async def test_success_first_time(upstreams: Upstreams, stub_url: str) -> None:
    marker = _marker()
    result = await upstreams.call("default", "POST", PATH, "", _base_headers(), _request(marker))
    assert result.status == 200
    assert result.error is None
    assert len(result.attempts) == 1
    assert result.attempts[0]["status"] == 200
    assert result.attempts[0]["number"] == 1
    doc = orjson.loads(result.body)
    assert doc["type"] == "message"
    assert result.headers["content-type"].startswith("application/json")
    assert result.headers["request-id"] == result.attempts[0]["request_id"]
    assert result.latency_ms > 0
    (seen,) = _seen(stub_url, marker)
    assert seen["headers"]["x-api-key"] == KEY
    assert seen["headers"]["anthropic-version"] == "2023-06-01"


async def test_429_then_200_retries_once(upstreams: Upstreams, stub_url: str) -> None:
    marker = _marker()
    headers = _base_headers(**{"x-stub-fail": "429", "x-stub-scenario": marker, "x-stub-retry-after": "0.05"})
    started = time.monotonic()
    result = await upstreams.call("default", "POST", PATH, "", headers, _request(marker))
    elapsed = time.monotonic() - started
    assert result.status == 200
    assert result.error is None
    assert [a["status"] for a in result.attempts] == [429, 200]
    assert [a["number"] for a in result.attempts] == [1, 2]
    assert result.attempts[0]["retry_after_ms"] == pytest.approx(50.0)
    assert result.attempts[1]["retry_after_ms"] is None
    assert result.attempts[0]["request_id"] != result.attempts[1]["request_id"]
    assert result.attempts[1]["started_at"] > result.attempts[0]["started_at"]
    assert elapsed >= 0.05 * 0.9  # the retry-after was honoured
    seen = _seen(stub_url, marker)
    assert len(seen) == 2
    assert [r["status"] for r in seen] == [429, 200]
    assert all(r["headers"]["x-api-key"] == KEY for r in seen)


async def test_529_every_time_gives_up_after_max_attempts(upstreams: Upstreams, stub_url: str) -> None:
    marker = _marker()
    headers = _base_headers(**{"x-stub-fail": "529"})
    result = await upstreams.call("default", "POST", PATH, "", headers, _request(marker))
    assert result.status == 529
    assert len(result.attempts) == 3
    assert [a["status"] for a in result.attempts] == [529, 529, 529]
    assert orjson.loads(result.body)["error"]["type"] == "overloaded_error"
    assert len(_seen(stub_url, marker)) == 3


async def test_a_retry_after_beyond_backoff_max_is_relayed_not_waited(stub_url: str) -> None:
    ups = Upstreams(_settings(stub_url, backoff_max_seconds=0.5))
    try:
        marker = _marker()
        headers = _base_headers(
            **{"x-stub-fail": "429", "x-stub-scenario": marker, "x-stub-retry-after": "30"}
        )
        started = time.monotonic()
        result = await ups.call("default", "POST", PATH, "", headers, _request(marker))
        elapsed = time.monotonic() - started
    finally:
        await ups.close()
    assert result.status == 429
    assert len(result.attempts) == 1
    assert result.attempts[0]["retry_after_ms"] == pytest.approx(30_000.0)
    assert result.headers["retry-after"] == "30"
    assert elapsed < 5.0
    assert len(_seen(stub_url, marker)) == 1


async def test_non_retryable_status_is_returned_at_once(upstreams: Upstreams, stub_url: str) -> None:
    marker = _marker()
    headers = _base_headers(**{"x-stub-fail": "400"})
    result = await upstreams.call("default", "POST", PATH, "", headers, _request(marker))
    assert 400 not in RETRYABLE_STATUS
    assert result.status == 400
    assert len(result.attempts) == 1
    assert orjson.loads(result.body)["type"] == "error"
    assert len(_seen(stub_url, marker)) == 1


async def test_connection_refused(refused_url: str) -> None:
    ups = Upstreams(_settings(refused_url))
    try:
        result = await ups.call("default", "POST", PATH, "", _base_headers(), _request(_marker()))
    finally:
        await ups.close()
    assert result.status == 0
    assert result.error is not None and "unreachable" in result.error
    assert result.body == b""
    assert result.headers == {}
    assert len(result.attempts) == 3
    assert all(a["status"] == 0 and a["error"] == "ConnectError" for a in result.attempts)
    assert KEY not in (result.error or "")


async def test_unknown_upstream(upstreams: Upstreams) -> None:
    with pytest.raises(UnknownUpstream) as info:
        await upstreams.call("nope", "POST", PATH, "", _base_headers(), b"{}")
    assert "nope" in str(info.value)
    assert upstreams.names() == ["default"]
    assert upstreams.has_key("default")
    assert not upstreams.has_key("nope")


async def test_the_key_replaces_whatever_the_caller_sent(upstreams: Upstreams, stub_url: str) -> None:
    marker = _marker()
    headers = _base_headers(**{"x-api-key": "caller-guess", "x-foo": "bar"})
    result = await upstreams.call("default", "POST", PATH, "a=1&b=2", headers, _request(marker))
    assert result.status == 200
    (seen,) = _seen(stub_url, marker)
    assert seen["headers"]["x-api-key"] == KEY
    assert seen["headers"]["x-foo"] == "bar"
    assert seen["query"] == "a=1&b=2"
    assert "authorization" not in seen["headers"]


async def test_key_in_authorization_header_as_bearer(stub_url: str) -> None:
    ups = Upstreams(_settings(stub_url, upstream={"auth_header": "authorization"}))
    try:
        marker = _marker()
        result = await ups.call("default", "POST", PATH, "", _base_headers(), _request(marker))
    finally:
        await ups.close()
    assert result.status == 200
    (seen,) = _seen(stub_url, marker)
    assert seen["headers"]["authorization"] == f"Bearer {KEY}"
    assert "x-api-key" not in seen["headers"]


async def test_a_wrong_key_is_a_401_not_retried(stub_url: str) -> None:
    ups = Upstreams(_settings(stub_url, upstream={"api_key": SecretStr("wrong")}))
    try:
        marker = _marker()
        result = await ups.call("default", "POST", PATH, "", _base_headers(), _request(marker))
    finally:
        await ups.close()
    assert result.status == 401
    assert len(result.attempts) == 1
    assert b"wrong" not in result.body


async def test_streamed_answer_is_relayed_whole(upstreams: Upstreams) -> None:
    result = await upstreams.call(
        "default", "POST", PATH, "", _base_headers(), _request(_marker(), stream=True)
    )
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.body.startswith(b"event: message_start")
    assert b"event: message_stop" in result.body


def test_relay_headers_keeps_request_id_anthropic_and_retry_advice() -> None:
    headers = httpx.Headers(
        [
            ("Content-Type", "application/json"),
            ("Request-Id", "req_1"),
            ("Retry-After", "3"),
            ("retry-after-ms", "3000"),
            ("x-should-retry", "true"),
            ("Anthropic-Organization-Id", "org-1"),
            ("anthropic-ratelimit-requests-remaining", "99"),
            ("set-cookie", "a=b"),
            ("server", "cloudflare"),
            ("content-length", "42"),
            ("connection", "keep-alive"),
            ("x-envoy-upstream-service-time", "12"),
            ("via", "1.1 google"),
        ]
    )
    assert relay_headers(headers) == {
        "content-type": "application/json",
        "request-id": "req_1",
        "retry-after": "3",
        "retry-after-ms": "3000",
        "x-should-retry": "true",
        "anthropic-organization-id": "org-1",
        "anthropic-ratelimit-requests-remaining": "99",
    }


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "9", "retry-after-ms": "100"}, 0.1),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
        ({"retry-after-ms": "soon"}, None),
    ],
)
def test_retry_after_seconds(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(httpx.Headers(headers)) == expected


# ------------------------------------------------- at most one upstream call (mock transport)


async def _with_transport(handler: Any) -> tuple[Any, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        response: httpx.Response = handler(request)
        return response

    ups = Upstreams(_settings("http://upstream.invalid"), transport=httpx.MockTransport(record))
    try:
        result = await ups.call("default", "POST", PATH, "", _base_headers(), b"{}")
    finally:
        await ups.close()
    return result, seen


async def test_no_retry_once_the_request_was_sent() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    result, seen = await _with_transport(timeout)
    assert len(seen) == 1
    assert result.status == 0
    assert len(result.attempts) == 1
    assert result.attempts[0]["error"] == "ReadTimeout"
    assert result.error is not None and "did not answer" in result.error


async def test_x_should_retry_false_is_honoured() -> None:
    result, seen = await _with_transport(
        lambda request: httpx.Response(529, headers={"x-should-retry": "false"}, content=b"{}")
    )
    assert len(seen) == 1
    assert result.status == 529
    assert result.headers["x-should-retry"] == "false"


async def test_connect_errors_are_retried_then_answered() -> None:
    calls: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"type": "message"})

    result, seen = await _with_transport(flaky)
    assert len(seen) == 3
    assert result.status == 200
    assert [a["status"] for a in result.attempts] == [0, 0, 200]
    assert [a["error"] for a in result.attempts] == ["ConnectError", "ConnectError", None]
    assert all(r.headers["x-api-key"] == KEY for r in seen)


async def test_server_hanging_up_after_the_request_is_not_retried() -> None:
    """The request reached the upstream, which hung up without answering: it may have processed
    it, so a retry could make a second upstream call. One attempt only, error named for what
    happened (the aiohttp transport maps this to httpx.ConnectTimeout, which must not fool us)."""
    received: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ups = Upstreams(_settings(f"http://127.0.0.1:{port}"))
    try:
        result = await ups.call("default", "POST", PATH, "", _base_headers(), _request(_marker()))
    finally:
        await ups.close()
        server.close()
        await server.wait_closed()
    assert len(received) == 1
    assert result.status == 0 and len(result.attempts) == 1
    assert result.attempts[0]["error"] == "ServerDisconnected"
    assert result.error is not None and "did not answer" in result.error
