"""Distributing policy bundles through Kafka: publish a versioned bundle, watch for new ones.

``policy.bundles`` is a compacted topic with one partition, keyed by bundle name: Kafka keeps at
least the newest published version of every bundle forever, so a service that starts reads it
from the beginning and knows the current bundle without asking anyone.

* :func:`publish_bundle` validates a bundle's YAML source with
  :func:`~skillgate.policy.bundle.parse_bundle` first (an invalid bundle is refused and never
  reaches the topic), refuses to reuse a published version string for different content (a
  decision records ``name@version``, which must keep naming one source), and produces a
  ``PolicyBundlePublished`` event with key = bundle name, ``acks=all``, waiting for the ack.
* :class:`BundleWatcher` reads the topic from the beginning with no consumer group (every replica
  of every service reads all of it), keeps the newest valid bundle of every name and every
  version it has seen by label, and calls ``on_bundle`` when the bundle of the name it watches
  changes, without a restart. Entries that do not decode or whose bundle does not validate are
  logged and skipped: a bad entry on the topic never stops a service nor replaces a good bundle.

Wiring a service (policy or forwarder)::

    fallback = load_bundle(settings.bundle)            # the file: used if nothing is published
    watcher = BundleWatcher(kafka, fallback.name, on_bundle=service.use_bundle)
    watcher.remember(fallback)                         # so its label resolves too
    service.use_bundle(fallback)
    await watcher.start()
    async with asyncio.timeout(30):
        await watcher.wait_caught_up()                 # on_bundle(published) ran, if any
    ...
    bundle = watcher.bundle_for(decided["bundle_version"])  # the version a decision named
    ...
    await watcher.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from skillgate import events, topics
from skillgate.codec import AvroCodec, CodecError, default_codec
from skillgate.config import KafkaSettings
from skillgate.events import Identity, PolicyBundlePublished
from skillgate.kafka import make_consumer, make_producer
from skillgate.policy.bundle import Bundle, BundleError, parse_bundle

__all__ = ["BundleCallback", "BundleWatcher", "PublishError", "publish_bundle", "published_bundles"]

log = logging.getLogger(__name__)

BundleCallback = Callable[[Bundle], object]
"""Called with the new bundle of the watched name; a plain or an ``async`` function."""

#: The topic has one partition (see :mod:`skillgate.topics`).
_PARTITION = 0
_MAX_BACKOFF_SECONDS = 5.0


class PublishError(RuntimeError):
    """The bundle is valid but could not be published (Kafka unreachable, no ack in time)."""


def bundle_event(bundle: Bundle, identity: Identity) -> PolicyBundlePublished:
    """The ``PolicyBundlePublished`` event for ``bundle``, published by ``identity``."""
    return PolicyBundlePublished(
        **events.envelope("", "", identity, bundle.label),
        name=bundle.name,
        version=bundle.version,
        sha256=bundle.sha256,
        source=bundle.source,
        rule_count=len(bundle.rules),
    )


async def published_bundles(kafka: KafkaSettings) -> tuple[dict[str, Bundle], dict[str, Bundle]]:
    """What the topic holds now, read once to its end: (newest by name, every version by label).

    Bound the wait with ``asyncio.timeout`` (an unreachable broker is retried, not an error).
    """
    watcher = BundleWatcher(kafka, name=None, max_versions=1 << 30)
    await watcher.start()
    try:
        await watcher.wait_caught_up()
        return dict(watcher.latest), dict(watcher.versions)
    finally:
        await watcher.stop()


async def publish_bundle(
    kafka: KafkaSettings,
    source: str,
    origin: str,
    identity: Identity,
    *,
    timeout_seconds: float = 30.0,
    allow_version_reuse: bool = False,
) -> Bundle:
    """Validate ``source`` and publish it to ``policy.bundles``; returns the published bundle.

    ``origin`` names the source in error messages (a file path). ``identity`` is the publisher,
    recorded in the event. Raises :class:`~skillgate.policy.bundle.BundleError` for an invalid
    bundle (nothing is produced) or for a version string already published for a different
    source (unless ``allow_version_reuse``), and :class:`PublishError` when Kafka did not
    acknowledge the event within ``timeout_seconds``.
    """
    bundle = parse_bundle(source, origin)
    try:
        async with asyncio.timeout(timeout_seconds):
            if kafka.create_topics:
                # Created by skillgate, the topic gets its compaction settings; auto-created by
                # the broker on first write, it would silently delete old bundles.
                await topics.ensure_topics(kafka)
            if not allow_version_reuse:
                # Every version still on the topic (compaction keeps at least the newest).
                _, versions = await published_bundles(kafka)
                known = versions.get(bundle.label)
                if known is not None and known.sha256 != bundle.sha256:
                    raise BundleError(
                        f"{origin}: field `version`: version {bundle.version!r} of bundle "
                        f"`{bundle.name}` is already published with different content "
                        f"(sha256 {known.sha256[:12]}…); give this bundle a new version"
                    )
            value = default_codec().encode(events.POLICY_BUNDLE_PUBLISHED, bundle_event(bundle, identity))
            producer = make_producer(kafka)
            await producer.start()
            try:
                await producer.send_and_wait(
                    topics.name(kafka, topics.POLICY_BUNDLES),
                    value,
                    key=bundle.name.encode(),
                    partition=_PARTITION,
                )
            finally:
                await producer.stop()
    except TimeoutError:
        raise PublishError(
            f"Kafka at {kafka.bootstrap} did not acknowledge bundle {bundle.label} within {timeout_seconds:g} s"
        ) from None
    except KafkaError as exc:
        raise PublishError(
            f"cannot publish bundle {bundle.label} to Kafka at {kafka.bootstrap}: {exc}"
        ) from exc
    log.info(
        "policy bundle published",
        extra={"bundle": bundle.label, "sha256": bundle.sha256, "publisher": identity["subject"]},
    )
    return bundle


class BundleWatcher:
    """Follows ``policy.bundles`` and hands the newest valid bundle of ``name`` to ``on_bundle``.

    ``name`` is the bundle name to watch (``None``: only collect, no callback). The watcher reads
    the single partition from the beginning with no consumer group and never commits. Between
    :meth:`start` and the end of the topic as it was at start (see :meth:`wait_caught_up`) it
    only collects; at that point it calls ``on_bundle`` once with the newest valid bundle of
    ``name`` if one was published, and afterwards once for every bundle of ``name`` whose
    content differs from the current one (republishing the same source calls nothing; publishing
    an older version again is a change and rolls back). A tombstone (null value) for ``name``
    is logged and ignored: the service keeps the bundle it applies.

    Every valid bundle seen is kept by label (``name@version``, the newest ``max_versions``
    besides the current ones), so a consumer of a decision can apply exactly the version the
    decision names (:meth:`bundle_for`). An exception from ``on_bundle`` is logged; the
    watcher carries on.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        name: str | None,
        on_bundle: BundleCallback | None = None,
        *,
        max_versions: int = 64,
        poll_timeout_ms: int = 500,
        codec: AvroCodec | None = None,
    ) -> None:
        self.kafka = kafka
        self.name = name
        self.topic = topics.name(kafka, topics.POLICY_BUNDLES)
        self._on_bundle = on_bundle
        self._max_versions = max_versions
        self._poll_timeout_ms = poll_timeout_ms
        self._codec = codec or default_codec()
        self._tp = TopicPartition(self.topic, _PARTITION)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._end_at_start = 0
        self._caught_up = asyncio.Event()
        self._current: Bundle | None = None
        self._latest: dict[str, Bundle] = {}
        self._versions: OrderedDict[str, Bundle] = OrderedDict()
        self._pinned: set[str] = set()
        self.last_error: str | None = None
        """Why the most recent entry was skipped (for health pages); never contains a source."""
        self.skipped = 0
        """How many entries were skipped as undecodable or invalid."""

    # -- state ----------------------------------------------------------------------------------

    @property
    def current(self) -> Bundle | None:
        """The newest valid published bundle of the watched name (None: none published)."""
        return self._current

    @property
    def latest(self) -> Mapping[str, Bundle]:
        """The newest valid published bundle of every name seen, read-only."""
        return MappingProxyType(self._latest)

    @property
    def versions(self) -> Mapping[str, Bundle]:
        """Every bundle kept, by label (``name@version``), read-only."""
        return MappingProxyType(self._versions)

    @property
    def caught_up(self) -> bool:
        """Whether the watcher has read the topic up to where it ended at :meth:`start`."""
        return self._caught_up.is_set()

    def bundle_for(self, label: str | None) -> Bundle | None:
        """The bundle a decision names (``CallDecided.bundle_version``), if this watcher knows it."""
        return self._versions.get(label) if label else None

    def remember(self, bundle: Bundle) -> None:
        """Keep ``bundle`` by its label (e.g. the file fallback), never evicted; not a callback."""
        self._pinned.add(bundle.label)
        self._keep(bundle)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, seek to the beginning of the topic, note its end and start reading.

        Raises Kafka's error if the broker cannot be reached (the service decides whether to
        run on its file fallback); once started, Kafka errors are retried with backoff.
        """
        if self._task is not None:
            raise RuntimeError("BundleWatcher already started")
        consumer = make_consumer(self.kafka, None, fetch_max_wait_ms=self._poll_timeout_ms)
        await consumer.start()
        try:
            consumer.assign([self._tp])
            await consumer.seek_to_beginning(self._tp)
            end = await consumer.end_offsets([self._tp])
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._end_at_start = int(end.get(self._tp, 0))
        self._task = asyncio.create_task(self._run(), name=f"bundle-watcher:{self.topic}")

    async def wait_caught_up(self) -> Bundle | None:
        """Wait until everything published before :meth:`start` was read; the current bundle.

        By then ``on_bundle`` has run for the published bundle of the watched name, if there
        is one; None means nothing valid is published under that name (use the file fallback).
        Bound the wait with ``async with asyncio.timeout(...)``: while Kafka is unreachable the
        watcher retries and this does not return.
        """
        if self._task is None:
            raise RuntimeError("BundleWatcher not started")
        await self._caught_up.wait()
        return self._current

    async def stop(self) -> None:
        """Stop reading and close the consumer (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    # -- reading --------------------------------------------------------------------------------

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        backoff = 0.1
        while True:
            try:
                if not self._caught_up.is_set() and await consumer.position(self._tp) >= self._end_at_start:
                    await self._finish_catch_up()
                batches = await consumer.getmany(self._tp, timeout_ms=self._poll_timeout_ms)
                backoff = 0.1
            except Exception as exc:  # Kafka errors and anything else: retry, never die
                log.warning(
                    "reading policy bundles failed; retrying",
                    extra={"topic": self.topic, "error": f"{type(exc).__name__}: {exc}"},
                    exc_info=not isinstance(exc, KafkaError),
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
                continue
            for record in batches.get(self._tp, ()):
                try:
                    await self._handle(record)
                except Exception as exc:  # a bad entry must never stop the watcher
                    self._skip(record, f"unexpected error: {type(exc).__name__}")
                    log.exception("policy bundle entry failed", extra={"offset": record.offset})

    async def _finish_catch_up(self) -> None:
        current = self._current
        log.info(
            "policy bundles read",
            extra={
                "topic": self.topic,
                "bundle": current.label if current else None,
                "names": sorted(self._latest),
            },
        )
        if current is not None:
            await self._notify(current)
        # Set after the callback, so whoever waits for the catch-up finds the bundle applied.
        self._caught_up.set()

    def _skip(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        self.skipped += 1
        self.last_error = f"offset {record.offset}: {reason}"
        log.warning(
            "skipped a policy bundle entry",
            extra={"topic": record.topic, "offset": record.offset, "reason": reason[:2000]},
        )

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        key = record.key.decode("utf-8", errors="replace") if record.key is not None else None
        if record.value is None:
            log.warning(
                "policy bundle deleted from the topic (tombstone); the bundle in use stays",
                extra={"topic": record.topic, "offset": record.offset, "bundle_name": key},
            )
            return
        try:
            _, event = self._codec.decode(record.value, expected=events.POLICY_BUNDLE_PUBLISHED)
        except CodecError as exc:
            self._skip(record, f"not a PolicyBundlePublished event: {exc}")
            return
        origin = f"{record.topic}@{record.offset}"
        try:
            bundle = await asyncio.to_thread(parse_bundle, str(event["source"]), origin)
        except BundleError as exc:
            self._skip(record, f"invalid bundle: {exc}")
            return
        mismatch = [
            f"{what} {claimed!r} but the source says {actual!r}"
            for what, claimed, actual in (
                ("key", key, bundle.name),
                ("name", event.get("name"), bundle.name),
                ("version", event.get("version"), bundle.version),
                ("sha256", event.get("sha256"), bundle.sha256),
            )
            if claimed != actual
        ]
        if mismatch:
            self._skip(record, "event disagrees with its source: " + "; ".join(mismatch))
            return
        known = self._versions.get(bundle.label)
        if known is not None and known.sha256 != bundle.sha256:
            log.error(
                "policy bundle version reused for different content; the newest applies",
                extra={"bundle": bundle.label, "old_sha256": known.sha256, "new_sha256": bundle.sha256},
            )
        self._keep(bundle)
        self._latest[bundle.name] = bundle
        if bundle.name != self.name:
            return
        previous = self._current
        if previous is not None and previous.sha256 == bundle.sha256:
            return
        self._current = bundle
        publisher = event.get("identity") or {}
        log.info(
            "policy bundle published",
            extra={
                "bundle": bundle.label,
                "previous": previous.label if previous else None,
                "publisher": publisher.get("subject"),
                "catching_up": not self._caught_up.is_set(),
            },
        )
        if self._caught_up.is_set():
            await self._notify(bundle)

    def _keep(self, bundle: Bundle) -> None:
        self._versions[bundle.label] = bundle
        self._versions.move_to_end(bundle.label)
        keep = self._pinned | {b.label for b in self._latest.values()} | {bundle.label}
        excess = len(self._versions) - self._max_versions
        for label in list(self._versions):
            if excess <= 0:
                break
            if label not in keep:
                del self._versions[label]
                excess -= 1

    async def _notify(self, bundle: Bundle) -> None:
        if self._on_bundle is None:
            return
        try:
            result = self._on_bundle(bundle)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("applying a published policy bundle failed", extra={"bundle": bundle.label})


async def follow_bundles(
    kafka: KafkaSettings,
    name: str,
    current: Bundle | None,
    on_bundle: BundleCallback,
    *,
    catch_up_seconds: float = 30.0,
) -> BundleWatcher:
    """Start following published versions of bundle ``name`` for a service (hot reload).

    ``current`` (the service's file bundle) stays findable by its label; the newest published
    version, if any, is handed to ``on_bundle`` before this returns, so a service that calls this
    before handling calls never decides under a stale bundle. A topic that cannot be read within
    ``catch_up_seconds`` leaves the file bundle in force (logged) while the watcher keeps trying.
    """
    watcher = BundleWatcher(kafka, name, on_bundle=on_bundle)
    if current is not None:
        watcher.remember(current)
    await watcher.start()
    try:
        async with asyncio.timeout(catch_up_seconds):
            published = await watcher.wait_caught_up()
    except TimeoutError:
        log.warning(
            "policy bundles topic not read in time; keeping the file bundle for now",
            extra={"seconds": catch_up_seconds},
        )
    else:
        if published is not None:
            log.info("published policy bundle applied", extra={"bundle": published.label})
    return watcher
