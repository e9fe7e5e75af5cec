"""``skillgate audit find-secret`` through the running stack: a secret masked by policy is found
by its fingerprint (same key in policy and recorder), a value never sent is not, only auditors
may ask, and the value appears in no answer and no log."""

from __future__ import annotations

import io
import secrets
import uuid
from typing import Any

import httpx
import pytest

from services.cli.stack import Stack
from services.recorder.cli import find_secret_command
from tests.conftest import wait_for
from tests.integration.helpers import recorded_call

pytestmark = pytest.mark.integration

#: AWS access key ids are AKIA + 16 base-32 characters (A-Z, 2-7).
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def fake_aws_key() -> str:
    """A realistic, random (never issued) AWS access key id."""
    return "AKIA" + "".join(secrets.choice(_BASE32) for _ in range(16))


def find(stack: Stack, token: str, value: str) -> httpx.Response:
    """POST the value to the recorder's find-secret API."""
    return httpx.post(
        f"{stack.recorder_url}/v1/audit/find-secret",
        json={"value": value},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )


def test_find_secret_finds_the_call_that_carried_it(
    stack: Stack, alice_token: str, auditor_token: str
) -> None:
    secret = fake_aws_key()
    marker = f"fs-{uuid.uuid4().hex}"
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": f"{marker}: deploy fails with key {secret}, why?"}],
    }
    headers = {"authorization": f"Bearer {alice_token}", "anthropic-version": "2023-06-01"}
    resp = httpx.post(f"{stack.ingress_url}/v1/messages", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    call_id = resp.headers["x-skillgate-call-id"]
    row = recorded_call(stack, auditor_token, call_id)
    assert secret not in (row["request_body"] or "") and "[AWS_ACCESS_KEY_1]" in row["request_body"]

    def located() -> dict[str, Any] | None:
        r = find(stack, auditor_token, secret)
        assert r.status_code == 200, r.text
        doc = r.json()
        hits = [m for m in doc["matches"] if m["call_id"] == call_id]
        return {"doc": doc, "text": r.text, "hit": hits[0]} if hits else None

    found = wait_for(located, timeout=30)
    assert isinstance(found, dict)
    hit, doc = found["hit"], found["doc"]
    assert doc["found"] is True and doc["call_count"] >= 1 and len(doc["fingerprint"]) == 64
    assert hit["subject"] == "alice"
    assert hit["type"] == "AWS_ACCESS_KEY" and hit["placeholder"] == "[AWS_ACCESS_KEY_1]"
    assert hit["location"] == "messages[0].content" and hit["scope"] == "upstream"
    assert hit["direction"] == "request" and hit["event"] == "CallDecided"
    assert hit["time"] and hit["bundle_version"].startswith("default@")
    assert secret not in found["text"]

    # The command line prints the same, without the value.
    out, err = io.StringIO(), io.StringIO()
    assert find_secret_command(secret, "table", stack.recorder_url, auditor_token, out, err) == 0
    assert call_id in out.getvalue() and "AWS_ACCESS_KEY" in out.getvalue()
    assert secret not in out.getvalue() + err.getvalue()

    # Nothing in any service's log holds the value (the recorder computed its fingerprint).
    for name in ("ingress", "policy", "forwarder", "recorder"):
        log_path = stack.log_path(name)
        if log_path.exists():
            assert secret not in log_path.read_text(errors="replace"), name


def test_a_value_never_sent_is_not_found(stack: Stack, auditor_token: str) -> None:
    never = fake_aws_key()
    r = find(stack, auditor_token, never)
    assert r.status_code == 200, r.text
    assert r.json()["found"] is False and r.json()["matches"] == []
    assert never not in r.text
    out, err = io.StringIO(), io.StringIO()
    assert find_secret_command(never, "table", stack.recorder_url, auditor_token, out, err) == 1
    assert "not found" in out.getvalue() and never not in out.getvalue()


def test_only_auditors_may_search(stack: Stack, alice_token: str) -> None:
    value = fake_aws_key()
    r = find(stack, alice_token, value)
    assert r.status_code == 403, r.text
    assert r.json()["type"] == "error" and "auditor" in r.json()["error"]["message"]
    assert value not in r.text
    anonymous = httpx.post(f"{stack.recorder_url}/v1/audit/find-secret", json={"value": value}, timeout=30)
    assert anonymous.status_code == 401 and value not in anonymous.text
    out, err = io.StringIO(), io.StringIO()
    assert find_secret_command(value, "table", stack.recorder_url, alice_token, out, err) == 2
    assert "403" in err.getvalue() and value not in err.getvalue()


def test_a_bad_request_does_not_echo_the_value(stack: Stack, auditor_token: str) -> None:
    value = fake_aws_key()
    r = httpx.post(
        f"{stack.recorder_url}/v1/audit/find-secret",
        json={"value": value, "unexpected": 1, "max": "x" * 10},
        headers={"authorization": f"Bearer {auditor_token}"},
        timeout=30,
    )
    # Extra fields are ignored; a non-string value is refused without being repeated.
    assert r.status_code == 200
    r = httpx.post(
        f"{stack.recorder_url}/v1/audit/find-secret",
        json={"value": 1234567890123},
        headers={"authorization": f"Bearer {auditor_token}"},
        timeout=30,
    )
    assert r.status_code == 400 and "1234567890123" not in r.text
