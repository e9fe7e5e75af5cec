"""Record lag at a steady call rate: event produced → row queryable in the audit store.

    .venv/bin/python -m bench.audit_lag --rate 500 --seconds 60               # through Kafka
    .venv/bin/python -m bench.audit_lag --rate 500 --seconds 60 --store-only  # the store alone
    .venv/bin/python -m bench.audit_lag --backlog 50000                       # catch-up rate

Calls arrive at ``--rate`` per second, three events each (submitted, decided, completed, with
1-2 KB bodies), each stamped with the time it is produced.

**Through Kafka** (the default; what issue 6 asks): a local Kafka broker (our script) and the real
recorder service (``skillgate recorder``, embedded chDB) are started; the events are produced to
the recorder's topics, Avro-encoded and keyed by session like the services do. Two measurements:

* the recorder's own metric ``skillgate_recorder_record_lag_seconds`` (event time → the insert
  that makes it queryable returned), read from its ``/metrics`` after the run: p50/p99 are the
  histogram bucket bounds, the mean is exact;
* an independent probe from outside: every ``--probe-every``-th call is polled through the
  recorder's ``GET /v1/calls/{id}`` (as an auditor) every 50 ms until it shows ``completed``; its
  lag is from producing its CallCompleted to the first answer that shows it (at most 50 ms late).

**Store only**: the same events are collected for ``--batch-seconds`` (the recorder's
``SKILLGATE_RECORDER_BATCH_MAX_SECONDS``) and inserted with :meth:`AuditStore.insert_batch`,
without Kafka, the consumer's decoding or the API: the store's share of the lag. When inserts take
longer than the batch window the loop falls behind and the lag grows without bound: that is the
capacity limit showing.

**Backlog** (``--backlog N``): the recorder's ingest through Kafka. N calls are produced while
the recorder is stopped, then it is started and timed from its first insert until every event
is stored (events/s, and the cores the recorder used meanwhile): consuming, decoding, preparing,
inserting and committing, with only the broker beside it.

Numbers go to stdout and ``bench/results/audit-lag-<UTC time>.json``; nothing asserts them.
Target (issue 6): under 2 s at 500 calls/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import orjson

from bench.audit_events import conversations, records
from bench.procstat import cpu_seconds, peak_rss_mib
from services.cli.stack import Stack, StackPorts
from services.recorder.config import ClickHouseSettings, RetentionSettings
from services.recorder.handlers import SourceRecord
from services.recorder.store import AuditStore
from skillgate.codec import default_codec
from skillgate.config import KafkaSettings
from skillgate.kafka import make_producer

RESULTS = Path(__file__).parent / "results"


def store_only(args: argparse.Namespace) -> dict[str, Any]:
    """The store's share of the lag: batches inserted straight into a chDB store."""
    directory = Path(tempfile.mkdtemp(prefix="skillgate-audit-lag-"))
    store = AuditStore(ClickHouseSettings(url=f"chdb://{directory / 'audit.chdb'}"), directory, b"k" * 32)
    lags: list[float] = []
    inserts: list[float] = []
    try:
        store.migrate()
        store.apply_retention(RetentionSettings())
        total = int(args.rate * args.seconds)
        start = time.time()
        specs = conversations(11, int(start * 1e6), total, spacing_us=int(1e6 / args.rate))
        pending: list[SourceRecord] = []
        created: list[float] = []
        window_end = start + args.batch_seconds
        for offset, spec in enumerate(specs):
            due = spec.time_us / 1e6
            if due >= window_end:
                # The batch window closed: insert what arrived in it.
                if pending:
                    began = time.perf_counter()
                    store.insert_batch(pending)
                    inserts.append(time.perf_counter() - began)
                    finished = time.time()
                    lags.extend(finished - c for c in created)
                pending, created = [], []
                window_end = max(window_end + args.batch_seconds, time.time())
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)  # pacing the generator to the target rate (not synchronisation)
            for rec in records(spec, offset % 6, offset):
                # Stamped when actually produced (the generator may run late under load).
                now_us = time.time_ns() // 1000
                event = dict(rec.event) | {"time": now_us}
                pending.append(SourceRecord(rec.topic, rec.partition, rec.offset, rec.event_type, event))
                created.append(now_us / 1e6)
        if pending:
            store.insert_batch(pending)
            lags.extend(time.time() - c for c in created)
        elapsed = time.time() - start
        ordered = sorted(lags)
        return {
            "bench": "audit_lag",
            "mode": "store-only",
            "at": datetime.now(UTC).isoformat(),
            "target_calls_per_second": args.rate,
            "achieved_calls_per_second": round(total / elapsed, 1),
            "events": len(lags),
            "batch_seconds": args.batch_seconds,
            "lag_p50_s": round(statistics.median(ordered), 3),
            "lag_p99_s": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
            "lag_max_s": round(ordered[-1], 3),
            "insert_p50_s": round(statistics.median(inserts), 3),
            "insert_max_s": round(max(inserts), 3),
        }
    finally:
        store.close()
        shutil.rmtree(directory, ignore_errors=True)


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Metrics:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    out: Metrics = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, cast(tuple[tuple[str, str], ...], ())
        if "{" in head:
            name = head[: head.index("{")]
            pairs = head[head.index("{") + 1 : head.rindex("}")].split(",")
            labels = tuple(
                sorted(
                    (k.strip(), v.strip().strip('"')) for k, _, v in (p.partition("=") for p in pairs) if k
                )
            )
        out[(name, labels)] = float(value)
    return out


