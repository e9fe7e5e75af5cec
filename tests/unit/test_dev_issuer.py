"""The dev OIDC issuer under real uvicorn, checked by the production verifier.

Every token here goes through :class:`skillgate.oidc.TokenVerifier` (discovery over HTTP, JWKS,
RS256 signature, claim checks), the same path ingress uses against a real IdP.
"""

from __future__ import annotations

import base64
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr
from starlette.types import ASGIApp

from services.dev_issuer.app import create_app
from services.dev_issuer.config import DEFAULT_CLIENT_ID, DevClient, DevIssuerSettings
from services.dev_issuer.keys import (
    KEYS_FILE,
    LOCK_FILE,
    SECRETS_FILE,
    DevKeys,
    load_or_create_keys,
    mint_token,
    public_jwks,
    remove_key,
    rotate_keys,
)
from services.dev_issuer.main import CLI_CLIENT_ID, client_secret_command, token_command
from skillgate.config import OIDCSettings
from skillgate.events import Identity
from skillgate.oidc import AuthError, TokenVerifier
from tests.servers import serve_asgi

CI_CLIENT = "ci-job"
CI_SECRET = "ci-job-secret"
PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi"}


@dataclass(frozen=True)
class RunningIssuer:
    """A dev issuer served by uvicorn in a background thread."""

    url: str
    settings: DevIssuerSettings
    key_dir: Path


@contextmanager
def serve_issuer(key_dir: Path) -> Iterator[RunningIssuer]:
    """Serve the dev issuer on a free 127.0.0.1 port until the block ends.

    Its settings name the port, so the app is built once :func:`serve_asgi` has bound it. Served
    as the CLI serves it: uvloop, httptools, no access log, logging left alone.
    """
    settings: DevIssuerSettings | None = None

    def app_for(port: int) -> ASGIApp:
        nonlocal settings
        settings = DevIssuerSettings(
            host="127.0.0.1",
            port=port,
            key_dir=key_dir,
            clients={
                CI_CLIENT: DevClient(secret=SecretStr(CI_SECRET), groups=["ci", "eng"]),
                DEFAULT_CLIENT_ID: DevClient(groups=["ci"]),
            },
        )
        return create_app(settings)

    with serve_asgi(
        app_factory=app_for,
        health_path="/healthz",
        name="dev-issuer",
        deadline_s=30.0,
        loop="uvloop",
        http="httptools",
        log_config=None,
    ) as url:
        assert settings is not None and settings.issuer_url == url
        yield RunningIssuer(url=url, settings=settings, key_dir=key_dir)


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningIssuer]:
    """One issuer shared by the tests that do not change its keys."""
    with serve_issuer(tmp_path_factory.mktemp("dev-issuer")) as running:
        yield running


def oidc_settings(url: str, jwks_refresh_min_interval_seconds: float = 30.0) -> OIDCSettings:
    """Production verifier settings for the issuer at ``url``."""
    return OIDCSettings(
        issuer=url,
        audience="skillgate",
        jwks_refresh_min_interval_seconds=jwks_refresh_min_interval_seconds,
    )


@pytest.fixture
async def verifier(issuer: RunningIssuer) -> AsyncIterator[TokenVerifier]:
    """The production verifier, pointed at the shared dev issuer."""
    v = TokenVerifier(oidc_settings(issuer.url))
    await v.start()
    yield v
    await v.close()


def claims_of(token: str) -> dict[str, Any]:
    """The (unverified) claims of a compact JWS, to compare with what the verifier returns."""
    segment = token.split(".")[1]
    value = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


def header_of(token: str) -> dict[str, Any]:
    """The (unverified) protected header of a compact JWS."""
    segment = token.split(".")[0]
    value = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


def mint(running: RunningIssuer, keys: DevKeys | Path | None = None, **overrides: Any) -> str:
    """A user token for alice from the issuer's key files (or ``keys``), with overrides."""
    args: dict[str, Any] = {
        "issuer": running.url,
        "audience": "skillgate",
        "subject": "alice",
        "groups": ["eng", "approvers"],
        "expires_in": 300,
        "username": "alice",
        "email": "alice@example.test",
        "client_id": CLI_CLIENT_ID,
    }
    args.update(overrides)
    return mint_token(keys if keys is not None else running.key_dir, **args)


async def test_discovery_marks_the_issuer_as_dev_only(issuer: RunningIssuer) -> None:
    async with httpx.AsyncClient(base_url=issuer.url) as http:
        doc = (await http.get("/.well-known/openid-configuration")).json()
        health = await http.get("/healthz")
    assert doc["issuer"] == issuer.url
    assert doc["jwks_uri"] == f"{issuer.url}/jwks"
    assert doc["token_endpoint"] == f"{issuer.url}/token"
    assert doc["grant_types_supported"] == ["client_credentials"]
    assert doc["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
    ]
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert doc["skillgate_dev_only"] is True
    assert health.status_code == 200


