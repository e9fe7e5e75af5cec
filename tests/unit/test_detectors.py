"""The detectors (``skillgate/policy/detectors.py``): every type found where it should be, and
not where it should not (near misses), user patterns RE2 rejects, offsets, overlaps, and the
guarantee that a finding never carries its value into a log line or an error message.

Token-shaped test values are assembled at run time (``"sk_" + "live_" + ...``) so that no
secret scanner mistakes this file for a leak.
"""

from __future__ import annotations

import itertools
import random
import string
import time

import pytest

from skillgate.policy.detectors import (
    BUILTIN_TYPES,
    PII_TYPES,
    SECRET_TYPES,
    DetectorError,
    DetectorSet,
    Finding,
    is_placeholder,
    shannon_entropy,
)

RNG = random.Random(4)
ALNUM = string.ascii_letters + string.digits


def rand(alphabet: str, n: int) -> str:
    """Random characters with at least one upper, lower and digit (as real tokens have)."""
    while True:
        s = "".join(RNG.choice(alphabet) for _ in range(n))
        if any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s):
            return s


AWS_KEY_ID = "AKIA" + "Q3W7ZK2MPL5RXT4N"
AWS_SECRET = rand(ALNUM + "+/", 40)
GCP_KEY = "AIza" + rand(ALNUM + "-_", 35)
GITHUB = "ghp" + "_" + rand(ALNUM, 36)
GITHUB_PAT = "github" + "_pat_" + rand(ALNUM, 22) + "_" + rand(ALNUM, 59)
GITLAB = "glpat" + "-" + rand(ALNUM, 20)
SLACK_BOT = "xoxb" + "-" + "2345678901-3456789012-" + rand(ALNUM, 24)
SLACK_HOOK = "https://hooks.slack.com/services/" + "T0AB12CDE/B0FGH34IJKL/" + rand(ALNUM, 24)
STRIPE = "sk_" + "live_" + rand(ALNUM, 24)
ANTHROPIC = "sk-ant-" + "api03-" + rand(ALNUM + "-_", 93) + "AA"
OPENAI = "sk-" + "proj-" + rand(ALNUM + "-_", 120)
OPENAI_LEGACY = "sk-" + rand(ALNUM, 20) + "T3BlbkFJ" + rand(ALNUM, 20)
AZURE_KEY = rand(ALNUM + "+/", 86) + "=="
AZURE_SAK = rand(ALNUM + "+/", 43) + "="
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkFkYSBMb3ZlbGFjZSIsImlhdCI6MTUxNjIzOTAyMn0"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    + "\n".join(rand(ALNUM + "+/", 64) for _ in range(6))
    + "\n-----END RSA PRIVATE KEY-----"
)
SA_KEY_ID = "".join(RNG.choice("0123456789abcdef") for _ in range(40))