def _minus(after: Metrics, before: Metrics) -> Metrics:
    """What happened between two scrapes (counters and histograms only grow)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _total(metrics: Metrics, name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def _mean(metrics: Metrics, name: str) -> float | None:
    count = _total(metrics, f"{name}_count")
    return round(_total(metrics, f"{name}_sum") / count, 3) if count else None


def _histogram_quantile(metrics: Metrics, name: str, q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` of a Prometheus histogram."""
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (n, labels), value in metrics.items()
        if n == f"{name}_bucket" and dict(labels).get("le") not in (None, "+Inf")
    )
    total = _total(metrics, f"{name}_count")
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return float("inf")


def _scrape_when_stored(stack: Stack, events: float, timeout: float = 120) -> Metrics:
    """The recorder's metrics once it has stored ``events`` events (or at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = _parse(httpx.get(f"{stack.recorder_url}/metrics", timeout=5).text)
        if (
            _total(metrics, "skillgate_recorder_events_inserted_total") >= events
            or time.monotonic() > deadline
        ):
            return metrics
        time.sleep(0.2)  # polling a condition with a deadline


async def _probe(
    client: httpx.AsyncClient, url: str, token: str, produced: float, deadline: float
) -> float | None:
    """Seconds from ``produced`` until the call shows ``completed`` through the recorder's API."""
    while time.time() < deadline:
        try:
            response = await client.get(url, headers={"authorization": f"Bearer {token}"})
        except httpx.HTTPError:
            continue  # a slow answer is the recorder being busy: ask again
        if response.status_code == 200 and response.json().get("state") == "completed":
            return time.time() - produced
        await asyncio.sleep(0.05)  # polling interval of a condition with a deadline
    return None


