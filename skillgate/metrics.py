"""Prometheus metrics shared by the services.

HTTP services mount :func:`metrics_app` at ``/metrics``; the Kafka-only services (policy,
forwarder) serve the same registry on their own metrics port via :func:`serve`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)

EVENTS_CONSUMED = Counter(
    "skillgate_events_consumed_total", "Events consumed from Kafka", ["service", "topic"]
)
EVENTS_PRODUCED = Counter("skillgate_events_produced_total", "Events produced to Kafka", ["service", "topic"])
DEAD_LETTERS = Counter("skillgate_dead_letters_total", "Messages sent to the dead-letter topic", ["service"])
STAGE_SECONDS = Histogram(
    "skillgate_stage_seconds",
    "Time spent in one processing stage",
    ["service", "stage"],
    buckets=LATENCY_BUCKETS,
)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` on a port of its own (for services without an HTTP API)."""
    start_http_server(port, addr=host)


def render() -> tuple[bytes, str]:
    """The current metrics in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def labels(**kw: Any) -> dict[str, str]:
    """Label values as strings."""
    return {k: str(v) for k, v in kw.items()}
