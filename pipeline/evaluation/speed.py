"""Measuring a sampler: wall time per chunk, network evaluations per frame, peak memory.

`SpeedMeter` wraps one sampling call::

    with SpeedMeter(model) as meter:
        videos = sample(..., on_chunk=meter.clock)
    meter.result(num_videos, frames)   # {"frames_per_s", "first_chunk_s", "nfe_per_frame", ...}
"""

from __future__ import annotations

import ctypes
import threading
import time

import psutil
import torch


class ChunkClock:
    """Wall-clock times at which chunks finish (`on_chunk` callback of the samplers)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, index: int, chunk: torch.Tensor) -> None:
        if chunk.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)

    def per_chunk(self) -> list[float]:
        return [b - a for a, b in zip([0.0, *self.times], self.times)]


class FrameCounter:
    """Counts the frames that pass through a transformer: a forward pre-hook adds `B·F` of its input
    `[B, C, F, H, W]` (a guided call on a 2B batch counts twice, a KV-cache write counts too)."""

    def __init__(self, model: torch.nn.Module):
        self.frames = 0
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.frames += x.shape[0] * x.shape[2]
        self.calls += 1

    def remove(self) -> None:
        self.handle.remove()


def _release_freed_cpu_memory() -> None:
    """Hand memory freed earlier back to the OS (glibc's `malloc_trim`), so that a block's growth in
    resident set size is its own and not hidden by memory the allocator kept. No-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: on CUDA the allocator's peak; on CPU the peak resident set size above
    the level at entry (after releasing freed memory), polled every `interval` seconds by a thread
    (approximate: it misses spikes shorter than the interval)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.cuda = device.type == "cuda"
        self.interval = interval
        self.peak_bytes = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _release_freed_cpu_memory()
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.top = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.is_set():
            self.top = max(self.top, self.proc.memory_info().rss)
            self.stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.top = max(self.top, self.proc.memory_info().rss)
            self.peak_bytes = self.top - self.base
        return False


class SpeedMeter:
    """Time, network evaluations and peak memory of one sampling run of `model` (a context manager;
    pass `meter.clock` as the sampler's `on_chunk`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device

    def __enter__(self):
        self.counter = FrameCounter(self.model)
        self.memory = PeakMemory(self.device).__enter__()
        self.clock = ChunkClock()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.elapsed = time.perf_counter() - self.clock.start
        self.memory.__exit__(*exc)
        self.counter.remove()
        return False

    def result(self, num_videos: int, frames: int) -> dict:
        """Speed figures for `num_videos` videos of `frames` frames generated inside the block.

        Returns `frames_per_s` (generated frames ÷ wall time), `first_chunk_s` (time until the first
        chunk was out; the whole first batch for samplers without chunks), `nfe_per_frame` (frames
        through the network ÷ frames generated), `network_calls`, `seconds`, `peak_memory_mb`.
        """
        first = self.clock.times[0] if self.clock.times else self.elapsed
        return {"frames_per_s": num_videos * frames / self.elapsed, "first_chunk_s": first,
                "nfe_per_frame": self.counter.frames / (num_videos * frames), "network_calls": self.counter.calls,
                "seconds": self.elapsed, "peak_memory_mb": self.memory.peak_bytes / 2**20}