POSITIVES: list[tuple[str, str, str]] = [
    # (type, text, the value that must be found)
    ("AWS_ACCESS_KEY", f"aws_access_key_id = {AWS_KEY_ID}\n", AWS_KEY_ID),
    ("AWS_ACCESS_KEY", f"The key {AWS_KEY_ID} was rotated.", AWS_KEY_ID),
    ("AWS_SECRET_KEY", f"aws_secret_access_key = {AWS_SECRET}\n", AWS_SECRET),
    ("AWS_SECRET_KEY", f'"SecretAccessKey": "{AWS_SECRET}",', AWS_SECRET),
    ("AWS_SECRET_KEY", f"export AWS_SECRET_ACCESS_KEY={AWS_SECRET}", AWS_SECRET),
    ("GCP_API_KEY", f"https://maps.googleapis.com/maps/api/geocode/json?key={GCP_KEY}", GCP_KEY),
    ("GCP_SERVICE_ACCOUNT_KEY", f'{{"type": "service_account", "private_key_id": "{SA_KEY_ID}"}}', SA_KEY_ID),
    ("GCP_SERVICE_ACCOUNT_KEY", f"{{'type': 'service_account', 'private_key_id': '{SA_KEY_ID}'}}", SA_KEY_ID),
    (
        "GCP_SERVICE_ACCOUNT_KEY",
        '{"private_key": "' + PEM.replace("\n", "\\n") + '\\n", "client_id": "1"}',
        PEM.replace("\n", "\\n") + "\\n",
    ),
    (
        "AZURE_STORAGE_KEY",
        f"DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={AZURE_KEY};",
        AZURE_KEY,
    ),
    ("AZURE_STORAGE_KEY", f"az storage blob list --account-key {AZURE_KEY}", AZURE_KEY),
    (
        "AZURE_CONNECTION_KEY",
        f"Endpoint=sb://x.servicebus.windows.net/;SharedAccessKey={AZURE_SAK}",
        AZURE_SAK,
    ),
    ("GITHUB_TOKEN", f"export GITHUB_TOKEN={GITHUB}", GITHUB),
    ("GITHUB_TOKEN", f"token: {GITHUB_PAT}", GITHUB_PAT),
    ("GITLAB_TOKEN", f"PRIVATE-TOKEN: {GITLAB}", GITLAB),
    ("SLACK_TOKEN", f'WebClient(token="{SLACK_BOT}")', SLACK_BOT),
    ("SLACK_WEBHOOK", f"curl -X POST {SLACK_HOOK}", SLACK_HOOK),
    ("STRIPE_KEY", f'stripe.api_key = "{STRIPE}"', STRIPE),
    ("ANTHROPIC_API_KEY", f"x-api-key: {ANTHROPIC}", ANTHROPIC),
    ("OPENAI_API_KEY", f"OPENAI_API_KEY={OPENAI}", OPENAI),
    ("OPENAI_API_KEY", f"key {OPENAI_LEGACY} here", OPENAI_LEGACY),
    ("PRIVATE_KEY", f"my key:\n{PEM}\nthanks", PEM),
    ("PRIVATE_KEY", "const k = '" + PEM.replace("\n", "\\n") + "';", PEM.replace("\n", "\\n")),
    ("JWT", f"Authorization: Bearer {JWT}", JWT),
    ("URL_PASSWORD", "DATABASE_URL=postgres://app:Walnut7%21Orbit@db.internal:5432/app", "Walnut7%21Orbit"),
    ("URL_PASSWORD", "redis://:k8Jq2LmZ0x@cache:6379/0", "k8Jq2LmZ0x"),
    (
        "CONNECTION_STRING_PASSWORD",
        "Server=tcp:db,1433;Database=x;User ID=sa;Password=Zx8#kq2LmP;Encrypt=True",
        "Zx8#kq2LmP",
    ),
    ("CONNECTION_STRING_PASSWORD", "Driver={ODBC};Server=db;Uid=sa;Pwd={Qw3rt!Zx9};", "Qw3rt!Zx9"),
    ("GENERIC_SECRET", 'client_secret = "Xk29!dLq03mZ"', "Xk29!dLq03mZ"),
    ("GENERIC_SECRET", "DB_PASSWORD=Tr0ub4dor&3x\n", "Tr0ub4dor&3x"),
    ("GENERIC_SECRET", "database:\n  password: Pebble.Thistle22\n", "Pebble.Thistle22"),
    ("GENERIC_SECRET", '{"api_key": "a6f2792bfe62e45b2c7586f662a254ac"}', "a6f2792bfe62e45b2c7586f662a254ac"),
    ("GENERIC_SECRET", "<password>Saffron_Granite13</password>", "Saffron_Granite13"),
    ("GENERIC_SECRET", "./backup --password Walnut7Orbit42 --out x", "Walnut7Orbit42"),
    ("GENERIC_SECRET", 'os.Setenv("DB_PASSWORD", "SaffronWillow2020!")', "SaffronWillow2020!"),
    (
        "GENERIC_SECRET",
        'headers["X-Api-Key"] = "6316f9de6aa74fd20fac4bfe92627830"',
        "6316f9de6aa74fd20fac4bfe92627830",
    ),
    (
        "GENERIC_SECRET",
        "curl -H 'Authorization: Bearer 9fKq2LmZx0Vb7NwT3yHs' https://api",
        "9fKq2LmZx0Vb7NwT3yHs",
    ),
    (
        "EMAIL",
        "Please add ada.lovelace+ops@mail.example.co.uk to the rota.",
        "ada.lovelace+ops@mail.example.co.uk",
    ),
    ("EMAIL", "From: Grace <GRACE.HOPPER@NAVY.MIL>", "GRACE.HOPPER@NAVY.MIL"),
    ("PHONE", "Call me at (415) 555-0132 after 5pm.", "(415) 555-0132"),
    ("PHONE", "office: +44 20 7946 0958", "+44 20 7946 0958"),
    ("PHONE", "tel:+4930901820", "+4930901820"),
    ("PHONE", "My cell is 4155550132, thanks", "4155550132"),
    ("PHONE", "Ring the front desk on 020 7946 0958 before 9.", "020 7946 0958"),
    ("PHONE", "US line 1-800-555-0199", "1-800-555-0199"),
    ("PAYMENT_CARD", "card 4111 1111 1111 1111 exp 12/27", "4111 1111 1111 1111"),
    ("PAYMENT_CARD", "Amex 3782 822463 10005 is the corporate card", "3782 822463 10005"),
    ("PAYMENT_CARD", "card=5555555555554444&cvv=123", "5555555555554444"),
    ("PAYMENT_CARD", "Charge 4111-1111-1111-1111 2024 please", "4111-1111-1111-1111"),
    ("PAYMENT_CARD", "id,card\n73850,4111111111111111\n", "4111111111111111"),
    ("IBAN", "IBAN DE89 3704 0044 0532 0130 00, ref 7", "DE89 3704 0044 0532 0130 00"),
    ("IBAN", "wire to GB82WEST12345698765432.", "GB82WEST12345698765432"),
    ("US_SSN", "Applicant SSN: 536-22-8451, DOB 1990-01-02", "536-22-8451"),
    ("US_SSN", "ssn 536228451 on file", "536228451"),
    ("IPV4", "Failed password from 203.0.113.45 port 22", "203.0.113.45"),
    ("IPV4", "curl http://10.2.3.4:8080/metrics", "10.2.3.4"),
    ("IPV4", "ssh ubuntu@172.25.147.182", "172.25.147.182"),
    ("IPV6", "health check http://[2001:db8::8a2e:370:7334]:8080/", "2001:db8::8a2e:370:7334"),
    ("IPV6", "from fe80::1ff:fe23:4567:890a port 22", "fe80::1ff:fe23:4567:890a"),
    ("IPV6", "mapped ::ffff:192.0.2.128 here", "::ffff:192.0.2.128"),
]

