"""Announcing approval requests to each approver group's webhook.

The payload is Slack-compatible (``text`` plus ``blocks``, with a deep link to the approval) and
carries the request's fields under ``skillgate`` for machines. The body is signed with HMAC-SHA256
over ``"<timestamp>.<body>"`` (headers ``x-skillgate-timestamp`` and ``x-skillgate-signature:
v1=<hex>``), so a receiver can check it came from skillgate and is fresh. Failed deliveries are
retried with exponential backoff; every delivery ends in one ``approvals.notified`` event. Delivery
is at least once: a receiver deduplicates on ``x-skillgate-delivery-id``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
import orjson

from skillgate import events
from skillgate.events import ApprovalNotified, ApprovalRequested

log = logging.getLogger(__name__)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``v1=<hex>``: HMAC-SHA256 of ``timestamp.body`` with the webhook secret."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def payload(request: ApprovalRequested, link: str) -> bytes:
    """The webhook body announcing ``request`` (Slack-compatible, plus the fields for machines)."""
    expires = datetime.fromtimestamp(request["expires_at"] / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    text = (
        f"Approval needed ({request['approval_id']}): {request['summary']}\nExpires {expires}. Decide: {link}"
    )
    doc = {
        "text": text,
        "blocks": [
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"*Approval needed* `{request['approval_id']}`"},
            },
            {"type": "section", "text": {"type": "mrkdwn", "text": request["summary"]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"> {request['excerpt'][:300]}"}},
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"Expires {expires} · <{link}|open>"}],
            },
        ],
        "skillgate": {
            "approval_id": request["approval_id"],
            "call_id": request["call_id"],
            "requester": request["identity"]["subject"],
            "requester_name": request["identity"]["username"],
            "groups": request["identity"]["groups"],
            "model": request["model"],
            "skills": request["skills"],
            "tools": request["tools"],
            "estimated_tokens": request["estimated_tokens"],
            "rule_ids": request["rule_ids"],
            "reason": request["reason"],
            "excerpt": request["excerpt"],
            "approver_groups": request["approver_groups"],
            "quorum": request["quorum"],
            "each_group": request["each_group"],
            "expires_at": request["expires_at"],
            "url": link,
        },
    }
    return orjson.dumps(doc)


@dataclass(frozen=True)
class Delivery:
    """Where and how to deliver one group's announcements."""

    group: str
    url: str
    secret: bytes
    attempts: int
    backoff_seconds: float


async def deliver(
    client: httpx.AsyncClient, delivery: Delivery, request: ApprovalRequested, link: str
) -> ApprovalNotified:
    """POST the announcement, retrying with backoff; the notified event says how it went."""
    body = payload(request, link)
    status: int | None = None
    error: str | None = None
    attempt = 0
    delivery_id = events.derived_event_id(
        request["call_id"], f"notify:{request['approval_id']}:{delivery.group}"
    )
    for attempt in range(1, delivery.attempts + 1):
        stamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "x-skillgate-timestamp": stamp,
            "x-skillgate-signature": signature(delivery.secret, stamp, body),
            "x-skillgate-delivery-id": delivery_id,
            "x-skillgate-attempt": str(attempt),
        }
        try:
            response = await client.post(delivery.url, content=body, headers=headers)
            status, error = response.status_code, None
            if response.is_success:
                break
            error = f"HTTP {status}"
        except httpx.HTTPError as exc:
            status, error = None, type(exc).__name__
        if attempt < delivery.attempts:
            await asyncio.sleep(delivery.backoff_seconds * 2 ** (attempt - 1))  # backoff, not sync
    delivered = status is not None and 200 <= status < 300
    level = logging.INFO if delivered else logging.WARNING
    log.log(
        level,
        "approval webhook delivered" if delivered else "approval webhook failed",
        extra={
            "approval_id": request["approval_id"],
            "group": delivery.group,
            "attempts": attempt,
            "status": status,
        },
    )
    env = events.envelope(
        request["call_id"],
        request["session_id"],
        events.anonymous_identity(),
        request["bundle_version"],
        event_id=delivery_id,
    )
    return ApprovalNotified(
        **env,
        approval_id=request["approval_id"],
        group=delivery.group,
        target=_host(delivery.url),
        delivered=delivered,
        attempts=attempt,
        status=status,
        error=error,
    )


def _host(url: str) -> str:
    """Host (and port) of a webhook URL, never its credentials, path or query (they may hold a
    token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host
