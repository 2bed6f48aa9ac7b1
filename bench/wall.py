"""Wall time of the tiny presets (training steps, sampling), appended to bench/results/wall-tiny.jsonl.

    python bench/wall.py                      # tiny_mdlm and tiny_ar: 50 training steps each, then sampling
    python bench/wall.py --steps 200 --no-append

A CPU regression check, not a test: each row records seconds, steps/s and tokens/s with the git SHA, device and
thread count, so a slower commit shows as a new line beside the old ones. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fewstep.checkpoint import load_model
from fewstep.config import load
from fewstep.eval.speed import append_rows, provenance
from fewstep.pipeline import generate, pretrain


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny_mdlm,tiny_ar")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            out = Path(tmp) / preset
            cfg = load(preset, [f"--train.max_steps={args.steps}", f"--train.out_dir={out}", "--train.ema=0",
                                f"--train.eval_every={10**9}", f"--train.ckpt_every={10**9}", "--train.eval_batches=1"])
            t0 = time.perf_counter()
            pretrain(cfg)
            train_s = time.perf_counter() - t0
            model, meta = load_model(str(out), "cpu")
            t0 = time.perf_counter()
            generate(model, meta, n=args.samples, steps=args.sample_steps, batch=args.samples, seed=0)
            sample_s = time.perf_counter() - t0
            tokens = args.steps * cfg.train.batch_size * cfg.model.seq_len
            rows.append({"preset": preset, "train_steps": args.steps, "train_s": train_s,
                         "steps_per_s": args.steps / train_s, "train_tokens_per_s": tokens / train_s,
                         "samples": args.samples, "sample_steps": args.sample_steps, "sample_s": sample_s,
                         **provenance("cpu")})
            print(json.dumps(rows[-1]), file=sys.stderr)
    if not args.no_append:
        append_rows(Path(__file__).parent / "results" / "wall-tiny.jsonl", rows)
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
