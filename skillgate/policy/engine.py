"""Deciding on a call under a bundle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from skillgate.events import MaskedValue
from skillgate.policy.bundle import Bundle


@dataclass
class Verdict:
    """The outcome of evaluating a call: what the decided event will say."""

    decision: str
    reason: str
    rule_ids: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    upstream: str = "default"
    status: int = 0
    error_type: str | None = None
    body: bytes | None = None
    record_body: bytes | None = None
    masked: list[MaskedValue] = field(default_factory=list)


def evaluate(bundle: Bundle, body: bytes, request: dict[str, Any], upstream: str | None) -> Verdict:
    """Decide on a request under ``bundle``.

    ``body`` is the raw request (forwarded unchanged when nothing is masked, so the upstream
    sees the caller's bytes); ``request`` is its parsed form, read but never re-serialised here.
    """
    if upstream is not None and upstream not in bundle.caller_upstreams:
        # Which connection (key, organisation, billing) a call uses is policy's choice; a caller
        # may only pick among those the bundle offers.
        return Verdict(
            decision="deny",
            reason=f"upstream connection `{upstream}` is not one callers may choose "
            f"(bundle {bundle.label} allows: {', '.join(bundle.caller_upstreams)})",
            status=403,
            error_type="permission_error",
            record_body=body,
        )
    if bundle.default_action == "deny":
        return Verdict(
            decision="deny",
            reason=f"denied by default in bundle {bundle.label}",
            status=403,
            error_type="permission_error",
            record_body=body,
        )
    return Verdict(
        decision="allow",
        reason=f"allowed by default in bundle {bundle.label}",
        upstream=upstream or "default",
        body=body,
    )
