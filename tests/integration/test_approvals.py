"""Just-in-time approval over the running pipeline (real Kafka, chDB, HTTP; the stub upstream).

Identities come from the stack's dev issuer: alice (eng) asks, bob and carol (approvers) and sam
(security) decide, dave (eng + approvers) asks and may not approve himself. Every test counts the
upstream calls at the stub: an approved call reaches it exactly once, a refused one never.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.cli.stack import Stack
from skillgate import topics
from tests.conftest import wait_for
from tests.integration.conftest import _session_stack
from tests.integration.helpers import recorded_call, redeliver_decision, sql, stub_requests
from tests.servers import serve_asgi

pytestmark = pytest.mark.integration

BUNDLE = Path(__file__).with_name("bundles") / "approvals.yaml"
WEBHOOK_SECRET = "whsec-" + uuid.uuid4().hex
#: How long the ingress holds a sync caller for a decision in this stack (production: 60 s).
APPROVAL_WAIT_S = 8


class WebhookReceiver:
    """Records announcements; the first delivery of each approval fails (500) to test retries."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        doc = orjson.loads(body)
        approval_id = doc["skillgate"]["approval_id"]
        with self._lock:
            self.received.append({"headers": dict(request.headers), "body": body, "doc": doc})
            first = approval_id not in self._seen
            self._seen.add(approval_id)
        return Response(status_code=500 if first else 200)

    def for_approval(self, approval_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.received if r["doc"]["skillgate"]["approval_id"] == approval_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[WebhookReceiver, str]]:
    hooks = WebhookReceiver()

    async def health(_: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/hook", hooks.hook, methods=["POST"]), Route("/health", health)])
    with serve_asgi(app, health_path="/health", name="webhook-receiver") as url:
        yield hooks, url


@pytest.fixture(scope="module")
def astack(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory, receiver: tuple[WebhookReceiver, str]
) -> Iterator[Stack]:
    _, url = receiver
    yield from _session_stack(
        tmp_path_factory,
        kafka_bootstrap,
        "a",
        {
            "SKILLGATE_POLICY_BUNDLE": str(BUNDLE),
            "SKILLGATE_ROLES_APPROVER_GROUPS": json.dumps(["approvers", "security"]),
            "SKILLGATE_INGRESS_APPROVAL_WAIT_SECONDS": str(APPROVAL_WAIT_S),
            "SKILLGATE_POLICY_APPROVAL_WEBHOOKS": json.dumps({"approvers": f"{url}/hook"}),
            "SKILLGATE_POLICY_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "SKILLGATE_POLICY_WEBHOOK_BACKOFF_SECONDS": "0.1",
            "SKILLGATE_POLICY_APPROVALS_URL": "https://gate.example.com",
        },
    )


class People:
    """Tokens of the test's identities."""

    def __init__(self, stack: Stack) -> None:
        self.alice = stack.token("alice", ["eng"])
        self.bob = stack.token("bob", ["approvers"])
        self.carol = stack.token("carol", ["approvers"])
        self.sam = stack.token("sam", ["security"])
        self.dave = stack.token("dave", ["eng", "approvers"])
        self.audrey = stack.token("audrey", ["auditors"])
        self.erin = stack.token("erin", ["eng"])  # asks to run tool commands
        self.gina = stack.token("gina", ["eng"])  # holds a time-window grant: no other test asks as her


@pytest.fixture(scope="module")
def people(astack: Stack) -> People:
    return People(astack)


def _body(marker: str, word: str = "HOLD-ONE") -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": f"{word} please review {marker}"}],
    }


def _headers(token: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "anthropic-version": "2023-06-01", **extra}


def _submit_async(stack: Stack, token: str, body: dict[str, Any]) -> str:
    resp = httpx.post(f"{stack.ingress_url}/v1/calls", json=body, headers=_headers(token), timeout=30)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _approval_of(stack: Stack, token: str, call_id: str, state: str = "pending") -> dict[str, Any]:
    """The approval of ``call_id`` as ``token`` lists it (waits until it is listed)."""

    def probe() -> dict[str, Any] | None:
        resp = httpx.get(
            f"{stack.ingress_url}/v1/approvals", params={"state": state}, headers=_headers(token), timeout=10
        )
        assert resp.status_code == 200, resp.text
        found = [a for a in resp.json()["data"] if a["call_id"] == call_id]
        return found[0] if found else None

    return wait_for(probe, timeout=30)


