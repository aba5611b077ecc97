"""Timers and memory counters for one device, the same code on CPU (tests) and CUDA.

All times are in milliseconds, all memory figures in bytes.

- :meth:`Clock.wall_ms`: synchronised wall time of a call (the device is
  drained before and after), for prefill and whole decode loops.
- :meth:`Clock.op_ms`: the device time of one call of a short op, for the step
  breakdown. On CUDA the op is run ``repeats`` times back to back between two
  CUDA events (``graph=False``), or captured ``repeats`` times in one CUDA graph
  and the graph replayed (``graph=True``, no launch overhead, as in a
  graph-captured decode step); the median over ``trials`` is divided by
  ``repeats``. On CPU: the median of ``repeats`` timed calls.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["Clock"]


class Clock:
    """Timing and memory statistics for ``device`` (CUDA figures are 0 / ``None`` on a CPU)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        """Wait for all work queued on the device."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall_ms(self, fn: Callable[[], object]) -> tuple[object, float]:
        """``(fn(), milliseconds)``, the device synchronised before and after."""
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return result, (time.perf_counter() - start) * 1e3

    def op_ms(self, fn: Callable[[], object], repeats: int = 20, graph: bool = False, trials: int = 3) -> float:
        """Milliseconds of device time per call of ``fn`` (see the module docstring); ``fn`` runs once first."""
        if not self.cuda:
            fn()
            times = [self.wall_ms(fn)[1] for _ in range(repeats)]
            return statistics.median(times)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        run = _captured(fn, repeats) if graph else lambda: [fn() for _ in range(repeats)]
        return statistics.median(self._event_ms(run) for _ in range(trials)) / repeats

    def _event_ms(self, fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    # ------------------------------------------------------------------ memory
    def fresh(self) -> None:
        """Free what Python and the caching allocator hold, and reset the peak counter."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def reset_peak(self) -> None:
        """Start a new peak-memory window."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        """Peak bytes allocated since the last reset (``torch.cuda.max_memory_allocated``); ``None`` on a CPU."""
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def allocated_bytes(self) -> int | None:
        """Bytes allocated now; ``None`` on a CPU."""
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def free_bytes(self) -> int | None:
        """Bytes free on the device after emptying the allocator's cache; on a CPU the available RAM (psutil)."""
        if not self.cuda:
            try:
                import psutil
            except ImportError:
                return None
            return psutil.virtual_memory().available
        self.fresh()
        return torch.cuda.mem_get_info(self.device)[0]

    def total_bytes(self) -> int | None:
        """Device memory in bytes; ``None`` on a CPU."""
        return torch.cuda.get_device_properties(self.device).total_memory if self.cuda else None

    def name(self) -> str:
        """The device's name, e.g. ``NVIDIA H200``, or ``cpu``."""
        return torch.cuda.get_device_name(self.device) if self.cuda else self.device.type


def _captured(fn: Callable[[], object], repeats: int) -> Callable[[], None]:
    """A function that replays ``repeats`` calls of ``fn`` captured in one CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    return graph.replay
