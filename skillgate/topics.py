"""skillgate's Kafka topics: names, partitioning, retention and cleanup policy, and creation.

Calls are keyed by session id, so one session stays ordered. ``forwarder.claims`` must have the
same partition count as ``calls.decided``: the forwarder rebuilds its at-most-once state for a
partition of calls.decided from the same-numbered partition of the claims changelog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from skillgate import events
from skillgate.config import KafkaSettings

log = logging.getLogger(__name__)

SUBMITTED = "calls.submitted"
DECIDED = "calls.decided"
COMPLETED = "calls.completed"
FAILED = "calls.failed"
REPLIES = "calls.replies"
CANCELLED = "calls.cancelled"
APPROVALS_REQUESTED = "approvals.requested"
APPROVALS_DECIDED = "approvals.decided"
APPROVALS_RESOLVED = "approvals.resolved"
APPROVALS_NOTIFIED = "approvals.notified"
APPROVALS_HELD = "approvals.held"
RATE_CHECKS = "policy.ratelimit"
POLICY_BUNDLES = "policy.bundles"
FORWARDER_CLAIMS = "forwarder.claims"
DEADLETTER = "deadletter"

#: The event schema each topic carries.
EVENT_OF_TOPIC: dict[str, str] = {
    SUBMITTED: events.CALL_SUBMITTED,
    DECIDED: events.CALL_DECIDED,
    COMPLETED: events.CALL_COMPLETED,
    FAILED: events.CALL_FAILED,
    REPLIES: events.CALL_REPLY,
    CANCELLED: events.CALL_CANCELLED,
    APPROVALS_REQUESTED: events.APPROVAL_REQUESTED,
    APPROVALS_DECIDED: events.APPROVAL_DECIDED,
    APPROVALS_RESOLVED: events.APPROVAL_RESOLVED,
    APPROVALS_NOTIFIED: events.APPROVAL_NOTIFIED,
    APPROVALS_HELD: events.APPROVAL_HELD,
    RATE_CHECKS: events.RATE_CHECK,
    POLICY_BUNDLES: events.POLICY_BUNDLE_PUBLISHED,
    FORWARDER_CLAIMS: events.FORWARDER_CLAIM,
    DEADLETTER: events.DEAD_LETTER,
}

#: Kafka header naming what a ``calls.replies`` message carries when it is not a whole answer:
#: a streamed answer's chunks are tagged ``chunk``, so the recorder skips them without decoding
#: (the assembled message is recorded from CallCompleted; a stream can be hundreds of chunks).
KIND_HEADER = "skillgate-kind"
CHUNK_KIND = b"chunk"

#: Topics the recorder does not store: what they hold is internal working state whose content
#: reaches the audit store through other events (a held call's request is ApprovalRequested).
UNRECORDED: frozenset[str] = frozenset({APPROVALS_HELD, RATE_CHECKS})


@dataclass(frozen=True)
class TopicSpec:
    """How one topic is created."""

    suffix: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def name(settings: KafkaSettings, suffix: str) -> str:
    """Full topic name for a suffix such as ``calls.submitted``."""
    return f"{settings.topic_prefix}{suffix}"


def specs(settings: KafkaSettings) -> list[TopicSpec]:
    """Every topic skillgate uses, with partitions, retention and cleanup policy."""
    p = settings.partitions
    # Calls carry whole request and response bodies (the Messages API accepts 32 MB): the topic
    # limit must not be the broker default of 1 MB, or a large call could not be written.
    big = {"max.message.bytes": str(64 * 1024 * 1024)}
    short = {"retention.ms": str(settings.submitted_retention_ms), "cleanup.policy": "delete", **big}
    record = {"retention.ms": str(settings.record_retention_ms), "cleanup.policy": "delete", **big}
    return [
        TopicSpec(SUBMITTED, p, short),
        TopicSpec(DECIDED, p, short),
        TopicSpec(COMPLETED, p, record),
        TopicSpec(FAILED, p, record),
        TopicSpec(
            REPLIES,
            max(p, 12),
            {"retention.ms": str(settings.replies_retention_ms), "cleanup.policy": "delete", **big},
        ),
        # Streamed calls whose caller went away; every forwarder replica reads all of it.
        TopicSpec(CANCELLED, p, record),
        TopicSpec(APPROVALS_REQUESTED, p, record),
        TopicSpec(APPROVALS_DECIDED, p, record),
        TopicSpec(APPROVALS_RESOLVED, p, record),
        TopicSpec(APPROVALS_NOTIFIED, p, record),
        # The calls waiting for a human, bodies included (masked for the model): read only by the
        # policy service, kept as long as a call can wait (record retention bounds any timeout).
        TopicSpec(APPROVALS_HELD, p, record),
        # Calls being charged to rate-limit counters, keyed by counter: each counter lives in one
        # partition (and its faust table partition), so every replica counts the same total.
        TopicSpec(RATE_CHECKS, p, short),
        # Compacted: the latest version of each bundle is kept forever; a new replica reads it.
        TopicSpec(POLICY_BUNDLES, 1, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
        # Compacted and bounded: enough history to recognise redelivered calls for a week.
        TopicSpec(
            FORWARDER_CLAIMS,
            p,
            {"cleanup.policy": "compact,delete", "retention.ms": str(settings.record_retention_ms)},
        ),
        TopicSpec(DEADLETTER, 1, {"retention.ms": str(2 * settings.record_retention_ms), **big}),
    ]


async def ensure_topics(settings: KafkaSettings, extra: Sequence[tuple[str, TopicSpec]] = ()) -> None:
    """Create the topics that do not exist yet (idempotent, safe from several replicas at once).

    ``extra``: (full name, spec) of a service's own topics, such as faust's table changelogs.
    """
    from skillgate.kafka import client_kwargs

    wanted = [(name(settings, s.suffix), s) for s in specs(settings)] + list(extra)
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=full,
                num_partitions=s.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=s.config,
            )
            for full, s in wanted
            if full not in existing
        ]
        if missing:
            # Another replica may win the race; the topic is then what we need anyway.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            log.info("created topics", extra={"topics": [t.name for t in missing]})
            await _wait_visible(admin, {t.name: t.num_partitions for t in missing})
    finally:
        await admin.close()


async def _wait_visible(admin: AIOKafkaAdminClient, wanted: dict[str, int], within: float = 30.0) -> None:
    """Wait until the broker's metadata shows every new topic with all its partitions.

    A consumer that joins its group right after a create can otherwise see a topic without
    partitions: faust then takes a table's changelog for empty and refuses to write to it.
    """
    deadline = asyncio.get_running_loop().time() + within
    while True:
        described = await admin.describe_topics(list(wanted))
        ready = {
            d["topic"]
            for d in described
            if d.get("error_code", 0) == 0 and len(d.get("partitions") or ()) == wanted.get(d["topic"])
        }
        if ready >= set(wanted) or asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.1)  # metadata polling interval, bounded by the deadline
