"""Structured logs (``skillgate/logs.py``) and OIDC bearer-token verification (``skillgate/oidc.py``).

The verifier runs against a tiny issuer (discovery + JWKS) served by uvicorn on 127.0.0.1, with
RSA keys from joserfc, so discovery, key fetching, signature and claim checks all run for real.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from skillgate.config import OIDCSettings
from skillgate.identity import groups_from_claims, identity_from_claims
from skillgate.logs import JsonFormatter, call_context
from skillgate.oidc import AuthError, TokenVerifier, bearer_from_headers
from tests.servers import serve_asgi

AUDIENCE = "skillgate"


# =================================================================================== logs


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("ingress"))
    logger = logging.getLogger(f"test.logs.{name}.{uuid.uuid4().hex}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    out = []
    for line in stream.getvalue().splitlines():
        doc = orjson.loads(line)
        assert isinstance(doc, dict)
        out.append(doc)
    return out


def test_one_json_object_per_line_with_the_call_context() -> None:
    logger, stream = _logger("ctx")
    logger.info("before any call")
    token = call_context.set(("call-123", "sess-9"))
    try:
        logger.warning("multi\nline\r\nmessage %s", "arg", extra={"status": 529, "attempts": [1, 2]})
        try:
            raise RuntimeError("boom\nwith newline")
        except RuntimeError:
            logger.exception("failed")
    finally:
        call_context.reset(token)
    logger.info("after")
    lines = _lines(stream)
    assert len(lines) == 4 == len(stream.getvalue().splitlines())
    first, second, third, fourth = lines
    assert "call_id" not in first and "session_id" not in first
    assert first["event"] == "before any call"
    assert first["level"] == "info"
    assert first["service"] == "ingress"
    assert first["ts"].endswith("Z")
    assert second["event"] == "multi\nline\r\nmessage arg"
    assert second["level"] == "warning"
    assert second["call_id"] == "call-123" and second["session_id"] == "sess-9"
    assert second["status"] == 529 and second["attempts"] == [1, 2]
    assert third["call_id"] == "call-123"
    assert "RuntimeError: boom" in third["exc"]
    assert third["level"] == "error"
    assert "call_id" not in fourth


def test_extras_named_like_credentials_are_redacted() -> None:
    logger, stream = _logger("redact")
    secret = "sk-ant-api03-SECRET-VALUE"
    sensitive = {
        "authorization": f"Bearer {secret}",
        "Authorization_header": secret,
        "token": secret,
        "access_token": secret,
        "api_key": secret,
        "upstream_api_key": secret,
        "apikey": secret,
        "x-api-key": secret,
        "password": secret,
        "db_password": secret,
        "client_secret": secret,
        "cookie": secret,
    }
    logger.info("call", extra={**sensitive, "model": "claude-sonnet-4-5", "upstream": "default"})
    text = stream.getvalue()
    assert secret not in text
    (line,) = _lines(stream)
    for key in sensitive:
        assert line[key] == "[redacted]", key
    assert line["model"] == "claude-sonnet-4-5"
    assert line["upstream"] == "default"


def test_non_json_extras_are_stringified_not_crashing() -> None:
    logger, stream = _logger("odd")
    logger.info("odd", extra={"when": time, "blob": b"\x00\xff", "obj": object()})
    (line,) = _lines(stream)
    assert line["event"] == "odd"
    assert isinstance(line["obj"], str)


def test_credentials_nested_in_an_extra_are_redacted() -> None:
    logger, stream = _logger("nested")
    logger.info("request", extra={"headers": {"authorization": "Bearer NESTED-SECRET", "x-foo": "1"}})
    assert "NESTED-SECRET" not in stream.getvalue()


# ============================================================================ OIDC issuer


@dataclass
class Issuer:
    """The test IdP's state: published keys and a count of JWKS requests."""

    keys: list[RSAKey]
    url: str = ""
    jwks_status: int = 200  # set to 5xx to play an IdP outage
    jwks_requests: int = 0
    discovery_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def discovery(request: Request) -> Response:
            with self.lock:
                self.discovery_requests += 1
            return JSONResponse({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})

        async def jwks(request: Request) -> Response:
            with self.lock:
                self.jwks_requests += 1
                keys = [k.as_dict(private=False) for k in self.keys]
                status = self.jwks_status
            if status != 200:
                return JSONResponse({"error": "unavailable"}, status_code=status)
            return JSONResponse({"keys": keys})

        async def health(request: Request) -> Response:
            return JSONResponse({"ok": True})

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
                Route("/health", health),
            ]
        )


