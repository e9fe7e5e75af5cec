"""The audit store through the running pipeline (issue 6): calls sent to the ingress are found by
keyword search with cursor pagination, grouped into a session by conversation, replayed as a
timeline and transcript, rerun through the gateway with a diff, exported, verified against the
signed hash chain, and the record lag is exported as a metric. Auditors only."""

from __future__ import annotations

import io
import uuid
from typing import Any
from urllib.parse import urlparse

import httpx
import orjson
import pytest

from services.cli import audit as audit_cli
from services.cli.stack import Stack
from tests.conftest import wait_for
from tests.integration.helpers import metric

pytestmark = pytest.mark.integration


def _send(stack: Stack, token: str, messages: list[dict[str, Any]]) -> httpx.Response:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": messages}
    headers = {"authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"}
    resp = httpx.post(f"{stack.ingress_url}/v1/messages", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp


def _search(stack: Stack, token: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{stack.recorder_url}/v1/audit/calls",
        params=params,
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )


@pytest.fixture(scope="module")
def conversation(stack: Stack, alice_token: str, auditor_token: str) -> dict[str, Any]:
    """A two-turn conversation sent without a session header, once both calls are searchable."""
    marker = f"audit{uuid.uuid4().hex[:12]}"
    first_messages = [{"role": "user", "content": f"{marker} how do I rotate the deploy key?"}]
    first = _send(stack, alice_token, first_messages)
    answer = first.json()["content"]
    second_messages = [
        *first_messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"{marker} and for staging?"},
    ]
    second = _send(stack, alice_token, second_messages)
    ids = [first.headers["x-skillgate-call-id"], second.headers["x-skillgate-call-id"]]

    def both_recorded() -> list[dict[str, Any]] | None:
        r = _search(stack, auditor_token, q=marker)
        assert r.status_code == 200, r.text
        rows: list[dict[str, Any]] = r.json()["data"]
        done = len(rows) == 2 and all(row["state"] == "completed" for row in rows)
        return rows if done else None

    rows = wait_for(both_recorded, timeout=30)
    assert isinstance(rows, list)
    return {"marker": marker, "ids": ids, "rows": rows}


def test_keyword_search_finds_both_turns_newest_first(conversation: dict[str, Any]) -> None:
    rows = conversation["rows"]
    first, second = conversation["ids"]
    assert [r["call_id"] for r in rows] == [second, first]
    assert all(r["subject"] and r["username"] == "alice" for r in rows)
    assert conversation["marker"] in rows[1]["request_excerpt"]


def test_second_turn_joins_the_first_turns_session(conversation: dict[str, Any]) -> None:
    first, second = conversation["ids"]
    by_id = {r["call_id"]: r for r in conversation["rows"]}
    assert by_id[first]["session_id"] == first and by_id[first]["session_source"] == "call"
    assert by_id[second]["session_id"] == first and by_id[second]["session_source"] == "conversation"


def test_cursor_pagination_through_the_api(
    stack: Stack, auditor_token: str, conversation: dict[str, Any]
) -> None:
    page1 = _search(stack, auditor_token, q=conversation["marker"], limit=1).json()
    assert len(page1["data"]) == 1 and page1["next_cursor"]
    page2 = _search(
        stack, auditor_token, q=conversation["marker"], limit=1, cursor=page1["next_cursor"]
    ).json()
    assert [r["call_id"] for r in page1["data"] + page2["data"]] == conversation["ids"][::-1]
    assert page2["next_cursor"] is None
    bad = _search(stack, auditor_token, cursor="not-a-cursor")
    assert bad.status_code == 400 and bad.json()["type"] == "error"


def test_only_auditors_may_search_replay_export_or_verify(
    stack: Stack, alice_token: str, conversation: dict[str, Any]
) -> None:
    headers = {"authorization": f"Bearer {alice_token}"}
    first = conversation["ids"][0]
    for method, path in (
        ("GET", "/v1/audit/calls"),
        ("GET", f"/v1/audit/calls/{first}"),
        ("GET", f"/v1/audit/sessions/{first}"),
        ("POST", "/v1/audit/export"),
        ("POST", "/v1/audit/verify"),
    ):
        r = httpx.request(method, stack.recorder_url + path, headers=headers, json={}, timeout=30)
        assert r.status_code == 403, (path, r.text)
    assert httpx.get(stack.recorder_url + "/v1/audit/calls", timeout=30).status_code == 401


