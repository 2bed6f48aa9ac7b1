"""MDLM training loss, forward + backward: the full (B, L, V) head, the head on the masked rows, and the chunked head.

    OMP_NUM_THREADS=1 python bench/loss_head.py                 # CPU: V = 50,258, d 128, 2 layers, B 4, L 256
    python bench/loss_head.py --device cuda --batch 32 --len 1024 --d-model 768 --layers 12 --heads 12

`full`: the NELBO as computed before the masked-rows path (`model(x_t, t)` -> float32 (B, L, V) log-probabilities,
gather, zero the unmasked positions). `masked`: the vocabulary head and the float32 log-softmax on the N masked rows
only (`model(x_t, t, masked_only=True)`, N ~ B L / 2 on average, t ~ U[0, 1]), then gather. `chunked`:
`fewstep.diffusion.mdlm.nelbo` as it is, the masked rows through `linear_nll` (head and cross-entropy a chunk of
rows at a time, logits recomputed in the backward, no (N, V) tensor kept; on CUDA over W padded with zero rows to a
multiple of 64, aligned GEMMs), and `chunked_unpadded`: the same with W as it is (`linear_nll(pad_to=1)`, the CPU
default, so the two are one computation there). All see the same x0, t and masks in each
repeat; they are interleaved (the order rotates) and each time is the median of the repeats of one forward +
backward (gradients of every parameter). `<path>_saved_bytes`: what autograd keeps for the backward (distinct
storages, weights included), on any device. Peak memory is measured on CUDA only (the allocator's peak above the
weights and inputs); the row also gives the bytes of one float32 logits tensor, (B, L, V) against (N, V). The last
line printed is JSON; unless --no-append it is also appended to bench/results/loss-head-<device>.jsonl with the git
SHA, device and torch version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from fewstep.compiled import fallbacks
from fewstep.diffusion.mdlm import MaskedDenoiser, nelbo, q_xt, sample_t
from fewstep.diffusion.sampling import autocast
from fewstep.diffusion.schedule import LogLinear, weight
from fewstep.eval.speed import append_rows, provenance, timed
from fewstep.models.linear_nll import linear_nll
from fewstep.models.transformer import Transformer


def nelbo_full(model, schedule, x0, t, mask_id, generator=None):
    """The loss before the masked-rows path: every position through the head and the float32 log-softmax."""
    x_t = q_xt(x0, schedule.alpha(t), mask_id, generator)
    log_p = model(x_t, t)  # (B, L, V)
    nll = -log_p.gather(-1, x0[..., None]).squeeze(-1)
    nll = torch.where(x_t == mask_id, nll, torch.zeros_like(nll))
    return weight(schedule, t) * nll.sum(-1)


def nelbo_masked(model, schedule, x0, t, mask_id, generator=None):
    """The masked-rows path before the chunked head: (N, V) float32 log-probabilities, then gather."""
    x_t = q_xt(x0, schedule.alpha(t), mask_id, generator)
    masked = x_t == mask_id
    nll = -model(x_t, t, masked_only=True).gather(-1, x0[masked][:, None]).squeeze(-1)  # (N,)
    return _nelbo_of_rows(schedule, t, masked, nll)


def nelbo_chunked_unpadded(model, schedule, x0, t, mask_id, generator=None):
    """`nelbo`'s chunked path (MaskedDenoiser's `targets=`) with the head's rows not padded: linear_nll(pad_to=1)."""
    x_t = q_xt(x0, schedule.alpha(t), mask_id, generator)
    masked = x_t == mask_id
    h = model.backbone.hidden(x_t, t if model.backbone.time_cond else None)[masked]  # (N, D)
    nll = linear_nll(h, model.backbone.head.weight, x0[masked], exclude=mask_id, pad_to=1)  # (N,)
    return _nelbo_of_rows(schedule, t, masked, nll)


