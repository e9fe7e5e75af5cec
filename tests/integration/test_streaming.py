"""Streaming (``stream: true``) through the running pipeline with the official SDKs.

ingress → calls.submitted → policy → calls.decided → forwarder ⇄ stub upstream (SSE) → chunks on
calls.replies → ingress → the SDK's stream helpers. The stack applies the default bundle (PII and
secrets masked in answers, destructive shell commands blocked). Its ingress pings after 0.3 s of
silence, so keep-alive is observable in test time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from services.cli.stack import Stack
from skillgate.codec import default_codec
from tests.conftest import wait_for
from tests.integration.conftest import _session_stack
from tests.integration.helpers import (
    read_topics,
    recorded_call,
    recorded_event,
    sql,
    stack_kafka,
    stub_requests,
)

pytestmark = pytest.mark.integration

GITHUB = "ghp_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe9Dc8Ba"
REPO = Path(__file__).resolve().parents[2]
ANTHROPIC_EVENTS = {
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
}


@pytest.fixture(scope="module")
def sstack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack for the streaming tests: pings after 0.3 s of silence."""
    yield from _session_stack(
        tmp_path_factory,
        kafka_bootstrap,
        "st",
        {"SKILLGATE_INGRESS_STREAM_PING_SECONDS": "0.3"},
    )


@pytest.fixture(scope="module")
def token(sstack: Stack) -> str:
    return sstack.token("sam", ["eng"])


@pytest.fixture(scope="module")
def auditor(sstack: Stack) -> str:
    return sstack.token("audrey", ["auditors"])


def client(stack: Stack, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.ingress_url, api_key=token, max_retries=0, timeout=60)


def params(prompt: str) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": prompt}],
    }


def raw_events(
    stack: Stack, token: str, prompt: str, headers: dict[str, str]
) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    """POST a streamed call with plain httpx; the response and its (event, data) pairs."""
    body = {**params(prompt), "stream": True}
    out: list[tuple[str, Any]] = []
    with httpx.stream(
        "POST",
        f"{stack.ingress_url}/v1/messages",
        json=body,
        headers={"x-api-key": token, "anthropic-version": "2023-06-01", **headers},
        timeout=60,
    ) as resp:
        name = ""
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return resp, out


def test_text_stream_with_the_python_sdk(sstack: Stack, token: str, auditor: str) -> None:
    marker = uuid.uuid4().hex[:10]
    prompt = f"Tell me about streams {marker}. " + "More words here. " * 20
    with client(sstack, token).messages.stream(**params(prompt)) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        call_id = stream.response.headers["x-skillgate-call-id"]
        assert stream.response.headers["content-type"].startswith("text/event-stream")
    assert text == f"echo: {prompt}"
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 1

    row = recorded_call(sstack, auditor, call_id)
    assert row["state"] == "completed"
    assert json.loads(row["response_body"])["content"][0]["text"] == text  # the assembled message
    completed = recorded_event(sstack, auditor, call_id)
    assert completed["stream"] is True
    assert (
        completed["first_token_ms"] is not None and 0 < completed["first_token_ms"] <= completed["latency_ms"]
    )
    assert completed["chunks"] >= 1
    # The wide record keeps the stream's timing next to the assembled message.
    wide = wait_for(
        lambda: sql(
            sstack,
            auditor,
            f"SELECT stream, first_token_ms, latency_ms, total_ms FROM call_records FINAL "  # noqa: S608
            f"WHERE call_id = '{call_id}' AND state = 'completed'",
        ),
        timeout=30,
    )
    assert wide[0]["stream"] in (True, 1) and wide[0]["first_token_ms"] == completed["first_token_ms"]
    assert wide[0]["total_ms"] >= wide[0]["latency_ms"] > 0

    # chunks are not recorded row by row: of the call's replies only the end is stored (it is on
    # calls.replies, which the recorder may reach in a later batch than calls.completed)
    def replies() -> int:
        rows = sql(
            sstack,
            auditor,
            f"SELECT count() AS n FROM events WHERE call_id = '{call_id}' AND event_type = 'CallReply'",  # noqa: S608
        )
        return int(rows[0]["n"])

    assert wait_for(replies, timeout=30) == 1


def test_event_sequence_and_keepalive_pings(sstack: Stack, token: str) -> None:
    """The exact Anthropic event grammar, with pings while the upstream is silent for 1.5 s."""
    resp, evs = raw_events(sstack, token, "STUB_THINKING ping test", {"x-stub-first-delta-delay-ms": "1500"})
    assert resp.status_code == 200
    names = [n for n, _ in evs]
    assert set(names) <= ANTHROPIC_EVENTS
    assert all(data["type"] == name for name, data in evs)
    content = [n for n in names if n != "ping"]
    assert content[0] == "message_start" and content[-2:] == ["message_delta", "message_stop"]
    assert content.count("content_block_start") == content.count("content_block_stop") == 2
    kinds = {d["delta"]["type"] for n, d in evs if n == "content_block_delta"}
    assert {"thinking_delta", "signature_delta", "text_delta"} <= kinds
    # the stub pings once by itself; skillgate added keep-alives during the 1.5 s of silence
    assert names.count("ping") >= 3
    [delta] = [d for n, d in evs if n == "message_delta"]
    assert delta["usage"]["output_tokens"] > 0


