"""The ingress's request handling (``services/ingress/handlers.py``), without FastAPI.

Drop-in means drop-in: headers and fields no schema of ours knows pass through untouched, while
credentials, hop-by-hop headers and skillgate's own control headers never go upstream. Bad input
gets a 4xx ``GatewayError`` with a message that says what is wrong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from services.ingress.handlers import (
    APPROVAL_HEADER,
    SESSION_HEADER,
    UPSTREAM_HEADER,
    build_submitted,
    check_messages_request,
    passthrough_headers,
    read_body,
    session_id_from,
)
from skillgate import events
from skillgate.codec import AvroCodec
from skillgate.errors import GatewayError
from skillgate.events import ReplyTo
from tests import factories

SECRET = "SECRET-eyJhbGciOiJSUzI1NiJ9.caller-token-7f3a9c"
VALID_BODY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "Hello"}],
}


# ----------------------------------------------------------------------- headers


def test_passthrough_drops_credentials_hop_by_hop_and_control_headers() -> None:
    dropped = [
        ("Authorization", f"Bearer {SECRET}"),
        ("x-api-key", SECRET),
        ("Cookie", f"session={SECRET}"),
        ("Proxy-Authorization", f"Basic {SECRET}"),
        ("Host", "gateway.internal:8080"),
        ("Content-Length", "123"),
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "x-checksum"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Expect", "100-continue"),
        ("Accept-Encoding", "gzip, br"),
        ("Forwarded", "for=10.0.0.1"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Host", "gateway"),
        ("X-Forwarded-Proto", "https"),
        ("X-Real-IP", "10.0.0.1"),
        ("x-skillgate-session", "s1"),
        ("X-Skillgate-Upstream", "eu"),
        ("x-skillgate-approval", "apr_1"),
        ("x-skillgate-anything-new", "v"),
    ]
    out = passthrough_headers([*dropped, ("anthropic-version", "2023-06-01")])
    assert out == {"anthropic-version": "2023-06-01"}


def test_passthrough_keeps_anthropic_and_unknown_headers_byte_for_byte() -> None:
    weird = '  a=b; c="d,e"\t ünï ✓  '
    out = passthrough_headers(
        [
            ("Anthropic-Version", "2023-06-01"),
            ("anthropic-beta", "skills-2025-10-02"),
            ("anthropic-beta", "files-api-2025-04-14"),
            ("ANTHROPIC-BETA", "code-execution-2025-08-25"),
            ("X-Foo", weird),
            ("x-stainless-retry-count", "0"),
            ("user-agent", "Anthropic/Python 0.69.0"),
            ("content-type", "application/json"),
        ]
    )
    assert out == {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "skills-2025-10-02,files-api-2025-04-14,code-execution-2025-08-25",
        "x-foo": weird,
        "x-stainless-retry-count": "0",
        "user-agent": "Anthropic/Python 0.69.0",
        "content-type": "application/json",
    }


def test_passthrough_accepts_a_mapping() -> None:
    out = passthrough_headers({"x-api-key": SECRET, "anthropic-version": "2023-06-01", "x-foo": "1"})
    assert out == {"anthropic-version": "2023-06-01", "x-foo": "1"}


# -------------------------------------------------------------------- the request


_MISSING = object()


def _body(**changes: Any) -> bytes:
    doc: dict[str, Any] = dict(VALID_BODY)
    for key, value in changes.items():
        if value is _MISSING:
            doc.pop(key, None)
        else:
            doc[key] = value
    return orjson.dumps(doc)


def test_check_accepts_unknown_fields_untouched() -> None:
    body = _body(
        stream=True,
        container={"skills": [{"type": "anthropic", "skill_id": "xlsx", "version": "latest"}]},
        mcp_servers=[{"type": "url", "url": "https://mcp.example.com"}],
        some_future_field={"nested": [1, 2.5, None, True]},
        metadata={"user_id": "u-1"},
    )
    parsed = check_messages_request(body)
    assert parsed == orjson.loads(body)
    assert parsed["some_future_field"] == {"nested": [1, 2.5, None, True]}
    assert parsed["stream"] is True


def test_check_accepts_stream_false_and_absent() -> None:
    assert check_messages_request(_body(stream=False))["stream"] is False
    assert "stream" not in check_messages_request(_body())


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b'{"model": "x",', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"null", "JSON object"),
        (b"42", "JSON object"),
        (_body(model=_MISSING), "model"),
        (_body(model=""), "model"),
        (_body(model=5), "model"),
        (_body(model=None), "model"),
        (_body(model=["claude"]), "model"),
        (_body(max_tokens=_MISSING), "max_tokens"),
        (_body(max_tokens=True), "max_tokens"),
        (_body(max_tokens=False), "max_tokens"),
        (_body(max_tokens=0), "max_tokens"),
        (_body(max_tokens=-1), "max_tokens"),
        (_body(max_tokens=1.5), "max_tokens"),
        (_body(max_tokens="1024"), "max_tokens"),
        (_body(max_tokens=None), "max_tokens"),
        (_body(messages=_MISSING), "messages"),
        (_body(messages=[]), "messages"),
        (_body(messages={"role": "user"}), "messages"),
        (_body(messages="hello"), "messages"),
        (_body(messages=None), "messages"),
        (_body(stream="true"), "stream"),
        (_body(stream=1), "stream"),
        (_body(stream=None), "stream"),
    ],
)
def test_check_refuses_malformed_requests(body: bytes, needle: str) -> None:
    with pytest.raises(GatewayError) as info:
        check_messages_request(body)
    err = info.value
    assert err.status == 400
    assert err.error_type == "invalid_request_error"
    assert needle in err.message
    assert str(err) == err.message


def test_check_accepts_max_tokens_one() -> None:
    assert check_messages_request(_body(max_tokens=1))["max_tokens"] == 1


# --------------------------------------------------------------------- the body


async def _chunks(*parts: bytes, seen: list[bytes] | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        if seen is not None:
            seen.append(part)
        yield part


async def test_read_body_joins_chunks_up_to_the_limit() -> None:
    assert await read_body(_chunks(b"ab", b"", b"cd"), "4", limit=4) == b"abcd"
    assert await read_body(_chunks(b"abcd"), None, limit=4) == b"abcd"
    assert await read_body(_chunks(), "0", limit=4) == b""


async def test_read_body_refuses_a_declared_oversized_body_before_reading() -> None:
    seen: list[bytes] = []
    with pytest.raises(GatewayError) as info:
        await read_body(_chunks(b"x" * 10, seen=seen), "11", limit=10)
    assert info.value.status == 413
    assert info.value.error_type == "request_too_large"
    assert "10-byte limit" in info.value.message
    assert seen == []  # refused on the header alone


async def test_read_body_refuses_an_oversized_stream() -> None:
    seen: list[bytes] = []
    with pytest.raises(GatewayError) as info:
        await read_body(_chunks(b"x" * 6, b"y" * 6, b"z" * 100, seen=seen), None, limit=10)
    assert info.value.status == 413
    assert seen == [b"x" * 6, b"y" * 6]  # stops at the chunk that crosses the limit


async def test_read_body_refuses_a_stream_longer_than_its_declared_length() -> None:
    with pytest.raises(GatewayError) as info:
        await read_body(_chunks(b"x" * 8, b"x" * 8), "5", limit=10)
    assert info.value.status == 413


@pytest.mark.parametrize("value", ["abc", "", "1.5", "0x10", "12 34"])
async def test_read_body_refuses_an_invalid_content_length(value: str) -> None:
    with pytest.raises(GatewayError) as info:
        await read_body(_chunks(b"{}"), value, limit=10)
    assert info.value.status == 400
    assert "Content-Length" in info.value.message


async def test_read_body_refuses_a_negative_content_length() -> None:
    try:
        await read_body(_chunks(b"{}"), "-1", limit=10)
    except GatewayError as exc:
        assert exc.status == 400
    else:
        raise AssertionError("a negative Content-Length was accepted")


# ------------------------------------------------------------------------ session


def test_session_defaults_to_the_call_id() -> None:
    assert session_id_from({}, "0190-call") == "0190-call"
    assert session_id_from({"x-other": "1"}, "0190-call") == "0190-call"


@pytest.mark.parametrize(
    "given", ["s", "sess-1", "ci:build/42@main_v1.2", "A" * 128, "user@example.com/chat:7"]
)
def test_session_accepts_valid_ids(given: str) -> None:
    assert session_id_from({SESSION_HEADER: given}, "call") == given


@pytest.mark.parametrize("given", ["", "A" * 129, "has space", "semi;colon", "ünï", "a,b", "tab\tx", "\nx"])
def test_session_refuses_invalid_ids(given: str) -> None:
    with pytest.raises(GatewayError) as info:
        session_id_from({SESSION_HEADER: given}, "call")
    assert info.value.status == 400
    assert SESSION_HEADER in info.value.message


def test_session_refuses_a_trailing_newline() -> None:
    try:
        accepted = session_id_from({SESSION_HEADER: "abc\n"}, "call")
    except GatewayError as exc:
        assert exc.status == 400
    else:
        raise AssertionError(f"accepted {accepted!r}")


# -------------------------------------------------------------------- the event


def test_build_submitted_never_carries_the_callers_token() -> None:
    call_id = events.new_call_id()
    body = orjson.dumps(VALID_BODY)
    headers = {
        "authorization": f"Bearer {SECRET}",
        "x-api-key": SECRET,
        "cookie": f"sid={SECRET}",
        "proxy-authorization": f"Bearer {SECRET}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "skills-2025-10-02",
        "x-foo": "bar",
        "user-agent": "curl/8.5",
        UPSTREAM_HEADER: "eu",
        APPROVAL_HEADER: "apr_9",
        SESSION_HEADER: "sess-1",
    }
    reply_to = ReplyTo(topic="skillgate.calls.replies", partition=1, instance="ingress-a")
    event = build_submitted(
        call_id=call_id,
        session_id="sess-1",
        identity=factories.identity(),
        instance="ingress-a",
        mode="sync",
        stream=False,
        reply_to=reply_to,
        path="/v1/messages",
        query="beta=true",
        headers=headers,
        body=body,
        model="claude-sonnet-4-5",
        client_ip="10.0.0.9",
    )
    data = AvroCodec().encode(events.CALL_SUBMITTED, event)
    assert SECRET.encode() not in data
    assert b"SECRET" not in data
    assert b"Bearer" not in data
    assert SECRET not in repr(event)

    assert event["headers"] == {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "skills-2025-10-02",
        "x-foo": "bar",
        "user-agent": "curl/8.5",
    }
    assert event["event_id"] == events.derived_event_id(call_id, "submitted")
    assert event["call_id"] == call_id
    assert event["session_id"] == "sess-1"
    assert event["identity"] == factories.identity()
    assert event["bundle_version"] is None
    assert event["method"] == "POST"
    assert event["path"] == "/v1/messages"
    assert event["query"] == "beta=true"
    assert event["body"] == body
    assert event["upstream"] == "eu"
    assert event["approval_id"] == "apr_9"
    assert event["user_agent"] == "curl/8.5"
    assert event["client_ip"] == "10.0.0.9"
    assert event["reply_to"] == reply_to
    # the event is valid under the contract and reads back as built
    assert AvroCodec().decode(data) == (events.CALL_SUBMITTED, dict(event))


def test_build_submitted_is_idempotent_on_the_call_id() -> None:
    call_id = events.new_call_id()

    def build() -> events.CallSubmitted:
        return build_submitted(**{**_kwargs(), "call_id": call_id, "session_id": call_id, "stream": True})

    first, second = build(), build()
    assert first["event_id"] == second["event_id"]
    assert first["upstream"] is None and first["approval_id"] is None and first["user_agent"] is None
    other = build_submitted(**{**_kwargs(), "call_id": events.new_call_id()})
    assert other["event_id"] != first["event_id"]


def _kwargs() -> dict[str, Any]:
    return {
        "call_id": "c",
        "session_id": "s",
        "identity": factories.identity(),
        "instance": "i",
        "mode": "async",
        "stream": False,
        "reply_to": None,
        "path": "/v1/messages",
        "query": "",
        "headers": {},
        "body": b"{}",
        "model": "m",
        "client_ip": None,
    }


def test_accepted_connections_inherit_tcp_keepalive() -> None:
    """A caller held for an approval is silent for up to a minute: keep-alive probes keep the
    path's NAT state and detect a vanished caller."""
    import socket

    from services.ingress.main import listening_socket

    server = listening_socket("127.0.0.1", 0)
    with server, socket.create_connection(server.getsockname()):
        accepted, _ = server.accept()
        with accepted:
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # no Nagle delay
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
