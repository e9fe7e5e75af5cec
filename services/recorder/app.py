"""The recorder process: the audit store, the Kafka consumer and the read API on one event loop.

Start: read the fingerprint key (find-secret needs the key policy and forwarder use; a recorder
that cannot read it refuses to start rather than fail every search later), open the store and
apply migrations (before anything is consumed, so inserts always meet the current schema), create
missing topics, join the consumer group, serve the API.
Stop (SIGTERM/SIGINT, or the ``stop`` event): the consumer finishes and commits its current
batch, the API stops accepting, then the Kafka clients and the store are closed, which with chDB
releases the engine path for the next process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator

import uvicorn

from services.recorder import chain
from services.recorder.api import create_app
from services.recorder.config import ClickHouseSettings, RecorderSettings, RetentionSettings
from services.recorder.consumer import RecorderConsumer
from services.recorder.store import AuditStore
from skillgate import topics
from skillgate.config import CommonSettings, KafkaSettings, OIDCSettings, RoleSettings
from skillgate.fingerprints import load_fingerprint_key
from skillgate.oidc import TokenVerifier

log = logging.getLogger(__name__)


class FingerprintKeyError(RuntimeError):
    """The fingerprint key could not be read or created, so the recorder does not start."""


def _fingerprint_key(common: CommonSettings) -> bytes:
    """The HMAC key of masked values' fingerprints, or :class:`FingerprintKeyError`.

    ``SKILLGATE_FINGERPRINT_KEY``, else the key file under the data directory (created there if
    missing, as policy and forwarder do). The message names the cause, never the key.
    """
    try:
        return load_fingerprint_key(common)
    except (OSError, ValueError) as exc:
        log.error("fingerprint key unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise FingerprintKeyError(
            "the recorder cannot read its fingerprint key (SKILLGATE_FINGERPRINT_KEY, or "
            f"fingerprint.key in {common.data_dir}): {type(exc).__name__}: {exc}"
        ) from exc


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` owns the shutdown order.

    uvicorn's handlers would stop the API and then re-raise the signal, killing the process
    before the consumer has committed its batch.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Leave signals to :func:`serve`."""
        yield


async def serve(
    settings: RecorderSettings | None = None,
    clickhouse: ClickHouseSettings | None = None,
    kafka: KafkaSettings | None = None,
    oidc: OIDCSettings | None = None,
    roles: RoleSettings | None = None,
    common: CommonSettings | None = None,
    stop: asyncio.Event | None = None,
    retention: RetentionSettings | None = None,
) -> None:
    """Run the recorder until SIGTERM/SIGINT or until ``stop`` is set.

    Settings default to the environment. Raises :class:`FingerprintKeyError` before opening
    anything when the fingerprint key cannot be read, and raises if the consumer or the API
    fails, after shutting the rest down, so a supervisor sees the failure and restarts the process.
    """
    settings = settings or RecorderSettings()
    clickhouse = clickhouse or ClickHouseSettings()
    kafka = kafka or KafkaSettings()
    oidc = oidc or OIDCSettings()
    common = common or CommonSettings()
    stop = stop or asyncio.Event()

    fingerprint_key = await asyncio.to_thread(_fingerprint_key, common)
    retention = retention or RetentionSettings()
    checkpoint_key = chain.checkpoint_key(settings, fingerprint_key)
    store = await asyncio.to_thread(
        AuditStore, clickhouse, common.data_dir, checkpoint_key, settings.fold_cache_mb * 1024 * 1024
    )
    verifier: TokenVerifier | None = None
    consumer: RecorderConsumer | None = None
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    try:
        applied = await asyncio.to_thread(store.migrate)
        await asyncio.to_thread(store.apply_retention, retention)
        log.info(
            "audit store ready",
            extra={"store": store.display_url, "database": store.database, "migrated": applied},
        )
        if kafka.create_topics:
            await topics.ensure_topics(kafka)
        verifier = TokenVerifier(oidc)
        consumer = RecorderConsumer(store, kafka, settings)
        await consumer.start()
        server = _Server(
            uvicorn.Config(
                create_app(store, verifier, settings, roles, fingerprint_key, retention),
                host=settings.host,
                port=settings.port,
                http="httptools",
                lifespan="off",
                access_log=False,
                log_config=None,
            )
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)  # main thread of a Unix process only
                handled.append(sig)

        consuming = asyncio.create_task(consumer.run(), name="recorder-consumer")
        serving = asyncio.create_task(server.serve(), name="recorder-api")
        stopping = asyncio.create_task(stop.wait(), name="recorder-stop")
        await asyncio.wait({consuming, serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        log.info("recorder stopping")
        # Whatever ended first, stop the rest: the consumer finishes and commits its batch.
        consumer.request_stop()
        server.should_exit = True
        stopping.cancel()
        results = await asyncio.gather(consuming, serving, return_exceptions=True)
        for task, result in zip((consuming, serving), results, strict=True):
            if isinstance(result, BaseException):
                raise RuntimeError(f"{task.get_name()} failed") from result
        if not stop.is_set():
            raise RuntimeError("the recorder stopped unexpectedly (consumer or API ended)")
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if consumer is not None:
            await consumer.close()
        if verifier is not None:
            await verifier.close()
        await asyncio.to_thread(store.close)
        log.info("recorder stopped")
