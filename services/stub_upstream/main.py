"""Serve the stub upstream with uvicorn (``skillgate stub-upstream``)."""

from __future__ import annotations

import uvicorn

from services.stub_upstream.app import create_app
from services.stub_upstream.config import StubSettings


def run(settings: StubSettings | None = None) -> None:
    """Serve the stub Messages API until interrupted, tuned to be the fastest possible upstream.

    uvloop + httptools and no access log, because benchmarks use it as the zero-latency
    baseline; settings default to the environment (``SKILLGATE_STUB_*``).
    """
    settings = settings or StubSettings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    run()
