"""The one timing helper of the benchmarks: wall-clock milliseconds of a call, synchronised on CUDA so
that the device's work is inside the interval."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def elapsed_ms(fn: Callable[[], object], device: str = "cpu") -> float:
    """Milliseconds of one call of fn (queued CUDA work waited for before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return 1e3 * (time.perf_counter() - start)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 0, device: str = "cpu") -> float:
    """Median milliseconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(elapsed_ms(fn, device) for _ in range(repeats))
