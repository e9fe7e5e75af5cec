"""Attack suite at the ingress (issue 3): forged, stale and mis-scoped tokens over real HTTP.

Every attack goes through the running stack (:func:`identity_stack`: dev issuer, Kafka, the four
services) exactly as a caller's request would. Each must be refused with 401 in the Anthropic
error shape, with ``WWW-Authenticate`` and a request id, without saying which check failed, and
without anything reaching policy: policy reads only ``calls.submitted``, so the proof is that
no message carrying the attack's marker (a unique string in its request body) is on any of the
stack's topics, and that ``calls.submitted`` grew only by the valid control call.

Tokens are forged with the dev issuer's own key files (the same keys its JWKS publishes), so an
attack fails for the one reason it is about and not because the signature is unknown.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from services.cli.stack import Stack
from services.dev_issuer.keys import DevKeys, load_or_create_keys, mint_token, remove_key, rotate_keys
from skillgate import topics
from tests.conftest import wait_for
from tests.integration.conftest import IDENTITY_CALLER_GROUPS
from tests.integration.helpers import read_topics, stack_kafka

pytestmark = pytest.mark.integration

AUDIENCE = "skillgate"
#: The ingress's default ``SKILLGATE_OIDC_MAX_TOKEN_BYTES``.
MAX_TOKEN_BYTES = 16384
#: Words that would tell an attacker which check failed; no refusal may contain them.
ORACLE_WORDS = (
    "signature",
    "signing",
    "audience",
    "aud",
    "issuer",
    "iss",
    "kid",
    "algorithm",
    "alg",
    "nbf",
    "not yet",
    "future",
    "oversized",
    "size",
    "subject",
    "jwks",
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64json(value: Any) -> str:
    return _b64(orjson.dumps(value))


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class Forge:
    """Mints genuine and forged tokens for one stack's dev issuer."""

    def __init__(self, stack: Stack, scratch: Path) -> None:
        self.stack = stack
        self.key_dir = stack.data_dir / "dev-issuer"
        self.scratch = scratch

    @property
    def keys(self) -> DevKeys:
        """The issuer's keys as they are on disk now (they change when a test rotates them)."""
        return load_or_create_keys(self.key_dir)

    def claims(self, **changes: Any) -> dict[str, Any]:
        """Valid claims for a caller; a ``None`` value removes a claim."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.stack.issuer_url,
            "sub": f"attacker-{uuid.uuid4().hex[:8]}",
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
            "groups": list(IDENTITY_CALLER_GROUPS),
        }
        for name, value in changes.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def valid(self, **extra_claims: Any) -> str:
        """A genuine caller token from the issuer's current signing key (``mint_token``)."""
        return mint_token(
            self.key_dir,
            issuer=self.stack.issuer_url,
            audience=AUDIENCE,
            subject=f"caller-{uuid.uuid4().hex[:8]}",
            groups=IDENTITY_CALLER_GROUPS,
            expires_in=300,
            extra_claims=extra_claims or None,
        )

    def signed(self, claims: dict[str, Any], key: RSAKey | None = None, kid: str | None = None) -> str:
        """RS256 over ``claims`` with ``key`` (default: the real signing key) and header ``kid``."""
        keys = self.keys
        header = {"alg": "RS256", "typ": "JWT", "kid": kid or keys.signing_kid}
        return jwt.encode(header, claims, key or keys.signing_key, algorithms=["RS256"])

    def foreign_issuer_keys(self) -> DevKeys:
        """Keys of another (attacker-run) issuer."""
        return load_or_create_keys(self.scratch / "other-issuer")


def _bearer(token: str) -> dict[str, str | bytes]:
    return {"authorization": f"Bearer {token}"}


def _tampered(f: Forge) -> dict[str, str | bytes]:
    header, _, signature = f.valid().split(".")
    forged = _b64json(f.claims(sub="root", groups=["admins", "auditors", "callers"]))
    return _bearer(f"{header}.{forged}.{signature}")


def _flipped_signature(f: Forge) -> dict[str, str | bytes]:
    header, payload, signature = f.valid().split(".")
    raw = bytearray(_unb64(signature))
    raw[-1] ^= 0x01
    return _bearer(f"{header}.{payload}.{_b64(bytes(raw))}")


