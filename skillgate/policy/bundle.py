"""Policy bundles: versioned YAML documents of ordered rules (``policies/*.yaml``).

A bundle is validated completely when it is loaded: unknown fields, a rule whose action lacks its
settings, a pattern RE2 refuses, a detector type that does not exist — each is an error naming the
file, the line and the field. A bundle that loads is one this engine applies in full; nothing in
it is silently ignored. The schema is documented in ``policies/README.md``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import re2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from skillgate.policy.detectors import DetectorError, DetectorSet

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent.parent / "policies" / "default.yaml"

Action = Literal["allow", "deny", "mask", "require_approval", "rate_limit", "route", "tag"]
TERMINAL_ACTIONS = frozenset({"allow", "deny", "require_approval"})
Direction = Literal["request", "response"]
_BOTH_DIRECTIONS: tuple[Direction, ...] = ("request", "response")
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class BundleError(ValueError):
    """A bundle that cannot be applied; the message names the file, line and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Number(_Strict):
    """A numeric condition: every bound given must hold."""

    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    def holds(self, value: float) -> bool:
        """Whether ``value`` satisfies every bound."""
        return (
            (self.gt is None or value > self.gt)
            and (self.gte is None or value >= self.gte)
            and (self.lt is None or value < self.lt)
            and (self.lte is None or value <= self.lte)
        )


class TimeWindow(_Strict):
    """Days of the week and a time range (``start`` inclusive, ``end`` exclusive) in UTC."""

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None = None
    start: str = "00:00"
    end: str = "24:00"

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if value != "24:00" and not _HHMM.match(value):
            raise ValueError("must be HH:MM (24-hour, UTC)")
        return value


class Match(_Strict):
    """Conditions on a call; every field given must hold (any listed value satisfies a field).

    Names (users, groups, clients, models, skills, tools, betas) accept shell-style globs.
    """

    users: list[str] | None = Field(None, description="Subject, username or e-mail.")
    groups: list[str] | None = None
    clients: list[str] | None = None
    models: list[str] | None = None
    skills: list[str] | None = Field(None, description="Claude Skill ids in `container.skills`.")
    tools: list[str] | None = Field(None, description="Tools the request offers the model.")
    betas: list[str] | None = Field(None, description="`anthropic-beta` values.")
    input_tokens: Number | None = Field(None, description="Estimated input tokens (characters / 4).")
    max_tokens: Number | None = None
    content: list[str] | None = Field(None, description="RE2 patterns searched in the prompt text.")
    entities: list[str] | None = Field(None, description="Detector types or categories found in the prompt.")
    time: TimeWindow | None = None
    not_: Match | None = Field(None, alias="not", description="Conditions that must NOT hold.")

    @model_validator(mode="after")
    def _simple_not(self) -> Match:
        inner = self.not_
        if inner is not None and (inner.content or inner.entities or inner.not_):
            raise ValueError("`not` takes identity, model, tool, skill, beta, size and time conditions only")
        return self


Match.model_rebuild()


class MaskSpec(_Strict):
    """What a ``mask`` rule masks, for whom, and in which direction."""

    entities: list[str] = Field(description="Detector types (`EMAIL`) or categories (`secret`, `pii`).")
    scope: Literal["upstream", "record"] = Field(
        "upstream",
        description="`upstream`: the model (or, for responses, the caller) never sees the value; "
        "`record`: only the audit record and logs get the placeholder.",
    )
    direction: list[Direction] = Field(default_factory=lambda: list(_BOTH_DIRECTIONS))


class RateLimitSpec(_Strict):
    """Requests and/or estimated tokens per window, counted per user, group or client."""

    requests: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    window_seconds: int = Field(60, ge=1, le=86400)
    by: Literal["user", "group", "client"] = "user"

    @model_validator(mode="after")
    def _something(self) -> RateLimitSpec:
        if self.requests is None and self.tokens is None:
            raise ValueError("a rate limit needs `requests` or `tokens`")
        return self


