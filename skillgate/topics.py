"""skillgate's Kafka topics: names, partitioning, retention and cleanup policy, and creation.

Calls are keyed by session id, so one session stays ordered. ``forwarder.claims`` must have the
same partition count as ``calls.decided``: the forwarder rebuilds its at-most-once state for a
partition of calls.decided from the same-numbered partition of the claims changelog.
"""

from __future__ import annotations

import contextlib
import logging
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
APPROVALS_REQUESTED = "approvals.requested"
APPROVALS_DECIDED = "approvals.decided"
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
    APPROVALS_REQUESTED: events.APPROVAL_REQUESTED,
    APPROVALS_DECIDED: events.APPROVAL_DECIDED,
    POLICY_BUNDLES: events.POLICY_BUNDLE_PUBLISHED,
    FORWARDER_CLAIMS: events.FORWARDER_CLAIM,
    DEADLETTER: events.DEAD_LETTER,
}


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
        TopicSpec(APPROVALS_REQUESTED, p, record),
        TopicSpec(APPROVALS_DECIDED, p, record),
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


async def ensure_topics(settings: KafkaSettings) -> None:
    """Create the topics that do not exist yet (idempotent, safe from several replicas at once)."""
    from skillgate.kafka import client_kwargs

    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=name(settings, s.suffix),
                num_partitions=s.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=s.config,
            )
            for s in specs(settings)
            if name(settings, s.suffix) not in existing
        ]
        if missing:
            # Another replica may win the race; the topic is then what we need anyway.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            log.info("created topics", extra={"topics": [t.name for t in missing]})
    finally:
        await admin.close()