NEGATIVES: list[tuple[str, str]] = [
    # (type that must not fire, text)
    ("AWS_ACCESS_KEY", "placeholder AKIAXXXXXXXXXXXXXXXX and AKIA1234 (too short)"),
    ("AWS_SECRET_KEY", "aws_secret_access_key = ${AWS_SECRET_ACCESS_KEY}"),
    ("GCP_API_KEY", "AIzaShort and AIza" + "x" * 60),
    ("GITHUB_TOKEN", "ghp_" + "X" * 36 + " and ghp_short"),
    ("OPENAI_API_KEY", "pip install sk-learn-compatible-estimators-and-transformers-for-you"),
    ("OPENAI_API_KEY", "desk-" + rand(ALNUM, 48)),
    (
        "PRIVATE_KEY",
        "The file starts with -----BEGIN RSA PRIVATE KEY----- and ends with -----END RSA PRIVATE KEY-----.",
    ),
    ("JWT", "eyJub3QiOiAiYSBqd3QifQ.eyJhIjoxfQ.sig12345678 (header without alg/typ)"),
    ("URL_PASSWORD", "postgres://user:password@localhost:5432/mydb and http://user:pass@proxy:3128"),
    ("URL_PASSWORD", 'f"postgres://{user}:{password}@{host}/db" and postgres://u:${DB_PASSWORD}@h/db'),
    ("CONNECTION_STRING_PASSWORD", "Server=db;User Id=sa;Password=<your-password>;"),
    ("GENERIC_SECRET", 'password = "changeme"'),
    ("GENERIC_SECRET", 'api_key = "your-api-key-here"\nSECRET_KEY = "django-insecure-change-me"'),
    ("GENERIC_SECRET", 'password = os.environ["DB_PASSWORD"]\ntoken = self.token_value'),
    ("GENERIC_SECRET", "password: ${POSTGRES_PASSWORD}\ntoken: ${{ secrets.GITHUB_TOKEN }}"),
    ("GENERIC_SECRET", 'apiKey: "<API_KEY>"\npassword: "********"\ntoken: "xxxxxxxxxxxxxxxxxxxx"'),
    ("GENERIC_SECRET", '"password": "Password", "token_expired": "Your session token has expired"'),
    ("GENERIC_SECRET", "max_tokens = 4096\ntokenizer = AutoTokenizer.from_pretrained(name)"),
    ("GENERIC_SECRET", 'KEYS = ("api_key_id", "claude_tag_category", "session_password")'),
    ("GENERIC_SECRET", "kSecImportExportPassphrase = CFStringRef.in_dll(Security, name)"),
    ("EMAIL", "icon@2x.png, @decorator, user@localhost, pkg@1.2.3"),
    ("EMAIL", "postgres://admin:S3cretPa55@db.internal:5432/app"),
    ("PHONE", "version 10.20.30, build 2024.11.21, order #43491874 shipped"),
    ("PHONE", "ISBN 978-1-024-32752-6 and 978-3-16-148410-0"),
    ("PHONE", "a+1234567890 and x = 12345678901234"),
    ("PAYMENT_CARD", "card 4111 1111 1111 1112 (Luhn-invalid)"),
    ("PAYMENT_CARD", "timestamp 1716300000000000 and 0.4111111111111111"),
    ("IBAN", "IBAN DE89 3704 0044 0532 0130 01 (bad checksum) and XX12 3456 7890 1234"),
    ("US_SSN", "SSN 000-12-3456, 666-12-3456, 900-12-3456, 123-00-4567, 123-45-0000"),
    ("US_SSN", "part 2023-123-45-6789-x"),
    ("IPV4", "version 1.2.3.4, Python==3.11.4.1, OID 1.3.6.1.4.1, 999.1.1.1"),
    ("IPV4", "bind 0.0.0.0 and 127.0.0.1, netmask 255.255.255.0"),
    ("IPV6", "a[1::2], a[::-1], std::vector, 12:30:45, Face::Add, de:ad:be:ef:00:01"),
]


