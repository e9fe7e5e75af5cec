"""The ingress HTTP application: a drop-in for the Anthropic Messages API.

``POST /v1/messages``: authenticate, check, publish to calls.submitted (answering only after the
broker acked), wait for the answer on this replica's reply partition, relay it unchanged.
``POST /v1/calls`` / ``GET /v1/calls/{id}``: the same call, asynchronously, for high-volume platforms.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import orjson
from aiokafka import AIOKafkaProducer
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.ingress import approvals, handlers
from services.ingress.approvals import ApprovalBook
from services.ingress.config import IngressSettings
from services.ingress.replies import ReplyRouter
from services.ingress.streaming import StreamCall
from skillgate import events, topics
from skillgate.codec import AvroCodec, default_codec
from skillgate.config import KafkaSettings, OIDCSettings, RoleSettings
from skillgate.errors import GatewayError, error_body, new_request_id
from skillgate.events import CALL_SUBMITTED, CallReply, Identity
from skillgate.follow import TopicFollower
from skillgate.identity import Role, roles_for
from skillgate.kafka import make_producer
from skillgate.logs import call_context
from skillgate.metrics import LATENCY_BUCKETS, render
from skillgate.oidc import AuthError, TokenVerifier, bearer_from_headers

log = logging.getLogger(__name__)

REQUESTS = Counter("skillgate_ingress_requests_total", "Requests answered", ["route", "status"])
LATENCY = Histogram(
    "skillgate_ingress_seconds", "Time from request to answer", ["route"], buckets=LATENCY_BUCKETS
)
IN_FLIGHT = Gauge("skillgate_ingress_waiting_calls", "Sync calls waiting for their answer")

# Response headers that describe the upstream connection, not the message: never relayed.
_DROP_RESPONSE_HEADERS = frozenset(
    {
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "server",
    }
)


@dataclass
class Deps:
    """What the request handlers need, created once at startup."""

    settings: IngressSettings
    kafka: KafkaSettings
    roles: RoleSettings
    producer: AIOKafkaProducer
    verifier: TokenVerifier
    router: ReplyRouter
    codec: AvroCodec
    recorder: httpx.AsyncClient
    submitted_topic: str
    recent: OrderedDict[str, str]  # call id → subject, for calls this replica accepted lately
    book: ApprovalBook
    approvals_decided_topic: str


def anthropic_error(
    status: int,
    message: str,
    request_id: str | None = None,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An Anthropic-shaped error response with a request id in body and header."""
    rid = request_id or new_request_id()
    return Response(
        content=error_body(status, message, rid, error_type),
        status_code=status,
        media_type="application/json",
        headers={"request-id": rid, **(headers or {})},
    )


async def get_deps(request: Request) -> Deps:
    """The application's dependencies (set up in the lifespan).

    ``async`` on purpose: FastAPI runs a plain ``def`` dependency in its threadpool, which cost
    more than everything else the ingress does per call.
    """
    deps: Deps = request.app.state.deps
    return deps


async def authenticate(request: Request, deps: Annotated[Deps, Depends(get_deps)]) -> Identity:
    """Verify the caller's OIDC token (``Authorization: Bearer`` or ``x-api-key``)."""
    token = bearer_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if token is None:
        raise GatewayError(
            401,
            "missing credentials: send an OIDC access token as `Authorization: Bearer <token>` "
            "or `x-api-key: <token>`",
            headers={"www-authenticate": 'Bearer realm="skillgate"'},
        )
    try:
        return await deps.verifier.verify(token)
    except AuthError as exc:
        log.info("authentication refused", extra={"reason": exc.reason})
        raise GatewayError(
            401,
            "invalid or expired token",
            headers={"www-authenticate": 'Bearer realm="skillgate", error="invalid_token"'},
        ) from None
    except (httpx.HTTPError, RuntimeError) as exc:
        log.error("identity provider unreachable", extra={"error": type(exc).__name__})
        raise GatewayError(503, "cannot verify tokens right now: identity provider unreachable") from None


async def require_caller(
    identity: Annotated[Identity, Depends(authenticate)], deps: Annotated[Deps, Depends(get_deps)]
) -> Identity:
    """The caller must hold the ``caller`` role."""
    if Role.CALLER not in roles_for(identity, deps.roles):
        raise GatewayError(403, "your identity lacks the `caller` role needed to call Claude")
    return identity


Caller = Annotated[Identity, Depends(require_caller)]
DepsDep = Annotated[Deps, Depends(get_deps)]


def _error_response(exc: GatewayError) -> Response:
    """The Anthropic-shaped response of a :class:`GatewayError` (returned, or raised and caught)."""
    return anthropic_error(exc.status, exc.message, error_type=exc.error_type, headers=exc.headers)


