"""Format-valid fake values for every detector type, from a seeded ``random.Random``.

Every value has the real format: Luhn-valid card numbers with real issuer prefixes, IBANs with
correct mod-97 check digits and country lengths, SSNs in issued ranges, base32 AWS key ids,
JWTs whose header is real JSON, and so on. None of them is a live credential: they come from a
pseudo-random generator. They are built to be *found*: a detector that misses one misses the
real thing.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import string
from collections.abc import Callable
from urllib.parse import quote

ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"
B64URL = ALNUM + "-_"
HEX = "0123456789abcdef"
BASE32 = string.ascii_uppercase + "234567"

# fmt: off
FIRST = (
    "james", "mary", "robert", "patricia", "john", "jennifer", "michael", "linda", "david",
    "elizabeth", "william", "barbara", "richard", "susan", "joseph", "jessica", "thomas", "sarah",
    "carlos", "maria", "wei", "li", "yuki", "hiroshi", "amara", "kwame", "priya", "arjun", "sofia",
    "lucas", "emma", "noah", "olivia", "liam", "ana", "mateo", "chloe", "hugo", "ingrid", "lars",
    "fatima", "omar", "leila", "tomasz", "agnieszka",
)
LAST = (
    "smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis", "rodriguez",
    "martinez", "hernandez", "lopez", "wilson", "anderson", "taylor", "moore", "jackson", "martin",
    "lee", "thompson", "white", "harris", "clark", "lewis", "walker", "hall", "young", "king",
    "nakamura", "tanaka", "chen", "wang", "kumar", "patel", "okafor", "mensah", "schmidt", "muller",
    "dubois", "rossi", "kowalski", "novak",
)
COMPANIES = (
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell",
    "cyberdyne", "soylent", "vandelay", "northwind", "contoso", "fabrikam", "tailspin",
    "adventureworks", "litware", "proseware", "lucerne",
)
# fmt: on
TLDS = (
    "com",
    "com",
    "com",
    "org",
    "net",
    "io",
    "co.uk",
    "de",
    "fr",
    "dev",
    "ai",
    "app",
    "co",
    "nl",
    "com.au",
    "ca",
)
# Words for human-chosen passwords: none of them is a placeholder word ("test", "pass", "secret"...).
# fmt: off
WORDS = (
    "harbor", "tulip", "falcon", "granite", "meadow", "copper", "orbit", "cactus", "lantern",
    "violet", "maple", "summit", "river", "canyon", "pepper", "walnut", "ember", "glacier",
    "nimbus", "quartz", "saffron", "thistle", "willow", "zephyr", "bramble", "cobalt", "juniper",
    "marble", "oyster", "pebble", "raven", "sparrow", "timber", "velvet",
)
# fmt: on
REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-2", "ap-northeast-1")
CITIES = ("Berlin", "Austin", "Lagos", "Osaka", "Lyon", "Porto", "Denver", "Pune", "Leeds", "Quito")


def rs(rng: random.Random, alphabet: str, n: int) -> str:
    """``n`` characters drawn from ``alphabet``."""
    return "".join(rng.choice(alphabet) for _ in range(n))


def mixed(rng: random.Random, alphabet: str, n: int) -> str:
    """Like :func:`rs` but with at least one upper, one lower and one digit (as real keys have)."""
    while True:
        s = rs(rng, alphabet, n)
        if any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s):
            return s


def first(rng: random.Random) -> str:
    return rng.choice(FIRST)


def last(rng: random.Random) -> str:
    return rng.choice(LAST)


def company(rng: random.Random) -> str:
    return rng.choice(COMPANIES)


def human_password(rng: random.Random) -> str:
    """A human-chosen password: words, a symbol, digits, some capitals (8+ characters)."""
    a, b = rng.choice(WORDS), rng.choice(WORDS)
    style = rng.randrange(4)
    if style == 0:
        return f"{a.capitalize()}{rng.choice('!#%*-_.')}{b.capitalize()}{rng.randrange(10, 100)}"
    if style == 1:
        leet = a.replace("e", "3").replace("a", "4").replace("o", "0")
        return f"{leet}{rng.choice('!#%*')}{b}{rng.randrange(100, 1000)}"
    if style == 2:
        return f"{a.capitalize()}{b.capitalize()}{rng.randrange(1990, 2030)}{rng.choice('!?.#')}"
    return f"{rng.randrange(10, 99)}{a}{rng.choice('!#%*-_')}{b.upper()}"


def random_password(rng: random.Random) -> str:
    """A generated password (password-manager style), URL- and connection-string-safe."""
    return mixed(rng, ALNUM + "!#%*-_.~", rng.randrange(12, 25))


def password(rng: random.Random) -> str:
    return human_password(rng) if rng.random() < 0.5 else random_password(rng)


# --- secrets -------------------------------------------------------------------------------------


def aws_access_key(rng: random.Random) -> str:
    return rng.choice(("AKIA", "AKIA", "AKIA", "ASIA")) + rs(rng, BASE32, 16)


def aws_secret_key(rng: random.Random) -> str:
    return mixed(rng, B64, 40)


def gcp_api_key(rng: random.Random) -> str:
    return "AIza" + rs(rng, B64URL, 35)


def azure_storage_key(rng: random.Random) -> str:
    return base64.b64encode(rng.randbytes(64)).decode()


def azure_shared_access_key(rng: random.Random) -> str:
    return base64.b64encode(rng.randbytes(32)).decode()


def azure_sas_sig(rng: random.Random) -> str:
    return quote(base64.b64encode(rng.randbytes(32)).decode(), safe="")


def github_token(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        return "github_pat_" + rs(rng, ALNUM, 22) + "_" + rs(rng, ALNUM, 59)
    return rng.choice(("ghp_", "ghp_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_")) + mixed(rng, ALNUM, 36)


def gitlab_token(rng: random.Random) -> str:
    return rng.choice(("glpat-", "glpat-", "glpat-", "gldt-", "glrt-")) + mixed(rng, ALNUM + "_-", 20)


def slack_token(rng: random.Random) -> str:
    kind = rng.randrange(3)
    a, b = rng.randrange(10**10, 10**13), rng.randrange(10**10, 10**13)
    if kind == 0:
        return f"xoxb-{a}-{b}-{mixed(rng, ALNUM, 24)}"
    if kind == 1:
        return f"xoxp-{a}-{b}-{rng.randrange(10**10, 10**13)}-{rs(rng, HEX, 32)}"
    return f"xapp-1-A{rs(rng, string.ascii_uppercase + string.digits, 10)}-{a}-{rs(rng, HEX, 64)}"


def slack_webhook(rng: random.Random) -> str:
    upper = string.ascii_uppercase + string.digits
    return (
        f"https://hooks.slack.com/services/T{rs(rng, upper, 8)}/B{rs(rng, upper, 10)}/{mixed(rng, ALNUM, 24)}"
    )


def stripe_key(rng: random.Random) -> str:
    prefix = rng.choice(("sk_live_", "sk_live_", "rk_live_", "pk_live_", "sk_test_"))
    return prefix + mixed(rng, ALNUM, rng.choice((24, 34, 99)))


def anthropic_key(rng: random.Random) -> str:
    return "sk-ant-api03-" + mixed(rng, B64URL, 93) + "AA"


def openai_key(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return "sk-proj-" + mixed(rng, B64URL, 156)
    if kind == 1:
        return "sk-" + mixed(rng, ALNUM, 20) + "T3BlbkFJ" + mixed(rng, ALNUM, 20)
    return "sk-svcacct-" + mixed(rng, B64URL, 120)


def pem_body(rng: random.Random, nbytes: int) -> list[str]:
    b64 = base64.b64encode(b"\x30\x82\x04\xa4" + rng.randbytes(nbytes)).decode()
    return [b64[i : i + 64] for i in range(0, len(b64), 64)]


def private_key(rng: random.Random) -> str:
    kind = rng.choice(
        ("RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "ENCRYPTED PRIVATE KEY")
    )
    lines = pem_body(rng, rng.choice((120, 600, 1190)) if kind != "EC PRIVATE KEY" else 118)
    return f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----"


def pgp_private_key(rng: random.Random) -> str:
    lines = pem_body(rng, rng.choice((900, 1800)))
    crc = base64.b64encode(rng.randbytes(3)).decode()
    return (
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\n\n"
        + "\n".join(lines)
        + f"\n={crc}\n-----END PGP PRIVATE KEY BLOCK-----"
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(rng: random.Random) -> str:
    alg = rng.choice(("HS256", "RS256", "ES256"))
    header = {"alg": alg, "typ": "JWT"} if rng.random() < 0.7 else {"alg": alg, "kid": rs(rng, HEX, 16)}
    payload = {
        "sub": str(rng.randrange(10**6, 10**9)),
        "name": f"{first(rng).capitalize()} {last(rng).capitalize()}",
        "iat": rng.randrange(1_600_000_000, 1_800_000_000),
        "scope": rng.choice(("read", "read write", "admin")),
    }
    sig = rng.randbytes(32 if alg == "HS256" else 256 if alg == "RS256" else 64)
    return ".".join(
        (
            b64url(json.dumps(header, separators=(",", ":")).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(sig),
        )
    )


# --- personal data ---------------------------------------------------------------------------------


def email(rng: random.Random) -> str:
    f, la = first(rng), last(rng)
    local = rng.choice(
        (
            f"{f}.{la}",
            f"{f[0]}{la}",
            f"{f}_{la}",
            f"{f}{rng.randrange(1, 99)}",
            f"{f}.{la}+{rng.choice(WORDS)}",
        )
    )
    domain = rng.choice((company(rng), f"mail.{company(rng)}", f"{company(rng)}-{rng.choice(WORDS)}"))
    return f"{local}@{domain}.{rng.choice(TLDS)}"


def nanp(rng: random.Random) -> tuple[str, str, str]:
    while True:
        area = f"{rng.randrange(2, 10)}{rng.randrange(0, 9)}{rng.randrange(0, 10)}"
        exch = f"{rng.randrange(2, 10)}{rng.randrange(0, 10)}{rng.randrange(0, 10)}"
        if area[1:] != "11" and exch[1:] != "11":
            return area, exch, f"{rng.randrange(0, 10000):04d}"


def phone_us(rng: random.Random) -> str:
    a, e, n = nanp(rng)
    fmt = rng.randrange(6)
    return (
        f"({a}) {e}-{n}",
        f"{a}-{e}-{n}",
        f"{a}.{e}.{n}",
        f"{a} {e} {n}",
        f"+1 {a} {e} {n}",
        f"1-{a}-{e}-{n}",
    )[fmt]


_INTL = (
    ("44", (2, 4, 4)), ("44", (4, 6)), ("49", (2, 8)), ("49", (3, 7)), ("33", (1, 2, 2, 2, 2)),
    ("81", (2, 4, 4)), ("61", (1, 4, 4)), ("91", (5, 5)), ("34", (3, 3, 3)), ("39", (2, 4, 4)),
    ("31", (2, 3, 4)), ("46", (2, 3, 2, 2)), ("55", (2, 5, 4)), ("52", (2, 4, 4)), ("353", (1, 3, 4)),
    ("86", (3, 4, 4)), ("27", (2, 3, 4)), ("234", (3, 3, 4)), ("65", (4, 4)), ("41", (2, 3, 2, 2)),
)  # fmt: skip


def phone_intl(rng: random.Random) -> str:
    cc, groups = rng.choice(_INTL)
    parts = [str(rng.randrange(1, 10)) + rs(rng, string.digits, g - 1) for g in groups]
    sep = rng.choice((" ", " ", " ", "-", ".", ""))
    return f"+{cc}{' ' if sep == '' else sep}{sep.join(parts)}" if sep else f"+{cc}{''.join(parts)}"


_NATIONAL = ((("0", 2), 4, 4), (("0", 3), 8), (("0", 1), 2, 2, 2, 2), (("0", 4), 6), (("0", 2), 3, 4))


def phone_national(rng: random.Random) -> str:
    """A number in a country's national format (UK, DE, FR, ...): no + and no country code."""
    (trunk, area), *groups = rng.choice(_NATIONAL)
    parts = [trunk + str(rng.randrange(1, 10)) + rs(rng, string.digits, area - 1)]
    parts += [str(rng.randrange(1, 10)) + rs(rng, string.digits, g - 1) for g in groups]
    return " ".join(parts)


