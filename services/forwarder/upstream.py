"""Calling the upstream Messages API: pooled connections, timeouts, retries with backoff.

Retries: on 408/409/429/5xx/529 (the upstream did not process the request) and on connection
failures before the request was sent, honouring ``retry-after``/``retry-after-ms`` and capped at
``max_attempts``. Not on read timeouts or resets after sending: the upstream may have processed
the call, and a second attempt would break "at most one upstream call per call".

HTTP goes through httpx's API on aiohttp's transport (``httpx-aiohttp``): httpx's own pure-Python
transport was the forwarder's largest CPU cost per call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from pydantic import SecretStr

from services.forwarder.config import ForwarderSettings, UpstreamConfig
from skillgate.events import UpstreamAttempt, now_micros

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# Response headers worth relaying to the caller (others describe the upstream hop).
RELAY_HEADERS = ("content-type", "request-id", "retry-after", "retry-after-ms", "x-should-retry")


class UnknownUpstream(LookupError):
    """Policy chose an upstream connection this forwarder does not have."""


@dataclass
class UpstreamResult:
    """The final outcome of all attempts for one call."""

    status: int  # 0 when no response at all
    headers: dict[str, str]
    body: bytes
    attempts: list[UpstreamAttempt] = field(default_factory=list)
    error: str | None = None
    latency_ms: float = 0.0
    maybe_processed: bool = False  # sent, but no answer: the upstream may have processed it


def relay_headers(headers: httpx.Headers) -> dict[str, str]:
    """The upstream response headers the caller should see."""
    out = {k: headers[k] for k in RELAY_HEADERS if k in headers}
    for k, v in headers.items():
        if k.startswith("anthropic-"):
            out[k] = v
    return out


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The upstream's retry advice, if any (``retry-after-ms`` wins)."""
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000.0
        if "retry-after" in headers:
            return float(headers["retry-after"])
    except ValueError:
        return None
    return None