def _rsa(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256", "use": "sig"})


SIGNING = _rsa("k1")
STRANGER = _rsa("k-stranger")


@contextmanager
def _serve_issuer(issuer: Issuer) -> Iterator[str]:
    """Serve ``issuer`` until the block ends, its ``url`` set before the block runs."""
    with serve_asgi(issuer.app(), health_path="/health", name="idp") as url:
        issuer.url = url
        yield url


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    state = Issuer(keys=[SIGNING])
    with _serve_issuer(state):
        yield state


def _oidc(issuer: Issuer, **overrides: Any) -> OIDCSettings:
    values: dict[str, Any] = {"issuer": issuer.url, "audience": AUDIENCE}
    values.update(overrides)
    return OIDCSettings(**values)


@pytest.fixture
async def verifier(issuer: Issuer) -> AsyncIterator[TokenVerifier]:
    v = TokenVerifier(_oidc(issuer, groups_claim="realm_access.roles"))
    try:
        yield v
    finally:
        await v.close()


def _claims(issuer: Issuer, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer.url,
        "aud": AUDIENCE,
        "sub": "8d3f-user",
        "exp": now + 300,
        "iat": now,
        "nbf": now - 5,
        "jti": uuid.uuid4().hex,
        "preferred_username": "ada",
        "email": "ada@example.com",
        "azp": "skillgate-cli",
        "realm_access": {"roles": ["approvers", "offline_access", "/teams/ml"]},
        "groups": ["should-not-be-used"],
    }
    for key, value in changes.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


def _token(claims: dict[str, Any], key: RSAKey = SIGNING, kid: str | None = "k1") -> str:
    header: dict[str, Any] = {"alg": "RS256"}
    if kid is not None:
        header["kid"] = kid
    return jwt.encode(header, claims, key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64json(value: Any) -> str:
    return _b64(orjson.dumps(value))


async def _refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    return info.value.reason


# ==================================================================================== OIDC


async def test_valid_token_gives_the_identity_with_groups_from_a_dotted_claim(
    verifier: TokenVerifier, issuer: Issuer
) -> None:
    claims = _claims(issuer)
    identity = await verifier.verify(_token(claims))
    assert identity["subject"] == "8d3f-user"
    assert identity["issuer"] == issuer.url
    assert identity["username"] == "ada"
    assert identity["email"] == "ada@example.com"
    assert identity["client_id"] == "skillgate-cli"
    assert identity["token_id"] == claims["jti"]
    assert identity["groups"] == ["approvers", "offline_access", "teams/ml"]


@pytest.mark.parametrize(
    ("claims", "client_id"),
    [
        ({"azp": "skillgate-cli", "client_id": "other"}, "skillgate-cli"),  # OIDC azp wins
        ({"client_id": "ci-bot"}, "ci-bot"),  # RFC 9068, Keycloak service accounts
        ({"cid": "0oa1okta"}, "0oa1okta"),  # Okta
        ({"appid": "3f2c-entra-v1"}, "3f2c-entra-v1"),  # Entra ID v1 access tokens
        ({}, None),
    ],
)
def test_client_id_from_the_claim_each_idp_uses(claims: dict[str, Any], client_id: str | None) -> None:
    """Machine callers are recorded with their OAuth client, whichever claim the IdP puts it in."""
    identity = identity_from_claims({"sub": "s", "iss": "https://idp", **claims})
    assert identity["client_id"] == client_id


@pytest.mark.parametrize(
    ("claims", "path", "groups"),
    [
        ({"groups": ["b", "a", "a"]}, "groups", ["a", "b"]),
        ({"groups": "solo"}, "groups", ["solo"]),
        ({"groups": ["/org/eng/callers", "/auditors"]}, "groups", ["auditors", "org/eng/callers"]),
        ({"realm_access": {"roles": ["admins"]}}, "realm_access.roles", ["admins"]),
        # several paths merge: Okta users' groups and a service app's scopes
        (
            {"groups": ["eng"], "scp": ["skillgate.call", "openid"]},
            "groups, scp",
            ["eng", "openid", "skillgate.call"],
        ),
        ({"scp": ["skillgate.call"]}, "groups,scp", ["skillgate.call"]),
        ({"groups": {"not": "a list"}}, "groups", []),
        ({"groups": [None, "", {"x": 1}, "ok"]}, "groups", ["ok"]),
        ({}, "groups,,realm_access.roles", []),
    ],
)
def test_groups_from_one_or_more_claim_paths(claims: dict[str, Any], path: str, groups: list[str]) -> None:
    """The configured claim path(s) give sorted, de-duplicated group names; junk gives none."""
    assert groups_from_claims(claims, path) == groups


async def test_groups_claim_default_and_missing(issuer: Issuer) -> None:
    v = TokenVerifier(_oidc(issuer))
    try:
        assert (await v.verify(_token(_claims(issuer))))["groups"] == ["should-not-be-used"]
        assert (await v.verify(_token(_claims(issuer, groups=None))))["groups"] == []
    finally:
        await v.close()


async def test_audience_may_be_one_of_a_list(verifier: TokenVerifier, issuer: Issuer) -> None:
    identity = await verifier.verify(_token(_claims(issuer, aud=["account", AUDIENCE])))
    assert identity["subject"] == "8d3f-user"


async def test_alg_none_is_refused(verifier: TokenVerifier, issuer: Issuer) -> None:
    for header in ({"alg": "none", "kid": "k1"}, {"alg": "None"}, {"alg": "NONE", "typ": "JWT"}):
        token = f"{_b64json(header)}.{_b64json(_claims(issuer))}."
        assert "algorithm" in await _refused(verifier, token)


async def test_hs256_signed_with_the_public_key_is_refused(issuer: Issuer) -> None:
    # Even if an operator wrongly lists HS256, a symmetric algorithm is never accepted.
    v = TokenVerifier(_oidc(issuer, algorithms=["RS256", "HS256"]))
    try:
        await v.start()
        public_pem = SIGNING.as_pem(private=False)
        for alg, digest in (("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)):
            signing_input = f"{_b64json({'alg': alg, 'kid': 'k1'})}.{_b64json(_claims(issuer))}"
            signature = hmac.new(public_pem, signing_input.encode(), digest).digest()
            assert "algorithm" in await _refused(v, f"{signing_input}.{_b64(signature)}")
    finally:
        await v.close()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "https://evil.example.com"}, "wrong issuer"),
        ({"iss": None}, "wrong issuer"),
        ({"aud": "another-api"}, "wrong audience"),
        ({"aud": ["a", "b"]}, "wrong audience"),
        ({"aud": None}, "wrong audience"),
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"nbf": int(time.time()) + 3600}, "not yet valid"),
        ({"iat": int(time.time()) + 3600}, "issued in the future"),
        ({"exp": None}, "no exp"),
        ({"exp": "tomorrow"}, "no exp"),
        ({"sub": None}, "no subject"),
        ({"sub": ""}, "no subject"),
    ],
)
async def test_claim_checks(
    verifier: TokenVerifier, issuer: Issuer, changes: dict[str, Any], reason: str
) -> None:
    claims = _claims(issuer)
    for key, value in changes.items():
        if value is None:
            claims.pop(key)
        else:
            claims[key] = value
    assert await _refused(verifier, _token(claims)) == reason


