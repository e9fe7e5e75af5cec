"""Entry points of the dev OIDC issuer: serve it, mint a user token, show a client secret.

DEVELOPMENT ONLY. ``skillgate dev-issuer`` (or the local stack) serves it; ``skillgate token``
mints a token from the key files directly, so it works whether or not the server runs.
"""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from services.dev_issuer.app import create_app
from services.dev_issuer.config import DEFAULT_CLIENT_ID, DevIssuerSettings
from services.dev_issuer.keys import load_or_create_client_secret, mint_token
from skillgate import logs
from skillgate.config import CommonSettings

log = logging.getLogger(__name__)

#: ``azp``/``client_id`` of tokens minted by ``skillgate token``.
CLI_CLIENT_ID = "skillgate-cli"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(settings: DevIssuerSettings | None = None) -> None:
    """Serve the dev issuer with uvicorn until interrupted, after warning that it is dev only.

    uvloop + httptools, no access log (token requests carry client secrets in headers or
    bodies, and nothing about them belongs in a log), JSON logs through :mod:`skillgate.logs`.
    Settings default to the environment (``SKILLGATE_DEV_ISSUER_*``).
    """
    settings = settings or DevIssuerSettings()
    logs.setup("dev-issuer", CommonSettings().log_level)
    log.warning(
        "DEVELOPMENT ONLY: this is skillgate's dev OIDC issuer. It mints tokens for any "
        "identity to anyone who can read its key directory. Never trust it in production; "
        "point SKILLGATE_OIDC_ISSUER at a real IdP there.",
        extra={"issuer": settings.issuer_url, "key_dir": str(settings.key_path)},
    )
    if not _is_loopback(settings.host):
        log.warning(
            "DEVELOPMENT ONLY: the dev issuer is listening beyond loopback",
            extra={"host": settings.host},
        )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,  # keep the JSON logging set up above
    )


def token_command(
    user: str,
    groups: list[str],
    expires_in: int | None,
    settings: DevIssuerSettings | None = None,
    audience: str | None = None,
) -> str:
    """Mint a user token (``skillgate token --user alice --groups eng [--expires-in S]``).

    Signs with the key files directly, so it needs no running server. ``sub`` and
    ``preferred_username`` are ``user``; ``azp`` is ``skillgate-cli``; the lifetime defaults to
    ``default_ttl_seconds`` and may not exceed ``max_ttl_seconds``. Returns the token for the
    console to print (it is never logged).
    """
    settings = settings or DevIssuerSettings()
    if not user:
        raise ValueError("a user name is required")
    ttl = settings.default_ttl_seconds if expires_in is None else expires_in
    if not 1 <= ttl <= settings.max_ttl_seconds:
        raise ValueError(f"expires_in must be between 1 and {settings.max_ttl_seconds} seconds")
    return mint_token(
        settings.key_path,
        issuer=settings.issuer_url,
        audience=audience or settings.audience,
        subject=user,
        groups=groups,
        expires_in=ttl,
        username=user,
        client_id=CLI_CLIENT_ID,
    )


def client_secret_command(
    client_id: str = DEFAULT_CLIENT_ID, settings: DevIssuerSettings | None = None
) -> str:
    """The secret of a client-credentials client, for the console to print (never logged).

    A client configured without a secret gets its generated one (created now if the server has
    not started yet), so CI jobs can fetch tokens from ``POST /token``.
    """
    settings = settings or DevIssuerSettings()
    client = settings.clients.get(client_id)
    if client is None:
        raise ValueError(f"no client {client_id!r} is configured")
    if client.secret is not None:
        return client.secret.get_secret_value()
    return load_or_create_client_secret(settings.key_path, client_id).get_secret_value()


if __name__ == "__main__":
    run()
