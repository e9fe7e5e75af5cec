"""CPU used by each part of the stack, the load generator and everything else, over a window.

Read from Linux ``/proc``. Every child of :class:`services.cli.stack.Stack` (and the Kafka broker)
runs in its own session, so its process-group id is its pid and every process it forks (uvicorn
workers, say) is counted with it. The load generator is this process's group (the benchmark
itself, and ``wrk`` when it is used). Percentages are of one core: 100 % is one core busy for
the whole window; the machine's total is in % of all cores.

The machine is shared with whatever else runs on it (a test suite, an editor): what the stack and
the load generator did not use is reported as ``other``, with the busiest other processes by name,
so a disturbed run is visible in its own report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcSample:
    """One live process: its group, command name and CPU seconds used so far."""

    pgid: int
    comm: str
    cpu_s: float


def _parse_stat(text: str) -> tuple[str, list[str]]:
    """A ``/proc/<pid>/stat`` line as (command name, the fields after it)."""
    # "pid (comm) state ppid pgrp ...": the name may hold spaces and parentheses.
    left, right = text.find("("), text.rfind(")")
    return text[left + 1 : right], text[right + 2 :].split()


def _cpu(fields: list[str]) -> float:
    """User + system CPU seconds from the fields of :func:`_parse_stat` (all threads)."""
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds one process has used so far (all threads)."""
    return _cpu(_parse_stat((_PROC / str(pid) / "stat").read_text())[1])


def peak_rss_mib(pid: int) -> float:
    """The most memory one process has held resident so far (``VmHWM``), in MiB."""
    for line in (_PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise ValueError(f"no VmHWM in /proc/{pid}/status")


def snapshot() -> dict[int, ProcSample]:
    """Every live process's group, name and CPU seconds (user + system, all threads)."""
    out: dict[int, ProcSample] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        comm, fields = _parse_stat(text)
        out[int(entry.name)] = ProcSample(int(fields[2]), comm, _cpu(fields))
    return out


def machine_jiffies() -> tuple[int, int]:
    """``(total, idle)`` jiffies of all cores so far, from the first line of ``/proc/stat``."""
    values = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values), idle


@dataclass(frozen=True)
class CpuUsage:
    """CPU over one window, in % of one core (``machine_busy_pct``: % of all cores)."""

    components_pct: dict[str, float]
    load_generator_pct: float
    other_pct: float
    busiest_others_pct: dict[str, float]
    machine_busy_pct: float
    cores: int


class CpuProbe:
    """Snapshots CPU counters at ``begin()``; ``end()`` turns the difference into ``usage``."""

    def __init__(self, groups: Mapping[str, int], client_pgid: int | None = None) -> None:
        self._by_pgid = {pgid: name for name, pgid in groups.items()}
        self._client_pgid = os.getpgrp() if client_pgid is None else client_pgid
        self._start: tuple[float, dict[int, ProcSample], tuple[int, int]] | None = None
        self.usage: CpuUsage | None = None

    def begin(self) -> None:
        """Start of the measured window."""
        self.usage = None
        self._start = (time.monotonic(), snapshot(), machine_jiffies())

    def end(self) -> None:
        """End of the measured window: compute ``usage``."""
        if self._start is None:
            return
        t0, before, (total0, idle0) = self._start
        self._start = None
        after = snapshot()
        elapsed = time.monotonic() - t0
        total1, idle1 = machine_jiffies()
        if elapsed <= 0:
            return
        components = dict.fromkeys(self._by_pgid.values(), 0.0)
        client = 0.0
        others: dict[str, float] = {}
        for pid, now in after.items():
            then = before.get(pid)
            used = now.cpu_s - (then.cpu_s if then is not None else 0.0)
            if used <= 0:
                continue
            name = self._by_pgid.get(now.pgid)
            if name is not None:
                components[name] += used
            elif now.pgid == self._client_pgid:
                client += used
            else:
                others[now.comm] = others.get(now.comm, 0.0) + used
        cores = os.cpu_count() or 1
        ticks = total1 - total0
        busy = (ticks - (idle1 - idle0)) / ticks if ticks > 0 else 0.0
        attributed = sum(components.values()) + client
        # Everything busy that the stack and the load generator did not use: other processes,
        # processes that ended during the window, kernel time not charged to a process.
        other = max(0.0, busy * cores * elapsed - attributed)
        top = sorted(others.items(), key=lambda kv: -kv[1])[:4]
        self.usage = CpuUsage(
            components_pct={k: 100.0 * v / elapsed for k, v in components.items()},
            load_generator_pct=100.0 * client / elapsed,
            other_pct=100.0 * other / elapsed,
            busiest_others_pct={k: 100.0 * v / elapsed for k, v in top if v / elapsed >= 0.02},
            machine_busy_pct=100.0 * busy,
            cores=cores,
        )


def machine_busy_now(seconds: float = 1.0) -> float:
    """How busy the machine is right now, in % of all cores, over ``seconds``."""
    total0, idle0 = machine_jiffies()
    time.sleep(seconds)  # a measurement interval, not synchronisation
    total1, idle1 = machine_jiffies()
    ticks = total1 - total0
    return 100.0 * (ticks - (idle1 - idle0)) / ticks if ticks > 0 else 0.0
