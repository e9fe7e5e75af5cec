"""Bundle distribution on a real broker: publish to the compacted ``policy.bundles`` topic, and a
:class:`BundleWatcher` picks each new version up without a restart, skipping what is invalid."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.structs import TopicPartition

from skillgate import events, topics
from skillgate.codec import default_codec
from skillgate.config import KafkaSettings
from skillgate.events import Identity
from skillgate.kafka import make_consumer, make_producer
from skillgate.policy.bundle import Bundle, BundleError, parse_bundle
from skillgate.policy.distribution import BundleWatcher, bundle_event, publish_bundle, published_bundles
from tests.conftest import eventually

pytestmark = pytest.mark.integration

PUBLISHER = Identity(
    subject="ops-alice",
    issuer="test",
    username="ops-alice",
    email=None,
    groups=["admins"],
    client_id=None,
    token_id=None,
)


def team_bundle(version: str, reason: str = "interns may not call Claude", name: str = "team") -> str:
    """A small valid bundle; ``reason`` varies the content without changing the version."""
    return f"""\
name: {name}
version: "{version}"
rules:
  - id: deny-interns
    match: {{groups: [interns]}}
    action: deny
    reason: {reason}
"""


INVALID = """\
name: team
version: "9"
rules:
  - id: mask-everything
    action: mask
"""


async def end_offset(kafka: KafkaSettings) -> int:
    """The end offset of the bundles topic's only partition."""
    tp = TopicPartition(topics.name(kafka, topics.POLICY_BUNDLES), 0)
    consumer = make_consumer(kafka, None)
    await consumer.start()
    try:
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def produce_raw(kafka: KafkaSettings, value: bytes, key: bytes = b"team") -> None:
    """Put ``value`` on the bundles topic as is, bypassing publish_bundle's validation."""
    producer = make_producer(kafka)
    await producer.start()
    try:
        await producer.send_and_wait(topics.name(kafka, topics.POLICY_BUNDLES), value, key=key)
    finally:
        await producer.stop()


async def test_published_versions_reach_a_running_watcher(kafka_settings: KafkaSettings) -> None:
    seen: list[Bundle] = []
    watcher = BundleWatcher(kafka_settings, "team", on_bundle=seen.append)
    await watcher.start()
    try:
        async with asyncio.timeout(30):
            assert await watcher.wait_caught_up() is None  # nothing published: file fallback
        assert seen == [] and watcher.caught_up

        v1 = await publish_bundle(kafka_settings, team_bundle("1"), "team.yaml", PUBLISHER)
        assert v1.label == "team@1"
        await eventually(lambda: len(seen) == 1)
        assert seen[0].label == "team@1" and seen[0].sha256 == v1.sha256
        assert watcher.current is not None and watcher.current.label == "team@1"

        # v2 arrives in the running watcher: the callback fires with it, no restart.
        await publish_bundle(kafka_settings, team_bundle("2", "no interns"), "team.yaml", PUBLISHER)
        await eventually(lambda: len(seen) == 2)
        assert seen[1].label == "team@2"
        assert seen[1].rules[0].rule.reason == "no interns"
        # Every version stays resolvable by the label a decision records.
        assert set(watcher.versions) == {"team@1", "team@2"}
        bundle_1 = watcher.bundle_for("team@1")
        assert bundle_1 is not None and bundle_1.sha256 == v1.sha256

        # Republishing identical content changes nothing; another bundle name is collected but
        # not handed to this watcher's callback. One partition: once `other` is read, so is v2.
        await publish_bundle(kafka_settings, team_bundle("2", "no interns"), "team.yaml", PUBLISHER)
        await publish_bundle(kafka_settings, team_bundle("1", name="other"), "other.yaml", PUBLISHER)
        await eventually(lambda: "other" in watcher.latest)
        assert [b.label for b in seen] == ["team@1", "team@2"]
        assert watcher.bundle_for("other@1") is not None

        # Rolling back is publishing the old version again: that is a change.
        await publish_bundle(kafka_settings, team_bundle("1"), "team.yaml", PUBLISHER)
        await eventually(lambda: len(seen) == 3)
        assert seen[2].label == "team@1"
    finally:
        await watcher.stop()


