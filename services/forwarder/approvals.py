"""Tool commands that need a human's approval (tool rules with ``action: require_approval``).

The forwarder cannot hold an answer the upstream already produced for a person to decide on, so
a held tool call works like this: the call's answer reaches the caller with the tool block
replaced by an explanation naming the approval id (like ``block_tool``), and an approval request
of kind ``tool`` goes to the policy service's approvals workflow (``approvals.held``: announced,
routed, judged like any approval). Once approved, the requester's next call may run exactly that
command (a one-time grant, for an hour) or any command the rule matches (a time-window grant):
the forwarder follows ``approvals.resolved`` and lets covered tool blocks through, recording the
grant they passed under.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from skillgate import events
from skillgate.events import ApprovalRequested, ApprovalResolved, BlockedTool, CallDecided
from skillgate.policy.bundle import ApprovalSpec, CompiledToolRule
from skillgate.policy.grants import Grants
from skillgate.policy.masking import redact_excerpt


def command_digest(tool_input: Any) -> str:
    """SHA-256 of a tool input as canonical JSON: a one-time grant covers exactly this command."""
    return hashlib.sha256(orjson.dumps(tool_input, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass
class ToolApprovals:
    """One call's view of tool approvals: which held commands a grant covers, and the approval
    requests to publish for the rest (collected while the guard checks the answer)."""

    call: CallDecided
    grants: Grants
    approvals_url: str
    requests: list[ApprovalRequested] = field(default_factory=list)
    granted: list[BlockedTool] = field(default_factory=list)  # tool calls a grant let through

    def approval_id(self, tool_use_id: str) -> str:
        """The approval id of a held tool call (derived: the same answer gives the same id)."""
        return events.approval_id(self.call["call_id"], f"tool-approval:{tool_use_id}")

    def grant_for(self, rule: CompiledToolRule, tool_input: Any) -> ApprovalResolved | None:
        """The caller's grant that covers this command under ``rule``, if any."""
        return self.grants.active(
            self.call["identity"]["subject"], rule.rule.id, events.now_micros(), command_digest(tool_input)
        )

    def allow(self, rule: CompiledToolRule, tool: str, tool_use_id: str, grant: ApprovalResolved) -> None:
        """Note a tool call a grant let through in :attr:`granted` (the record keeps it with
        the other checked tool calls); once, however often the block is checked."""
        if any(g["tool_use_id"] == tool_use_id and g["rule_id"] == rule.rule.id for g in self.granted):
            return  # checked already (a streamed block, then the assembled answer)
        self.granted.append(
            BlockedTool(
                tool_use_id=tool_use_id,
                tool=tool,
                rule_id=rule.rule.id,
                reason=f"allowed by grant {grant['approval_id']} ({grant['reason']})",
                action="allowed_by_grant",
            )
        )

    def request(
        self, rule: CompiledToolRule, tool: str, tool_use_id: str, tool_input: Any, shown: Any
    ) -> str:
        """Ask for approval of one tool call; returns its approval id. ``shown`` is the input as
        the record has it (masked for the record): the approver's excerpt, with any credential
        left in it redacted."""
        approval_id = self.approval_id(tool_use_id)
        if any(r["approval_id"] == approval_id for r in self.requests):
            return approval_id
        spec = rule.rule.approval or ApprovalSpec()
        call = self.call
        ident = call["identity"]
        now = events.now_micros()
        command = orjson.dumps(shown).decode()
        who = ident["username"] or ident["email"] or ident["subject"]
        env = events.envelope(
            call["call_id"],
            call["session_id"],
            ident,
            call["bundle_version"],
            event_id=events.derived_event_id(call["call_id"], f"approval-requested:{approval_id}"),
        )
        self.requests.append(
            ApprovalRequested(
                **env,
                approval_id=approval_id,
                rule_ids=[rule.rule.id],
                reason=rule.rule.reason,
                summary=(
                    f"{who} ({', '.join(ident['groups']) or 'no groups'}): {call['model'] or 'the model'} "
                    f"wants to run tool `{tool}`. Rule {rule.rule.id}: {rule.rule.reason}"
                )[:1000],
                excerpt=redact_excerpt(command, 500),
                approver_groups=list(spec.groups),
                quorum=spec.quorum,
                expires_at=now + spec.timeout_seconds * 1_000_000,
                each_group=spec.each_group,
                max_window_seconds=spec.max_window_seconds,
                rule_id=rule.rule.id,
                model=call["model"],
                skills=[],
                tools=[tool],
                estimated_tokens=0,
                request_sha256="",
                mode=call["mode"],
                kind="tool",
                tool=tool,
                command_sha256=command_digest(tool_input),
            )
        )
        return approval_id

    def explanation(self, tool: str, rule: CompiledToolRule, approval_id: str) -> str:
        """What the caller (and the model, next turn) reads instead of the held tool call."""
        return (
            f"[skillgate held tool call {tool} for approval {approval_id}: {rule.rule.reason} (rule "
            f"{rule.rule.id}). An approver can decide at {self.approvals_url.rstrip('/')}/v1/approvals/"
            f"{approval_id}; once approved, ask again to run it]"
        )