class ApprovalSpec(_Strict):
    """Who approves, how many approvals, how long the call waits."""

    groups: list[str] = Field(
        default_factory=lambda: ["approvers"],
        min_length=1,
        description="Groups whose members may decide (the request is routed to them).",
    )
    quorum: int = Field(1, ge=1, description="Approvals by distinct people needed.")
    each_group: bool = Field(
        False, description="Also need one approval from each of `groups` (by distinct people)."
    )
    timeout_seconds: int = Field(900, ge=1, description="How long the call waits before it expires.")
    max_window_seconds: int = Field(
        3600,
        ge=0,
        description="Longest time-window grant an approver may give (0: one-time grants only).",
    )


class Rule(_Strict):
    """One ordered rule: a match and an action."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    match: Match = Field(default_factory=Match)
    action: Action
    reason: str | None = Field(None, description="Shown to the caller on deny; recorded always.")
    mask: MaskSpec | None = None
    rate_limit: RateLimitSpec | None = None
    approval: ApprovalSpec | None = None
    route: str | None = Field(None, description="Upstream connection for `route`.")
    tags: list[str] = Field(default_factory=list)

    def masks(self, direction: str, scope: str) -> bool:
        """Whether this is a mask rule for ``direction`` (``request``/``response``) at ``scope``
        (``upstream``/``record``), whatever it matches."""
        mask = self.mask
        return (
            self.action == "mask" and mask is not None and direction in mask.direction and mask.scope == scope
        )

    @model_validator(mode="after")
    def _settings_for_action(self) -> Rule:
        needs = {"mask": "mask", "rate_limit": "rate_limit", "route": "route"}
        key = needs.get(self.action)
        if key is not None and getattr(self, key) is None:
            raise ValueError(f"action `{self.action}` needs a `{key}` field")
        if self.action == "tag" and not self.tags:
            raise ValueError("action `tag` needs `tags`")
        return self


class ToolRule(_Strict):
    """A command guardrail checked by the forwarder on `tool_use` / `server_tool_use` blocks."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    tools: list[str] = Field(default_factory=list, description="Tool names (globs); empty: every tool.")
    patterns: list[str] = Field(description="RE2 patterns searched in the tool input's text.")
    action: Literal["block_response", "block_tool", "require_approval"] = Field(
        "block_tool",
        description="`block_tool`: replace the block by an explanation; `block_response`: withhold "
        "the whole answer; `require_approval`: block it and ask `approval.groups` — once approved, "
        "the requester may run that command (one-time) or the rule's commands (time window).",
    )
    reason: str = "the tool command matches a guardrail"
    approval: ApprovalSpec | None = Field(None, description="Who approves, for `require_approval`.")


