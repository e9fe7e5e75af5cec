"""Integration fixtures: one real Kafka broker per test session, unique topics per test.

With ``SKILLGATE_KAFKA_BOOTSTRAP`` set, the tests use that cluster instead of starting one.
"""

from __future__ import annotations

import json
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
    yield from _session_stack(
        tmp_path_factory,
        kafka_bootstrap,
        "s",
        {
            "SKILLGATE_INGRESS_MAX_BODY_BYTES": str(256 * 1024),
            "SKILLGATE_FORWARDER_BACKOFF_INITIAL_SECONDS": "0.05",
        },
    )


def _session_stack(
    tmp_path_factory: pytest.TempPathFactory,
    kafka_bootstrap: str,
    letter: str,
    env: dict[str, str],
    stub_key: str | None = None,
) -> Iterator[Stack]:
    """Start a stack on the session broker with its own topic prefix and data dir; stop it after.

    ``STUB`` in ``SKILLGATE_FORWARDER_UPSTREAMS`` stands for the stack's stub URL (its port is
    only chosen here).
    """
    ports = StackPorts.free()
    env = {k: v.replace("STUB", f"http://127.0.0.1:{ports.stub}") for k, v in env.items()}
    s = Stack(
        data_dir=Path(tmp_path_factory.mktemp(f"{letter}-stack")),
        ports=ports,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"{letter}{uuid.uuid4().hex[:8]}.",
        extra_env={"SKILLGATE_LOG_LEVEL": "INFO", **env},
    )
    if stub_key is not None:
        s.stub_key = stub_key
    try:
        s.start()
        yield s
    finally:
        s.stop()


#: Groups whose members may call Claude on :func:`identity_stack` (everyone else gets 403).
IDENTITY_CALLER_GROUPS = ["callers"]


@pytest.fixture(scope="session")
def identity_stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second stack for the identity tests, with settings the shared stack must not have.

    - ``SKILLGATE_ROLES_CALLER_GROUPS=["callers"]``: calling Claude needs a group, so the 403
      path runs for real.
    - ``SKILLGATE_OIDC_JWKS_MAX_AGE_SECONDS=1``: a key removed from the dev issuer's JWKS stops
      verifying within a second, so the key-removal attack runs in test time (production default
      300 s; see docs/operations.md, "Identity providers").
    - Its own dev-issuer key directory: the attack suite rotates and removes signing keys, which
      would invalidate every token the shared stack's tests hold.
    """
    yield from _session_stack(
        tmp_path_factory,
        kafka_bootstrap,
        "i",
        {
            "SKILLGATE_ROLES_CALLER_GROUPS": json.dumps(IDENTITY_CALLER_GROUPS),
            "SKILLGATE_OIDC_JWKS_MAX_AGE_SECONDS": "1",
        },
    )


@pytest.fixture(scope="session")
def alice_token(stack: Stack) -> str:
    """A caller token (user alice, group eng)."""
    return stack.token("alice", ["eng"])


@pytest.fixture(scope="session")
def auditor_token(stack: Stack) -> str:
    """An auditor token."""
    return stack.token("audrey", ["auditors"])


#: The bundle of :func:`policy_stack`: one rule per action.
ACTIONS_BUNDLE = Path(__file__).with_name("bundles") / "actions.yaml"


@pytest.fixture(scope="session")
def policy_stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack applying ``bundles/actions.yaml``, with a second upstream connection ``second``
    (the same stub, its own key) for the route rule."""
    placeholder = Stack(data_dir=Path())  # only for its stub key
    upstreams = {
        name: {"base_url": "STUB", "api_key": placeholder.stub_key, "api_key_env": None}
        for name in ("default", "second")
    }
    yield from _session_stack(
        tmp_path_factory,
        kafka_bootstrap,
        "p",
        {
            "SKILLGATE_POLICY_BUNDLE": str(ACTIONS_BUNDLE),
            "SKILLGATE_FORWARDER_UPSTREAMS": json.dumps(upstreams),
            # Held calls: the caller hears the approval id after 3 s (production: 60 s).
            "SKILLGATE_INGRESS_APPROVAL_WAIT_SECONDS": "3",
        },
        stub_key=placeholder.stub_key,
    )
