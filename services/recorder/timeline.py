"""A session's replay timeline: requests, decisions, approvals and responses in order.

Pure functions over what :meth:`AuditStore.session_timeline` reads: the session's
``call_records`` rows (the masked bodies) and the events about its calls (from the raw event
log, so approval events of any shape appear). Masked values are marked: every request and
response entry lists the spans policy masked (type, placeholder, where), and the bodies hold
the placeholders, never the values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

#: Entry kind of each event type; approval events are named by topic (new ones appear as-is).
KIND_OF_EVENT = {
    "CallSubmitted": "request",
    "CallDecided": "decision",
    "CallCompleted": "response",
    "CallFailed": "failure",
    "ApprovalRequested": "approval_requested",
    "ApprovalDecided": "approval_decided",
}
_MASKED_FIELDS = ("type", "placeholder", "location", "start", "end", "scope")


def _iso(value: Any) -> Any:
    return value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else value


def _body(text: Any) -> Any:
    """A recorded body as JSON when it is JSON (else the text, e.g. a recorded SSE stream)."""
    if not text:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return str(text)


def _masked(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {k: item.get(k) for k in _MASKED_FIELDS}
        for item in payload.get("masked") or []
        if isinstance(item, dict)
    ]


def _kind(event_type: str, topic: str) -> str:
    if event_type in KIND_OF_EVENT:
        return KIND_OF_EVENT[event_type]
    if ".approvals." in f".{topic}":
        return "approval_" + topic.rsplit(".", 1)[-1]
    return event_type


def build(calls: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ordered entries of a session (see the module docstring)."""
    by_call = {str(c["call_id"]): c for c in calls}
    entries: list[dict[str, Any]] = []
    requested: set[str] = set()
    decided_masks: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        payload: dict[str, Any] = {}
        try:
            loaded = orjson.loads(event.get("payload") or "{}")
            payload = loaded if isinstance(loaded, dict) else {}
        except orjson.JSONDecodeError:
            payload = {}
        if event["event_type"] == "CallDecided":
            decided_masks[str(event["call_id"])] = _masked(payload)
    for event in events:
        call_id = str(event.get("call_id") or "")
        call = by_call.get(call_id, {})
        try:
            loaded = orjson.loads(event.get("payload") or "{}")
            payload = loaded if isinstance(loaded, dict) else {}
        except orjson.JSONDecodeError:
            payload = {}
        kind = _kind(str(event["event_type"]), str(event.get("topic") or ""))
        base: dict[str, Any] = {
            "at": _iso(event["time"]),
            "kind": kind,
            "call_id": call_id,
            "event_id": event.get("event_id"),
            "actor": event.get("username") or event.get("subject"),
        }
        if kind == "decision" and call_id not in requested:
            # No CallSubmitted recorded (e.g. it expired from Kafka first): the request is shown
            # where policy saw it.
            entries.append(_request(base | {"kind": "request"}, call, decided_masks.get(call_id, [])))
            requested.add(call_id)
        if kind == "request":
            if call_id in requested:
                continue
            requested.add(call_id)
            entries.append(_request(base, call, decided_masks.get(call_id, [])))
        elif kind == "decision":
            entries.append(
                base
                | {
                    "decision": payload.get("decision"),
                    "reason": payload.get("reason"),
                    "rule_ids": payload.get("rule_ids") or [],
                    "bundle_version": payload.get("bundle_version"),
                    "approval_id": payload.get("approval_id"),
                    "masked": _masked(payload),
                }
            )
        elif kind == "response":
            entries.append(
                base
                | {
                    "status": payload.get("status"),
                    "stop_reason": payload.get("stop_reason"),
                    "usage": {
                        "input_tokens": payload.get("input_tokens"),
                        "output_tokens": payload.get("output_tokens"),
                    },
                    "latency_ms": payload.get("latency_ms"),
                    "stream": bool(payload.get("stream")),
                    "first_token_ms": payload.get("first_token_ms"),
                    "body": _body(call.get("response_body")),
                    "masked": _masked(payload),
                    "blocked_tools": payload.get("blocked_tools") or [],
                }
            )
        elif kind == "failure":
            entries.append(
                base
                | {
                    "status": payload.get("status"),
                    "error_type": payload.get("error_type"),
                    "message": payload.get("message"),
                    "stage": payload.get("stage"),
                }
            )
        else:
            # Approvals (requested, decided, resolved, notified, and whatever comes next) and any
            # other event: every scalar field of the payload, so new fields show up unchanged.
            details = {
                k: v
                for k, v in payload.items()
                if k not in ("event_id", "call_id", "session_id", "time", "identity", "bundle_version")
                and not k.endswith("_bytes")
            }
            entries.append(base | details)
    return entries


def _request(base: dict[str, Any], call: Mapping[str, Any], masked: list[dict[str, Any]]) -> dict[str, Any]:
    return base | {
        "model": call.get("model"),
        "skills": list(call.get("skills") or []),
        "tools": list(call.get("tools") or []),
        "body": _body(call.get("request_body")),
        "masked": masked,
    }


def document(
    session_id: str, calls: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The JSON of ``GET /v1/audit/sessions/{id}``."""
    return {
        "type": "session",
        "id": session_id,
        "calls": [
            {
                "call_id": c["call_id"],
                "time": _iso(c.get("time")),
                "subject": c.get("subject"),
                "username": c.get("username"),
                "model": c.get("model"),
                "state": c.get("state"),
                "decision": c.get("decision"),
                "session_source": c.get("session_source"),
            }
            for c in calls
        ],
        "timeline": build(calls, events),
    }
