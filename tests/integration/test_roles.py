"""Roles end to end (issue 3, item 3), through the running :func:`identity_stack`.

That stack sets ``SKILLGATE_ROLES_CALLER_GROUPS=["callers"]``: calling Claude needs membership of
``callers`` (or ``admins``, which implies every role); reading the audit store needs ``auditors``
(the default mapping). Tokens come from the stack's dev issuer, so the roles are derived from
verified group claims exactly as they would be from a real IdP's.
"""

from __future__ import annotations

import asyncio
import uuid

import anthropic
import httpx
import pytest

from services.cli.stack import Stack
from skillgate import topics
from tests.integration.helpers import read_topics, recorded_call, stack_kafka

pytestmark = pytest.mark.integration

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def _user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _sdk(stack: Stack, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.ingress_url, api_key=token, max_retries=0)


def _submitted(stack: Stack) -> list[bytes]:
    records = asyncio.run(read_topics(stack_kafka(stack), [topics.SUBMITTED]))
    return [r.value or b"" for r in records]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/messages"),
        ("POST", "/v1/messages/count_tokens"),
        ("POST", "/v1/calls"),
        ("GET", "/v1/calls/0190f0a0-0000-7000-8000-000000000000"),
    ],
)
def test_every_call_route_needs_the_caller_role(identity_stack: Stack, method: str, path: str) -> None:
    """A valid token outside the caller groups gets 403 permission_error naming the missing role."""
    token = identity_stack.token(_user("eve"), ["eng", "approvers"])
    resp = httpx.request(
        method,
        f"{identity_stack.ingress_url}{path}",
        json=BODY if method == "POST" else None,
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert resp.status_code == 403, resp.text
    doc = resp.json()
    assert doc["type"] == "error"
    assert doc["error"]["type"] == "permission_error"
    assert "`caller` role" in doc["error"]["message"]
    assert resp.headers["request-id"] == doc["request_id"]


def test_user_outside_the_caller_groups_is_refused_and_nothing_is_published(identity_stack: Stack) -> None:
    """Through the SDK: PermissionDeniedError with the reason, and the call never reached Kafka."""
    marker = f"forbidden-{uuid.uuid4().hex}"
    token = identity_stack.token(_user("eve"), ["eng"])
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        _sdk(identity_stack, token).messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": marker}]
        )
    assert isinstance(info.value.body, dict)
    assert "`caller` role" in info.value.body["error"]["message"]
    assert not any(marker.encode() in v for v in _submitted(identity_stack))


@pytest.mark.parametrize("groups", [["callers"], ["admins"], ["eng", "callers"]])
def test_member_of_a_caller_group_or_admin_gets_200_and_is_recorded_with_its_groups(
    identity_stack: Stack, groups: list[str]
) -> None:
    """Members of ``callers`` (and admins, who hold every role) call Claude; the record carries
    the verified subject and groups."""
    user = _user("carl")
    raw = _sdk(identity_stack, identity_stack.token(user, groups)).messages.with_raw_response.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "hello"}]
    )
    assert raw.status_code == 200
    auditor = identity_stack.token(_user("audrey"), ["auditors"])
    row = recorded_call(identity_stack, auditor, raw.headers["x-skillgate-call-id"])
    assert row["subject"] == user
    assert sorted(row["groups"]) == sorted(groups)
    assert row["state"] == "completed"


@pytest.mark.parametrize(
    ("groups", "status"),
    [(["auditors"], 200), (["admins"], 200), (["callers"], 403), (["callers", "approvers"], 403)],
)
def test_audit_sql_needs_the_auditor_role(identity_stack: Stack, groups: list[str], status: int) -> None:
    """The recorder's SQL endpoint answers auditors (and admins) only: 403 with the reason otherwise."""
    token = identity_stack.token(_user("sam"), groups)
    resp = httpx.post(
        f"{identity_stack.recorder_url}/v1/audit/sql",
        json={"query": "SELECT count() AS n FROM calls", "format": "json"},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert resp.status_code == status, resp.text
    if status == 403:
        assert resp.json()["error"]["type"] == "permission_error"
        assert "auditor role" in resp.json()["error"]["message"]
    else:
        assert resp.json()["columns"] == ["n"]


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token"])
def test_audit_sql_without_a_valid_token_is_401(identity_stack: Stack, authorization: str | None) -> None:
    """No token or a bad one: 401 with a Bearer challenge, before any role is considered."""
    headers = {"authorization": authorization} if authorization else {}
    resp = httpx.post(
        f"{identity_stack.recorder_url}/v1/audit/sql",
        json={"query": "SELECT 1", "format": "json"},
        headers=headers,
        timeout=30,
    )
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["type"] == "authentication_error"
    assert resp.headers["www-authenticate"].startswith("Bearer")


def test_callers_read_their_own_calls_and_auditors_read_any(identity_stack: Stack) -> None:
    """``GET /v1/calls/{id}``: the owner and an auditor see the call; another caller does not
    learn that it exists (404, the same as an unknown id)."""
    owner = identity_stack.token(_user("olga"), ["callers"])
    raw = _sdk(identity_stack, owner).messages.with_raw_response.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "mine"}]
    )
    call_id = raw.headers["x-skillgate-call-id"]
    auditor = identity_stack.token(_user("audrey"), ["auditors"])
    recorded_call(identity_stack, auditor, call_id)

    def get(token: str) -> httpx.Response:
        return httpx.get(
            f"{identity_stack.ingress_url}/v1/calls/{call_id}",
            headers={"authorization": f"Bearer {token}"},
            timeout=30,
        )

    assert get(owner).status_code == 200
    assert get(owner).json()["state"] == "completed"
    other = get(identity_stack.token(_user("mallory"), ["callers"]))
    assert other.status_code == 404, other.text
    assert other.json()["error"]["type"] == "not_found_error"
    # An auditor reads it through the recorder's API (the ingress route is for callers).
    resp = httpx.get(
        f"{identity_stack.recorder_url}/v1/calls/{call_id}",
        headers={"authorization": f"Bearer {auditor}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
