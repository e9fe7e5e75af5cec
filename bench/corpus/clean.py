"""Clean documents: real Python code from the venv, and generated configs full of near misses.

**Library files.** Chunks of the venv's ``site-packages``: Python, stubs, Cython and C sources,
Markdown and text docs, JSON and CSV data, package METADATA and RECORD files (test directories and
test files are skipped, because test fixtures are full of credential-shaped literals). Real code does contain real values (authors' email addresses, documentation IPs,
example keys). A chunk is labelled by an *oracle* that is independent of the detectors — broad
patterns plus standard-library validators (``ipaddress``, a Luhn and a mod-97 check) — and a
chunk in which the oracle sees anything is left out of the clean set, with the reason counted
and reported. The oracle is deliberately broader than the detectors where it can be (any
``scheme://user:pw@`` URL, any Luhn-valid digit run, any dotted quad that is a routable address),
so an excluded chunk is one that really holds such a value, not a near miss.

**Configs.** Generated ``.env`` files, YAML, JSON, Terraform and Python settings whose values are
placeholders (``changeme``, ``<API_KEY>``, ``********``), references (``${DB_PASSWORD}``,
``os.environ["TOKEN"]``, ``${{ secrets.GITHUB_TOKEN }}``), documentation URLs
(``postgres://user:password@localhost``), hashes and ids under non-secret keys, and UI strings
that talk about passwords and tokens. None of them is a credential; every one is a classic false
positive of secret scanners.
"""

from __future__ import annotations

import ipaddress
import random
import string
import sysconfig
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import re2

from bench.corpus.fakes import COMPANIES, HEX, WORDS, rs

# --- the oracle ------------------------------------------------------------------------------------

