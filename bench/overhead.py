"""How much skillgate adds to a Messages API call: ``python -m bench.overhead`` (``make bench``).

Starts the whole local stack (real Kafka, dev OIDC issuer, stub upstream at 0 ms, ingress, policy,
forwarder, recorder) as :class:`services.cli.stack.Stack` does for ``make run``, then, for each
concurrency level, runs the same closed-loop load twice with the same client, body and durations:

* **direct**: ``POST /v1/messages`` straight to the stub (``x-api-key``): the baseline of what this
  machine, this client and the stub can do;
* **skillgate**: the same call through the ingress with a dev-issuer token, so it is
  authenticated, decided by policy, forwarded, answered over Kafka and recorded.

It prints a table, the CPU each component used, the errors found in the services' logs, and whether
the targets of DESIGN.md ("Performance targets") are met; the same goes to
``bench/results/overhead-<UTC timestamp>.json``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from unittest import mock

import httpx

import services.cli.stack as stack_module
from bench.loadgen import (
    STACK_WARMUP_CONCURRENCY,
    TOOLS,
    LoadSpec,
    Target,
    client_description,
    run_load,
    warm_up_stack,
    wrk_available,
)
from bench.procstat import CpuProbe, CpuUsage, machine_busy_now
from bench.stats import Summary, summarize
from services.cli.stack import Stack, StackPorts

DEFAULT_CONCURRENCY: tuple[int, ...] = (1, 8, 32, 64)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "claude-sonnet-4-5"
ANTHROPIC_VERSION = "2023-06-01"
_PAD = "The quick brown fox jumps over the lazy dog while the gateway checks every call. "

# Targets from DESIGN.md, "Performance targets" (2-core machine, stub at 0 ms, 1 KB body).
TARGET_RPS = 1000.0
TARGET_RPS_LEVELS = (8, 64)  # inclusive range of connections where the rps target applies
TARGET_P50_OVERHEAD_MS = 10.0
TARGET_P50_LEVEL = 1
TARGET_P99_MS = 60.0
TARGET_P99_LEVEL = 32

OTHER_CPU_WARN_PCT = 20.0  # other processes using this much of a core disturb a 2-core benchmark


# ----------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """What one benchmark run does."""

    concurrency: tuple[int, ...]
    duration_s: float
    warmup_s: float
    stack_warmup_s: float
    body_bytes: int
    tool: str
    timeout_s: float
    wrk_threads: int
    keep_data: bool
    results_dir: Path


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return levels


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """The command line (``--help`` describes every flag)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="Closed-loop load straight to the stub upstream and through skillgate; "
        "reports throughput, latency percentiles and the overhead per concurrency level.",
    )
    parser.add_argument(
        "--concurrency",
        type=_levels,
        default=DEFAULT_CONCURRENCY,
        help="comma-separated numbers of concurrent connections (default: 1,8,32,64)",
    )
    parser.add_argument(
        "--duration", type=_positive, default=10.0, help="measured seconds per level and path (default: 10)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of load before each measured window, not counted (default: 2)",
    )
    parser.add_argument(
        "--stack-warmup",
        type=float,
        default=10.0,
        help="seconds of load through skillgate once the stack is up, before the first level, "
        "not counted: a cold JVM (Kafka) and cold caches would otherwise distort the first "
        "level (default: 10; 0 to skip)",
    )
    parser.add_argument(
        "--body-bytes", type=int, default=1024, help="size of the Messages request body (default: 1024)"
    )
    parser.add_argument(
        "--tool",
        choices=TOOLS,
        default="asyncio",
        help="load generator: asyncio (uvloop + httptools, default), httpx, or wrk (if installed)",
    )
    parser.add_argument(
        "--timeout", type=_positive, default=30.0, help="seconds before a call counts as a timeout"
    )
    parser.add_argument(
        "--wrk-threads", type=int, default=1, help="wrk threads (--tool wrk only; default: 1)"
    )
    parser.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the stack's temporary data directory (Kafka data, service logs) after the run",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON report goes")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.stack_warmup < 0:
        parser.error("--warmup and --stack-warmup must be >= 0")
    if args.tool == "wrk" and wrk_available() is None:
        parser.error("--tool wrk: wrk is not installed (apt-get install -y wrk)")
    return Config(
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        stack_warmup_s=args.stack_warmup,
        body_bytes=args.body_bytes,
        tool=args.tool,
        timeout_s=args.timeout,
        wrk_threads=max(1, args.wrk_threads),
        keep_data=args.keep_data,
        results_dir=args.results_dir,
    )


