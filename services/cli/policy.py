"""``skillgate policy check|test|publish``: validate a bundle, run example calls, publish it.

* ``check FILE``: validate the bundle; one summary line and exit 0, or the error (naming the
  file, the line and the field) and exit 1.
* ``test FILE CASES.yaml``: evaluate example calls against the bundle with the same engine,
  detectors and masking the policy service uses, print each decision and whether it is what the
  case expects; exit 1 if any case fails (or the bundle or the cases file is invalid).
* ``publish FILE [--as USER]``: validate, then publish to ``policy.bundles`` on the Kafka
  cluster at ``SKILLGATE_KAFKA_BOOTSTRAP``; running policy and forwarder replicas pick it up
  without a restart. Exit 1 for an invalid bundle, 2 when Kafka does not acknowledge it.

Cases file (YAML), a list of cases (or a mapping with a ``cases`` list)::

    - name: a secret is masked before the model sees it
      identity: {subject: alice, groups: [eng]}       # also issuer, username, email, client_id
      request: {model: claude-sonnet-4-5, max_tokens: 64,
                messages: [{role: user, content: "key AKIAIOSFODNN7EXAMPLE"}]}
      headers: {anthropic-beta: "..."}                 # optional; x-skillgate-upstream too
      upstream: default                                # optional, else x-skillgate-upstream
      now: "2026-11-23T09:30:00Z"                      # optional, for `time` conditions
      repeat: 1                                        # evaluate N times (rate limits)
      expect:
        decision: allow                                # allow|deny|require_approval|rate_limited
        rules: [mask-secrets]                          # optional: exactly the matched rule ids
        masked: [AWS_ACCESS_KEY:upstream]              # optional: TYPE or TYPE:scope, exactly
        reason: substring of the reason                # optional
        tags: [..]                                     # optional, exactly
        upstream: default                              # optional

Values found in the cases are never printed, only their types and placeholders.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import secrets
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from skillgate.config import KafkaSettings
from skillgate.events import Identity
from skillgate.policy.bundle import Bundle, BundleError, load_bundle
from skillgate.policy.detectors import CATEGORY_CUSTOM, CATEGORY_PII, CATEGORY_SECRET, DetectorSet
from skillgate.policy.engine import CallContext, MemoryRateCounter, Verdict, evaluate
from skillgate.policy.masking import Masker

#: Header a caller uses to ask for an upstream connection (as the ingress reads it).
UPSTREAM_HEADER = "x-skillgate-upstream"
#: The issuer recorded for bundles published from this command line.
CLI_ISSUER = "skillgate-cli"


# -- check ----------------------------------------------------------------------------------------


def summary(bundle: Bundle, origin: str) -> str:
    """One line describing a valid bundle."""
    actions = Counter(r.rule.action for r in bundle.rules)
    parts = ", ".join(f"{n} {a}" for a, n in sorted(actions.items()))
    custom = len(bundle.detectors.types_for(categories=["custom"]))
    return (
        f"{origin}: ok: bundle {bundle.label}, {len(bundle.rules)} rule(s)"
        + (f" ({parts})" if parts else "")
        + f", {len(bundle.tool_rules)} tool rule(s), {custom} custom detector(s), "
        f"default {bundle.default_action}, fail {'open' if bundle.fail_open else 'closed'}, "
        f"sha256 {bundle.sha256[:12]}"
    )


def check_command(path: Path, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate the bundle at ``path``: 0 and a summary, or 1 and the error."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        print(f"error: {exc}", file=err)
        return 1
    print(summary(bundle, str(path)), file=out)
    return 0


# -- test -----------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaseIdentity(_Strict):
    """Who makes the call (what the ingress would have verified)."""

    subject: str = "test-user"
    issuer: str = "https://idp.example"
    username: str | None = None
    email: str | None = None
    groups: list[str] = Field(default_factory=list)
    client_id: str | None = None
    token_id: str | None = None

    def to_identity(self) -> Identity:
        """The identity as events carry it (username defaults to the subject)."""
        return Identity(
            subject=self.subject,
            issuer=self.issuer,
            username=self.username if self.username is not None else self.subject,
            email=self.email,
            groups=list(self.groups),
            client_id=self.client_id,
            token_id=self.token_id,
        )


Decision = Literal["allow", "deny", "require_approval", "rate_limited"]


class Expect(_Strict):
    """What a case expects of the decision (of its last repetition)."""

    decision: Decision
    rules: list[str] | None = Field(None, description="Exactly these matched rule ids, in order.")
    masked: list[str] | None = Field(None, description="Exactly these masked types (`TYPE` or `TYPE:scope`).")
    reason: str | None = Field(None, description="A substring of the reason.")
    tags: list[str] | None = None
    upstream: str | None = None

    @field_validator("masked")
    @classmethod
    def _scopes(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            _, _, scope = item.partition(":")
            if scope not in ("", "upstream", "record"):
                raise ValueError(f"`{item}`: the scope after `:` is `upstream` or `record`")
        return value


class Case(_Strict):
    """One example call and its expected decision."""

    name: str = Field(min_length=1)
    identity: CaseIdentity = Field(default_factory=CaseIdentity)
    request: dict[str, Any]
    headers: dict[str, str] = Field(default_factory=dict)
    upstream: str | None = None
    now: datetime | None = None
    repeat: int = Field(1, ge=1, le=100_000)
    expect: Expect


class CasesError(ValueError):
    """A cases file that cannot be read; the message names the file, line and field."""


def _line_of(root: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None
            )
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        if node is None:
            return None
    return node.start_mark.line + 1 if node is not None else None


def load_cases(path: Path) -> list[Case]:
    """Read and validate a cases file, or raise :class:`CasesError` naming file:line and field."""
    try:
        source = path.read_text()
    except OSError as exc:
        raise CasesError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        root = yaml.compose(source)
        raw = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise CasesError(f"{path}: not valid YAML: {exc}") from exc
    prefix: list[int | str] = []
    if isinstance(raw, dict) and set(raw) == {"cases"}:
        raw, prefix = raw["cases"], ["cases"]
    if not isinstance(raw, list) or not raw:
        raise CasesError(f"{path}: a cases file is a non-empty list of cases (or `cases:` with one)")
    cases: list[Case] = []
    for i, item in enumerate(raw):
        try:
            cases.append(Case.model_validate(item))
        except ValidationError as exc:
            err = exc.errors(include_input=False, include_url=False)[0]
            loc = [*prefix, i, *err["loc"]]
            line = _line_of(root, loc)
            field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[len(prefix) + 1 :])
            where = f"{path}:{line}" if line else str(path)
            msg = err["msg"].removeprefix("Value error, ")
            raise CasesError(
                f"{where}: case {i + 1}, field `{field.lstrip('.') or '(case)'}`: {msg}"
            ) from None
    return cases


def _context(case: Case) -> CallContext:
    headers = {k.lower(): v for k, v in case.headers.items()}
    return CallContext(
        identity=case.identity.to_identity(),
        request=case.request,
        body=orjson.dumps(case.request),
        headers=headers,
        upstream=case.upstream if case.upstream is not None else headers.get(UPSTREAM_HEADER),
        now=case.now,
    )


def _masked_items(verdict: Verdict) -> list[tuple[str, str]]:
    return sorted({(m["type"], m["scope"]) for m in verdict.masked})


def failures(expect: Expect, verdict: Verdict) -> list[str]:
    """How ``verdict`` differs from ``expect`` (empty: the case passes)."""
    problems: list[str] = []
    if verdict.decision != expect.decision:
        problems.append(f"decision: expected {expect.decision}, got {verdict.decision}")
    if expect.rules is not None and verdict.rule_ids != expect.rules:
        problems.append(f"rules: expected [{', '.join(expect.rules)}], got [{', '.join(verdict.rule_ids)}]")
    if expect.masked is not None:
        actual = _masked_items(verdict)
        want_types = sorted({m.partition(":")[0] for m in expect.masked})
        got_types = sorted({t for t, _ in actual})
        missing_scoped = [m for m in expect.masked if ":" in m and tuple(m.split(":", 1)) not in set(actual)]
        if want_types != got_types or missing_scoped:
            got = ", ".join(f"{t}:{s}" for t, s in actual) or "nothing"
            problems.append(f"masked: expected [{', '.join(expect.masked)}], got [{got}]")
    if expect.reason is not None and expect.reason not in verdict.reason:
        problems.append(f"reason: expected it to contain {expect.reason!r}")
    if expect.tags is not None and sorted(verdict.tags) != sorted(expect.tags):
        problems.append(f"tags: expected [{', '.join(expect.tags)}], got [{', '.join(verdict.tags)}]")
    if expect.upstream is not None and verdict.upstream != expect.upstream:
        problems.append(f"upstream: expected {expect.upstream}, got {verdict.upstream}")
    return problems


def compact_types(types: Sequence[str], detectors: DetectorSet) -> list[str]:
    """Detector types with every complete category shown as its name (``all secret``...)."""
    left = set(types)
    out: list[str] = []
    for category in (CATEGORY_SECRET, CATEGORY_PII, CATEGORY_CUSTOM):
        members = detectors.types_for(categories=[category])
        if members and members <= left:
            out.append(f"all {category}")
            left -= members
    return out + sorted(left)


def describe(verdict: Verdict, detectors: DetectorSet | None = None) -> list[str]:
    """Lines explaining a verdict: rules, reason, masked values (types and places, never values)."""
    detectors = detectors or DetectorSet()
    lines = [
        f"decision: {verdict.decision}" + (f" (status {verdict.status})" if verdict.status else ""),
        f"rules:    {', '.join(verdict.rule_ids) or '(none matched)'}",
        f"reason:   {verdict.reason}",
    ]
    if verdict.masked:
        masked = ", ".join(f"{m['placeholder']} at {m['location']} ({m['scope']})" for m in verdict.masked)
        lines.append(f"masked:   {masked}")
    up = verdict.response_mask_upstream
    rec = [t for t in verdict.response_mask_record if t not in up]
    response = [f"{t} (upstream)" for t in compact_types(up, detectors)]
    response += [f"{t} (record)" for t in compact_types(rec, detectors)]
    if response:
        lines.append(f"response: will mask {', '.join(response)}")
    if verdict.tags:
        lines.append(f"tags:     {', '.join(verdict.tags)}")
    if verdict.upstream != "default":
        lines.append(f"upstream: {verdict.upstream}")
    if verdict.approval is not None:
        a = verdict.approval
        lines.append(f"approval: {a.quorum} of [{', '.join(a.groups)}] within {a.timeout_seconds} s")
    return lines


def run_cases_command(
    bundle_path: Path, cases_path: Path, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run every case of ``cases_path`` against the bundle; 0 if all pass, else 1."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        bundle = load_bundle(bundle_path)
        cases = load_cases(cases_path)
    except (BundleError, CasesError) as exc:
        print(f"error: {exc}", file=err)
        return 1
    # A throwaway key: fingerprints are not shown, and the real key must not be needed to test.
    masker = Masker(bundle.detectors, secrets.token_bytes(32))
    print(f"bundle {bundle.label} ({bundle_path}), {len(cases)} case(s) from {cases_path}", file=out)
    failed = 0
    for case in cases:
        counter = MemoryRateCounter()
        ctx = _context(case)
        runs: list[str] = []
        verdict: Verdict | None = None
        error: str | None = None
        for _ in range(case.repeat):
            try:
                verdict = evaluate(bundle, ctx, masker, counter)
            except Exception as exc:  # the service would fail the call closed; the case fails
                error = f"evaluation failed: {type(exc).__name__}: {exc}"
                break
            runs.append(verdict.decision)
        problems = [error] if error else failures(case.expect, verdict) if verdict else ["no decision"]
        failed += bool(problems)
        print(f"\n{'FAIL' if problems else 'PASS'}  {case.name}", file=out)
        if case.repeat > 1:
            tally = ", ".join(f"{d} x{n}" for d, n in Counter(runs).items())
            print(f"      runs:     {tally} (the last one is checked)", file=out)
        if verdict is not None and error is None:
            for line in describe(verdict, bundle.detectors):
                print(f"      {line}", file=out)
        for problem in problems:
            print(f"      !! {problem}", file=out)
    passed = len(cases) - failed
    print(f"\n{passed} passed, {failed} failed", file=out)
    return 1 if failed else 0


# -- publish --------------------------------------------------------------------------------------


def publisher_identity(user: str | None) -> Identity:
    """The identity recorded as the publisher: ``--as USER``, else the local account name."""
    name = user or os.environ.get("SKILLGATE_PUBLISHER") or getpass.getuser()
    return Identity(
        subject=name,
        issuer=CLI_ISSUER,
        username=name,
        email=None,
        groups=[],
        client_id=CLI_ISSUER,
        token_id=None,
    )


def publish_command(
    path: Path,
    user: str | None = None,
    kafka: KafkaSettings | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Validate and publish the bundle at ``path``: 0 published, 1 invalid, 2 Kafka failed."""
    from skillgate import topics
    from skillgate.policy.distribution import PublishError, publish_bundle

    out, err = out or sys.stdout, err or sys.stderr
    try:
        source = path.read_text()
    except OSError as exc:
        print(f"error: {path}: cannot read: {exc.strerror}", file=err)
        return 1
    kafka = kafka or KafkaSettings()
    identity = publisher_identity(user)
    # The error below says what went wrong; aiokafka's own connection warnings would repeat it.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        bundle = asyncio.run(publish_bundle(kafka, source, str(path), identity))
    except BundleError as exc:
        print(f"error: {exc}", file=err)
        return 1
    except PublishError as exc:
        print(f"error: {exc}. Is Kafka running? (SKILLGATE_KAFKA_BOOTSTRAP)", file=err)
        return 2
    print(
        f"published {bundle.label} (sha256 {bundle.sha256[:12]}, {len(bundle.rules)} rule(s)) "
        f"as {identity['subject']} to {topics.name(kafka, topics.POLICY_BUNDLES)} at {kafka.bootstrap}",
        file=out,
    )
    return 0
