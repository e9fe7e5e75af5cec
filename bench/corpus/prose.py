"""Generated prose for the corpus: the text around positives, and clean documents on their own.

The sentences are what prompts to a coding assistant or a support bot look like: tickets, status
updates, meeting notes, questions about code. Many carry *near misses* on purpose — version
numbers, dates and times, amounts, order and ticket numbers, UUIDs, commit hashes, ports,
ISBNs, coordinates, talk about passwords and tokens with no credential in it — because those are
where detectors of secrets and personal data misfire. No sentence contains a real secret or a
piece of personal data (names appear, but names alone are not a detector type here).
"""

from __future__ import annotations

import random
import string
import uuid

from bench.corpus.fakes import CITIES, COMPANIES, FIRST, HEX, LAST, WORDS, rs

_SENTENCES = (
    "Can you review the pull request for the {word} service before {weekday}?",
    "The deploy of version {version} went out at {time} and error rates stayed under {pct}%.",
    "We upgraded from {version} to {version2} and the build is {pct}% faster.",
    "Order #{order} shipped on {date}; the invoice total was ${amount}.",
    "Ticket {ticket} is blocked until the {word} migration finishes.",
    "The request id was {uuid} if you need to find it in the logs.",
    "Commit {sha} introduced the regression in the {word} parser.",
    "Please summarise the attached report in three bullet points for {first}.",
    "The meeting with {company} moved to {weekday} at {time} in {city}.",
    "Our API returns 429 when a client sends more than {n} requests per minute.",
    "Set max_tokens to {n} and temperature to 0.{digit} for this task.",
    "The password policy requires at least {digit2} characters, one digit and one symbol.",
    "Never paste your API key into a prompt; read it from the environment instead.",
    "Rotate the token every {digit2} days and store it in the secrets manager.",
    "The service listens on port {port} and talks to the database on port 5432.",
    "ISBN {isbn} is the second edition of the book {first} recommended.",
    "The office is at {lat}, {lon}, next to the {word} station.",
    "Revenue grew {pct}% quarter over quarter to ${amount} million.",
    "Run `pip install {word}=={version}` and restart the worker.",
    "Python {pyver} fixed the bug; we still run {pyver2} in production.",
    "The firmware build {version} is rolling out to {n} devices in {city}.",
    "Error E{n}: the {word} queue was full at {time} UTC on {date}.",
    "The batch job processed {big} rows in {n} seconds.",
    "Use a UUID like {uuid} as the idempotency key for each call.",
    "The SHA-256 of the artifact is {sha256}.",
    "Tracking number {tracking} shows the parcel left {city} on {date}.",
    "The chart uses colours {color} and {color2} for the two series.",
    "Draft a polite reply to {first} explaining that the refund takes {digit2} business days.",
    "Translate the release notes for {version} into German and French.",
    "Explain the difference between a mutex and a semaphore with an example in Rust.",
    "Why does `git rebase -i HEAD~{digit}` drop my merge commits?",
    "Write a SQL query that returns the top {digit2} customers by revenue for {year}.",
    "The cron schedule is `{cron}` so it runs at {time} every weekday.",
    "Latency p99 went from {n} ms to {n2} ms after the cache change.",
    "Our SLA promises {pct}.9% uptime, measured monthly.",
    "The {word} feature flag is on for {pct}% of users in {city}.",
    "Sprint {digit2} goals: finish the {word} refactor and close ticket {ticket}.",
    "We store the session token in an HttpOnly cookie, never in local storage.",
    "The user typed their password wrong {digit} times and the account locked for {digit2} minutes.",
    "Invoice INV-{year}-{order} is due on {date}; the amount is {amount} EUR.",
    "The coordinates in the log are ({lat}, {lon}) and the altitude is {n} m.",
    "Build {build} failed on step {digit} with exit code {digit}.",
    "Our customer number for {company} is {cust}.",
    "The matrix has shape ({n}, {n2}) and {big} non-zero entries.",
    "Between {time} and {time2} the queue depth peaked at {big} messages.",
    "{first} {last} from {company} asked whether the {word} export supports CSV.",
    "The docs say to call the /v1/messages endpoint with the anthropic-version header.",
    "Benchmark: {n} requests per second at {digit2} connections, {pct}% CPU.",
    "Add a unit test for the case where the {word} list is empty.",
    "Bump the dependency to ^{version} and regenerate the lock file.",
    "The installer reports version {version4} and asks for a reboot.",
    "The event timestamp was {epoch_us} microseconds since the epoch ({epoch_ms} in milliseconds).",
    "Account {acct} was created on {date}; its plan renews yearly.",
    "Call the function with a[1::2] to take every other element, or a[::-1] to reverse it.",
    "The meeting notes say: agenda at 10:30:00, demo at 11:15:00, retro at 16:45:00.",
)

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")