@pytest.fixture(scope="module")
def detectors() -> DetectorSet:
    return DetectorSet()


@pytest.mark.parametrize(
    ("type_", "text", "value"), POSITIVES, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(POSITIVES)]
)
def test_positive(detectors: DetectorSet, type_: str, text: str, value: str) -> None:
    findings = detectors.scan(text)
    matching = [f for f in findings if f.type == type_]
    assert matching, f"{type_} not found in {text!r}: {findings}"
    f = matching[0]
    assert f.value == value
    assert text[f.start : f.end] == value
    assert f.category == BUILTIN_TYPES[type_]


@pytest.mark.parametrize(("type_", "text"), NEGATIVES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(NEGATIVES)])
def test_negative(detectors: DetectorSet, type_: str, text: str) -> None:
    assert [f for f in detectors.scan(text) if f.type == type_] == []


def test_every_builtin_type_has_positive_and_negative_cases() -> None:
    assert {t for t, _, _ in POSITIVES} == set(BUILTIN_TYPES)
    assert {t for t, _ in NEGATIVES} >= set(BUILTIN_TYPES) - {
        "SLACK_TOKEN",
        "SLACK_WEBHOOK",
        "STRIPE_KEY",
        "ANTHROPIC_API_KEY",
        "GITLAB_TOKEN",
        "AZURE_STORAGE_KEY",
        "AZURE_CONNECTION_KEY",
        "GCP_SERVICE_ACCOUNT_KEY",
    }


