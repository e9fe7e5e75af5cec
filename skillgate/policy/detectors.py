r"""Detectors for secrets and personal data, on RE2 only (linear-time matching, no backtracking).

Policy rules ask "does this call carry an AWS key / an email / ...?" and masking replaces what
was found. Both run on the data path of every call, over text a caller controls, so:

* Every pattern runs on RE2 (``google-re2``): matching time is linear in the input whatever the
  input is. Python's ``re`` never touches input text here. A user-supplied pattern that RE2
  refuses (backreferences, lookaround) is a :class:`DetectorError` when the detector set is
  built, never a slower fallback.
* Everything is compiled once, in :class:`DetectorSet`'s constructor (hoop.dev recompiles its
  guardrail regexes on every check; we do not).
* A scan encodes the text to UTF-8 once and runs one ``re2.Set`` of every detector's literal
  prefilter (``AKIA``, ``ghp_``, ``password``, ``@``, a digit, ...), which tells in one pass
  which detectors can match at all; only those run their pattern. A literal set rather than a
  set of the full patterns: the full set's DFA is slower than the few patterns that remain
  (measured: 110 µs against ~25 µs for 10 KB), and ``re2.Set.Match`` cannot report a DFA out
  of memory, which for big patterns would silently skip detectors (a literal set's DFA stays
  tiny). Candidates are validated in Python (Luhn, IBAN mod-97, SSN ranges, JWT header,
  entropy, placeholders and code references) and overlaps resolved by specificity, so a
  ``ghp_`` token inside ``token = "..."`` is reported once, as ``GITHUB_TOKEN``.
* Patterns are written for RE2's DFA: no leading ``\b`` where a literal prefix can be searched
  for instead, unbounded rather than large counted repetitions, no ``\p{L}`` (a 40,000
  instruction automaton that overflows the DFA's memory and drops RE2 to its slow NFA).
* A :class:`Finding` carries the matched value because masking needs it, but the value is kept
  out of ``repr`` and out of every exception message: findings may be logged, values never.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import string
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import re2

__all__ = [
    "BUILTIN_TYPES",
    "CATEGORY_CUSTOM",
    "CATEGORY_PII",
    "CATEGORY_SECRET",
    "PII_TYPES",
    "SECRET_TYPES",
    "DetectorError",
    "DetectorSet",
    "Finding",
    "iban_valid",
    "is_placeholder",
    "shannon_entropy",
]

CATEGORY_SECRET: Final = "secret"  # noqa: S105 - a category name, not a credential
CATEGORY_PII: Final = "pii"
CATEGORY_CUSTOM: Final = "custom"


class DetectorError(ValueError):
    """A detector set that cannot be built: unknown type, bad name, or a pattern RE2 rejects.

    The message names the detector and RE2's reason; it never contains scanned text.
    """


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected value: its type, category and character span ``[start, end)`` in the text.

    ``value`` is ``text[start:end]``; it is excluded from ``repr`` so that logging a finding
    never logs the secret.
    """

    type: str
    category: str
    start: int
    end: int
    value: str = field(repr=False)


# A validator sees the candidate value (decoded), up to 32 bytes of the text before it and up to
# 8 bytes after it, and returns how many characters of the value to keep (normally all of them),
# or None to reject the candidate.
_Validator = Callable[[str, bytes, bytes], int | None]


@dataclass(frozen=True, slots=True)
class _Spec:
    """A built-in or custom detector before compilation."""

    type: str
    category: str
    pattern: str
    priority: int
    validate: _Validator | None = None
    # Prefilter: the detector runs only if one of these occurs in the text (ignoring case).
    # Empty: always run (detectors of personal data: if the text has a digit).
    literals: tuple[str, ...] = ()
    # Use the named group ``value`` as the finding (custom patterns); built-ins use the first
    # capturing group that participated, else the whole match.
    named_value: bool = False
    # Reject a match preceded by a word character. Checked here rather than with a leading
    # ``\b``, which would stop RE2 from skipping ahead to the pattern's literal prefix (5x slower).
    word_start: bool = False


# ----------------------------------------------------------------------------------------------
# Helpers shared by validators
# ----------------------------------------------------------------------------------------------


_XLOGX: Final = [0.0] + [c * math.log2(c) for c in range(1, 65)]


def shannon_entropy(value: str) -> float:
    """Shannon entropy of ``value`` in bits per character (0 for the empty string).

    Computed over the first 64 characters: enough to tell a random token from a placeholder
    or a word, and it keeps validating a 200-character API key cheap.
    """
    value = value[:64]
    n = len(value)
    if n == 0:
        return 0.0
    return max(0.0, math.log2(n) - sum([_XLOGX[c] for c in Counter(value).values()]) / n)


def is_placeholder(value: str) -> bool:
    """True for masking placeholders such as ``[EMAIL_1]``: masking output never re-detects."""
    if len(value) < 5 or value[0] != "[" or value[-1] != "]":
        return False
    name, sep, number = value[1:-1].rpartition("_")
    return bool(sep) and number.isdigit() and name.replace("_", "").isalnum() and name.isupper()


_LOWER: Final = frozenset(string.ascii_lowercase)
_UPPER: Final = frozenset(string.ascii_uppercase)
_DIGIT: Final = frozenset(string.digits)
_ALNUM: Final = _LOWER | _UPPER | _DIGIT


def _classes(value: str) -> int:
    """How many of lower / upper / digit / other characters ``value`` uses."""
    chars = set(value)
    return (
        (not chars.isdisjoint(_LOWER))
        + (not chars.isdisjoint(_UPPER))
        + (not chars.isdisjoint(_DIGIT))
        + (not chars <= _ALNUM)
    )


def _random_token(body: str, min_entropy: float = 3.0) -> bool:
    """A token body that looks random rather than a placeholder like ``xxxx`` or ``0000``."""
    return shannon_entropy(body) >= min_entropy


