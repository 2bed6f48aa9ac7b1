"""Wall-clock timing: CUDA-synchronised, warm-up excluded, median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], *, device="cpu", warmup: int = 1, repeats: int = 1):
    """Run `fn` warmup times untimed, then `repeats` times; returns (last result, median seconds, all seconds)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times