def test_near_misses_of_prefixed_tokens(detectors: DetectorSet) -> None:
    text = (
        "slack xoxb-123 and xoxo-hugs, stripe sk_live_short, anthropic sk-ant-short, gitlab glpat-short,"
        " AccountKey=short; SharedAccessKey=tooShort, private_key_id: 123"
    )
    assert detectors.scan(text) == []


def test_categories() -> None:
    assert set(BUILTIN_TYPES) == SECRET_TYPES | PII_TYPES
    assert not SECRET_TYPES & PII_TYPES
    assert {"EMAIL", "PHONE", "PAYMENT_CARD", "IBAN", "US_SSN", "IPV4", "IPV6"} == PII_TYPES


def test_findings_sorted_non_overlapping_with_specific_types_winning(detectors: DetectorSet) -> None:
    text = f'token = "{GITHUB}"\nurl = postgres://u:Kq9Lm2Zx7@db.example.com/app\nmail ada@example.org'
    findings = detectors.scan(text)
    assert [f.type for f in findings] == ["GITHUB_TOKEN", "URL_PASSWORD", "EMAIL"]
    assert all(a.end <= b.start for a, b in itertools.pairwise(findings))


def test_types_filter_applies_before_overlaps(detectors: DetectorSet) -> None:
    text = f'token = "{GITHUB}"'
    assert [f.type for f in detectors.scan(text, types={"GENERIC_SECRET"})] == ["GENERIC_SECRET"]
    assert [f.type for f in detectors.scan(text, types={"GITHUB_TOKEN"})] == ["GITHUB_TOKEN"]


def test_prefer_ranks_types_first(detectors: DetectorSet) -> None:
    text = f'token = "{GITHUB}"'
    assert [f.type for f in detectors.scan(text, prefer={"GENERIC_SECRET"})] == ["GENERIC_SECRET"]


def test_detector_set_selects_types() -> None:
    only = DetectorSet(types=["EMAIL"])
    assert only.types == {"EMAIL"}
    assert [f.type for f in only.scan(f"ada@example.org {AWS_KEY_ID}")] == ["EMAIL"]
    with pytest.raises(DetectorError, match="unknown detector type"):
        DetectorSet(types=["EMAIL", "NOPE"])


def test_types_for(detectors: DetectorSet) -> None:
    assert detectors.types_for(categories=["pii"]) == PII_TYPES
    assert detectors.types_for(categories=["secret"], types=["EMAIL", "JWT"]) == {"JWT"}
    with pytest.raises(DetectorError, match="category"):
        detectors.types_for(categories=["secrets"])
    with pytest.raises(DetectorError, match="NOPE"):
        detectors.types_for(types=["NOPE"])


def test_character_offsets_in_non_ascii_text(detectors: DetectorSet) -> None:
    text = "Grüße aus Köln 🙂 — schreib an jürgen.x@exämple.de oder ada@example.org, IP 10.0.0.8 ✓"
    findings = detectors.scan(text)
    assert [(f.type, f.value) for f in findings] == [
        ("EMAIL", "jürgen.x@exämple.de"),
        ("EMAIL", "ada@example.org"),
        ("IPV4", "10.0.0.8"),
    ]
    for f in findings:
        assert text[f.start : f.end] == f.value


def test_case_insensitive_prefilter(detectors: DetectorSet) -> None:
    text = "DB_PASSWORD=Walnut7Orbit42\nPassWord: Kq9!Lm2Zx7\n"
    assert [f.value for f in detectors.scan(text)] == ["Walnut7Orbit42", "Kq9!Lm2Zx7"]


