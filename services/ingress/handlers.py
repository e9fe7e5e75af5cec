"""What the ingress does with a request: read it safely, check it, turn it into an event.

Kept free of FastAPI so it can be unit-tested directly.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from skillgate import events
from skillgate.errors import GatewayError
from skillgate.events import CallSubmitted, Identity, ReplyTo

# Never passed upstream: credentials (the caller's token stays here), hop-by-hop headers, and
# headers the forwarder sets itself. Everything else is passed through byte for byte.
_DROP_REQUEST_HEADERS = frozenset(
    {
        "authorization",
        "x-api-key",
        "cookie",
        "proxy-authorization",
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "accept-encoding",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    }
)
_CONTROL_PREFIX = "x-skillgate-"
_SESSION_RE = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")

UPSTREAM_HEADER = "x-skillgate-upstream"
SESSION_HEADER = "x-skillgate-session"
APPROVAL_HEADER = "x-skillgate-approval"


def passthrough_headers(headers: Mapping[str, str] | list[tuple[str, str]]) -> dict[str, str]:
    """The request headers to pass upstream (lower-case names; repeated headers joined by ``,``)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for raw_name, value in items:
        name = raw_name.lower()
        if name in _DROP_REQUEST_HEADERS or name.startswith(_CONTROL_PREFIX):
            continue
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


async def read_body(stream: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """Read a request body, refusing it as soon as it exceeds ``limit`` bytes."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError as exc:
            raise GatewayError(400, "invalid Content-Length header") from exc
        if declared < 0:
            raise GatewayError(400, "invalid Content-Length header")
        if declared > limit:
            raise GatewayError(413, f"request body exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def check_messages_request(body: bytes) -> dict[str, Any]:
    """Parse a Messages API request and check the fields the gateway relies on.

    Only what skillgate needs is checked (the upstream validates the rest): unknown fields pass
    through untouched, so new API features work without a gateway release.
    """
    if not body:
        raise GatewayError(400, "request body is empty; expected a JSON object")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise GatewayError(400, "request body must be a JSON object")
    model = parsed.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "model: Field required (a non-empty string)")
    max_tokens = parsed.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise GatewayError(400, "max_tokens: Field required (an integer >= 1)")
    messages = parsed.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "messages: Field required (a non-empty list)")
    stream = parsed.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(400, "stream: Input should be a valid boolean")
    return parsed


def check_count_tokens_request(body: bytes) -> dict[str, Any]:
    """Parse a count_tokens request (model and messages, no max_tokens)."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise GatewayError(400, "request body must be a JSON object")
    if not isinstance(parsed.get("model"), str) or not isinstance(parsed.get("messages"), list):
        raise GatewayError(400, "model and messages are required")
    return parsed


def session_id_from(headers: Mapping[str, str], call_id: str) -> str:
    """The caller-given session (``x-skillgate-session``) or, by default, the call's own id."""
    given = headers.get(SESSION_HEADER)
    if given is None:
        return call_id
    if not _SESSION_RE.fullmatch(given):
        raise GatewayError(400, f"{SESSION_HEADER} must be 1-128 characters of [A-Za-z0-9._:@/-]")
    return given


def build_submitted(
    *,
    call_id: str,
    session_id: str,
    identity: Identity,
    instance: str,
    mode: str,
    stream: bool,
    reply_to: ReplyTo | None,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
    model: str,
    client_ip: str | None,
) -> CallSubmitted:
    """The calls.submitted event for an accepted request."""
    return CallSubmitted(
        **events.envelope(
            call_id,
            session_id,
            identity,
            None,
            event_id=events.derived_event_id(call_id, "submitted"),
        ),
        ingress_instance=instance,
        mode=mode,
        stream=stream,
        reply_to=reply_to,
        method="POST",
        path=path,
        query=query,
        headers=passthrough_headers(headers),
        body=body,
        model=model,
        upstream=headers.get(UPSTREAM_HEADER),
        client_ip=client_ip,
        user_agent=headers.get("user-agent"),
        approval_id=headers.get(APPROVAL_HEADER),
    )
