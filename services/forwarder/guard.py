"""The response guard: what the forwarder does to an upstream answer before anyone sees it.

Two checks, both from the policy bundle the forwarder loaded (``SKILLGATE_POLICY_BUNDLE``):

* **Tool command guardrails.** Every ``tool_use`` / ``server_tool_use`` (and ``mcp_tool_use``)
  block of a successful Messages response is checked against the bundle's ``tool_rules`` that
  apply to the block's ``name``: each rule's RE2 patterns are searched in the input as JSON text
  and in each of its string leaves (the JSON text sees keys and structure, the leaves see the
  command as the tool would get it, with real newlines and quotes). A ``block_tool`` match
  replaces the block with a text block ``[skillgate blocked tool call <name>: <reason> (rule
  <id>)]`` (and drops result blocks of that call, which would be orphans), and turns
  ``stop_reason: tool_use`` into ``end_turn`` when no ``tool_use`` is left for the caller to run.
  A ``block_response`` match refuses the whole answer: the caller gets a 403
  ``permission_error`` naming the rule and reason.
* **Response masking.** The detector types policy chose for the call
  (``CallDecided.response_mask_upstream`` / ``response_mask_record``) are masked with
  :meth:`~skillgate.policy.masking.MaskingSession.mask_response_layers`: the caller (and
  ``calls.replies`` on Kafka) gets the upstream layer, the record (``calls.completed``) gets
  both layers.

The record shows what was blocked: a replaced block's explanation carries, in the record only,
``skillgate_blocked`` with the rule, the reason and the original blocks (masked for the record);
a refused answer is recorded as the error the caller got plus ``skillgate_blocked_response``,
the answer as the upstream sent it (masked for the record).

Bodies are re-serialised only when something changed: otherwise the upstream's bytes go through
untouched. Error answers and bodies that are not a Messages response are not guarded, but their
text is masked best-effort (every string leaf of a JSON body, else the whole text). Anything
that goes wrong here raises, and the forwarder fails the call closed: an answer that could not
be checked is never passed on.

Pure functions: no I/O, no Kafka; unit-tested in ``tests/unit/test_response_guard.py``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from services.forwarder.approvals import ToolApprovals
from skillgate.errors import new_request_id
from skillgate.events import BlockedTool, MaskedValue
from skillgate.policy.bundle import Bundle, CompiledToolRule
from skillgate.policy.masking import Masker

__all__ = [
    "GuardError",
    "GuardedResponse",
    "ResponsePolicy",
    "ToolMatch",
    "blocked_text",
    "find_blocked_tools",
    "guard_response",
    "request_approvals",
]

#: Content blocks whose ``input`` a tool would run with.
TOOL_BLOCKS: Final = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
_MAX_DEPTH: Final = 200  # below orjson's 255 levels, so what passes can be serialised again
_CONTENT_INDEX: Final = re.compile(r"^content\[(\d+)\]")


class GuardError(ValueError):
    """An answer the guard cannot check safely; the message never contains body content."""


@dataclass(frozen=True, slots=True)
class ResponsePolicy:
    """What the guard applies: a loaded bundle and the masker built once for it."""

    bundle: Bundle
    masker: Masker

    @classmethod
    def build(cls, bundle: Bundle, fingerprint_key: bytes) -> ResponsePolicy:
        """Compile the masker for ``bundle`` (once per bundle, never per call)."""
        return cls(bundle, Masker(bundle.detectors, fingerprint_key))

    @property
    def label(self) -> str:
        """``name@version`` of the bundle."""
        return self.bundle.label

    def active(self, mask_upstream: Collection[str], mask_record: Collection[str]) -> bool:
        """Whether a response would be checked at all (tool rules, or types to mask)."""
        return bool(self.bundle.tool_rules or mask_upstream or mask_record)

    def likely_stream_types(self) -> list[frozenset[str]]:
        """The sets of types a streamed answer is most likely masked with under this bundle:
        each rule's that masks responses upstream, and all of theirs together (a call every such
        rule matched). A call matching another combination compiles its own set when it starts."""
        own = [r.mask_types for r in self.bundle.rules if r.rule.masks("response", "upstream")]
        union = frozenset().union(*own)
        return list(dict.fromkeys([*own, union] if union else own))


@dataclass(frozen=True, slots=True)
class ToolMatch:
    """A tool block that a tool rule stopped: where it is, what it is, and which rule."""

    index: int
    tool_use_id: str
    tool: str
    rule: CompiledToolRule
    approval_id: str = ""  # for ``require_approval``: the approval asked for
    note: str = ""  # for ``require_approval``: the explanation (names the approval)

    @property
    def action(self) -> str:
        """``block_tool``, ``block_response`` or ``require_approval``."""
        return self.rule.rule.action

    @property
    def explanation(self) -> str:
        """What replaces the blocked block for the caller and the model."""
        return self.note or blocked_text(self.tool, self.rule)

    def record(self) -> BlockedTool:
        """The ``BlockedTool`` entry of ``CallCompleted.blocked_tools``."""
        return BlockedTool(
            tool_use_id=self.tool_use_id,
            tool=self.tool,
            rule_id=self.rule.rule.id,
            reason=self.rule.rule.reason,
            action=self.action,
        )


@dataclass(frozen=True, slots=True)
class GuardedResponse:
    """An upstream answer after the guard: what the caller gets and what the record keeps.

    ``status`` / ``headers`` / ``caller_body`` go to the caller (``calls.replies``);
    ``record_body`` to ``calls.completed``. ``caller_body`` is the upstream's bytes object itself
    when nothing changed for the caller (likewise ``record_body`` for the record). ``usage_doc``
    is the parsed answer that model, stop reason and token counts are read from (``None``: parse
    ``record_body``). ``refused`` is true when a ``block_response`` rule refused the answer.
    """

    status: int
    headers: dict[str, str]
    caller_body: bytes
    record_body: bytes
    masked: list[MaskedValue] = field(default_factory=list)
    blocked: list[BlockedTool] = field(default_factory=list)
    refused: bool = False
    usage_doc: Any = None

    @classmethod
    def passthrough(
        cls, status: int, headers: Mapping[str, str], caller_body: bytes, record_body: bytes
    ) -> GuardedResponse:
        """An answer relayed as it came (nothing to check, or nothing found)."""
        return cls(status, dict(headers), caller_body, record_body)


def blocked_text(tool: str, rule: CompiledToolRule) -> str:
    """The explanation that replaces a blocked tool block (what the caller and model read)."""
    return f"[skillgate blocked tool call {tool}: {rule.rule.reason} (rule {rule.rule.id})]"


def refusal_message(matches: list[ToolMatch]) -> str:
    """The 403 message of a refused answer: every blocking tool call, its rule and reason."""
    parts = [
        f"tool call {m.tool}: {m.rule.rule.reason} (rule {m.rule.rule.id})"
        for m in matches
        if m.action == "block_response"
    ]
    return "skillgate refused the model's answer: " + "; ".join(parts)


# -- tool guardrails ----------------------------------------------------------------------------


def _texts(value: Any) -> list[str]:
    """The input as JSON text, then every string leaf (iterative: no recursion on deep input).

    Raises :class:`GuardError` for input nested deeper than the limit (checked before the
    JSON text is built, so the error is this clear one).
    """
    leaves: list[str] = []
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            leaves.append(item)
        elif isinstance(item, dict | list):
            if depth >= _MAX_DEPTH:
                raise GuardError(f"tool input nested deeper than {_MAX_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return [orjson.dumps(value).decode(), *leaves]


def _matches(rule: CompiledToolRule, texts: list[str]) -> bool:
    return any(pattern.search(text) is not None for pattern in rule.patterns for text in texts)


def find_blocked_tools(
    tool_rules: Collection[CompiledToolRule], content: list[Any], approvals: ToolApprovals | None = None
) -> list[ToolMatch]:
    """The tool blocks of ``content`` that a rule stops, in content order.

    Per block, the strongest action wins (``block_response``, then ``block_tool``, then
    ``require_approval``), then bundle order. Blocks without a string ``name`` are checked
    against the rules that apply to every tool. With ``approvals``, a block that only
    ``require_approval`` rules hit, each covered by a grant of the caller, passes (and is noted
    as allowed by those grants); without, ``require_approval`` blocks like ``block_tool``.
    """
    if not tool_rules:
        return []
    found: list[ToolMatch] = []
    for index, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") not in TOOL_BLOCKS:
            continue
        name = block.get("name")
        tool = name if isinstance(name, str) else ""
        rules = [r for r in tool_rules if r.applies_to(tool)]
        if not rules:
            continue
        texts = _texts(block.get("input"))
        hits = [r for r in rules if _matches(r, texts)]
        raw_id = block.get("id")
        block_id = raw_id if isinstance(raw_id, str) else ""
        if approvals is not None and hits and all(r.rule.action == "require_approval" for r in hits):
            # Grants only matter when nothing stronger stops the block: a blocked call must
            # never be recorded as allowed by a grant.
            grants = [approvals.grant_for(r, block.get("input")) for r in hits]
            if all(grant is not None for grant in grants):
                for rule, grant in zip(hits, grants, strict=True):
                    if grant is not None:
                        approvals.allow(rule, tool, block_id, grant)
                continue
            hits = [r for r, grant in zip(hits, grants, strict=True) if grant is None]
        if not hits:
            continue
        strongest = min(hits, key=lambda r: _STRENGTH.get(r.rule.action, 1))
        if strongest.rule.action == "require_approval" and approvals is not None:
            approval_id = approvals.approval_id(block_id)
            note = approvals.explanation(tool, strongest, approval_id)
            found.append(ToolMatch(index, block_id, tool, strongest, approval_id, note))
        else:
            found.append(ToolMatch(index, block_id, tool, strongest))
    return found


#: Which of several rules matching one block acts (lowest first).
_STRENGTH: Final = {"block_response": 0, "block_tool": 1, "require_approval": 2}


def request_approvals(
    approvals: ToolApprovals | None, matches: list[ToolMatch], content: list[Any], shown: list[Any]
) -> None:
    """Ask for approval of each held tool call; ``shown`` is the content as recorded (masked for
    the record), which is what approvers see."""
    if approvals is None:
        return
    for m in matches:
        if m.action == "require_approval" and m.approval_id:
            block = content[m.index]
            shown_block = shown[m.index] if m.index < len(shown) else {}
            approvals.request(
                m.rule,
                m.tool,
                m.tool_use_id,
                block.get("input") if isinstance(block, dict) else None,
                shown_block.get("input") if isinstance(shown_block, dict) else None,
            )


def _apply_blocks(
    doc: Mapping[str, Any], matches: list[ToolMatch], *, for_record: bool
) -> tuple[dict[str, Any], dict[int, str]]:
    """``doc`` with every blocked tool block replaced by its explanation.

    Result blocks of a blocked call (same ``tool_use_id``) are dropped from the content. For the
    record, the explanation carries ``skillgate_blocked`` with the rule and the original blocks.
    Also returns where each original block went (``content[i]`` → its new JSON path).
    """
    content: list[Any] = doc["content"]
    by_index = {m.index: m for m in matches}
    by_id = {m.tool_use_id: m for m in matches if m.tool_use_id}
    results: dict[int, list[int]] = {}  # blocked block index -> indices of its result blocks
    dropped: set[int] = set()
    for i, block in enumerate(content):
        if i in by_index or not isinstance(block, dict):
            continue
        ref = block.get("tool_use_id")
        owner = by_id.get(ref) if isinstance(ref, str) else None
        if owner is not None and block.get("type") not in TOOL_BLOCKS:
            results.setdefault(owner.index, []).append(i)
            dropped.add(i)
    new_content: list[Any] = []
    moved: dict[int, str] = {}
    for i, block in enumerate(content):
        if i in dropped:
            continue
        position = f"content[{len(new_content)}]"
        match = by_index.get(i)
        if match is None:
            moved[i] = position
            new_content.append(block)
            continue
        explanation: dict[str, Any] = {"type": "text", "text": match.explanation}
        if for_record:
            originals = [block] + [content[j] for j in results.get(i, [])]
            explanation["skillgate_blocked"] = {
                "rule_id": match.rule.rule.id,
                "reason": match.rule.rule.reason,
                "action": match.action,
                "approval_id": match.approval_id or None,
                "blocks": originals,
            }
            moved[i] = f"{position}.skillgate_blocked.blocks[0]"
            for k, j in enumerate(results.get(i, []), start=1):
                moved[j] = f"{position}.skillgate_blocked.blocks[{k}]"
        new_content.append(explanation)
    out = dict(doc)
    out["content"] = new_content
    if out.get("stop_reason") == "tool_use" and not any(
        isinstance(b, dict) and b.get("type") == "tool_use" for b in new_content
    ):
        out["stop_reason"] = "end_turn"  # nothing left for the caller to run
    return out, moved


def _relocate(masked: list[MaskedValue], moved: dict[int, str]) -> list[MaskedValue]:
    """Masked values with their locations pointing where their block is in the record."""
    out: list[MaskedValue] = []
    for value in masked:
        m = _CONTENT_INDEX.match(value["location"])
        target = moved.get(int(m.group(1))) if m else None
        if m is not None and target is not None:
            value = value.copy()
            value["location"] = target + value["location"][m.end() :]
        out.append(value)
    return out


# -- masking bodies that are not Messages responses ---------------------------------------------


def _other_body(
    policy: ResponsePolicy,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    doc: Any,
    is_json: bool,
    upstream: Collection[str],
    record: Collection[str],
    seed: Collection[MaskedValue] = (),
) -> GuardedResponse:
    """An error answer, or a body that is not a Messages response: masked, never reshaped."""
    if not (upstream or record):
        return GuardedResponse(status, dict(headers), body, body, usage_doc=doc if is_json else None)
    session = policy.masker.session(seed)
    if is_json:
        up_doc, rec_doc, masked = session.mask_json_layers(doc, upstream=upstream, record=record)
    else:
        text = body.decode("utf-8", errors="replace")
        up_doc, rec_doc, masked = session.mask_json_layers(
            text, upstream=upstream, record=record, path="body"
        )

    def dump(value: Any) -> bytes:
        return orjson.dumps(value) if is_json else str(value).encode("utf-8")

    caller_changed = any(m["scope"] == "upstream" for m in masked)
    caller_body = dump(up_doc) if caller_changed else body
    if not masked:
        record_body = body
    elif any(m["scope"] == "record" for m in masked) or not caller_changed:
        record_body = dump(rec_doc)
    else:
        record_body = caller_body
    return GuardedResponse(
        status, dict(headers), caller_body, record_body, masked=masked, usage_doc=rec_doc if is_json else None
    )


# -- the guard ----------------------------------------------------------------------------------


def _parse(headers: Mapping[str, str], body: bytes) -> tuple[Any, bool]:
    """The body as JSON when it is JSON (one parse per answer), else ``(None, False)``."""
    ctype = headers.get("content-type", "")
    if "json" not in ctype and body.lstrip()[:1] not in (b"{", b"["):
        return None, False
    try:
        return orjson.loads(body), True
    except orjson.JSONDecodeError:
        return None, False


def guard_response(
    policy: ResponsePolicy,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    mask_upstream: Collection[str],
    mask_record: Collection[str],
    seed: Collection[MaskedValue] = (),
    approvals: ToolApprovals | None = None,
) -> GuardedResponse:
    """Check and mask one upstream answer (see the module docstring).

    ``mask_upstream`` / ``mask_record`` are the detector types policy chose for this call;
    ``seed`` the values the request had masked (the decision's ``masked``), so an echoed value
    keeps the request's placeholder; ``approvals`` the call's tool-approval context (held tool
    calls are collected in it). Raises
    (``GuardError``, ``MaskingError``, ``DetectorError`` for a type this bundle does not know,
    ...) when the answer cannot be checked; the caller must then fail the call closed.
    """
    if status == 0 or not body:
        return GuardedResponse.passthrough(status, headers, body, body)
    doc, is_json = _parse(headers, body)
    is_message = (
        200 <= status < 300 and is_json and isinstance(doc, dict) and isinstance(doc.get("content"), list)
    )
    if not is_message:
        return _other_body(policy, status, headers, body, doc, is_json, mask_upstream, mask_record, seed)
    assert isinstance(doc, dict)
    matches = find_blocked_tools(policy.bundle.tool_rules, doc["content"], approvals)
    if mask_upstream or mask_record:
        session = policy.masker.session(seed)
        layers = session.mask_response_layers(doc, upstream=mask_upstream, record=mask_record)
        up_doc, rec_doc, masked = layers.upstream, layers.record, layers.masked
    else:
        up_doc, rec_doc, masked = doc, doc, []
    blocked = [m.record() for m in matches] + (approvals.granted if approvals is not None else [])

    if any(m.action == "block_response" for m in matches):
        request_id = headers.get("request-id") or new_request_id()
        error = {
            "type": "error",
            "error": {"type": "permission_error", "message": refusal_message(matches)},
            "request_id": request_id,
        }
        record = {**error, "skillgate_blocked_response": rec_doc}
        moved = {i: f"skillgate_blocked_response.content[{i}]" for i in range(len(doc["content"]))}
        return GuardedResponse(
            403,
            {**headers, "content-type": "application/json"},
            orjson.dumps(error),
            orjson.dumps(record),
            masked=_relocate(masked, moved),
            blocked=blocked,
            refused=True,
            usage_doc=rec_doc,
        )

    if matches:
        request_approvals(approvals, matches, doc["content"], rec_doc["content"])
        caller_doc, _ = _apply_blocks(up_doc, matches, for_record=False)
        record_doc, moved = _apply_blocks(rec_doc, matches, for_record=True)
        return GuardedResponse(
            status,
            dict(headers),
            orjson.dumps(caller_doc),
            orjson.dumps(record_doc),
            masked=_relocate(masked, moved),
            blocked=blocked,
            usage_doc=caller_doc,
        )

    caller_changed = any(m["scope"] == "upstream" for m in masked)
    caller_body = orjson.dumps(up_doc) if caller_changed else body
    if not masked:
        record_body = body
    elif any(m["scope"] == "record" for m in masked) or not caller_changed:
        record_body = orjson.dumps(rec_doc)
    else:
        record_body = caller_body  # only upstream-layer values: both audiences see the same
    return GuardedResponse(
        status, dict(headers), caller_body, record_body, masked=masked, blocked=blocked, usage_doc=doc
    )