# Words that make a credential value a placeholder or an example rather than a secret, matched as
# substrings of the lower-cased value; _LEET_WORDS also after undoing leetspeak (p4ssw0rd).
_PLACEHOLDER_WORDS: Final = (
    "password",
    "passwd",
    "changeme",
    "change_me",
    "change-me",
    "example",
    "placeholder",
    "dummy",
    "sample",
    "redacted",
    "your",
    "secret",
    "xxxx",
    "****",
    "....",
    "todo",
    "fixme",
    "replace",
    "test",
    "fake",
    "foobar",
    "notreal",
    "not-real",
    "not_real",
    "mytoken",
    "mykey",
    "apikey",
    "api_key",
    "api-key",
)
_LEET_WORDS: Final = ("password", "passwd", "secret", "changeme", "letmein", "welcome", "qwerty", "admin")
_LEET: Final = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "@": "a", "$": "s", "7": "t"})
_SHORT_PLACEHOLDERS: Final = frozenset(
    {"pass", "pwd", "pw", "foo", "bar", "baz", "admin", "root", "user", "username", "guest", "none", "null"}
)


def _is_reference(value: str) -> bool:
    """A variable reference or template rather than a value: ``$DB_PASSWORD``, ``${{ secrets.X }}``,
    ``%API_KEY%``, ``{password}``, ``<token>``, a YAML alias ``*db_password``. A value that
    merely starts with a symbol (``%!jw*N...``, ``#5nmNN...``) is not one."""
    first, rest = value[0], value[1:]
    if first == "$":
        return rest[:1] in ("{", "(", "_") or rest[:1].isalpha()
    if first in "*&":  # a YAML alias or anchor: *db_password, &defaults
        return rest[:1].isalpha() and _identifier(rest) and (rest.islower() or _is_name(rest))
    if first == "%":
        return (value.endswith("%") and _identifier(value[1:-1])) or rest[:1] in ("s", "d", "(")
    if (first, value[-1]) in (("{", "}"), ("<", ">"), ("`", "`"), ("[", "]")):
        return True
    return "${" in value or "{{" in value or "%(" in value or "#{" in value


def _identifier(value: str) -> bool:
    return (
        bool(value) and value.replace("_", "").replace("-", "").replace(".", "").isalnum() and value.isascii()
    )


def _is_placeholder_value(value: str) -> bool:
    """An obvious placeholder, template or variable reference rather than a literal secret."""
    if is_placeholder(value) or _is_reference(value):
        return True
    low = value.lower()
    if low in _SHORT_PLACEHOLDERS or "://" in value or len(set(low)) <= 2:
        return True
    if any(word in low for word in _PLACEHOLDER_WORDS):
        return True
    # p4ssw0rd, s3cr3t, Ch@ngeM3: only short values (in a long hex string "7e57" is not "test")
    return len(value) <= 24 and any(word in low.translate(_LEET) for word in _LEET_WORDS)


_KEYWORD_VALUES: Final = frozenset(
    {"none", "null", "nil", "true", "false", "undefined", "self", "this", "os", "env", "str", "string"}
)


def _looks_like_reference(value: str) -> bool:
    """An unquoted value that reads as code: ``self.token``, ``get_secret()``, ``api_key``."""
    if value.lower() in _KEYWORD_VALUES:
        return True
    parts = value.split(".")
    identifier = all(p and (p[0].isalpha() or p[0] == "_") and p.replace("_", "").isalnum() for p in parts)
    if not identifier:
        return False
    if len(parts) > 1:  # attribute access: self.token, settings.API_KEY, CFStringRef.in_dll
        return all(not any(c.isdigit() for c in p) or p.islower() for p in parts)
    if any(ch.isdigit() for ch in value):
        return False  # e.g. a hex or base62 literal in an env file
    # snake_case / UPPER_SNAKE / camelCase words without digits: an identifier, not a secret
    words = value.replace("_", " ").split()
    return all(w.isalpha() for w in words) and (
        value.islower() or value.isupper() or "_" in value or _camel(value)
    )


def _camel(value: str) -> bool:
    """camelCase or PascalCase made of words of at least two letters (``apiKeyValue``)."""
    runs: list[str] = []
    current = ""
    for ch in value:
        if ch.isupper() and current:
            runs.append(current)
            current = ch
        else:
            current += ch
    runs.append(current)
    return all(len(r) >= 2 and r[1:].islower() for r in runs)


def _is_name(value: str) -> bool:
    """snake_case / UPPER_SNAKE / kebab-case words without digits: the name of something."""
    words = value.replace("-", "_").split("_")
    return len(words) > 1 and all(w.isalpha() for w in words) and (value.islower() or value.isupper())


def _credential_value(value: str, min_len: int = 8) -> bool:
    """A literal credential: long enough, not a placeholder, and random enough.

    Random secrets mix character classes or have high entropy; ``changeme`` (2.75 bits/char,
    lower case only) and ``password123`` (a placeholder word) do not fire.
    """
    if len(value) < min_len or len(value) > 512:
        return False
    if any(ch.isspace() for ch in value) or _is_placeholder_value(value) or _is_name(value):
        return False
    entropy = shannon_entropy(value)
    classes = _classes(value)
    return (classes >= 3 and entropy >= 2.5) or (classes >= 2 and entropy >= 2.9) or entropy >= 3.5


# ----------------------------------------------------------------------------------------------
# Validators
# ----------------------------------------------------------------------------------------------


def _v_token(min_body: int, prefix_sep: str = "", min_entropy: float = 3.0) -> _Validator:
    """Prefixed API tokens: body after the prefix is long and random enough."""

    def check(value: str, before: bytes, after: bytes) -> int | None:
        body = value.split(prefix_sep, 1)[-1] if prefix_sep else value
        if len(body) < min_body or not _random_token(body, min_entropy):
            return None
        return len(value)

    return check


def _v_exact_len(*lengths: int, min_entropy: float = 3.0) -> _Validator:
    def check(value: str, before: bytes, after: bytes) -> int | None:
        if len(value) not in lengths or not _random_token(value, min_entropy):
            return None
        return len(value)

    return check


def _v_aws_secret(value: str, before: bytes, after: bytes) -> int | None:
    if len(value) != 40 or shannon_entropy(value) < 3.5 or _classes(value) < 3:
        return None
    return 40


def _v_min_len_entropy(min_len: int, min_entropy: float) -> _Validator:
    def check(value: str, before: bytes, after: bytes) -> int | None:
        if len(value) < min_len or shannon_entropy(value) < min_entropy:
            return None
        return len(value)

    return check


def _v_openai(value: str, before: bytes, after: bytes) -> int | None:
    body = value[3:]
    if body.startswith("ant-"):
        return None  # an Anthropic key: reported as ANTHROPIC_API_KEY, never as OpenAI
    for prefix in ("proj-", "svcacct-", "admin-", "None-"):
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    if len(body) < 32 or shannon_entropy(body) < 3.5:
        return None
    chars = set(body)
    if chars.isdisjoint(_DIGIT) or chars.isdisjoint(_UPPER) or chars.isdisjoint(_LOWER):
        return None
    return len(value)


