"""The policy faust app: calls.submitted → decision → calls.decided (and replies for refusals).

Processing guarantee: at-least-once with idempotent outputs. faust flushes its producer before it
commits offsets, so a decision is acknowledged by Kafka before the submission is marked done; a
crash in between makes faust decide again, and the decided event carries the same id (derived
from the call id), which the forwarder and the recorder treat as the same event. (faust's
exactly-once mode has open crash bugs, so it is not used.)
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from services.policy import handlers
from services.policy.config import PolicySettings
from skillgate import events, topics
from skillgate.codec import CodecError, default_codec
from skillgate.config import KafkaSettings
from skillgate.events import (
    APPROVAL_REQUESTED,
    CALL_DECIDED,
    CALL_FAILED,
    CALL_REPLY,
    CALL_SUBMITTED,
    CallSubmitted,
)
from skillgate.fingerprints import load_fingerprint_key
from skillgate.kafka import dead_letter_value
from skillgate.logs import call_context
from skillgate.metrics import DEAD_LETTERS, EVENTS_CONSUMED, EVENTS_PRODUCED, STAGE_SECONDS
from skillgate.policy.bundle import Bundle, BundleError, load_bundle
from skillgate.policy.distribution import BundleWatcher, follow_bundles
from skillgate.policy.engine import MemoryRateCounter, Verdict
from skillgate.policy.masking import Masker

log = logging.getLogger(__name__)


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
        # Per replica for now: with N policy replicas a caller may reach N times a limit.
        self.counter = MemoryRateCounter()
        self.reload_bundle()
        brokers = [f"kafka://{b.strip()}" for b in kafka.bootstrap.split(",")]
        self.app = _App(
            policy.app_id,
            broker=brokers,
            broker_commit_interval=policy.commit_interval_seconds,
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
        self._submitted = self.app.topic(
            topics.name(kafka, topics.SUBMITTED), key_type=bytes, value_type=bytes
        )
        self._decided = self.app.topic(topics.name(kafka, topics.DECIDED), key_type=bytes, value_type=bytes)
        self._failed = self.app.topic(topics.name(kafka, topics.FAILED), key_type=bytes, value_type=bytes)
        self._approvals = self.app.topic(
            topics.name(kafka, topics.APPROVALS_REQUESTED), key_type=bytes, value_type=bytes
        )
        self._deadletter = self.app.topic(
            topics.name(kafka, topics.DEADLETTER), key_type=bytes, value_type=bytes
        )
        self._replies: dict[str, faust.TopicT] = {}
        # Several actors, so waiting for one decision's acknowledgement does not hold the others
        # back; faust commits only up to the oldest event not yet done.
        self.app.agent(self._submitted, name="decide", concurrency=policy.concurrency)(self._agent)
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
        finally:
            self._bundles_ready.set()

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

    async def _agent(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            await self.handle(
                event.message.topic,
                event.message.partition,
                event.message.offset,
                event.key,
                event.value,
            )

    async def handle(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        """Decide on one submitted call (or dead-letter it) and publish the outcome."""
        EVENTS_CONSUMED.labels("policy", topics.SUBMITTED).inc()
        if not self._bundles_ready.is_set():
            await self._bundles_ready.wait()
        try:
            _, record = self.codec.decode(value, expected=CALL_SUBMITTED)
        except CodecError as exc:
            await self._confirm(
                await self._deadletter.send(
                    key=key,
                    value=dead_letter_value(
                        codec=self.codec,
                        service="policy",
                        reason=str(exc),
                        topic=topic,
                        partition=partition,
                        offset=offset,
                        key=key,
                        value=value,
                    ),
                )
            )
            DEAD_LETTERS.labels("policy").inc()
            log.warning("dead-lettered unreadable submission", extra={"error": str(exc)})
            return
        submitted: CallSubmitted = record  # type: ignore[assignment]
        call_context.set((submitted["call_id"], submitted["session_id"]))
        session_key = submitted["session_id"].encode()
        with STAGE_SECONDS.labels("policy", "decide").time():
            bundle = self.bundle
            verdict: Verdict | None = None
            error_text = ""
            try:
                if bundle is None:
                    raise RuntimeError(self.bundle_error or "no policy bundle loaded")
                verdict = handlers.decide(submitted, bundle, self.masker, self.counter)
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
            decided = handlers.decided_event(submitted, bundle, verdict)
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
            requested, failed, reply = handlers.approval_events(submitted, bundle, verdict)
            await self._confirm(
                await self._approvals.send(
                    key=session_key, value=self.codec.encode(APPROVAL_REQUESTED, requested)
                )
            )
            await self._confirm(
                await self._failed.send(key=session_key, value=self.codec.encode(CALL_FAILED, failed))
            )
        else:
            reply = handlers.refusal_reply(decided)
        if reply is not None and decided["reply_to"] is not None:
            await self._send_reply(decided["reply_to"], session_key, reply)

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