def _reply_response(reply: CallReply, call_id: str) -> Response:
    headers = {k: v for k, v in reply["headers"].items() if k.lower() not in _DROP_RESPONSE_HEADERS}
    headers["x-skillgate-call-id"] = call_id
    return Response(content=reply["body"], status_code=reply["status"], headers=headers)


async def _publish(deps: Deps, event: events.CallSubmitted) -> None:
    try:
        await deps.producer.send_and_wait(
            deps.submitted_topic,
            deps.codec.encode(CALL_SUBMITTED, event),
            key=event["session_id"].encode(),
        )
    except Exception as exc:
        log.error("could not publish call", extra={"error": type(exc).__name__})
        raise GatewayError(
            503, "skillgate could not queue the call (Kafka unavailable); retry later"
        ) from exc


async def _accept(
    request: Request, deps: Deps, identity: Identity, *, path: str, mode: str
) -> tuple[events.CallSubmitted, dict[str, Any]]:
    body = await handlers.read_body(
        request.stream(), request.headers.get("content-length"), deps.settings.max_body_bytes
    )
    if path == "/v1/messages/count_tokens":
        parsed = handlers.check_count_tokens_request(body)
    else:
        parsed = handlers.check_messages_request(body)
    stream = bool(parsed.get("stream", False))
    if stream and mode == "async":
        raise GatewayError(400, "stream: true is not available for async calls (use /v1/messages)")
    call_id = events.new_call_id()
    session_id = handlers.session_id_from(request.headers, call_id)
    call_context.set((call_id, session_id))
    event = handlers.build_submitted(
        call_id=call_id,
        session_id=session_id,
        identity=identity,
        instance=deps.settings.instance_id,
        mode=mode,
        stream=stream,
        reply_to=None,
        path=path,
        query=request.url.query,
        headers=request.headers,
        body=body,
        model=str(parsed.get("model", "")),
        client_ip=request.client.host if request.client else None,
    )
    return event, parsed


async def recorded_call(deps: Deps, call_id: str, token: str | None) -> httpx.Response:
    """The recorder's view of a call, asked with the caller's own token (it checks ownership)."""
    return await deps.recorder.get(f"/v1/calls/{call_id}", headers={"authorization": f"Bearer {token}"})


async def _poll_recorded(deps: Deps, call_id: str, token: str | None, deadline: float) -> Response | None:
    """Fallback when this replica lost the reply partition: wait for the recorded outcome."""
    while time.monotonic() < deadline:
        try:
            resp = await recorded_call(deps, call_id, token)
            if resp.status_code == 200:
                doc = resp.json()
                if doc.get("state") in ("completed", "failed", "denied", "expired", "rate_limited"):
                    if doc.get("response") is not None:
                        return Response(
                            content=orjson.dumps(doc["response"]),
                            status_code=int(doc.get("status") or 200),
                            media_type="application/json",
                            headers={"x-skillgate-call-id": call_id},
                        )
                    err = doc.get("error") or {}
                    return anthropic_error(
                        int(doc.get("status") or 500),
                        str(err.get("message") or doc.get("reason") or "call failed"),
                        error_type=err.get("type"),
                    )
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)  # polling interval of a condition with a deadline
    return None


