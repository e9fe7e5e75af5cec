"""The recorder's read API: call state for async callers, read-only SQL for auditors.

With chDB only the recorder process may open the store, so every read of the audit trail goes
through here. Every route except ``/healthz`` and ``/metrics`` needs an OIDC bearer token
(``Authorization: Bearer`` or ``x-api-key``, as the Anthropic SDKs send it). Errors use the
Anthropic shape and every response carries a ``request-id`` header.

* ``GET /v1/calls/{call_id}``: the caller's own calls; auditors see every call. A call that
  exists but belongs to someone else answers 404 like an unknown one, so the API is no oracle
  for which call ids exist.
* ``POST /v1/audit/sql``: auditors only; ``{"query": ..., "format": "json" | "tsv"}``. The
  statement is checked and run read-only with time, memory and row limits (see the store).
* ``POST /v1/audit/find-secret``: auditors only; ``{"value": ...}``. The value's HMAC
  fingerprint (under the same key as policy and forwarder) is looked up among recorded masked
  values: which calls carried it, when, by whom, where and in which scope. The value is
  neither stored, nor logged, nor echoed; the answer names the fingerprint.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.recorder import audit_api, chain
from services.recorder.config import RecorderSettings, RetentionSettings
from services.recorder.store import AuditStore, SQLRejected, StoreError
from skillgate import metrics
from skillgate.config import RoleSettings
from skillgate.errors import GatewayError, error_body, error_type_for, new_request_id
from skillgate.events import Identity
from skillgate.fingerprints import load_fingerprint_key
from skillgate.identity import Role, roles_for
from skillgate.oidc import AuthError, TokenVerifier, bearer_from_headers
from skillgate.policy.masking import fingerprint as hmac_fingerprint

log = logging.getLogger(__name__)

JSON = "application/json"
TSV = "text/tab-separated-values; charset=utf-8"
MAX_CALL_ID_CHARS = 200
_JSON_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS


class SQLRequest(BaseModel):
    """Body of ``POST /v1/audit/sql``."""

    query: str = Field(min_length=1, max_length=100_000, description="One read-only statement.")
    format: Literal["json", "tsv"] = Field(default="json", description="Result encoding.")


class FindSecretRequest(BaseModel):
    """Body of ``POST /v1/audit/find-secret``."""

    value: str = Field(
        min_length=1,
        max_length=100_000,
        strict=True,
        description="The exact value (a leaked key, an address...); only its fingerprint is used.",
    )


#: Most masked occurrences one find-secret answer lists.
FIND_SECRET_MAX_EVENTS = 1000


class RequestIdMiddleware:
    """Gives every request a ``req_...`` id (``request.state.request_id``) and response header.

    A plain ASGI middleware rather than ``BaseHTTPMiddleware``: call-state polls are frequent
    and this adds nothing but the header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Attach the id to the scope and to the response headers."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "request-id" not in headers:
                    headers["request-id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", None) or new_request_id())


def error_response(
    request: Request,
    status: int,
    message: str,
    error_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """An Anthropic-shaped error with the request's id in body and header."""
    request_id = _request_id(request)
    return Response(
        content=error_body(status, message, request_id, error_type),
        status_code=status,
        media_type=JSON,
        headers={**(headers or {}), "request-id": request_id},
    )


def _json_default(value: Any) -> Any:
    # Types ClickHouse results hold that orjson does not encode by itself.
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)  # IPv4Address, IPv6Address, ...


def dumps(value: Any) -> bytes:
    """JSON bytes of an API document or result rows (UTC datetimes, Decimals as strings)."""
    return orjson.dumps(value, default=_json_default, option=_JSON_OPTIONS)


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return None


