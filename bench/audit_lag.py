"""Store-side record lag at a steady call rate: event created → row queryable.

    .venv/bin/python -m bench.audit_lag --rate 500 --seconds 60

Calls arrive at ``--rate`` per second (three events each: submitted, decided, completed, stamped
with their creation time). Like the recorder's consumer, events are collected for
``--batch-seconds`` (the recorder's ``SKILLGATE_RECORDER_BATCH_MAX_SECONDS``, 0.25 s) and then
inserted with :meth:`AuditStore.insert_batch` (events, call_parts, call_records with the text
indexes, usage views, signed checkpoints). The lag of an event is the time from its creation to
the end of the insert that makes it queryable. When inserts take longer than the batch window the
loop falls behind and the lag grows without bound: that is the capacity limit showing.

Not measured here: the Kafka hops before the recorder (about 1-2 ms each on loopback, see
DESIGN.md) and the consumer's decoding. The recorder exports the full lag
(``skillgate_recorder_record_lag_seconds``) in production.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench.audit_events import conversations, records
from services.recorder.config import ClickHouseSettings, RetentionSettings
from services.recorder.handlers import SourceRecord
from services.recorder.store import AuditStore

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """Run the steady-rate lag measurement and print it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="calls per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch-seconds", type=float, default=0.25)
    args = parser.parse_args()
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
        result = {
            "bench": "audit_lag",
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
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"audit-lag-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
        out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    finally:
        store.close()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
