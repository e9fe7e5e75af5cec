"""What the tests feed to handlers, codecs and stores: events, response bodies, audit stores.

Each event builder returns a complete event (every field of its TypedDict in
:mod:`skillgate.events`, checked when built) with plain defaults; any field can be given to replace
its default, envelope fields too (``session_id``, ``identity``, ``bundle_version``, ``time``,
``event_id``). A name that is not a field of the event is a :class:`TypeError`, so a typo cannot
silently build a different event than the test meant.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson

from services.recorder.config import ClickHouseSettings
from services.recorder.store import AuditStore
from skillgate import events
from skillgate.events import CallDecided, CallSubmitted, Identity

E = TypeVar("E", bound=Mapping[str, object])

#: The bundle label the default policy bundle stamps on what it decides.
BUNDLE = "default@2026.11.21-1"
MODEL = "claude-sonnet-4-5"
SESSION_ID = "sess-1"
REQUEST_BODY = orjson.dumps(
    {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
)


def identity(**fields: Any) -> Identity:
    """A verified caller (a fresh dict each time: tests may change it)."""
    return _with(
        Identity(
            subject="user-1",
            issuer="https://idp.example.com",
            username="ada",
            email="ada@example.com",
            groups=["ml"],
            client_id="cli",
            token_id="jti-1",
        ),
        fields,
    )


def call_submitted(call_id: str | None = None, **fields: Any) -> CallSubmitted:
    """A CallSubmitted as ingress publishes it (a new call id unless ``call_id`` is given).

    Its event id derives from the call id, as ingress derives it. ``mode`` follows ``reply_to``:
    ``sync`` when someone waits for the reply, ``async`` otherwise (default: nobody waits).
    """
    call_id = call_id or events.new_call_id()
    submitted = {
        **_envelope(call_id, "submitted", None),
        **_request(fields),
        "body": REQUEST_BODY,
        "upstream": None,
        "client_ip": "10.0.0.1",
        "user_agent": "sdk/1",
    }
    return cast(CallSubmitted, _with(_complete(submitted, CallSubmitted.__required_keys__), fields))


def call_decided(call_id: str | None = None, **fields: Any) -> CallDecided:
    """A CallDecided as policy publishes it: allowed by ``BUNDLE``, nothing masked.

    Its event id derives from the call id; ``mode`` follows ``reply_to`` as in
    :func:`call_submitted`; ``submitted_at`` is 5 ms before the event's time.
    """
    call_id = call_id or events.new_call_id()
    envelope = _envelope(call_id, "decided", BUNDLE)
    decided = {
        **envelope,
        **_request(fields),
        "decision": "allow",
        "reason": "allowed by default",
        "rule_ids": [],
        "tags": [],
        "upstream": "default",
        "status": 0,
        "error_type": None,
        "body": b'{"model":"claude-sonnet-4-5"}',
        "record_body": None,
        "masked": [],
        "fail_open": False,
        "submitted_at": fields.get("time", envelope["time"]) - 5_000,
        "response_mask_upstream": [],
        "response_mask_record": [],
    }
    return cast(CallDecided, _with(_complete(decided, CallDecided.__required_keys__), fields))


def response_body(text: str = "hi", **fields: Any) -> bytes:
    """An Anthropic Messages API response (JSON bytes) answering ``text``; fields replace keys."""
    doc: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 25, "output_tokens": 7},
    }
    return orjson.dumps(_with(doc, fields))


@contextmanager
def audit_store(directory: Path) -> Iterator[AuditStore]:
    """A migrated audit store on an embedded chDB in ``directory``, closed when the block ends.

    chDB allows one engine path per process at a time, so each test closes its store.
    """
    store = AuditStore(ClickHouseSettings(url=f"chdb://{directory / 'audit.chdb'}"), directory)
    try:
        store.migrate()
        yield store
    finally:
        store.close()


def _request(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What a submitted and a decided call both say about the request: a non-streamed POST
    /v1/messages, ``sync`` when ``fields`` name a ``reply_to`` (someone waits), else ``async``."""
    return {
        "ingress_instance": "ingress-1",
        "mode": "sync" if fields.get("reply_to") else "async",
        "stream": False,
        "reply_to": None,
        "method": "POST",
        "path": "/v1/messages",
        "query": "",
        "headers": {"anthropic-version": "2023-06-01"},
        "model": MODEL,
        "approval_id": None,
    }


def _envelope(call_id: str, kind: str, bundle_version: str | None) -> events.Envelope:
    return events.envelope(
        call_id,
        SESSION_ID,
        identity(),
        bundle_version,
        event_id=events.derived_event_id(call_id, kind),
    )


def _complete(event: dict[str, Any], expected: frozenset[str]) -> dict[str, Any]:
    """``event``, after checking it has exactly the ``expected`` fields (so defaults keep up)."""
    assert set(event) == expected, f"fields missing or extra: {sorted(set(event) ^ expected)}"
    return event


def _with(event: E, fields: Mapping[str, Any]) -> E:
    """``event`` with ``fields`` replacing its values; refuses names it does not have."""
    unknown = sorted(set(fields) - set(event))
    if unknown:
        raise TypeError(f"not a field of the event: {', '.join(unknown)}")
    return cast(E, {**event, **fields})