async def _produce(
    args: argparse.Namespace, stack: Stack, prefix: str, total: int, seed: int, probe_every: int
) -> dict[str, Any]:
    """Produce the calls at the target rate; the probes' lags (every ``probe_every``-th call is
    probed through the recorder's API; 0: none).

    Every message is encoded before the clock starts, stamped with the time it is due: the load
    generator then only sends, so it takes as little CPU from the recorder and Kafka as it can
    (this machine has two cores). A message sent late keeps its due time, so lateness of the
    generator counts as lag, never the other way round.
    """
    kafka = KafkaSettings(bootstrap=stack.kafka.bootstrap if stack.kafka else "", topic_prefix=prefix)
    producer = make_producer(kafka)
    codec = default_codec()
    token = stack.token("lag-bench-auditor", ["auditors"])
    began = time.time() + 3.0 + total * 60e-6  # encoding takes ~50 us per call
    planned: list[tuple[float, str | None, list[tuple[str, bytes, bytes]]]] = []
    for n, spec in enumerate(conversations(seed, int(began * 1e6), total, spacing_us=int(1e6 / args.rate))):
        due = spec.time_us / 1e6
        messages = [
            (
                rec.topic,
                codec.encode(rec.event_type, dict(rec.event) | {"time": spec.time_us}),
                spec.session_id.encode(),
            )
            for rec in records(spec, topic_prefix=prefix.rstrip("."))
        ]
        probe = spec.call_id if probe_every and n % probe_every == 0 and spec.decision == "allow" else None
        planned.append((due, probe, messages))
    late = max(0.0, time.time() - began)
    await producer.start()
    probes: list[asyncio.Task[float | None]] = []
    events = 0
    try:
        async with httpx.AsyncClient(base_url=stack.recorder_url, timeout=5.0) as client:
            pending: list[asyncio.Future[Any]] = []
            for due, probe, messages in planned:
                wait = due - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # pacing the producer to the target rate
                for topic, value, key in messages:
                    pending.append(await producer.send(topic, value, key=key))
                    events += 1
                if probe is not None:
                    url = f"/v1/calls/{probe}"
                    probes.append(asyncio.create_task(_probe(client, url, token, due, due + 30)))
                if len(pending) > 1000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
            elapsed = time.time() - began
            probed = [p for p in await asyncio.gather(*probes) if p is not None]
    finally:
        await producer.stop()
    return {
        "calls": total,
        "events": events,
        "produce_seconds": elapsed,
        "probe_lags": probed,
        "generator_late_s": round(late, 3),
    }