def _decide(stack: Stack, token: str, approval_id: str, decision: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{stack.ingress_url}/v1/approvals/{approval_id}/{decision}",
        json=body or None,
        headers=_headers(token),
        timeout=30,
    )


def _recorded(stack: Stack, auditor: str, call_id: str, state: str) -> dict[str, Any]:
    """The recorded call once its state and its second decision (after the approval) are both
    stored: they travel on different topics, so either may be recorded first."""

    def probe() -> dict[str, Any] | None:
        row = recorded_call(stack, auditor, call_id, state=state)
        return row if row["decision"] != "require_approval" else None

    return wait_for(probe, timeout=30)


def _events(stack: Stack, auditor: str, call_id: str) -> list[str]:
    query = f"SELECT event_type FROM events FINAL WHERE call_id = '{call_id}' ORDER BY time"  # noqa: S608
    rows = sql(stack, auditor, query)
    return [str(r["event_type"]) for r in rows]


def _story(stack: Stack, token: str, call_id: str, *also: str) -> list[str]:
    """The recorded event kinds of an approved call, once its approval was requested, decided
    and resolved and the call completed (and ``also``). They come from different topics, so
    the recorder may store them in different batches: wait for all of them."""
    wanted = ("ApprovalRequested", "ApprovalDecided", "ApprovalResolved", "CallCompleted", *also)

    def whole() -> list[str] | None:
        kinds = _events(stack, token, call_id)
        return kinds if all(kind in kinds for kind in wanted) else None

    return wait_for(whole, timeout=30)


def test_approve_path_releases_the_waiting_caller_once(
    astack: Stack, people: People, receiver: tuple[WebhookReceiver, str]
) -> None:
    hooks, _ = receiver
    marker = f"approve-{uuid.uuid4().hex}"
    answer: dict[str, Any] = {}

    def call() -> None:
        resp = httpx.post(
            f"{astack.ingress_url}/v1/messages",
            json=_body(marker),
            headers=_headers(people.alice),
            timeout=60,
        )
        answer["status"], answer["json"], answer["headers"] = resp.status_code, resp.json(), resp.headers

    caller = threading.Thread(target=call)
    caller.start()
    listed = wait_for(lambda: _listed_by_marker(astack, people.bob, marker), timeout=30)
    # The approver's summary: who, what, why, and the masked excerpt.
    assert listed["requester"]["username"] == "alice" and listed["requester"]["groups"] == ["eng"]
    assert listed["model"] == "claude-sonnet-4-5" and listed["rule_id"] == "need-one"
    assert "need-one" in listed["rule_ids"] and "a marked call needs one approval" in listed["reason"]
    assert marker in listed["excerpt"] and listed["estimated_tokens"] > 0
    assert listed["can_decide"] is True
    assert stub_requests(astack, marker) == []  # held: nothing went out yet
    decided = _decide(astack, people.bob, listed["id"], "approve", comment="looks fine")
    assert decided.status_code == 200, decided.text
    caller.join(60)
    assert answer["status"] == 200, answer
    assert answer["json"]["type"] == "message"
    call_id = answer["headers"]["x-skillgate-call-id"]
    assert len(stub_requests(astack, marker)) == 1

    row = _recorded(astack, people.audrey, call_id, "completed")
    assert row["approval_id"] == listed["id"] and row["decision"] == "allow"
    assert "approved by bob (looks fine)" in row["reason"]

    # The whole story is in ClickHouse: request, notification, decision, outcome.
    kinds = _story(astack, people.audrey, call_id, "ApprovalNotified")
    assert "ApprovalHeld" not in kinds  # internal working state, never recorded
    notified = sql(
        astack,
        people.audrey,
        f"SELECT payload FROM events FINAL WHERE call_id = '{call_id}' AND event_type = 'ApprovalNotified'",  # noqa: S608
    )
    note = json.loads(notified[0]["payload"])
    assert note["delivered"] is True and note["attempts"] == 2 and note["group"] == "approvers"
    # The analysts' one-row-per-approval view folds the same story.
    view = sql(
        astack,
        people.audrey,
        f"SELECT outcome, decisions, notifications, turnaround_seconds FROM approvals WHERE approval_id = '{listed['id']}'",  # noqa: S608
    )
    assert view[0]["outcome"] == "approved" and view[0]["notifications"] == 1
    assert view[0]["decisions"] == ["approve:bob"] and float(view[0]["turnaround_seconds"]) > 0
    # The webhook: retried after the 500, Slack-compatible, deep link, valid HMAC signature.
    deliveries = hooks.for_approval(listed["id"])
    assert len(deliveries) == 2
    last = deliveries[-1]
    stamp = last["headers"]["x-skillgate-timestamp"]
    expected = hmac.new(
        WEBHOOK_SECRET.encode(), stamp.encode() + b"." + last["body"], hashlib.sha256
    ).hexdigest()
    assert last["headers"]["x-skillgate-signature"] == f"v1={expected}"
    assert f"https://gate.example.com/v1/approvals/{listed['id']}" in last["doc"]["text"]
    assert last["doc"]["blocks"] and last["doc"]["skillgate"]["requester"] == listed["requester"]["subject"]


