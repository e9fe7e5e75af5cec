"""Streamed calls (``"stream": true``) at the ingress: server-sent events from Kafka chunks.

The call is published like a synchronous one (with this replica's reply partition in
``reply_to``). The first reply decides the answer's shape:

* ``kind: response``: the call ended before any stream began (denied by policy, an upstream
  error status, a fail-closed refusal): relayed as the JSON error it is, so the SDKs raise
  their usual ``APIStatusError``.
* ``kind: chunk``: the stream began. The caller gets ``text/event-stream`` with the status and
  headers of the first chunk, then the SSE bytes of every chunk in ``seq`` order, until the
  ``end`` message. The forwarder already masked and checked every byte (nothing here parses
  or changes the events), so what the caller reads is exactly what policy let through.

While no chunk arrives for ``stream_ping_seconds`` the caller gets a ``ping`` event (the
Messages API's own keep-alive, which the SDKs ignore), so proxies and clients do not time out
while the model thinks or the forwarder holds a tool call for checking.

If the caller goes away before the ``end`` message (even before the stream began: the ingress
watches the connection while the call is queued or decided), a ``CallCancelled`` event goes to
``calls.cancelled``; the forwarder streaming the call closes its upstream request and records
the call as ``failed`` (``client_disconnected``). If this replica loses the reply partition in
a rebalance mid-stream, the caller gets an ``error`` event naming the call id; the call still
completes and is recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaProducer
from fastapi.responses import Response, StreamingResponse
from prometheus_client import Counter

from services.ingress.approvals import pending_error
from services.ingress.replies import ReplyRouter, Waiter
from skillgate import events
from skillgate.codec import AvroCodec
from skillgate.errors import GatewayError, sse_error_frame
from skillgate.events import CALL_CANCELLED, CallCancelled, CallReply, CallSubmitted

log = logging.getLogger(__name__)

STREAM_OUTCOMES = Counter(
    "skillgate_ingress_streams_total",
    "Streamed calls by how the caller's stream ended",
    ["outcome"],  # completed, not_streamed, disconnected, orphaned, idle_timeout, timeout, approval_pending
)
PINGS = Counter("skillgate_ingress_stream_pings_total", "Keep-alive pings sent to streaming callers")

PING_FRAME: Final = b'event: ping\ndata: {"type": "ping"}\n\n'
#: Tasks publishing cancellations (kept referenced until they finish).
_BACKGROUND: set[asyncio.Task[None]] = set()


class StreamCall:
    """One streamed call: publish, wait for the first reply, then relay chunks as SSE."""

    def __init__(
        self,
        *,
        router: ReplyRouter,
        producer: AIOKafkaProducer,
        codec: AvroCodec,
        cancel_topic: str,
        instance: str,
        ping_seconds: float,
        first_reply_timeout: float,
        idle_timeout: float,
        approval_wait: float = 60.0,
        approvals_url: str = "",
    ) -> None:
        self.router = router
        self.producer = producer
        self.codec = codec
        self.cancel_topic = cancel_topic
        self.instance = instance
        self.ping_seconds = ping_seconds
        self.first_reply_timeout = first_reply_timeout
        self.idle_timeout = idle_timeout
        self.approval_wait = approval_wait
        self.approvals_url = approvals_url

    async def run(
        self,
        event: CallSubmitted,
        publish: Callable[[], Awaitable[None]],
        as_response: Callable[[CallReply, str], Response],
        drop_headers: frozenset[str],
        disconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> Response:
        """Publish ``event`` and answer: a JSON response when no stream began, else SSE.

        ``disconnected`` completes when the caller goes away: if that happens before the stream
        began (the call still queued or being decided), the call is cancelled at once, so the
        forwarder does not start it for nobody. A call held for approval is not cancelled (once
        approved it runs, and the requester fetches the result with ``x-skillgate-approval``).
        """
        call_id = event["call_id"]
        waiter, reply_to = self.router.register(call_id)
        event["reply_to"] = reply_to
        streaming = False
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            await publish()
            first = await self._first(waiter, gone=gone)
            if first is None and gone is not None and gone.done():
                self._cancel(event, 0, "client_disconnected")
                STREAM_OUTCOMES.labels("disconnected").inc()
                raise GatewayError(499, f"the caller of call {call_id} went away; it was cancelled")
            pending: dict[str, Any] | None = None
            while first is not None and first["kind"] == "approval_pending":
                # Held for a human: the stream starts once approved, if within the approval wait.
                # A caller leaving now does not cancel: once approved, the call runs and a retry
                # with x-skillgate-approval returns its recorded result.
                pending = orjson.loads(first["body"])
                first = await self._first(waiter, self.approval_wait)
            if first is None and pending is not None and not waiter.orphaned.is_set():
                # Not cancelled: the call stays held; once approved it runs (and is recorded),
                # and a retry with x-skillgate-approval returns its result.
                STREAM_OUTCOMES.labels("approval_pending").inc()
                raise pending_error(
                    str(pending["approval_id"]), str(pending.get("reason") or ""), self.approvals_url, call_id
                )
            if first is None:
                self._cancel(event, 0, "no_first_reply")
                outcome = "orphaned" if waiter.orphaned.is_set() else "timeout"
                STREAM_OUTCOMES.labels(outcome).inc()
                raise GatewayError(
                    503 if outcome == "orphaned" else 504,
                    f"skillgate could not start the stream of call {call_id} in time; it was cancelled"
                    if outcome == "timeout"
                    else f"skillgate lost the reply channel of call {call_id} (replicas rebalanced); "
                    "it was cancelled",
                    headers={"x-skillgate-call-id": call_id, "x-should-retry": "false"},
                )
            if first["kind"] != "chunk":
                STREAM_OUTCOMES.labels("not_streamed").inc()
                return as_response(first, call_id)
            headers = {k: v for k, v in first["headers"].items() if k.lower() not in drop_headers}
            headers["x-skillgate-call-id"] = call_id
            headers["cache-control"] = "no-cache"
            streaming = True
            return StreamingResponse(
                self._relay(event, waiter, first),
                status_code=first["status"],
                headers=headers,
                media_type=headers.pop("content-type", "text/event-stream"),
            )
        finally:
            if gone is not None:
                gone.cancel()  # the streaming response watches for the disconnect itself
            if not streaming:
                self.router.unregister(call_id)

    async def _first(
        self, waiter: Waiter, within: float | None = None, gone: asyncio.Future[None] | None = None
    ) -> CallReply | None:
        """The first reply, or ``None`` on timeout (``within``, default the first-reply timeout),
        when the reply partition moved away, or when the caller went away (``gone``)."""
        return await waiter.next(self.first_reply_timeout if within is None else within, gone)

    async def _relay(self, event: CallSubmitted, waiter: Waiter, first: CallReply) -> AsyncIterator[bytes]:
        """The SSE bytes for the caller: chunks in order, pings while silent, until ``end``."""
        call_id = event["call_id"]
        delivered = 0
        ended = False
        try:
            expected = first["seq"] + 1
            if first["body"]:
                yield first["body"]
            delivered = 1
            idle = 0.0
            while True:
                reply = await waiter.next(self.ping_seconds)
                if reply is None:
                    if waiter.orphaned.is_set():
                        ended = True
                        STREAM_OUTCOMES.labels("orphaned").inc()
                        yield sse_error_frame(
                            "api_error",
                            f"skillgate lost this stream's reply channel (replicas rebalanced); call "
                            f"{call_id} still completes and is recorded",
                        )
                        return
                    idle += self.ping_seconds
                    if idle >= self.idle_timeout:
                        STREAM_OUTCOMES.labels("idle_timeout").inc()
                        yield sse_error_frame(
                            "timeout_error", f"call {call_id} sent nothing for {idle:.0f} s"
                        )
                        return
                    PINGS.inc()
                    yield PING_FRAME
                    continue
                idle = 0.0
                if reply["seq"] < expected and reply["kind"] == "chunk":
                    continue  # a duplicate (redelivery): already relayed
                if reply["kind"] == "end":
                    ended = True
                    STREAM_OUTCOMES.labels("completed").inc()
                    if reply["body"]:
                        yield reply["body"]
                    return
                if reply["seq"] != expected:
                    ended = True
                    yield sse_error_frame("api_error", f"stream of call {call_id} lost chunk {expected}")
                    return
                expected += 1
                delivered += 1
                if reply["body"]:
                    yield reply["body"]
        finally:
            self.router.unregister(call_id)
            if not ended:
                # The caller went away (the server cancelled this generator): stop the upstream.
                STREAM_OUTCOMES.labels("disconnected").inc()
                self._cancel(event, delivered, "client_disconnected")

    def _cancel(self, event: CallSubmitted, delivered: int, reason: str) -> None:
        """Publish a ``CallCancelled`` for the forwarder (in the background: the request that
        would await it is being torn down)."""
        cancelled = CallCancelled(
            **events.envelope(
                event["call_id"],
                event["session_id"],
                event["identity"],
                None,
                event_id=events.derived_event_id(event["call_id"], "cancelled"),
            ),
            reason=reason,
            ingress_instance=self.instance,
            chunks_delivered=delivered,
        )

        async def send() -> None:
            try:
                await self.producer.send_and_wait(
                    self.cancel_topic,
                    self.codec.encode(CALL_CANCELLED, cancelled),
                    key=event["session_id"].encode(),
                )
            except Exception as exc:
                log.error("could not publish a cancellation", extra={"error": type(exc).__name__})

        task = asyncio.get_running_loop().create_task(send())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