async def test_leeway_accepts_slight_clock_skew(verifier: TokenVerifier, issuer: Issuer) -> None:
    now = int(time.time())
    token = _token(_claims(issuer, exp=now - 10, nbf=now + 10, iat=now + 10))
    assert (await verifier.verify(token))["subject"] == "8d3f-user"


async def test_unknown_kid_and_a_key_we_do_not_trust(verifier: TokenVerifier, issuer: Issuer) -> None:
    assert await _refused(verifier, _token(_claims(issuer), STRANGER, "k-stranger")) == "unknown signing key"
    # a known kid, signed by another key: the signature check fails
    assert "signature" in await _refused(verifier, _token(_claims(issuer), STRANGER, "k1"))


async def test_jwks_refetched_at_most_once_despite_random_kids(issuer: Issuer) -> None:
    v = TokenVerifier(_oidc(issuer, jwks_refresh_min_interval_seconds=60.0))
    try:
        before = issuer.jwks_requests
        reasons = set()
        for _ in range(20):
            token = _token(_claims(issuer), STRANGER, f"kid-{uuid.uuid4().hex}")
            reasons.add(await _refused(v, token))
        assert reasons == {"unknown signing key"}
        assert issuer.jwks_requests - before == 1
        assert v.jwks_fetches == 1
        # good tokens still verify from the cached keys, without a fetch
        assert (await v.verify(_token(_claims(issuer))))["subject"] == "8d3f-user"
        assert issuer.jwks_requests - before == 1
    finally:
        await v.close()