def _alg_none(variant: str) -> Callable[[Forge], dict[str, str | bytes]]:
    def build(f: Forge) -> dict[str, str | bytes]:
        header = {"alg": variant, "typ": "JWT", "kid": f.keys.signing_kid}
        return _bearer(f"{_b64json(header)}.{_b64json(f.claims())}.")

    return build


def _hs256_with_public_key(f: Forge) -> dict[str, str | bytes]:
    """The classic key-confusion attack: HMAC keyed with the issuer's public key (PEM)."""
    public_pem = f.keys.signing_key.as_pem(private=False)
    signing_input = (
        f"{_b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': f.keys.signing_kid})}.{_b64json(f.claims())}"
    )
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return _bearer(f"{signing_input}.{_b64(mac)}")


def _oversized(f: Forge) -> dict[str, str | bytes]:
    token = f.valid(padding="x" * MAX_TOKEN_BYTES)
    assert len(token) > MAX_TOKEN_BYTES
    return _bearer(token)


def _other_issuer_same_key(f: Forge) -> dict[str, str | bytes]:
    return _bearer(f.signed(f.claims(iss="http://127.0.0.1:1/realms/elsewhere")))


def _other_issuer_own_key(f: Forge) -> dict[str, str | bytes]:
    other = f.foreign_issuer_keys()
    claims = f.claims(iss="http://127.0.0.1:1/realms/elsewhere")
    return _bearer(f.signed(claims, other.signing_key, other.signing_kid))


def _unknown_kid(f: Forge) -> dict[str, str | bytes]:
    other = f.foreign_issuer_keys()
    return _bearer(f.signed(f.claims(), other.signing_key, f"kid-{uuid.uuid4().hex}"))


def _known_kid_foreign_key(f: Forge) -> dict[str, str | bytes]:
    return _bearer(f.signed(f.claims(), f.foreign_issuer_keys().signing_key, f.keys.signing_kid))


#: Token attacks: each builds request headers carrying a token that must be refused as invalid.
INVALID_TOKEN_ATTACKS: dict[str, Callable[[Forge], dict[str, str | bytes]]] = {
    "tampered payload": _tampered,
    "flipped signature byte": _flipped_signature,
    "wrong audience": lambda f: _bearer(f.signed(f.claims(aud="another-api"))),
    "audience missing": lambda f: _bearer(f.signed(f.claims(aud=None))),
    "expired": lambda f: _bearer(f.signed(f.claims(exp=int(time.time()) - 3600))),
    "not yet valid": lambda f: _bearer(f.signed(f.claims(nbf=int(time.time()) + 3600))),
    "issued in the future": lambda f: _bearer(f.signed(f.claims(iat=int(time.time()) + 3600))),
    "no exp": lambda f: _bearer(f.signed(f.claims(exp=None))),
    "no subject": lambda f: _bearer(f.signed(f.claims(sub=None))),
    "alg none": _alg_none("none"),
    "alg None": _alg_none("None"),
    "alg NONE": _alg_none("NONE"),
    "HS256 signed with the public key": _hs256_with_public_key,
    "another issuer, our key": _other_issuer_same_key,
    "another issuer, its own key": _other_issuer_own_key,
    "unknown kid": _unknown_kid,
    "known kid, foreign key": _known_kid_foreign_key,
    "oversized token": _oversized,
    "garbage bearer": lambda f: _bearer("garbage"),
    "garbage segments": lambda f: _bearer("%%%.###.$$$"),
    "header not JSON": lambda f: _bearer(f"{_b64(b'not json')}.{_b64json(f.claims())}.AAAA"),
    "non-ASCII bytes in x-api-key": lambda f: {"x-api-key": b"\xc3\xa9.\xff\xfe.\x80"},
    "wrong audience via x-api-key": lambda f: {"x-api-key": f.signed(f.claims(aud="another-api"))},
}

