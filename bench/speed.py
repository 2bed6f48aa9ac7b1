"""Speed benchmark script: DLM latency over a grid of sampling steps vs KV-cached AR, appended to bench/results.

    python bench/speed.py --preset tiny --random-weights                  # CPU smoke run, seconds
    python bench/speed.py --preset owt-small-shape --random-weights       # GPU: ~160M model shape, L = 1024,
                                                                          # steps 1..1024, batch 1 and 32
    python bench/speed.py --ckpt runs/small_mdlm --ar-ckpt runs/small_ar  # trained checkpoints

Each row (one setting) is appended as a JSON line to bench/results/speed-<preset or ckpt>.jsonl with the git
SHA, device name, torch version and time, so a regression shows as a new line beside the old ones; the last line
printed to stdout is a JSON summary. The measurement itself is fewstep.eval.bench (same as `fewstep bench`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fewstep.config import FewstepError
from fewstep.eval.bench import add_args, bench_from_args
from fewstep.eval.speed import append_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    p.add_argument("--results", default=str(Path(__file__).parent / "results"), help="folder of the JSONL files")
    p.add_argument("--no-append", action="store_true", help="print only, do not write bench/results")
    args = p.parse_args(argv)
    out = Path(args.results) / f"speed-{args.preset or 'ckpt'}.jsonl"

    try:  # row by row: a run stopped by a time limit keeps what it measured
        rows, summary = bench_from_args(args, log=lambda m: print(m, file=sys.stderr, flush=True),
                                        on_row=None if args.no_append else lambda row: append_rows(out, [row]))
    except FewstepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_append:
        summary["results"] = str(out)
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
