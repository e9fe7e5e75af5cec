"""Policy decisions (``services/policy/handlers.py``) and bundles (``skillgate/policy/bundle.py``).

Fail closed: a bundle this engine cannot fully apply is refused with an error naming the file and
the field; when policy cannot decide, the call fails with a 503 and is never forwarded.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from services.policy.handlers import decide, decided_event, failure_events, refusal_reply
from skillgate import events
from skillgate.codec import AvroCodec
from skillgate.events import CallSubmitted, ReplyTo
from skillgate.policy.bundle import DEFAULT_BUNDLE, Bundle, BundleError, load_bundle, parse_bundle
from skillgate.policy.engine import CallContext, Verdict, evaluate
from skillgate.policy.masking import Masker
from tests import factories

CODEC = AvroCodec()
REPLY_TO = ReplyTo(topic="skillgate.calls.replies", partition=0, instance="ingress-1")
BODY = orjson.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "summarise this"}],
        "unknown_future_field": {"x": 1},
    }
)


def _submitted(
    reply_to: ReplyTo | None = REPLY_TO, body: bytes = BODY, upstream: str | None = None
) -> CallSubmitted:
    return factories.call_submitted(
        session_id="sess-7",
        reply_to=reply_to,
        headers={"anthropic-version": "2023-06-01", "x-foo": "bar"},
        body=body,
        upstream=upstream,
    )


def _write(tmp_path: Path, text: str, name: str = "bundle.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def default_bundle() -> Bundle:
    return load_bundle(DEFAULT_BUNDLE)


@pytest.fixture(scope="module")
def masker(default_bundle: Bundle) -> Masker:
    return Masker(default_bundle.detectors, b"unit-test-fingerprint-key")


@pytest.fixture
def deny_bundle(tmp_path: Path) -> Bundle:
    return load_bundle(_write(tmp_path, "name: lockdown\nversion: '7'\ndefault_action: deny\n"))


# ------------------------------------------------------------------------- allow


def test_default_bundle_loads(default_bundle: Bundle) -> None:
    assert DEFAULT_BUNDLE.name == "default.yaml"
    assert default_bundle.label == "default@2026.11.21-2"
    assert default_bundle.default_action == "allow" and default_bundle.fail_open is False
    assert [r.rule.id for r in default_bundle.rules] == [
        "mask-secrets",
        "mask-pii-in-responses",
        "mask-pii-in-record",
        "approve-large-prompts",
    ]
    assert {t.rule.id for t in default_bundle.tool_rules} >= {"destructive-shell", "pipe-download-to-shell"}
    assert len(default_bundle.sha256) == 64
    assert default_bundle.source == DEFAULT_BUNDLE.read_text()


def test_default_bundle_allows_and_records_its_label(default_bundle: Bundle, masker: Masker) -> None:
    submitted = _submitted()
    verdict = decide(submitted, default_bundle, masker)
    decided = decided_event(submitted, default_bundle, verdict)
    assert decided["decision"] == "allow"
    assert decided["bundle_version"] == "default@2026.11.21-2"
    assert default_bundle.label in decided["reason"]
    assert decided["body"] == BODY  # forwarded byte for byte when nothing is masked
    assert decided["record_body"] is None
    assert decided["rule_ids"] == ["mask-secrets", "mask-pii-in-responses", "mask-pii-in-record"]
    assert "EMAIL" in decided["response_mask_upstream"] and "EMAIL" not in decided["response_mask_record"]
    assert decided["upstream"] == "default"
    assert decided["status"] == 0 and decided["error_type"] is None
    assert decided["call_id"] == submitted["call_id"]
    assert decided["session_id"] == "sess-7"
    assert decided["identity"] == submitted["identity"]
    assert decided["headers"] == submitted["headers"]
    assert decided["reply_to"] == REPLY_TO
    assert decided["submitted_at"] == submitted["time"]
    assert decided["fail_open"] is False
    assert refusal_reply(decided) is None
    assert CODEC.decode(CODEC.encode(events.CALL_DECIDED, decided)) == (events.CALL_DECIDED, dict(decided))


def test_the_callers_upstream_choice_is_kept_when_the_bundle_offers_it() -> None:
    bundle = parse_bundle('name: b\nversion: "1"\ncaller_upstreams: [default, eu]\n')
    submitted = _submitted(upstream="eu")
    assert decided_event(submitted, bundle, decide(submitted, bundle))["upstream"] == "eu"


def test_the_default_bundle_offers_callers_only_the_default_upstream(
    default_bundle: Bundle, masker: Masker
) -> None:
    submitted = _submitted(upstream="eu")
    decided = decided_event(submitted, default_bundle, decide(submitted, default_bundle, masker))
    assert decided["decision"] == "deny" and decided["body"] is None


def test_decided_ids_derive_from_the_call_id(default_bundle: Bundle, masker: Masker) -> None:
    submitted = _submitted()
    first = decided_event(submitted, default_bundle, decide(submitted, default_bundle, masker))
    again = decided_event(submitted, default_bundle, decide(submitted, default_bundle, masker))
    assert first["event_id"] == again["event_id"] == events.derived_event_id(submitted["call_id"], "decided")
    other = _submitted()
    assert (
        decided_event(other, default_bundle, decide(other, default_bundle, masker))["event_id"]
        != first["event_id"]
    )


# -------------------------------------------------------------------------- deny


def test_deny_bundle_denies_with_a_403_refusal(deny_bundle: Bundle) -> None:
    submitted = _submitted()
    decided = decided_event(submitted, deny_bundle, decide(submitted, deny_bundle))
    assert decided["decision"] == "deny"
    assert decided["status"] == 403
    assert decided["error_type"] == "permission_error"
    assert decided["body"] is None  # nothing to forward
    assert decided["bundle_version"] == "lockdown@7"
    reply = refusal_reply(decided)
    assert reply is not None
    assert reply["status"] == 403
    assert reply["terminal_state"] == "denied"
    assert reply["event_id"] == events.derived_event_id(submitted["call_id"], "reply")
    assert reply["headers"]["content-type"] == "application/json"
    doc = orjson.loads(reply["body"])
    assert doc == {
        "type": "error",
        "error": {"type": "permission_error", "message": decided["reason"]},
        "request_id": reply["headers"]["request-id"],
    }
    assert "lockdown@7" in doc["error"]["message"]
    assert CODEC.decode(CODEC.encode(events.CALL_REPLY, reply))[0] == events.CALL_REPLY


def test_deny_without_a_waiting_caller_has_no_reply(deny_bundle: Bundle) -> None:
    submitted = _submitted(reply_to=None)
    decided = decided_event(submitted, deny_bundle, decide(submitted, deny_bundle))
    assert decided["decision"] == "deny"
    assert refusal_reply(decided) is None


# ------------------------------------------------------------------------- bundles


def test_unknown_rule_field_is_refused_naming_file_line_and_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "name: strict\nrules:\n  - id: no-bash\n    match: {tool: bash}\n    action: deny\n"
    )
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert f"{path}:4:" in message
    assert "`rules[0].match.tool`" in message


def test_pattern_re2_refuses_is_a_validation_error(tmp_path: Path) -> None:
    # A backreference: RE2 (linear time) refuses it, so the bundle does not load.
    text = "name: s\nrules:\n  - id: r\n    match:\n      content: ['(a)\\1']\n    action: deny\n"
    assert "(a)\\1" in text
    path = _write(tmp_path, text)
    with pytest.raises(BundleError, match=r"bundle.yaml:5: field `rules\[0\].match.content\[0\]`: RE2"):
        load_bundle(path)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("version: '1'\n", "`name`"),
        ("name: ''\n", "`name`"),
        ("name: 5\n", "`name`"),
        ("name: x\nversion: [1, 2]\n", "`version`"),
        ("name: x\nversion: {a: 1}\n", "`version`"),
        ("name: x\ndefault_action: maybe\n", "`default_action`"),
        ("name: x\ndefault_action: require_approval\n", "`default_action`"),
        ("name: x\nrules: {a: 1}\n", "`rules`"),
        ("name: x\nrules: not-a-list\n", "`rules`"),
    ],
)
def test_bundle_errors_name_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)


@pytest.mark.parametrize("text", ["name: [unclosed\n", "name: x\n  bad: indent\n- list", "\tname: x\n"])
def test_invalid_yaml_is_refused_naming_the_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n", "42\n"])
def test_a_bundle_must_be_a_mapping(text: str) -> None:
    with pytest.raises(BundleError, match="<inline>: a bundle is a mapping"):
        parse_bundle(text, "<inline>")


def test_unreadable_bundle_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(BundleError) as info:
        load_bundle(missing)
    assert str(missing) in str(info.value)
    assert "cannot read" in str(info.value)


def test_version_defaults_to_the_content_hash() -> None:
    bundle = parse_bundle("name: quick\n")
    assert bundle.version == bundle.sha256[:12]
    assert bundle.label == f"quick@{bundle.sha256[:12]}"
    assert bundle.default_action == "allow"
    assert parse_bundle("name: quick\n# edited\n").version != bundle.version


def test_empty_rules_are_accepted() -> None:
    assert parse_bundle("name: a\nrules: []\n").rules == ()
    assert parse_bundle("name: a\nrules:\n").rules == ()


def test_numeric_version_is_refused_and_quoted_is_recorded_as_written() -> None:
    # YAML would read 1.10 as the float 1.1: two versions would record alike, so it is refused.
    with pytest.raises(BundleError, match="version"):
        parse_bundle("name: a\nversion: 1.10\n")
    assert parse_bundle('name: a\nversion: "1.10"\n').label == "a@1.10"


# ------------------------------------------------------------------- fail closed


def test_decide_raises_on_a_body_it_cannot_read(default_bundle: Bundle) -> None:
    with pytest.raises(ValueError):
        decide(_submitted(body=b"{not json"), default_bundle)
    with pytest.raises(ValueError):
        decide(_submitted(body=b"[1]"), default_bundle)


def test_failure_events_fail_closed_with_a_503(default_bundle: Bundle) -> None:
    submitted = _submitted()
    failed, reply = failure_events(submitted, default_bundle.label, "request body is not a JSON object")
    assert failed["stage"] == "policy"
    assert failed["status"] == 503
    assert failed["error_type"] == "api_error"
    assert "request body is not a JSON object" in failed["message"]
    assert "not forwarded" in failed["message"]
    assert failed["upstream"] is None
    assert failed["attempts"] == []
    assert failed["body"] is None
    assert failed["bundle_version"] == default_bundle.label
    assert failed["event_id"] == events.derived_event_id(submitted["call_id"], "failed")
    assert failed["submitted_at"] == submitted["time"]
    assert CODEC.decode(CODEC.encode(events.CALL_FAILED, failed))[1] == dict(failed)

    assert reply is not None
    assert reply["status"] == 503
    assert reply["terminal_state"] == "failed"
    doc = orjson.loads(reply["body"])
    assert doc["type"] == "error"
    assert doc["error"] == {"type": "api_error", "message": failed["message"]}
    assert doc["request_id"] == reply["headers"]["request-id"]
    assert CODEC.decode(CODEC.encode(events.CALL_REPLY, reply))[0] == events.CALL_REPLY


def test_failure_events_without_a_bundle_or_a_waiting_caller() -> None:
    failed, reply = failure_events(_submitted(reply_to=None), None, "no bundle loaded")
    assert failed["bundle_version"] is None
    assert failed["stage"] == "policy"
    assert reply is None


def test_caller_may_only_choose_an_upstream_the_bundle_offers() -> None:
    bundle = parse_bundle('name: b\nversion: "1"\ncaller_upstreams: [default, batch]\n')

    def run(upstream: str) -> Verdict:
        ctx = CallContext(identity=factories.identity(), request={}, body=b"{}", upstream=upstream)
        return evaluate(bundle, ctx)

    assert run("batch").decision == "allow" and run("batch").upstream == "batch"
    refused = run("other")
    assert refused.decision == "deny" and refused.status == 403 and "`other`" in refused.reason
    assert refused.body is None and refused.record_body == b"{}"
    with pytest.raises(BundleError, match="caller_upstreams"):
        parse_bundle("name: b\ncaller_upstreams: default\n")