def _listed_by_marker(stack: Stack, token: str, marker: str, state: str = "pending") -> dict[str, Any] | None:
    resp = httpx.get(
        f"{stack.ingress_url}/v1/approvals", params={"state": state}, headers=_headers(token), timeout=10
    )
    assert resp.status_code == 200, resp.text
    found = [a for a in resp.json()["data"] if marker in a["excerpt"]]
    return found[0] if found else None


def test_deny_path_ends_the_async_call_denied(astack: Stack, people: People) -> None:
    marker = f"deny-{uuid.uuid4().hex}"
    call_id = _submit_async(astack, people.alice, _body(marker))
    approval = _approval_of(astack, people.carol, call_id)

    def state() -> Any:
        resp = httpx.get(
            f"{astack.ingress_url}/v1/calls/{call_id}", headers=_headers(people.alice), timeout=10
        )
        return resp.json().get("state") if resp.status_code == 200 else None

    wait_for(lambda: state() == "pending_approval", timeout=30)  # what an async caller sees
    resp = _decide(astack, people.carol, approval["id"], "deny", comment="not in prod")
    assert resp.status_code == 200 and resp.json()["state"] == "denied", resp.text
    row = _recorded(astack, people.audrey, call_id, "denied")
    assert "denied by carol (not in prod)" in row["reason"]
    assert stub_requests(astack, marker) == []
    # Denied is final: another approver's late approval is refused and changes nothing.
    late = _decide(astack, people.bob, approval["id"], "approve")
    assert late.status_code == 409 and "already denied" in late.json()["error"]["message"]
    assert stub_requests(astack, marker) == []


def test_expiry_tells_the_waiting_caller_and_refuses_late_approval(astack: Stack, people: People) -> None:
    marker = f"expire-{uuid.uuid4().hex}"
    resp = httpx.post(
        f"{astack.ingress_url}/v1/messages",
        json=_body(marker, "HOLD-BRIEFLY"),
        headers=_headers(people.alice),
        timeout=60,
    )
    assert resp.status_code == 403, resp.text
    assert resp.headers["x-skillgate-approval-state"] == "expired"
    assert "expired after 2 s without a decision" in resp.json()["error"]["message"]
    assert resp.json()["request_id"] == resp.headers["request-id"]
    call_id = resp.headers["x-skillgate-call-id"]
    approval_id = resp.headers["x-skillgate-approval-id"]
    row = _recorded(astack, people.audrey, call_id, "expired")
    assert row["decision"] == "expired"
    late = _decide(astack, people.bob, approval_id, "approve")
    assert late.status_code == 409 and "already expired" in late.json()["error"]["message"]
    unknown = _decide(astack, people.bob, "apr_doesnotexist", "approve")
    assert unknown.status_code == 404 and unknown.json()["type"] == "error"
    assert stub_requests(astack, marker) == []


def test_self_approval_is_refused(astack: Stack, people: People) -> None:
    marker = f"self-{uuid.uuid4().hex}"
    call_id = _submit_async(astack, people.dave, _body(marker))
    approval = _approval_of(astack, people.bob, call_id)
    mine = httpx.get(
        f"{astack.ingress_url}/v1/approvals/{approval['id']}", headers=_headers(people.dave), timeout=10
    )
    assert mine.status_code == 200 and mine.json()["can_decide"] is False
    refused = _decide(astack, people.dave, approval["id"], "approve")
    assert refused.status_code == 403 and "separation of duties" in refused.json()["error"]["message"]
    still = httpx.get(
        f"{astack.ingress_url}/v1/approvals/{approval['id']}", headers=_headers(people.bob), timeout=10
    )
    assert still.json()["state"] == "pending" and still.json()["decisions"] == []
    # A caller without the approver role cannot decide either.
    outsider = _decide(astack, people.alice, approval["id"], "approve")
    assert outsider.status_code == 403 and "approver" in outsider.json()["error"]["message"]
    assert _decide(astack, people.bob, approval["id"], "deny").status_code == 200


