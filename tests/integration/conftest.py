"""Integration fixtures: one real Kafka broker per test session, unique topics per test.

With ``SKILLGATE_KAFKA_BOOTSTRAP`` set, the tests use that cluster instead of starting one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.cli.stack import Stack, StackPorts
from skillgate import topics
from skillgate.config import KafkaSettings
from skillgate.localkafka import LocalKafka, free_port


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of the session's broker (started here unless one is configured)."""
    configured = os.environ.get("SKILLGATE_KAFKA_BOOTSTRAP")
    if configured:
        yield configured
        return
    broker = LocalKafka(Path(tmp_path_factory.mktemp("kafka")), port=free_port())
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
async def kafka_settings(kafka_bootstrap: str) -> AsyncIterator[KafkaSettings]:
    """Kafka settings with a topic prefix unique to this test, its topics already created."""
    settings = KafkaSettings(
        bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=3
    )
    await topics.ensure_topics(settings)
    yield settings


@pytest.fixture(scope="session")
def stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole skillgate stack (stub upstream) on the session broker, with its own topics."""
    data_dir = Path(tmp_path_factory.mktemp("stack"))
    s = Stack(
        data_dir=data_dir,
        ports=StackPorts.free(),
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"s{uuid.uuid4().hex[:8]}.",
        extra_env={
            "SKILLGATE_INGRESS_MAX_BODY_BYTES": str(256 * 1024),
            "SKILLGATE_FORWARDER_BACKOFF_INITIAL_SECONDS": "0.05",
            "SKILLGATE_LOG_LEVEL": "INFO",
        },
    )
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def alice_token(stack: Stack) -> str:
    """A caller token (user alice, group eng)."""
    return stack.token("alice", ["eng"])


@pytest.fixture(scope="session")
def auditor_token(stack: Stack) -> str:
    """An auditor token."""
    return stack.token("audrey", ["auditors"])
