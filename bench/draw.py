"""The float64 categorical draw of one sampler step: unfused (ATen ops) against one compiled kernel.

    OMP_NUM_THREADS=1 python bench/draw.py                  # CPU: 1,024 rows x V = 50,258 (a one-step sample, L = 1024)
    python bench/draw.py --device cuda --rows 1024          # the draw inside a one-step sample at batch 1, L = 1024

Both are `fewstep.diffusion.sampling.draw_rows` on the same float32 log-probabilities with generators in the same
state, so they consume the same uniforms: `unfused` writes and reads float64 temporaries of the full (N, V) shape
(the filtered probabilities, -log1p(-u) and the quotient), `fused` is `_race` under torch.compile: one kernel that
reads log p and u once. `torch.rand` (the (N, V) float64 uniforms both need) is timed on its own. Times are medians
of --repeats calls after --warmup (the first fused call compiles). The last line printed is JSON; unless
--no-append it is also appended to bench/results/draw-<device>.jsonl with the git SHA, device and torch version.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fewstep.compiled import fallbacks
from fewstep.diffusion.sampling import draw_rows
from fewstep.eval.speed import append_rows, provenance, timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rows", type=int, default=1024, help="N: positions drawn at once (B x L at a one-step sample)")
    p.add_argument("--vocab", type=int, default=50_258)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    log_p = torch.randn(args.rows, args.vocab, device=device, generator=torch.Generator(device).manual_seed(0))
    log_p = (3 * log_p).log_softmax(-1)  # (N, V) float32, peaked like a trained model's
    gen = lambda: torch.Generator(device).manual_seed(1)
    draw = lambda fused: draw_rows(log_p, args.temperature, generator=gen(), fused=fused)
    same = bool(torch.equal(draw(True), draw(False)))
    sec = {}
    for name, fn in (("unfused", lambda: draw(False)), ("fused", lambda: draw(True)),
                     ("rand", lambda: torch.rand(log_p.shape, dtype=torch.float64, device=device, generator=gen()))):
        _, sec[name], _ = timed(fn, device=device, warmup=args.warmup, repeats=args.repeats)
        print(f"{name}: {sec[name] * 1e3:.2f} ms", file=sys.stderr)
    row = {"rows": args.rows, "vocab": args.vocab, "temperature": args.temperature, "same_tokens": same,
           "unfused_s": sec["unfused"], "fused_s": sec["fused"], "rand_s": sec["rand"],
           "speedup": sec["unfused"] / sec["fused"], "device": str(device), "threads": torch.get_num_threads(),
           "compile_fallbacks": fallbacks(), **provenance(device)}
    if not args.no_append:
        append_rows(Path(__file__).parent / "results" / f"draw-{device.type}.jsonl", [row])
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
