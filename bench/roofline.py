"""Roofline floor of one denoising step and how close fewstep's step gets to it (GPU; a CPU run is a smoke test).

    python bench/roofline.py --preset owt-small-shape          # ~160M MDLM, batch 1, L = 1024, bf16, H100

Floor of one model call at batch B and length L, from numbers measured in this run:
  FLOPs  = 2 B L N_mm + 4 B L^2 d n_layers            (N_mm: weights used in matmuls, output head included;
                                                       the attention term counts Q K^T and A V, bidirectional)
  bytes  = 2 N_mm + 4 B L V + bytes of the per-layer activations (bf16, each read and written once)
  floor  = max(FLOPs / R_mm, bytes / BW)               (R_mm: bf16 matmul rate, BW: device-to-device copy rate)
  step floor = floor + 20 B L V / BW                    (the update's float64 draw over every row: uniforms
                                                       written and read, float32 log-probs read)
R_mm is measured twice: on a large 8192^3 product (the device's best) and on this model's own matmul shapes at
M = B L (what this step can hope for); the floor uses the best rate, the ratio to the shape rate is also given.
The head's product is also timed with N = V padded to a multiple of 64 (`head_matmul`): what an aligned
vocabulary would gain at inference.
Each variant of the step is timed CUDA-synchronised, median of repeats after warm-up. Two 64-step samples, with
the unmasking steps drawn up front and drawn (and read back) step by step, give the cost of a read-back per step;
4- and 64-step samples with the vocabulary head on the unmasking rows only and on every row, what the row head saves.
The last line printed is JSON; with --append it is also appended to bench/results/roofline-<preset>.jsonl with the
git SHA and device. A SIGTERM while the variants are timed (bench/gpu_checks.sh's time limit) ends the timing and
still writes the row, with the variants measured so far and "cut": true.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fewstep.compiled import fallbacks
from fewstep.diffusion.sampling import draw_rows, filter_probs, sample, sample_categorical
from fewstep.diffusion.schedule import get_schedule
from fewstep.eval.bench import PRESETS, random_models
from fewstep.eval.speed import Cut, append_rows, provenance, sigterm_cuts, timed
from fewstep.models.inference import GraphedDenoiser, capture


def matmul_rate(m: int, k: int, n: int, device, repeats: int = 20) -> float:
    """Measured bf16 FLOP/s of an (m, k) @ (k, n) product."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    fn = lambda: [a @ b for _ in range(repeats)]
    if torch.device(device).type == "cuda":  # replayed from a graph: launch overhead is not the matmul's
        fn = cuda_graph(fn)
    _, sec, _ = timed(fn, device=device, warmup=2, repeats=3)
    return 2 * m * k * n * repeats / sec


def copy_bandwidth(device, n_bytes: int = 2**30) -> float:
    """Measured device-to-device copy rate in bytes/s, counting bytes read and written."""
    x = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    _, sec, _ = timed(lambda: y.copy_(x), device=device, warmup=2, repeats=5)
    return 2 * x.numel() * 2 / sec


