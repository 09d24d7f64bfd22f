"""Wall time and peak memory of a step, and of named sections of a longer computation.

`Measure` times one step and its peak memory above the step's start: on CUDA
torch.cuda.max_memory_allocated, on CPU the peak resident set size (Linux VmHWM, reset through
/proc/self/clear_refs after malloc_trim; else the ru_maxrss delta, which only shows growth
above the process's old peak). `Sections` adds such measurements up per name, so the CE suite
can say where its time and memory go (the bench prints it); without one nothing is measured.
"""

from __future__ import annotations

import contextlib
import time

import torch


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Measure:
    """Context manager: wall seconds and peak memory (bytes above the start) of one step."""

    def __init__(self, device: str):
        self.device = str(device)
        self.seconds = float("nan")
        self.peak_bytes = float("nan")
        self.method = ""

    def __enter__(self) -> "Measure":
        _sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated above the step's start"
        else:
            self._start = self._cpu_start()
        self._t0 = time.perf_counter()
        return self

    def _cpu_start(self) -> int:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS starts low
        rss = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            if rss is None:
                raise OSError
            self._cpu_mode = "hwm"
            self.method = "peak RSS (VmHWM, reset per step) above the step's starting RSS"
            return rss * 1024
        except OSError:
            import resource

            self._cpu_mode = "maxrss"
            self.method = "ru_maxrss delta (growth above the process's earlier peak only)"
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.device.startswith("cuda"):
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
        elif self._cpu_mode == "hwm":
            self.peak_bytes = max(0, (_rss_kib("VmHWM") or 0) * 1024 - self._start)
        else:
            import resource

            self.peak_bytes = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._start)


class Sections:
    """Seconds (summed) and peak memory above each entry (the largest) per section name."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        with Measure(self.device) as m:
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + m.seconds
        self.peak_bytes[name] = max(self.peak_bytes.get(name, 0.0), m.peak_bytes)
        self.calls[name] = self.calls.get(name, 0) + 1


@contextlib.contextmanager
def _nothing(name: str):
    yield


def sections(profile: Sections | None):
    """`profile` itself, or a stand-in that measures nothing (no syscalls, no syncs)."""
    return profile if profile is not None else _nothing
