"""One bare Kafka hop on this machine: ``python -m bench.kafka_hop``.

What every latency figure of skillgate sits on: a streamed call's first byte crosses three topics
(calls.submitted, calls.decided, the chunk on calls.replies) plus the forwarder's claim
acknowledgement. This starts our own local Kafka (``skillgate.localkafka``, the broker the stack
and the tests use), creates a one-partition topic, and ``--messages`` times produces one 1 KB
message with the services' producer settings (idempotent, ``acks=all``, ``linger_ms=0``) and waits
until a consumer with the services' consumer settings has it. Reported: p50 / p90 / p99 of
produce → consumed, in ms.

DESIGN.md measured 1.2-1.6 ms p50 on this kind of machine; on the shared development machine the
figure moves with the minute, which is why the latency benchmarks are read next to it. Numbers
are printed and written to ``bench/results/kafka-hop-<UTC time>.json``; nothing asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from skillgate.config import KafkaSettings
from skillgate.kafka import make_consumer, make_producer
from skillgate.localkafka import LocalKafka, free_port

RESULTS = Path(__file__).parent / "results"
TOPIC = "bench.hop"


async def measure(bootstrap: str, messages: int) -> list[float]:
    """Produce-to-consume times (ms) of ``messages`` messages sent one at a time."""
    settings = KafkaSettings(bootstrap=bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = make_producer(settings)
    consumer = make_consumer(settings, None, TOPIC, auto_offset_reset="latest", fetch_max_wait_ms=100)
    await producer.start()
    await consumer.start()
    try:
        await producer.send_and_wait(TOPIC, b"warm-up")
        await consumer.getmany(timeout_ms=1000)
        value = b"x" * 1024
        times: list[float] = []
        for _ in range(messages):
            started = time.perf_counter()
            await producer.send(TOPIC, value)
            got = 0
            while not got:
                batches = await consumer.getmany(timeout_ms=1000)
                got = sum(len(records) for records in batches.values())
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        await consumer.stop()
        await producer.stop()


def main() -> None:
    """Start Kafka, measure, print and save."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=500)
    args = parser.parse_args()
    kafka = LocalKafka(Path(tempfile.mkdtemp(prefix="skillgate-hop-")) / "kafka", port=free_port())
    kafka.start()
    try:
        times = asyncio.run(measure(kafka.bootstrap, args.messages))
    finally:
        kafka.stop()
    ordered = sorted(times)
    result = {
        "bench": "kafka_hop",
        "messages": len(times),
        "p50_ms": round(statistics.median(times), 2),
        "p90_ms": round(ordered[int(0.9 * len(ordered))], 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
    }
    print(json.dumps(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"kafka-hop-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json").write_text(
        json.dumps(result, indent=2)
    )


if __name__ == "__main__":
    main()