def test_finding_repr_and_errors_never_show_the_value(detectors: DetectorSet) -> None:
    (finding,) = detectors.scan(f"key {AWS_KEY_ID}")
    assert AWS_KEY_ID not in repr(finding)
    assert AWS_KEY_ID not in str(finding)
    assert finding == Finding("AWS_ACCESS_KEY", "secret", 4, 24, AWS_KEY_ID)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(?<=id:)\d+", "lookbehind"),
        (r"\d+(?=px)", "lookahead"),
        (r"(a+)\1", "backreference"),
        (r"(unclosed", "syntax"),
    ],
)
def test_user_pattern_rejected_by_re2(pattern: str, reason: str) -> None:
    with pytest.raises(DetectorError) as info:
        DetectorSet(custom={"employee_id": pattern})
    message = str(info.value)
    assert "EMPLOYEE_ID" in message, reason
    assert "RE2" in message


def test_custom_patterns() -> None:
    d = DetectorSet(
        types=[], custom={"employee_id": r"\bEMP-(?P<value>[0-9]{6})\b", "ticket": r"\bTCK-[0-9]{4}\b"}
    )
    findings = d.scan("badge EMP-123456 for TCK-0042")
    assert [(f.type, f.category, f.value) for f in findings] == [
        ("EMPLOYEE_ID", "custom", "123456"),
        ("TICKET", "custom", "TCK-0042"),
    ]
    assert d.category("TICKET") == "custom"


@pytest.mark.parametrize(
    ("name", "pattern", "message"),
    [
        ("bad name", r"x", "must start with a letter"),
        ("9lives", r"x", "must start with a letter"),
        ("email", r"x", "built-in"),
        ("empty", r"a*", "empty string"),
        ("blank", "", "non-empty"),
    ],
)
def test_custom_pattern_validation(name: str, pattern: str, message: str) -> None:
    with pytest.raises(DetectorError, match=message):
        DetectorSet(custom={name: pattern})


def test_compiled_once_and_fast_path_available(detectors: DetectorSet) -> None:
    # the scan loop uses google-re2's underlying RE2 object; if an upgrade removed it, the
    # public finditer fallback would keep results right but slower, so say so here
    assert all(c.raw is not None for c in detectors._compiled)


def test_public_finditer_fallback_gives_same_results() -> None:
    d = DetectorSet()
    text = f"ada@example.org {AWS_KEY_ID} call (415) 555-0132, card 4111 1111 1111 1111"
    expected = d.scan(text)
    d._compiled = tuple(
        c.__class__(c.spec, c.regex, c.value_group, c.groups, c.literals, None) for c in d._compiled
    )
    assert d.scan(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "a" * 200_000,
        "password=" * 20_000,
        "@" * 100_000 + "a",
        "1" * 100_000,
        "1 " * 100_000,
        ":" * 100_000,
        "-----BEGIN RSA PRIVATE KEY-----" + "A" * 200_000,
        "x://" + "u" * 100_000 + ":" + "p" * 100_000,
        "é" * 60_000 + "@" + "ü" * 60_000 + " ✓ — “x” " * 1000,
    ],
    ids=[
        "letters",
        "assignments",
        "ats",
        "digits",
        "spaced-digits",
        "colons",
        "unterminated-pem",
        "url",
        "unicode",
    ],
)
def test_pathological_input_scans_in_linear_time(detectors: DetectorSet, text: str) -> None:
    started = time.perf_counter()
    detectors.scan(text)
    assert time.perf_counter() - started < 2.0  # ~200 KB; a backtracking engine would take minutes


def test_helpers() -> None:
    assert shannon_entropy("") == 0.0
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("ab") == pytest.approx(1.0)
    assert shannon_entropy("changeme") == pytest.approx(2.75)
    assert is_placeholder("[EMAIL_1]") and is_placeholder("[AWS_ACCESS_KEY_12]")
    assert not is_placeholder("[email_1]") and not is_placeholder("[EMAIL]") and not is_placeholder("EMAIL_1")


def test_placeholders_are_never_detected(detectors: DetectorSet) -> None:
    text = (
        'password = "[GENERIC_SECRET_1]"\npostgres://u:[URL_PASSWORD_2]@db/x\n'
        "Server=x;Password=[CONNECTION_STRING_PASSWORD_1];\ntoken=[GENERIC_SECRET_3] [EMAIL_1] [PHONE_2]"
    )
    assert detectors.scan(text) == []
