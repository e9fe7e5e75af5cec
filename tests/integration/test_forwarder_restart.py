"""Invariant 4 across a crash: the forwarder dies while the upstream holds a call; after restart
the redelivered decision is recognised from the claims changelog, the call ends in exactly one
terminal state (failed: outcome unknown), and the upstream is never called a second time."""

from __future__ import annotations

import asyncio
import signal
import uuid

import httpx
import pytest

from services.cli.stack import Stack
from tests.conftest import wait_for
from tests.integration.helpers import metric, recorded_call, redeliver_decision, stub_requests

pytestmark = pytest.mark.integration


def test_forwarder_crash_mid_call_never_calls_upstream_twice(
    stack: Stack, alice_token: str, auditor_token: str
) -> None:
    marker = f"crash-{uuid.uuid4().hex}"
    headers = {
        "authorization": f"Bearer {alice_token}",
        "anthropic-version": "2023-06-01",
        "x-stub-latency-ms": "5000",  # the upstream holds the call while the forwarder dies
    }
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": marker}]}
    resp = httpx.post(f"{stack.ingress_url}/v1/calls", json=body, headers=headers, timeout=30)
    assert resp.status_code == 202
    call_id = resp.json()["id"]

    wait_for(lambda: len(stub_requests(stack, marker)) == 1, timeout=30)
    stack.stop_service("forwarder", sig=signal.SIGKILL)
    stack.start_service("forwarder")
    wait_for(lambda: _metric_or_zero(stack) >= 1, timeout=60)

    row = recorded_call(stack, auditor_token, call_id)
    assert row["state"] == "failed"
    assert "restarted" in str(row["error_message"])
    # Let the held upstream request finish: still exactly one upstream call for this call.
    wait_for(lambda: all(r.get("status") for r in stub_requests(stack, marker)), timeout=30)
    assert len(stub_requests(stack, marker)) == 1
    events = httpx.post(
        f"{stack.recorder_url}/v1/audit/sql",
        json={"query": f"SELECT event_type FROM events FINAL WHERE call_id = '{call_id}'"},  # noqa: S608
        headers={"authorization": f"Bearer {auditor_token}"},
    ).json()["rows"]
    kinds = [r[0] for r in events]
    assert kinds.count("CallFailed") == 1 and "CallCompleted" not in kinds


def _metric_or_zero(stack: Stack) -> float:
    try:
        return metric(
            stack.ports.forwarder_metrics, "skillgate_forwarder_duplicates_total", {"kind": "interrupted"}
        )
    except httpx.HTTPError:
        return 0.0  # the restarted forwarder is not serving metrics yet


def test_decision_repeated_while_the_call_is_in_flight(
    stack: Stack, alice_token: str, auditor_token: str
) -> None:
    """Policy re-emits a decision (e.g. after its own restart) while the forwarder is still waiting
    on the upstream for the original: one upstream call, one terminal state, and it is completed."""
    marker = f"dup-inflight-{uuid.uuid4().hex}"
    headers = {
        "authorization": f"Bearer {alice_token}",
        "anthropic-version": "2023-06-01",
        "x-stub-latency-ms": "3000",
    }
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": marker}]}
    resp = httpx.post(f"{stack.ingress_url}/v1/calls", json=body, headers=headers, timeout=30)
    call_id = resp.json()["id"]
    before = metric(
        stack.ports.forwarder_metrics, "skillgate_forwarder_duplicates_total", {"kind": "in_flight"}
    )
    wait_for(lambda: len(stub_requests(stack, marker)) == 1, timeout=30)
    asyncio.run(redeliver_decision(stack, call_id))
    wait_for(
        lambda: (
            metric(
                stack.ports.forwarder_metrics, "skillgate_forwarder_duplicates_total", {"kind": "in_flight"}
            )
            > before
        ),
        timeout=30,
    )
    row = recorded_call(stack, auditor_token, call_id)
    assert row["state"] == "completed"
    assert len(stub_requests(stack, marker)) == 1
    kinds = [
        r[0]
        for r in httpx.post(
            f"{stack.recorder_url}/v1/audit/sql",
            json={"query": f"SELECT event_type FROM events FINAL WHERE call_id = '{call_id}'"},  # noqa: S608
            headers={"authorization": f"Bearer {auditor_token}"},
        ).json()["rows"]
    ]
    assert "CallFailed" not in kinds and kinds.count("CallCompleted") == 1