async def test_minted_token_verifies_to_the_right_identity(
    issuer: RunningIssuer, verifier: TokenVerifier
) -> None:
    token = mint(issuer)
    identity = await verifier.verify(token)
    claims = claims_of(token)
    assert claims["jti"] and claims["typ"] == "Bearer"
    assert claims["exp"] - claims["iat"] == 300
    assert identity == Identity(
        subject="alice",
        issuer=issuer.url,
        username="alice",
        email="alice@example.test",
        groups=["approvers", "eng"],
        client_id=CLI_CLIENT_ID,
        token_id=claims["jti"],
    )
    assert claims_of(mint(issuer))["jti"] != claims["jti"]


async def test_token_command_mints_a_verifiable_user_token(
    issuer: RunningIssuer, verifier: TokenVerifier
) -> None:
    token = token_command("bob", ["eng"], 120, settings=issuer.settings)
    identity = await verifier.verify(token)
    assert identity["subject"] == "bob"
    assert identity["username"] == "bob"
    assert identity["groups"] == ["eng"]
    assert identity["client_id"] == CLI_CLIENT_ID
    claims = claims_of(token)
    assert claims["exp"] - claims["iat"] == 120
    default_ttl = claims_of(token_command("bob", [], None, settings=issuer.settings))
    assert default_ttl["exp"] - default_ttl["iat"] == issuer.settings.default_ttl_seconds
    with pytest.raises(ValueError):
        token_command("bob", [], issuer.settings.max_ttl_seconds + 1, settings=issuer.settings)
    with pytest.raises(ValueError):
        token_command("bob", [], 0, settings=issuer.settings)


async def test_client_credentials_with_basic_auth(issuer: RunningIssuer, verifier: TokenVerifier) -> None:
    async with httpx.AsyncClient(base_url=issuer.url) as http:
        resp = await http.post(
            "/token", data={"grant_type": "client_credentials"}, auth=(CI_CLIENT, CI_SECRET)
        )
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == issuer.settings.default_ttl_seconds
    identity = await verifier.verify(body["access_token"])
    assert identity["subject"] == CI_CLIENT
    assert identity["client_id"] == CI_CLIENT
    assert identity["groups"] == ["ci", "eng"]