async def _disconnected(request: Request) -> None:
    """Complete when the caller closes its connection (the body was read already, so the
    server's next message for this request is the disconnect)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server cannot tell: assume the caller is still there
        await asyncio.Event().wait()  # completes never; cancelled once the stream starts or ends


async def sync_call(request: Request, deps: Deps, identity: Identity, path: str) -> Response:
    """Accept a call and hold the caller until its answer arrives (or the sync timeout)."""
    event, _ = await _accept(request, deps, identity, path=path, mode="sync")
    if event["stream"]:  # server-sent events relayed from Kafka chunks: services/ingress/streaming.py
        streamer = StreamCall(
            router=deps.router,
            producer=deps.producer,
            codec=deps.codec,
            cancel_topic=topics.name(deps.kafka, topics.CANCELLED),
            instance=deps.settings.instance_id,
            ping_seconds=deps.settings.stream_ping_seconds,
            first_reply_timeout=deps.settings.sync_timeout_seconds,
            idle_timeout=deps.settings.sync_timeout_seconds,
            approval_wait=deps.settings.approval_wait_seconds,
            approvals_url=deps.settings.approvals_url,
        )
        return await streamer.run(
            event,
            lambda: _publish(deps, event),
            _reply_response,
            _DROP_RESPONSE_HEADERS,
            disconnected=lambda: _disconnected(request),
        )
    call_id = event["call_id"]
    waiter, reply_to = deps.router.register(call_id)
    event["reply_to"] = reply_to
    deadline = time.monotonic() + deps.settings.sync_timeout_seconds
    IN_FLIGHT.inc()
    try:
        await _publish(deps, event)
        pending: dict[str, Any] | None = None  # the approval notice, once the call is held
        while (reply := await waiter.next(deadline - time.monotonic())) is not None:
            if reply["kind"] != "approval_pending":
                return _reply_response(reply, call_id)
            # Held for a human: wait for the decision up to the approval wait (never longer
            # than the sync timeout), then tell the caller how to get the result later.
            pending = orjson.loads(reply["body"])
            deadline = min(deadline, time.monotonic() + deps.settings.approval_wait_seconds)
        if pending is not None and not waiter.orphaned.is_set():
            return _error_response(
                approvals.pending_error(
                    str(pending["approval_id"]),
                    str(pending.get("reason") or ""),
                    deps.settings.approvals_url,
                    call_id,
                )
            )
        if waiter.orphaned.is_set():
            token = bearer_from_headers(
                request.headers.get("authorization"), request.headers.get("x-api-key")
            )
            answer = await _poll_recorded(deps, call_id, token, deadline)
            if answer is not None:
                return answer
        return anthropic_error(
            504,
            f"skillgate is still processing call {call_id}; fetch its outcome at /v1/calls/{call_id}",
            error_type="timeout_error",
            # The call is still going: a retry by the SDK would be a second call.
            headers={"x-skillgate-call-id": call_id, "x-should-retry": "false"},
        )
    finally:
        IN_FLIGHT.dec()
        deps.router.unregister(call_id)


async def approved_result(request: Request, deps: Deps, identity: Identity, approval_id: str) -> Response:
    """A retry with ``x-skillgate-approval``: the result of the one upstream call the approval
    released (from the audit store), never a second call.

    Only the requester, with the same request body, gets it; while the approval is pending, or
    after it was denied or expired, the caller is told so.
    """
    body = await handlers.read_body(
        request.stream(), request.headers.get("content-length"), deps.settings.max_body_bytes
    )
    book = deps.book
    await book.wait_for(lambda: book.get(approval_id) is not None, 2.0)  # a replica just started
    view = book.get(approval_id)
    if view is None or view.request["identity"]["subject"] != identity["subject"]:
        raise GatewayError(404, f"no approval {approval_id} for a call of yours")
    requested = view.request
    call_id = requested["call_id"]
    if approvals.request_matches(requested, body) is False:
        raise GatewayError(
            400,
            f"this request differs from the one approval {approval_id} is for; send exactly the same request",
        )
    state = view.state(events.now_micros())
    if state == "pending":
        return _error_response(
            approvals.pending_error(approval_id, requested["reason"], deps.settings.approvals_url, call_id)
        )
    if state != "approved":
        reason = view.resolved["reason"] if view.resolved else f"approval {approval_id} expired"
        return anthropic_error(
            403,
            f"{reason}; the call was not forwarded",
            error_type="permission_error",
            headers={
                "x-skillgate-approval-id": approval_id,
                "x-skillgate-approval-state": state,
                "x-skillgate-call-id": call_id,
                "x-should-retry": "false",
            },
        )
    token = bearer_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
    answer = await _poll_recorded(
        deps, call_id, token, time.monotonic() + deps.settings.approval_wait_seconds
    )
    if answer is None:
        return anthropic_error(
            504,
            f"call {call_id} was approved and is still running; fetch its outcome at /v1/calls/{call_id}",
            error_type="timeout_error",
            headers={"x-skillgate-call-id": call_id, "x-should-retry": "false"},
        )
    answer.headers["x-skillgate-approval-id"] = approval_id
    return answer


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start Kafka clients, the token verifier and the reply router; stop them cleanly."""
    settings: IngressSettings = app.state.settings
    kafka = KafkaSettings()
    if kafka.create_topics:
        await topics.ensure_topics(kafka)
    from skillgate.config import CommonSettings

    producer = make_producer(kafka)
    await producer.start()
    verifier = TokenVerifier(OIDCSettings())
    try:
        await verifier.start()
    except Exception as exc:  # the IdP may come up after us; tokens are verified lazily then
        log.warning("identity provider not reachable at start", extra={"error": str(exc)})
    router = ReplyRouter(kafka, settings.replies_group, settings.instance_id)
    await router.start()
    book = ApprovalBook()
    follower = TopicFollower(kafka, ApprovalBook.SUFFIXES, book.on_event)
    await follower.start()
    recorder = httpx.AsyncClient(base_url=CommonSettings().recorder_url, timeout=5.0)
    app.state.deps = Deps(
        settings=settings,
        kafka=kafka,
        roles=RoleSettings(),
        producer=producer,
        verifier=verifier,
        router=router,
        codec=default_codec(),
        recorder=recorder,
        submitted_topic=topics.name(kafka, topics.SUBMITTED),
        recent=OrderedDict(),
        book=book,
        approvals_decided_topic=topics.name(kafka, topics.APPROVALS_DECIDED),
    )
    log.info("ingress ready", extra={"instance": settings.instance_id})
    try:
        yield
    finally:
        await follower.stop()
        await router.stop()
        await producer.stop()
        await verifier.close()
        await recorder.aclose()


