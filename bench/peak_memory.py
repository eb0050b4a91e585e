"""Peak memory of a block of code, on CUDA or on the CPU, for the benchmarks.

CUDA: the caching allocator's ``max_memory_allocated`` (reset on entry) minus
what was allocated on entry: the peak of live tensors, not of cached blocks.

CPU: the process's peak resident set size (``VmHWM``, reset on entry by writing
``5`` to ``/proc/self/clear_refs``) minus its RSS on entry. For RSS to follow
tensors, freed tensors must go back to the OS: glibc's malloc keeps freed heap
memory and raises its mmap threshold as large blocks are freed, so the
threshold is pinned at 64 KiB (``mallopt``), above which every allocation is
its own mapping, returned on free. What this counts that CUDA's number does not:
small allocations and library workspaces (oneDNN scratch, thread stacks) made
inside the block; at the sizes measured here (hundreds of MB and up) they are
noise.
"""

from __future__ import annotations

import ctypes
import gc
import re

import torch

_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 64 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def cpu_tracking_available() -> bool:
    """Linux with glibc and a writable ``/proc/self/clear_refs``."""
    try:
        ctypes.CDLL("libc.so.6").mallopt
        with open("/proc/self/clear_refs", "w"):
            pass
        _status_kib("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes`` (None where it cannot be measured)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._base = 0
        self._cpu = self.device.type == "cpu" and cpu_tracking_available()
        if self._cpu:
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated() above the allocation at start"
        if self._cpu:
            return ("peak RSS (VmHWM, reset via /proc/self/clear_refs) above RSS at start, "
                    "glibc mmap threshold pinned at 64 KiB so freed tensors leave RSS")
        return "not measured on this platform"

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._cpu:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _status_kib("VmRSS") * 1024
        return self

    def held_bytes(self) -> int | None:
        """Bytes held now above the start of the block (call inside it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) - self._base
        return _status_kib("VmRSS") * 1024 - self._base if self._cpu else None

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._cpu:
            self.peak_bytes = _status_kib("VmHWM") * 1024 - self._base