def test_quorum_of_two_and_duplicate_decisions(astack: Stack, people: People) -> None:
    marker = f"quorum-{uuid.uuid4().hex}"
    call_id = _submit_async(astack, people.alice, _body(marker, "HOLD-TWO"))
    approval = _approval_of(astack, people.bob, call_id)
    first = _decide(astack, people.bob, approval["id"], "approve")
    assert first.status_code == 200 and first.json()["state"] == "pending", first.text
    again = _decide(astack, people.bob, approval["id"], "approve")
    assert again.status_code == 409 and "already decided" in again.json()["error"]["message"]
    assert stub_requests(astack, marker) == []  # one approval of two: still held
    second = _decide(astack, people.carol, approval["id"], "approve")
    assert second.status_code == 200, second.text
    recorded_call(astack, people.audrey, call_id, state="completed")
    assert len(stub_requests(astack, marker)) == 1
    after = _decide(astack, people.sam, approval["id"], "approve")
    assert after.status_code in (404, 409)  # sam is not routed this approval, and it is over anyway


def test_one_approver_from_each_group(astack: Stack, people: People) -> None:
    marker = f"each-{uuid.uuid4().hex}"
    call_id = _submit_async(astack, people.alice, _body(marker, "HOLD-EACH"))
    approval = _approval_of(astack, people.bob, call_id)
    assert _decide(astack, people.bob, approval["id"], "approve").json()["state"] == "pending"
    assert _decide(astack, people.carol, approval["id"], "approve").json()["state"] == "pending"
    assert stub_requests(astack, marker) == []  # two approvers, but nobody from security yet
    done = _decide(astack, people.sam, approval["id"], "approve")
    assert done.status_code == 200, done.text
    recorded_call(astack, people.audrey, call_id, state="completed")
    assert len(stub_requests(astack, marker)) == 1


def test_time_window_grant_covers_the_next_call(astack: Stack, people: People) -> None:
    marker = f"grant-{uuid.uuid4().hex}"
    call_id = _submit_async(astack, people.gina, _body(marker))
    approval = _approval_of(astack, people.bob, call_id)
    too_long = _decide(astack, people.bob, approval["id"], "approve", grant="time_window", window_minutes=600)
    assert too_long.status_code == 400 and "at most 60" in too_long.json()["error"]["message"]
    granted = _decide(astack, people.bob, approval["id"], "approve", grant="time_window", window_minutes=10)
    assert granted.status_code == 200, granted.text
    recorded_call(astack, people.audrey, call_id, state="completed")
    assert granted.json()["outcome"]["grant"] == "time_window"

    def covered() -> httpx.Response | None:
        # The grant reaches every policy replica through approvals.resolved; until then the
        # call would be held, so ask with a fresh marker each time.
        probe = f"{marker}-{uuid.uuid4().hex[:6]}"
        resp = httpx.post(
            f"{astack.ingress_url}/v1/messages",
            json=_body(probe),
            headers=_headers(people.gina),
            timeout=APPROVAL_WAIT_S + 30,
        )
        return resp if resp.status_code == 200 else None

    second = wait_for(covered, timeout=60)
    second_id = second.headers["x-skillgate-call-id"]
    row = recorded_call(astack, people.audrey, second_id, state="completed")
    assert row["approval_id"] == approval["id"] and "time-window grant" in row["reason"]
    # Someone else's call under the same rule is still held.
    other = _submit_async(astack, people.dave, _body(f"{marker}-dave"))
    assert _approval_of(astack, people.bob, other)["state"] == "pending"


