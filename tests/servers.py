"""Serving an ASGI app to a test over real HTTP: uvicorn in a background thread on 127.0.0.1.

Several test modules talk to a real server (the stub upstream, the dev issuer, a tiny test IdP,
the recorder's read API); :func:`serve_asgi` is the one way they start and stop it.
"""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import httpx
import uvicorn
from starlette.types import ASGIApp

#: How long the server thread may take to finish after it was told to exit.
STOP_TIMEOUT_S = 30.0
#: Pause between two health probes (a poll interval, not synchronisation).
POLL_INTERVAL_S = 0.01


@contextmanager
def serve_asgi(
    app: ASGIApp | None = None,
    *,
    app_factory: Callable[[int], ASGIApp] | None = None,
    health_path: str,
    name: str,
    lifespan: Literal["auto", "on", "off"] = "off",
    deadline_s: float = 15.0,
    **uvicorn_options: Any,
) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a daemon thread; yield its base URL once it is healthy.

    Give exactly one of ``app`` or ``app_factory``. ``app_factory`` is called with the port when
    the app must know its own address before it is built (an OIDC issuer naming itself, say).

    - No port race: the listening socket is bound to ``127.0.0.1:0`` here, before uvicorn starts,
      and handed to it, so no other process can take the port between choosing and binding it.
    - Readiness: ``GET {base_url}{health_path}`` is polled until it answers 200, never a fixed
      sleep; if the server thread dies first this raises :class:`RuntimeError`, and if no answer
      comes within ``deadline_s`` seconds, :class:`TimeoutError`.
    - Stop: when the block ends (normally or not) the server is told to exit, its thread joined
      (a :class:`RuntimeWarning` if it is still running after ``STOP_TIMEOUT_S``) and the socket
      closed.

    ``name`` names the thread (it shows in tracebacks and thread dumps). ``lifespan`` is uvicorn's
    lifespan mode. ``uvicorn_options`` go to :class:`uvicorn.Config` as they are; by default the
    server logs only warnings and keeps no access log.
    """
    if app is not None and app_factory is not None:
        raise TypeError("serve_asgi takes app or app_factory, not both")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
        base_url = f"http://127.0.0.1:{port}"
        if app is None:
            if app_factory is None:
                raise TypeError("serve_asgi needs app or app_factory")
            app = app_factory(port)
        options: dict[str, Any] = {"log_level": "warning", "access_log": False, **uvicorn_options}
        server = uvicorn.Server(uvicorn.Config(app, lifespan=lifespan, **options))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=name)
        thread.start()
        try:
            _wait_healthy(f"{base_url}{health_path}", thread, deadline_s)
            yield base_url
        finally:
            server.should_exit = True
            thread.join(timeout=STOP_TIMEOUT_S)
            if thread.is_alive():
                warnings.warn(
                    f"server thread {name!r} still running {STOP_TIMEOUT_S}s after it was told to exit",
                    RuntimeWarning,
                    stacklevel=3,
                )
    finally:
        sock.close()


def _wait_healthy(health_url: str, thread: threading.Thread, deadline_s: float) -> None:
    """Poll ``health_url`` until it answers 200; fail if ``thread`` dies or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError(f"server thread {thread.name!r} died during startup")
        try:
            if httpx.get(health_url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(POLL_INTERVAL_S)  # poll interval; readiness is the health answer
    raise TimeoutError(f"{health_url} did not answer 200 within {deadline_s}s")
