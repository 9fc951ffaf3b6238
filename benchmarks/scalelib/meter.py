"""CPU seconds and peak RSS of other processes (the server, the broker), sampled from beside them."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil


def _hwm_bytes(pid: int) -> int:
    """The kernel's own peak RSS of `pid` (VmHWM): exact, unlike a sampled maximum."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class ProcessStats:
    peak_rss: int = 0  # the process's own peak, or with children the largest sum seen
    cpu_s: float = 0.0  # the process and its children (decode workers), each as last seen


class Meter:
    """Samples each watched process and its children every `interval` s until stopped; `cpu(name)` reads it now."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.stats = {name: ProcessStats() for name in pids}
        self._cpu: dict[str, dict[int, float]] = {name: {} for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.interval = interval

    def __enter__(self) -> "Meter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> None:
        for name, proc in self.procs.items():
            try:
                family = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue  # it exited: the last sample stands
            rss = 0
            for member in family:
                try:
                    times = member.cpu_times()
                    rss += member.memory_info().rss
                except psutil.Error:
                    continue
                self._cpu[name][member.pid] = times.user + times.system
            stats = self.stats[name]
            stats.cpu_s = sum(self._cpu[name].values())
            stats.peak_rss = max(stats.peak_rss, rss, _hwm_bytes(proc.pid))

    def cpu(self, name: str) -> float:
        self.sample()
        return self.stats[name].cpu_s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