class Upstreams:
    """One pooled HTTP client per named upstream; keys are resolved once and kept here only."""

    def __init__(
        self, settings: ForwarderSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._settings = settings
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._configs: dict[str, UpstreamConfig] = dict(settings.upstreams)
        self._keys: dict[str, SecretStr | None] = {}
        for name, cfg in self._configs.items():
            self._keys[name] = cfg.key()
            self._clients[name] = httpx.AsyncClient(
                base_url=cfg.base_url,
                timeout=httpx.Timeout(
                    settings.read_timeout_seconds, connect=settings.connect_timeout_seconds
                ),
                limits=httpx.Limits(
                    max_connections=cfg.max_connections,
                    max_keepalive_connections=cfg.max_connections,
                ),
                transport=transport
                or AiohttpTransport(
                    limits=httpx.Limits(
                        max_connections=cfg.max_connections,
                        max_keepalive_connections=cfg.max_connections,
                    )
                ),
            )

    def names(self) -> list[str]:
        """Configured upstream names."""
        return sorted(self._configs)

    def has_key(self, name: str) -> bool:
        """Whether a credential is configured for ``name`` (never the credential itself)."""
        return self._keys.get(name) is not None

    async def close(self) -> None:
        """Close every pooled client."""
        await asyncio.gather(*(c.aclose() for c in self._clients.values()))

    def _prepare(self, name: str, headers: dict[str, str]) -> tuple[httpx.AsyncClient, dict[str, str]]:
        """The pooled client of ``name`` and the headers with its credential."""
        client = self._clients.get(name)
        if client is None:
            raise UnknownUpstream(name)
        cfg = self._configs[name]
        send_headers = dict(headers)
        key = self._keys[name]
        if key is not None:
            value = key.get_secret_value()
            send_headers[cfg.auth_header] = (
                f"Bearer {value}" if cfg.auth_header.lower() == "authorization" else value
            )
        return client, send_headers

    async def open_stream(
        self, name: str, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> UpstreamStream:
        """Send a streamed call (``stream: true``) and return once the upstream answered.

        Retries exactly as :meth:`call` does, and only before a stream started: an error status
        (or a refused connection) means the upstream did not process the call. Once a 2xx
        ``text/event-stream`` response is open it is returned as it is, never retried: a stream
        that breaks later may have been processed (and billed).
        """
        return await self._send(name, method, path, query, headers, body, keep_open=_open_stream)

    async def call(
        self, name: str, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> UpstreamResult:
        """Send one call upstream, retrying as described in the module docstring."""
        sent = await self._send(name, method, path, query, headers, body, keep_open=None)
        assert sent.result is not None  # nothing is kept open without keep_open
        return sent.result

    async def _send(
        self,
        name: str,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        keep_open: Callable[[httpx.Response], bool] | None,
    ) -> UpstreamStream:
        """The retry loop of :meth:`call` and :meth:`open_stream`.

        A response ``keep_open`` accepts is returned open, unread; any other is read whole, then
        retried or returned as the final result.
        """
        client, send_headers = self._prepare(name, headers)
        url = path + (f"?{query}" if query else "")
        s = self._settings
        attempts: list[UpstreamAttempt] = []
        started = time.perf_counter()
        delay = s.backoff_initial_seconds

        def final(result: UpstreamResult) -> UpstreamStream:
            return UpstreamStream(result, None, result.headers, attempts, started)

        while True:
            number = len(attempts) + 1
            t0 = time.perf_counter()
            at = now_micros()
            try:
                request = client.build_request(method, url, headers=send_headers, content=body)
                resp = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                attempts.append(_attempt(number, at, t0, 0, describe(exc), None, None))
                if not never_sent(exc):
                    # Sent, but no complete answer: the upstream may have processed it; no retry.
                    error = f"upstream did not answer: {describe(exc)}"
                    return final(
                        UpstreamResult(0, {}, b"", attempts, error, _ms(started), maybe_processed=True)
                    )
                if number >= s.max_attempts:
                    error = f"upstream unreachable: {describe(exc)}"
                    return final(UpstreamResult(0, {}, b"", attempts, error, _ms(started)))
                await asyncio.sleep(_jitter(delay))  # never reached the upstream: safe to retry
                delay = min(delay * 2, s.backoff_max_seconds)
                continue
            advice = _answered(attempts, number, at, t0, resp)
            if keep_open is not None and keep_open(resp):
                return UpstreamStream(None, resp, relay_headers(resp.headers), attempts, started)
            try:
                content = await resp.aread()
            except httpx.HTTPError as exc:
                error = f"upstream did not answer: {describe(exc)}"
                return final(UpstreamResult(0, {}, b"", attempts, error, _ms(started), maybe_processed=True))
            finally:
                await resp.aclose()
            wait = _retry_wait(resp, advice, delay, number, s)
            if wait is not None:
                log.info("retrying upstream", extra={"status": resp.status_code, "wait_s": wait})
                await asyncio.sleep(wait)
                delay = min(delay * 2, s.backoff_max_seconds)
                continue
            return final(
                UpstreamResult(
                    resp.status_code, relay_headers(resp.headers), content, attempts, None, _ms(started)
                )
            )


def _open_stream(resp: httpx.Response) -> bool:
    """A 2xx ``text/event-stream`` answer: the stream has started and is relayed as it comes."""
    return 200 <= resp.status_code < 300 and resp.headers.get("content-type", "").startswith(
        "text/event-stream"
    )


@dataclass
class UpstreamStream:
    """A streamed call once the upstream answered: an open SSE response, or a final result.

    ``response`` is the open ``text/event-stream`` response (status 2xx; the caller must close
    it); otherwise ``result`` holds the final outcome as :meth:`Upstreams.call` gives it (an
    error status after retries, or no answer). ``started`` is the ``perf_counter`` time the
    first attempt began (time to first token and total latency are measured from it).
    """

    result: UpstreamResult | None
    response: httpx.Response | None
    headers: dict[str, str]
    attempts: list[UpstreamAttempt]
    started: float


def never_sent(exc: httpx.HTTPError) -> bool:
    """True when the request certainly never reached the upstream (so retrying cannot duplicate it).

    httpx-aiohttp maps every aiohttp connection error to ``ConnectTimeout``, including a server
    disconnecting *after* the request was sent; so the aiohttp cause decides, not the httpx type.
    """
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError | TimeoutError):
        return isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def describe(exc: httpx.HTTPError) -> str:
    """What went wrong, named by what happened rather than by the transport's exception mapping."""
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ConnectionTimeoutError | aiohttp.ServerTimeoutError):
        return "ConnectTimeout" if isinstance(cause, aiohttp.ConnectionTimeoutError) else "ReadTimeout"
    if isinstance(cause, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return "ServerDisconnected"
    if isinstance(cause, aiohttp.ClientError):
        return type(cause).__name__
    return type(exc).__name__


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _jitter(delay: float) -> float:
    return delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not security


def _retry_wait(
    resp: httpx.Response, advice: float | None, delay: float, number: int, s: ForwarderSettings
) -> float | None:
    """How long to wait before retrying an answered attempt, or None when it must not be retried
    (not a retryable status, the upstream said not to, attempts used up, or it asks for a longer
    wait than we hold a call: then its answer, with retry-after, goes to the caller)."""
    if (
        resp.status_code not in RETRYABLE_STATUS
        or resp.headers.get("x-should-retry", "true") == "false"
        or number >= s.max_attempts
    ):
        return None
    wait = advice if advice is not None else _jitter(delay)
    return wait if wait <= s.backoff_max_seconds else None


def _answered(
    attempts: list[UpstreamAttempt], number: int, at: int, t0: float, resp: httpx.Response
) -> float | None:
    """Record an attempt the upstream answered; returns its retry-after advice in seconds."""
    advice = retry_after_seconds(resp.headers)
    attempts.append(
        _attempt(
            number,
            at,
            t0,
            resp.status_code,
            None,
            advice * 1000 if advice is not None else None,
            resp.headers.get("request-id"),
        )
    )
    return advice


def _attempt(
    number: int,
    at: int,
    t0: float,
    status: int,
    error: str | None,
    retry_after_ms: float | None,
    request_id: str | None,
) -> UpstreamAttempt:
    return UpstreamAttempt(
        number=number,
        started_at=at,
        duration_ms=(time.perf_counter() - t0) * 1000.0,
        status=status,
        error=error,
        retry_after_ms=retry_after_ms,
        request_id=request_id,
    )