async def test_client_credentials_with_form_fields_and_generated_secret(
    issuer: RunningIssuer, verifier: TokenVerifier
) -> None:
    secret = client_secret_command(DEFAULT_CLIENT_ID, settings=issuer.settings)
    assert len(secret) >= 32
    async with httpx.AsyncClient(base_url=issuer.url) as http:
        resp = await http.post(
            "/token",
            data={
                "grant_type": "client_credentials",
                "client_id": DEFAULT_CLIENT_ID,
                "client_secret": secret,
            },
        )
    assert resp.status_code == 200, resp.text
    identity = await verifier.verify(resp.json()["access_token"])
    assert identity["client_id"] == DEFAULT_CLIENT_ID
    assert identity["groups"] == ["ci"]


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [(CI_CLIENT, "wrong-secret"), ("nobody", CI_SECRET), (CI_CLIENT, "")],
)
async def test_wrong_client_credentials_are_invalid_client(
    issuer: RunningIssuer, client_id: str, secret: str
) -> None:
    async with httpx.AsyncClient(base_url=issuer.url) as http:
        resp = await http.post("/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret))
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_client"
    assert resp.headers["www-authenticate"].startswith("Basic")
    assert "access_token" not in resp.text


async def test_token_endpoint_errors_follow_rfc6749(issuer: RunningIssuer) -> None:
    async with httpx.AsyncClient(base_url=issuer.url) as http:
        no_auth = await http.post("/token", data={"grant_type": "client_credentials"})
        wrong_grant = await http.post("/token", data={"grant_type": "password"}, auth=(CI_CLIENT, CI_SECRET))
        no_grant = await http.post("/token", data={}, auth=(CI_CLIENT, CI_SECRET))
        json_body = await http.post(
            "/token", json={"grant_type": "client_credentials"}, auth=(CI_CLIENT, CI_SECRET)
        )
        two_methods = await http.post(
            "/token",
            data={"grant_type": "client_credentials", "client_secret": CI_SECRET},
            auth=(CI_CLIENT, CI_SECRET),
        )
        repeated = await http.post(
            "/token",
            content=b"grant_type=client_credentials&grant_type=client_credentials",
            headers={"content-type": "application/x-www-form-urlencoded"},
            auth=(CI_CLIENT, CI_SECRET),
        )
    assert (no_auth.status_code, no_auth.json()["error"]) == (401, "invalid_client")
    assert (wrong_grant.status_code, wrong_grant.json()["error"]) == (
        400,
        "unsupported_grant_type",
    )
    for resp in (no_grant, json_body, two_methods, repeated):
        assert (resp.status_code, resp.json()["error"]) == (400, "invalid_request"), resp.text


async def test_key_files_are_private_and_jwks_is_public_only(issuer: RunningIssuer) -> None:
    for name in (KEYS_FILE, SECRETS_FILE, LOCK_FILE):
        assert stat.S_IMODE((issuer.key_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(issuer.key_dir.stat().st_mode) & 0o077 == 0
    async with httpx.AsyncClient(base_url=issuer.url) as http:
        served = (await http.get("/jwks")).json()
    assert served == public_jwks(issuer.key_dir)
    for jwk in served["keys"]:
        assert not PRIVATE_JWK_MEMBERS & set(jwk)
        assert (jwk["kty"], jwk["alg"], jwk["use"]) == ("RSA", "RS256", "sig")
        assert jwk["kid"]


async def test_expired_token_is_refused(issuer: RunningIssuer, verifier: TokenVerifier) -> None:
    with pytest.raises(AuthError) as err:
        await verifier.verify(mint(issuer, expires_in=-3600))
    assert err.value.reason == "expired"


async def test_wrong_audience_is_refused(issuer: RunningIssuer, verifier: TokenVerifier) -> None:
    with pytest.raises(AuthError) as err:
        await verifier.verify(mint(issuer, audience="another-service"))
    assert err.value.reason == "wrong audience"
    with pytest.raises(AuthError):
        await verifier.verify(token_command("bob", [], 60, issuer.settings, audience="other"))


async def test_wrong_issuer_and_foreign_key_are_refused(
    issuer: RunningIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    with pytest.raises(AuthError) as err:
        await verifier.verify(mint(issuer, issuer="http://127.0.0.1:1"))
    assert err.value.reason == "wrong issuer"
    with pytest.raises(AuthError):  # right claims, signed by a key the issuer does not publish
        await verifier.verify(mint(issuer, keys=tmp_path / "other-keys"))


def test_keys_are_created_once_and_reused_without_a_server(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    token = mint_token(
        key_dir,
        issuer="http://127.0.0.1:1",
        audience="skillgate",
        subject="carol",
        groups=[],
        expires_in=60,
    )
    keys = load_or_create_keys(key_dir)
    assert header_of(token)["kid"] == keys.signing_kid
    assert load_or_create_keys(key_dir).kids == keys.kids == [keys.signing_kid]
    assert stat.S_IMODE((key_dir / KEYS_FILE).stat().st_mode) == 0o600
    claims = claims_of(token)
    assert "azp" not in claims and "preferred_username" not in claims
    with pytest.raises(TypeError):
        mint_token(
            key_dir,
            issuer="http://127.0.0.1:1",
            audience="skillgate",
            subject="carol",
            groups="eng",
            expires_in=60,
        )


async def test_rotation_keeps_old_tokens_until_the_key_is_removed(tmp_path: Path) -> None:
    with serve_issuer(tmp_path / "rotating") as running:
        # No rate limit on unknown-kid refreshes, so the new key is picked up the way a
        # verifier picks it up in production: by seeing an unknown kid.
        v = TokenVerifier(oidc_settings(running.url, jwks_refresh_min_interval_seconds=0.0))
        try:
            old_token = mint(running)
            old_kid = header_of(old_token)["kid"]
            assert (await v.verify(old_token))["subject"] == "alice"

            rotated = rotate_keys(running.key_dir)
            new_kid = rotated.signing_kid
            assert new_kid != old_kid and rotated.kids == [old_kid, new_kid]
            async with httpx.AsyncClient(base_url=running.url) as http:
                kids = {k["kid"] for k in (await http.get("/jwks")).json()["keys"]}
            assert kids == {old_kid, new_kid}  # served without a restart

            new_token = mint(running, subject="dave")
            assert header_of(new_token)["kid"] == new_kid
            assert (await v.verify(new_token))["subject"] == "dave"
            # A token the old key signs after the rotation (so no cache can answer) verifies.
            late_old = mint(running, keys=DevKeys(running.key_dir, rotated.keys, old_kid))
            assert header_of(late_old)["kid"] == old_kid
            assert (await v.verify(late_old))["subject"] == "alice"
            assert (await v.verify(old_token))["subject"] == "alice"

            with pytest.raises(ValueError):
                remove_key(running.key_dir, new_kid)  # the signing key cannot go
            with pytest.raises(ValueError):
                remove_key(running.key_dir, "no-such-kid")
            assert remove_key(running.key_dir, old_kid).kids == [new_kid]
            async with httpx.AsyncClient(base_url=running.url) as http:
                kids = {k["kid"] for k in (await http.get("/jwks")).json()["keys"]}
            assert kids == {new_kid}

            await v.refresh(force=True)
            for token in (old_token, late_old):
                with pytest.raises(AuthError) as err:
                    await v.verify(token)
                assert err.value.reason == "unknown signing key"
            assert (await v.verify(new_token))["subject"] == "dave"
            # Tokens the server mints now are signed with the new key too.
            async with httpx.AsyncClient(base_url=running.url) as http:
                resp = await http.post(
                    "/token", data={"grant_type": "client_credentials"}, auth=(CI_CLIENT, CI_SECRET)
                )
            assert header_of(resp.json()["access_token"])["kid"] == new_kid
            assert (await v.verify(resp.json()["access_token"]))["client_id"] == CI_CLIENT
        finally:
            await v.close()