def test_timeout_then_retry_with_the_approval_header(astack: Stack, people: People) -> None:
    marker = f"retry-{uuid.uuid4().hex}"
    body = _body(marker)
    held = httpx.post(
        f"{astack.ingress_url}/v1/messages", json=body, headers=_headers(people.alice), timeout=60
    )
    assert held.status_code == 403, held.text
    approval_id = held.headers["x-skillgate-approval-id"]
    assert held.headers["x-skillgate-approval-state"] == "pending"
    assert held.headers["x-should-retry"] == "false"
    message = held.json()["error"]["message"]
    assert approval_id in message and f"x-skillgate-approval: {approval_id}" in message
    # Retrying before the decision: still pending, nothing forwarded.
    early = httpx.post(
        f"{astack.ingress_url}/v1/messages",
        json=body,
        headers=_headers(people.alice, **{"x-skillgate-approval": approval_id}),
        timeout=30,
    )
    assert early.status_code == 403 and early.headers["x-skillgate-approval-state"] == "pending"
    assert _decide(astack, people.bob, approval_id, "approve").status_code == 200
    result = httpx.post(
        f"{astack.ingress_url}/v1/messages",
        json=body,
        headers=_headers(people.alice, **{"x-skillgate-approval": approval_id}),
        timeout=60,
    )
    assert result.status_code == 200, result.text
    assert result.json()["type"] == "message"
    assert result.headers["x-skillgate-call-id"] == held.headers["x-skillgate-call-id"]
    # Another body, or another person, cannot use the approval.
    other_body = httpx.post(
        f"{astack.ingress_url}/v1/messages",
        json=_body(marker + "-changed"),
        headers=_headers(people.alice, **{"x-skillgate-approval": approval_id}),
        timeout=30,
    )
    assert other_body.status_code == 400
    other_person = httpx.post(
        f"{astack.ingress_url}/v1/messages",
        json=body,
        headers=_headers(people.dave, **{"x-skillgate-approval": approval_id}),
        timeout=30,
    )
    assert other_person.status_code == 404
    assert len(stub_requests(astack, marker)) == 1  # one approved upstream call, retries included


def test_policy_restart_while_pending_forwards_exactly_once(astack: Stack, people: People) -> None:
    marker = f"restart-{uuid.uuid4().hex}"
    call_id = _submit_async(astack, people.alice, _body(marker))
    approval = _approval_of(astack, people.bob, call_id)
    # Rate-limit counters live in a faust table too: two of two calls used before the crash...
    limited = astack.token("limited", ["eng"])
    plain = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        ok = httpx.post(
            f"{astack.ingress_url}/v1/messages", json=plain, headers=_headers(limited), timeout=60
        )
        assert ok.status_code == 200, ok.text
    astack.stop_service("policy", sig=signal.SIGKILL)
    astack.start_service("policy")
    # ...are still used after it: the restarted worker restored the count from the changelog.
    over = httpx.post(f"{astack.ingress_url}/v1/messages", json=plain, headers=_headers(limited), timeout=90)
    assert over.status_code == 429 and "limit-burst" in over.json()["error"]["message"], over.text
    # Decided while the policy service is starting: the decision waits in approvals.decided.
    resp = _decide(astack, people.bob, approval["id"], "approve")
    assert resp.status_code == 200, resp.text
    # The restarted worker takes its partitions over once the dead member's session expired
    # (SKILLGATE_POLICY_SESSION_TIMEOUT_SECONDS, 10 s) and its table is recovered.
    recorded_call(astack, people.audrey, call_id, state="completed", timeout=90)
    # A later decision is refused by the ingress; the same decision delivered again reaches the
    # policy service, which refuses it: still one upstream call.
    assert _decide(astack, people.carol, approval["id"], "approve").status_code == 409
    asyncio.run(redeliver_decision(astack, call_id, topics.APPROVALS_DECIDED))

    def refused_again() -> bool:
        return any(
            approval["id"] in line and '"note":"approval already approved"' in line
            for line in astack.log_path("policy").read_text().splitlines()
        )

    wait_for(refused_again, timeout=60)
    assert len(stub_requests(astack, marker)) == 1
    kinds = _story(astack, people.audrey, call_id)
    assert kinds.count("CallCompleted") == 1 and kinds.count("ApprovalResolved") == 1


