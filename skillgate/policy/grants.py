"""Approval grants: what a person may do without asking again, for a while.

Services follow ``approvals.resolved`` from its beginning (approvals are human-scale, so the whole
topic is small) and keep the approved grants:

- call approvals with a time window: the requester's calls held by the same ``require_approval``
  rule pass until the window ends (the policy service);
- tool approvals (a tool rule with ``action: require_approval``): a one-time grant lets the
  requester run exactly the approved command (same tool input) until it ends; a time window lets
  them run any command the rule matches (the forwarder).

Each call that passes under a grant is recorded with the grant's approval id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from skillgate import events, topics
from skillgate.events import ApprovalResolved

#: How long a one-time approval of a tool command stays usable.
ONE_TIME_TOOL_GRANT_SECONDS = 3600


class Grants:
    """Active grants by (subject, rule id) and, for one-time tool grants, by command."""

    def __init__(self) -> None:
        self._grants: dict[tuple[str, str, str], ApprovalResolved] = {}

    def on_event(self, suffix: str, name: str, event: Mapping[str, Any]) -> None:
        """Feed one approvals.resolved event (a :class:`skillgate.follow.TopicFollower` callback)."""
        if suffix != topics.APPROVALS_RESOLVED or name != events.APPROVAL_RESOLVED:
            return
        resolved: ApprovalResolved = event  # type: ignore[assignment]
        until = resolved["grant_until"]
        if resolved["outcome"] != "approved" or not until:
            return
        command = resolved["command_sha256"] if resolved["grant"] == "one_time" else ""
        if resolved["grant"] == "one_time" and not command:
            return  # a one-time call approval was used by its own call
        key = (resolved["identity"]["subject"], resolved["rule_id"], command)
        known = self._grants.get(key)
        if known is None or (known["grant_until"] or 0) < until:
            self._grants[key] = resolved

    def active(
        self, subject: str, rule_id: str | None, now: int, command_sha256: str = ""
    ) -> ApprovalResolved | None:
        """The grant covering ``subject`` under ``rule_id`` at ``now`` (micros): a time window,
        or (given ``command_sha256``) a one-time grant of exactly that command."""
        if not rule_id:
            return None
        for command in (command_sha256, "") if command_sha256 else ("",):
            grant = self._grants.get((subject, rule_id, command))
            if grant is not None and (grant["grant_until"] or 0) > now:
                return grant
        return None
