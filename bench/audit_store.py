"""Audit-store benchmark: recorder ingest, keyword search and session timelines over 1M+ calls.

    .venv/bin/python -m bench.audit_store --calls 1000000

Generates conversations of up to four turns (each turn resends the conversation, so sessions are
found by conversation hash, the way the recorder finds them in production), three events per
forwarded call (submitted, decided, completed) and two per denied call, and feeds them to
:meth:`AuditStore.prepare_batch` / :meth:`AuditStore.write_batch` in batches of ``--batch-events``,
pipelined like the recorder's consumer (each batch prepared while the previous one is written) —
the recorder's own insert path (call_parts, events with dedup check, call_records with the text
indexes and usage views, signed checkpoints), minus Kafka. Event generation is timed apart from
the inserts and never overlaps them.

The process tunes its garbage collector the way the recorder service does
(:func:`services.recorder.main.tune_gc`). ``--dir D --reuse`` measures the queries again on a store
a previous run left in ``D`` (with ``--dir``), without ingesting: e.g. on a quieter machine.

Then, on the store as ingested (no OPTIMIZE):
* keyword search: ``search_calls(q=<a token that occurs in one call>)`` over the whole store,
  and a common-word query, newest first, 50 per page;
* session timeline: ``session_timeline`` + the API's timeline document for random sessions.

Targets (issue 6): ingest >= 20,000 events/s, keyword search p50 < 100 ms, timeline < 50 ms.
Numbers are printed and written to bench/results/audit-<UTC time>.json; nothing asserts them.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.audit_events import conversations, records
from services.recorder import timeline
from services.recorder.config import ClickHouseSettings, RecorderSettings, RetentionSettings
from services.recorder.handlers import SourceRecord
from services.recorder.main import tune_gc
from services.recorder.search import CallSearch
from services.recorder.store import AuditStore, PreparedBatch

PARTITIONS = 6
RESULTS = Path(__file__).parent / "results"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 2),
        "p90_ms": round(_pct(values, 0.9), 2),
        "p99_ms": round(_pct(values, 0.99), 2),
        "max_ms": round(max(values), 2),
    }


def store_pipelined(store: AuditStore, batches: list[list[SourceRecord]]) -> float:
    """Store ``batches`` the way the recorder's consumer does; returns the seconds it took.

    Each batch is prepared while the previous one is written (one write in flight), and the
    time runs until the last write is done: nothing else overlaps the measured work.
    """
    started = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="writer") as writer:
        writing: Future[Any] | None = None
        previous: PreparedBatch | None = None
        for batch in batches:
            prepared = store.prepare_batch(batch, after=previous)
            if writing is not None:
                writing.result()
            writing, previous = writer.submit(store.write_batch, prepared), prepared
        if writing is not None:
            writing.result()
    return time.perf_counter() - started


def ingest(
    store: AuditStore, calls: int, batch_events: int, seed: int, chunk_batches: int = 20
) -> dict[str, Any]:
    """Insert ``calls`` synthetic calls; returns counts, timings and samples to query.

    Events are generated ``chunk_batches`` batches at a time, then stored with nothing else
    running (:func:`store_pipelined`), so generating never hides behind a write in flight.
    """
    start_us = (time.time_ns() // 1000) - 30 * 86_400_000_000
    spacing = max(1, (30 * 86_400_000_000) // max(calls, 1))
    offsets = [0] * PARTITIONS
    pending: list[SourceRecord] = []
    chunk: list[list[SourceRecord]] = []
    insert_s = gen_s = 0.0
    events = 0
    tokens: list[str] = []
    sessions: list[str] = []
    rng = random.Random(seed + 1)
    gen_started = time.perf_counter()
    specs = conversations(seed, start_us, calls, spacing_us=spacing)
    for n, spec in enumerate(specs, start=1):
        partition = n % PARTITIONS
        for record in records(spec, partition, offsets[partition]):
            pending.append(record)
            offsets[partition] += 1
        if rng.random() < 0.0005:
            tokens.append(str(spec.messages[-1]["content"]).rsplit(" ", 1)[-1])
        if len(spec.messages) == 1 and rng.random() < 0.0005:
            sessions.append(spec.call_id)
        if len(pending) >= batch_events or n == calls:
            chunk.append(pending)
            pending = []
        if chunk and (len(chunk) >= chunk_batches or n == calls):
            gen_s += time.perf_counter() - gen_started
            insert_s += store_pipelined(store, chunk)
            before = events
            events += sum(len(batch) for batch in chunk)
            chunk = []
            if events // 300_000 > before // 300_000:
                print(f"  {n:>9,} calls  {events / insert_s:,.0f} events/s so far", flush=True)
            gen_started = time.perf_counter()
    return {
        "calls": calls,
        "events": events,
        "insert_seconds": round(insert_s, 2),
        "generate_seconds": round(gen_s, 2),
        "events_per_second": round(events / insert_s),
        "calls_per_second": round(calls / insert_s),
        "tokens": tokens,
        "sessions": sessions,
    }


def measure(store: AuditStore, tokens: list[str], sessions: list[str], repeat: int) -> dict[str, Any]:
    """Search and timeline latencies (ms) on the ingested store."""
    rare: list[float] = []
    hits: list[int] = []
    for token in tokens[:repeat]:
        started = time.perf_counter()
        rows, _ = store.search_calls(CallSearch(q=token, limit=50))
        rare.append((time.perf_counter() - started) * 1000)
        hits.append(len(rows))
    common: list[float] = []
    for word in ("kubernetes registry", "revenue europe", "memory leak", "postmortem"):
        started = time.perf_counter()
        store.search_calls(CallSearch(q=word, limit=50))
        common.append((time.perf_counter() - started) * 1000)
    user: list[float] = []
    for i in range(min(repeat, 20)):
        started = time.perf_counter()
        store.search_calls(CallSearch(user=f"user-{i:03d}", limit=50))
        user.append((time.perf_counter() - started) * 1000)
    timelines: list[float] = []
    sizes: list[int] = []
    for session in sessions[:repeat]:
        started = time.perf_counter()
        found = store.session_timeline(session)
        assert found is not None
        doc = timeline.document(session, found["calls"], found["events"])
        timelines.append((time.perf_counter() - started) * 1000)
        sizes.append(len(doc["calls"]))
    return {
        "keyword_search_rare_token": _summary(rare) | {"avg_hits": statistics.mean(hits) if hits else 0},
        "keyword_search_common_words": _summary(common),
        "search_by_user": _summary(user),
        "session_timeline": _summary(timelines) | {"avg_calls": statistics.mean(sizes) if sizes else 0},
    }


def samples(store: AuditStore, repeat: int) -> tuple[list[str], list[str]]:
    """Rare tokens and first-turn sessions to query, picked from a store a previous run left."""
    tokens = store.query(
        "SELECT extract(request_body, 'ticket[0-9]+') AS t FROM call_records "  # noqa: S608
        f"WHERE t != '' ORDER BY cityHash64(call_id) LIMIT {int(repeat)}",
        max_seconds=120,
    ).rows
    sessions = store.query(
        "SELECT session_id FROM call_records WHERE session_source = 'call' "  # noqa: S608
        f"ORDER BY cityHash64(call_id) LIMIT {int(repeat)}",
        max_seconds=120,
    ).rows
    return [str(t) for (t,) in tokens], [str(s) for (s,) in sessions]


def main() -> None:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument(
        "--batch-events",
        type=int,
        default=RecorderSettings.model_fields["batch_max_events"].default,
        help="events per insert (the recorder's default)",
    )
    parser.add_argument("--repeat", type=int, default=50, help="queries per latency figure")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--dir", type=Path, default=None, help="store directory (default: a temp dir, removed)"
    )
    parser.add_argument("--reuse", action="store_true", help="measure queries on --dir without ingesting")
    args = parser.parse_args()
    tune_gc()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="skillgate-audit-bench-"))
    store = AuditStore(ClickHouseSettings(url=f"chdb://{directory / 'audit.chdb'}"), directory, b"k" * 32)
    try:
        store.migrate()
        store.apply_retention(RetentionSettings())
        ing: dict[str, Any]
        if args.reuse:
            tokens, sessions = samples(store, args.repeat)
            ing = {"reused": str(directory)}
        else:
            print(f"ingesting {args.calls:,} calls into {directory} ...", flush=True)
            ing = ingest(store, args.calls, args.batch_events, args.seed)
            tokens, sessions = ing.pop("tokens"), ing.pop("sessions")
        rows = store.query("SELECT count() FROM call_records FINAL", max_seconds=120).rows[0][0]
        parts = store.query("SELECT count() FROM call_records", max_seconds=120).rows[0][0]
        if not args.reuse:
            print(f"ingested {ing['events']:,} events in {ing['insert_seconds']} s: "
                  f"{ing['events_per_second']:,} events/s ({ing['calls_per_second']:,} calls/s)")  # fmt: skip
        print(f"call_records {rows:,} calls ({parts:,} row versions)", flush=True)
        lat = measure(store, tokens, sessions, args.repeat)
        for name, figures in lat.items():
            print(f"{name:30} {orjson.dumps(figures).decode()}")
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        result = {
            "bench": "audit_store",
            "at": datetime.now(UTC).isoformat(),
            "ingest": ing,
            "load_average": os.getloadavg(),
            "latency": lat,
            "call_records": rows,
            "call_record_versions": parts,
            "store_bytes": size,
            "targets": {"ingest_events_per_second": 20000, "search_p50_ms": 100, "timeline_ms": 50},
        }
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"audit-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
        out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        print(f"store size {size / 1e9:.2f} GB; results in {out}")
    finally:
        store.close()
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