def phone(rng: random.Random) -> str:
    return phone_us(rng) if rng.random() < 0.5 else phone_intl(rng)


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + rs(rng, string.digits, length - len(prefix) - 1)
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)


def card_digits(rng: random.Random) -> str:
    brand = rng.randrange(6)
    if brand == 0:
        return luhn_complete("4", 16, rng)
    if brand == 1:
        return luhn_complete(str(rng.randrange(51, 56)), 16, rng)
    if brand == 2:
        return luhn_complete(str(rng.randrange(2221, 2721)), 16, rng)
    if brand == 3:
        return luhn_complete(rng.choice(("34", "37")), 15, rng)
    if brand == 4:
        return luhn_complete(rng.choice(("6011", "65")), 16, rng)
    return luhn_complete(str(rng.randrange(3528, 3590)), 16, rng)


def format_card(digits: str, rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return digits
    sep = " " if style == 1 else "-"
    if len(digits) == 15:
        return sep.join((digits[:4], digits[4:10], digits[10:]))
    return sep.join(digits[i : i + 4] for i in range(0, len(digits), 4))


def payment_card(rng: random.Random) -> str:
    return format_card(card_digits(rng), rng)


_IBAN_BBAN = {
    "DE": "n18", "GB": "a4n14", "FR": "n23", "ES": "n20", "IT": "a1n22", "NL": "a4n10", "BE": "n12",
    "CH": "n17", "AT": "n16", "PL": "n24", "SE": "n20", "IE": "a4n14", "PT": "n21", "NO": "n11",
    "DK": "n14", "FI": "n14",
}  # fmt: skip


def iban(rng: random.Random) -> str:
    country = rng.choice(sorted(_IBAN_BBAN))
    spec = _IBAN_BBAN[country]
    bban = ""
    i = 0
    while i < len(spec):
        kind = spec[i]
        j = i + 1
        while j < len(spec) and spec[j].isdigit():
            j += 1
        n = int(spec[i + 1 : j])
        bban += rs(rng, string.ascii_uppercase if kind == "a" else string.digits, n)
        i = j
    numeric = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    compact = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    if rng.random() < 0.5:
        return compact
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def ssn(rng: random.Random) -> str:
    while True:
        area = rng.randrange(1, 900)
        if area != 666:
            break
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def ipv4(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    if kind == 1:
        return f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    if kind == 2:
        return f"172.{rng.randrange(16, 32)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    while True:
        first_octet = rng.randrange(1, 224)
        if first_octet not in (10, 127):
            return f"{first_octet}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def ipv6(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        value = (0xFE80 << 112) | rng.getrandbits(64)
    elif kind == 1:
        value = (0x2001_0DB8 << 96) | rng.getrandbits(rng.choice((16, 32, 64, 80)))
    else:
        value = (rng.randrange(0x2001, 0x2C00) << 112) | rng.getrandbits(rng.choice((48, 64, 96, 112)))
    address = ipaddress.IPv6Address(value)
    return address.exploded if rng.random() < 0.15 else address.compressed


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "AWS_ACCESS_KEY": aws_access_key,
    "AWS_SECRET_KEY": aws_secret_key,
    "GCP_API_KEY": gcp_api_key,
    "AZURE_STORAGE_KEY": azure_storage_key,
    "AZURE_CONNECTION_KEY": azure_shared_access_key,
    "GITHUB_TOKEN": github_token,
    "GITLAB_TOKEN": gitlab_token,
    "SLACK_TOKEN": slack_token,
    "SLACK_WEBHOOK": slack_webhook,
    "STRIPE_KEY": stripe_key,
    "ANTHROPIC_API_KEY": anthropic_key,
    "OPENAI_API_KEY": openai_key,
    "PRIVATE_KEY": private_key,
    "JWT": jwt,
    "URL_PASSWORD": lambda rng: quote(password(rng), safe="-_.~!*"),
    "CONNECTION_STRING_PASSWORD": password,
    "GENERIC_SECRET": lambda rng: rng.choice(
        (mixed(rng, ALNUM, rng.randrange(16, 41)), rs(rng, HEX, 32), mixed(rng, B64URL, 32), rs(rng, HEX, 64))
    ),
    "EMAIL": email,
    "PHONE": phone,
    "PAYMENT_CARD": payment_card,
    "IBAN": iban,
    "US_SSN": ssn,
    "IPV4": ipv4,
    "IPV6": ipv6,
}
"""One generator per detector type (the value a ``{TYPE}`` slot of a template receives)."""