def _v_private_key(value: str, before: bytes, after: bytes) -> int | None:
    # A real block has a base64 body; a sentence mentioning the header has none.
    run = best = 0
    for ch in value[10:]:
        if ch.isalnum() or ch in "+/=":
            run += 1
            best = max(best, run)
        elif ch not in "\\":
            run = 0
    return len(value) if best >= 40 else None


def _b64url_json(part: str) -> object:
    padded = part + "=" * (-len(part) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def _v_jwt(value: str, before: bytes, after: bytes) -> int | None:
    header_part, _, rest = value.partition(".")
    try:
        header = _b64url_json(header_part)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or not ("alg" in header or "typ" in header):
        return None
    if len(rest.partition(".")[0]) < 8:
        return None
    return len(value)


def _v_url_password(value: str, before: bytes, after: bytes) -> int | None:
    if len(value) < 3 or _is_placeholder_value(value):
        return None
    return len(value)


def _v_conn_password(value: str, before: bytes, after: bytes) -> int | None:
    if len(value) < 4 or _is_placeholder_value(value) or value.startswith(("[", "(")):
        return None
    return len(value)


def _v_generic(value: str, before: bytes, after: bytes) -> int | None:
    quoted = bool(before) and before[-1:] in (b'"', b"'")
    if not quoted and (after[:1] in (b"(", b"[") or _looks_like_reference(value)):
        return None  # code: a call, a subscript, a name
    return len(value) if _credential_value(value) else None


def _v_literal_secret(value: str, before: bytes, after: bytes) -> int | None:
    """Values in XML elements and CLI flags: never code references, so only the credential test."""
    return len(value) if _credential_value(value) else None


def _v_bearer(value: str, before: bytes, after: bytes) -> int | None:
    if _looks_like_reference(value) or _is_placeholder_value(value):
        return None
    if len(value) < 16 or shannon_entropy(value) < 3.2 or _classes(value) < 2:
        return None
    return len(value)


# Email: file names that look like addresses (icon@2x.png) are not.
# fmt: off
_NOT_TLDS: Final = frozenset({
    "png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "tif", "tiff", "css", "scss",
    "js", "mjs", "ts", "tsx", "jsx", "py", "pyc", "pyi", "rb", "go", "rs", "java", "kt", "json",
    "yaml", "yml", "toml", "ini", "cfg", "txt", "csv", "tsv", "log", "html", "htm", "xml",
    "zip", "gz", "tgz", "tar", "bz2", "xz", "exe", "dll", "so", "dylib", "pdf", "doc", "docx",
    "xls", "xlsx", "ppt", "pptx", "wasm", "map", "lock", "whl", "egg", "md", "rst", "sh", "bat",
    "ps1", "mp3", "mp4", "mov", "avi", "wav",
})
# fmt: on


def _v_email(value: str, before: bytes, after: bytes) -> int | None:
    if before[-1:] == b":":
        words = before.split()
        if words and b"://" in words[-1]:
            return None  # the user:password@host part of a URL, not an address
    local, _, domain = value.rpartition("@")
    tld = domain.rpartition(".")[2].lower()
    if tld in _NOT_TLDS or ".." in local or len(local) > 64 or len(domain) > 253:
        return None
    return len(value)


_NOT_DIGITS: Final = str.maketrans("", "", " -.()+/")


def _digits(value: str) -> str:
    """The digits of a phone / card / SSN candidate (which holds only digits and separators)."""
    return value.translate(_NOT_DIGITS)


def _v_phone_intl(value: str, before: bytes, after: bytes) -> int | None:
    if before[-1:].isalnum() or before[-1:] in (b"-", b".", b"/", b":") or after[:1].isdigit():
        return None  # a+1234567, or the middle of an ISBN / a dotted number
    digits = _digits(value)
    if not 8 <= len(digits) <= 15 or len(set(digits)) < 3:
        return None
    return len(value)


def _v_phone_us(value: str, before: bytes, after: bytes) -> int | None:
    # part of a longer dotted / dashed number (an IP, a version, an ISBN)
    if after[:1] in (b"-", b".") and after[1:2].isdigit():
        return None
    if before[-1:] in (b"-", b".", b"/") and before[-2:-1].isdigit():
        return None
    digits = _digits(value)
    if len(digits) == 11 and digits[0] != "1":
        return None
    if len(digits) not in (10, 11) or len(set(digits)) < 3:
        return None
    return len(value)


def _v_phone_national(value: str, before: bytes, after: bytes) -> int | None:
    if before[-1:] in (b".", b"-", b"/", b":", b",") or after[:1] in (b".", b"-", b"/", b":"):
        return None  # part of a date, a time, a version or a longer number
    groups = value.replace("-", " ").split(" ")
    digits = "".join(groups)
    if not 10 <= len(digits) <= 12 or len(groups) < 2 or len(set(digits)) < 4:
        return None
    if len({ch for ch in value if not ch.isdigit()}) > 1:
        return None  # one separator style
    return len(value)


def _v_phone_context(value: str, before: bytes, after: bytes) -> int | None:
    digits = _digits(value)
    if not 8 <= len(digits) <= 15 or len(set(digits)) < 3:
        return None
    return len(value)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_brand_ok(d: str) -> bool:
    """Issuer prefix and length of a major payment network (Visa, Mastercard, Amex, ...)."""
    n = len(d)
    two, four, six = int(d[:2]), int(d[:4]), int(d[:6])
    if d[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16  # Mastercard
    if two in (34, 37):
        return n == 15  # American Express
    if four == 6011 or two == 65 or 644 <= int(d[:3]) <= 649 or 622126 <= six <= 622925:
        return 16 <= n <= 19  # Discover
    if 3528 <= four <= 3589:
        return 16 <= n <= 19  # JCB
    if 300 <= int(d[:3]) <= 305 or two in (36, 38, 39) or four == 3095:
        return 14 <= n <= 19  # Diners Club
    if two == 62:
        return 16 <= n <= 19  # UnionPay
    if two in (50, 56, 57, 58, 67) or four in (6304, 6759, 6761, 6762, 6763):
        return 12 <= n <= 19  # Maestro
    return False


def _v_card(value: str, before: bytes, after: bytes) -> int | None:
    # a decimal fraction or part of a longer dotted / dashed number is not a card (a comma is:
    # "73850,4486..." is a CSV row)
    if before[-1:] in (b".", b"-") and before[-2:-1].isdigit():
        return None
    if after[:1] in (b".", b",") and after[1:2].isdigit():
        return None
    keep = _card_length(value)
    if keep is None and value[-5:-4] in (" ", "-"):
        keep = _card_length(value[:-5])  # "4111 1111 1111 1111 2024": a year after the card
    return keep


def _card_length(value: str) -> int | None:
    digits = _digits(value)
    if not 13 <= len(digits) <= 19 or not _luhn(digits) or not _card_brand_ok(digits):
        return None
    seps = {ch for ch in value if not ch.isdigit()}
    if len(seps) > 1:
        return None
    if seps:
        groups = [len(g) for g in value.split(seps.pop())]
        if any(g < 4 for g in groups[:-1]) or groups[-1] < 1 or len(groups) < 3:
            return None
    return len(value)


_IBAN_LENGTHS: Final = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban_valid(compact: str) -> bool:
    """ISO 13616 check: known country, its length, and the mod-97 checksum equals 1."""
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _v_iban(value: str, before: bytes, after: bytes) -> int | None:
    expected = _IBAN_LENGTHS.get(value[:2])
    if expected is None:
        return None
    # The pattern may have swallowed a following group (" 2024"); cut at the country's length.
    count = 0
    for i, ch in enumerate(value):
        if ch != " ":
            count += 1
            if count == expected:
                keep = i + 1
                if keep < len(value) and value[keep] != " ":
                    return None
                compact = value[:keep].replace(" ", "")
                return keep if iban_valid(compact) else None
    return None


def _ssn_ok(digits: str) -> bool:
    area, group, serial = int(digits[:3]), int(digits[3:5]), int(digits[5:])
    if area == 0 or area == 666 or area >= 900 or group == 0 or serial == 0:
        return False
    return digits not in ("078051120", "219099999")  # published, never-valid examples


def _v_ssn(value: str, before: bytes, after: bytes) -> int | None:
    if before[-1:] in (b"-", b".", b"/") and before[-2:-1].isdigit():
        return None
    if after[:1] in (b"-", b".", b"/") and after[1:2].isdigit():
        return None
    digits = _digits(value)
    return len(value) if len(digits) == 9 and _ssn_ok(digits) else None


_VERSION_WORDS: Final = frozenset(
    {b"version", b"ver", b"v", b"release", b"build", b"python", b"firmware", b"rev", b"revision", b"tag"}
)
_VERSION_OPS: Final = (b"==", b">=", b"<=", b"~=", b"!=", b"^", b"~")
_MASK_OCTETS: Final = frozenset({0, 128, 192, 224, 240, 248, 252, 254, 255})


def _v_ipv4(value: str, before: bytes, after: bytes) -> int | None:
    if before[-1:] == b"." or (after[:1] == b"." and after[1:2].isdigit()):
        return None  # an OID or a longer version number
    parts = value.split(".")
    if any(len(p) > 1 and p[0] == "0" for p in parts):
        return None
    octets = [int(p) for p in parts]
    if any(o > 255 for o in octets):
        return None
    if octets[0] in (0, 127) or (octets[0] == 255 and all(o in _MASK_OCTETS for o in octets)):
        return None  # unspecified, loopback, broadcast and netmasks carry no information
    raw = before.rstrip(b" \t")
    if raw.endswith(_VERSION_OPS):
        return None
    words = raw.rstrip(b":=\"'(").split()
    if words and words[-1].lower().rstrip(b":") in _VERSION_WORDS:
        return None
    return len(value)


def _v_ipv6(value: str, before: bytes, after: bytes) -> int | None:
    if before[-1:].isalnum() or before[-1:] in (b"_", b":", b".") or after[:1].isalnum() or after[:1] == b"_":
        return None
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return None
    groups = [g for g in value.split(":") if g]
    if not any(ch.isdigit() for ch in value):
        return None
    if len(groups) < 2 or (len(groups) == 2 and ("::" not in value or len(groups[0]) < 3)):
        return None  # slices like 1::2, C++ paths like std::x
    return len(value)


# ----------------------------------------------------------------------------------------------
# The built-in detectors
# ----------------------------------------------------------------------------------------------

# Generic ``key = value`` assignments: the key names a credential (with any prefix, e.g.
# DB_PASSWORD, github_token, client_secret) and is followed by a separator used in code, YAML,
# env files, JSON, TOML, CLI flags or Python type-annotated assignments.
_KEYWORD = (
    r"(?:secret|passwd|password|passphrase|pwd|token|api[_.\-]?key|apikey|access[_.\-]?key|auth[_.\-]?key"
    r"|private[_.\-]?key|credentials?|signing[_.\-]?key|encryption[_.\-]?key|master[_.\-]?key)"
)
_KEY = (
    r"[A-Za-z0-9_.\-]*" + _KEYWORD + r"(?:[_.\-]?(?:key|id|value|token|secret|base|b64|hex|str|string)){0,2}"
)
_SEP = r"\\?[\"']?(?:\s*:\s*[A-Za-z_][A-Za-z0-9_.\[\]| ]{0,30}?\s*=|\s*(?::=|=>|\+=|[:=]))\s*"
_GENERIC = (
    r"(?i)(?:"
    # quoted value (optionally with escaped quotes, as in JSON inside a string)
    + r"\b" + _KEY + _SEP + r"\\?\"([^\"\\\r\n]{8,})\\?\""
    + r"|\b" + _KEY + _SEP + r"\\?'([^'\\\r\n]{8,})\\?'"
    # call arguments and subscripts: setenv("DB_PASSWORD", "..."), headers["X-Api-Key"] = "..."
    + r"|[A-Za-z0-9_]\(\s*\\?[\"']" + _KEY + r"\\?[\"']\s*,\s*\\?[\"']([^\"'\\\r\n]{8,})\\?[\"']\s*[,)]"
    + r"|\[\s*\\?[\"']" + _KEY + r"\\?[\"']\s*\]\s*=\s*\\?[\"']([^\"'\\\r\n]{8,})\\?[\"']"
    # query parameters: ?access_token=...&page=2 (the value ends at "&")
    + r"|[?&]" + _KEY + r"=([^&\s#\"'<>]{8,})"
    # unquoted value (env files, YAML)
    + r"|\b" + _KEY + _SEP + r"([^\s\"'`,;<>(){}\[\]:][^\s\"'`,;<>(){}\[\]]{7,})"
    + r")"
)  # fmt: skip
# XML elements: <password>...</password>
_GENERIC_XML = r"(?i)<" + _KEY + r">([^<\s]{8,})</"
# CLI flags: --password hunter22, --api-key=XYZ (a value starting with "-" is the next flag)
_GENERIC_CLI = r"(?i)--[a-z\-]{0,20}" + _KEYWORD + r"(?:\s+|=)([^\s\"'`\-][^\s\"'`]{7,})"
_AUTH_HEADER = (
    r"(?i)(?:\bauthorization\\?[\"']?\s*[:=]\s*\\?[\"']?(?:bearer|basic|token|bot)\s+"
    r"|\bbearer\s+)([A-Za-z0-9_\-.~+/]{16,}=*)"
)

# Email addresses, internationalised ones too (jürgen@exämple.de): ASCII, Latin, Greek and Cyrillic
# letters. Not \p{L}: its UTF-8 automaton has 40,000 instructions and overflows RE2's DFA memory,
# which makes RE2 fall back to its much slower NFA.
_V6_TAIL = (
    r"(?:[0-9A-Fa-f]{1,4}:){0,5}(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6}"
)
_LETTERS = r"A-Za-z\x{00C0}-\x{024F}\x{0370}-\x{03FF}\x{0400}-\x{04FF}"
_WORD = "[" + _LETTERS + "0-9]"
_LOCAL_EDGE = "[_%+\\-" + _LETTERS + "0-9]"
_LABEL = _WORD + "(?:[\\-" + _LETTERS + "0-9]*" + _WORD + ")?"
_EMAIL = (
    _LOCAL_EDGE + "(?:[._%+\\-" + _LETTERS + "0-9]*" + _LOCAL_EDGE + ")?"
    + "@" + _LABEL + "(?:\\." + _LABEL + ")*\\.[" + _LETTERS + "]{2,24}\\b"
)  # fmt: skip

# Words that put a number in a phone context (the literal prefilter of the context detector)
_PHONE_WORDS: Final = (
    "phone", "tel", "mobile", "cell", "fax", "whatsapp", "sms", "dial", "office", "landline",
    "hotline", "call me", "call us", "call on", "call at", "ring me", "ring us", "ring on", "ring at",
    "reach me", "reach us", "text me", "text us",
)  # fmt: skip

_SPECS: Final[tuple[_Spec, ...]] = (
    # --- secrets --------------------------------------------------------------------------------
    _Spec(
        "PRIVATE_KEY",
        CATEGORY_SECRET,
        r"-----BEGIN[A-Z0-9 ]{0,30}PRIVATE KEY(?: BLOCK)?-----(?:[A-Za-z0-9+/=\s:,.\-\\]*?"
        r"-----END[A-Z0-9 ]{0,30}PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s:,.\-\\]+)",
        100,
        _v_private_key,
        ("PRIVATE KEY",),
    ),
    _Spec(
        "GCP_SERVICE_ACCOUNT_KEY",
        CATEGORY_SECRET,
        # JSON, or a Python dict's repr (single quotes)
        r"\\?[\"']private_key\\?[\"']\s*:\s*\\?[\"'](-----BEGIN[A-Z ]{0,30}PRIVATE KEY-----[^\"']{20,}?"
        r"-----END[A-Z ]{0,30}PRIVATE KEY-----(?:\\\\?n)?)"
        r"|\\?[\"']private_key_id\\?[\"']\s*:\s*\\?[\"']([0-9a-f]{40})\\?[\"']",
        105,
        None,
        ("private_key",),
    ),
    _Spec(
        "AWS_ACCESS_KEY",
        CATEGORY_SECRET,
        r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z2-7]{16}\b",
        90,
        _v_min_len_entropy(20, 2.5),
        ("AKIA", "ASIA", "ABIA", "ACCA", "A3T"),
        word_start=True,
    ),
    _Spec(
        "AWS_SECRET_KEY",
        CATEGORY_SECRET,
        r"(?i)(?:aws[_.\-\s]?secret[_.\-\s]?(?:access[_.\-\s]?)?key|secret[_.\-\s]?(?:access[_.\-\s]?)?key)"
        r"(?:[\s\"'`:=,>(\]]|\bis\b){1,8}([A-Za-z0-9/+]{40,})",
        85,
        _v_aws_secret,
        tuple(f"secret{sep}{word}" for sep in ("", "_", "-", ".", " ") for word in ("key", "access")),
    ),
    _Spec("GCP_API_KEY", CATEGORY_SECRET, r"AIza[0-9A-Za-z_\-]{35,}", 90, _v_exact_len(39), ("AIza",)),
    _Spec(
        "AZURE_STORAGE_KEY",
        CATEGORY_SECRET,
        r"(?i)(?:(?:account[_.\-]?|azure[_.\-]?(?:storage[_.\-]?)?(?:account[_.\-]?)?(?:access[_.\-]?)?"
        r"|storage[_.\-]?account[_.\-]?)key\\?[\"']?(?:\s*[:=]\s*|\s+)\\?[\"']?([A-Za-z0-9+/]{40,}={0,2})"
        # an 88-character (64-byte) key on a line that talks about Azure storage
        r"|(?:azure|windows\.net|storage|blob)[^\r\n]*?[^A-Za-z0-9+/]([A-Za-z0-9+/]{86}==))",
        85,
        _v_min_len_entropy(40, 4.0),
        ("accountkey", "account_key", "account-key", "azure", "storage", "windows.net", "blob"),
    ),
    _Spec(
        "AZURE_CONNECTION_KEY",
        CATEGORY_SECRET,
        r"(?i)(?:sharedaccesskey\s*=\s*([A-Za-z0-9+/]{40,}={0,2})"
        r"|[?&;]sig=([A-Za-z0-9%+/]{40,}(?:%3d|=){0,2}))",
        85,
        _v_min_len_entropy(40, 3.8),
        ("sharedaccesskey", "sig="),
    ),
    _Spec(
        "GITHUB_TOKEN",
        CATEGORY_SECRET,
        r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{60,})",
        90,
        _v_token(36, "_"),
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        word_start=True,
    ),
    _Spec(
        "GITLAB_TOKEN",
        CATEGORY_SECRET,
        r"(?:gl(?:pat|dt|rt|ptt|ft|soat|oas|imt|cbt|agent)-|GR1348941)[A-Za-z0-9_\-]{20,}(?:\.[A-Za-z0-9_\-]+)*",
        90,
        _v_token(20, "-"),
        (
            "glpat-",
            "gldt-",
            "glrt-",
            "glptt-",
            "glft-",
            "glsoat-",
            "gloas-",
            "glimt-",
            "glcbt-",
            "glagent-",
            "GR1348941",
        ),
        word_start=True,
    ),
    _Spec(
        "SLACK_TOKEN",
        CATEGORY_SECRET,
        r"(?:xox[abprse]|xoxe\.xox[bp]|xapp)-[0-9A-Za-z]+(?:-[0-9A-Za-z]+)+",
        90,
        _v_min_len_entropy(24, 3.0),
        ("xox", "xapp-"),
        word_start=True,
    ),
    _Spec(
        "SLACK_WEBHOOK",
        CATEGORY_SECRET,
        r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/\-]{20,}",
        92,
        None,
        ("hooks.slack.com",),
    ),
    _Spec(
        "STRIPE_KEY",
        CATEGORY_SECRET,
        r"(?:(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}|pk_live_[0-9A-Za-z]{16,}|whsec_[0-9A-Za-z]{24,})",
        90,
        _v_token(16, "_"),
        ("sk_live_", "sk_test_", "rk_live_", "rk_test_", "pk_live_", "whsec_"),
        word_start=True,
    ),
    _Spec(
        "ANTHROPIC_API_KEY",
        CATEGORY_SECRET,
        r"sk-ant-[A-Za-z0-9_\-]{20,}",
        95,
        _v_token(20, "sk-ant-"),
        ("sk-ant-",),
        word_start=True,
    ),
    _Spec(
        "OPENAI_API_KEY",
        CATEGORY_SECRET,
        r"sk-(?:(?:proj|svcacct|admin|None)-)?[A-Za-z0-9_\-]{20,}",
        90,
        _v_openai,
        ("sk-",),
        word_start=True,
    ),
    _Spec(
        "JWT",
        CATEGORY_SECRET,
        r"eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",
        80,
        _v_jwt,
        ("eyJ",),
        word_start=True,
    ),
    _Spec(
        "URL_PASSWORD",
        CATEGORY_SECRET,
        r"\b[A-Za-z][A-Za-z0-9+.\-]{1,30}://[^\s:/?#@\[\]\"'<>]*:([^\s/?#@\"'<>]+)@[A-Za-z0-9\-._~%\[]",
        70,
        _v_url_password,
        ("://",),
    ),
    _Spec(
        "CONNECTION_STRING_PASSWORD",
        CATEGORY_SECRET,
        r"(?i)(?:;\s*(?:password|pwd)\s*=\s*(?:\{([^}\r\n]+)\}|\"([^\"\r\n]+)\"|'([^'\r\n]+)'|([^;\s\"']+))"
        r"|\b(?:password|pwd)\s*=\s*(?:\{([^}\r\n]+)\}|\"([^\"\r\n]+)\"|'([^'\r\n]+)'|([^;\s\"'{]+))\s*;)",
        70,
        _v_conn_password,
        ("password", "pwd"),
    ),
    _Spec(
        "GENERIC_SECRET",
        CATEGORY_SECRET,
        _GENERIC,
        50,
        _v_generic,
        ("secret", "passw", "passphrase", "pwd", "token", "key", "credential"),
    ),
    _Spec(
        "GENERIC_SECRET",
        CATEGORY_SECRET,
        _GENERIC_XML,
        50,
        _v_literal_secret,
        ("</",),
    ),
    _Spec(
        "GENERIC_SECRET",
        CATEGORY_SECRET,
        _GENERIC_CLI,
        50,
        _v_literal_secret,
        ("--",),
    ),
    _Spec(
        "GENERIC_SECRET",
        CATEGORY_SECRET,
        _AUTH_HEADER,
        51,
        _v_bearer,
        ("bearer", "authorization"),
    ),
    # --- personal data --------------------------------------------------------------------------
    _Spec(
        "EMAIL",
        CATEGORY_PII,
        _EMAIL,
        30,
        _v_email,
        ("@",),
    ),
    _Spec(
        "PAYMENT_CARD",
        CATEGORY_PII,
        r"\b(?:[0-9]{13,19}|[0-9]{4}(?:[ \-][0-9]{4}){2,3}(?:[ \-][0-9]{1,4})?|[0-9]{4}[ \-][0-9]{6}[ \-][0-9]{4,5})\b",
        40,
        _v_card,
    ),
    _Spec(
        "IBAN",
        CATEGORY_PII,
        r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
        40,
        _v_iban,
    ),
    _Spec("US_SSN", CATEGORY_PII, r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", 35, _v_ssn),
    _Spec(
        "US_SSN",
        CATEGORY_PII,
        r"(?i)\b(?:ssn|social security(?: number| no\.?| #)?|ss#)[^0-9\n]{0,12}\b([0-9]{9}|[0-9]{3} [0-9]{2} [0-9]{4})\b",
        36,
        _v_ssn,
        ("ssn", "social security", "ss#"),
    ),
    _Spec(
        "PHONE",
        CATEGORY_PII,
        r"(?:\+|\b00)[1-9][0-9]{0,2}(?:[ .\-]?(?:\(0?[0-9]{1,4}\)|[0-9]{1,5})){1,7}",
        21,
        _v_phone_intl,
        ("+", "00"),
    ),
    _Spec(
        "PHONE",
        CATEGORY_PII,
        # national formats (UK, DE, FR, IE, AU, ...): trunk 0, then 2 to 5 groups
        r"\b0[1-9][0-9]{0,4}(?:[ \-][0-9]{2,8}){1,4}\b",
        18,
        _v_phone_national,
    ),
    _Spec(
        "PHONE",
        CATEGORY_PII,
        r"(?:\b1[ .\-]?)?(?:\([2-9][0-9]{2}\)[ .\-]?|\b[2-9][0-9]{2}[ .\-])[2-9][0-9]{2}[ .\-][0-9]{4}\b",
        20,
        _v_phone_us,
    ),
    _Spec(
        "PHONE",
        CATEGORY_PII,
        r"(?i)\b(?:phone|tel|telephone|mobile|cell|fax|whatsapp|sms|dial|office|landline|hotline"
        r"|(?:call|ring|reach|text) (?:me|us)(?: on| at)?|(?:call|ring) (?:on|at))\b[^0-9+\n]{0,12}"
        r"(\+?[0-9][0-9 .\-()]{6,18}[0-9])\b",
        19,
        _v_phone_context,
        _PHONE_WORDS,
    ),
    _Spec("IPV4", CATEGORY_PII, r"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b", 25, _v_ipv4, (".",)),
    _Spec(
        "IPV6",
        CATEGORY_PII,
        # eight groups, or fewer around "::" with a group on at least one side (a bare "::" is
        # a slice or a C++ scope, not worth a candidate), possibly ending in dotted IPv4
        r"(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
        r"|[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6}::(?:" + _V6_TAIL + r")?"
        r"|::(?:" + _V6_TAIL + r")",
        25,
        _v_ipv6,
        ("::", ":"),
    ),
)

