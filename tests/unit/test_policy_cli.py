"""``skillgate policy check|test|publish`` and the argument handling of ``skillgate audit``."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from services.cli import policy
from services.cli.main import main
from services.recorder.cli import read_secret_value
from skillgate.config import KafkaSettings
from skillgate.policy.bundle import DEFAULT_BUNDLE

EXAMPLE_CASES = DEFAULT_BUNDLE.parent / "examples" / "default-cases.yaml"
FAKE_KEY = "AKIAZ7QW3RT5YH2KXM4N"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def run_check(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = policy.check_command(path, out, err)
    return code, out.getvalue(), err.getvalue()


def run_cases(bundle: Path, cases: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = policy.run_cases_command(bundle, cases, out, err)
    return code, out.getvalue(), err.getvalue()


RATE_BUNDLE = """\
name: limits
version: "1"
rules:
  - id: three-per-minute
    match: {groups: [interns]}
    action: rate_limit
    rate_limit: {requests: 3, window_seconds: 60, by: user}
  - id: tag-eng
    match: {groups: [eng]}
    action: tag
    tags: [engineering]
"""


# -- check ----------------------------------------------------------------------------------------


def test_check_accepts_the_default_bundle() -> None:
    code, out, err = run_check(DEFAULT_BUNDLE)
    assert code == 0, err
    assert out.count("\n") == 1  # one summary line
    assert "ok: bundle default@" in out and "rule(s)" in out and "fail closed" in out


def test_check_names_file_line_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.yaml",
        """\
        name: bad
        version: "1"
        rules:
          - id: ok
            action: allow
          - id: wrong-scope
            action: mask
            mask: {entities: [secret], scope: everywhere}
        """,
    )
    code, out, err = run_check(path)
    assert code == 1 and out == ""
    assert f"{path}:8: field `rules[1].mask.scope`" in err


def test_check_refuses_a_pattern_re2_rejects(tmp_path: Path) -> None:
    path = write(
        tmp_path / "slow.yaml",
        """\
        name: slow
        rules:
          - id: backref
            match: {content: ['(a+)\\1']}
            action: deny
        """,
    )
    code, _, err = run_check(path)
    assert code == 1
    assert f"{path}:4: field `rules[0].match.content[0]`" in err and "RE2" in err


def test_check_of_a_missing_file(tmp_path: Path) -> None:
    code, _, err = run_check(tmp_path / "nope.yaml")
    assert code == 1 and "cannot read" in err


def test_main_wires_policy_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(DEFAULT_BUNDLE)]) == 0
    assert "ok: bundle default@" in capsys.readouterr().out


# -- test -----------------------------------------------------------------------------------------


def test_example_cases_pass_against_the_default_bundle() -> None:
    code, out, err = run_cases(DEFAULT_BUNDLE, EXAMPLE_CASES)
    assert code == 0, out + err
    assert "FAIL" not in out and " 0 failed" in out
    # Each decision is shown with its rules, reason and masked types, never the values.
    assert "[AWS_ACCESS_KEY_1] at messages[0].content (upstream)" in out
    assert "[EMAIL_1] at messages[0].content (record)" in out
    assert "decision: require_approval" in out and "approve-large-prompts" in out
    assert "decision: deny (status 403)" in out
    assert FAKE_KEY not in out and "jane.doe@example.com" not in out


def test_a_failing_case_exits_1_and_says_why(tmp_path: Path) -> None:
    cases = write(
        tmp_path / "cases.yaml",
        f"""\
        - name: secret expected to be denied
          request: {{model: m, max_tokens: 8, messages: [{{role: user, content: "key {FAKE_KEY}"}}]}}
          expect: {{decision: deny, masked: ["AWS_ACCESS_KEY:record"], rules: [mask-secrets]}}
        - name: this one passes
          request: {{model: m, max_tokens: 8, messages: [{{role: user, content: "hi"}}]}}
          expect: {{decision: allow}}
        """,
    )
    code, out, _ = run_cases(DEFAULT_BUNDLE, cases)
    assert code == 1
    assert "FAIL  secret expected to be denied" in out and "PASS  this one passes" in out
    assert "!! decision: expected deny, got allow" in out
    assert "!! masked: expected [AWS_ACCESS_KEY:record], got [AWS_ACCESS_KEY:upstream]" in out
    assert "!! rules: expected [mask-secrets], got [mask-secrets, mask-pii-in-responses" in out
    assert "1 passed, 1 failed" in out
    assert FAKE_KEY not in out


def test_rate_limits_by_repeating_a_case(tmp_path: Path) -> None:
    bundle = write(tmp_path / "limits.yaml", RATE_BUNDLE)
    cases = write(
        tmp_path / "cases.yaml",
        """\
        cases:
          - name: the third call in a minute is fine
            identity: {subject: ivan, groups: [interns]}
            request: {model: m, max_tokens: 8, messages: [{role: user, content: "hi"}]}
            repeat: 3
            expect: {decision: allow, rules: [three-per-minute]}
          - name: the fourth is limited
            identity: {subject: ivan, groups: [interns]}
            request: {model: m, max_tokens: 8, messages: [{role: user, content: "hi"}]}
            repeat: 4
            expect: {decision: rate_limited, reason: "more than 3 requests per 60 s"}
          - name: engineers are tagged, never limited
            identity: {subject: erin, groups: [eng]}
            request: {model: m, max_tokens: 8, messages: [{role: user, content: "hi"}]}
            repeat: 10
            expect: {decision: allow, rules: [tag-eng], tags: [engineering], masked: []}
        """,
    )
    code, out, err = run_cases(bundle, cases)
    assert code == 0, out + err
    assert "runs:     allow x3, rate_limited x1 (the last one is checked)" in out
    assert "3 passed, 0 failed" in out


def test_upstream_and_time_come_from_the_case(tmp_path: Path) -> None:
    bundle = write(
        tmp_path / "b.yaml",
        """\
        name: hours
        caller_upstreams: [default, batch]
        rules:
          - id: weekend-off
            match: {time: {days: [sat, sun]}}
            action: deny
            reason: closed at weekends
        """,
    )
    cases = write(
        tmp_path / "cases.yaml",
        """\
        - name: saturday
          now: "2026-11-21T10:00:00Z"
          request: {model: m, max_tokens: 8, messages: [{role: user, content: "hi"}]}
          expect: {decision: deny, rules: [weekend-off], reason: closed at weekends}
        - name: monday on the batch connection
          now: "2026-11-23T10:00:00Z"
          headers: {X-Skillgate-Upstream: batch}
          request: {model: m, max_tokens: 8, messages: [{role: user, content: "hi"}]}
          expect: {decision: allow, rules: [], upstream: batch}
        """,
    )
    code, out, err = run_cases(bundle, cases)
    assert code == 0, out + err


def test_an_invalid_cases_file_names_file_line_and_field(tmp_path: Path) -> None:
    cases = write(
        tmp_path / "cases.yaml",
        """\
        - name: fine
          request: {messages: []}
          expect: {decision: allow}
        - name: typo
          request: {messages: []}
          expect:
            decision: allowed
        """,
    )
    code, out, err = run_cases(DEFAULT_BUNDLE, cases)
    assert code == 1 and out == ""
    assert f"{cases}:7: case 2, field `expect.decision`" in err


def test_an_invalid_bundle_fails_the_test_command(tmp_path: Path) -> None:
    bundle = write(tmp_path / "b.yaml", "name: x\nrules:\n  - id: a\n    action: route\n")
    code, _, err = run_cases(bundle, EXAMPLE_CASES)
    assert code == 1 and f"{bundle}:3: field `rules[0]`" in err


# -- publish --------------------------------------------------------------------------------------


def test_publish_refuses_an_invalid_bundle_before_kafka(tmp_path: Path) -> None:
    bundle = write(tmp_path / "b.yaml", "name: x\nrules:\n  - id: a\n    action: mask\n")
    out, err = io.StringIO(), io.StringIO()
    # Nothing listens on port 1: the bundle must be refused before any connection is tried.
    kafka = KafkaSettings(bootstrap="127.0.0.1:1")
    assert policy.publish_command(bundle, "ops", kafka, out, err) == 1
    assert f"{bundle}:3: field `rules[0]`" in err.getvalue()


def test_publish_reports_an_unreachable_kafka(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    kafka = KafkaSettings(bootstrap="127.0.0.1:1")
    assert policy.publish_command(DEFAULT_BUNDLE, "ops", kafka, out, err) == 2
    assert "cannot publish bundle default@" in err.getvalue() and "127.0.0.1:1" in err.getvalue()


def test_publisher_identity() -> None:
    ident = policy.publisher_identity("ops-alice")
    assert ident["subject"] == "ops-alice" and ident["issuer"] == policy.CLI_ISSUER
    assert policy.publisher_identity(None)["subject"]  # the login name


# -- audit find-secret ----------------------------------------------------------------------------


def test_find_secret_reads_the_value_from_stdin_when_asked() -> None:
    assert read_secret_value("-", io.StringIO(f"{FAKE_KEY}\n")) == FAKE_KEY
    assert read_secret_value(FAKE_KEY, io.StringIO("ignored")) == FAKE_KEY
    assert read_secret_value("-", io.StringIO("")) is None


def test_the_command_line_keeps_running_the_service_and_adds_the_tools() -> None:
    from services.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["policy"]).policy_action is None  # `skillgate policy` runs the service
    args = parser.parse_args(["policy", "publish", "b.yaml", "--as", "ops"])
    assert (args.policy_action, args.file, args.publisher) == ("publish", "b.yaml", "ops")
    args = parser.parse_args(["policy", "test", "b.yaml", "c.yaml"])
    assert (args.policy_action, args.file, args.cases) == ("test", "b.yaml", "c.yaml")
    args = parser.parse_args(["audit", "find-secret", "-", "--format", "json"])
    assert (args.audit_action, args.value, args.format) == ("find-secret", "-", "json")
