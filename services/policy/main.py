"""``skillgate policy``: run the policy faust worker."""

from __future__ import annotations

import asyncio

import faust

from services.policy.app import PolicyService, own_topics
from services.policy.config import PolicySettings
from skillgate import topics
from skillgate.config import CommonSettings, KafkaSettings
from skillgate.logs import setup
from skillgate.metrics import serve


def run(policy: PolicySettings | None = None, kafka: KafkaSettings | None = None) -> None:
    """Create topics if needed, then run the faust worker until SIGINT/SIGTERM."""
    import uvloop

    uvloop.install()  # faust creates its loops lazily: they become uvloop loops
    policy = policy or PolicySettings()
    kafka = kafka or KafkaSettings()
    level = CommonSettings().log_level
    setup("policy", level)
    if kafka.create_topics:
        asyncio.run(topics.ensure_topics(kafka, own_topics(policy, kafka)))
    if policy.metrics_port:
        serve(policy.metrics_port, policy.metrics_host)
    service = PolicyService(policy, kafka)
    worker = faust.Worker(service.app, loglevel=level.lower(), quiet=True, override_logging=False)
    setup("policy", level)  # faust's worker installs its own handlers; keep ours (JSON lines)
    worker.execute_from_commandline()
