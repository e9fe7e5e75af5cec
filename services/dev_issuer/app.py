"""The dev OIDC issuer's ASGI app: discovery, JWKS, a client-credentials token endpoint, health.

DEVELOPMENT ONLY. It lets the local stack and the tests run the production token verification
path (:class:`skillgate.oidc.TokenVerifier`: discovery, JWKS, RS256 signatures, claim checks)
without an external IdP. Its discovery document says so with ``"skillgate_dev_only": true``.

Endpoints:

``GET /.well-known/openid-configuration``
    Issuer metadata (OpenID Connect Discovery / RFC 8414). There is no authorization endpoint:
    the only grant is ``client_credentials``; user tokens come from ``skillgate token``.
``GET /jwks``
    Public keys. The key file is checked on every request, so a rotation or removal done by
    another process is served at once.
``POST /token``
    RFC 6749 section 4.4: form-encoded ``grant_type=client_credentials``, client authenticated by
    HTTP Basic (``client_secret_basic``) or by ``client_id``/``client_secret`` form fields
    (``client_secret_post``), never both. Errors follow section 5.2.
``GET /healthz``
    Liveness.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.dev_issuer.config import DevIssuerSettings
from services.dev_issuer.keys import (
    SIGNING_ALG,
    DevKeys,
    KeyFileWatcher,
    load_or_create_client_secret,
    mint_token,
)

log = logging.getLogger(__name__)

_JSON = "application/json"
_FORM = "application/x-www-form-urlencoded"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_MAX_BODY_BYTES = 64 * 1024


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON, headers=headers)


def _oauth_error(status: int, error: str, description: str) -> Response:
    """An RFC 6749 section 5.2 error answer (never cached; 401 names the Basic scheme)."""
    headers = dict(_NO_STORE)
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="skillgate-dev-issuer"'
    return _json({"error": error, "error_description": description}, status, headers)


class _BadRequest(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.response = _oauth_error(status, error, description)


def _form_params(content_type: str, body: bytes) -> dict[str, str]:
    """Parse a form body, refusing other media types and repeated parameters (RFC 6749 3.2)."""
    if content_type.split(";", 1)[0].strip().lower() != _FORM:
        raise _BadRequest(400, "invalid_request", f"the body must be {_FORM}")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError as exc:
        raise _BadRequest(400, "invalid_request", "the body is not UTF-8") from exc
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise _BadRequest(400, "invalid_request", f"parameter {name!r} is repeated")
        params[name] = value
    return params


def _client_credentials(authorization: str | None, params: dict[str, str]) -> tuple[str, str]:
    """The (client_id, secret) the request authenticates with: HTTP Basic or form fields."""
    in_form = "client_secret" in params
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise _BadRequest(401, "invalid_client", "client authentication must use Basic")
        if in_form:
            raise _BadRequest(400, "invalid_request", "use one client authentication method, not two")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise _BadRequest(401, "invalid_client", "malformed Basic credentials") from exc
        raw_id, sep, raw_secret = decoded.partition(":")
        if not sep:
            raise _BadRequest(401, "invalid_client", "malformed Basic credentials")
        # RFC 6749 2.3.1: both parts are form-urlencoded before Basic encoding.
        client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        if "client_id" in params and params["client_id"] != client_id:
            raise _BadRequest(400, "invalid_request", "client_id differs from the Basic user")
        return client_id, secret
    if in_form and params.get("client_id"):
        return params["client_id"], params["client_secret"]
    raise _BadRequest(401, "invalid_client", "client authentication is required")


def discovery_document(settings: DevIssuerSettings) -> dict[str, Any]:
    """The issuer metadata served at ``/.well-known/openid-configuration``.

    Verifiers read ``issuer`` and ``jwks_uri``; ``skillgate_dev_only`` marks the issuer as
    one that must never be trusted outside development.
    """
    issuer = settings.issuer_url
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/jwks",
        "token_endpoint": f"{issuer}/token",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "id_token_signing_alg_values_supported": [SIGNING_ALG],
        "subject_types_supported": ["public"],
        "claims_supported": [
            "iss",
            "sub",
            "aud",
            "exp",
            "iat",
            "nbf",
            "jti",
            "typ",
            "preferred_username",
            "email",
            "groups",
            "azp",
            "client_id",
        ],
        "skillgate_dev_only": True,
        "skillgate_notice": "skillgate development issuer: anyone with access to its key "
        "directory can mint tokens for any identity. Never trust it in production.",
    }


def create_app(settings: DevIssuerSettings) -> Starlette:
    """Build the dev issuer's ASGI app (development only).

    Keys and generated client secrets are created here, at start, so that the key directory is
    complete before the first request and the CLI can show the secrets.
    """
    key_dir = settings.key_path
    watcher = KeyFileWatcher(key_dir)
    watcher.current()
    client_secrets: dict[str, bytes] = {}
    client_groups: dict[str, list[str]] = {}
    for client_id, client in settings.clients.items():
        secret = client.secret
        if secret is None:
            secret = load_or_create_client_secret(key_dir, client_id)
        client_secrets[client_id] = secret.get_secret_value().encode()
        client_groups[client_id] = list(client.groups)
    dummy_secret = secrets.token_bytes(32)
    ttl = min(settings.default_ttl_seconds, settings.max_ttl_seconds)
    discovery = orjson.dumps(discovery_document(settings))
    jwks_cache: dict[str, tuple[DevKeys, bytes]] = {}

    async def openid_configuration(request: Request) -> Response:
        return Response(discovery, media_type=_JSON)

    async def jwks(request: Request) -> Response:
        keys = watcher.current()
        cached = jwks_cache.get("jwks")
        if cached is None or cached[0] is not keys:
            cached = (keys, orjson.dumps(keys.public_jwks()))
            jwks_cache["jwks"] = cached
        return Response(cached[1], media_type=_JSON, headers={"Cache-Control": "no-cache"})

    async def token(request: Request) -> Response:
        try:
            params = _form_params(request.headers.get("content-type", ""), await request.body())
            if not params.get("grant_type"):
                raise _BadRequest(400, "invalid_request", "grant_type is required")
            client_id, secret = _client_credentials(request.headers.get("authorization"), params)
        except _BadRequest as bad:
            return bad.response
        expected = client_secrets.get(client_id)
        ok = hmac.compare_digest(secret.encode(), expected or dummy_secret)
        if expected is None or not ok:
            log.info("dev issuer refused a client", extra={"client_id": client_id[:64]})
            return _oauth_error(401, "invalid_client", "unknown client or wrong secret")
        if params["grant_type"] != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "only client_credentials is supported")
        access_token = mint_token(
            watcher.current(),
            issuer=settings.issuer_url,
            audience=settings.audience,
            subject=client_id,
            groups=client_groups[client_id],
            expires_in=ttl,
            client_id=client_id,
        )
        log.info("dev issuer issued a client token", extra={"client_id": client_id, "ttl": ttl})
        return _json(
            {"access_token": access_token, "token_type": "Bearer", "expires_in": ttl},
            headers=dict(_NO_STORE),
        )

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok", "dev_only": True})

    return Starlette(
        routes=[
            Route("/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
            Route("/jwks", jwks, methods=["GET"]),
            Route("/token", token, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        max_body_size=_MAX_BODY_BYTES,
    )