def _nelbo_of_rows(schedule, t, masked, nll):
    """Per-sequence NELBO (B,) from the NLLs (N,) at the masked positions `masked` (B, L), in row-major order."""
    per_position = torch.zeros(masked.shape, dtype=nll.dtype, device=nll.device).masked_scatter(masked, nll)
    return weight(schedule, t) * per_position.sum(-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--vocab", type=int, default=50_258, help="tokens incl. the mask (GPT-2's 50,257 + 1)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--time-cond", action="store_true", help="adaLN time conditioning (off in MDLM pre-training)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="as train.precision: auto is bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(args.seed)
    mask_id = args.vocab - 1
    model = MaskedDenoiser(Transformer(args.vocab, args.len, args.d_model, args.layers, args.heads,
                                       time_cond=args.time_cond), mask_id).to(device).train()
    schedule = LogLinear()
    B, L, V = args.batch, args.len, args.vocab

    def inputs(i: int):
        g = torch.Generator(device=device).manual_seed(args.seed + i)
        x0 = torch.randint(0, mask_id, (B, L), device=device, generator=g)
        return x0, sample_t(B, device, antithetic=True, generator=g), args.seed + 1000 + i

    def step(fn, x0, t, seed):
        model.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = fn(model, schedule, x0, t, mask_id, torch.Generator(device=device).manual_seed(seed))
        loss.sum().backward()
        return loss.detach()

    paths = {"full": nelbo_full, "masked": nelbo_masked, "chunked": nelbo, "chunked_unpadded": nelbo_chunked_unpadded}
    for i in range(args.warmup):
        for fn in paths.values():
            step(fn, *inputs(-1 - i))
    times = {k: [] for k in paths}
    rows, max_rel = [], 0.0
    for i in range(args.repeats):
        x0, t, seed = inputs(i)
        g = torch.Generator(device=device).manual_seed(seed)
        rows.append(int((q_xt(x0, schedule.alpha(t), mask_id, g) == mask_id).sum()))
        out = {}
        for k in list(paths)[i % len(paths) :] + list(paths)[: i % len(paths)]:
            args_k = (paths[k], x0, t, seed)
            out[k], sec, _ = timed(lambda a=args_k: step(*a), device=device, warmup=0, repeats=1)
            times[k].append(sec)
        for k in list(paths)[1:]:
            max_rel = max(max_rel, float(((out[k] - out["full"]).abs() / out["full"].abs().clamp_min(1e-6)).max()))

    saved = {}  # bytes autograd keeps for the backward (distinct storages), on any device
    for k, fn in paths.items():
        storages = {}

        def pack(x, storages=storages):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            step(fn, *inputs(0))
        saved[k] = sum(storages.values())
    peak = {}
    if device.type == "cuda":
        x0, t, seed = inputs(0)
        for k, fn in paths.items():
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(fn, x0, t, seed)
            torch.cuda.synchronize()
            peak[k] = torch.cuda.max_memory_allocated() - base
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    n_mean = statistics.mean(rows)
    row = {
        "bench": "loss_head", "vocab": V, "d_model": args.d_model, "layers": args.layers, "heads": args.heads,
        "batch": B, "len": L, "time_cond": args.time_cond, "precision": precision, "repeats": args.repeats,
        "masked_rows_mean": n_mean, "masked_fraction": n_mean / (B * L),
        **{f"{k}_ms": v for k, v in ms.items()},
        "speedup": ms["full"] / ms["masked"], "chunked_speedup": ms["full"] / ms["chunked"],
        "pad_speedup": ms["chunked_unpadded"] / ms["chunked"],
        **{f"{k}_ms_all": [round(1e3 * s, 2) for s in v] for k, v in times.items()},
        "full_logits_bytes": B * L * V * 4, "masked_logits_bytes_mean": round(n_mean * V * 4),
        **{f"{k}_peak_bytes": peak.get(k) for k in paths}, **{f"{k}_saved_bytes": v for k, v in saved.items()},
        "max_rel_diff": max_rel,
        "command": " ".join(["python", "bench/loss_head.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": device.type, "compile_fallbacks": fallbacks(), **provenance(device),
    }
    if not args.no_append:
        append_rows(Path(__file__).parent / "results" / f"loss-head-{device.type}.jsonl", [row])
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