async def test_without_the_limit_every_unknown_kid_refetches(issuer: Issuer) -> None:
    """Control for the test above: the counter sees refreshes when the limit allows them."""
    v = TokenVerifier(_oidc(issuer, jwks_refresh_min_interval_seconds=0.0))
    try:
        await v.start()
        before = issuer.jwks_requests
        for _ in range(5):
            await _refused(v, _token(_claims(issuer), STRANGER, f"kid-{uuid.uuid4().hex}"))
        assert issuer.jwks_requests - before == 5
    finally:
        await v.close()


async def test_a_rotated_in_key_is_picked_up_by_one_refresh() -> None:
    rotated = _rsa("k2")
    state = Issuer(keys=[SIGNING])
    with _serve_issuer(state):
        v = TokenVerifier(_oidc(state, jwks_refresh_min_interval_seconds=0.0))
        try:
            await v.verify(_token(_claims(state)))
            assert state.jwks_requests == 1
            with state.lock:
                state.keys = [SIGNING, rotated]
            identity = await v.verify(_token(_claims(state), rotated, "k2"))
            assert identity["subject"] == "8d3f-user"
            assert state.jwks_requests == 2
            assert state.discovery_requests == 1  # discovery is read once
        finally:
            await v.close()


async def _until_refused(verifier: TokenVerifier, token: str, deadline_s: float = 10.0) -> str:
    """Verify ``token`` repeatedly until it is refused (the reason), failing after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            await verifier.verify(token)
        except AuthError as exc:
            return exc.reason
        await asyncio.sleep(0.02)  # poll interval of a condition with a deadline
    raise AssertionError(f"token still accepted after {deadline_s}s")


async def test_a_removed_key_stops_verifying_after_max_age_even_for_cached_tokens() -> None:
    """Key removal at the IdP takes effect within ``jwks_max_age_seconds``, whatever the caches
    hold: the age check runs before the verified-token cache, the unknown-kid rate limit (60 s
    here) does not hold the age refresh back, and a changed key set empties the cache."""
    retired = _rsa("k-retired")
    state = Issuer(keys=[SIGNING, retired])
    with _serve_issuer(state):
        v = TokenVerifier(_oidc(state, jwks_max_age_seconds=0.3, jwks_refresh_min_interval_seconds=60.0))
        try:
            token = _token(_claims(state), retired, "k-retired")
            assert (await v.verify(token))["subject"] == "8d3f-user"
            assert (await v.verify(token))["subject"] == "8d3f-user"  # now from the cache
            with state.lock:
                state.keys = [SIGNING]
            assert await _until_refused(v, token) == "unknown signing key"
            # the key that is still published keeps working, from the refreshed key set
            assert (await v.verify(_token(_claims(state))))["subject"] == "8d3f-user"
        finally:
            await v.close()


async def test_a_failed_age_refresh_keeps_the_last_known_keys() -> None:
    """An IdP outage at refresh time does not lock every caller out: the last known keys stay
    in use, the refresh is retried (the IdP sees the attempts), and junk is still refused 401."""
    state = Issuer(keys=[SIGNING])
    with _serve_issuer(state):
        v = TokenVerifier(_oidc(state, jwks_max_age_seconds=0.2, jwks_refresh_min_interval_seconds=60.0))
        try:
            await v.start()
            with state.lock:
                state.jwks_status = 503
                before = state.jwks_requests
            deadline = time.monotonic() + 10
            while state.jwks_requests < before + 2:  # two attempts: the retry is not held 60 s
                assert time.monotonic() < deadline, "the verifier never retried the refresh"
                identity = await v.verify(_token(_claims(state)))
                assert identity["subject"] == "8d3f-user"
                await asyncio.sleep(0.05)  # poll interval of a condition with a deadline
            assert await _refused(v, _token(_claims(state), STRANGER, "k-new")) == "unknown signing key"
        finally:
            await v.close()


async def test_tampered_payload_is_refused(verifier: TokenVerifier, issuer: Issuer) -> None:
    header, _, signature = _token(_claims(issuer, sub="alice")).split(".")
    forged = _b64json(_claims(issuer, sub="root", realm_access={"roles": ["admins"]}))
    assert "signature" in await _refused(verifier, f"{header}.{forged}.{signature}")
    # a flipped signature byte as well
    good = _token(_claims(issuer))
    head, payload, sig = good.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[10] ^= 0x01
    assert "signature" in await _refused(verifier, f"{head}.{payload}.{_b64(bytes(raw))}")


async def test_oversized_token_is_refused_unparsed(issuer: Issuer) -> None:
    v = TokenVerifier(_oidc(issuer, max_token_bytes=2048))
    try:
        big = _token(_claims(issuer, padding="x" * 4096))
        before = issuer.jwks_requests
        assert await _refused(v, big) == "token missing or oversized"
        assert issuer.jwks_requests == before  # no network work for it
        assert await _refused(v, "") == "token missing or oversized"
    finally:
        await v.close()


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c.d",
        "...",
        "..",
        "%%%.###.$$$",
        "é.é.é",
        "eyJhbGciOiJSUzI1NiJ9",
        f"{_b64(b'[1,2]')}.{_b64(b'{}')}.sig",
        f"{_b64(b'not json')}.{_b64(b'{}')}.sig",
        f"{_b64json({'alg': 'RS256', 'kid': 'k1'})}.!!!.sig",
        f"{_b64json({'alg': 'RS256', 'kid': 'k1'})}.{_b64(b'[1]')}.AAAA",
        f"{_b64json({'alg': 'RS256', 'kid': 'k1', 'crit': ['exp']})}.{_b64(b'{}')}.AAAA",
        f"{_b64json({'alg': 5})}.{_b64(b'{}')}.AAAA",
        f"{_b64json({'alg': 'ES256K', 'kid': 'k1'})}.{_b64(b'{}')}.AAAA",
    ],
)
async def test_garbage_is_refused_with_auth_error(verifier: TokenVerifier, token: str) -> None:
    await _refused(verifier, token)


async def test_verified_tokens_are_cached_by_hash(verifier: TokenVerifier, issuer: Issuer) -> None:
    token = _token(_claims(issuer))
    first = await verifier.verify(token)
    before = issuer.jwks_requests
    assert await verifier.verify(token) == first
    assert issuer.jwks_requests == before


# ------------------------------------------------------------------- bearer_from_headers


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        ("Bearer abc.def.ghi", None, "abc.def.ghi"),
        ("bearer abc", None, "abc"),
        ("BEARER   abc  ", None, "abc"),
        ("Bearer abc", "other", "abc"),  # Authorization wins
        ("Basic dXNlcjpwYXNz", None, None),
        ("Basic dXNlcjpwYXNz", "key", None),  # a non-bearer Authorization is not silently replaced
        ("Bearer", None, None),
        ("Bearer    ", None, None),
        ("abc", None, None),
        (None, "sk-key", "sk-key"),
        (None, "  sk-key  ", "sk-key"),
        (None, "   ", None),
        ("", "sk-key", "sk-key"),
        (None, None, None),
        ("", "", None),
    ],
)
def test_bearer_from_headers(authorization: str | None, x_api_key: str | None, expected: str | None) -> None:
    assert bearer_from_headers(authorization, x_api_key) == expected