BUILTIN_TYPES: Final[Mapping[str, str]] = {spec.type: spec.category for spec in _SPECS}
"""Every built-in detector type and its category (``secret`` or ``pii``)."""
SECRET_TYPES: Final = frozenset(t for t, c in BUILTIN_TYPES.items() if c == CATEGORY_SECRET)
PII_TYPES: Final = frozenset(t for t, c in BUILTIN_TYPES.items() if c == CATEGORY_PII)

_CUSTOM_PRIORITY: Final = 60  # above generic secrets and PII, below every specific secret format
# google-re2 internals for the fast match loop (see _spans); None falls back to the public API
_UNANCHORED: Final = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)
_PREFERRED: Final = 1000  # rank boost of the types a scan prefers (see DetectorSet.scan)
_HAS_DIGIT: Final = tuple("0123456789")
_WORD_BYTES: Final = frozenset(
    bytes([b]) for b in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"
)


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print the offending pattern to stderr
    return options


@dataclass(frozen=True, slots=True)
class _Compiled:
    spec: _Spec
    regex: Any  # re2._Regexp (the module has no type information)
    value_group: int  # named group index for custom detectors, 0 otherwise
    groups: int
    literals: frozenset[int]  # indexes into the literal set; empty: always run
    raw: Any  # the underlying pybind RE2 object, or None (then the public finditer is used)