def _isbn(rng: random.Random) -> str:
    digits = [9, 7, 8] + [rng.randrange(10) for _ in range(9)]
    check = (10 - sum(d * (1 if i % 2 == 0 else 3) for i, d in enumerate(digits)) % 10) % 10
    s = "".join(map(str, digits)) + str(check)
    return f"{s[:3]}-{s[3]}-{s[4:7]}-{s[7:12]}-{s[12]}"


def _fill(rng: random.Random) -> dict[str, str]:
    year = rng.randrange(2019, 2027)
    return {
        "word": rng.choice(WORDS),
        "weekday": rng.choice(_WEEKDAYS),
        "version": f"{rng.randrange(0, 12)}.{rng.randrange(0, 30)}.{rng.randrange(0, 20)}",
        "version2": f"{rng.randrange(0, 12)}.{rng.randrange(0, 30)}.{rng.randrange(0, 20)}",
        "pyver": f"3.{rng.randrange(8, 14)}.{rng.randrange(0, 12)}",
        "pyver2": f"3.{rng.randrange(8, 14)}.{rng.randrange(0, 12)}",
        "time": f"{rng.randrange(0, 24):02d}:{rng.randrange(0, 60):02d}",
        "time2": f"{rng.randrange(0, 24):02d}:{rng.randrange(0, 60):02d}:{rng.randrange(0, 60):02d}",
        "date": f"{year}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
        "year": str(year),
        "pct": str(rng.randrange(1, 100)),
        "order": str(rng.randrange(10_000, 99_999_999)),
        "amount": f"{rng.randrange(1, 99_999):,}.{rng.randrange(100):02d}",
        "ticket": f"{rng.choice(('JIRA', 'OPS', 'SEC', 'PLAT'))}-{rng.randrange(100, 99_999)}",
        "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "sha": rs(rng, HEX, rng.choice((7, 12, 40))),
        "sha256": rs(rng, HEX, 64),
        "first": rng.choice(FIRST).capitalize(),
        "last": rng.choice(LAST).capitalize(),
        "company": rng.choice(COMPANIES).capitalize(),
        "city": rng.choice(CITIES),
        "n": str(rng.randrange(2, 5000)),
        "n2": str(rng.randrange(2, 5000)),
        "big": f"{rng.randrange(10_000, 9_999_999_999):,}",
        "digit": str(rng.randrange(1, 10)),
        "digit2": str(rng.randrange(10, 100)),
        "port": str(rng.randrange(1024, 65535)),
        "isbn": _isbn(rng),
        "lat": f"{rng.uniform(-80, 80):.4f}",
        "lon": f"{rng.uniform(-170, 170):.4f}",
        "tracking": "1Z" + rs(rng, string.ascii_uppercase + string.digits, 16),
        "color": "#" + rs(rng, HEX, 6),
        "color2": "#" + rs(rng, HEX, 6),
        "cron": f"{rng.randrange(60)} {rng.randrange(24)} * * 1-5",
        "build": f"{year}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}.{rng.randrange(1, 99)}",
        "cust": f"C-{rng.randrange(100_000, 999_999)}",
        "version4": f"{rng.randrange(1, 10)}.{rng.randrange(0, 21)}.{rng.randrange(0, 21)}.{rng.randrange(0, 200)}",
        "epoch_us": str(rng.randrange(1_600_000_000_000_000, 1_800_000_000_000_000)),
        "epoch_ms": str(rng.randrange(1_600_000_000_000, 1_800_000_000_000)),
        "acct": str(rng.randrange(10**9, 10**12)),
    }


def sentence(rng: random.Random) -> str:
    """One generated sentence (clean: no secret, no personal data)."""
    return rng.choice(_SENTENCES).format(**_fill(rng))


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def document(rng: random.Random, target_chars: int) -> str:
    """A clean prose document of about ``target_chars`` characters, in paragraphs."""
    parts: list[str] = []
    size = 0
    while size < target_chars:
        p = paragraph(rng, rng.randrange(2, 6))
        parts.append(p)
        size += len(p) + 2
    return "\n\n".join(parts)