def test_cli_lists_and_approves(astack: Stack, people: People, capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli.main import main

    marker = f"cli-{uuid.uuid4().hex}"
    call_id = _submit_async(astack, people.alice, _body(marker))
    approval = _approval_of(astack, people.bob, call_id)
    common = ["--url", astack.ingress_url, "--token", people.bob]
    assert main(["approvals", "list", *common]) == 0
    assert approval["id"] in capsys.readouterr().out
    assert main(["approvals", "show", approval["id"], *common]) == 0
    assert "a marked call needs one approval" in capsys.readouterr().out
    assert (
        main(["approvals", "approve", approval["id"], "--comment", "via cli", "--format", "json", *common])
        == 0
    )
    assert orjson.loads(capsys.readouterr().out)["state"] == "approved"
    recorded_call(astack, people.audrey, call_id, state="completed")
    assert len(stub_requests(astack, marker)) == 1
    # Refusals exit 1 with the gateway's message.
    assert main(["approvals", "approve", approval["id"], *common]) == 1
    assert "already approved" in capsys.readouterr().err


def test_two_approvers_clicking_at_once_release_the_call_once(astack: Stack, people: People) -> None:
    marker = f"race-{uuid.uuid4().hex}"
    call_id = _submit_async(astack, people.alice, _body(marker))
    approval = _approval_of(astack, people.bob, call_id)
    statuses: list[int] = []
    clicks = [
        threading.Thread(
            target=lambda t=token: statuses.append(_decide(astack, t, approval["id"], "approve").status_code)
        )
        for token in (people.bob, people.carol)
    ]
    for click in clicks:
        click.start()
    for click in clicks:
        click.join(60)
    assert sorted(statuses) in ([200, 200], [200, 409])  # both may pass the ingress's check
    _recorded(astack, people.audrey, call_id, "completed")
    assert len(stub_requests(astack, marker)) == 1
    kinds = _story(astack, people.audrey, call_id)
    assert kinds.count("ApprovalResolved") == 1 and kinds.count("CallCompleted") == 1


def test_a_tool_command_held_for_approval_runs_once_approved(astack: Stack, people: People) -> None:
    marker = uuid.uuid4().hex[:12]
    command = {"command": f"kubectl apply -f {marker}.yaml"}
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"deploy it\nSTUB_TOOL_USE bash {json.dumps(command)}"}],
    }
    first = httpx.post(
        f"{astack.ingress_url}/v1/messages", json=body, headers=_headers(people.erin), timeout=60
    )
    assert first.status_code == 200, first.text
    held = first.json()["content"][1]
    assert held["type"] == "text" and "held tool call bash for approval" in held["text"]
    approval_id = re.search(r"apr_[0-9a-f]+", held["text"]).group(0)  # type: ignore[union-attr]
    listed = wait_for(lambda: _listed(astack, people.bob, approval_id), timeout=30)
    assert listed["tools"] == ["bash"] and marker in listed["excerpt"] and listed["rule_id"] == "deploys"
    assert _decide(astack, people.bob, approval_id, "approve").json()["state"] == "approved"

    def runs() -> dict[str, Any] | None:
        # The grant reaches the forwarder through approvals.resolved; until then it is held again.
        resp = httpx.post(
            f"{astack.ingress_url}/v1/messages", json=body, headers=_headers(people.erin), timeout=60
        )
        block = resp.json()["content"][1]
        return (
            resp.json() | {"id": resp.headers["x-skillgate-call-id"]} if block["type"] == "tool_use" else None
        )

    passed = wait_for(runs, timeout=60)
    assert passed["content"][1]["input"] == command and passed["stop_reason"] == "tool_use"
    row = _recorded(astack, people.audrey, passed["id"], "completed")
    assert "allowed_by_grant" in json.dumps(row["blocked_tools"]), row["blocked_tools"]


def _listed(stack: Stack, token: str, approval_id: str) -> dict[str, Any] | None:
    resp = httpx.get(f"{stack.ingress_url}/v1/approvals/{approval_id}", headers=_headers(token), timeout=10)
    return resp.json() if resp.status_code == 200 else None


def test_a_streamed_call_held_for_approval_streams_once_approved(astack: Stack, people: People) -> None:
    import anthropic

    marker = f"stream-{uuid.uuid4().hex}"
    client = anthropic.Anthropic(base_url=astack.ingress_url, api_key=people.alice, max_retries=0)
    answer: dict[str, Any] = {}

    def stream() -> None:
        with client.messages.stream(
            model="claude-sonnet-4-5",
            max_tokens=32,
            messages=[{"role": "user", "content": f"HOLD-ONE {marker}"}],
        ) as s:
            answer["text"] = "".join(s.text_stream)

    caller = threading.Thread(target=stream)
    caller.start()
    listed = wait_for(lambda: _listed_by_marker(astack, people.bob, marker), timeout=30)
    assert _decide(astack, people.bob, listed["id"], "approve").status_code == 200
    caller.join(60)
    assert marker in answer["text"]
    assert len(stub_requests(astack, marker)) == 1
    # Expiry while streaming: the SDK raises the 403 that names the approval.
    brief = [{"role": "user", "content": f"HOLD-BRIEFLY {marker}"}]
    with (
        pytest.raises(anthropic.PermissionDeniedError, match="expired"),
        client.messages.stream(model="claude-sonnet-4-5", max_tokens=8, messages=brief) as s,  # type: ignore[arg-type]
    ):
        "".join(s.text_stream)