class DetectorSet:
    """A compiled set of detectors: built-in types (all by default) plus named custom patterns.

    ``types`` selects built-in types (``None``: all of them). ``custom`` maps a detector name to
    an RE2 pattern; the name becomes the finding's type (upper-cased, category ``custom``), and a
    named group ``(?P<value>...)`` marks the part to report (otherwise the whole match).
    Compilation happens here, once; :meth:`scan` only matches. Raises :class:`DetectorError`
    for an unknown type, an invalid name, or a pattern RE2 rejects or that matches empty text.
    """

    def __init__(self, types: Iterable[str] | None = None, custom: Mapping[str, str] | None = None) -> None:
        selected = set(BUILTIN_TYPES) if types is None else set(types)
        unknown = selected - set(BUILTIN_TYPES)
        if unknown:
            raise DetectorError(f"unknown detector type(s): {', '.join(sorted(unknown))}")
        specs = [spec for spec in _SPECS if spec.type in selected]
        for name, pattern in (custom or {}).items():
            specs.append(_custom_spec(name, pattern))
        self._categories: dict[str, str] = {spec.type: spec.category for spec in specs}
        # One pass of an RE2 set of every detector's literal prefilter (case-insensitive) tells
        # which detectors can match at all; the others are skipped. Detectors of personal data
        # without a literal need a digit. A set of plain literals compiles to a small DFA (one
        # state per literal character at most), so the set cannot run out of memory.
        literals = sorted({lit.lower() for spec in specs for lit in (spec.literals or _digits_if_pii(spec))})
        index = {lit: i for i, lit in enumerate(literals)}
        self._literals: Any = None
        if literals:
            options = _options()
            options.case_sensitive = False
            options.max_mem = 64 << 20
            literal_set = re2.Set.SearchSet(options)
            for lit in literals:
                literal_set.Add(re2.escape(lit.encode("utf-8")))
            literal_set.Compile()
            # Set.Match answers "nothing" when it fails, which would skip detectors: prove once
            # that this set finds every one of its literals.
            if sorted(literal_set.Match(" ".join(literals).encode("utf-8")) or ()) != list(
                range(len(literals))
            ):
                raise DetectorError(
                    "the literal prefilter of the detector set does not work on this RE2 build"
                )
            self._literals = literal_set
        self._compiled: tuple[_Compiled, ...] = tuple(
            _compile(spec, frozenset(index[lit.lower()] for lit in (spec.literals or _digits_if_pii(spec))))
            for spec in specs
        )

    @property
    def types(self) -> frozenset[str]:
        """The detector types this set reports."""
        return frozenset(self._categories)

    def category(self, type_: str) -> str:
        """The category (``secret``, ``pii`` or ``custom``) of a type in this set."""
        return self._categories[type_]

    def types_for(
        self, categories: Collection[str] | None = None, types: Collection[str] | None = None
    ) -> frozenset[str]:
        """The types of this set in ``categories`` and ``types`` (``None``: no restriction).

        Raises :class:`DetectorError` for a type or category this set does not know, so a
        misspelt rule fails at load time instead of silently masking nothing.
        """
        chosen = set(self._categories)
        if categories is not None:
            known = set(self._categories.values()) | {CATEGORY_SECRET, CATEGORY_PII, CATEGORY_CUSTOM}
            bad = set(categories) - known
            if bad:
                raise DetectorError(f"unknown detector category(ies): {', '.join(sorted(bad))}")
            chosen = {t for t in chosen if self._categories[t] in categories}
        if types is not None:
            bad = set(types) - set(self._categories)
            if bad:
                raise DetectorError(f"detector type(s) not in this set: {', '.join(sorted(bad))}")
            chosen &= set(types)
        return frozenset(chosen)

    def patterns(self) -> dict[str, list[str]]:
        """The RE2 pattern(s) of each type of this set (read-only; streaming sizes its hold-back
        window from them, see :mod:`skillgate.policy.streaming`)."""
        out: dict[str, list[str]] = {}
        for compiled in self._compiled:
            out.setdefault(compiled.spec.type, []).append(compiled.spec.pattern)
        return out

    def scan(
        self,
        text: str,
        *,
        types: Collection[str] | None = None,
        prefer: Collection[str] | None = None,
    ) -> list[Finding]:
        """Find values in ``text``: non-overlapping, sorted by position, validated.

        ``types`` restricts the scan to those types (before overlaps are resolved, so a type
        that is not asked for never hides one that is). Where candidates overlap, a type in
        ``prefer`` wins over one that is not (masking uses this so that one scan serves both
        the upstream and the record layer), then the more specific detector, then the earlier
        and longer match. Offsets are character offsets into ``text``.
        """
        if not text:
            return []
        data = text.encode("utf-8")
        found = self._literals.Match(data) if self._literals is not None else None
        present = frozenset(found) if found else frozenset()
        # candidates: (rank, byte start, byte end, type, category, value)
        candidates: list[tuple[int, int, int, str, str, str]] = []
        for compiled in self._compiled:
            spec = compiled.spec
            if types is not None and spec.type not in types:
                continue
            if compiled.literals and present.isdisjoint(compiled.literals):
                continue
            boost = _PREFERRED if prefer is not None and spec.type in prefer else 0
            _run(compiled, data, candidates, boost)
        if not candidates:
            return []
        return _resolve(candidates, data, text)