def call_document(call_id: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """The public JSON of one call, from its ``calls`` row."""
    response: Any = None
    body = row.get("response_body")
    if body:
        try:
            response = orjson.loads(body)
        except orjson.JSONDecodeError:
            response = None  # e.g. a recorded SSE stream: not one JSON document
    error: dict[str, Any] | None = None
    if row.get("error_type") or row.get("error_message"):
        status = int(row.get("status") or 500)
        error = {
            "type": row.get("error_type") or error_type_for(status),
            "message": row.get("error_message") or "",
        }
        if row.get("error_stage"):
            error["stage"] = row["error_stage"]
    usage = None
    if row.get("input_tokens") is not None or row.get("output_tokens") is not None:
        usage = {"input_tokens": row.get("input_tokens"), "output_tokens": row.get("output_tokens")}
    return {
        "id": call_id,
        "type": "call",
        "state": row.get("state"),
        "session_id": row.get("session_id") or None,
        "model": row.get("model"),
        "mode": row.get("mode"),
        "stream": row.get("stream"),
        "decision": row.get("decision"),
        "reason": row.get("reason"),
        "status": row.get("status"),
        "submitted_at": _iso(row.get("submitted_at")),
        "decided_at": _iso(row.get("decided_at")),
        "completed_at": _iso(row.get("completed_at")),
        "stop_reason": row.get("stop_reason"),
        "usage": usage,
        "attempts": row.get("attempts") or 0,
        "upstream_request_id": row.get("upstream_request_id"),
        "response": response,
        "error": error,
    }


def _tsv_cell(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, str):
        text = value
    elif isinstance(value, datetime | date):
        text = _iso(value) or ""
    elif isinstance(value, bool | int | float | Decimal):
        text = str(value)
    else:
        text = dumps(value).decode()
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def tsv(columns: list[str], rows: list[list[Any]]) -> bytes:
    """Rows as TabSeparatedWithNames (``\\N`` for NULL, ClickHouse's escaping)."""
    lines = ["\t".join(_tsv_cell(c) for c in columns)]
    lines.extend("\t".join(_tsv_cell(v) for v in row) for row in rows)
    return ("\n".join(lines) + "\n").encode()


def create_app(
    store: AuditStore,
    verifier: TokenVerifier,
    settings: RecorderSettings,
    roles: RoleSettings | None = None,
    fingerprint_key: bytes | Callable[[], bytes] = load_fingerprint_key,
    retention: RetentionSettings | None = None,
) -> FastAPI:
    """The read API over ``store``; tokens are checked by ``verifier``, roles by ``roles``.

    ``fingerprint_key`` is the HMAC key of masked values' fingerprints, or a function that
    loads it (default: :func:`~skillgate.fingerprints.load_fingerprint_key` from the
    environment, on the first find-secret request). It must be policy's and forwarder's key.
    The recorder process reads the key at start and passes the bytes (see
    :func:`services.recorder.app.serve`), so a missing key stops it at once.
    """
    role_settings = roles or RoleSettings()
    key_cache: list[bytes] = [fingerprint_key] if isinstance(fingerprint_key, bytes) else []

    def the_key() -> bytes:
        if not key_cache:
            assert callable(fingerprint_key)
            key_cache.append(fingerprint_key())
        return key_cache[0]

    app = FastAPI(
        title="skillgate recorder",
        description=__doc__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(request, exc.status, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(request, exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}" for err in exc.errors()
        )
        return error_response(request, 400, f"invalid request: {problems}"[:1000])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # Still an Anthropic-shaped answer; the traceback goes to the log, not to the caller.
        log.error("unhandled error", exc_info=exc)
        return error_response(request, 500, "internal error in the recorder")

    async def authenticate(request: Request) -> Identity:
        token = bearer_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if not token:
            raise GatewayError(
                401,
                "missing credentials: send an OIDC token as `Authorization: Bearer <token>`",
                headers={"www-authenticate": "Bearer"},
            )
        try:
            return await verifier.verify(token)
        except AuthError as exc:
            # The reason is for operators only; the caller learns nothing about which check failed.
            log.info("token refused", extra={"auth_failure": exc.reason})
            raise GatewayError(
                401, "invalid token", headers={"www-authenticate": 'Bearer error="invalid_token"'}
            ) from None
        except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as exc:
            log.warning("identity provider unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            raise GatewayError(503, "the identity provider is unavailable; retry shortly") from None

    @app.get("/healthz")
    async def healthz() -> Response:
        """Liveness: the audit store answers."""
        ok = await asyncio.to_thread(store.ping)
        return Response(
            content=dumps({"status": "ok" if ok else "store unavailable"}),
            status_code=200 if ok else 503,
            media_type=JSON,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics of this process."""
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    @app.get("/v1/calls/{call_id}")
    async def get_call(call_id: str, request: Request) -> Response:
        """State and outcome of one call, for its caller or an auditor."""
        identity = await authenticate(request)
        if len(call_id) > MAX_CALL_ID_CHARS:
            raise GatewayError(404, f"call {call_id[:64]}... not found")
        try:
            row = await asyncio.to_thread(store.call_state, call_id)
        except StoreError as exc:
            raise GatewayError(503, f"the audit store is unavailable: {exc.message}") from None
        owner = (
            row is not None
            and row.get("subject") == identity["subject"]
            and row.get("issuer") in (None, identity["issuer"])
        )
        if row is None or not (owner or Role.AUDITOR in roles_for(identity, role_settings)):
            raise GatewayError(404, f"call {call_id} not found")
        return Response(content=dumps(call_document(call_id, row)), media_type=JSON)

    async def require_auditor(request: Request, refusal: str) -> Identity:
        """The caller's identity, which must hold the auditor role (403 with ``refusal`` if not)."""
        identity = await authenticate(request)
        if Role.AUDITOR not in roles_for(identity, role_settings):
            raise GatewayError(403, refusal)
        return identity

    @app.post("/v1/audit/sql")
    async def audit_sql(body: SQLRequest, request: Request) -> Response:
        """Run one read-only SQL statement against the audit database (auditors only)."""
        identity = await require_auditor(request, "the auditor role is required to query the audit store")
        try:
            result = await asyncio.to_thread(
                store.query,
                body.query,
                max_rows=settings.sql_max_rows,
                max_seconds=settings.sql_max_seconds,
                max_memory_bytes=settings.sql_max_memory_bytes,
            )
        except SQLRejected as exc:
            raise GatewayError(400, f"query rejected: {exc}") from None
        except StoreError as exc:
            raise GatewayError(400, exc.message) from None
        # Who looked at what is part of the audit trail too.
        log.info(
            "audit query",
            extra={
                "subject": identity["subject"],
                # The query's shape, not its text: string literals are where an auditor puts
                # the leaked value being searched for, and logs must never hold it in clear.
                "query": re.sub(r"'(?:[^'\\]|\\.|'')*'", "'…'", body.query)[:2000],
                "query_sha256": hashlib.sha256(body.query.encode()).hexdigest(),
                "row_count": result.row_count,
                "elapsed_ms": result.elapsed_ms,
            },
        )
        if body.format == "tsv":
            return Response(
                content=tsv(result.columns, result.rows),
                media_type=TSV,
                headers={"x-skillgate-truncated": "true" if result.truncated else "false"},
            )
        doc = {
            "columns": result.columns,
            "types": result.types,
            "rows": result.rows,
            "row_count": result.row_count,
            "elapsed_ms": result.elapsed_ms,
            "truncated": result.truncated,
        }
        return Response(content=dumps(doc), media_type=JSON)

    @app.post("/v1/audit/find-secret")
    async def find_secret(body: FindSecretRequest, request: Request) -> Response:
        """Whether, when and by whom a value passed through masked (auditors only)."""
        identity = await require_auditor(request, "the auditor role is required to search for masked values")
        try:
            key = the_key()
        except (OSError, ValueError) as exc:
            log.error("fingerprint key unavailable", extra={"error": type(exc).__name__})
            raise GatewayError(503, "the fingerprint key is not available to the recorder") from None
        fp = hmac_fingerprint(body.value, key)
        try:
            hits, truncated = await asyncio.to_thread(
                store.find_masked,
                fp,
                limit=FIND_SECRET_MAX_EVENTS,
                max_seconds=settings.sql_max_seconds,
            )
        except StoreError as exc:
            raise GatewayError(503, f"the audit store is unavailable: {exc.message}") from None
        calls = sorted({str(h["call_id"]) for h in hits})
        # Who searched is part of the audit trail; what was searched for is only its fingerprint.
        log.info(
            "audit find-secret",
            extra={
                "subject": identity["subject"],
                "fingerprint": fp[:16],
                "occurrences": len(hits),
                "calls": len(calls),
            },
        )
        doc = {
            "fingerprint": fp,
            "found": bool(hits),
            "call_count": len(calls),
            "matches": hits,
            "truncated": truncated,
        }
        return Response(content=dumps(doc), media_type=JSON)

    def checkpoint_key() -> bytes:
        return chain.checkpoint_key(settings, the_key())

    audit_api.add_routes(
        app, store, settings, retention or RetentionSettings(), require_auditor, checkpoint_key
    )
    return app