class BundleDoc(_Strict):
    """The YAML document."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    version: str | None = None
    description: str = ""
    default_action: Literal["allow", "deny"] = "allow"
    caller_upstreams: list[str] = Field(default_factory=lambda: ["default"])
    fail_open: bool = Field(
        False,
        description="Let calls through (recorded as fail_open) when evaluation fails. Off: fail closed.",
    )
    detectors: dict[str, str] = Field(default_factory=dict, description="Custom RE2 detectors by type name.")
    rules: list[Rule] = Field(default_factory=list)
    tool_rules: list[ToolRule] = Field(default_factory=list)

    @field_validator("rules", "tool_rules", "detectors", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        return [] if value is None and cls is BundleDoc else value

    @field_validator("version", mode="before")
    @classmethod
    def _quoted(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            # YAML reads 1.10 as the float 1.1: two versions would record alike.
            raise ValueError('must be a quoted string, e.g. "1.10"')
        return value


@dataclass(frozen=True)
class CompiledRule:
    """A rule with its patterns compiled once (never per call)."""

    rule: Rule
    content: tuple[Any, ...] = ()
    entities: frozenset[str] = frozenset()
    mask_types: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CompiledToolRule:
    """A tool rule with its patterns compiled."""

    rule: ToolRule
    patterns: tuple[Any, ...]

    def applies_to(self, tool: str) -> bool:
        """Whether this rule covers tool ``tool``."""
        return not self.rule.tools or any(fnmatch.fnmatchcase(tool, g) for g in self.rule.tools)


@dataclass(frozen=True)
class Bundle:
    """A loaded, validated, compiled policy bundle."""

    name: str
    version: str
    sha256: str
    source: str
    default_action: str
    rules: tuple[CompiledRule, ...] = ()
    caller_upstreams: tuple[str, ...] = ("default",)
    fail_open: bool = False
    tool_rules: tuple[CompiledToolRule, ...] = ()
    detectors: DetectorSet = field(default_factory=DetectorSet)

    @property
    def label(self) -> str:
        """``name@version``: what every decision records as the bundle version."""
        return f"{self.name}@{self.version}"


def _line_of(root: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None
            )
            if found is None:
                break
            node = found
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return node.start_mark.line + 1 if node is not None else None


def _field(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out.replace("not_", "not")


def _compile_re2(pattern: str, where: str) -> Any:
    try:
        return re2.compile(pattern)
    except re2.error as exc:
        raise BundleError(f"{where}: RE2 refuses this pattern ({exc}); only linear-time patterns") from None


def parse_bundle(source: str, origin: str = "<bundle>") -> Bundle:
    """Validate YAML source and return the compiled bundle, or raise :class:`BundleError`."""
    try:
        root = yaml.compose(source)
        doc_raw = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise BundleError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(doc_raw, dict):
        raise BundleError(f"{origin}: a bundle is a mapping with name, version and rules")
    try:
        doc = BundleDoc.model_validate(doc_raw)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "union")))]
        line = _line_of(root, loc)
        where = f"{origin}:{line}" if line else origin
        return_msg = err["msg"].removeprefix("Value error, ")
        raise BundleError(f"{where}: field `{_field(loc) or '(document)'}`: {return_msg}") from None

    def at(path: Sequence[int | str]) -> str:
        line = _line_of(root, path)
        return f"{origin}:{line}: field `{_field(path)}`" if line else f"{origin}: field `{_field(path)}`"

    for name, pattern in doc.detectors.items():
        _compile_re2(pattern, at(["detectors", name]))
    try:
        detectors = DetectorSet(custom=doc.detectors or None)
    except DetectorError as exc:
        raise BundleError(f"{origin}: field `detectors`: {exc}") from None

    def types_of(entities: list[str], path: list[int | str]) -> frozenset[str]:
        cats = [e for e in entities if e.islower()]
        types = [e for e in entities if not e.islower()]
        try:
            chosen: set[str] = set()
            if cats:
                chosen |= detectors.types_for(categories=cats)
            if types:
                chosen |= detectors.types_for(types=types)
        except DetectorError as exc:
            raise BundleError(f"{at(path)}: {exc}") from None
        return frozenset(chosen)

    seen: set[str] = set()
    rules: list[CompiledRule] = []
    for i, rule in enumerate(doc.rules):
        if rule.id in seen:
            raise BundleError(f"{at(['rules', i, 'id'])}: duplicate rule id `{rule.id}`")
        seen.add(rule.id)
        content = tuple(
            _compile_re2(p, at(["rules", i, "match", "content", j]))
            for j, p in enumerate(rule.match.content or [])
        )
        entities = types_of(rule.match.entities or [], ["rules", i, "match", "entities"])
        mask_types = (
            types_of(rule.mask.entities, ["rules", i, "mask", "entities"]) if rule.mask else frozenset()
        )
        if rule.action == "route" and rule.route is not None and not rule.route:
            raise BundleError(f"{at(['rules', i, 'route'])}: empty upstream name")
        rules.append(CompiledRule(rule, content, entities, mask_types))
    tool_rules = []
    for i, trule in enumerate(doc.tool_rules):
        if trule.id in seen:
            raise BundleError(f"{at(['tool_rules', i, 'id'])}: duplicate rule id `{trule.id}`")
        seen.add(trule.id)
        compiled = tuple(
            _compile_re2(p, at(["tool_rules", i, "patterns", j])) for j, p in enumerate(trule.patterns)
        )
        tool_rules.append(CompiledToolRule(trule, compiled))
    sha = hashlib.sha256(source.encode()).hexdigest()
    return Bundle(
        name=doc.name,
        version=doc.version or sha[:12],
        sha256=sha,
        source=source,
        default_action=doc.default_action,
        rules=tuple(rules),
        caller_upstreams=tuple(doc.caller_upstreams),
        fail_open=doc.fail_open,
        tool_rules=tuple(tool_rules),
        detectors=detectors,
    )


def load_bundle(path: Path) -> Bundle:
    """Load and validate a bundle file."""
    try:
        source = path.read_text()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_bundle(source, str(path))
