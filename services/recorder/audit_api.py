"""The investigator routes of the recorder's read API (auditor role only).

* ``GET /v1/audit/calls``: search recorded calls by user, group, time range, model, skill,
  decision, state, session and keyword (``q``, every word in the request or in the response);
  newest first, ``limit`` per page, ``next_cursor`` for the next page (keyset, no depth cap).
* ``GET /v1/audit/calls/{call_id}``: one call's full record, masked bodies included.
* ``GET /v1/audit/sessions/{session_id}``: the session's ordered timeline (see :mod:`.timeline`).
* ``POST /v1/audit/export``: matching calls as JSON lines or Parquet (ClickHouse writes both).
* ``POST /v1/audit/verify``: recompute the tamper-evidence chain and report what was deleted,
  altered or inserted out of band (see :mod:`.chain`).

Every request is logged with the auditor's subject: who looked at what is audit trail too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from services.recorder import timeline
from services.recorder.config import RecorderSettings, RetentionSettings
from services.recorder.search import CallSearch, InvalidSearch, parse_time
from services.recorder.store import AuditStore, StoreError
from skillgate.errors import GatewayError
from skillgate.events import Identity

log = logging.getLogger(__name__)

JSON = "application/json"
MAX_ID_CHARS = 200
RequireAuditor = Callable[[Request, str], Awaitable[Identity]]


class ExportRequest(BaseModel):
    """Body of ``POST /v1/audit/export``: the search filters and the output format."""

    format: Literal["jsonl", "parquet"] = Field(default="jsonl", description="jsonl or parquet.")
    since: str | None = Field(default=None, description="ISO 8601 start (inclusive).")
    until: str | None = Field(default=None, description="ISO 8601 end (exclusive).")
    user: str | None = Field(default=None, description="Caller subject or username.")
    group: str | None = Field(default=None, description="Caller group.")
    model: str | None = Field(default=None, description="Model name.")
    skill: str | None = Field(default=None, description="Claude Skill id.")
    decision: str | None = Field(default=None, description="allow, deny, require_approval, rate_limited.")
    state: str | None = Field(default=None, description="completed, failed, denied, ...")
    session: str | None = Field(default=None, description="Session id.")
    q: str | None = Field(default=None, max_length=1000, description="Keywords (all must occur).")
    limit: int | None = Field(default=None, ge=1, description="Most calls (default: the configured maximum).")


def _search(
    *,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None = None,
    **filters: str | None,
) -> CallSearch:
    try:
        return CallSearch(
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            limit=limit,
            cursor=cursor,
            **{k: v or None for k, v in filters.items()},
        )
    except InvalidSearch as exc:
        raise GatewayError(400, str(exc)) from None


def add_routes(
    app: FastAPI,
    store: AuditStore,
    settings: RecorderSettings,
    retention: RetentionSettings,
    require_auditor: RequireAuditor,
    checkpoint_key: Callable[[], bytes],
) -> None:
    """Register the investigator routes on ``app``."""
    from services.recorder.api import dumps  # the API's JSON encoder (shared, no import cycle)

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except InvalidSearch as exc:
            raise GatewayError(400, str(exc)) from None
        except StoreError as exc:
            raise GatewayError(503, f"the audit store could not answer: {exc.message}") from None

    @app.get("/v1/audit/calls")
    async def search_calls(
        request: Request,
        user: str | None = None,
        group: str | None = None,
        since: str | None = None,
        until: str | None = None,
        model: str | None = None,
        skill: str | None = None,
        decision: str | None = None,
        state: str | None = None,
        session: str | None = None,
        q: str | None = Query(default=None, max_length=1000),
        limit: int = Query(default=50, ge=1),
        cursor: str | None = Query(default=None, max_length=1000),
    ) -> Response:
        """Search recorded calls (auditors only); newest first, keyset-paginated."""
        identity = await require_auditor(request, "the auditor role is required to search calls")
        search = _search(
            since=since, until=until, limit=min(limit, settings.search_max_limit), cursor=cursor,
            user=user, group=group, model=model, skill=skill, decision=decision, state=state,
            session=session, q=q,
        )  # fmt: skip
        started = time.perf_counter()
        rows, next_cursor = await run(store.search_calls, search)
        log.info(
            "audit search",
            extra={"subject": identity["subject"], "results": len(rows), "keywords": bool(q),
                   "elapsed_ms": round((time.perf_counter() - started) * 1000, 2)},
        )  # fmt: skip
        return Response(content=dumps({"data": rows, "next_cursor": next_cursor}), media_type=JSON)

    @app.get("/v1/audit/calls/{call_id}")
    async def get_record(call_id: str, request: Request) -> Response:
        """One call's full record with its masked bodies (auditors only)."""
        identity = await require_auditor(request, "the auditor role is required to read call records")
        row = None if len(call_id) > MAX_ID_CHARS else await run(store.call_record, call_id)
        if row is None:
            raise GatewayError(404, f"call {call_id[:MAX_ID_CHARS]} not found")
        log.info("audit call record", extra={"subject": identity["subject"], "call_id": call_id})
        return Response(content=dumps(row), media_type=JSON)

    @app.get("/v1/audit/sessions/{session_id}")
    async def get_session(session_id: str, request: Request) -> Response:
        """The session's ordered timeline (auditors only)."""
        identity = await require_auditor(request, "the auditor role is required to replay sessions")
        found = None if len(session_id) > MAX_ID_CHARS else await run(store.session_timeline, session_id)
        if found is None:
            raise GatewayError(404, f"session {session_id[:MAX_ID_CHARS]} not found")
        log.info("audit session replay", extra={"subject": identity["subject"], "session_id": session_id})
        doc = timeline.document(session_id, found["calls"], found["events"])
        return Response(content=dumps(doc), media_type=JSON)

    @app.post("/v1/audit/export")
    async def export(body: ExportRequest, request: Request) -> Response:
        """Matching calls as JSON lines or Parquet, oldest first (auditors only)."""
        identity = await require_auditor(request, "the auditor role is required to export calls")
        filters = body.model_dump(exclude={"format", "limit", "since", "until"})
        search = _search(since=body.since, until=body.until, limit=1, **filters)
        max_rows = min(body.limit or settings.export_max_rows, settings.export_max_rows)
        data: bytes = await run(store.export, search, body.format, max_rows)
        log.info(
            "audit export",
            extra={"subject": identity["subject"], "format": body.format, "bytes": len(data),
                   "filters": {k: v for k, v in filters.items() if v and k != "q"}},
        )  # fmt: skip
        media = "application/x-ndjson" if body.format == "jsonl" else "application/vnd.apache.parquet"
        return Response(content=data, media_type=media)

    @app.post("/v1/audit/verify")
    async def verify(request: Request) -> Response:
        """Recompute the hash chain over the events log and report tampering (auditors only)."""
        identity = await require_auditor(request, "the auditor role is required to verify the audit store")
        try:
            key = checkpoint_key()
        except (OSError, ValueError):
            raise GatewayError(503, "the checkpoint key is not available to the recorder") from None
        report = await run(store.verify_chain, key, retention.metadata_days)
        doc = report.document()
        log.info(
            "audit verify",
            extra={"subject": identity["subject"], "ok": report.ok, "rows_checked": report.rows_checked,
                   "deleted": len(report.deleted), "altered": len(report.altered),
                   "inserted": len(report.inserted), "broken_checkpoints": len(report.broken_checkpoints)},
        )  # fmt: skip
        return Response(content=dumps(doc), media_type=JSON)
