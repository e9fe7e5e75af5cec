"""Summaries of one measured window: throughput and latency percentiles from all samples.

Percentiles use the nearest-rank definition on the full, sorted list of latencies (no binning, no
averaging of per-worker or per-interval percentiles), so p99 is a latency that 99 % of the
successful calls in the window did not exceed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PERCENTILES: tuple[float, ...] = (50.0, 95.0, 99.0)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of ``sorted_values`` (ascending, not empty), ``0 < pct <= 100``."""
    if not sorted_values:
        raise ValueError("percentile of no samples")
    if not 0.0 < pct <= 100.0:
        raise ValueError(f"percentile out of range: {pct}")
    rank = math.ceil(pct / 100.0 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


@dataclass
class Measurement:
    """What one path delivered at one concurrency level, counting only the measured window.

    Load generators that time each call themselves fill ``latencies_ms`` (one entry per
    successful call); ``wrk`` fills ``tool_percentiles_ms`` instead (computed by wrk from all of
    its samples, which include non-200 answers) and ``tool_mean_ms`` / ``tool_max_ms``.
    """

    successes: int
    errors: Counter[str]
    window_s: float
    client_cpu_s: float
    latencies_ms: list[float] = field(default_factory=list)
    tool_percentiles_ms: Mapping[float, float] | None = None
    tool_mean_ms: float | None = None
    tool_max_ms: float | None = None


@dataclass(frozen=True)
class Summary:
    """Throughput and latency of one path at one concurrency level (JSON-friendly)."""

    successes: int
    errors: int
    error_kinds: dict[str, int]
    window_s: float
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    client_cpu_pct: float

    def pcts(self) -> str:
        """``p50/p95/p99`` in milliseconds, for the table."""
        if self.p50_ms is None or self.p95_ms is None or self.p99_ms is None:
            return "-"
        return f"{self.p50_ms:.2f}/{self.p95_ms:.2f}/{self.p99_ms:.2f}"


def summarize(m: Measurement) -> Summary:
    """Reduce a measurement to rps (successes only) and percentiles over every sample."""
    rps = m.successes / m.window_s if m.window_s > 0 else 0.0
    p: dict[float, float | None] = dict.fromkeys(PERCENTILES)
    mean: float | None = None
    top: float | None = None
    if m.tool_percentiles_ms is not None:
        p.update({q: m.tool_percentiles_ms.get(q) for q in PERCENTILES})
        mean, top = m.tool_mean_ms, m.tool_max_ms
    elif m.latencies_ms:
        ordered = sorted(m.latencies_ms)
        p = {q: percentile(ordered, q) for q in PERCENTILES}
        mean, top = math.fsum(ordered) / len(ordered), ordered[-1]
    return Summary(
        successes=m.successes,
        errors=sum(m.errors.values()),
        error_kinds=dict(m.errors.most_common()),
        window_s=m.window_s,
        rps=rps,
        p50_ms=p[50.0],
        p95_ms=p[95.0],
        p99_ms=p[99.0],
        mean_ms=mean,
        max_ms=top,
        client_cpu_pct=100.0 * m.client_cpu_s / m.window_s if m.window_s > 0 else 0.0,
    )