def test_tool_use_stream(sstack: Stack, token: str) -> None:
    tool_input = {"city": "Paris", "units": "celsius"}
    c = client(sstack, token)
    with c.messages.stream(
        **params("weather?"),
        extra_headers={"x-stub-tool-use": "get_weather", "x-stub-tool-input": json.dumps(tool_input)},
    ) as stream:
        json_parts = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    tool = final.content[-1]
    assert tool.type == "tool_use" and tool.name == "get_weather" and tool.input == tool_input
    assert json.loads("".join(json_parts)) == tool_input
    assert final.stop_reason == "tool_use"


def test_secret_split_across_chunks_is_masked(sstack: Stack, token: str, auditor: str) -> None:
    """The 'model' leaks a key and an address; the stub streams them 8 characters per delta."""
    email = f"grace.{uuid.uuid4().hex[:6]}@example.net"
    said = f"Your key is {GITHUB} and write to {email} today."
    with client(sstack, token).messages.stream(
        **params("what is my key?"), extra_headers={"x-stub-reply-text": said}
    ) as stream:
        deltas = [e.text for e in stream if e.type == "text"]
        call_id = stream.response.headers["x-skillgate-call-id"]
    text = "".join(deltas)
    assert text == "Your key is [GITHUB_TOKEN_1] and write to [EMAIL_1] today."
    assert GITHUB[:10] not in text and "example.net" not in text
    row = recorded_call(sstack, auditor, call_id)
    assert GITHUB not in row["response_body"] and email not in row["response_body"]
    completed = recorded_event(sstack, auditor, call_id)
    assert {m["type"] for m in completed["masked"]} == {"GITHUB_TOKEN", "EMAIL"}
    # nothing unmasked on calls.replies either (every chunk of every call)
    import asyncio

    from skillgate import topics
    from skillgate.codec import default_codec

    records = asyncio.run(read_topics(stack_kafka(sstack), [topics.REPLIES]))
    bodies = b"".join(default_codec().decode(r.value)[1]["body"] for r in records)
    assert GITHUB.encode() not in bodies and email.encode() not in bodies and b"[GITHUB_TOKEN_1]" in bodies
    # nor in any service's log (the stub's own log aside: it is the "model" that said it)
    for name in ("ingress", "policy", "forwarder", "recorder"):
        assert GITHUB not in sstack.log_path(name).read_text(errors="replace"), name


def test_blocked_command_in_a_stream(sstack: Stack, token: str, auditor: str) -> None:
    resp, evs = raw_events(
        sstack,
        token,
        "clean up",
        {
            "x-stub-tool-use": "bash",
            "x-stub-tool-input": json.dumps({"command": "rm -rf / --no-preserve-root"}),
        },
    )
    assert resp.status_code == 200
    assert "rm -rf" not in json.dumps(evs)
    assert not any(d["delta"]["type"] == "input_json_delta" for n, d in evs if n == "content_block_delta")
    texts = "".join(
        d["delta"]["text"]
        for n, d in evs
        if n == "content_block_delta" and d["delta"]["type"] == "text_delta"
    )
    assert "[skillgate blocked tool call bash: destructive shell command (rule destructive-shell)]" in texts
    [delta] = [d for n, d in evs if n == "message_delta"]
    assert delta["delta"]["stop_reason"] == "end_turn"
    call_id = resp.headers["x-skillgate-call-id"]
    row = recorded_call(sstack, auditor, call_id)
    completed = recorded_event(sstack, auditor, call_id)
    assert [b["rule_id"] for b in completed["blocked_tools"]] == ["destructive-shell"]
    assert row["state"] == "completed"
    # the SDK's helper assembles the replaced block as text
    with client(sstack, token).messages.stream(
        **params("clean up again"),
        extra_headers={"x-stub-tool-use": "bash", "x-stub-tool-input": json.dumps({"command": "rm -rf /"})},
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "text"] and final.stop_reason == "end_turn"


def test_client_disconnect_cancels_the_upstream(sstack: Stack, token: str, auditor: str) -> None:
    marker = uuid.uuid4().hex[:10]
    prompt = f"slow {marker} " + "long answer " * 60
    with client(sstack, token).messages.stream(
        **params(prompt), extra_headers={"x-stub-chunk-delay-ms": "100"}
    ) as stream:
        call_id = stream.response.headers["x-skillgate-call-id"]
        got = 0
        for event in stream:
            if event.type == "text":
                got += 1
                if got == 3:
                    break  # leaving the block closes the connection mid-stream
    # the stub saw its stream cut short: skillgate closed the upstream request
    seen = wait_for(lambda: [r for r in stub_requests(sstack, marker) if r.get("stream_outcome")], timeout=20)
    assert isinstance(seen, list) and seen[0]["stream_outcome"] == "disconnected"
    row = recorded_call(sstack, auditor, call_id)
    assert row["state"] == "failed"
    failed = recorded_event(sstack, auditor, call_id, "CallFailed")
    assert failed["error_type"] == "client_disconnected" and failed["status"] == 499
    cancelled = recorded_event(sstack, auditor, call_id, "CallCancelled")
    assert cancelled["reason"] == "client_disconnected" and cancelled["chunks_delivered"] >= 1


