"""``skillgate ingress``: run the ingress under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import uvicorn

from services.ingress.config import IngressSettings
from skillgate.config import CommonSettings
from skillgate.logs import setup


def run(settings: IngressSettings | None = None) -> None:
    """Serve the ingress until SIGINT/SIGTERM."""
    settings = settings or IngressSettings()
    setup("ingress", CommonSettings().log_level)
    uvicorn.run(
        "services.ingress.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers if settings.workers > 1 else None,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=30,
    )
