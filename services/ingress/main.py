"""``skillgate ingress``: run the ingress under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import socket

import uvicorn

from services.ingress.config import IngressSettings
from skillgate.config import CommonSettings
from skillgate.logs import setup


def run(settings: IngressSettings | None = None) -> None:
    """Serve the ingress until SIGINT/SIGTERM."""
    settings = settings or IngressSettings()
    setup("ingress", CommonSettings().log_level)
    sock = listening_socket(settings.host, settings.port)
    uvicorn.run(
        "services.ingress.app:create_app",
        factory=True,
        fd=sock.fileno(),
        workers=settings.workers if settings.workers > 1 else None,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """The listening socket, with TCP keep-alive that accepted connections inherit.

    A caller held for an approval (up to a minute by default) sends and receives nothing while it
    waits: keep-alive probes every 15 s keep NAT and firewall state alive on the way and detect a
    caller that went away. (HTTP load balancers count only data: set their idle timeout above
    ``SKILLGATE_INGRESS_APPROVAL_WAIT_SECONDS``.)
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # Answers are small writes: without NODELAY, Nagle waits for the client's delayed ACK (about
    # 40 ms per call). The server sets it when it creates the socket itself; here we must.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, option):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)  # uvicorn's worker processes serve it too
    return sock
