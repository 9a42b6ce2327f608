"""The one timing helper the benchmarks share."""

import statistics
import time

import torch


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 0) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` untimed ones, synchronising a GPU."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