#: Requests without a bearer token at all: refused as unauthenticated (no ``error=`` in the challenge).
MISSING_CREDENTIAL_ATTACKS: dict[str, Callable[[Forge], dict[str, str | bytes]]] = {
    "no credentials": lambda f: {},
    "Basic scheme": lambda f: {"authorization": "Basic " + base64.b64encode(b"admin:admin").decode()},
    "another scheme": lambda f: {"authorization": f"Token {f.valid()}"},
    "scheme only": lambda f: {"authorization": "Bearer"},
    "empty x-api-key": lambda f: {"x-api-key": ""},
}


@pytest.fixture(scope="module")
def forge(identity_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Forge:
    """Token forging for the identity stack."""
    return Forge(identity_stack, Path(tmp_path_factory.mktemp("forge")))


def _raw(headers: dict[str, str | bytes]) -> list[tuple[bytes, bytes]]:
    """Headers as bytes, so attacks can send values that are not ASCII text."""
    return [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]


def _call(stack: Stack, headers: dict[str, str | bytes], marker: str) -> httpx.Response:
    """POST a Messages request whose body carries ``marker`` to the ingress."""
    body = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": marker}]}
    return httpx.post(f"{stack.ingress_url}/v1/messages", json=body, headers=_raw(headers), timeout=30)


def _auth_probe(stack: Stack, token: str) -> int:
    """401 when ``token`` is refused, 400 when accepted: the body is invalid, so nothing is published."""
    resp = httpx.post(
        f"{stack.ingress_url}/v1/messages", content=b"{}", headers=_raw(_bearer(token)), timeout=30
    )
    assert resp.status_code in (400, 401), resp.text
    return resp.status_code


def _assert_refused(resp: httpx.Response, *, missing: bool) -> dict[str, Any]:
    """401, the Anthropic error shape, a request id, a Bearer challenge, no oracle; the error."""
    assert resp.status_code == 401, resp.text
    doc = resp.json()
    assert doc["type"] == "error"
    assert doc["error"]["type"] == "authentication_error"
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    assert doc["request_id"] and resp.headers["request-id"] == doc["request_id"]
    challenge = resp.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    # RFC 6750 3.1: no error code when no credentials were sent; invalid_token otherwise.
    assert ('error="invalid_token"' in challenge) is not missing
    lowered = doc["error"]["message"].lower()
    for word in ORACLE_WORDS:
        assert not re.search(rf"\b{word}\b", lowered), f"{word!r} in {doc['error']['message']!r}"
    error: dict[str, Any] = doc["error"]
    return error


def _topic_values(stack: Stack, suffixes: list[str]) -> list[bytes]:
    records = asyncio.run(read_topics(stack_kafka(stack), suffixes))
    return [(r.key or b"") + b"|" + (r.value or b"") for r in records]


@pytest.mark.parametrize("name", sorted(INVALID_TOKEN_ATTACKS))
def test_forged_or_stale_token_is_refused_401(identity_stack: Stack, forge: Forge, name: str) -> None:
    """Each forged, mis-scoped or malformed token gets the same Anthropic-shaped 401."""
    resp = _call(identity_stack, INVALID_TOKEN_ATTACKS[name](forge), f"attack-{uuid.uuid4().hex}")
    _assert_refused(resp, missing=False)


@pytest.mark.parametrize("name", sorted(MISSING_CREDENTIAL_ATTACKS))
def test_request_without_a_bearer_token_is_refused_401(
    identity_stack: Stack, forge: Forge, name: str
) -> None:
    """No token (or a non-Bearer scheme) gets a 401 that tells the caller how to authenticate."""
    resp = _call(identity_stack, MISSING_CREDENTIAL_ATTACKS[name](forge), f"attack-{uuid.uuid4().hex}")
    error = _assert_refused(resp, missing=True)
    assert "Bearer" in error["message"]


def test_no_refused_call_reaches_policy_and_refusals_are_indistinguishable(
    identity_stack: Stack, forge: Forge
) -> None:
    """All attacks again, each body with its own marker: none is on any topic afterwards, while
    a valid control call in between is (the scan sees what is published); and every invalid
    token got the very same answer apart from its request id, so no refusal is an oracle."""
    before = len(_topic_values(identity_stack, [topics.SUBMITTED]))
    markers: dict[str, str] = {}
    answers: set[tuple[int, str, str, str]] = set()
    for name, build in {**INVALID_TOKEN_ATTACKS, **MISSING_CREDENTIAL_ATTACKS}.items():
        marker = f"attack-{uuid.uuid4().hex}"
        markers[name] = marker
        resp = _call(identity_stack, build(forge), marker)
        error = _assert_refused(resp, missing=name in MISSING_CREDENTIAL_ATTACKS)
        if name in INVALID_TOKEN_ATTACKS:
            answers.add((resp.status_code, error["type"], error["message"], resp.headers["www-authenticate"]))
    assert len(answers) == 1, answers

    control = f"control-{uuid.uuid4().hex}"
    ok = _call(identity_stack, _bearer(forge.valid()), control)
    assert ok.status_code == 200, ok.text

    submitted = _topic_values(identity_stack, [topics.SUBMITTED])
    assert len(submitted) == before + 1  # only the control call was published
    assert any(control.encode() in v for v in submitted)
    everything = _topic_values(identity_stack, list(topics.EVENT_OF_TOPIC))
    for name, marker in markers.items():
        assert not any(marker.encode() in v for v in everything), f"{name}: reached Kafka"


def test_token_just_under_the_size_limit_is_accepted(identity_stack: Stack, forge: Forge) -> None:
    """Control for the oversized attack: a large but allowed token authenticates, so the 401
    above is the size limit's doing, not a transport limit on big headers."""
    token = forge.valid(padding="x" * 10_500)  # base64 makes it ~14.8 KB
    assert 12000 < len(token) <= MAX_TOKEN_BYTES
    assert _auth_probe(identity_stack, token) == 400


def test_sdk_user_sees_a_readable_authentication_error(identity_stack: Stack, forge: Forge) -> None:
    """What an ``anthropic`` SDK user sees with an expired token: AuthenticationError with our
    message and request id, not a parse failure."""
    expired = forge.signed(forge.claims(exp=int(time.time()) - 3600))
    client = anthropic.Anthropic(base_url=identity_stack.ingress_url, api_key=expired, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["message"] == "invalid or expired token"
    assert info.value.request_id and info.value.request_id.startswith("req_")


def test_token_reused_after_its_signing_key_was_removed_is_refused(
    identity_stack: Stack, forge: Forge
) -> None:
    """Rotation, then removal of the old key from the JWKS (what an IdP does after a compromise).

    The ingress re-reads the JWKS once it is older than SKILLGATE_OIDC_JWKS_MAX_AGE_SECONDS (1 s on
    this stack; 300 s by default), before consulting its verified-token cache, so the old
    token, although verified and cached a moment ago, is refused within that time; the new key
    is picked up without a restart. Nothing sent with the old token after that is published.
    """
    old_token = forge.valid()
    old_kid = forge.keys.signing_kid
    warm = _call(identity_stack, _bearer(old_token), f"control-{uuid.uuid4().hex}")
    assert warm.status_code == 200, warm.text  # verified, and now in the verifier's cache

    rotate_keys(forge.key_dir)
    new_token = forge.valid()
    assert forge.keys.signing_kid != old_kid
    wait_for(lambda: _auth_probe(identity_stack, new_token) == 400, timeout=15, interval=0.1)
    assert _auth_probe(identity_stack, old_token) == 400  # both keys published: both verify

    remove_key(forge.key_dir, old_kid)
    # Effective within the 1 s max age; the deadline leaves room for a slow machine, not for 300 s.
    wait_for(lambda: _auth_probe(identity_stack, old_token) == 401, timeout=10, interval=0.1)

    marker = f"attack-{uuid.uuid4().hex}"
    _assert_refused(_call(identity_stack, _bearer(old_token), marker), missing=False)
    control = f"control-{uuid.uuid4().hex}"
    ok = _call(identity_stack, _bearer(new_token), control)
    assert ok.status_code == 200, ok.text
    values = _topic_values(identity_stack, [topics.SUBMITTED])
    assert any(control.encode() in v for v in values)
    assert not any(marker.encode() in v for v in values)