def test_session_timeline_and_transcript(
    stack: Stack, auditor_token: str, conversation: dict[str, Any]
) -> None:
    first, second = conversation["ids"]
    r = httpx.get(
        f"{stack.recorder_url}/v1/audit/sessions/{first}",
        headers={"authorization": f"Bearer {auditor_token}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [c["call_id"] for c in doc["calls"]] == [first, second]
    kinds = [(e["kind"], e["call_id"]) for e in doc["timeline"]]
    for call_id in (first, second):
        mine = [k for k, c in kinds if c == call_id]
        assert mine[0] == "request" and "decision" in mine and mine[-1] == "response", mine
    assert kinds.index(("response", first)) < kinds.index(("request", second))
    out = io.StringIO()
    assert audit_cli.replay_command(first, "text", stack.recorder_url, auditor_token, out) == 0
    text = out.getvalue()
    assert f"session {first} · 2 call(s)" in text
    assert f"> {conversation['marker']} and for staging?" in text
    missing = httpx.get(
        f"{stack.recorder_url}/v1/audit/sessions/no-such-{uuid.uuid4().hex}",
        headers={"authorization": f"Bearer {auditor_token}"},
        timeout=30,
    )
    assert missing.status_code == 404


def test_search_cli_prints_the_calls(stack: Stack, auditor_token: str, conversation: dict[str, Any]) -> None:
    out = io.StringIO()
    code = audit_cli.search_command(
        {"q": conversation["marker"]}, 50, 1, "json", stack.recorder_url, auditor_token, out
    )
    assert code == 0
    printed = [orjson.loads(line)["call_id"] for line in out.getvalue().splitlines()]
    assert printed == conversation["ids"][::-1]


def test_export_jsonl_and_parquet(stack: Stack, auditor_token: str, conversation: dict[str, Any]) -> None:
    headers = {"authorization": f"Bearer {auditor_token}"}
    r = httpx.post(
        f"{stack.recorder_url}/v1/audit/export",
        json={"format": "jsonl", "q": conversation["marker"]},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    docs = [orjson.loads(line) for line in r.content.splitlines()]
    assert [d["call_id"] for d in docs] == conversation["ids"]
    assert conversation["marker"] in docs[0]["request_body"] and docs[0]["response_body"]
    p = httpx.post(
        f"{stack.recorder_url}/v1/audit/export",
        json={"format": "parquet", "q": conversation["marker"]},
        headers=headers,
        timeout=60,
    )
    assert p.status_code == 200 and p.content[:4] == b"PAR1" and p.content[-4:] == b"PAR1"


def test_rerun_sends_the_recorded_request_again(
    stack: Stack, alice_token: str, auditor_token: str, conversation: dict[str, Any]
) -> None:
    first = conversation["ids"][0]
    out = io.StringIO()
    code = audit_cli.rerun_command(
        first, stack.recorder_url, auditor_token, stack.ingress_url, alice_token, out
    )
    assert code == 0, out.getvalue()
    head = out.getvalue().splitlines()[0]
    assert head.startswith(f"rerun of {first} → new call ") and head.endswith("HTTP 200")
    new_call = head.split("new call ")[1].split(":")[0]
    assert new_call != first

    def rerun_recorded() -> bool:
        rows = _search(stack, auditor_token, session=f"rerun-{first}").json()["data"]
        return [r["call_id"] for r in rows] == [new_call]

    wait_for(rerun_recorded, timeout=30)


def test_verify_finds_the_pipeline_records_intact(
    stack: Stack, auditor_token: str, conversation: dict[str, Any]
) -> None:
    out = io.StringIO()
    code = audit_cli.verify_command("json", stack.recorder_url, auditor_token, out)
    doc = orjson.loads(out.getvalue())
    assert code == 0 and doc["ok"], doc
    assert doc["checkpoints"] > 0 and doc["rows_sealed"] > 0
    assert doc["rows_checked"] >= doc["rows_sealed"]


def test_record_lag_is_exported(stack: Stack, conversation: dict[str, Any]) -> None:
    port = urlparse(stack.recorder_url).port
    assert port is not None
    assert metric(port, "skillgate_recorder_record_lag_seconds_count") >= 6  # 3+ events per call
    assert metric(port, "skillgate_recorder_record_lag_seconds_sum") > 0