def create_app(settings: IngressSettings | None = None) -> FastAPI:
    """Build the ingress application."""
    app = FastAPI(
        title="skillgate ingress",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.settings = settings or IngressSettings()

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        REQUESTS.labels(request.url.path if exc.status != 404 else "other", str(exc.status)).inc()
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path} is not an API route of skillgate"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return anthropic_error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return anthropic_error(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return anthropic_error(500, "internal error in skillgate ingress; the call was not forwarded")

    @app.post("/v1/messages")
    async def messages(request: Request, identity: Caller, deps: DepsDep) -> Response:
        """Anthropic Messages API, synchronously through the pipeline."""
        start = time.perf_counter()
        approval_id = request.headers.get(handlers.APPROVAL_HEADER)
        if approval_id:
            response = await approved_result(request, deps, identity, approval_id.strip())
        else:
            response = await sync_call(request, deps, identity, "/v1/messages")
        elapsed = time.perf_counter() - start
        REQUESTS.labels("/v1/messages", str(response.status_code)).inc()
        LATENCY.labels("/v1/messages").observe(elapsed)
        # One access line per call; policy and forwarder log per call only at DEBUG.
        log.info(
            "call answered",
            extra={
                "status": response.status_code,
                "ms": round(elapsed * 1000, 2),
                "subject": identity["subject"],
                "client_id": identity["client_id"],
            },
        )
        return response

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request, identity: Caller, deps: DepsDep) -> Response:
        """Token counting, passed through the pipeline like any call (it carries the prompt)."""
        response = await sync_call(request, deps, identity, "/v1/messages/count_tokens")
        REQUESTS.labels("/v1/messages/count_tokens", str(response.status_code)).inc()
        return response

    @app.post("/v1/calls", status_code=202)
    async def submit_async(request: Request, identity: Caller, deps: DepsDep) -> Response:
        """Accept a Messages request asynchronously: 202 with the call id once Kafka acked it."""
        event, _ = await _accept(request, deps, identity, path="/v1/messages", mode="async")
        await _publish(deps, event)
        call_id = event["call_id"]
        deps.recent[call_id] = identity["subject"]
        if len(deps.recent) > 100_000:
            deps.recent.popitem(last=False)
        REQUESTS.labels("/v1/calls", "202").inc()
        return Response(
            content=orjson.dumps(
                {
                    "id": call_id,
                    "type": "call",
                    "state": "submitted",
                    "session_id": event["session_id"],
                    "url": f"/v1/calls/{call_id}",
                }
            ),
            status_code=202,
            media_type="application/json",
            headers={"x-skillgate-call-id": call_id, "location": f"/v1/calls/{call_id}"},
        )

    @app.get("/v1/calls/{call_id}")
    async def get_call(call_id: str, request: Request, identity: Caller, deps: DepsDep) -> Response:
        """State of an async (or any) call, from the audit store; the caller's own calls only."""
        token = bearer_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
        try:
            resp = await recorded_call(deps, call_id, token)
        except httpx.HTTPError:
            raise GatewayError(503, "the audit store is unreachable; retry shortly") from None
        if resp.status_code == 404 and deps.recent.get(call_id) == identity["subject"]:
            # Accepted here a moment ago and not recorded yet (record lag is about a second).
            return Response(
                content=orjson.dumps({"id": call_id, "type": "call", "state": "submitted"}),
                media_type="application/json",
            )
        headers = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "request-id")}
        return Response(content=resp.content, status_code=resp.status_code, headers=headers)

    app.include_router(approvals.create_router(get_deps, authenticate))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(deps: DepsDep) -> Response:
        """Ready once this replica owns reply partitions."""
        ok = deps.router.ready
        return Response(
            content=orjson.dumps({"ready": ok}),
            status_code=200 if ok else 503,
            media_type="application/json",
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics."""
        body, content_type = render()
        return Response(content=body, media_type=content_type)

    return app
