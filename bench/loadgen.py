"""Closed-loop HTTP load: N workers, each sending one request and waiting for its answer, repeatedly.

Three interchangeable generators send the same bytes and count the same way:

``asyncio`` (default)
    One uvloop event loop, one keep-alive HTTP/1.1 connection per worker, the request bytes built
    once, responses parsed by ``httptools`` (the parser uvicorn uses). Costs a few tens of
    microseconds of client CPU per call, so on two cores it leaves the CPU to the system under test.
``httpx``
    One ``httpx.AsyncClient`` whose pool holds one keep-alive connection per worker. Simpler and
    closer to what a Python caller does, but it spends several times more CPU per call.
``wrk``
    The ``wrk`` binary with ``bench/wrk_post.lua``; latencies and percentiles come from wrk.

For ``asyncio`` and ``httpx`` the run lasts ``warmup + duration``; a call counts if it *ends*
inside the measured window ``[warmup, warmup + duration]``: as a success (its latency kept) when
the answer is a complete ``200``, otherwise as an error of its kind (``http 503``, ``timeout``,
``ConnectionResetError``...). Throughput is successes divided by the window length. Workers start
no call after the window; calls still in flight then are awaited (bounded) and not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import httptools
import httpx

from bench.stats import Measurement

TOOLS: tuple[str, ...] = ("asyncio", "httpx", "wrk")
WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")
_ERROR_PAUSE_S = 0.01  # after a transport error, so a dead server is not hammered in a busy loop
_DRAIN_S = 5.0  # longest wait for calls still in flight when the window closes
_HOOK_LEAD_S = 0.05  # the window hook's begin() runs this long before the window opens


@dataclass(frozen=True)
class Target:
    """One path under test: the URL of ``POST /v1/messages`` and the headers every call carries."""

    name: str
    url: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class LoadSpec:
    """How hard and how long to push one target."""

    concurrency: int
    warmup_s: float
    duration_s: float
    timeout_s: float


class WindowHook(Protocol):
    """Called at the start and the end of the measured window (e.g. to snapshot CPU counters)."""

    def begin(self) -> None:
        """The measured window starts now."""

    def end(self) -> None:
        """The measured window ends now."""


class _Worker(Protocol):
    async def call(self) -> int:
        """Send one request, read the whole answer, return its HTTP status (raise on transport errors)."""

    async def reset(self) -> None:
        """Forget the connection after an error (the next call opens a new one)."""

    async def close(self) -> None:
        """Release what the worker holds."""


# --------------------------------------------------------------------------- asyncio + httptools


class _HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self.usable = True

    # asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; its callbacks resolve the waiting request."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """The peer closed (or the connection broke): fail the request in flight, if any."""
        self.usable = False
        self._fail(exc or ConnectionResetError("connection closed by the server"))

    # httptools callbacks
    def on_message_complete(self) -> None:
        """A whole response (headers and body) has arrived."""
        if not self._parser.should_keep_alive():
            self.usable = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._parser.get_status_code())

    def _fail(self, exc: BaseException) -> None:
        self.usable = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def request(self, payload: bytes) -> asyncio.Future[int]:
        """Write ``payload`` (a complete request); the future resolves to the response status."""
        if self._transport is None or not self.usable:
            raise ConnectionResetError("connection is not usable")
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._transport.write(payload)
        return waiter

    def close(self) -> None:
        """Close the socket."""
        self.usable = False
        if self._transport is not None:
            self._transport.close()


class _RawWorker:
    """A worker that owns one connection and replays prebuilt request bytes."""

    def __init__(self, host: str, port: int, payload: bytes) -> None:
        self._host = host
        self._port = port
        self._payload = payload
        self._conn: _HttpConnection | None = None

    async def call(self) -> int:
        """One request; reconnects first when the previous connection cannot be reused."""
        if self._conn is None or not self._conn.usable:
            loop = asyncio.get_running_loop()
            _, self._conn = await loop.create_connection(_HttpConnection, self._host, self._port)
        return await self._conn.request(self._payload)

    async def reset(self) -> None:
        """Drop the connection (its state is unknown after an error or a timeout)."""
        await self.close()

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def build_request(target: Target, body: bytes) -> bytes:
    """The exact bytes of one ``POST`` to ``target`` with ``body`` (HTTP/1.1, keep-alive)."""
    parts = urlsplit(target.url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [f"POST {path} HTTP/1.1", f"host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in target.headers.items()]
    lines += [f"content-length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


# --------------------------------------------------------------------------------------- httpx


class _HttpxWorker:
    """A worker sharing one ``httpx.AsyncClient`` (whose pool has a connection per worker)."""

    def __init__(self, client: httpx.AsyncClient, target: Target, body: bytes) -> None:
        self._client = client
        self._url = target.url
        self._headers = dict(target.headers)
        self._body = body

    async def call(self) -> int:
        """One request; ``post`` reads the whole body before returning."""
        response = await self._client.post(self._url, content=self._body, headers=self._headers)
        return response.status_code

    async def reset(self) -> None:
        """Nothing to do: the pool discards broken connections itself."""

    async def close(self) -> None:
        """The client is closed by its owner."""


# ------------------------------------------------------------------------------ the closed loop


async def _drive(workers: list[_Worker], spec: LoadSpec, hook: WindowHook) -> Measurement:
    """Run ``workers`` in a closed loop and keep what ends inside the measured window."""
    begin = time.perf_counter()
    t0 = begin + spec.warmup_s
    t1 = t0 + spec.duration_s
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    cpu = [0.0, 0.0]

    async def loop(worker: _Worker) -> None:
        while True:
            start = time.perf_counter()
            if start >= t1:
                return
            kind: str | None = None
            pause = False
            try:
                async with asyncio.timeout(spec.timeout_s):
                    status = await worker.call()
                if status != 200:
                    kind = f"http {status}"
            except TimeoutError:
                kind, pause = "timeout", False
                await worker.reset()
            except (OSError, httpx.HTTPError, httptools.HttpParserError) as exc:
                kind, pause = type(exc).__name__, True
                await worker.reset()
            stop = time.perf_counter()
            if t0 <= stop <= t1:
                if kind is None:
                    latencies.append((stop - start) * 1000.0)
                else:
                    errors[kind] += 1
            if pause:
                await asyncio.sleep(_ERROR_PAUSE_S)

    async def window() -> None:
        # The hook may block the loop for a few ms (reading /proc): run it just before the
        # window opens and just after it closes, so no counted call waits for it.
        await asyncio.sleep(max(0.0, t0 - _HOOK_LEAD_S - time.perf_counter()))
        hook.begin()
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        cpu[0] = time.process_time()
        await asyncio.sleep(max(0.0, t1 - time.perf_counter()))
        cpu[1] = time.process_time()
        hook.end()

    tasks = [asyncio.create_task(loop(w)) for w in workers]
    try:
        await window()
        await asyncio.wait(tasks, timeout=min(_DRAIN_S, spec.timeout_s))
    finally:  # also when the run is cancelled (SIGTERM, Ctrl-C)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            await worker.close()
    return Measurement(
        successes=len(latencies),
        errors=errors,
        window_s=spec.duration_s,
        client_cpu_s=cpu[1] - cpu[0],
        latencies_ms=latencies,
    )


async def _run_asyncio(target: Target, body: bytes, spec: LoadSpec, hook: WindowHook) -> Measurement:
    parts = urlsplit(target.url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    payload = build_request(target, body)
    workers: list[_Worker] = [_RawWorker(host, port, payload) for _ in range(spec.concurrency)]
    return await _drive(workers, spec, hook)


async def _run_httpx(target: Target, body: bytes, spec: LoadSpec, hook: WindowHook) -> Measurement:
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=spec.timeout_s, http1=True) as client:
        workers: list[_Worker] = [_HttpxWorker(client, target, body) for _ in range(spec.concurrency)]
        return await _drive(workers, spec, hook)


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available (it is a dependency of the services), else the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent on Windows only
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# ----------------------------------------------------------------------------------------- wrk


def wrk_available() -> str | None:
    """Path of the ``wrk`` binary, or None."""
    return shutil.which("wrk")


def _wrk_seconds(value: float) -> int:
    """wrk takes whole seconds."""
    return max(1, round(value))


def _run_wrk_once(
    wrk: str, target: Target, body_file: Path, concurrency: int, threads: int, seconds: int, timeout_s: float
) -> dict[str, float]:
    env = {
        **os.environ,
        "BENCH_BODY_FILE": str(body_file),
        "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in target.headers.items()),
    }
    argv = [
        wrk,
        f"-t{min(threads, concurrency)}",
        f"-c{concurrency}",
        f"-d{seconds}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "-s",
        str(WRK_SCRIPT),
        target.url,
    ]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            parsed: dict[str, float] = json.loads(line.removeprefix("BENCH_JSON "))
            return parsed
    raise RuntimeError(f"wrk failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")


def run_wrk(target: Target, body: bytes, spec: LoadSpec, hook: WindowHook, threads: int = 1) -> Measurement:
    """Warm up with one wrk run, then measure with a second; errors = non-200 + socket errors."""
    wrk = wrk_available()
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk), use --tool asyncio")
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        if spec.warmup_s > 0:
            _run_wrk_once(
                wrk, target, body_file, spec.concurrency, threads, _wrk_seconds(spec.warmup_s), spec.timeout_s
            )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        hook.begin()
        out = _run_wrk_once(
            wrk, target, body_file, spec.concurrency, threads, _wrk_seconds(spec.duration_s), spec.timeout_s
        )
        hook.end()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    errors: Counter[str] = Counter()
    if out["non200"]:
        errors["non-200"] = int(out["non200"])
    for kind in ("connect", "read", "write", "timeout"):
        if out[kind]:
            errors[kind] = int(out[kind])
    return Measurement(
        successes=int(out["requests"] - out["non200"]),
        errors=errors,
        window_s=out["duration_us"] / 1e6,
        client_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        tool_percentiles_ms={50.0: out["p50_us"] / 1e3, 95.0: out["p95_us"] / 1e3, 99.0: out["p99_us"] / 1e3},
        tool_mean_ms=out["mean_us"] / 1e3,
        tool_max_ms=out["max_us"] / 1e3,
    )


# ----------------------------------------------------------------------------------- front door


def run_load(
    tool: str, target: Target, body: bytes, spec: LoadSpec, hook: WindowHook, wrk_threads: int = 1
) -> Measurement:
    """Push ``target`` with ``tool`` for ``spec`` and return what the measured window saw."""
    if tool == "wrk":
        return run_wrk(target, body, spec, hook, wrk_threads)
    if tool == "asyncio":
        factory = _run_asyncio
    elif tool == "httpx":
        factory = _run_httpx
    else:
        raise ValueError(f"unknown tool {tool!r} (choose from {', '.join(TOOLS)})")
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(_terminable(factory(target, body, spec, hook)))


class NoHook:
    """A window hook that does nothing (for warm-up load)."""

    def begin(self) -> None:
        """Nothing to do."""

    def end(self) -> None:
        """Nothing to do."""


#: Connections of the stack warm-up: enough to keep every service busy on two cores.
STACK_WARMUP_CONCURRENCY = 8


def warm_up_stack(
    target: Target,
    body: bytes,
    seconds: float,
    *,
    tool: str = "asyncio",
    concurrency: int = STACK_WARMUP_CONCURRENCY,
    timeout_s: float = 30.0,
    wrk_threads: int = 1,
) -> Measurement:
    """Load ``target`` for ``seconds`` before anything is measured; nothing of it is a result.

    Why: Kafka's broker runs interpreted until the JVM has compiled its produce and fetch paths.
    On this kind of machine one bare hop took ~4 ms over its first 1,000 messages and ~1.4 ms
    after 5,000 (``bench/README.md``), so figures taken on a fresh stack measure the JIT, not
    skillgate.
    """
    spec = LoadSpec(concurrency=concurrency, warmup_s=0.0, duration_s=seconds, timeout_s=timeout_s)
    return run_load(tool, target, body, spec, NoHook(), wrk_threads)


async def _terminable(run: Coroutine[Any, Any, Measurement]) -> Measurement:
    """Await ``run``; SIGTERM cancels it cleanly and surfaces as ``KeyboardInterrupt``.

    (Ctrl-C is handled by :class:`asyncio.Runner` itself.) The process's own SIGTERM handler is
    put back afterwards.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        if main is not None:
            main.cancel()

    previous = signal.getsignal(signal.SIGTERM)
    installed = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        installed = True
    try:
        return await run
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt("SIGTERM") from None
        raise
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, previous)


def client_description(tool: str) -> str:
    """What generated the load, for the report."""
    if tool == "wrk":
        wrk = wrk_available()
        return f"wrk ({wrk}) with {WRK_SCRIPT.name}"
    if tool == "httpx":
        return f"httpx {httpx.__version__} AsyncClient, one pooled keep-alive connection per worker"
    loop = "uvloop" if _has_uvloop() else "asyncio"
    return f"{loop} + httptools {httptools.__version__}, one keep-alive connection per worker"


def _has_uvloop() -> bool:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        return True
    return False
