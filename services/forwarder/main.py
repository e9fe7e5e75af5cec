"""``skillgate forwarder``: run the forwarder until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from pydantic import ValidationError

from services.forwarder.config import ForwarderSettings
from services.forwarder.consumer import ForwarderService
from skillgate import topics
from skillgate.config import CommonSettings, KafkaSettings
from skillgate.logs import setup
from skillgate.metrics import serve
from skillgate.policy.distribution import follow_bundles

log = logging.getLogger(__name__)


async def serve_forever(settings: ForwarderSettings, kafka: KafkaSettings) -> None:
    """Run the forwarder in this event loop until a stop signal."""
    if kafka.create_topics:
        await topics.ensure_topics(kafka)
    service = ForwarderService(settings, kafka)
    for name in service.upstreams.names():
        log.info(
            "upstream configured",
            extra={
                "upstream": name,
                "base_url": settings.upstreams[name].base_url,
                "credential": "present" if service.upstreams.has_key(name) else "missing",
            },
        )
    await service.start()
    # Hot reload: published versions of the bundle apply from now on, the newest before any call.
    current = service.response_policy.bundle if service.response_policy is not None else None
    watcher = await follow_bundles(kafka, service.bundle_name, current, service.use_bundle)
    service.watcher = watcher
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(service.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("forwarder stopping")
    runner.cancel()
    stopper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        crash = runner.exception() if runner.done() and not runner.cancelled() else None
        await runner
    # Always drain: calls already sent upstream finish and are recorded, even when the loop
    # crashed; the crash is raised afterwards (exit code 1) so a supervisor restarts us.
    await service.stop()
    await watcher.stop()
    if crash is not None:
        raise crash


def run(settings: ForwarderSettings | None = None, kafka: KafkaSettings | None = None) -> None:
    """Entry point of ``skillgate forwarder``."""
    setup("forwarder", CommonSettings().log_level)
    try:
        settings = settings or ForwarderSettings()
    except ValidationError as exc:
        # Never echo the offending input: a mis-shaped SKILLGATE_FORWARDER_UPSTREAMS may hold a key.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_input=False)
        )
        log.error("invalid forwarder settings", extra={"problems": problems})
        raise SystemExit(2) from None
    if settings.metrics_port:
        serve(settings.metrics_port, settings.metrics_host)
    import uvloop

    uvloop.run(serve_forever(settings, kafka or KafkaSettings()))