def _custom_spec(name: str, pattern: str) -> _Spec:
    if (
        not isinstance(name, str)
        or not name
        or not (name[0].isalpha() and name.replace("_", "").isalnum())
        or not name.isascii()
    ):
        raise DetectorError(
            f"custom detector name {name!r} must start with a letter and use only letters, digits and _"
        )
    type_ = name.upper()
    if type_ in BUILTIN_TYPES:
        raise DetectorError(f"custom detector {name!r} has the name of a built-in detector")
    if not isinstance(pattern, str) or not pattern:
        raise DetectorError(f"custom detector {name!r}: the pattern must be a non-empty string")
    return _Spec(type_, CATEGORY_CUSTOM, pattern, _CUSTOM_PRIORITY, named_value=True)


def _digits_if_pii(spec: _Spec) -> tuple[str, ...]:
    return _HAS_DIGIT if spec.category == CATEGORY_PII else ()


def _compile(spec: _Spec, literals: frozenset[int] = frozenset()) -> _Compiled:
    try:
        regex = re2.compile(spec.pattern.encode("utf-8"), _options())
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace")
            if exc.args and isinstance(exc.args[0], bytes)
            else str(exc)
        )
        raise DetectorError(
            f"detector {spec.type}: pattern rejected by RE2 ({reason}); RE2 supports no backreferences or "
            "lookaround, see https://github.com/google/re2/wiki/Syntax"
        ) from None
    value_group = 0
    if spec.named_value:
        value_group = regex.groupindex.get(b"value", 0)
        if regex.fullmatch(b"") is not None:
            raise DetectorError(f"detector {spec.type}: pattern matches the empty string")
    raw = getattr(regex, "_regexp", None) if _UNANCHORED is not None else None
    return _Compiled(spec, regex, value_group, regex.groups, literals, raw)


