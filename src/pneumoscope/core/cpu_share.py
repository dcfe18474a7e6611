"""How many threads a training process should run while other processes share the CPU.

PyTorch's CPU kernels run on an OpenMP team of one thread per core, and every parallel region ends
at a barrier: when another process takes one of two cores, one of our threads is descheduled and
the other spins at the barrier waiting for it. Measured on a 2-core EPYC (docs/benchmarks.md,
"Training under load"): with one busy process beside it a training step took 2.4x its idle time on
two threads, 1.8x on one. So a run checks, every few steps, how much CPU the *other* processes used
(the machine's busy time from /proc/stat minus this process's own) and runs one thread fewer per
core they keep busy, and all threads again once they stop. Linux only; elsewhere the thread count
stays as it is. Nothing here imports torch.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

BUSY_CORE = 0.5  # another process counts as holding a core when it used at least half of one


def machine_busy_seconds(stat_path: str = "/proc/stat") -> float | None:
    """CPU seconds all cores spent busy since boot (not idle, not waiting for I/O); None off Linux."""
    try:
        with open(stat_path) as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def threads_for(cores: int, others_busy_cores: float) -> int:
    """One thread per core the other processes leave free (at least one)."""
    held = int(others_busy_cores + 1 - BUSY_CORE)  # 0.5-1.49 cores used: one held, and so on
    return max(1, cores - held)


@dataclass
class CpuShare:
    """Call `threads()` every few steps: the thread count for the window since the last call."""

    cores: int
    _last: tuple[float, float, float] | None = None

    def others_busy_cores(self) -> float | None:
        """Cores the other processes kept busy on average since the last call (None: first call,
        or no /proc/stat)."""
        now = (time.monotonic(), machine_busy_seconds(), own_cpu_seconds())
        last, self._last = self._last, now
        if last is None or now[1] is None or last[1] is None or now[0] - last[0] <= 0:
            return None
        wall = now[0] - last[0]
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / wall)

    def threads(self) -> int | None:
        others = self.others_busy_cores()
        return None if others is None else threads_for(self.cores, others)
