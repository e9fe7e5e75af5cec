"""The policy service: calls.submitted → decision → calls.decided (and replies for refusals).

A faust app (tables for pending approvals and rate counters, agents for approvals, rate checks
and webhooks) plus :class:`DecideLoop`, a plain aiokafka consumer of calls.submitted in the same
process: deciding needs no table, and faust's threaded consumer added ~1.5 ms to every call.

Processing guarantee: at-least-once with idempotent outputs. Every write is awaited until Kafka
acknowledged it before the input is marked done (the decide loop commits only up to the oldest
submission still in flight; faust flushes its producer before it commits), so a crash in between
makes the service decide again, and the decided event carries the same id (derived from the call
id), which the forwarder and the recorder treat as the same event. (faust's exactly-once mode
has open crash bugs, so it is not used.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import httpx
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka

from services.policy import approvals, handlers, notify
from services.policy.config import PolicySettings
from skillgate import events, topics
from skillgate.codec import CodecError, default_codec
from skillgate.config import KafkaSettings, RoleSettings
from skillgate.events import (
    APPROVAL_DECIDED,
    APPROVAL_HELD,
    APPROVAL_NOTIFIED,
    APPROVAL_REQUESTED,
    APPROVAL_RESOLVED,
    CALL_DECIDED,
    CALL_FAILED,
    CALL_REPLY,
    CALL_SUBMITTED,
    RATE_CHECK,
    ApprovalDecided,
    ApprovalHeld,
    ApprovalRequested,
    CallDecided,
    CallSubmitted,
    RateCharge,
    RateCheck,
)
from skillgate.fingerprints import load_fingerprint_key
from skillgate.follow import TopicFollower
from skillgate.kafka import OffsetTracker, RebalanceRelay, dead_letter_value, make_consumer
from skillgate.logs import call_context
from skillgate.metrics import DEAD_LETTERS, EVENTS_CONSUMED, EVENTS_PRODUCED, STAGE_SECONDS
from skillgate.policy.bundle import Bundle, BundleError, load_bundle
from skillgate.policy.distribution import BundleWatcher, follow_bundles
from skillgate.policy.engine import Charge, DeferredCounter, ReplayCounter, Verdict
from skillgate.policy.grants import Grants
from skillgate.policy.masking import Masker

log = logging.getLogger(__name__)


#: Handles one event: (topic, partition, offset, key, value).
Handler = Callable[[str, int, int, bytes | None, bytes], Awaitable[None]]


class _IdempotentProducer(faust_aiokafka.Producer):
    """faust's producer with ``enable_idempotence`` and ``acks=all`` outside transactions too."""

    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


class _Transport(faust_aiokafka.Transport):
    Producer = _IdempotentProducer


class _App(faust.App):
    """A faust app whose Kafka transport uses :class:`_IdempotentProducer`."""

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Any:
        return _Transport(self.conf.broker_producer, self)


#: The faust table of pending approvals (changelog ``<app id>-approvals-changelog``).
APPROVALS_TABLE = "approvals"
#: The faust table of rate-limit counters (changelog ``<app id>-rates-changelog``).
RATES_TABLE = "rates"


def faust_id(policy: PolicySettings, kafka: KafkaSettings) -> str:
    """The faust app id (its consumer group and the prefix of its table changelogs), with the
    topic prefix in front: deployments sharing a broker under different prefixes stay apart."""
    return f"{kafka.topic_prefix}{policy.app_id}"


def own_topics(policy: PolicySettings, kafka: KafkaSettings) -> list[tuple[str, topics.TopicSpec]]:
    """Topics faust needs for the policy service's tables (created with the others, because the
    app does not declare topics itself)."""
    compacted = {"cleanup.policy": "compact", "max.message.bytes": str(64 * 1024 * 1024)}
    return [
        (f"{faust_id(policy, kafka)}-{table}-changelog", topics.TopicSpec("", kafka.partitions, compacted))
        for table in (APPROVALS_TABLE, RATES_TABLE)
    ]


