"""Ancestral sampling with the vocabulary head on the unmasking rows only (`sample(row_head=True)`) against every row.

    OMP_NUM_THREADS=2 python bench/row_head.py                 # CPU: small_mdlm's shape (d 384, 8 layers, L 512,
                                                                # GPT-2 vocabulary), batch 1, 1/4/16/64 steps
    python bench/row_head.py --device cuda --d-model 768 --layers 12 --heads 12 --len 1024   # ~160M, L = 1024

A K-step sample reads the prediction only at the positions each step unmasks, so the head (d x V per row) and
its float32 log-softmax, computed at every row of every step by the full path, are needed at B L rows in all; and
a step that unmasks nothing needs no model call. Both paths sample a random-weight MaskedDenoiser from the same
seed (eval mode, float32 weights on CPU, bf16 weights on CUDA, no CUDA graph: the model call as `sample` makes
it); `same_tokens` says whether they drew the same tokens (the law is the same; a product over fewer rows can
round differently). Times are medians of --repeats after --warmup. The last line printed is JSON; unless
--no-append it is also appended to bench/results/row-head-<device>.jsonl with the git SHA, device and torch version.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fewstep.compiled import fallbacks
from fewstep.diffusion.mdlm import MaskedDenoiser
from fewstep.diffusion.sampling import sample
from fewstep.diffusion.schedule import LogLinear
from fewstep.eval.speed import append_rows, provenance, timed
from fewstep.models.transformer import Transformer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50_257, help="tokens, the mask excluded (GPT-2: 50,257)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", default="1,4,16,64")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MaskedDenoiser(Transformer(args.vocab + 1, args.len, args.d_model, args.layers, args.heads),
                           mask_id=args.vocab).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    rows = []
    for steps in map(int, args.steps.split(",")):
        def run(rh: bool, steps: int = steps) -> torch.Tensor:
            return sample(model, LogLinear(), batch=args.batch, length=args.len, steps=steps, mask_id=args.vocab,
                          device=device, row_head=rh, generator=torch.Generator(device).manual_seed(1))

        same = bool(torch.equal(run(True), run(False)))
        sec = {rh: timed(lambda rh=rh, run=run: run(rh), device=device, warmup=args.warmup,
                         repeats=args.repeats)[1] for rh in (True, False)}
        rows.append({"steps": steps, "row_head_s": sec[True], "full_head_s": sec[False],
                     "speedup": sec[False] / sec[True], "same_tokens": same})
        print(f"{steps} steps: row head {sec[True]:.3f} s, full head {sec[False]:.3f} s "
              f"({sec[False] / sec[True]:.2f}x), same tokens: {same}", file=sys.stderr)
    row = {"d_model": args.d_model, "layers": args.layers, "seq_len": args.len, "vocab": args.vocab,
           "batch": args.batch, "params": sum(q.numel() for q in model.parameters()), "rows": rows,
           "device": str(device), "threads": torch.get_num_threads(), "compile_fallbacks": fallbacks(),
           **provenance(device)}
    if not args.no_append:
        append_rows(Path(__file__).parent / "results" / f"row-head-{device.type}.jsonl", [row])
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
