"""Training throughput with 1 and N processes (DDP and FSDP2 under torchrun), appended to bench/results.

    python bench/train_throughput.py                        # CPU: tiny_mdlm, 40 steps, 1 process, then 2 (gloo)
                                                            # with train.parallel=ddp and =fsdp, 1 thread each
    python bench/train_throughput.py --device cuda --preset small_mdlm --procs 1,8 --steps 200 --log-every 20
    python bench/train_throughput.py --no-append train.batch_size=64   # extra --section.key=value overrides

Each setting is a real `fewstep train` run (`python -m torch.distributed.run --nproc_per_node N` for N > 1) in a
temporary directory; tokens/s (global: all processes together) and MFU (CUDA only, when the loop knows the peak)
are read from the run's log.jsonl. The first logging window (start-up, first iterations) is dropped and the rest
are pooled: tokens/s = tokens / seconds over the remaining windows. Each row is appended to
bench/results/train-throughput-<device>.jsonl with the git SHA, device, torch version and time; the last line
printed is JSON. On a shared machine the numbers are noisy: compare rows of one invocation, not across days.
A SIGTERM (bench/gpu_checks.sh's time limit) stops the current run and writes its row from the windows it logged
so far, with "cut": true; later settings are not started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fewstep.eval.speed import Cut, append_rows, provenance, sigterm_cuts


def _device_name(device: str, threads: int) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads/process)"


def run_one(args, nproc: int, mode: str, out: Path, port: int) -> dict:
    train = [sys.executable, "-m", "fewstep", "train"]
    if nproc > 1:
        train = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(port), "-m", "fewstep", "train"]
    cmd = [*train, "--config", args.preset, f"--train.max_steps={args.steps}", f"--train.out_dir={out}",
           f"--train.log_every={args.log_every}", f"--train.eval_every={10**9}", f"--train.ckpt_every={10**9}",
           "--train.eval_batches=1", "--train.ema=0", f"--train.parallel={mode}",
           *[o if o.startswith("--") else f"--{o}" for o in args.overrides]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    proc, cut = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), False
    try:
        _, err = proc.communicate()
    except Cut:  # a time limit: stop the run, keep the windows it logged
        cut = True
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0 and not cut:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{err[-3000:]}")
    log = out / "log.jsonl"
    logs = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
    windows = [r for r in logs if r.get("tokens_per_s")]
    if not windows:
        raise SystemExit(f"cut by SIGTERM before the first logging window of {' '.join(cmd)}")
    kept = windows[1:] or windows  # the first window holds start-up and first-iteration costs
    tps = len(kept) / sum(1.0 / r["tokens_per_s"] for r in kept)  # equal tokens per window: pool the seconds
    per_token = [r["mfu"] / r["tokens_per_s"] for r in kept if r.get("mfu")]  # FLOPs per token / peak: constant
    return {"preset": args.preset, "world_size": nproc, "parallel": mode if nproc > 1 else "none",
            "steps": args.steps, "log_every": args.log_every, "tokens_per_s": tps,
            "tokens_per_s_windows": [r["tokens_per_s"] for r in windows],
            "mfu": tps * per_token[0] if per_token else None,
            "compile_fallbacks": sorted({f for r in logs for f in r.get("compile_fallbacks", [])}), "cut": cut,
            "wall_s": wall, "threads_per_process": args.threads, "overrides": args.overrides,
            "command": " ".join([f"OMP_NUM_THREADS={args.threads}", "python", *cmd[1:]]).replace(str(out), "OUT"),
            "device": args.device, **provenance(args.device, _device_name(args.device, args.threads))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny_mdlm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10, help="steps per tokens/s window (the first is dropped)")
    p.add_argument("--procs", default="1,2", help="process counts; each count > 1 runs once per --modes entry")
    p.add_argument("--modes", default="ddp,fsdp", help="train.parallel values for the multi-process runs")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--port", type=int, default=29651, help="first torchrun master port (one per run)")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"), help="folder of the JSONL files")
    p.add_argument("--no-append", action="store_true", help="print only, do not write bench/results")
    p.add_argument("overrides", nargs="*", help="extra section.key=value config overrides for every run")
    args = p.parse_args(argv)
    path = Path(args.results) / f"train-throughput-{args.device}.jsonl"
    plan = [(n, m) for n in map(int, args.procs.split(",")) for m in (args.modes.split(",") if n > 1 else ["ddp"])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, sigterm_cuts():  # a time limit ends the current run with a row
        for i, (nproc, mode) in enumerate(plan):
            rows.append(run_one(args, nproc, mode, Path(tmp) / f"run{i}", args.port + i))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if not args.no_append:  # row by row: a run stopped by a time limit keeps what it measured
                append_rows(path, rows[-1:])
            if rows[-1]["cut"]:
                break
    summary = {"rows": [{k: r[k] for k in ("world_size", "parallel", "tokens_per_s", "mfu")} for r in rows]}
    if not args.no_append:
        summary["results"] = str(path)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
