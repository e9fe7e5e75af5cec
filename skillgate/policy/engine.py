"""Deciding on a call under a bundle: ordered rules, first terminal rule wins, and the composing
actions (mask, tag, rate_limit, route) of every matching rule before it apply too.

Pure: no I/O. Rate-limit counters come from the caller (the policy service keeps them in faust
tables), masking from :mod:`skillgate.policy.masking`. Every decision says which rules matched
and why, in words a caller or an auditor can read.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from skillgate.events import Identity, MaskedValue
from skillgate.policy.bundle import ApprovalSpec, Bundle, CompiledRule, Match
from skillgate.policy.masking import Masker


class RateCounter(Protocol):
    """Counts usage per key in fixed windows.

    The policy service counts in faust tables, in two passes: :class:`DeferredCounter` collects
    what a call is charged, the counters' partitions add it up, and :class:`ReplayCounter` gives
    the totals back to a second evaluation.
    """

    def add(self, key: str, window_seconds: int, amount: int, limit: int) -> int:
        """Add ``amount`` to ``key``'s current window and return the window's new total."""
        ...


class MemoryRateCounter:
    """An in-process :class:`RateCounter` (tests, `skillgate policy test`)."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._counts: dict[tuple[str, int], int] = {}

    def add(self, key: str, window_seconds: int, amount: int, limit: int) -> int:
        """See :class:`RateCounter`."""
        slot = (key, int(self._clock() // window_seconds))
        self._counts[slot] = self._counts.get(slot, 0) + amount
        return self._counts[slot]


@dataclass(frozen=True)
class Charge:
    """One counter a call is charged to."""

    key: str
    window_seconds: int
    amount: int
    limit: int


class DeferredCounter:
    """First pass: records every charge and answers that nothing is over its limit yet."""

    def __init__(self) -> None:
        self.charges: list[Charge] = []

    def add(self, key: str, window_seconds: int, amount: int, limit: int) -> int:
        """See :class:`RateCounter`."""
        self.charges.append(Charge(key, window_seconds, amount, limit))
        return 0


class ReplayCounter:
    """Second pass: the window totals the counters reached, by key. A key not charged (the
    charging stopped at an earlier counter over its limit) counts as 0."""

    def __init__(self, charges: list[Charge], totals: list[int]) -> None:
        self._totals = {c.key: total for c, total in zip(charges, totals, strict=False)}

    def add(self, key: str, window_seconds: int, amount: int, limit: int) -> int:
        """See :class:`RateCounter`."""
        return self._totals.get(key, 0)


@dataclass
class CallContext:
    """What rules can look at."""

    identity: Identity
    request: Mapping[str, Any]
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    upstream: str | None = None
    now: datetime | None = None


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
    response_mask_upstream: list[str] = field(default_factory=list)
    response_mask_record: list[str] = field(default_factory=list)
    approval: ApprovalSpec | None = None
    approval_rule: str | None = None
    fail_open: bool = False


def prompt_text(request: Mapping[str, Any]) -> str:
    """All text a request gives the model (system, messages, tool results), for matching."""
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            if value.get("type") in ("image", "document") and "source" in value:
                return
            for k in ("text", "content", "input", "thinking"):
                if k in value:
                    walk(value[k])

    walk(request.get("system"))
    for message in request.get("messages") or []:
        if isinstance(message, dict):
            walk(message.get("content"))
    return "\n".join(parts)


def estimate_tokens(text: str) -> int:
    """A cheap input-token estimate (about four characters per token)."""
    return len(text) // 4


def skills_of(request: Mapping[str, Any]) -> list[str]:
    """Claude Skill ids the request loads (``container.skills[].skill_id``)."""
    container = request.get("container")
    skills = container.get("skills") if isinstance(container, dict) else None
    return [str(s.get("skill_id", "")) for s in skills or [] if isinstance(s, dict)]


def tools_of(request: Mapping[str, Any]) -> list[str]:
    """Names and types of the tools the request offers (both, so rules may match either)."""
    out = []
    for t in request.get("tools") or []:
        if isinstance(t, dict):
            out += [str(t.get("name", "")), str(t.get("type", ""))]
    return out


def _any_glob(values: Iterable[str], globs: list[str]) -> bool:
    vals = [v for v in values if v]
    return any(fnmatch.fnmatchcase(v, g) for v in vals for g in globs)


class _Facts:
    """Lazily computed facts about one call, shared by every rule."""

    def __init__(self, ctx: CallContext, bundle: Bundle) -> None:
        self.ctx = ctx
        self.bundle = bundle
        self._text: str | None = None
        self._entities: frozenset[str] | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = prompt_text(self.ctx.request)
        return self._text

    @property
    def entities(self) -> frozenset[str]:
        if self._entities is None:
            self._entities = frozenset(f.type for f in self.bundle.detectors.scan(self.text))
        return self._entities

    def skills(self) -> list[str]:
        return skills_of(self.ctx.request)

    def tools(self) -> list[str]:
        return tools_of(self.ctx.request)

    def betas(self) -> list[str]:
        raw = self.ctx.headers.get("anthropic-beta", "")
        return [b.strip() for b in raw.split(",") if b.strip()]


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def matches(rule: CompiledRule, m: Match, facts: _Facts) -> bool:
    """Whether every condition of ``m`` holds for the call."""
    ident = facts.ctx.identity
    if m.users is not None and not _any_glob(
        [ident["subject"], ident["username"] or "", ident["email"] or ""], m.users
    ):
        return False
    if m.groups is not None and not _any_glob(ident["groups"], m.groups):
        return False
    if m.clients is not None and not _any_glob([ident["client_id"] or ""], m.clients):
        return False
    if m.models is not None and not _any_glob([str(facts.ctx.request.get("model", ""))], m.models):
        return False
    if m.skills is not None and not _any_glob(facts.skills(), m.skills):
        return False
    if m.tools is not None and not _any_glob(facts.tools(), m.tools):
        return False
    if m.betas is not None and not _any_glob(facts.betas(), m.betas):
        return False
    if m.input_tokens is not None and not m.input_tokens.holds(estimate_tokens(facts.text)):
        return False
    if m.max_tokens is not None:
        mt = facts.ctx.request.get("max_tokens")
        if not isinstance(mt, int) or not m.max_tokens.holds(mt):
            return False
    # content and entities are refused inside `not` at load time, so they are top-level here.
    if m.content is not None and not any(p.search(facts.text) for p in rule.content):
        return False
    if m.entities is not None and not (rule.entities & facts.entities):
        return False
    if m.time is not None:
        now = facts.ctx.now or datetime.now(UTC)
        hhmm = now.strftime("%H:%M")
        if m.time.days is not None and _DAYS[now.weekday()] not in m.time.days:
            return False
        if not (m.time.start <= hhmm < m.time.end):
            return False
    return not (m.not_ is not None and matches(rule, m.not_, facts))


def _limit_key(spec_by: str, ident: Identity, rule_id: str) -> str:
    if spec_by == "group":
        who = ",".join(sorted(ident["groups"])) or "-"
    elif spec_by == "client":
        who = ident["client_id"] or ident["subject"]
    else:
        who = ident["subject"]
    return f"{rule_id}|{spec_by}|{who}"


def evaluate(
    bundle: Bundle,
    ctx: CallContext,
    masker: Masker | None = None,
    counter: RateCounter | None = None,
) -> Verdict:
    """Decide on a call under ``bundle``.

    The caller's bytes are forwarded unchanged unless something is masked (then the masked body
    is re-serialised), so the upstream sees exactly what the caller sent wherever policy did not
    intervene.
    """
    ident = ctx.identity
    body = ctx.body
    facts = _Facts(ctx, bundle)
    # Masking composes from every matching mask rule wherever it stands, so whatever the outcome
    # (a deny rule placed first, a rate limit, a refused upstream) the record is masked.
    req_up: set[str] = set()
    req_rec: set[str] = set()
    resp_up: set[str] = set()
    resp_rec: set[str] = set()
    mask_ids: list[str] = []
    for compiled in bundle.rules:
        rule = compiled.rule
        if rule.action != "mask" or rule.mask is None or not matches(compiled, rule.match, facts):
            continue
        mask_ids.append(rule.id)
        # mask_request_layers masks the upstream layer in the record too.
        if "request" in rule.mask.direction:
            (req_up if rule.mask.scope == "upstream" else req_rec).update(compiled.mask_types)
        if "response" in rule.mask.direction:
            (resp_up if rule.mask.scope == "upstream" else resp_rec).update(compiled.mask_types)
    masked: list[MaskedValue] = []
    forward, record = body, None
    if req_up or req_rec:
        if masker is None:
            raise RuntimeError("the bundle masks requests but no masker is configured")
        result = masker.session().mask_request_layers(ctx.request, upstream=req_up, record=req_rec)
        masked = result.masked
        if any(m["scope"] == "upstream" for m in masked):
            forward = orjson.dumps(result.upstream)
        if masked:
            record = orjson.dumps(result.record)
    recorded = record or body
    if ctx.upstream is not None and ctx.upstream not in bundle.caller_upstreams:
        # Which connection (key, organisation, billing) a call uses is policy's choice; a caller
        # may only pick among those the bundle offers.
        return Verdict(
            decision="deny",
            reason=f"upstream connection `{ctx.upstream}` is not one callers may choose "
            f"(bundle {bundle.label} allows: {', '.join(bundle.caller_upstreams)})",
            rule_ids=mask_ids,
            status=403,
            error_type="permission_error",
            record_body=recorded,
            masked=masked,
        )
    matched: list[str] = []
    tags: list[str] = []
    reasons: list[str] = []
    upstream = ctx.upstream or "default"
    terminal: CompiledRule | None = None
    for compiled in bundle.rules:
        rule = compiled.rule
        if rule.action == "mask":
            # Already matched (and applied) in the masking pass above; listed here in rule order.
            if rule.id in mask_ids:
                matched.append(rule.id)
            continue
        if not matches(compiled, rule.match, facts):
            continue
        matched.append(rule.id)
        if rule.action == "tag":
            tags += [t for t in rule.tags if t not in tags]
        elif rule.action == "route" and rule.route:
            upstream = rule.route
            reasons.append(f"{rule.id}: routed to `{rule.route}`")
        elif rule.action == "rate_limit" and rule.rate_limit is not None:
            spec = rule.rate_limit
            counter = counter or MemoryRateCounter()
            key = _limit_key(spec.by, ident, rule.id)
            over = []
            if (
                spec.requests is not None
                and counter.add(key + "|req", spec.window_seconds, 1, spec.requests) > spec.requests
            ):
                over.append(f"{spec.requests} requests")
            if spec.tokens is not None:
                tokens = estimate_tokens(facts.text)
                if counter.add(key + "|tok", spec.window_seconds, tokens, spec.tokens) > spec.tokens:
                    over.append(f"{spec.tokens} estimated input tokens")
            if over:
                return Verdict(
                    decision="rate_limited",
                    reason=rule.reason
                    or f"rate limit `{rule.id}`: more than {' and '.join(over)} per "
                    f"{spec.window_seconds} s for this {spec.by}",
                    rule_ids=matched + [i for i in mask_ids if i not in matched],
                    tags=tags,
                    upstream=upstream,
                    status=429,
                    error_type="rate_limit_error",
                    record_body=recorded,
                    masked=masked,
                )
        if rule.action in ("allow", "deny", "require_approval"):
            terminal = compiled
            break
    matched += [i for i in mask_ids if i not in matched]  # mask rules after the terminal one
    action = terminal.rule.action if terminal else bundle.default_action
    if terminal is not None:
        reason = terminal.rule.reason or f"rule `{terminal.rule.id}` ({action})"
    else:
        reason = f"{action} by default in bundle {bundle.label}"
    if masked:
        kinds = sorted({m["type"] for m in masked})
        reasons.append(f"masked {len(masked)} value(s): {', '.join(kinds)}")
    full_reason = "; ".join([reason, *reasons])
    common: dict[str, Any] = {
        "rule_ids": matched,
        "tags": tags,
        "upstream": upstream,
        "masked": masked,
        "response_mask_upstream": sorted(resp_up),
        "response_mask_record": sorted(resp_rec),
    }
    if action == "deny":
        return Verdict(
            decision="deny",
            reason=full_reason,
            status=403,
            error_type="permission_error",
            record_body=record or body,
            **common,
        )
    if action == "require_approval":
        assert terminal is not None
        return Verdict(
            decision="require_approval",
            reason=full_reason,
            status=202,
            body=forward,
            record_body=record,
            approval=terminal.rule.approval or ApprovalSpec(),
            approval_rule=terminal.rule.id,
            **common,
        )
    return Verdict(decision="allow", reason=full_reason, body=forward, record_body=record, **common)
