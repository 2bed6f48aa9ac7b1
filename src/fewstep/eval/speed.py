"""Wall-clock timing (CUDA-synchronised, warm-up excluded, median of repeats) and the provenance that goes with
a timing: the device and the git commit it was measured at."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

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


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_sha() -> str:
    """Short commit of the working tree, with "+dirty" when it has uncommitted changes; "unknown" outside git.
    FEWSTEP_GIT_SHA overrides it, for a copy of the tree without its .git (e.g. on a remote GPU machine)."""
    if os.environ.get("FEWSTEP_GIT_SHA"):
        return os.environ["FEWSTEP_GIT_SHA"]
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device, name: str | None = None) -> dict:
    """What every benchmark row carries: device name, torch version, git SHA and UTC time. name: the device's name
    when the caller knows better (e.g. a row measured in child processes with their own thread counts)."""
    return {"device_name": name or device_name(device), "torch": torch.__version__, "git_sha": git_sha(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def append_rows(path, rows) -> None:
    """Append JSON lines to a results file (bench/results/*.jsonl), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, default=str) + "\n" for r in rows)


class Cut(BaseException):
    """A SIGTERM inside `sigterm_cuts()` (bench/gpu_checks.sh's time limit): not an Exception, so a benchmark's own
    error handling does not swallow it."""


@contextlib.contextmanager
def sigterm_cuts():
    """Inside, SIGTERM raises `Cut`, so a benchmark cut by a time limit can still write what it measured."""

    def cut(signum, frame):
        raise Cut

    before = signal.signal(signal.SIGTERM, cut)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
