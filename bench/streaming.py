"""What skillgate adds to a streamed Messages call: ``python -m bench.streaming``.

Starts the whole local stack (real Kafka, dev OIDC issuer, stub upstream, ingress, policy,
forwarder, recorder; the default policy bundle, so secrets and PII are masked on the fly and
tool calls checked) and streams the same calls twice, one at a time, with the same client:

* **direct**: ``POST /v1/messages`` with ``"stream": true`` straight to the stub;
* **skillgate**: the same call through the ingress with a dev-issuer token.

Reported, as p50 / p99 over the calls, and the overhead (skillgate minus direct):

* **TTFB**: request sent → first SSE event (``message_start``) received. Target: p50 overhead
  under 15 ms.
* **TTFT**: request sent → first ``text_delta`` received. Through skillgate this includes the
  text hold-back of masking: only what could still become a masked value is held (in prose, the
  unfinished last word), so the first words go out with the first deltas.
* **Per-chunk overhead**: the stub sends ``--deltas`` text deltas ``--delay-ms`` apart; for each
  delta index, the arrival time through skillgate minus through the stub (median per call, then
  p50 / p99 over calls). With masking on, a character may wait for the rest of its word (the
  hold-back); the run also reports the overhead of the *last* delta, which nothing holds back
  beyond the end of the block: the pure relay cost.
* **Control**: as many non-streamed calls (whole answer) through skillgate minus direct,
  interleaved with the streamed ones on the same stack: the pipeline's own overhead on this machine
  at this moment, against which the streaming figures can be read.
* **Kafka records per stream**: chunk messages vs SSE events relayed (the forwarder's metrics),
  i.e. how much the relay batches.
* **Where the first byte's time goes**: for each call through skillgate, the ``time`` its
  CallSubmitted, CallDecided, ``claimed`` claim and first chunk were stamped with (read back from
  Kafka after the run), against when the request was sent and its first byte arrived: ingress,
  each hop with the service behind it, the claim's acknowledgement plus the upstream call.

Before anything is measured, ``--stack-warmup`` seconds of non-streamed load go through skillgate:
Kafka's broker runs interpreted until the JVM has compiled its produce and fetch paths, and a
fresh broker's hop is 2-3 times slower than a warm one's.

Numbers go to stdout and ``bench/results/streaming-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import Target, warm_up_stack
from services.cli.stack import Stack, StackPorts
from skillgate import topics
from skillgate.codec import default_codec
from skillgate.config import KafkaSettings
from skillgate.kafka import make_consumer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "claude-sonnet-4-5"
#: The non-streamed call of the control and of the stack warm-up.
PLAIN_BODY = json.dumps(
    {"model": MODEL, "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]}
).encode()
HEADERS = {"content-type": "application/json", "anthropic-version": "2023-06-01"}


@dataclass
class Timing:
    """One streamed call: when its first event and first text arrived, and when each character
    of the text arrived (ms since the request; deltas are re-cut by masking, characters are not)."""

    ttfb_ms: float
    ttft_ms: float | None
    char_ms: list[float] = field(default_factory=list)
    total_ms: float = 0.0
    text: str = ""
    #: Wall-clock µs when the request was sent (the events' own clock, for the stage split).
    sent_us: int = 0
    call_id: str | None = None


async def stream_once(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: bytes) -> Timing:
    """POST one streamed call and time its events as they arrive."""
    sent_us = time.time_ns() // 1000
    t0 = time.perf_counter()
    ttfb: float | None = None
    ttft: float | None = None
    chars: list[float] = []
    text: list[str] = []
    buffer = b""
    async with client.stream("POST", url, headers=headers, content=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: {resp.status_code} {(await resp.aread())[:300]!r}")
        call_id = resp.headers.get("x-skillgate-call-id")
        async for chunk in resp.aiter_raw():
            now = (time.perf_counter() - t0) * 1000.0
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                if ttfb is None:
                    ttfb = now
                for line in frame.split(b"\n"):
                    if line.startswith(b"data: ") and b'"text_delta"' in line:
                        doc = json.loads(line[6:])
                        piece = doc["delta"]["text"]
                        text.append(piece)
                        if ttft is None:
                            ttft = now
                        chars.extend([now] * len(piece))
    total = (time.perf_counter() - t0) * 1000.0
    assert ttfb is not None
    return Timing(ttfb, ttft, chars, total, "".join(text), sent_us, call_id)


#: Where a streamed call's first byte spends its time, from the events' own ``time`` stamps
#: (µs, stamped when each event is built, just before it is produced): (stage, from, to).
STAGES: tuple[tuple[str, str, str], ...] = (
    ("ingress: request -> CallSubmitted built", "sent", topics.SUBMITTED),
    ("hop + policy: -> CallDecided built", topics.SUBMITTED, topics.DECIDED),
    ("hop + forwarder: -> claim built", topics.DECIDED, topics.FORWARDER_CLAIMS),
    ("claim ack + upstream: -> first chunk built", topics.FORWARDER_CLAIMS, topics.REPLIES),
    ("hop + ingress: -> first byte at the client", topics.REPLIES, "first_byte"),
)


async def event_times(stack: Stack, call_ids: set[str]) -> dict[str, dict[str, int]]:
    """For each call: when its CallSubmitted, CallDecided, ``claimed`` claim and first chunk
    were built (µs), read back from Kafka after the run."""
    codec = default_codec()
    settings = KafkaSettings(bootstrap=f"127.0.0.1:{stack.ports.kafka}", topic_prefix=stack.topic_prefix)
    found: dict[str, dict[str, int]] = {}
    for suffix in (topics.SUBMITTED, topics.DECIDED, topics.FORWARDER_CLAIMS, topics.REPLIES):
        consumer = make_consumer(settings, None, topics.name(settings, suffix))
        await consumer.start()
        try:
            # Everything was produced before this reads: an empty fetch means the end.
            while batches := await consumer.getmany(timeout_ms=2000):
                for records in batches.values():
                    for record in records:
                        _, event = codec.decode(record.value or b"")
                        if event["call_id"] not in call_ids:
                            continue
                        if suffix == topics.FORWARDER_CLAIMS and event["state"] != "claimed":
                            continue
                        if suffix == topics.REPLIES and event["seq"] != 0:
                            continue
                        found.setdefault(event["call_id"], {}).setdefault(suffix, int(event["time"]))
        finally:
            await consumer.stop()
    return found


def stage_split(timings: Sequence[Timing], stamps: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """p50 / p99 of each stage of :data:`STAGES` over the calls whose four events were found."""
    columns: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    for t in timings:
        marks = stamps.get(t.call_id or "")
        if marks is None or len(marks) < 4:
            continue
        at = {**marks, "sent": t.sent_us, "first_byte": t.sent_us + int(t.ttfb_ms * 1000)}
        for name, start, end in STAGES:
            columns[name].append((at[end] - at[start]) / 1000.0)
    return {name: summary(values) | {"calls": len(values)} for name, values in columns.items() if values}


async def call_once(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: bytes) -> float:
    """One non-streamed call (the control): ms until the whole answer arrived."""
    t0 = time.perf_counter()
    resp = await client.post(url, headers=headers, content=body)
    if resp.status_code != 200:
        raise RuntimeError(f"{url}: {resp.status_code} {resp.text[:300]}")
    return (time.perf_counter() - t0) * 1000.0


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50 and p99 of ``values`` (ms, rounded to 0.01)."""
    return {"p50": round(pct(values, 0.5), 2), "p99": round(pct(values, 0.99), 2)}


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def metric(port: int, name: str) -> float:
    """A Prometheus counter of a service's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rpartition(" ")[2])
    return total


async def run(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """Measure both paths, alternating call by call so both see the same machine state."""
    token = stack.token("bench", ["eng"])
    text = ("The quick brown fox jumps over the lazy dog. " * 200)[: args.deltas * 8]
    body = json.dumps(
        {"model": MODEL, "max_tokens": 1024, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    common = {
        **HEADERS,
        "x-stub-reply-text": text,
        "x-stub-chunk-delay-ms": str(args.delay_ms),
    }
    direct_h = {**common, "x-api-key": stack.stub_key}
    gate_h = {**common, "x-api-key": token}
    direct_url, gate_url = f"{stack.stub_url}/v1/messages", f"{stack.ingress_url}/v1/messages"
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    chunks0 = metric(stack.ports.forwarder_metrics, "skillgate_forwarder_stream_chunks_total")
    frames0 = metric(stack.ports.forwarder_metrics, "skillgate_forwarder_stream_frames_total")
    direct: list[Timing] = []
    gate: list[Timing] = []
    control: list[float] = []
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for _ in range(args.warmup):
            await stream_once(client, gate_url, gate_h, body)
            await stream_once(client, direct_url, direct_h, body)
        chunks0 = metric(stack.ports.forwarder_metrics, "skillgate_forwarder_stream_chunks_total")
        frames0 = metric(stack.ports.forwarder_metrics, "skillgate_forwarder_stream_frames_total")
        for _ in range(args.calls):
            direct.append(await stream_once(client, direct_url, direct_h, body))
            gate.append(await stream_once(client, gate_url, gate_h, body))
            d = await call_once(client, direct_url, direct_h, PLAIN_BODY)
            control.append(await call_once(client, gate_url, gate_h, PLAIN_BODY) - d)
    chunks = metric(stack.ports.forwarder_metrics, "skillgate_forwarder_stream_chunks_total") - chunks0
    frames = metric(stack.ports.forwarder_metrics, "skillgate_forwarder_stream_frames_total") - frames0
    if any(g.text != d.text for g, d in zip(gate, direct, strict=True)):
        raise RuntimeError("skillgate delivered a different text than the stub sent")
    stamps = await event_times(stack, {g.call_id for g in gate if g.call_id})

    ttfb_d, ttfb_g = [t.ttfb_ms for t in direct], [t.ttfb_ms for t in gate]
    ttft_d = [t.ttft_ms for t in direct if t.ttft_ms is not None]
    ttft_g = [t.ttft_ms for t in gate if t.ttft_ms is not None]
    last_over = [g.char_ms[-1] - d.char_ms[-1] for g, d in zip(gate, direct, strict=True)]
    total_over = [g.total_ms - d.total_ms for g, d in zip(gate, direct, strict=True)]
    # per chunk: when each piece of text reached the client, through skillgate minus directly
    per_chunk = [
        statistics.median(gc - dc for gc, dc in zip(g.char_ms, d.char_ms, strict=True))
        for g, d in zip(gate, direct, strict=True)
    ]
    return {
        "bundle": "relay-only (nothing masked or checked)" if args.relay_only else "default",
        "calls": args.calls,
        "deltas_per_call": args.deltas,
        "delta_delay_ms": args.delay_ms,
        "ttfb_ms": {"direct": summary(ttfb_d), "skillgate": summary(ttfb_g)},
        "ttfb_overhead_ms": summary([g - d for g, d in zip(ttfb_g, ttfb_d, strict=True)]),
        "ttfb_stages_ms": stage_split(gate, stamps),
        "ttft_ms": {"direct": summary(ttft_d), "skillgate": summary(ttft_g)},
        "per_chunk_overhead_ms": summary(per_chunk),
        "last_delta_overhead_ms": summary(last_over),
        "total_overhead_ms": summary(total_over),
        "control_nonstreamed_overhead_ms": summary(control),
        "kafka_chunk_messages_per_stream": round(chunks / args.calls, 1),
        "sse_events_per_stream": round(frames / args.calls, 1),
    }


def warm_up(stack: Stack, seconds: float) -> None:
    """Non-streamed load through skillgate before anything is measured (see
    :func:`bench.loadgen.warm_up_stack`); the stream path's own warm-up calls come after."""
    headers = {**HEADERS, "x-api-key": stack.token("bench", ["eng"])}
    print(f"warming the stack up for {seconds:g} s (not counted) ...", end=" ", flush=True)
    warm = warm_up_stack(
        Target("skillgate", f"{stack.ingress_url}/v1/messages", headers), PLAIN_BODY, seconds
    )
    print(f"{warm.successes} calls, {sum(warm.errors.values())} errors", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Start a stack, measure, print and save the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=100, help="streamed calls per path")
    parser.add_argument("--warmup", type=int, default=10, help="calls per path before measuring")
    parser.add_argument(
        "--stack-warmup",
        type=float,
        default=20.0,
        help="seconds of non-streamed load (8 connections) through skillgate after the stack "
        "starts, not counted: Kafka's broker is slow until the JVM has compiled it (0 skips it)",
    )
    parser.add_argument(
        "--deltas", type=int, default=64, help="text deltas per streamed answer (8 chars each)"
    )
    parser.add_argument("--delay-ms", type=float, default=2.0, help="stub delay between two deltas")
    parser.add_argument(
        "--relay-only",
        action="store_true",
        help="a bundle that masks and checks nothing: measures the pure relay (no hold-back)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    data = Path(tempfile.mkdtemp(prefix="skillgate-bench-stream-"))
    env = {"SKILLGATE_LOG_LEVEL": "WARNING", "SKILLGATE_STUB_MAX_RECORDED": "0"}
    if args.relay_only:
        bundle = data / "relay-only.yaml"
        bundle.write_text('name: bench-relay\nversion: "1"\ndefault_action: allow\nrules: []\n')
        env["SKILLGATE_POLICY_BUNDLE"] = str(bundle)
    stack = Stack(data_dir=data, ports=StackPorts.free(), extra_env=env)
    try:
        stack.start()
        if args.stack_warmup > 0:
            warm_up(stack, args.stack_warmup)
        result = asyncio.run(run(stack, args))
    finally:
        stack.stop()
    print(json.dumps(result, indent=2))
    print("where the first byte's time goes (p50 / p99 ms, from the events' own time stamps):")
    for stage, spread in result["ttfb_stages_ms"].items():
        print(f"  {stage:45s} {spread['p50']:7.2f} / {spread['p99']:7.2f}")
    verdict = "met" if result["ttfb_overhead_ms"]["p50"] < 15.0 else "MISSED"
    print(f"TTFB overhead p50 {result['ttfb_overhead_ms']['p50']} ms (target < 15 ms: {verdict})")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"streaming-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(
        json.dumps({"result": result, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2)
    )
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
