"""Masking (``skillgate/policy/masking.py``): typed placeholders consistent within a call, every
masked location of a Messages request and response, JSON paths, keyed fingerprints, MaskedValue
records that match the Avro contract, bodies never mutated, values never in the output, and
masking that is idempotent-safe (masking a masked body finds nothing new).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import random
from pathlib import Path
from typing import Any

import fastavro
import pytest

from bench.corpus import fakes, templates
from skillgate.events import MaskedValue
from skillgate.policy.detectors import PII_TYPES, SECRET_TYPES, DetectorError, DetectorSet
from skillgate.policy.masking import Masker, MaskingError, fingerprint

KEY = b"k" * 32
AWS = "AKIA" + "Q3W7ZK2MPL5RXT4N"
GITHUB = "ghp" + "_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9aB3dE5gH7"
EMAIL = "ada.lovelace@example.org"
EMAIL2 = "grace@navy.example.mil"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "skillgate.events.MaskedValue.avsc"


@pytest.fixture(scope="module")
def masker() -> Masker:
    return Masker(DetectorSet(), KEY)


def request_body() -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 512,
        "metadata": {"user_id": "u-1"},
        "system": f"You help {EMAIL}. Never print {AWS}.",
        "tools": [
            {"name": "bash", "description": f"runs commands for {EMAIL}", "input_schema": {"type": "object"}}
        ],
        "messages": [
            {"role": "user", "content": f"My key is {AWS} and my mail {EMAIL}."},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"Noted, {EMAIL}."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "bash",
                        "input": {
                            "command": f"curl -H 'Authorization: token {GITHUB}' https://api.github.com",
                            "env": [{"name": "NOTIFY", "value": EMAIL2}, 42, None, True],
                            "odd key": PHONE,
                        },
                    },
                    {"type": "thinking", "thinking": f"mail {EMAIL}", "signature": "sig"},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": f"sent to {EMAIL2}"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [
                            {"type": "text", "text": f"card {CARD}"},
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"},
                            },
                        ],
                    },
                    {"type": "image", "source": {"type": "url", "url": f"https://x.example/{EMAIL}"}},
                    {"type": "text", "text": "no findings here"},
                ],
            },
        ],
    }


def test_request_masked_everywhere_it_should_be(masker: Masker) -> None:
    body = request_body()
    result = masker.mask_request(body)
    out = result.body
    assert out["system"] == "You help [EMAIL_1]. Never print [AWS_ACCESS_KEY_1]."
    assert out["messages"][0]["content"] == "My key is [AWS_ACCESS_KEY_1] and my mail [EMAIL_1]."
    assistant = out["messages"][1]["content"]
    assert assistant[0]["text"] == "Noted, [EMAIL_1]."
    tool_input = assistant[1]["input"]
    assert tool_input["command"] == "curl -H 'Authorization: token [GITHUB_TOKEN_1]' https://api.github.com"
    assert tool_input["env"] == [{"name": "NOTIFY", "value": "[EMAIL_2]"}, 42, None, True]
    assert tool_input["odd key"] == "[PHONE_1]"
    user = out["messages"][2]["content"]
    assert user[0]["content"] == "sent to [EMAIL_2]"
    assert user[1]["content"][0]["text"] == "card [PAYMENT_CARD_1]"
    # untouched: thinking (its signature must stay valid), images, tools, metadata, other fields
    assert assistant[2] == body["messages"][1]["content"][2]
    assert user[1]["content"][1] == body["messages"][2]["content"][1]["content"][1]
    assert user[2] == body["messages"][2]["content"][2]
    assert out["tools"] == body["tools"]
    assert out["metadata"] == body["metadata"] and out["model"] == body["model"]
    assert out["messages"][2]["content"][3] is body["messages"][2]["content"][3]  # shared, unchanged


def test_json_paths_and_offsets(masker: Masker) -> None:
    body = request_body()
    masked = masker.mask_request(body).masked
    locations = [(m["location"], m["type"], m["placeholder"]) for m in masked]
    assert locations == [
        ("system", "EMAIL", "[EMAIL_1]"),
        ("system", "AWS_ACCESS_KEY", "[AWS_ACCESS_KEY_1]"),
        ("messages[0].content", "AWS_ACCESS_KEY", "[AWS_ACCESS_KEY_1]"),
        ("messages[0].content", "EMAIL", "[EMAIL_1]"),
        ("messages[1].content[0].text", "EMAIL", "[EMAIL_1]"),
        ("messages[1].content[1].input.command", "GITHUB_TOKEN", "[GITHUB_TOKEN_1]"),
        ("messages[1].content[1].input.env[0].value", "EMAIL", "[EMAIL_2]"),
        ('messages[1].content[1].input["odd key"]', "PHONE", "[PHONE_1]"),
        ("messages[2].content[0].content", "EMAIL", "[EMAIL_2]"),
        ("messages[2].content[1].content[0].text", "PAYMENT_CARD", "[PAYMENT_CARD_1]"),
    ]
    # start/end index the original string at that location
    original = {"system": body["system"], "messages[0].content": body["messages"][0]["content"]}
    for m in masked:
        if m["location"] in original:
            value = original[m["location"]][m["start"] : m["end"]]
            assert fingerprint(value, KEY) == m["fingerprint"]
    assert all(m["scope"] == "upstream" for m in masked)


def test_input_never_mutated(masker: Masker) -> None:
    body = request_body()
    before = copy.deepcopy(body)
    result = masker.mask_request(body)
    assert body == before
    assert result.body is not body
    # changing the output does not change the input where it was copied
    result.body["messages"][1]["content"][1]["input"]["command"] = "changed"
    assert body == before


def test_values_never_in_output_nor_records(masker: Masker) -> None:
    result = masker.mask_request(request_body())
    dumped = json.dumps(result.body) + json.dumps(result.masked)
    for value in (AWS, GITHUB, EMAIL2, PHONE, CARD):
        assert value not in dumped
    # EMAIL itself survives only in the thinking block and the image URL, which are not masked
    assert json.dumps(result.masked).count(EMAIL) == 0


def test_masked_values_match_the_avro_record(masker: Masker) -> None:
    schema = fastavro.parse_schema(json.loads(SCHEMA.read_text()))
    records: list[MaskedValue] = masker.mask_request(request_body()).masked
    assert records
    for record in records:
        assert fastavro.validation.validate(record, schema)
        assert set(record) == {"type", "placeholder", "fingerprint", "location", "start", "end", "scope"}


def test_fingerprints_stable_and_keyed(masker: Masker) -> None:
    expected = hmac.new(KEY, AWS.encode(), hashlib.sha256).hexdigest()
    assert fingerprint(AWS, KEY) == expected
    assert masker.fingerprint(AWS) == expected
    assert fingerprint(AWS, b"another key") != expected
    first = masker.mask_text(f"key {AWS}").masked[0]["fingerprint"]
    second = masker.mask_text(f"again: {AWS}").masked[0]["fingerprint"]
    assert first == second == expected
    other = Masker(DetectorSet(), b"another key").mask_text(f"key {AWS}").masked[0]["fingerprint"]
    assert other != expected


def test_placeholders_consistent_within_a_session_and_per_type_counters(masker: Masker) -> None:
    session = masker.session()
    a = session.mask_text(f"{EMAIL} {EMAIL2} {EMAIL} {PHONE}", location="content[0].text")
    assert a.text == "[EMAIL_1] [EMAIL_2] [EMAIL_1] [PHONE_1]"
    b = session.mask_request({"messages": [{"role": "user", "content": f"{EMAIL2} and {AWS}"}]})
    assert b.body["messages"][0]["content"] == "[EMAIL_2] and [AWS_ACCESS_KEY_1]"
    c = session.mask_response({"content": [{"type": "text", "text": f"Hi {EMAIL}"}]})
    assert c.body["content"][0]["text"] == "Hi [EMAIL_1]"
    assert len(session.masked) == len(a.masked) + len(b.masked) + len(c.masked) == 7
    # a fresh session starts over
    assert masker.mask_text(EMAIL2).text == "[EMAIL_1]"


def test_selection_by_category_type_and_scope(masker: Masker) -> None:
    text = f"{AWS} {EMAIL}"
    assert masker.mask_text(text, categories=["secret"]).text == f"[AWS_ACCESS_KEY_1] {EMAIL}"
    assert masker.mask_text(text, categories=["pii"]).text == f"{AWS} [EMAIL_1]"
    assert masker.mask_text(text, types=["EMAIL"]).text == f"{AWS} [EMAIL_1]"
    assert masker.mask_text(text, types=[]).text == text
    record = masker.mask_text(text, categories=["pii"], scope="record")
    assert [m["scope"] for m in record.masked] == ["record"]
    with pytest.raises(ValueError, match="scope"):
        masker.mask_text(text, scope="everywhere")  # type: ignore[arg-type]
    with pytest.raises(DetectorError):
        masker.mask_text(text, categories=["secrets"])
    with pytest.raises(DetectorError):
        masker.mask_text(text, types=["NOT_A_TYPE"])


def test_layers_from_one_scan_equal_two_passes(masker: Masker) -> None:
    body = request_body()
    layered = masker.session().mask_request_layers(body, upstream=SECRET_TYPES, record=PII_TYPES)
    session = masker.session()
    up = session.mask_request(body, types=SECRET_TYPES, scope="upstream")
    rec = session.mask_request(up.body, types=PII_TYPES, scope="record")
    assert layered.upstream == up.body
    assert layered.record == rec.body
    # the model sees PII (a rule allowed it) but never the secrets; the record sees neither
    upstream_json, record_json = json.dumps(layered.upstream), json.dumps(layered.record)
    assert AWS not in upstream_json and GITHUB not in upstream_json and EMAIL2 in upstream_json
    assert AWS not in record_json and EMAIL2 not in record_json
    scopes = {(m["type"], m["scope"]) for m in layered.masked}
    assert ("AWS_ACCESS_KEY", "upstream") in scopes and ("EMAIL", "record") in scopes
    assert len(layered.masked) == len(up.masked) + len(rec.masked)


def test_response_masking(masker: Masker) -> None:
    response = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "text", "text": f"Your key {AWS} is exposed; email {EMAIL}."},
            {
                "type": "tool_use",
                "id": "toolu_9",
                "name": "search",
                "input": {"query": f"who is {EMAIL}", "n": 3},
            },
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": GITHUB}},
        ],
        "usage": {"input_tokens": 10, "output_tokens": 20},
    }
    before = copy.deepcopy(response)
    result = masker.mask_response(response)
    assert response == before
    content = result.body["content"]
    assert content[0]["text"] == "Your key [AWS_ACCESS_KEY_1] is exposed; email [EMAIL_1]."
    assert content[1]["input"] == {"query": "who is [EMAIL_1]", "n": 3}
    assert content[2]["input"] == {"query": "[GITHUB_TOKEN_1]"}
    assert result.body["usage"] == response["usage"]
    assert [m["location"] for m in result.masked] == [
        "content[0].text",
        "content[0].text",
        "content[1].input.query",
        "content[2].input.query",
    ]
    layered = masker.session().mask_response_layers(response, upstream=SECRET_TYPES, record=PII_TYPES)
    assert EMAIL in layered.upstream["content"][0]["text"]
    assert EMAIL not in json.dumps(layered.record)


def test_nothing_to_mask_keeps_structure_shared(masker: Masker) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    result = masker.mask_request(body)
    assert not result.changed
    assert result.body == body and result.body is not body
    assert result.body["messages"] is body["messages"]


def test_deeply_nested_tool_input_fails_closed(masker: Masker) -> None:
    nested: Any = "leaf"
    for _ in range(300):
        nested = {"a": nested}
    body = {
        "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": nested}]}
        ]
    }
    with pytest.raises(MaskingError, match="nested deeper") as info:
        masker.mask_request(body)
    assert "leaf" not in str(info.value)


def test_malformed_shapes_pass_through(masker: Masker) -> None:
    body: dict[str, Any] = {
        "system": 42,
        "messages": [
            None,
            "x",
            {"role": "user"},
            {"role": "user", "content": [None, {"type": "text", "text": 7}]},
        ],
    }
    assert masker.mask_request(body).body == body
    assert masker.mask_response({"content": None}).body == {"content": None}


def test_masker_needs_a_key() -> None:
    with pytest.raises(ValueError, match="fingerprint_key"):
        Masker(DetectorSet(), b"")


def _documents(count: int) -> list[str]:
    """Generated documents holding every detector type (the benchmark corpus templates)."""
    rng = random.Random(11)
    docs = []
    for i in range(count):
        type_ = sorted(templates.TEMPLATES)[i % len(templates.TEMPLATES)]
        text, _ = templates.render(rng.choice(templates.TEMPLATES[type_]), rng)
        docs.append(text + " " + fakes.email(rng) + " " + fakes.phone(rng))
    return docs


def test_masking_is_idempotent_safe(masker: Masker) -> None:
    """Property: whatever was masked, masking the result again finds nothing new."""
    for text in _documents(300):
        once = masker.mask_text(text)
        assert once.masked, text[:80]
        twice = masker.mask_text(once.text)
        assert twice.masked == [], (text[:80], [m["type"] for m in twice.masked])
        assert twice.text == once.text
        for record in once.masked:
            assert record["placeholder"] in once.text


def test_masking_a_masked_request_finds_nothing(masker: Masker) -> None:
    once = masker.mask_request(request_body())
    again = masker.mask_request(once.body)
    assert again.masked == []
    assert again.body == once.body


def test_a_seeded_session_reuses_the_request_placeholders(masker: Masker) -> None:
    """The forwarder seeds its response session with the decision's masked values: a value the
    model echoes gets the request's placeholder, a new one the next number."""
    request = masker.session().mask_request(
        {"messages": [{"role": "user", "content": "mail ann@example.com and bob@example.com"}]},
        types={"EMAIL"},
    )
    assert [m["placeholder"] for m in request.masked] == ["[EMAIL_1]", "[EMAIL_2]"]
    session = masker.session(seed=request.masked)
    answer = session.mask_text("writing to bob@example.com, cc carl@example.com", types={"EMAIL"})
    assert answer.text == "writing to [EMAIL_2], cc [EMAIL_3]"


def test_thinking_is_masked_in_the_record_only(masker: Masker) -> None:
    """Thinking blocks carry the API's signature: the model and the caller get them as written,
    the record gets them masked (and reports each value with scope ``record``)."""
    response = {
        "type": "message",
        "content": [
            {"type": "thinking", "thinking": "the user is ann@example.com", "signature": "sig"},
            {"type": "text", "text": "Hello ann@example.com"},
        ],
    }
    layers = masker.session().mask_response_layers(response, upstream={"EMAIL"}, record=set())
    assert layers.upstream["content"][0]["thinking"] == "the user is ann@example.com"
    assert layers.upstream["content"][1]["text"] == "Hello [EMAIL_1]"
    assert layers.record["content"][0] == {
        "type": "thinking",
        "thinking": "the user is [EMAIL_1]",
        "signature": "sig",
    }
    assert sorted((m["location"], m["scope"]) for m in layers.masked) == [
        ("content[0].thinking", "record"),
        ("content[1].text", "upstream"),
    ]