def test_disconnect_before_the_forwarder_started_is_not_missed(
    sstack: Stack, token: str, auditor: str
) -> None:
    """The caller leaves while its call waits for a forwarder that is down: the ingress cancels
    it at once, and the forwarder, once it starts, reads that cancellation before the decision
    and never calls the upstream (the call is recorded as a disconnect)."""
    marker = uuid.uuid4().hex[:10]
    sstack.stop_service("forwarder")
    try:
        body = {**params(f"gone {marker}"), "stream": True}
        with pytest.raises(httpx.ReadTimeout):
            # the caller gives up (closing its connection) while no stream can begin
            httpx.post(
                f"{sstack.ingress_url}/v1/messages",
                json=body,
                headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
                timeout=httpx.Timeout(60, read=2.0),
            )
        kafka = stack_kafka(sstack)

        def cancelled_call() -> str | None:
            submitted = {}
            for record in asyncio.run(read_topics(kafka, ["calls.submitted", "calls.cancelled"])):
                _, event = default_codec().decode(record.value)
                if "body" in event and marker.encode() in (event["body"] or b""):
                    submitted[event["call_id"]] = True
                elif "reason" in event and event["call_id"] in submitted:
                    return str(event["call_id"])
            return None

        call_id = wait_for(cancelled_call, timeout=30, interval=0.5)
    finally:
        sstack.start_service("forwarder")
    row = recorded_call(sstack, auditor, call_id, timeout=90)
    assert row["state"] == "failed"
    failed = recorded_event(sstack, auditor, call_id, "CallFailed")
    assert failed["error_type"] == "client_disconnected" and failed["status"] == 499
    assert stub_requests(sstack, marker) == []  # never forwarded
    cancelled = recorded_event(sstack, auditor, call_id, "CallCancelled")
    assert cancelled["reason"] == "client_disconnected" and cancelled["chunks_delivered"] == 0


def test_upstream_error_mid_stream(sstack: Stack, token: str, auditor: str) -> None:
    marker = uuid.uuid4().hex[:10]
    c = client(sstack, token)
    call_id = ""
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        c.messages.stream(
            **params(f"break {marker} " * 5), extra_headers={"x-stub-stream-error-after": "3"}
        ) as stream,
    ):
        call_id = stream.response.headers["x-skillgate-call-id"]
        for _ in stream:
            pass
    assert "Overloaded" in str(caught.value)
    row = recorded_call(sstack, auditor, call_id)
    assert row["state"] == "failed"
    failed = recorded_event(sstack, auditor, call_id, "CallFailed")
    assert failed["error_type"] == "overloaded_error" and failed["status"] == 529
    # what streamed before the error is kept in the record (3 deltas of 8 characters)
    assert json.loads(row["response_body"])["content"][0]["text"].startswith("echo: break")


def test_typescript_sdk_streams(sstack: Stack, token: str) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm are not installed: the TypeScript SDK test needs them")
    prefix = REPO / ".cache" / "npm"
    if not (prefix / "node_modules" / "@anthropic-ai" / "sdk").is_dir():
        prefix.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "@anthropic-ai/sdk"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    script = prefix / "stream_test.mjs"
    script.write_text(
        """
import Anthropic from '@anthropic-ai/sdk';
const client = new Anthropic({ baseURL: process.env.BASE_URL, apiKey: process.env.TOKEN, maxRetries: 0 });
const stream = client.messages.stream({
  model: 'claude-sonnet-4-5', max_tokens: 128,
  messages: [{ role: 'user', content: process.env.PROMPT }],
});
let text = '';
stream.on('text', (t) => { text += t; });
const final = await stream.finalMessage();
console.log(JSON.stringify({ text, final }));
"""
    )
    prompt = f"hello from typescript {uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BASE_URL": sstack.ingress_url, "TOKEN": token, "PROMPT": prompt}
    done = subprocess.run(
        [node, str(script)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["text"] == f"echo: {prompt}"
    assert out["final"]["content"][0]["text"] == out["text"] and out["final"]["stop_reason"] == "end_turn"


def test_error_before_the_stream_began_is_a_json_error(sstack: Stack, token: str, auditor: str) -> None:
    """An upstream error status arrives before any event: the caller gets the API's JSON error
    (what the SDKs expect), not an empty stream."""
    with (
        pytest.raises(anthropic.BadRequestError) as caught,
        client(sstack, token).messages.stream(
            **params("fail please"), extra_headers={"x-stub-fail": "400"}
        ) as s,
    ):
        s.get_final_message()
    resp = caught.value.response
    assert resp.status_code == 400 and resp.headers["content-type"].startswith("application/json")
    row = recorded_call(sstack, auditor, resp.headers["x-skillgate-call-id"])
    assert row["state"] == "completed" and row["status"] == 400  # the upstream's answer, relayed