def step_cost(model, batch: int, length: int) -> dict:
    """FLOPs, bytes and matmul shapes of one forward of `model` (a MaskedDenoiser over the fewstep Transformer)."""
    bb = model.backbone
    d, n_layers, vocab = bb.embed.weight.shape[1], bb.n_layers, bb.vocab_size
    mm = [(n, p) for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    n_mm = sum(p.numel() for _, p in mm)
    tokens = batch * length
    flops = 2 * tokens * n_mm + 4 * batch * length**2 * d * n_layers
    act = 2 * tokens * d * 12 * n_layers * 2  # ~12 (B, L, d) bf16 tensors per layer, each written and read
    bytes_ = 2 * n_mm + 4 * tokens * vocab + act
    draw = 20 * tokens * vocab  # one-step update: float64 uniforms written and read (16 B) + float32 log-probs read
    shapes = [(tokens, p.shape[1], p.shape[0]) for _, p in mm]  # (M, K, N) of every matmul, repeats included
    return {"flops": flops, "bytes": bytes_, "draw_bytes": draw, "n_matmul_params": n_mm, "shapes": shapes,
            "head_shape": (tokens, d, vocab)}


def cuda_graph(fn, *args):
    """Capture fn(*args) (static inputs) in a CUDA graph; returns replay() -> the static output."""
    graph, out = capture(fn, *args, warmup=3)

    def replay():
        graph.replay()
        return out

    return replay


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="owt-small-shape")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--append", action="store_true", help="append the JSON line to bench/results/")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    length = PRESETS[args.preset]["length"]
    dlm, _ = random_models(args.preset, device)
    cost = step_cost(dlm, args.batch, length)
    log = lambda m: print(m, file=sys.stderr, flush=True)

    r_peak = matmul_rate(8192, 8192, 8192, device, repeats=5 if cuda else 1) if cuda else matmul_rate(
        512, 512, 512, device, 2)
    rates = {s: matmul_rate(*s, device, repeats=10) for s in set(cost["shapes"])}
    t_shapes = sum(2 * m * k * n / rates[(m, k, n)] for m, k, n in cost["shapes"])  # the model's matmuls alone
    m, k, n = cost["head_shape"]  # the vocabulary head: N = V (50,258 = GPT-2 + mask is not a multiple of 8)
    head_rates = {"vocab": n, "rate": rates[(m, k, n)], "rate_padded_to_64": matmul_rate(m, k, n + -n % 64, device,
                                                                                          repeats=10)}
    log(f"head matmul {m}x{k}x{n}: {head_rates['rate'] / 1e12:.0f} TFLOP/s; N padded to a multiple of 64: "
        f"{head_rates['rate_padded_to_64'] / 1e12:.0f} TFLOP/s")
    bw = copy_bandwidth(device, 2**30 if cuda else 2**24)
    floor_compute, floor_memory = cost["flops"] / r_peak, cost["bytes"] / bw
    floor = max(floor_compute, floor_memory)
    step_floor = floor + cost["draw_bytes"] / bw  # the ancestral update's float64 draw, after the model call
    log(f"R_mm {r_peak / 1e12:.0f} TFLOP/s, BW {bw / 1e12:.2f} TB/s, floor {floor * 1e3:.3f} ms "
        f"(compute {floor_compute * 1e3:.3f}, memory {floor_memory * 1e3:.3f}); "
        f"with the draw {step_floor * 1e3:.3f} ms")

    x = torch.full((args.batch, length), dlm.mask_id, device=device)
    t = torch.ones(args.batch, device=device)
    variants: dict[str, float] = {}

    def time_it(name, fn=None, make=None, repeats=None):
        """make: builds fn (a CUDA-graph capture) inside the try, so a capture that fails is reported too."""
        try:
            fn = make() if make is not None else fn
            _, sec, _ = timed(fn, device=device, warmup=3, repeats=repeats or args.repeats)
        except Exception as e:  # a variant that does not run on this device/build is reported, not fatal
            log(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            variants[name] = None
            return
        variants[name] = sec
        log(f"{name}: {sec * 1e3:.3f} ms ({sec / floor:.2f}x floor)")

    cut = False
    try:  # a time limit (gpu_checks.sh) keeps the variants measured so far
        with sigterm_cuts(), torch.no_grad():
            ac = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
            with ac:
                time_it("forward fp32 weights + autocast", lambda: dlm(x, t))
                time_it("backbone only fp32 weights + autocast", lambda: dlm.backbone(x, None))
            sched = get_schedule("loglinear")
            gen = torch.Generator(device=device).manual_seed(0)
            step = lambda m, prec, fused=None, steps=1, plan=None, row_head=None: sample(  # None: the default
                m, sched, batch=args.batch, length=length, steps=steps, mask_id=m.mask_id, generator=gen, device=device,
                precision=prec, fused_draw=False if args.no_compile else fused, plan=plan, row_head=row_head)
            time_it("sampler step fp32 weights + autocast", lambda: step(dlm, "bf16"))
            half = dlm.to(torch.bfloat16)
            time_it("forward bf16 weights", lambda: half(x, t))
            time_it("sampler step bf16 weights", lambda: step(half, "fp32"))
            if cuda:
                time_it("forward bf16 weights, CUDA graph", make=lambda: cuda_graph(half, x, t))
            if cuda:
                g_eager = GraphedDenoiser(half)
                time_it("sampler step bf16 weights, CUDA graph", lambda: step(g_eager, "fp32"))
            if not args.no_compile:
                comp = torch.compile(half)
                time_it("forward bf16 weights, compiled", lambda: comp(x, t))
                if cuda:
                    time_it("forward bf16 weights, compiled + CUDA graph", make=lambda: cuda_graph(comp, x, t))
                time_it("sampler step bf16 weights, compiled", lambda: step(comp, "fp32"))
                if cuda:
                    g_comp = GraphedDenoiser(half, compile=True)
                    time_it("sampler step bf16 weights, compiled + CUDA graph", lambda: step(g_comp, "fp32"))
                    time_it("sampler step bf16 weights, compiled + CUDA graph, unfused draw",
                            lambda: step(g_comp, "fp32", False))
                    time_it("sampler step bf16 weights, compiled + CUDA graph, full head",
                            lambda: step(g_comp, "fp32", row_head=False))
            fast = cuda and not args.no_compile  # 64 steps: what reading back each step's rows costs (sample(plan=))
            den, tag = (g_comp, "compiled + CUDA graph") if fast else (half, "eager")
            for plan in (True, False):
                time_it(f"64-step sample bf16 weights, {tag}, {'planned' if plan else 'per-step'} unmasking",
                        lambda p=plan: step(den, "fp32", steps=64, plan=p), repeats=5)
            for k in (4, 64):  # the head on the unmasking rows only (sample(row_head=), the default) against every row
                for rh in (True, False):
                    time_it(f"{k}-step sample bf16 weights, {tag}, {'row' if rh else 'full'} head",
                            lambda k=k, rh=rh: step(den, "fp32", steps=k, row_head=rh), repeats=5)
            logp = half(x, t)
            time_it("float64 draw over (B, L, V)", lambda: sample_categorical(filter_probs(logp), gen))
            if not args.no_compile:
                time_it("float64 draw over (B, L, V), fused",
                        lambda: draw_rows(logp.flatten(0, 1), generator=gen, fused=True))
    except Cut:
        cut = True
        log("cut by SIGTERM: the row keeps the variants measured so far")

    ok = {k: v for k, v in variants.items() if v}
    best_step = min((v for k, v in ok.items() if k.startswith("sampler")), default=None)
    best_fwd = min((v for k, v in ok.items() if k.startswith("forward")), default=None)
    row = {"preset": args.preset, "batch": args.batch, "seq_len": length, **{k: cost[k] for k in
           ("flops", "bytes", "n_matmul_params")}, "matmul_rate_peak": r_peak, "matmul_time_model_shapes_s": t_shapes,
           "head_matmul": head_rates,
           "copy_bandwidth": bw, "floor_s": floor, "floor_compute_s": floor_compute, "floor_memory_s": floor_memory,
           "draw_bytes": cost["draw_bytes"], "step_floor_s": step_floor,
           "variants_s": variants, "best_forward_s": best_fwd, "best_step_s": best_step,
           "best_forward_over_floor": best_fwd / floor if best_fwd else None,
           "best_step_over_floor": best_step / floor if best_step else None,
           "best_step_over_step_floor": best_step / step_floor if best_step else None,
           "compile_fallbacks": fallbacks(), "cut": cut, **provenance(device)}
    if args.append:
        append_rows(Path(__file__).parent / "results" / f"roofline-{args.preset}.jsonl", [row])
    print(json.dumps(row, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