async def test_invalid_bundles_are_refused_at_publish(kafka_settings: KafkaSettings) -> None:
    before = await end_offset(kafka_settings)
    with pytest.raises(BundleError, match=r"bad\.yaml:4: field `rules\[0\]`: action `mask` needs a `mask`"):
        await publish_bundle(kafka_settings, INVALID, "bad.yaml", PUBLISHER)
    await publish_bundle(kafka_settings, team_bundle("1"), "team.yaml", PUBLISHER)
    # A version string names one source: different content under a published version is refused.
    with pytest.raises(BundleError, match=r"version '1' of bundle `team` is already published"):
        await publish_bundle(kafka_settings, team_bundle("1", "other text"), "team.yaml", PUBLISHER)
    # ... also once a newer version is current, as long as the old one is on the topic.
    await publish_bundle(kafka_settings, team_bundle("2"), "team.yaml", PUBLISHER)
    with pytest.raises(BundleError, match=r"version '1' of bundle `team` is already published"):
        await publish_bundle(kafka_settings, team_bundle("1", "other text"), "team.yaml", PUBLISHER)
    assert await end_offset(kafka_settings) == before + 2  # only the valid bundles were produced
    latest, versions = await published_bundles(kafka_settings)
    assert latest["team"].label == "team@2" and {"team@1", "team@2"} <= set(versions)


async def test_garbage_on_the_topic_is_skipped(kafka_settings: KafkaSettings) -> None:
    codec = default_codec()
    await publish_bundle(kafka_settings, team_bundle("1"), "team.yaml", PUBLISHER)
    # Garbage bytes, an event whose source does not validate, an event whose fields lie about its
    # source, and a tombstone: a watcher must skip every one and keep the good bundle.
    await produce_raw(kafka_settings, b"\x00 definitely not avro")
    forged = dict(bundle_event(parse_bundle(team_bundle("1")), PUBLISHER))
    await produce_raw(
        kafka_settings, codec.encode(events.POLICY_BUNDLE_PUBLISHED, {**forged, "source": INVALID})
    )
    await produce_raw(
        kafka_settings, codec.encode(events.POLICY_BUNDLE_PUBLISHED, {**forged, "version": "7"})
    )
    producer = make_producer(kafka_settings)
    await producer.start()
    try:
        await producer.send_and_wait(topics.name(kafka_settings, topics.POLICY_BUNDLES), None, key=b"team")
    finally:
        await producer.stop()

    seen: list[Bundle] = []
    watcher = BundleWatcher(kafka_settings, "team", on_bundle=seen.append)
    await watcher.start()
    try:
        async with asyncio.timeout(30):
            current = await watcher.wait_caught_up()
        # At start the published bundle is handed over once, before wait_caught_up returns.
        assert current is not None and current.label == "team@1"
        assert [b.label for b in seen] == ["team@1"]
        assert watcher.skipped == 3
        assert watcher.last_error is not None and "disagrees with its source" in watcher.last_error

        # More garbage while running, then a good version: still picked up.
        await produce_raw(kafka_settings, b"garbage again")
        await publish_bundle(kafka_settings, team_bundle("2"), "team.yaml", PUBLISHER)
        await eventually(lambda: len(seen) == 2)
        assert seen[1].label == "team@2" and watcher.skipped == 4
    finally:
        await watcher.stop()


async def test_async_callback_and_fallback_label(kafka_settings: KafkaSettings) -> None:
    applied: list[str] = []

    async def apply(bundle: Bundle) -> None:
        await asyncio.sleep(0)
        applied.append(bundle.label)

    fallback = parse_bundle(team_bundle("file"), "team.yaml")
    watcher = BundleWatcher(kafka_settings, "team", on_bundle=apply)
    watcher.remember(fallback)
    await watcher.start()
    try:
        async with asyncio.timeout(30):
            assert await watcher.wait_caught_up() is None
        assert watcher.bundle_for("team@file") is fallback
        await publish_bundle(kafka_settings, team_bundle("3"), "team.yaml", PUBLISHER)
        await eventually(lambda: applied == ["team@3"])
        assert watcher.bundle_for("team@file") is fallback
    finally:
        await watcher.stop()