# fmt: off
_FILE_EXTENSIONS = frozenset((
    "png", "jpg", "jpeg", "gif", "svg", "css", "js", "ts", "py", "json", "yaml", "yml",
    "txt", "html", "xml", "zip", "gz", "pdf", "md", "rst", "ini", "cfg", "toml",
))
# fmt: on
_EMAIL = re2.compile(rb"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
_URL_CREDENTIALS = re2.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:]*:[^\s/@]+@")
_TOKENS = re2.compile(
    rb"(?:AKIA|ASIA)[A-Z0-9]{16}|AIza[0-9A-Za-z_\-]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_|glpat-|"
    rb"xox[abprse]-|hooks\.slack\.com/|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}|sk-[A-Za-z0-9_\-]{20,}|"
    rb"eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}|AccountKey=|SharedAccessKey=|PRIVATE KEY-----"
)
_DOTTED_QUAD = re2.compile(rb"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_IPV6_CANDIDATE = re2.compile(rb"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
_DIGIT_RUN = re2.compile(rb"[0-9](?:[ \-]?[0-9]){12,18}")
_SSN = re2.compile(rb"[0-9]{3}-[0-9]{2}-[0-9]{4}")
_PHONE = re2.compile(
    rb"\+[0-9]{1,3}[ \-.]?\(?[0-9]{1,4}\)?(?:[ \-.]?[0-9]{2,5}){2,5}|\([0-9]{3}\) ?[0-9]{3}-[0-9]{4}"
    rb"|[0-9]{3}[\-.][0-9]{3}[\-.][0-9]{4}"
)
_IBAN = re2.compile(rb"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _mod97(compact: str) -> bool:
    if len(compact) < 15 or len(compact) > 34:
        return False
    return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


def oracle(text: str) -> list[str]:
    """What real sensitive values ``text`` holds, by kind (empty: the text is clean)."""
    data = text.encode("utf-8")
    found: list[str] = []
    for m in _EMAIL.finditer(data):
        tld = m.group().rsplit(b".", 1)[-1].decode().lower()
        if tld.isalpha() and len(tld) >= 2 and tld not in _FILE_EXTENSIONS:
            found.append("email")
            break
    if _URL_CREDENTIALS.search(data):
        found.append("url-credentials")
    if _TOKENS.search(data):
        found.append("token-or-key")
    for m in _DOTTED_QUAD.finditer(data):
        try:
            addr = ipaddress.IPv4Address(m.group().decode())
        except ValueError:
            continue
        if not (addr.is_loopback or addr.is_unspecified or str(addr).startswith("255.")):
            found.append("ipv4")
            break
    for m in _IPV6_CANDIDATE.finditer(data):
        candidate = m.group().decode().strip(":.")
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        groups = [g for g in candidate.split(":") if g]
        if len(groups) >= 3 or candidate.lower().startswith(("fe80:", "2001:")):
            found.append("ipv6")
            break
    for m in _DIGIT_RUN.finditer(data):
        digits = bytes(c for c in m.group() if 48 <= c <= 57).decode()
        if 13 <= len(digits) <= 19 and _luhn(digits):
            found.append("card-like")
            break
    for m in _SSN.finditer(data):
        area, group, serial = m.group().split(b"-")
        if area not in (b"000", b"666") and area[:1] != b"9" and group != b"00" and serial != b"0000":
            found.append("ssn-like")
            break
    if _PHONE.search(data):
        found.append("phone-like")
    for m in _IBAN.finditer(data):
        if _mod97(m.group().replace(b" ", b"").decode()):
            found.append("iban")
            break
    return found


# --- code from site-packages -----------------------------------------------------------------------


def _is_test_path(path: Path) -> bool:
    parts = {p.lower() for p in path.parts}
    name = path.name.lower()
    return (
        bool(parts & {"tests", "test", "testing", "testcases"})
        or name.startswith("test_")
        or name.endswith("_test.py")
        or name == "conftest.py"
    )


LIBRARY_SUFFIXES = frozenset(
    {".py", ".pyi", ".pyx", ".pxd", ".h", ".c", ".cc", ".md", ".txt", ".json", ".csv"}
)
"""Files of the venv's site-packages taken as clean text: code in Python, Cython and C, docs, data."""
LIBRARY_NAMES = frozenset({"METADATA", "RECORD"})
"""Package metadata (prose, with authors' addresses the oracle catches) and RECORD (file hashes)."""


def site_packages() -> Path:
    """The venv's ``site-packages`` (where the clean code comes from)."""
    return Path(sysconfig.get_paths()["purelib"])


def code_chunks(rng: random.Random, count: int, root: Path | None = None) -> Iterator[tuple[str, str]]:
    """Up to ``count`` chunks ``(origin, text)`` of 0.5 to 4 KB of library files, in seeded order.

    Files are listed sorted and shuffled with ``rng``, so the same venv and seed give the same
    chunks. At most three chunks come from one file, for variety.
    """
    base = root or site_packages()
    files = sorted(
        p
        for p in base.rglob("*")
        if (p.suffix in LIBRARY_SUFFIXES or p.name in LIBRARY_NAMES)
        and p.is_file()
        and not _is_test_path(p.relative_to(base))
    )
    rng.shuffle(files)
    produced = 0
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        lines = source.splitlines(keepends=True)
        i = 0
        taken = 0
        while i < len(lines) and taken < 3 and produced < count:
            target = rng.randrange(500, 4000)
            chunk: list[str] = []
            size = 0
            while i < len(lines) and size < target:
                chunk.append(lines[i])
                size += len(lines[i])
                i += 1
            text = "".join(chunk)
            if len(text.strip()) < 200:
                continue
            yield f"{path.relative_to(base)}:{i - len(chunk) + 1}", text
            taken += 1
            produced += 1
            i += rng.randrange(0, 200)  # skip ahead, so chunks of one file are not contiguous
        if produced >= count:
            return


def clean_code(rng: random.Random, count: int) -> tuple[list[tuple[str, str]], Counter[str]]:
    """Library code chunks the oracle finds clean, and why the others were left out."""
    kept: list[tuple[str, str]] = []
    excluded: Counter[str] = Counter()
    for origin, text in code_chunks(rng, count * 2):
        reasons = oracle(text)
        if reasons:
            excluded.update(reasons)
            continue
        kept.append((origin, text))
        if len(kept) >= count:
            break
    return kept, excluded


# --- generated configs with near misses -------------------------------------------------------------

_CONFIG_TEMPLATES = (
    "# copy to .env and fill in\nDB_HOST=localhost\nDB_PORT=5432\nDB_PASSWORD=changeme\nAPI_KEY=your-api-key-here\n"
    "SECRET_KEY=\nREDIS_URL=redis://localhost:6379/{digit}\nDEBUG=true\nMAX_TOKENS={n}\n",
    "services:\n  db:\n    image: postgres:{major}\n    environment:\n      POSTGRES_USER: {word}\n"
    '      POSTGRES_PASSWORD: ${POSTGRES_PASSWORD}\n      POSTGRES_DB: {word}\n    ports:\n      - "5432:5432"\n',
    "env:\n  - name: DB_PASSWORD\n    valueFrom:\n      secretKeyRef:\n        name: {word}-db\n        key: password\n"
    "  - name: API_TOKEN\n    valueFrom:\n      secretKeyRef:\n        name: {word}-api\n        key: token\n",
    'import os\n\npassword = os.environ["DB_PASSWORD"]\napi_key = settings.API_KEY\n'
    'token = request.headers.get("Authorization")\nclient = Client(api_key=api_key, timeout={digit2})\n',
    '{\n  "type": "object",\n  "properties": {\n    "username": {"type": "string"},\n'
    '    "password": {"type": "string", "minLength": {digit2}},\n    "api_key": {"type": "string", "format": "uuid"}\n  }\n}\n',
    "- name: Publish\n  uses: {word}/publish-action@v{digit}\n  with:\n    token: ${{ secrets.GITHUB_TOKEN }}\n"
    "    api-key: ${{ secrets.PYPI_API_KEY }}\n",
    'resource "aws_db_instance" "{word}" {\n  engine   = "postgres"\n  username = var.db_user\n'
    '  password = var.db_password\n  instance_class = "db.t3.micro"\n}\n',
    "Connect with postgres://user:password@localhost:5432/mydb or set DATABASE_URL.\n"
    "For the proxy use http://user:pass@proxy.example.com:3128 in the docs example.\n",
    '{\n  "login": "Log in",\n  "password": "Password",\n  "forgot_password": "Forgot your password?",\n'
    '  "token_expired": "Your session token has expired, please sign in again",\n  "api_key_help": "Create an API key in settings"\n}\n',
    'image:\n  repository: {company}/{word}\n  tag: "{version}"\nauth:\n  secret: ""\n  apiKey: "<API_KEY>"\n'
    '  password: "********"\n  token: "xxxxxxxxxxxxxxxxxxxx"\n',
    "model: claude-sonnet-4-5\nmax_tokens: {n}\ntokenizer: cl100k_base\ntoken_limit: {n}\ntemperature: 0.{digit}\n",
    '{\n  "name": "{word}",\n  "version": "{version}",\n  "integrity": "sha512-{b64_86}==",\n  "resolved": "https://registry.npmjs.org/{word}/-/{word}-{version}.tgz"\n}\n',
    '{"request_id": "{uuid}", "session_id": "{uuid2}", "sha256": "{hex64}", "status": "ok", "elapsed_ms": {n}}\n',
    'SECRET_KEY = "django-insecure-change-me"\nPASSWORD_HASHERS = ["django.contrib.auth.hashers.Argon2PasswordHasher"]\n'
    "AUTH_PASSWORD_VALIDATORS = []\nSESSION_COOKIE_AGE = {n}\n",
    '[database]\nhost = "{word}.internal"\nport = 5432\npassword_file = "/run/secrets/db_password"\n'
    "token_ttl_seconds = {n}\n",
    "def login(username: str, password: str) -> Token:\n    user = repo.find(username)\n"
    '    if not hasher.verify(password, user.password_hash):\n        raise AuthError("bad password")\n'
    "    token = issue_token(user.id, ttl={n})\n    return token\n",
    'curl -H "Authorization: Bearer $TOKEN" https://api.{company}.com/v1/items\n'
    "export TOKEN=$(vault kv get -field=token secret/{word})\n",
    "commit {hex40}\nAuthor: build bot\nDate:   {date}\n\n    Bump {word} to {version} ({digit2} files changed)\n",
    "pip install {word}=={version} {word2}>={version2}\nnpm install {word}@^{version}\n",
    "const config = {\n  apiKey: process.env.API_KEY,\n  secret: process.env.APP_SECRET,\n  password: getPassword(),\n};\n",
)


def _config_fill(rng: random.Random) -> dict[str, str]:
    return {
        "digit": str(rng.randrange(0, 10)),
        "digit2": str(rng.randrange(10, 100)),
        "n": str(rng.randrange(100, 100_000)),
        "word": rng.choice(WORDS),
        "word2": rng.choice(WORDS),
        "company": rng.choice(COMPANIES),
        "major": str(rng.randrange(12, 18)),
        "version": f"{rng.randrange(0, 10)}.{rng.randrange(0, 30)}.{rng.randrange(0, 20)}",
        "version2": f"{rng.randrange(0, 10)}.{rng.randrange(0, 30)}",
        "b64_86": rs(rng, string.ascii_letters + string.digits + "+/", 86),
        "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "uuid2": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "hex64": rs(rng, HEX, 64),
        "hex40": rs(rng, HEX, 40),
        "date": f"{rng.randrange(2019, 2027)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
    }


_FILL_SLOT = re2.compile(r"\{([a-z][a-z0-9_]*)\}")


def config_document(rng: random.Random) -> str:
    """One or two generated config snippets with placeholders and references, no secret."""
    parts = []
    for _ in range(rng.randrange(1, 3)):
        values = _config_fill(rng)
        template = rng.choice(_CONFIG_TEMPLATES)
        parts.append(_FILL_SLOT.sub(lambda m, v=values: v.get(m.group(1), m.group(0)), template))
    return "\n".join(parts)