@contextlib.contextmanager
def _warm_recorder(args: argparse.Namespace, name: str) -> Iterator[tuple[Stack, str, Metrics]]:
    """Kafka and the recorder service on free ports, warmed up with ``--warmup-calls`` (the
    consumer has joined its group, topics and parts exist); yields the stack, its topic prefix
    and the recorder's metrics after the warm-up, and removes it all afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=f"skillgate-audit-{name}-"))
    prefix = f"{name}bench{int(time.time())}."
    stack = Stack(directory, StackPorts.free(), topic_prefix=prefix, use_stub=False)
    try:
        stack.start(services=("recorder",))
        warm = asyncio.run(_produce(args, stack, prefix, args.warmup_calls, 5, 0))
        yield stack, prefix, _scrape_when_stored(stack, warm["events"])
    finally:
        stack.stop()
        shutil.rmtree(directory, ignore_errors=True)


def through_kafka(args: argparse.Namespace) -> dict[str, Any]:
    """The full lag: produced to Kafka, consumed, inserted and queryable, measured twice.

    A warm-up of ``--warmup-calls`` first (the consumer joins its group, topics and parts
    exist); the recorder's metrics are scraped after it and again after the run, and only the
    difference is reported.
    """
    with _warm_recorder(args, "lag") as (stack, prefix, before):
        stored_before = _total(before, "skillgate_recorder_events_inserted_total")
        total = int(args.rate * args.seconds)
        produced = asyncio.run(_produce(args, stack, prefix, total, 11, args.probe_every))
        after = _scrape_when_stored(stack, stored_before + produced["events"])
        run = _minus(after, before)
        metric = "skillgate_recorder_record_lag_seconds"
        probe = sorted(produced["probe_lags"])
        return {
            "bench": "audit_lag",
            "mode": "through-kafka",
            "at": datetime.now(UTC).isoformat(),
            "load_average": os.getloadavg(),
            "target_calls_per_second": args.rate,
            "achieved_calls_per_second": round(produced["calls"] / produced["produce_seconds"], 1),
            "events_produced": produced["events"],
            "generator_started_late_s": produced["generator_late_s"],
            "events_stored": int(_total(run, "skillgate_recorder_events_inserted_total")),
            "metric_lag_p50_le_s": _histogram_quantile(run, metric, 0.5),
            "metric_lag_p90_le_s": _histogram_quantile(run, metric, 0.9),
            "metric_lag_p99_le_s": _histogram_quantile(run, metric, 0.99),
            "metric_lag_mean_s": _mean(run, metric),
            "recorder_batches": int(_total(run, "skillgate_recorder_insert_seconds_count")),
            "recorder_batch_size_mean": _mean(run, "skillgate_recorder_batch_size"),
            "recorder_insert_seconds_mean": _mean(run, "skillgate_recorder_insert_seconds"),
            "probe_calls": len(probe),
            "probe_lag_p50_s": round(statistics.median(probe), 3) if probe else None,
            "probe_lag_p99_s": round(probe[int(0.99 * (len(probe) - 1))], 3) if probe else None,
            "probe_lag_max_s": round(probe[-1], 3) if probe else None,
        }


def backlog(args: argparse.Namespace) -> dict[str, Any]:
    """The recorder catching up on ``--backlog`` calls already in Kafka: its ingest through
    Kafka (consuming, decoding, preparing, inserting, committing) with no producer competing
    for the two cores.

    After a warm-up the recorder is stopped, the calls are produced as fast as the producer
    goes, and the recorder is started again; the rate counts from its first insert to the
    insert that stores the last event, so its start (migrations, joining the group) is
    reported apart.
    """
    with _warm_recorder(args, "backlog") as (stack, prefix, _):
        stack.stop_service("recorder")
        flood = argparse.Namespace(**{**vars(args), "rate": 1e6})  # every call due at once
        produced = asyncio.run(_produce(flood, stack, prefix, args.backlog, 11, 0))
        total = produced["events"]
        started = time.monotonic()
        stack.start_service("recorder")
        pid = stack.procs["recorder"].pid
        broker = stack.kafka.proc.pid if stack.kafka is not None and stack.kafka.proc is not None else None

        def sample(at: float, stored: float) -> tuple[float, float, float, float]:
            """(time, events stored, recorder CPU s, broker CPU s)"""
            return at, stored, cpu_seconds(pid), cpu_seconds(broker) if broker else 0.0

        samples = [sample(started, 0.0)]
        metrics: Metrics = {}
        deadline = started + args.backlog_timeout
        while time.monotonic() < deadline and stack.procs["recorder"].poll() is None:
            try:
                metrics = _parse(httpx.get(f"{stack.recorder_url}/metrics", timeout=5).text)
            except httpx.HTTPError:
                pass  # still starting, or too busy to answer in time: ask again
            else:
                stored = _total(metrics, "skillgate_recorder_events_inserted_total")
                samples.append(sample(time.monotonic(), stored))
                if stored >= total:
                    break
            time.sleep(0.5)  # polling a condition with a deadline (scrapes cost the recorder CPU)
        peak_rss = peak_rss_mib(pid) if stack.procs["recorder"].poll() is None else None
        last = samples[-1]
        first = next((s for s in samples if s[1] > 0), last)
        span = last[0] - first[0]
        return {
            "bench": "audit_backlog",
            "at": datetime.now(UTC).isoformat(),
            "load_average": os.getloadavg(),
            "calls": args.backlog,
            "events_produced": total,
            "events_stored": int(last[1]),
            "complete": last[1] >= total,
            "recorder_start_to_first_insert_s": round(first[0] - started, 2) if first[1] > 0 else None,
            "catch_up_s": round(span, 2),
            "events_per_second": round((last[1] - first[1]) / span) if span > 0 else None,
            "recorder_cores": round((last[2] - first[2]) / span, 2) if span > 0 else None,
            "broker_cores": round((last[3] - first[3]) / span, 2) if span > 0 and broker else None,
            "recorder_batch_size_mean": _mean(metrics, "skillgate_recorder_batch_size"),
            "recorder_peak_rss_mib": round(peak_rss) if peak_rss is not None else None,
        }


def main() -> None:
    """Run the steady-rate lag measurement and print it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="calls per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch-seconds", type=float, default=0.25, help="store-only: batch window")
    parser.add_argument("--probe-every", type=int, default=250, help="poll every n-th call through the API")
    parser.add_argument("--warmup-calls", type=int, default=200, help="calls before the measured run")
    parser.add_argument("--store-only", action="store_true", help="insert into chDB directly, no Kafka")
    parser.add_argument(
        "--backlog", type=int, default=0, help="calls produced first, then timed as the recorder catches up"
    )
    parser.add_argument(
        "--backlog-timeout", type=float, default=600.0, help="seconds to wait for the catch-up"
    )
    args = parser.parse_args()
    run = backlog if args.backlog else store_only if args.store_only else through_kafka
    result = run(args)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"audit-lag-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