def messages_body(size: int) -> bytes:
    """A valid Messages request of exactly ``size`` bytes (or the smallest valid one if larger).

    Compact JSON with the model, ``max_tokens`` and one user message whose text (plain ASCII
    sentences, nothing a masking rule would catch) pads the body to the size.
    """

    def render(text: str) -> bytes:
        body = {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": text}]}
        return json.dumps(body, separators=(",", ":")).encode()

    room = max(1, size - len(render("")))
    text = (_PAD * (room // len(_PAD) + 1))[:room]
    return render(text)


# ----------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, OS and Python of this machine."""
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gb: float | None = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "load_average_at_start": list(os.getloadavg()),
    }


def git_commit() -> str | None:
    """The checked-out commit (read-only ``git rev-parse``), or None without one."""
    git = shutil.which("git")
    if git is None:
        return None
    proc = subprocess.run(
        [git, "rev-parse", "--short", "HEAD"],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or None if proc.returncode == 0 else None


# ------------------------------------------------------------------------------------------- stack


def recorder_available() -> bool:
    """Whether ``services.recorder.main`` exists (the recorder may still be under construction)."""
    try:
        return importlib.util.find_spec("services.recorder.main") is not None
    except ModuleNotFoundError:
        return False


class _StackWithoutRecorder(Stack):
    """The stack minus the recorder: only for as long as ``services.recorder.main`` is missing."""

    def _wait_http(self, name: str, url: str, timeout: float = 90.0) -> None:
        if name == "recorder":
            return
        super()._wait_http(name, url, timeout)


@contextlib.contextmanager
def _services_without_recorder() -> Iterator[None]:
    """Temporarily drop "recorder" from the services :meth:`Stack.start` launches."""
    services = tuple(s for s in stack_module.SERVICES if s != "recorder")
    with mock.patch.object(stack_module, "SERVICES", services):
        yield


def _banner(lines: Sequence[str]) -> None:
    width = max(len(line) for line in lines) + 8
    print("\n" + "!" * width, flush=True)
    for line in lines:
        print(f"!!! {line.ljust(width - 8)} !!!", flush=True)
    print("!" * width + "\n", flush=True)


def start_stack(stack: Stack, with_recorder: bool) -> None:
    """Start ``stack``; without the recorder, launch the other services only."""
    if with_recorder:
        stack.start()
        return
    with _services_without_recorder():
        stack.start()


def _components(stack: Stack) -> dict[str, int]:
    """Process-group ids of the stack's parts (each child leads its own session)."""
    groups = {name: proc.pid for name, proc in stack.procs.items()}
    if stack.kafka is not None and stack.kafka.proc is not None:
        groups["kafka"] = stack.kafka.proc.pid
    return groups


def preflight(targets: Sequence[Target], body: bytes, timeout_s: float) -> None:
    """One call on each path: it must be a 200, or the benchmark would measure errors."""
    with httpx.Client(timeout=timeout_s) as client:
        for target in targets:
            response = client.post(target.url, content=body, headers=dict(target.headers))
            if response.status_code != 200:
                raise RuntimeError(
                    f"preflight: {target.name} answered {response.status_code}: {response.text[:500]}"
                )
            kind = response.json().get("type")
            if kind != "message":
                raise RuntimeError(f"preflight: {target.name} answered a {kind!r}, not a message")


# ------------------------------------------------------------------------------------------- logs


def _log_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / "logs").glob("*.log"))
    kafka_log = data_dir / "kafka" / "kafka.log"
    if kafka_log.exists():
        files.append(kafka_log)
    return files


def log_offsets(data_dir: Path) -> dict[str, int]:
    """Current size of every log file: what was written before this point is "startup"."""
    offsets: dict[str, int] = {}
    for path in _log_files(data_dir):
        with contextlib.suppress(OSError):
            offsets[str(path)] = path.stat().st_size
    return offsets


def scan_logs(data_dir: Path, run_from: dict[str, int], limit: int = 5) -> dict[str, dict[str, Any]]:
    """Error and warning lines per log file, split into startup and the benchmark run.

    ``run_from`` holds each file's size when the load started (:func:`log_offsets`); lines
    after it were written while (or after) the load ran. The first few error lines of each part
    are kept as samples.
    """
    report: dict[str, dict[str, Any]] = {}
    for path in _log_files(data_dir):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        split = run_from.get(str(path), len(raw))
        parts: dict[str, dict[str, Any]] = {}
        for part, chunk in (("startup", raw[:split]), ("run", raw[split:])):
            errors = warnings = 0
            samples: list[str] = []
            lines = chunk.decode(errors="replace").splitlines()
            for line in lines:
                level = _line_level(line)
                if level == "error":
                    errors += 1
                    if len(samples) < limit:
                        samples.append(line[:300])
                elif level == "warning":
                    warnings += 1
            parts[part] = {
                "lines": len(lines),
                "errors": errors,
                "warnings": warnings,
                "first_errors": samples,
            }
        report[path.stem] = {"path": str(path), **parts}
    return report


def _line_level(line: str) -> str | None:
    """``error``, ``warning`` or None for one log line (JSON service logs, or plain text)."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                level = str(record.get("level", "")).lower()
                if level in ("error", "critical", "exception", "fatal"):
                    return "error"
                return "warning" if level in ("warning", "warn") else None
    upper = line.upper()
    if "TRACEBACK" in upper or " ERROR " in upper or upper.startswith("ERROR") or " FATAL " in upper:
        return "error"
    if " WARN " in upper or " WARNING " in upper or upper.startswith("WARNING"):
        return "warning"
    return None


# ------------------------------------------------------------------------------------ measurements


@dataclass(frozen=True)
class PathResult:
    """One path at one level: the summary and the CPU the stack used meanwhile."""

    summary: Summary
    cpu: CpuUsage | None


@dataclass(frozen=True)
class LevelResult:
    """Both paths at one concurrency level."""

    concurrency: int
    direct: PathResult
    skillgate: PathResult

    def overhead_ms(self, attr: str) -> float | None:
        """Difference of one percentile (``p50_ms``...) between skillgate and direct."""
        a = getattr(self.skillgate.summary, attr)
        b = getattr(self.direct.summary, attr)
        return None if a is None or b is None else float(a - b)


def stack_warmup(config: Config, target: Target, body: bytes) -> Summary:
    """Load through skillgate once before the first level; nothing of it is reported as a result."""
    return summarize(
        warm_up_stack(
            target,
            body,
            config.stack_warmup_s,
            tool=config.tool,
            concurrency=min(STACK_WARMUP_CONCURRENCY, max(config.concurrency)),
            timeout_s=config.timeout_s,
            wrk_threads=config.wrk_threads,
        )
    )


def _with_client(usage: CpuUsage | None, summary: Summary) -> CpuUsage | None:
    """Charge the load generator's own CPU count to it (wrk has exited before ``/proc`` is read)."""
    if usage is None:
        return None
    missing = summary.client_cpu_pct - usage.load_generator_pct
    if missing <= 0:
        return usage
    return dataclasses.replace(
        usage,
        load_generator_pct=summary.client_cpu_pct,
        other_pct=max(0.0, usage.other_pct - missing),
    )


def measure(
    config: Config, stack: Stack, targets: Sequence[Target], body: bytes, setup: dict[str, Any]
) -> list[LevelResult]:
    """The stack warm-up (summary put in ``setup``), then every level: direct, then skillgate."""
    results: list[LevelResult] = []
    probe = CpuProbe(_components(stack))
    if config.stack_warmup_s > 0:
        skillgate = next(t for t in targets if t.name == "skillgate")
        print(
            f"  warming the stack up for {config.stack_warmup_s:g} s (not counted) ...", end=" ", flush=True
        )
        warm = stack_warmup(config, skillgate, body)
        print(f"{warm.successes} calls, {warm.errors} errors", flush=True)
        setup["stack_warmup"] = dataclasses.asdict(warm)
    for level in config.concurrency:
        spec = LoadSpec(
            concurrency=level,
            warmup_s=config.warmup_s,
            duration_s=config.duration_s,
            timeout_s=config.timeout_s,
        )
        per_path: dict[str, PathResult] = {}
        for target in targets:
            print(f"  c={level:<4} {target.name:<9} ...", end=" ", flush=True)
            measurement = run_load(config.tool, target, body, spec, probe, config.wrk_threads)
            summary = summarize(measurement)
            per_path[target.name] = PathResult(summary, _with_client(probe.usage, summary))
            errors = f", {summary.errors} errors {summary.error_kinds}" if summary.errors else ""
            print(
                f"{summary.rps:8.1f} rps, p50/p95/p99 {summary.pcts()} ms, "
                f"client CPU {summary.client_cpu_pct:.0f}%{errors}",
                flush=True,
            )
            failed = stack.failed()
            if failed:
                raise RuntimeError(f"stack part(s) exited during the run: {', '.join(failed)}")
        results.append(LevelResult(level, per_path["direct"], per_path["skillgate"]))
    return results


# ----------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Verdict:
    """One DESIGN.md target and whether this run met it."""

    target: str
    status: str  # "MET", "NOT MET" or "NOT MEASURED"
    detail: str


def judge(results: Sequence[LevelResult], with_recorder: bool) -> list[Verdict]:
    """Compare the skillgate path with the three targets of DESIGN.md."""
    by_level = {r.concurrency: r for r in results}
    verdicts: list[Verdict] = []

    lo, hi = TARGET_RPS_LEVELS
    in_range = [r for r in results if lo <= r.concurrency <= hi]
    name = f">= {TARGET_RPS:,.0f} calls/s at {lo}-{hi} connections"
    if not in_range:
        verdicts.append(Verdict(name, "NOT MEASURED", f"no level between {lo} and {hi} was run"))
    else:
        shown = ", ".join(f"{r.skillgate.summary.rps:,.0f} at c={r.concurrency}" for r in in_range)
        ok = all(r.skillgate.summary.rps >= TARGET_RPS for r in in_range)
        verdicts.append(Verdict(name, "MET" if ok else "NOT MET", shown))

    name = f"p50 overhead <= {TARGET_P50_OVERHEAD_MS:g} ms at {TARGET_P50_LEVEL} connection"
    level = by_level.get(TARGET_P50_LEVEL)
    overhead = level.overhead_ms("p50_ms") if level else None
    if level is None or overhead is None:
        verdicts.append(Verdict(name, "NOT MEASURED", f"level {TARGET_P50_LEVEL} not run or no samples"))
    else:
        verdicts.append(
            Verdict(
                name,
                "MET" if overhead <= TARGET_P50_OVERHEAD_MS else "NOT MET",
                f"{overhead:.2f} ms (skillgate p50 {level.skillgate.summary.p50_ms:.2f} - "
                f"direct p50 {level.direct.summary.p50_ms:.2f})",
            )
        )

    name = f"p99 <= {TARGET_P99_MS:g} ms at {TARGET_P99_LEVEL} connections (end to end through skillgate)"
    level = by_level.get(TARGET_P99_LEVEL)
    p99 = level.skillgate.summary.p99_ms if level else None
    if level is None or p99 is None:
        verdicts.append(Verdict(name, "NOT MEASURED", f"level {TARGET_P99_LEVEL} not run or no samples"))
    else:
        extra = level.overhead_ms("p99_ms")
        verdicts.append(
            Verdict(
                name,
                "MET" if p99 <= TARGET_P99_MS else "NOT MET",
                f"{p99:.2f} ms (p99 overhead over direct {extra:.2f} ms)"
                if extra is not None
                else f"{p99:.2f} ms",
            )
        )

    errors = {r.concurrency: r.skillgate.summary.errors for r in results if r.skillgate.summary.errors}
    final: list[Verdict] = []
    for v in verdicts:
        detail = v.detail
        if errors and v.status != "NOT MEASURED":
            detail += f"; skillgate errors at c={errors}"
        if not with_recorder and v.status != "NOT MEASURED":
            detail += "; run WITHOUT the recorder, so it does not count"
        final.append(Verdict(v.target, v.status, detail))
    return final


# ------------------------------------------------------------------------------------------ report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_table(results: Sequence[LevelResult]) -> str:
    """The summary table, one row per concurrency level."""
    header = (
        "concurrency",
        "direct rps",
        "direct p50/p95/p99 ms",
        "skillgate rps",
        "skillgate p50/p95/p99 ms",
        "overhead p50 ms",
        "errors (direct/skillgate)",
    )
    rows = [
        (
            str(r.concurrency),
            f"{r.direct.summary.rps:,.1f}",
            r.direct.summary.pcts(),
            f"{r.skillgate.summary.rps:,.1f}",
            r.skillgate.summary.pcts(),
            _ms(r.overhead_ms("p50_ms")),
            f"{r.direct.summary.errors}/{r.skillgate.summary.errors}",
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _cpu_line(cpu: CpuUsage, summary: Summary) -> str:
    """Stack components busiest first, each as % of a core and (ms of CPU per successful call)."""
    rps = summary.rps

    def per_call(pct: float) -> str:
        return f" ({10.0 * pct / rps:.2f})" if rps > 0 else ""

    parts = sorted(cpu.components_pct.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{name} {pct:.0f}%{per_call(pct)}" for name, pct in parts if pct >= 0.5)
    total = sum(cpu.components_pct.values())
    others = ", ".join(f"{name} {pct:.0f}%" for name, pct in cpu.busiest_others_pct.items())
    return (
        f"{shown} | stack {total:.0f}%{per_call(total)} | load generator "
        f"{cpu.load_generator_pct:.0f}%{per_call(cpu.load_generator_pct)} | other {cpu.other_pct:.0f}%"
        f"{f' ({others})' if others else ''} | machine {cpu.machine_busy_pct:.0f}% busy"
    )


def disturbed_windows(results: Sequence[LevelResult]) -> list[str]:
    """Windows during which other processes used a noticeable share of the machine."""
    return [
        f"c={r.concurrency} {name} {p.cpu.other_pct:.0f}%"
        for r in results
        for name, p in (("direct", r.direct), ("skillgate", r.skillgate))
        if p.cpu is not None and p.cpu.other_pct >= OTHER_CPU_WARN_PCT
    ]


def render_report(
    config: Config,
    machine: dict[str, Any],
    setup: dict[str, Any],
    results: Sequence[LevelResult],
    verdicts: Sequence[Verdict],
    logs: dict[str, dict[str, Any]],
) -> str:
    """Everything printed at the end of a run."""
    out: list[str] = []
    out.append(
        f"machine: {machine['cores']} cores ({machine['cpu_model']}), {machine['memory_gb']} GB, "
        f"Python {machine['python']}, {machine['platform']}; "
        f"{machine['busy_pct_before_start']:.0f}% busy before the start"
    )
    out.append(
        f"config: levels {','.join(map(str, config.concurrency))}, {config.duration_s:g} s measured + "
        f"{config.warmup_s:g} s warm-up per level and path (after {config.stack_warmup_s:g} s of stack "
        f"warm-up), body {setup['body_bytes']} bytes, "
        f"timeout {config.timeout_s:g} s, client: {setup['client']}"
    )
    out.append(
        f"stack: {'FULL (with recorder)' if setup['recorder'] else 'WITHOUT THE RECORDER'}, "
        f"stub latency 0 ms, stub recording off, git {setup['git_commit'] or 'no commit'}"
    )
    out.append("")
    out.append(render_table(results))
    out.append("")
    out.append(
        "CPU in each measured window, % of one core (ms of CPU per successful call); "
        f"{machine['cores']} cores = {100 * (machine['cores'] or 1)}%:"
    )
    for r in results:
        for name, p in (("direct", r.direct), ("skillgate", r.skillgate)):
            if p.cpu is not None:
                out.append(f"  c={r.concurrency:<4} {name:<9} {_cpu_line(p.cpu, p.summary)}")
    disturbed = disturbed_windows(results)
    if disturbed:
        out.append(
            f"  WARNING: other processes used CPU during the run ({', '.join(disturbed)} of a core): "
            "the machine was shared and these figures are disturbed; rerun on a quiet machine"
        )
    saturated = [
        f"c={r.concurrency} {p.summary.client_cpu_pct:.0f}%"
        for r in results
        for p in (r.direct, r.skillgate)
        if p.summary.client_cpu_pct >= 85.0
    ]
    if saturated:
        out.append(
            f"  note: the load generator used most of a core ({', '.join(saturated)}): "
            "at those levels the client may cap the direct path's throughput"
        )
    errors = [
        f"c={r.concurrency} {name}: {p.summary.error_kinds}"
        for r in results
        for name, p in (("direct", r.direct), ("skillgate", r.skillgate))
        if p.summary.errors
    ]
    if errors:
        out.append("")
        out.append("errors by kind: " + "; ".join(errors))
    out.append("")
    out.append("service logs: error / warning lines at startup | during the load:")
    for name, info in logs.items():
        boot, run = info["startup"], info["run"]
        out.append(
            f"  {name:<14} {boot['errors']:>4} / {boot['warnings']:<4} | {run['errors']:>4} / "
            f"{run['warnings']:<4} ({boot['lines'] + run['lines']} lines)"
        )
        out += [f"      startup: {line}" for line in boot["first_errors"][:2]]
        out += [f"      load:    {line}" for line in run["first_errors"]]
    out.append("")
    out.append("targets (DESIGN.md, performance targets):")
    for v in verdicts:
        out.append(f"  [{v.status}] {v.target}: {v.detail}")
    if not setup["recorder"]:
        out.append("  !!! run WITHOUT the recorder: these figures are not the product's figures !!!")
    if disturbed:
        out.append("  (the machine was shared during the run: see the WARNING above)")
    return "\n".join(out)


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(
    path: Path,
    config: Config,
    machine: dict[str, Any],
    setup: dict[str, Any],
    results: Sequence[LevelResult],
    verdicts: Sequence[Verdict],
    logs: dict[str, dict[str, Any]],
) -> None:
    """The whole report as JSON (same figures as printed)."""
    payload = {
        "benchmark": "overhead",
        "started_at": setup["started_at"],
        "machine": machine,
        "config": dataclasses.asdict(config),
        "setup": setup,
        "levels": [
            {
                "concurrency": r.concurrency,
                "direct": {
                    **dataclasses.asdict(r.direct.summary),
                    "stack_cpu": dataclasses.asdict(r.direct.cpu) if r.direct.cpu else None,
                },
                "skillgate": {
                    **dataclasses.asdict(r.skillgate.summary),
                    "stack_cpu": dataclasses.asdict(r.skillgate.cpu) if r.skillgate.cpu else None,
                },
                "overhead_ms": {
                    "p50": r.overhead_ms("p50_ms"),
                    "p95": r.overhead_ms("p95_ms"),
                    "p99": r.overhead_ms("p99_ms"),
                    "note": "difference of the two paths' percentiles, not a percentile of differences",
                },
            }
            for r in results
        ],
        "targets": [dataclasses.asdict(v) for v in verdicts],
        "disturbed_windows": disturbed_windows(results),
        "logs": logs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")


# -------------------------------------------------------------------------------------------- main


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so the stack is always stopped (see also ``loadgen``)."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (whatever the verdicts), 1 when it could not run."""
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    machine = machine_info()
    machine["busy_pct_before_start"] = round(machine_busy_now(), 1)
    if machine["busy_pct_before_start"] >= OTHER_CPU_WARN_PCT / (machine["cores"] or 1):
        print(
            f"note: the machine is already {machine['busy_pct_before_start']:.0f}% busy before the "
            "benchmark starts; other work will disturb the figures",
            flush=True,
        )
    with_recorder = recorder_available()
    if not with_recorder:
        _banner(
            [
                "services.recorder.main does not exist yet: this run is WITHOUT THE RECORDER.",
                "Nothing is written to ClickHouse; the figures are NOT the full stack's.",
            ]
        )
    body = messages_body(config.body_bytes)
    data_dir = Path(tempfile.mkdtemp(prefix="skillgate-bench-"))
    stack_class = Stack if with_recorder else _StackWithoutRecorder
    stack = stack_class(
        data_dir=data_dir,
        ports=StackPorts.free(),
        extra_env={"SKILLGATE_STUB_MAX_RECORDED": "0", "SKILLGATE_STUB_LATENCY_MS": "0"},
    )
    setup: dict[str, Any] = {
        "started_at": started,
        "recorder": with_recorder,
        "body_bytes": len(body),
        "client": client_description(config.tool),
        "git_commit": git_commit(),
        "data_dir": str(data_dir),
        "stub": {"latency_ms": 0, "max_recorded": 0},
        "ingress_workers": os.environ.get("SKILLGATE_INGRESS_WORKERS", "1"),
    }
    print(f"starting the stack in {data_dir} ...", flush=True)
    results: list[LevelResult] = []
    logs: dict[str, dict[str, Any]] = {}
    run_from: dict[str, int] = {}
    failure: BaseException | None = None
    try:
        t = time.monotonic()
        start_stack(stack, with_recorder)
        print(f"stack up in {time.monotonic() - t:.1f} s", flush=True)
        token = stack.token("bench", ["eng"])
        common = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        targets = (
            Target("direct", f"{stack.stub_url}/v1/messages", {**common, "x-api-key": stack.stub_key}),
            Target(
                "skillgate",
                f"{stack.ingress_url}/v1/messages",
                {**common, "authorization": f"Bearer {token}"},
            ),
        )
        preflight(targets, body, config.timeout_s)
        run_from = log_offsets(data_dir)
        results = measure(config, stack, targets, body, setup)
    except (Exception, KeyboardInterrupt) as exc:
        failure = exc
    finally:
        print("stopping the stack ...", flush=True)
        stack.stop()
        logs = scan_logs(data_dir, run_from)
        interrupted = isinstance(failure, KeyboardInterrupt)
        if config.keep_data or (failure is not None and not interrupted):
            print(f"data and logs kept in {data_dir}", flush=True)
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    if isinstance(failure, KeyboardInterrupt):
        print(f"\nbenchmark interrupted ({failure}); no results written", file=sys.stderr)
        return 130
    if failure is not None:
        print(f"\nbenchmark FAILED: {type(failure).__name__}: {failure}", file=sys.stderr)
        for name, info in logs.items():
            for part in ("startup", "run"):
                for line in info[part]["first_errors"]:
                    print(f"  {name} ({part}): {line}", file=sys.stderr)
        return 1

    verdicts = judge(results, with_recorder)
    print()
    print(render_report(config, machine, setup, results, verdicts, logs))
    out = config.results_dir / f"overhead-{started}.json"
    write_json(out, config, machine, setup, results, verdicts, logs)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
