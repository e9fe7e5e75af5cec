"""OIDC bearer-token verification (joserfc): discovery, cached JWKS, strict claim checks.

Used by every service that accepts a human or machine caller (ingress, recorder read API). The
same path runs against the local dev issuer and a real IdP (Keycloak, Okta, Entra ID).

Refusals say only "invalid token" to the caller: the specific reason is logged (without the token)
for operators, so the API gives no oracle about which check failed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any

import httpx
import orjson
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from skillgate.config import OIDCSettings
from skillgate.events import Identity
from skillgate.identity import identity_from_claims

log = logging.getLogger(__name__)

_FORBIDDEN_ALGS = {"none", "HS256", "HS384", "HS512"}


class AuthError(Exception):
    """The caller is not authenticated. ``reason`` is for logs only, never for the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64json(segment: str) -> dict[str, Any]:
    padded = segment + "=" * (-len(segment) % 4)
    value = orjson.loads(base64.urlsafe_b64decode(padded))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


class TokenVerifier:
    """Verifies bearer tokens against one OIDC issuer.

    JWKS are fetched lazily and cached; an unknown ``kid`` triggers at most one refresh per
    ``jwks_refresh_min_interval_seconds`` so a flood of tokens with random kids cannot hammer the
    IdP. Verified tokens are cached (keyed by a hash, never the token) until their expiry or the
    next JWKS change, whichever comes first.

    Key removal: the JWKS is re-read once it is older than ``jwks_max_age_seconds`` (checked on
    every request, before the verified-token cache, so a cached token cannot outlive the key that
    signed it), and a change of key set clears that cache. A key the IdP stopped publishing
    therefore stops verifying within ``jwks_max_age_seconds`` of its removal. That refresh is
    not held back by the unknown-kid rate limit; when it fails while keys are already known, the
    last known keys stay in use (logged) and the refresh is retried after
    ``min(jwks_refresh_min_interval_seconds, jwks_max_age_seconds)``, so an IdP outage does not
    take the gateway down with it.
    """

    def __init__(self, settings: OIDCSettings, http: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._http = http or httpx.AsyncClient(timeout=10.0)
        self._owns_http = http is None
        self._keys: KeySet | None = None
        self._kids: set[str] = set()
        self._jwks_uri: str | None = None
        self._fetched_at = 0.0
        self._last_refresh_attempt = -1e9
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()
        self.jwks_fetches = 0

    async def close(self) -> None:
        """Close the HTTP client if this verifier created it."""
        if self._owns_http:
            await self._http.aclose()

    async def _discover(self) -> str:
        if self._jwks_uri is None:
            url = self._settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            resp = await self._http.get(url)
            resp.raise_for_status()
            doc = resp.json()
            if (
                doc.get("issuer") != self._settings.issuer.rstrip("/")
                and doc.get("issuer") != self._settings.issuer
            ):
                raise RuntimeError("discovery document names a different issuer")
            self._jwks_uri = str(doc["jwks_uri"])
        return self._jwks_uri

    async def refresh(self, force: bool = False, min_interval: float | None = None) -> None:
        """Fetch the JWKS, at most once per ``min_interval`` seconds unless ``force``.

        ``min_interval`` defaults to ``jwks_refresh_min_interval_seconds``. Raises
        :class:`httpx.HTTPError` when the IdP cannot be reached and :class:`RuntimeError` when it
        answers something that is not a usable discovery document or key set.
        """
        interval = self._settings.jwks_refresh_min_interval_seconds if min_interval is None else min_interval
        async with self._lock:
            now = time.monotonic()
            if not force and now - self._last_refresh_attempt < interval:
                return
            self._last_refresh_attempt = now
            uri = await self._discover()
            resp = await self._http.get(uri)
            resp.raise_for_status()
            try:
                data = resp.json()
                keys = KeySet.import_key_set(data)
            except (ValueError, TypeError, KeyError, JoseError) as exc:
                raise RuntimeError(f"unreadable JWKS at {uri}: {type(exc).__name__}") from exc
            kids = {str(k.get("kid")) for k in data.get("keys", []) if k.get("kid")}
            if kids != self._kids:
                self._cache.clear()  # a removed key must not keep its tokens valid
            self._keys, self._kids, self._fetched_at = keys, kids, now
            self.jwks_fetches += 1

    async def start(self) -> None:
        """Load discovery and keys up front so the first call is not slow."""
        await self.refresh(force=True)

    async def _refresh_if_stale(self) -> None:
        """Re-read the JWKS when it is older than ``jwks_max_age_seconds`` (see the class doc)."""
        s = self._settings
        if self._keys is None:
            await self.refresh(force=True)  # nothing to fall back on: an IdP failure is the caller's
            return
        if time.monotonic() - self._fetched_at <= s.jwks_max_age_seconds:
            return
        try:
            await self.refresh(min_interval=min(s.jwks_refresh_min_interval_seconds, s.jwks_max_age_seconds))
        except (httpx.HTTPError, RuntimeError) as exc:
            log.warning(
                "JWKS refresh failed; verifying with the last known keys",
                extra={
                    "error": type(exc).__name__,
                    "keys_age_seconds": round(time.monotonic() - self._fetched_at),
                },
            )

    def _cached(self, digest: bytes, now: float) -> Identity | None:
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            self._cache.move_to_end(digest)
            return cached[0]
        return None

    def _keys_stale(self) -> bool:
        return self._keys is None or time.monotonic() - self._fetched_at > self._settings.jwks_max_age_seconds

    async def verify(self, token: str) -> Identity:
        """Verify a bearer token and return the caller's identity, or raise :class:`AuthError`.

        Cheap refusals (size, shape, algorithm) come before any network work, so junk tokens
        cannot make the verifier call the IdP. A cached verdict is used only while the key set is
        fresh: a stale one is re-read first, which drops the cache when a key went away.
        """
        s = self._settings
        if not token or len(token) > s.max_token_bytes:
            raise AuthError("token missing or oversized")
        digest = hashlib.sha256(token.encode()).digest()
        now = time.time()
        if not self._keys_stale():
            hit = self._cached(digest, now)
            if hit is not None:
                return hit
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthError("not a compact JWS")
        try:
            header = _b64json(parts[0])
        except (ValueError, TypeError) as exc:
            raise AuthError("unreadable token header") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg in _FORBIDDEN_ALGS or alg not in s.algorithms:
            raise AuthError(f"algorithm not allowed: {alg!r}")
        if self._keys_stale():
            await self._refresh_if_stale()
            hit = self._cached(digest, now)  # still valid if the key set did not change
            if hit is not None:
                return hit
        kid = header.get("kid")
        if kid is not None and str(kid) not in self._kids:
            try:
                await self.refresh()
            except (httpx.HTTPError, RuntimeError) as exc:
                # Keys are known: an IdP outage must not turn a forged kid into a 503.
                log.warning("JWKS refresh for an unknown kid failed", extra={"error": type(exc).__name__})
            if str(kid) not in self._kids:
                raise AuthError("unknown signing key")
        assert self._keys is not None
        try:
            decoded = jwt.decode(token, self._keys, algorithms=[alg])
        except (JoseError, ValueError) as exc:
            raise AuthError(f"signature check failed: {type(exc).__name__}") from exc
        claims = decoded.claims
        self._check_claims(claims, now)
        identity = identity_from_claims(claims, s.groups_claim)
        self._cache[digest] = (identity, float(claims["exp"]) + s.leeway_seconds)
        if len(self._cache) > 10000:
            self._cache.popitem(last=False)
        return identity

    def _check_claims(self, claims: dict[str, Any], now: float) -> None:
        s = self._settings
        leeway = s.leeway_seconds
        if claims.get("iss") not in (s.issuer, s.issuer.rstrip("/")):
            raise AuthError("wrong issuer")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else list(aud) if isinstance(aud, list) else []
        if s.audience not in auds:
            raise AuthError("wrong audience")
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            raise AuthError("no exp")
        if exp + leeway < now:
            raise AuthError("expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int | float) or nbf - leeway > now):
            raise AuthError("not yet valid")
        iat = claims.get("iat")
        if iat is not None and (not isinstance(iat, int | float) or iat - leeway > now):
            raise AuthError("issued in the future")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise AuthError("no subject")


def bearer_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    """The token a caller sent: ``Authorization: Bearer`` or ``x-api-key`` (what the SDKs send)."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    if x_api_key:
        return x_api_key.strip() or None
    return None
