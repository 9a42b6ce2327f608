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


def median_seconds_alternating(fns: dict, device: torch.device, repeats: int, warmup: int = 0) -> dict:
    """{name: median wall time} of several functions timed in turn, one call each per round, the order
    flipped every round, so that drift in the machine's speed falls on all of them alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        order = list(fns.items()) if i % 2 else list(fns.items())[::-1]
        for name, fn in order:
            seconds = median_seconds(fn, device, repeats=1)
            if i >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}
