"""Small helpers shared by the benchmark scripts (stdlib only)."""

from __future__ import annotations

import os
import time

_HZ = os.sysconf("SC_CLK_TCK")


def _cpu_jiffies():
    """(busy, steal) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


class BackgroundLoad:
    """How busy the machine was with OTHER work while we measured.

    The benchmark machine is shared (2 cores; other people run tests and pip
    on it), so every report says how many cores' worth of CPU went to other
    processes: numbers taken under load are slower and noisier.
    """

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.busy0, self.steal0 = _cpu_jiffies()
        self.own0 = sum(os.times()[:4])  # self + waited-for children
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy, steal = _cpu_jiffies()
        own = sum(os.times()[:4]) - self.own0
        self.wall = wall
        self.other_cores = max(0.0, (busy - self.busy0) / _HZ - own) / wall if wall else 0.0
        self.steal_cores = (steal - self.steal0) / _HZ / wall if wall else 0.0
        return False

    def describe(self) -> str:
        return (
            f"other processes used {self.other_cores:.2f} cores on average "
            f"(steal {self.steal_cores:.2f}) over {self.wall:.0f} s; loadavg now "
            f"{open('/proc/loadavg').read().split()[0]}"
        )


def other_cores(interval: float = 0.5) -> float:
    """Cores' worth of CPU used by other processes during `interval` seconds
    of us sleeping."""
    b0, _ = _cpu_jiffies()
    time.sleep(interval)
    b1, _ = _cpu_jiffies()
    return (b1 - b0) / _HZ / interval


def wait_quiet(threshold: float = 0.2, timeout: float = 300.0) -> float:
    """Sleep until other processes use < threshold cores (or timeout); returns
    the seconds waited. On a 2-core box a single busy neighbour makes chunked
    torch kernels 10-100x slower (their 2 OpenMP threads wait at every barrier
    for a descheduled sibling), so timing under load measures the neighbour."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if other_cores() < threshold:
            break
    return time.perf_counter() - t0


def proc_status_kib(keys) -> dict:
    """Fields of /proc/self/status given in kB (VmRSS, VmHWM, RssAnon, RssFile, ...), in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0])
    return out


class CallMeter:
    """Wall time of one measured call and the CPU other processes used meanwhile.

    `own` is this process's CPU (all threads) plus waited-for children, so the
    difference to the machine-wide busy time is everybody else's work.
    """

    def __enter__(self):
        self.busy0, _ = _cpu_jiffies()
        self.own0 = sum(os.times()[:4])
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy, _ = _cpu_jiffies()
        own = sum(os.times()[:4]) - self.own0
        self.own_cpu = own
        self.other_cpu = max(0.0, (busy - self.busy0) / _HZ - own)
        return False

    @property
    def contended(self) -> bool:
        # /proc/stat ticks are 10 ms, so tolerate a few ticks of noise; beyond
        # that, even a tenth of a core taken by others can stall OpenMP barriers.
        return self.other_cpu > max(0.03, 0.1 * self.wall)
