"""Synthetic recorded calls for the audit-store benchmark and tests.

Each call is the three events the pipeline records for a forwarded call (calls.submitted,
calls.decided, calls.completed) as decoded :class:`SourceRecord` values, with the fields the
recorder reads, realistic Messages API bodies (1-2 KB of prose), tools, skills and multi-turn
conversations, so ingest, keyword search and session timelines do the work they do in production.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.recorder.handlers import SourceRecord

USERS = [f"user-{i:03d}" for i in range(200)]
GROUPS = ["eng", "ml", "sales", "support", "finance", "legal", "ops", "research"]
MODELS = ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"]
SKILLS = ["pdf", "xlsx", "docx", "pptx", "internal-wiki", "sql-helper"]
TOOLS = ["get_weather", "search_docs", "run_query", "bash", "str_replace_editor", "fetch_url"]
_VOCABULARY = (
    "the deploy pipeline failed again because kubernetes could not pull the image from registry "
    "please summarise quarterly revenue numbers for europe and compare against forecast while "
    "noting churn drivers customer feedback mentions latency invoices onboarding dashboards "
    "refactor module tests coverage database migration rollback incident postmortem timeline "
    "alert threshold memory leak garbage collector profiling flamegraph python rust golang java"
)
WORDS = _VOCABULARY.split()


def uuid7(ms: int, rng: random.Random) -> str:
    """A UUIDv7 with the given millisecond timestamp (ids are time-ordered like the ingress's)."""
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rng.getrandbits(12) << 64 | 0b10 << 62
    return str(uuid.UUID(int=value | rng.getrandbits(62)))


def prose(rng: random.Random, words: int) -> str:
    """Random sentences from a small vocabulary (plus a rare unique token to search for)."""
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"{text} ticket{rng.randrange(1_000_000)}"


@dataclass
class CallSpec:
    """One synthetic call: who, when, what was said."""

    call_id: str
    session_id: str
    subject: str
    groups: list[str]
    model: str
    time_us: int
    messages: list[dict[str, Any]]
    answer: str
    tools: list[str] = field(default_factory=list)
    skills: list[str] = field(default_factory=list)
    decision: str = "allow"


def _identity(spec: CallSpec) -> dict[str, Any]:
    return {
        "subject": spec.subject,
        "issuer": "https://idp.example.com",
        "username": spec.subject.replace("user-", "u"),
        "email": f"{spec.subject}@example.com",
        "groups": spec.groups,
        "client_id": "cli",
        "token_id": None,
    }


def request_body(spec: CallSpec) -> bytes:
    """The Messages API request of a call."""
    doc: dict[str, Any] = {"model": spec.model, "max_tokens": 1024, "messages": spec.messages}
    if spec.tools:
        doc["tools"] = [{"name": t, "input_schema": {"type": "object"}} for t in spec.tools]
    if spec.skills:
        doc["container"] = {
            "skills": [{"type": "anthropic", "skill_id": s, "version": "latest"} for s in spec.skills]
        }
    return orjson.dumps(doc)


def records(
    spec: CallSpec, partition: int = 0, offset: int = 0, topic_prefix: str = "bench"
) -> list[SourceRecord]:
    """The submitted, decided and completed events of ``spec`` as the recorder decodes them."""
    ident = _identity(spec)
    body = request_body(spec)
    env = {"call_id": spec.call_id, "session_id": spec.session_id, "identity": ident}
    t = spec.time_us
    submitted = {
        **env, "event_id": f"{spec.call_id}:s", "time": t, "bundle_version": None, "mode": "sync",
        "stream": False, "method": "POST", "path": "/v1/messages", "query": "", "headers": {},
        "body": body, "model": spec.model, "upstream": None, "client_ip": "10.0.0.1",
        "user_agent": "bench/1", "approval_id": None, "ingress_instance": "i-1", "reply_to": None,
    }  # fmt: skip
    refused = spec.decision != "allow"
    decided = {
        **env, "event_id": f"{spec.call_id}:d", "time": t + 2_000, "bundle_version": "default@1",
        "decision": spec.decision, "reason": "denied by rule" if refused else "allowed",
        "rule_ids": ["no-secrets"] if refused else [], "tags": [], "upstream": "default",
        "status": 403 if refused else 0, "error_type": "permission_error" if refused else None,
        "mode": "sync", "stream": False, "method": "POST", "path": "/v1/messages", "query": "",
        "headers": {}, "model": spec.model, "body": body, "record_body": None, "masked": [],
        "fail_open": False, "submitted_at": t, "approval_id": None,
        "response_mask_upstream": [], "response_mask_record": [],
    }  # fmt: skip
    out = [
        SourceRecord(f"{topic_prefix}.calls.submitted", partition, offset, "CallSubmitted", submitted),
        SourceRecord(f"{topic_prefix}.calls.decided", partition, offset, "CallDecided", decided),
    ]
    if not refused:
        content: list[dict[str, Any]] = [{"type": "text", "text": spec.answer}]
        if spec.tools:
            content.append({"type": "tool_use", "id": "toolu_1", "name": spec.tools[0], "input": {}})
        response = orjson.dumps(
            {"id": "msg_1", "type": "message", "role": "assistant", "model": spec.model, "content": content,
             "stop_reason": "end_turn", "usage": {"input_tokens": len(body) // 4, "output_tokens": 40}}
        )  # fmt: skip
        completed = {
            **env, "event_id": f"{spec.call_id}:c", "time": t + 900_000, "bundle_version": "default@1",
            "upstream": "default", "status": 200, "headers": {}, "body": response, "attempts": [],
            "latency_ms": 890.0, "request_id": "req_1", "model": spec.model, "stop_reason": "end_turn",
            "input_tokens": len(body) // 4, "output_tokens": 40, "masked": [], "stream": False,
            "submitted_at": t, "blocked_tools": [],
        }  # fmt: skip
        out.append(
            SourceRecord(f"{topic_prefix}.calls.completed", partition, offset, "CallCompleted", completed)
        )
    return out


def conversations(
    seed: int, start_us: int, calls: int, turns: int = 4, spacing_us: int = 1000
) -> Iterator[CallSpec]:
    """``calls`` calls grouped in conversations of up to ``turns`` turns, each turn resending the
    whole conversation (no session header: sessions are found by conversation)."""
    rng = random.Random(seed)
    made = 0
    t = start_us
    while made < calls:
        subject = rng.choice(USERS)
        groups = rng.sample(GROUPS, 2)
        model = rng.choice(MODELS)
        tools = rng.sample(TOOLS, rng.choice((0, 0, 1, 2)))
        skills = rng.sample(SKILLS, rng.choice((0, 0, 0, 1)))
        messages: list[dict[str, Any]] = []
        first_id = ""
        for _turn in range(min(turns, calls - made)):
            messages = [*messages, {"role": "user", "content": prose(rng, 120)}]
            t += spacing_us
            call_id = uuid7(t // 1000, rng)
            first_id = first_id or call_id
            spec = CallSpec(call_id, call_id, subject, groups, model, t, messages, prose(rng, 60), tools, skills,
                            "deny" if rng.random() < 0.03 else "allow")  # fmt: skip
            yield spec
            made += 1
            if spec.decision != "allow":
                break
            messages = [*messages, {"role": "assistant", "content": spec.answer}]