def _spans(compiled: _Compiled, data: bytes) -> Iterator[list[tuple[int, int]]]:
    """The spans (whole match, then each group) of every non-overlapping match, left to right.

    This is what ``re2``'s ``finditer`` does for bytes, without building a match object per
    match and re-checking the group count on every ``span()`` call (a third of the scan time
    on text with many candidates). ``_regexp`` is google-re2's compiled ``RE2``; when a
    version lacks it, the public ``finditer`` is used instead (tested).
    """
    raw = compiled.raw
    if raw is None:
        for match in compiled.regex.finditer(data):
            yield [match.span(g) for g in range(compiled.groups + 1)]
        return
    pos, stop = 0, len(data)
    while pos <= stop:
        spans = raw.Match(_UNANCHORED, data, pos, stop)
        start, end = spans[0]
        if start < 0:
            return
        yield spans
        pos = end if end > start else end + 1


def _run(
    compiled: _Compiled, data: bytes, out: list[tuple[int, int, int, str, str, str]], boost: int = 0
) -> None:
    spec = compiled.spec
    validate = spec.validate
    named = spec.named_value
    value_group = compiled.value_group
    word_start = spec.word_start
    rank = spec.priority + boost
    for spans in _spans(compiled, data):
        if named:
            start, end = spans[value_group]
        elif len(spans) > 1:
            start, end = spans[0]
            for span in spans[1:]:
                if span[0] >= 0:
                    start, end = span
                    break
        else:
            start, end = spans[0]
        if start < 0 or end <= start:
            continue
        if word_start and start and data[start - 1 : start] in _WORD_BYTES:
            continue
        value = data[start:end].decode("utf-8")
        if validate is not None:
            keep = validate(value, data[max(0, start - 32) : start], data[end : end + 8])
            if keep is None or keep <= 0:
                continue
            if keep < len(value):
                value = value[:keep]
                end = start + len(value.encode("utf-8"))
        elif is_placeholder(value):
            continue
        out.append((rank, start, end, spec.type, spec.category, value))


def _resolve(candidates: list[tuple[int, int, int, str, str, str]], data: bytes, text: str) -> list[Finding]:
    """Keep the most specific of overlapping candidates, then map byte to character offsets."""
    candidates.sort(key=lambda c: (-c[0], c[1], c[1] - c[2]))
    starts: list[int] = []
    ends: list[int] = []
    kept: list[tuple[int, int, int, str, str, str]] = []
    for cand in candidates:
        _, start, end, *_ = cand
        i = bisect_left(starts, start)
        if i > 0 and ends[i - 1] > start:
            continue
        if i < len(starts) and starts[i] < end:
            continue
        starts.insert(i, start)
        ends.insert(i, end)
        kept.insert(i, cand)
    if len(data) == len(text):  # ASCII: byte offsets are character offsets
        return [Finding(t, c, s, e, v) for _, s, e, t, c, v in kept]
    findings: list[Finding] = []
    byte_pos = char_pos = 0
    for _, s, _e, t, c, v in kept:
        char_pos += len(data[byte_pos:s].decode("utf-8"))
        byte_pos = s
        findings.append(Finding(t, c, char_pos, char_pos + len(v), v))
    return findings