class DecideLoop:
    """Reads ``calls.submitted`` and decides each call (:meth:`PolicyService.handle`).

    Why not a faust agent: faust's consumer runs in a thread of its own, and every fetched batch
    crosses to the worker's loop and through faust's stream machinery before a handler sees it;
    on a 2-core machine that cost ~1.5 ms of every call's latency (measured with per-stage
    timestamps). Deciding needs no faust table, so a plain aiokafka consumer in the same process
    (own consumer group ``<app id>-decide``) feeds the same handler. The guarantees are the
    agent's: up to ``concurrency`` decisions in flight, each waiting for Kafka's ack of what it
    wrote (a refused write exits the process, see ``_confirm``); offsets committed only up to the
    oldest decision not yet done (:class:`~skillgate.kafka.OffsetTracker`), so a crash redecides
    exactly the unfinished calls, under the same derived event ids. A new group starts where the
    faust group had committed, so moving from the agent redecides nothing.
    """

    def __init__(self, service: PolicyService, policy: PolicySettings, kafka: KafkaSettings) -> None:
        self._service = service
        self._policy = policy
        self._kafka = kafka
        self._topic = topics.name(kafka, topics.SUBMITTED)
        self._group = f"{faust_id(policy, kafka)}-decide"
        self._faust_group = faust_id(policy, kafka)
        self.tracker = OffsetTracker()
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._slots = asyncio.Semaphore(policy.concurrency)
        self._consumer: AIOKafkaConsumer | None = None

    async def run(self) -> None:
        """Consume until cancelled (the worker stops): then finish what is in flight and commit."""
        consumer = make_consumer(
            self._kafka,
            self._group,
            fetch_max_wait_ms=50,
            session_timeout_ms=int(self._policy.session_timeout_seconds * 1000),
            heartbeat_interval_ms=int(min(3.0, self._policy.session_timeout_seconds / 3) * 1000),
        )
        self._consumer = consumer
        await consumer.start()
        consumer.subscribe([self._topic], listener=RebalanceRelay(self))
        last_commit = time.monotonic()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=100, max_records=self._policy.concurrency)
                for tp, records in batches.items():
                    for record in records:
                        await self._slots.acquire()  # at most `concurrency` decisions at once
                        self.tracker.start(tp, record.offset)
                        task = asyncio.create_task(self._decide(tp, record))
                        self._tasks.setdefault(tp, set()).add(task)
                        task.add_done_callback(self._tasks[tp].discard)
                if time.monotonic() - last_commit >= self._policy.commit_interval_seconds:
                    await self._commit()
                    last_commit = time.monotonic()
        finally:
            try:
                pending = [t for ts in self._tasks.values() for t in ts]
                if pending:
                    await asyncio.wait(pending, timeout=30)
                await self._commit()
            finally:
                # Even when the stop is cancelled again or the commit fails: leave the group.
                await consumer.stop()

    async def _decide(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            await self._service.handle(
                record.topic, record.partition, record.offset, record.key, record.value or b""
            )
        except Exception:
            # Like a refused write (_confirm): leave without committing, so a restarted replica
            # decides the call again rather than losing it.
            log.critical("deciding a call failed unexpectedly; exiting so it is redelivered", exc_info=True)
            logging.shutdown()
            os._exit(70)
        finally:
            self._slots.release()
        self.tracker.finish(tp, record.offset)

    async def _commit(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        offsets = {tp: o for tp, o in self.tracker.committable().items() if tp in consumer.assignment()}
        if not offsets:
            return
        try:
            await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
            self.tracker.committed(offsets)
        except Exception as exc:  # a rebalance in progress: the next commit catches up
            log.warning("commit failed", extra={"error": type(exc).__name__})

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish the decisions of partitions that move away, commit, then let them go."""
        pending = [t for tp in revoked for t in self._tasks.get(tp, set())]
        if pending:
            await asyncio.wait(pending, timeout=30)
        await self._commit()
        self.tracker.forget(revoked)
        for tp in revoked:
            self._tasks.pop(tp, None)

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Partitions this group never committed start where the faust agent's group had (so a
        replica upgraded from the agent neither redecides nor skips calls)."""
        consumer = self._consumer
        assert consumer is not None
        missing = [tp for tp in assigned if await consumer.committed(tp) is None]
        if not missing:
            return
        previous = make_consumer(self._kafka, self._faust_group)
        await previous.start()
        try:
            for tp in missing:
                offset = await previous.committed(tp)
                if offset is not None:
                    consumer.seek(tp, offset)
        finally:
            await previous.stop()


async def _until_stopped(stop: Callable[[], Awaitable[None]]) -> None:
    """Wait until the worker stops (it cancels its tasks), then ``stop`` a reader it started, so
    its Kafka consumer leaves cleanly instead of with the process."""
    try:
        await asyncio.Event().wait()
    finally:
        await stop()


class PolicyService:
    """The faust app plus the bundle it applies."""

    def __init__(self, policy: PolicySettings, kafka: KafkaSettings) -> None:
        self.settings = policy
        self.kafka = kafka
        self.codec = default_codec()
        self.bundle: Bundle | None = None
        self.bundle_error: str | None = None
        self.masker: Masker | None = None
        self.fingerprint_key = load_fingerprint_key()
        self.reload_bundle()
        brokers = [f"kafka://{b.strip()}" for b in kafka.bootstrap.split(",")]
        self.app = _App(
            faust_id(policy, kafka),
            broker=brokers,
            broker_commit_interval=policy.commit_interval_seconds,
            broker_session_timeout=policy.session_timeout_seconds,
            broker_heartbeat_interval=min(3.0, policy.session_timeout_seconds / 3),
            processing_guarantee="at_least_once",
            value_serializer="raw",
            key_serializer="raw",
            topic_disable_leader=True,
            topic_allow_declare=False,
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            stream_wait_empty=False,
            datadir=str(policy.data_dir),
            producer_max_request_size=64 * 1024 * 1024,
            consumer_max_fetch_size=16 * 1024 * 1024,
        )
        self._decided = self.app.topic(topics.name(kafka, topics.DECIDED), key_type=bytes, value_type=bytes)
        self._failed = self.app.topic(topics.name(kafka, topics.FAILED), key_type=bytes, value_type=bytes)
        self._approvals = self.app.topic(
            topics.name(kafka, topics.APPROVALS_REQUESTED), key_type=bytes, value_type=bytes
        )
        self._held_name = topics.name(kafka, topics.APPROVALS_HELD)
        self._held = self.app.topic(self._held_name, key_type=bytes, value_type=bytes)
        self._approval_decisions = self.app.topic(
            topics.name(kafka, topics.APPROVALS_DECIDED), key_type=bytes, value_type=bytes
        )
        self._resolved = self.app.topic(
            topics.name(kafka, topics.APPROVALS_RESOLVED), key_type=bytes, value_type=bytes
        )
        self._rate_checks = self.app.topic(
            topics.name(kafka, topics.RATE_CHECKS), key_type=bytes, value_type=bytes
        )
        self._notified = self.app.topic(
            topics.name(kafka, topics.APPROVALS_NOTIFIED), key_type=bytes, value_type=bytes
        )
        self._deadletter = self.app.topic(
            topics.name(kafka, topics.DEADLETTER), key_type=bytes, value_type=bytes
        )
        self._replies: dict[str, faust.TopicT] = {}
        # Submissions are read by a plain aiokafka consumer next to faust's (see DecideLoop): the
        # hot path needs no table, and faust's threaded consumer cost about 1.5 ms per call.
        self.decide_loop = DecideLoop(self, policy, kafka)
        self.app.task(self.decide_loop.run)
        # Approvals: held calls and decisions on them are both keyed by approval id on topics with
        # the same partition count, so one approval's events meet in one partition, in order, on
        # one worker, next to its entry in the table (whose changelog makes it survive restarts).
        self.pending = self.app.Table(
            APPROVALS_TABLE,
            default=None,
            partitions=kafka.partitions,
            key_type=bytes,
            value_type=bytes,
        )
        # Rate-limit counters: a call is sent to the partition of each counter it is charged to
        # (keyed by counter), so every replica's calls add up in one place, restored on restart.
        self.rates = self.app.Table(
            RATES_TABLE, default=None, partitions=kafka.partitions, key_type=bytes, value_type=bytes
        )
        self.app.agent(self._rate_checks, name="rates", concurrency=1)(self._agent(self.handle_rate_check))
        approval_channel = self.app.topic(
            self._held_name,
            topics.name(kafka, topics.APPROVALS_DECIDED),
            key_type=bytes,
            value_type=bytes,
        )
        # One actor: decisions on an approval are judged strictly one after another.
        self.app.agent(approval_channel, name="approvals", concurrency=1)(self._agent(self.handle_approval))
        self.app.timer(policy.expiry_check_seconds)(self._expire_due)
        self._expiries = approvals.ExpiryIndex()
        self.admin_groups = RoleSettings().admin_groups
        self.grants = Grants()
        self.app.task(self._follow_grants)
        if policy.approval_webhooks:
            self.app.agent(self._approvals, name="notify", concurrency=4)(self._notify_agent)
        self.watcher: BundleWatcher | None = None
        # Decisions wait until the published bundles have been read once (bounded by 30 s), so
        # none is made under the file bundle when a newer one was published.
        self._bundles_ready = asyncio.Event()
        self.app.task(self._follow_published_bundles)

    def reload_bundle(self) -> None:
        """(Re)load the bundle; an invalid bundle makes every call fail closed until fixed."""
        try:
            self.use_bundle(load_bundle(self.settings.bundle))
        except BundleError as exc:
            self.bundle, self.bundle_error = None, str(exc)
            log.error("policy bundle invalid: calls fail closed", extra={"error": str(exc)})

    async def _follow_published_bundles(self) -> None:
        """Apply bundles published to ``policy.bundles`` from now on, without a restart.

        Runs when the worker starts. The file bundle applies until a published version of the
        same name exists (the name of the file bundle, ``default`` if the file is invalid).
        """
        name = self.bundle.name if self.bundle is not None else "default"
        try:
            self.watcher = await follow_bundles(self.kafka, name, self.bundle, self.use_bundle)
        except Exception as exc:
            log.error("cannot follow published bundles; the file bundle stays", extra={"error": str(exc)})
            return
        finally:
            self._bundles_ready.set()
        await _until_stopped(self.watcher.stop)

    def use_bundle(self, bundle: Bundle) -> None:
        """Apply ``bundle`` from now on (detectors and masker are built once per bundle)."""
        self.masker = Masker(bundle.detectors, self.fingerprint_key)
        self.bundle, self.bundle_error = bundle, None
        log.info("policy bundle applied", extra={"bundle": bundle.label, "rules": len(bundle.rules)})

    def _reply_topic(self, name: str) -> faust.TopicT:
        topic = self._replies.get(name)
        if topic is None:
            topic = self._replies[name] = self.app.topic(name, key_type=bytes, value_type=bytes)
        return topic

    @staticmethod
    def _agent(handle: Handler) -> Callable[[faust.StreamT[bytes]], Awaitable[None]]:
        """A faust agent that hands each event (with where it came from) to ``handle``."""

        async def agent(stream: faust.StreamT[bytes]) -> None:
            async for event in stream.events():
                m = event.message
                await handle(m.topic, m.partition, m.offset, event.key, event.value)

        return agent

    async def _read(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes, expected: str
    ) -> dict[str, Any] | None:
        """Decode one event of ``expected`` type (counted; dead-lettered if unreadable, then None)."""
        suffix = topic.removeprefix(self.kafka.topic_prefix)
        EVENTS_CONSUMED.labels("policy", suffix).inc()
        try:
            _, record = self.codec.decode(value, expected=expected)
        except CodecError as exc:
            await self._dead_letter(topic, partition, offset, key, value, str(exc))
            return None
        call_context.set((str(record.get("call_id", "")), str(record.get("session_id", ""))))
        return record

    async def handle(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        """Decide on one submitted call (or dead-letter it) and publish the outcome."""
        if not self._bundles_ready.is_set():
            await self._bundles_ready.wait()
        record = await self._read(topic, partition, offset, key, value, CALL_SUBMITTED)
        if record is not None:
            await self.decide_call(record, None)  # type: ignore[arg-type]

    async def decide_call(self, submitted: CallSubmitted, totals: ReplayCounter | None) -> None:
        """Decide on a call and publish the outcome.

        Rate limits take two passes: the first (``totals`` None) notes what the matching rules
        charge; if anything, the call goes through the counters' partitions (policy.ratelimit)
        and comes back here with the totals reached, and the same evaluation then decides.
        """
        session_key = submitted["session_id"].encode()
        with STAGE_SECONDS.labels("policy", "decide").time():
            bundle = self.bundle
            verdict: Verdict | None = None
            error_text = ""
            deferred = DeferredCounter() if totals is None else None
            try:
                if bundle is None:
                    raise RuntimeError(self.bundle_error or "no policy bundle loaded")
                verdict = handlers.decide(submitted, bundle, self.masker, totals or deferred)
            except Exception as exc:
                error_text = str(exc)
                if bundle is not None and bundle.fail_open:
                    # An operator chose fail-open for this bundle: the call goes through as sent,
                    # and the record says so.
                    log.error(
                        "cannot decide: fail-open bundle lets the call through", extra={"error": str(exc)}
                    )
                    verdict = Verdict(
                        decision="allow",
                        reason=f"fail-open: policy could not run ({exc})",
                        body=submitted["body"],
                        upstream=submitted["upstream"] or "default",
                        fail_open=True,
                    )
            if verdict is None:  # fail closed on anything that prevents a decision
                log.error("cannot decide: failing the call closed", extra={"error": error_text})
                failed, reply = handlers.failure_events(
                    submitted, bundle.label if bundle else None, error_text
                )
                await self._confirm(
                    await self._failed.send(key=session_key, value=self.codec.encode(CALL_FAILED, failed))
                )
                EVENTS_PRODUCED.labels("policy", topics.FAILED).inc()
                if reply is not None and submitted["reply_to"] is not None:
                    await self._send_reply(submitted["reply_to"], session_key, reply)
                return
            assert bundle is not None  # a verdict exists only when a bundle was applied
            if deferred is not None and deferred.charges and not verdict.fail_open:
                await self._charge(submitted, deferred.charges)
                return
            grant = None
            if verdict.decision == "require_approval":
                grant = self.grants.active(
                    submitted["identity"]["subject"], verdict.approval_rule, events.now_micros()
                )
                if grant is not None:
                    verdict = handlers.granted(verdict, grant)
            decided = handlers.decided_event(submitted, bundle, verdict)
            if grant is not None:
                decided["approval_id"] = grant["approval_id"]
        await self._confirm(
            await self._decided.send(key=session_key, value=self.codec.encode(CALL_DECIDED, decided))
        )
        EVENTS_PRODUCED.labels("policy", topics.DECIDED).inc()
        log.debug(
            "call decided",
            extra={
                "decision": decided["decision"],
                "bundle": bundle.label,
                "rules": decided["rule_ids"],
            },
        )
        if verdict.decision == "require_approval":
            await self._hold(submitted, bundle.label, verdict)
            return
        reply = handlers.refusal_reply(decided)
        if reply is not None and decided["reply_to"] is not None:
            await self._send_reply(decided["reply_to"], session_key, reply)

    # -- rate limits ----------------------------------------------------------------------------

    async def _charge(self, submitted: CallSubmitted, charges: list[Charge]) -> None:
        """Send the call to the partition of the first counter it is charged to."""
        check = RateCheck(
            **events.envelope(
                submitted["call_id"],
                submitted["session_id"],
                submitted["identity"],
                self.bundle.label if self.bundle else None,
                event_id=events.derived_event_id(submitted["call_id"], "rate-check-0"),
            ),
            submitted=self.codec.encode(CALL_SUBMITTED, submitted),
            charges=[RateCharge(**dataclasses.asdict(c)) for c in charges],  # type: ignore[typeddict-item]
            index=0,
            totals=[],
        )
        await self._send_rate_check(check)

    async def _send_rate_check(self, check: RateCheck) -> None:
        key = check["charges"][check["index"]]["key"].encode()
        await self._confirm(await self._rate_checks.send(key=key, value=self.codec.encode(RATE_CHECK, check)))
        EVENTS_PRODUCED.labels("policy", topics.RATE_CHECKS).inc()

    async def handle_rate_check(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes
    ) -> None:
        """Add the call to one counter (in this partition's table); pass it on to the next counter,
        or, after the last one (or one over its limit), decide with the totals reached.

        At least once: a crash before the commit adds a redelivered call to the counter again.
        """
        record = await self._read(topic, partition, offset, key, value, RATE_CHECK)
        if record is None:
            return
        check: RateCheck = record  # type: ignore[assignment]
        charge = check["charges"][check["index"]]
        slot = int(events.now_micros() // 1_000_000 // max(1, charge["window_seconds"]))
        counter_key = charge["key"].encode()
        raw = self.rates.get(counter_key)
        window = orjson.loads(raw) if raw else None
        count = (window["count"] if window and window["slot"] == slot else 0) + charge["amount"]
        self.rates[counter_key] = orjson.dumps({"slot": slot, "count": count})
        totals = [*check["totals"], count]
        nxt = check["index"] + 1
        if count <= charge["limit"] and nxt < len(check["charges"]):
            check["index"], check["totals"] = nxt, totals
            check["event_id"] = events.derived_event_id(check["call_id"], f"rate-check-{nxt}")
            await self._send_rate_check(check)
            return
        _, sub = self.codec.decode(check["submitted"], expected=CALL_SUBMITTED)
        charges = [Charge(**c) for c in check["charges"]]
        await self.decide_call(sub, ReplayCounter(charges, totals))  # type: ignore[arg-type]

    async def _hold(self, submitted: CallSubmitted, bundle_label: str, verdict: Verdict) -> None:
        """Hand a call that needs approval to the approvals agent (approvals.held)."""
        assert self.bundle is not None
        requested = approvals.approval_request(submitted, bundle_label, verdict)
        release = handlers.decided_event(
            submitted, self.bundle, dataclasses.replace(verdict, decision="allow", status=0)
        )
        release["bundle_version"] = bundle_label
        held = ApprovalHeld(
            **events.envelope(
                submitted["call_id"],
                submitted["session_id"],
                submitted["identity"],
                bundle_label,
                event_id=events.derived_event_id(submitted["call_id"], "approval-held"),
            ),
            approval_id=requested["approval_id"],
            request=self.codec.encode(APPROVAL_REQUESTED, requested),
            release=self.codec.encode(CALL_DECIDED, release),
        )
        await self._confirm(
            await self._held.send(
                key=requested["approval_id"].encode(), value=self.codec.encode(APPROVAL_HELD, held)
            )
        )
        log.info(
            "call held for approval",
            extra={"approval_id": requested["approval_id"], "rules": verdict.rule_ids},
        )

    # -- approvals ------------------------------------------------------------------------------

    async def _follow_grants(self) -> None:
        """Follow approvals.resolved so time-window grants apply on every replica."""
        backoff = 0.5
        while True:  # until Kafka answers: meanwhile covered calls are held again (fail safe)
            follower = TopicFollower(self.kafka, [topics.APPROVALS_RESOLVED], self.grants.on_event)
            try:
                await follower.start()
            except Exception as exc:
                log.error(
                    "cannot follow approval grants yet; retrying (calls a grant covers are held meanwhile)",
                    extra={"error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                await asyncio.sleep(backoff)  # retry backoff while Kafka is unreachable
                backoff = min(backoff * 2, 30.0)
                continue
            await _until_stopped(follower.stop)
            return

    async def handle_approval(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes
    ) -> None:
        """Keep a held call, or judge a decision on it and, when the approval ends, release,
        deny or expire the call."""
        held_topic = topic == self._held_name
        record = await self._read(
            topic, partition, offset, key, value, APPROVAL_HELD if held_topic else APPROVAL_DECIDED
        )
        if record is None:
            return
        if held_topic:
            await self._on_held(record)  # type: ignore[arg-type]
        else:
            await self._on_decision(record)  # type: ignore[arg-type]

    async def _on_held(self, held: ApprovalHeld) -> None:
        approval_id = held["approval_id"]
        raw = self.pending.get(approval_id.encode())
        if raw is None:
            _, request = self.codec.decode(held["request"], expected=APPROVAL_REQUESTED)
            state = approvals.ApprovalState.held(request, held["release"])  # type: ignore[arg-type]
        else:
            state = approvals.ApprovalState.loads(raw)
        if state.outcome is None:
            # Announced (again, after a redelivery: same event ids) only while it can be decided.
            await self._confirm(
                await self._approvals.send(
                    key=approval_id.encode(), value=self.codec.encode(APPROVAL_REQUESTED, state.requested)
                )
            )
            EVENTS_PRODUCED.labels("policy", topics.APPROVALS_REQUESTED).inc()
            if state.requested["kind"] == "call":  # a tool approval has no waiting call
                release = self._release_of(state)
                notice = approvals.pending_reply(state, release)
                if notice is not None and release["reply_to"] is not None:
                    await self._send_reply(release["reply_to"], release["session_id"].encode(), notice)
        if raw is None:
            self._keep(approval_id.encode(), state)

    async def _on_decision(self, decided: ApprovalDecided) -> None:
        approval_id = decided["approval_id"]
        raw = self.pending.get(approval_id.encode())
        if raw is None:
            log.warning("decision on an unknown approval refused", extra={"approval_id": approval_id})
            return
        state = approvals.ApprovalState.loads(raw)
        before = state.outcome
        judgement = approvals.judge(state, decided, events.now_micros(), self.admin_groups)
        log.info(
            "approval decision judged",
            extra={
                "approval_id": approval_id,
                "decision": decided["decision"],
                "approver": decided["identity"]["subject"],
                "counted": judgement.counted,
                "outcome": judgement.outcome,
                "note": judgement.note,
                "lag_ms": round((events.now_micros() - decided["time"]) / 1000, 1),
            },
        )
        if state.outcome is not None and before is None:
            # Outputs first, the table last: a crash in between judges the decision again and
            # publishes the same events (call-derived ids), never a second release.
            now = events.now_micros()
            if state.requested["kind"] == "call":
                await self._end_held_call(state, now)
            resolved = approvals.resolved_event(state, now)
            await self._confirm(
                await self._resolved.send(
                    key=approval_id.encode(), value=self.codec.encode(APPROVAL_RESOLVED, resolved)
                )
            )
            EVENTS_PRODUCED.labels("policy", topics.APPROVALS_RESOLVED).inc()
            log.info("approval ended", extra={"approval_id": approval_id, "outcome": state.outcome})
        if judgement.counted or state.outcome != before:
            if state.outcome is not None:
                state.release = ""  # the held body is not needed any more: keep the table small
            self._keep(approval_id.encode(), state)

    async def _end_held_call(self, state: approvals.ApprovalState, now: int) -> None:
        """Release (approved), deny or expire the held call, and answer a caller still waiting."""
        release = self._release_of(state)
        second = approvals.release_decision(state, release, now)
        session_key = second["session_id"].encode()
        await self._confirm(
            await self._decided.send(key=session_key, value=self.codec.encode(CALL_DECIDED, second))
        )
        EVENTS_PRODUCED.labels("policy", topics.DECIDED).inc()
        reply = approvals.ending_reply(state, second)
        if reply is not None and second["reply_to"] is not None:
            await self._send_reply(second["reply_to"], session_key, reply)

    def _release_of(self, state: approvals.ApprovalState) -> CallDecided:
        _, release = self.codec.decode(state.release_bytes, expected=CALL_DECIDED)
        return release  # type: ignore[return-value]

    async def _expire_due(self) -> None:
        """Ask for the expiry of pending approvals past their deadline (as a decision event, so
        the expiry is judged in order with people's decisions by the approvals agent)."""
        if self._expiries.needs_rebuild(time.monotonic()):
            self._expiries.rebuild(list(self.pending.items()), time.monotonic())
        now = events.now_micros()
        for key in self._expiries.due(now):
            raw = self.pending.get(key)
            if raw is None:  # the partition moved to another worker
                self._expiries.forget(key)
                continue
            try:
                state = approvals.ApprovalState.loads(raw)
            except Exception:  # never let one bad entry stop expiring the others
                log.exception("unreadable pending approval skipped", extra={"key": repr(key)[:80]})
                self._expiries.forget(key)
                continue
            if state.outcome is not None:
                self._expiries.forget(key)
                continue
            expire = approvals.expire_decision(state, now)
            await self._confirm(
                await self._approval_decisions.send(
                    key=key, value=self.codec.encode(APPROVAL_DECIDED, expire)
                )
            )
            self._expiries.asked(key, now)

    def _keep(self, key: bytes, state: approvals.ApprovalState) -> None:
        """Write an approval's state to the table (and the expiry index)."""
        self.pending[key] = state.dumps()
        self._expiries.track(key, state)

    async def _notify_agent(self, stream: faust.StreamT[bytes]) -> None:
        secret = self.settings.webhook_secret
        assert secret is not None  # the settings require it with webhooks
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_seconds) as client:
            async for value in stream:
                try:
                    _, record = self.codec.decode(value, expected=APPROVAL_REQUESTED)
                except CodecError:
                    continue  # the recorder dead-letters unreadable events of this topic
                request: ApprovalRequested = record  # type: ignore[assignment]
                link = f"{self.settings.approvals_url.rstrip('/')}/v1/approvals/{request['approval_id']}"
                for group in request["approver_groups"]:
                    url = self.settings.approval_webhooks.get(group)
                    if url is None:
                        continue
                    delivery = notify.Delivery(
                        group=group,
                        url=url.get_secret_value(),
                        secret=secret.get_secret_value().encode(),
                        attempts=self.settings.webhook_attempts,
                        backoff_seconds=self.settings.webhook_backoff_seconds,
                    )
                    notified = await notify.deliver(client, delivery, request, link)
                    await self._confirm(
                        await self._notified.send(
                            key=request["approval_id"].encode(),
                            value=self.codec.encode(APPROVAL_NOTIFIED, notified),
                        )
                    )

    async def _dead_letter(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes, reason: str
    ) -> None:
        await self._confirm(
            await self._deadletter.send(
                key=key,
                value=dead_letter_value(
                    codec=self.codec,
                    service="policy",
                    reason=reason,
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    key=key,
                    value=value,
                ),
            )
        )
        DEAD_LETTERS.labels("policy").inc()
        log.warning("dead-lettered an unreadable event", extra={"topic": topic, "error": reason})

    async def _confirm(self, delivery: Any) -> None:
        """Wait until Kafka acknowledged a write; if it refused, stop the process at once.

        faust would otherwise only log the failure and commit the submission as processed, losing
        the call. Exiting before the next commit makes Kafka redeliver the submission to a
        restarted replica (decisions carry call-derived ids, so a repeat is harmless).
        """
        try:
            await delivery
        except Exception as exc:
            log.critical(
                "Kafka refused a policy write; exiting so the call is redelivered",
                extra={"error": f"{type(exc).__name__}: {exc}"[:500]},
            )
            logging.shutdown()
            os._exit(70)

    async def _send_reply(self, reply_to: events.ReplyTo, key: bytes, reply: events.CallReply) -> None:
        await self._confirm(
            await self._reply_topic(reply_to["topic"]).send(
                key=key, value=self.codec.encode(CALL_REPLY, reply), partition=reply_to["partition"]
            )
        )
        EVENTS_PRODUCED.labels("policy", topics.REPLIES).inc()
