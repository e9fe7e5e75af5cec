"""The forwarder's consume loop: many calls in flight, offsets committed in order, at most one
upstream call per call id.

At-most-once across redelivery and restarts: before calling the upstream, the forwarder writes a
``claimed`` entry for the call to ``forwarder.claims`` (compacted, co-partitioned with
calls.decided) and waits for the ack; after the terminal event is acked it writes ``done``. When a
replica is assigned a partition of calls.decided, it first reads the same partition of the claims
changelog (from ``claims_window_seconds`` ago), so a redelivered decision is recognised: ``done``
is skipped, ``claimed`` without ``done`` (a crash mid-call) ends as ``failed`` rather than risk a
second upstream call. Duplicates of one call always share a partition (same session key).

Commits: a partition's offset is committed only up to the oldest message still in flight
(arroyo-style), so a crash redelivers exactly the unfinished work.

Answers: the policy bundle (``SKILLGATE_POLICY_BUNDLE``, swapped at run time with
:meth:`ForwarderService.use_bundle`) drives the response guard (:mod:`services.forwarder.guard`),
which checks tool calls and masks each answer before it is published anywhere. Fail closed:
without a valid bundle no call is forwarded (503); when the guard cannot check an answer, the
answer is withheld and the call fails (503, not to be retried: the upstream did process it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition
from prometheus_client import Counter, Gauge

from services.forwarder import handlers
from services.forwarder.approvals import ToolApprovals
from services.forwarder.config import ForwarderSettings
from services.forwarder.guard import GuardedResponse, GuardError, ResponsePolicy, guard_response
from services.forwarder.streaming import (
    CancelWatcher,
    ChunkRelay,
    SSEParser,
    StreamGuard,
    end_reply,
)
from services.forwarder.upstream import UnknownUpstream, UpstreamResult, Upstreams, UpstreamStream, describe
from skillgate import events, topics
from skillgate.codec import AvroCodec, CodecError, default_codec
from skillgate.config import KafkaSettings
from skillgate.errors import sse_error_frame
from skillgate.events import (
    APPROVAL_HELD,
    APPROVAL_REQUESTED,
    CALL_COMPLETED,
    CALL_DECIDED,
    CALL_FAILED,
    CALL_REPLY,
    FORWARDER_CLAIM,
    ApprovalHeld,
    CallCompleted,
    CallDecided,
    CallReply,
)
from skillgate.fingerprints import load_fingerprint_key
from skillgate.follow import TopicFollower
from skillgate.kafka import DeadLetterer, OffsetTracker, RebalanceRelay, make_consumer, make_producer
from skillgate.logs import call_context
from skillgate.lru import BoundedCache
from skillgate.metrics import EVENTS_CONSUMED, EVENTS_PRODUCED, STAGE_SECONDS
from skillgate.policy.bundle import Bundle, BundleError, load_bundle
from skillgate.policy.detectors import DetectorError
from skillgate.policy.distribution import BundleWatcher
from skillgate.policy.grants import Grants
from skillgate.policy.masking import MaskingError
from skillgate.policy.streaming import tail_for

log = logging.getLogger(__name__)

UPSTREAM_CALLS = Counter(
    "skillgate_forwarder_upstream_calls_total", "Calls sent upstream", ["upstream", "status"]
)
DUPLICATES = Counter(
    "skillgate_forwarder_duplicates_total", "Redelivered decisions not forwarded again", ["kind"]
)
IN_FLIGHT = Gauge("skillgate_forwarder_in_flight", "Calls in flight in this replica")
STREAMS = Counter(
    "skillgate_forwarder_streams_total",
    "Streamed calls by how they ended",
    ["outcome"],  # completed, refused, upstream_error, broken, unchecked, cancelled
)
STREAM_CHUNKS = Counter(
    "skillgate_forwarder_stream_chunks_total", "Chunk messages produced to calls.replies for streams"
)
STREAM_FRAMES = Counter("skillgate_forwarder_stream_frames_total", "SSE events relayed to callers of streams")
GUARDED = Counter(
    "skillgate_forwarder_guarded_total",
    "Responses the response guard changed or stopped",
    ["outcome"],  # masked, tool_blocked, response_blocked, unchecked
)
#: How many applied bundles' policies are kept for decisions that name an earlier version.
_KEPT_POLICIES = 16
#: Exceptions whose message is known to name no body content (others are reported by type only).
_SAFE_MESSAGES = (GuardError, MaskingError, DetectorError)
#: HTTP status of an Anthropic error type (for an ``error`` event in the middle of a stream).
_STATUS_OF_ERROR = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class ForwarderService:
    """Consumes calls.decided and forwards allowed calls."""

    def __init__(
        self, settings: ForwarderSettings, kafka: KafkaSettings, upstreams: Upstreams | None = None
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.codec: AvroCodec = default_codec()
        self.upstreams = upstreams or Upstreams(settings)
        self.decided_topic = topics.name(kafka, topics.DECIDED)
        self.claims_topic = topics.name(kafka, topics.FORWARDER_CLAIMS)
        self.completed_topic = topics.name(kafka, topics.COMPLETED)
        self.failed_topic = topics.name(kafka, topics.FAILED)
        self.producer: AIOKafkaProducer = make_producer(kafka)
        # on_revoked drains in-flight calls (up to the read timeout) before giving partitions up;
        # the group must wait for that rather than evict this member and hand its calls to a
        # replica that would find them claimed and fail them.
        self.consumer: AIOKafkaConsumer = make_consumer(
            kafka,
            settings.group_id,
            fetch_max_wait_ms=50,
            rebalance_timeout_ms=int((settings.read_timeout_seconds + 60) * 1000),
        )
        self.tracker = OffsetTracker()
        # call id → (state, monotonic time), per partition of calls.decided
        self.claims: dict[int, dict[str, tuple[str, float]]] = {}
        self.tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._paused = False
        self._stopping = asyncio.Event()
        self.deadletter: DeadLetterer | None = None
        self.fatal: BaseException | None = None
        # Calls this process is forwarding right now (claims loaded from the changelog that are
        # not here were interrupted by a crash).
        self.in_flight: dict[str, asyncio.Future[None]] = {}
        self._pruned_at = time.monotonic()
        self._loading: dict[int, asyncio.Future[dict[str, tuple[str, float]]]] = {}
        # The response guard's policy: None (with bundle_error) while no valid bundle is loaded,
        # and then every allowed call fails closed.
        self.response_policy: ResponsePolicy | None = None
        # Published bundles (hot reload); set by main once the watcher has caught up.
        self.watcher: BundleWatcher | None = None
        self.bundle_error: str | None = "no policy bundle loaded"
        # Policies of bundles applied before, by label, so a decision made under an earlier
        # version is checked with that version's rules and detectors (bounded).
        self._policies: BoundedCache[str, ResponsePolicy] = BoundedCache(_KEPT_POLICIES)
        self._fingerprint_key: bytes | None = None
        # Streams stop when their caller goes away (ingress → calls.cancelled → here).
        self.cancels = CancelWatcher(kafka, topics.name(kafka, topics.CANCELLED), self.codec)
        # Tool commands approved after a tool rule held them (approvals.resolved → grants).
        self.grants = Grants()
        self._grants_follower = TopicFollower(kafka, [topics.APPROVALS_RESOLVED], self.grants.on_event)
        self.held_topic = topics.name(kafka, topics.APPROVALS_HELD)
        self.reload_bundle()

    # -- the policy bundle -------------------------------------------------------------------

    def reload_bundle(self) -> None:
        """(Re)load the bundle file of the settings; an invalid one makes calls fail closed."""
        try:
            bundle = load_bundle(self.settings.bundle)
        except BundleError as exc:
            self.response_policy, self.bundle_error = None, str(exc)
            log.error("policy bundle invalid: calls fail closed", extra={"error": str(exc)})
            return
        self.use_bundle(bundle)

    def use_bundle(self, bundle: Bundle) -> None:
        """Apply ``bundle`` to every response from now on (hot reload plugs in here).

        The masker is built here, once per bundle; a call in flight keeps the policy it started
        with. When the fingerprint key cannot be read, no masker can be built: calls fail closed.
        """
        try:
            if self._fingerprint_key is None:
                self._fingerprint_key = load_fingerprint_key()
            policy = ResponsePolicy.build(bundle, self._fingerprint_key)
        except (OSError, ValueError) as exc:
            # Type and message only: the key itself is never part of these messages.
            self.response_policy = None
            self.bundle_error = f"cannot build the response masker ({type(exc).__name__}: {exc})"
            log.error("response masker unavailable: calls fail closed", extra={"error": self.bundle_error})
            return
        self.response_policy, self.bundle_error = policy, None
        self._policies.put(bundle.label, policy)
        log.info(
            "policy bundle applied",
            extra={
                "bundle": bundle.label,
                "tool_rules": len(bundle.tool_rules),
                "stream_tails_ms": self._warm_stream_tails(policy),
            },
        )

    def _warm_stream_tails(self, policy: ResponsePolicy) -> float:
        """Compile the streaming hold-back of the bundle's likely type sets now (ms taken).

        Otherwise the first streamed call needing a set compiles it on the event loop, stalling
        every call in flight (70 ms for the default bundle's secrets; the compile holds the GIL,
        so a thread would not help). The sets were resolved and checked when the bundle loaded.
        """
        started = time.perf_counter()
        for types in policy.likely_stream_types():
            tail_for(policy.masker.detectors, types, self.settings.stream_holdback_chars)
        return round((time.perf_counter() - started) * 1000, 1)

    async def start(self) -> None:
        """Start Kafka clients and join the group."""
        await self.producer.start()
        self.deadletter = DeadLetterer(self.producer, self.kafka, "forwarder", self.codec)
        await self.cancels.start()
        await self._grants_follower.start()
        await self.consumer.start()
        self.consumer.subscribe([self.decided_topic], listener=RebalanceRelay(self))

    async def stop(self) -> None:
        """Finish in-flight calls (bounded), commit, leave the group, close clients."""
        self._stopping.set()
        pending = [t for ts in self.tasks.values() for t in ts]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.read_timeout_seconds)
        await self._commit()
        await self.cancels.stop()
        await self._grants_follower.stop()
        await self.consumer.stop()
        await self.producer.stop()
        await self.upstreams.close()

    # -- rebalancing -------------------------------------------------------------------------

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Load the claims of each new partition before any of its decisions is processed."""
        loads = [self._claims_of(tp.partition) for tp in assigned]
        loaded = await asyncio.gather(*loads)
        log.info(
            "partitions assigned",
            extra={"claims_loaded": {tp.partition: len(c) for tp, c in zip(assigned, loaded, strict=True)}},
        )

    def _claims_of(self, partition: int) -> asyncio.Future[dict[str, tuple[str, float]]]:
        """The claims of a partition, loaded once per assignment.

        Why a shared future: aiokafka may already fetch (and this service process) records of a
        newly assigned partition while ``on_partitions_assigned`` is still loading; every
        decision of the partition awaits the same load, so none is forwarded before the claims
        of earlier attempts are known.
        """
        fut = self._loading.get(partition)
        if fut is None:
            fut = self._loading[partition] = asyncio.ensure_future(self._load_into(partition))
        return fut

    async def _load_into(self, partition: int) -> dict[str, tuple[str, float]]:
        claims = await self._load_claims(partition)
        self.claims[partition] = claims
        return claims

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Let in-flight calls of revoked partitions finish, so the next owner sees them ``done``."""
        pending = [t for tp in revoked for t in self.tasks.get(tp, set())]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.read_timeout_seconds)
        await self._commit()
        self.tracker.forget(revoked)
        for tp in revoked:
            self.claims.pop(tp.partition, None)
            self._loading.pop(tp.partition, None)
            self.tasks.pop(tp, None)

    async def _load_claims(self, partition: int) -> dict[str, tuple[str, float]]:
        reader = make_consumer(self.kafka, None, fetch_max_wait_ms=50)
        await reader.start()
        state: dict[str, tuple[str, float]] = {}
        try:
            since_ms = int((time.time() - self.settings.claims_window_seconds) * 1000)
            anchor = await self._committed_time(reader, partition)
            tp = TopicPartition(self.claims_topic, partition)
            reader.assign([tp])
            if anchor is not None:
                # Every decision that can be redelivered lies at or after the committed offset,
                # and its claim was written after it: start there, however long ago (a long outage).
                since_ms = min(since_ms, anchor - 60_000)
            found = await reader.offsets_for_times({tp: since_ms})
            start = found.get(tp)
            if start is not None:
                reader.seek(tp, start.offset)
            else:
                await reader.seek_to_end(tp)
            end = (await reader.end_offsets([tp]))[tp]
            now = time.monotonic()
            while await reader.position(tp) < end:
                batch = await reader.getmany(tp, timeout_ms=500)
                for record in batch.get(tp, []):
                    try:
                        _, claim = self.codec.decode(record.value, expected=FORWARDER_CLAIM)
                    except CodecError:
                        continue
                    state[claim["call_id"]] = (claim["state"], now)
        finally:
            await reader.stop()
        return state

    async def _committed_time(self, reader: AIOKafkaConsumer, partition: int) -> int | None:
        """Timestamp (ms) of the first decision not yet committed in ``partition``, if any
        (read with ``reader``, which the caller then reassigns)."""
        tp = TopicPartition(self.decided_topic, partition)
        committed = await self.consumer.committed(tp)
        if committed is None:
            return None
        reader.assign([tp])
        reader.seek(tp, committed)
        batch = await reader.getmany(tp, timeout_ms=1000, max_records=1)
        records = batch.get(tp, [])
        return int(records[0].timestamp) if records else None

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until stopped: dispatch each decision as a task, commit finished offsets."""
        last_commit = time.monotonic()
        while not self._stopping.is_set():
            batches = await self.consumer.getmany(timeout_ms=100, max_records=500)
            for tp, records in batches.items():
                for record in records:
                    self.tracker.start(tp, record.offset)
                    task = asyncio.create_task(self._handle(tp, record))
                    self.tasks.setdefault(tp, set()).add(task)
                    task.add_done_callback(self.tasks[tp].discard)
            self._backpressure()
            if time.monotonic() - last_commit >= self.settings.commit_interval_seconds:
                await self._commit()
                last_commit = time.monotonic()
            self._prune_claims()
        if self.fatal is not None:
            raise RuntimeError("forwarder stopped after an unexpected error") from self.fatal

    def _backpressure(self) -> None:
        n = self.tracker.in_flight()
        IN_FLIGHT.set(n)
        if not self._paused and n >= self.settings.max_in_flight:
            self.consumer.pause(*self.consumer.assignment())
            self._paused = True
        elif self._paused and n < self.settings.max_in_flight // 2:
            self.consumer.resume(*self.consumer.assignment())
            self._paused = False

    async def _commit(self) -> None:
        offsets = {
            tp: off for tp, off in self.tracker.committable().items() if tp in self.consumer.assignment()
        }
        if not offsets:
            return
        try:
            await self.consumer.commit({tp: OffsetAndMetadata(off, "") for tp, off in offsets.items()})
            self.tracker.committed(offsets)
        except Exception as exc:  # a rebalance in progress: the next commit catches up
            log.warning("commit failed", extra={"error": type(exc).__name__})

    def _prune_claims(self) -> None:
        """Forget finished calls older than the window (unfinished claims are kept: they decide
        what a redelivered decision may do). Runs at most once a minute."""
        now = time.monotonic()
        if now - self._pruned_at < 60:
            return
        self._pruned_at = now
        horizon = now - self.settings.claims_window_seconds
        for part in self.claims.values():
            for call_id in [c for c, (state, t) in part.items() if state == "done" and t < horizon]:
                del part[call_id]

    async def _handle(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            await self._process(tp, record)
        except Exception as exc:
            # Unexpected (e.g. Kafka refused a write after its retries). The offset stays
            # uncommitted and the replica stops: a restarted replica gets the decision again and
            # the claims decide what is safe. Carrying on would stall this partition's commits.
            log.exception("forwarder failed to process a decision; stopping")
            self.fatal = exc
            self._stopping.set()
            return
        self.tracker.finish(tp, record.offset)
        IN_FLIGHT.set(self.tracker.in_flight())

    async def _process(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        EVENTS_CONSUMED.labels("forwarder", topics.DECIDED).inc()
        try:
            _, value = self.codec.decode(record.value, expected=CALL_DECIDED)
        except CodecError as exc:
            assert self.deadletter is not None
            await self.deadletter.send(record, str(exc))
            return
        decided: CallDecided = value  # type: ignore[assignment]
        if decided["decision"] != "allow":
            return  # policy already answered the caller and the decision is the record
        call_id = decided["call_id"]
        call_context.set((call_id, decided["session_id"]))
        claims = await self._claims_of(tp.partition)
        original = self.in_flight.get(call_id)
        if original is not None:
            # A duplicate (policy re-decided after a restart) of a call this replica is forwarding
            # right now: it must neither call again nor end the call; it is finished (and its
            # offset committable) once the original is.
            DUPLICATES.labels("in_flight").inc()
            await asyncio.shield(original)
            return
        known = claims.get(call_id)
        if known is not None and known[0] == "done":
            DUPLICATES.labels("done").inc()
            log.info("redelivered decision for a finished call: not forwarded again")
            return
        if known is not None and known[0] == "claimed":
            DUPLICATES.labels("interrupted").inc()
            log.warning("call was in flight during a restart: failing it rather than calling twice")
            failed, reply = handlers.interrupted_events(decided)
            await self._finish(tp.partition, decided, failed, reply, "failed")
            return
        # Claim synchronously (before any await) so a duplicate in the same batch sees it.
        claims[call_id] = ("claimed", time.monotonic())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.in_flight[call_id] = done
        try:
            await self._forward(tp, decided, claims)
        finally:
            del self.in_flight[call_id]
            done.set_result(None)

    async def _forward(
        self, tp: TopicPartition, decided: CallDecided, claims: dict[str, tuple[str, float]]
    ) -> None:
        """Claim durably, call the upstream once, publish the outcome."""
        call_id = decided["call_id"]
        await self.producer.send_and_wait(
            self.claims_topic,
            self.codec.encode(FORWARDER_CLAIM, handlers.claim_event(decided, "claimed")),
            key=call_id.encode(),
            partition=tp.partition,
        )
        if decided["body"] is None:
            failed, reply = handlers.unusable_events(decided, "policy allowed the call without a body")
            await self._finish(tp.partition, decided, failed, reply, "failed")
            return
        policy = self.policy_for(decided)  # one policy for the whole call, even across a reload
        refusal = self._refusal(decided, policy)
        if refusal is not None:
            failed, reply = handlers.unusable_events(decided, refusal)
            await self._finish(tp.partition, decided, failed, reply, "failed")
            return
        assert policy is not None
        if decided["stream"]:
            await self._forward_stream(tp, decided, policy)
            return
        try:
            with STAGE_SECONDS.labels("forwarder", "upstream").time():
                result = await self.upstreams.call(
                    decided["upstream"],
                    decided["method"],
                    decided["path"],
                    decided["query"],
                    decided["headers"],
                    decided["body"],
                )
        except UnknownUpstream:
            failed, reply = handlers.unusable_events(
                decided, f"no upstream connection named `{decided['upstream']}` is configured"
            )
            await self._finish(tp.partition, decided, failed, reply, "failed")
            return
        await self._finish_unstreamed(tp, decided, policy, result)
        log.debug("call forwarded", extra={"status": result.status, "attempts": len(result.attempts)})

    # -- streamed calls ------------------------------------------------------------------------

    async def _forward_stream(self, tp: TopicPartition, decided: CallDecided, policy: ResponsePolicy) -> None:
        """Forward a ``stream: true`` call: relay its events, checked and masked, as they come.

        See :mod:`services.forwarder.streaming`. The call still ends in exactly one terminal
        event built from the assembled answer (the same record as a non-streamed call, plus time
        to first token), then an ``end`` message for the caller, then the ``done`` claim.
        """
        call_id = decided["call_id"]
        cancelled = self.cancels.watch(call_id)
        try:
            if cancelled.is_set():
                # The caller left before the upstream was called: nothing is sent upstream.
                STREAMS.labels("cancelled").inc()
                failed, _ = handlers.unusable_events(
                    decided, "the caller disconnected before the call was forwarded"
                )
                failed["status"], failed["error_type"] = 499, "client_disconnected"
                await self._finish(tp.partition, decided, failed, None, "failed")
                return
            try:
                opened = await self.upstreams.open_stream(
                    decided["upstream"],
                    decided["method"],
                    decided["path"],
                    decided["query"],
                    decided["headers"],
                    decided["body"] or b"",
                )
            except UnknownUpstream:
                failed, reply = handlers.unusable_events(
                    decided, f"no upstream connection named `{decided['upstream']}` is configured"
                )
                await self._finish(tp.partition, decided, failed, reply, "failed")
                return
            if opened.result is not None:
                await self._finish_unstreamed(tp, decided, policy, opened.result)
                return
            await self._relay_stream(tp, decided, policy, opened, cancelled)
        finally:
            self.cancels.unwatch(call_id)

    async def _finish_unstreamed(
        self, tp: TopicPartition, decided: CallDecided, policy: ResponsePolicy, result: UpstreamResult
    ) -> None:
        """Guard a whole (non-streamed) answer and publish it. Also for a streamed call the
        upstream answered without a stream (an error status, or nothing): the caller gets the JSON
        answer, and the record says the call asked for a stream."""
        UPSTREAM_CALLS.labels(decided["upstream"], str(result.status)).inc()
        guarded = await self._guard(decided, policy, result)
        if isinstance(guarded, str):
            failed, reply = handlers.unchecked_events(decided, result, guarded)
            await self._finish(tp.partition, decided, failed, reply, "failed")
            return
        terminal, reply = handlers.guarded_events(decided, result, guarded)
        state = "completed" if "latency_ms" in terminal else "failed"
        if state == "completed" and decided["stream"]:
            cast(CallCompleted, terminal)["stream"] = True
        await self._finish(tp.partition, decided, terminal, reply, state)

    async def _relay_stream(
        self,
        tp: TopicPartition,
        decided: CallDecided,
        policy: ResponsePolicy,
        opened: UpstreamStream,
        cancelled: asyncio.Event,
    ) -> None:
        response = opened.response
        assert response is not None
        UPSTREAM_CALLS.labels(decided["upstream"], str(response.status_code)).inc()
        s = self.settings
        headers = {
            **opened.headers,
            "content-type": response.headers.get("content-type", "text/event-stream"),
        }
        relay = ChunkRelay(
            self.producer,
            self.codec,
            decided,
            headers,
            max_chunk_bytes=s.stream_max_chunk_bytes,
            in_flight=s.stream_chunks_in_flight,
        )
        parser = SSEParser()
        first_token_ms: float | None = None
        approvals = self.tool_approvals(decided)
        try:
            guard: StreamGuard | None = StreamGuard(
                policy,
                decided["response_mask_upstream"],
                holdback_cap=s.stream_holdback_chars,
                max_hold=s.stream_max_hold_chars,
                seed=decided["masked"],
                approvals=approvals,
            )
        except (DetectorError, MaskingError) as exc:
            guard = None
            unchecked: BaseException | None = exc
        else:
            unchecked = None

        async def pump() -> None:
            nonlocal first_token_ms
            assert guard is not None
            async for data in response.aiter_bytes():
                for event in parser.feed(data):
                    if first_token_ms is None and event.name == "content_block_delta":
                        first_token_ms = (time.perf_counter() - opened.started) * 1000.0
                    relay.add(guard.event(event))
                    if guard.refused or guard.error is not None or guard.stopped:
                        return

        broken: BaseException | None = None
        if guard is not None:
            pumping = asyncio.create_task(pump())
            waiting = asyncio.create_task(cancelled.wait())
            try:
                await asyncio.wait({pumping, waiting}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
                if not pumping.done():
                    pumping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pumping
                await response.aclose()  # closes the connection: cancels an unfinished upstream request
            if not pumping.cancelled():
                broken = pumping.exception()
        else:
            await response.aclose()
        latency_ms = (time.perf_counter() - opened.started) * 1000.0

        # How it ended; the caller's stream gets a closing error event where it was cut short.
        state, failure, outcome = "completed", None, "completed"
        if cancelled.is_set() and (guard is None or not guard.stopped):
            outcome = "cancelled"
            failure = (
                499,
                "client_disconnected",
                f"the caller disconnected mid-stream after {relay.seq} chunk message(s); "
                "the upstream request was cancelled",
            )
        elif guard is None or (broken is not None and not isinstance(broken, httpx.HTTPError)):
            cause = unchecked if guard is None else broken
            detail = str(cause) if isinstance(cause, _SAFE_MESSAGES) else "(message withheld)"
            outcome = "unchecked"
            failure = (
                503,
                "api_error",
                f"skillgate could not check the streamed answer against policy ({type(cause).__name__}: "
                f"{detail}); the rest of the answer was withheld",
            )
            log.error("stream guard failed: stream cut closed", extra={"error": type(cause).__name__})
        elif isinstance(broken, httpx.HTTPError):
            outcome = "broken"
            failure = (502, "api_error", f"the upstream stream broke off: {describe(broken)}")
        elif guard.error is not None:
            outcome = "upstream_error"
            etype = str(guard.error.get("type") or "api_error")
            failure = (
                _STATUS_OF_ERROR.get(etype, 500),
                etype,
                f"the upstream sent an error mid-stream: {etype}: {guard.error.get('message', '')}",
            )
        elif guard.refused:
            outcome = "refused"
        elif not guard.stopped:
            outcome = "broken"
            failure = (502, "api_error", "the upstream stream ended before message_stop")
        if failure is not None:
            state = "failed"
            if outcome in ("unchecked", "broken"):
                relay.add([sse_error_frame(failure[1], failure[2])])
        STREAMS.labels(outcome).inc()
        if outcome == "cancelled":
            await relay.abort()
        else:
            await relay.close()
        STREAM_CHUNKS.inc(relay.seq)
        STREAM_FRAMES.inc(relay.frames_sent)

        # The record: the assembled answer through the same guard as a non-streamed one.
        record: GuardedResponse | None = None
        if guard is not None:
            assembled = orjson.dumps(guard.assembled())
            result = UpstreamResult(200, headers, assembled, opened.attempts, None, latency_ms)
            checked = await self._guard(decided, policy, result, approvals)
            record = checked if isinstance(checked, GuardedResponse) else None
        terminal = handlers.streamed_terminal(
            decided,
            opened,
            record,
            failure,
            latency_ms=latency_ms,
            first_token_ms=first_token_ms,
            chunks=relay.seq,
        )
        reply = end_reply(decided, relay.seq, state) if outcome != "cancelled" else None
        await self._finish(tp.partition, decided, terminal, reply, state)
        log.debug(
            "stream forwarded",
            extra={
                "outcome": outcome,
                "chunks": relay.seq,
                "frames": relay.frames_sent,
                "ms": round(latency_ms, 1),
            },
        )

    def policy_for(self, decided: CallDecided) -> ResponsePolicy | None:
        """The response policy for a decision: that of the bundle version the decision names if
        this forwarder applied it, else the current one (``None`` while no valid bundle)."""
        if self.response_policy is None:
            return None  # an invalid current bundle fails every call closed
        label = decided["bundle_version"] or ""
        named = self._policies.get(label)
        if named is None and self.watcher is not None:
            # Decided under a published version this replica never applied: finish the call
            # under that version (its masking and guardrails), without making it current.
            published = self.watcher.bundle_for(label)
            if published is not None and self._fingerprint_key is not None:
                named = ResponsePolicy.build(published, self._fingerprint_key)
                self._policies.put(label, named)
        return named if named is not None else self.response_policy

    @property
    def bundle_name(self) -> str:
        """The bundle name this replica follows on the bundles topic."""
        policy = self.response_policy
        return policy.bundle.name if policy is not None else "default"

    def _refusal(self, decided: CallDecided, policy: ResponsePolicy | None) -> str | None:
        """Why this call must not be forwarded at all (fail closed), or ``None``."""
        if policy is None:
            return (
                f"skillgate's forwarder has no valid policy bundle ({self.bundle_error}), so it "
                "cannot check answers; the call was not forwarded"
            )
        return None

    def tool_approvals(self, decided: CallDecided) -> ToolApprovals:
        """The call's tool-approval context (grants it may use, approvals it asks for)."""
        return ToolApprovals(decided, self.grants, self.settings.approvals_url)

    async def _guard(
        self,
        decided: CallDecided,
        policy: ResponsePolicy,
        result: UpstreamResult,
        approvals: ToolApprovals | None = None,
    ) -> GuardedResponse | str:
        """Run the response guard (and ask for the approvals of tool calls it held); when it
        fails, the message for a fail-closed outcome instead."""
        approvals = approvals or self.tool_approvals(decided)
        try:
            with STAGE_SECONDS.labels("forwarder", "guard").time():
                guarded = guard_response(
                    policy,
                    result.status,
                    result.headers,
                    result.body,
                    mask_upstream=decided["response_mask_upstream"],
                    mask_record=decided["response_mask_record"],
                    seed=decided["masked"],
                    approvals=approvals,
                )
        except Exception as exc:
            detail = str(exc) if isinstance(exc, _SAFE_MESSAGES) else "(message withheld)"
            log.error(
                "response guard failed: failing the call closed",
                extra={"error": type(exc).__name__, "detail": detail, "bundle": policy.label},
            )
            GUARDED.labels("unchecked").inc()
            return (
                f"skillgate could not check the upstream's answer against policy ({type(exc).__name__}: "
                f"{detail}), so the answer was withheld; the upstream did process the call"
            )
        if guarded.refused:
            GUARDED.labels("response_blocked").inc()
        elif guarded.blocked:
            GUARDED.labels("tool_blocked").inc()
        elif guarded.masked:
            GUARDED.labels("masked").inc()
        if guarded.blocked:
            log.info(
                "tool call blocked",
                extra={
                    "bundle": policy.label,
                    "blocked": [(b["tool"], b["rule_id"], b["action"]) for b in guarded.blocked],
                },
            )
        await self._ask_approvals(decided, approvals)
        return guarded

    async def _ask_approvals(self, decided: CallDecided, approvals: ToolApprovals) -> None:
        """Hand held tool calls to the approvals workflow (approvals.held, keyed by approval id).

        The answer is safe either way (the tool call was withheld); if Kafka refuses, the
        approval id the caller read leads nowhere, which is logged for operators.
        """
        for request in approvals.requests:
            held = ApprovalHeld(
                **events.envelope(
                    decided["call_id"],
                    decided["session_id"],
                    decided["identity"],
                    decided["bundle_version"],
                    event_id=events.derived_event_id(
                        decided["call_id"], f"approval-held:{request['approval_id']}"
                    ),
                ),
                approval_id=request["approval_id"],
                request=self.codec.encode(APPROVAL_REQUESTED, request),
                release=b"",
            )
            try:
                await self.producer.send_and_wait(
                    self.held_topic,
                    self.codec.encode(APPROVAL_HELD, held),
                    key=request["approval_id"].encode(),
                )
                EVENTS_PRODUCED.labels("forwarder", topics.APPROVALS_HELD).inc()
            except Exception as exc:
                log.error(
                    "could not ask for a tool call's approval",
                    extra={"approval_id": request["approval_id"], "error": type(exc).__name__},
                )

    async def _finish(
        self,
        partition: int,
        decided: CallDecided,
        terminal: Any,
        reply: CallReply | None,
        state: str,
    ) -> None:
        """Publish the answer and the record (acked), then mark the claim done."""
        key = decided["session_id"].encode()
        sends = []
        if reply is not None and decided["reply_to"] is not None:
            sends.append(
                await self.producer.send(
                    decided["reply_to"]["topic"],
                    self.codec.encode(CALL_REPLY, reply),
                    key=key,
                    partition=decided["reply_to"]["partition"],
                )
            )
            EVENTS_PRODUCED.labels("forwarder", topics.REPLIES).inc()
        topic, name = (
            (self.completed_topic, CALL_COMPLETED)
            if state == "completed"
            else (self.failed_topic, CALL_FAILED)
        )
        sends.append(await self.producer.send(topic, self.codec.encode(name, terminal), key=key))
        EVENTS_PRODUCED.labels("forwarder", topic.removeprefix(self.kafka.topic_prefix)).inc()
        await asyncio.gather(*sends)
        self.claims.setdefault(partition, {})[decided["call_id"]] = ("done", time.monotonic())
        await self.producer.send_and_wait(
            self.claims_topic,
            self.codec.encode(FORWARDER_CLAIM, handlers.claim_event(decided, "done", state)),
            key=decided["call_id"].encode(),
            partition=partition,
        )
