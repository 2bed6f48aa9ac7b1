"""Speed benchmark: a DLM's batch latency over a grid of sampling steps against KV-cached AR, in one run.

Protocol (DESIGN.md): wall-clock latency of generating one batch of `length` tokens, CUDA-synchronised, warm-up
excluded, median of `repeats`; DLM, our KV-cached AR model and (when transformers is installed) HF `generate`
measured in the same process on the same device. `speedup_vs_ar` = AR latency / DLM latency at the same batch
and length, from this run only. A length sweep times both at several lengths (rows of kind "length_sweep").

Warm-up: the DLM is warmed once per batch size with a 2-step run (same shapes and kernels as any step count, so
the timed runs need no per-setting warm-up, which at 1024 steps would double the cost); AR and HF are warmed
with one full generation at each (batch, length). The DLM sampler is the real one (float64 draws, MDLM's cache
of unchanged predictions for models without time conditioning), so the numbers include its overheads.
"""

from __future__ import annotations

import json
import sys

import torch

from fewstep.compiled import fallbacks
from fewstep.config import FewstepError
from fewstep.eval.speed import provenance, timed

# Model shapes for random-weight runs. owt-small-shape: the MDLM/SDTT/Duo OWT model (GPT-2 small, ~160M
# parameters with untied embeddings) at L = 1024; tiny: a CPU smoke test of the same code path.
PRESETS = {
    "owt-small-shape": dict(n_layers=12, d_model=768, n_heads=12, vocab=50257, length=1024,
                            steps=[2**i for i in range(11)], batches=[1, 32], lengths=[128, 256, 512, 1024, 2048],
                            sweep_steps=[1, 16, 128]),
    "tiny": dict(n_layers=2, d_model=64, n_heads=2, vocab=257, length=64, steps=[1, 2, 4, 8, 16, 32, 64],
                 batches=[1, 8], lengths=[16, 32, 64, 128], sweep_steps=[1, 8]),
}  # fmt: skip


def random_models(preset: str, device, seed: int = 0):
    """(dlm, ar) of a preset's shape with random weights, both in eval mode on `device`."""
    from fewstep.config import ModelConfig
    from fewstep.models import build_model

    p = PRESETS[preset]
    out = []
    for kind in ("mdlm", "ar"):
        torch.manual_seed(seed)
        cfg = ModelConfig(kind=kind, seq_len=p["length"], d_model=p["d_model"], n_layers=p["n_layers"],
                          n_heads=p["n_heads"])
        out.append(build_model(cfg, p["vocab"]).to(device).eval())
    return out


def hf_random_gpt2(preset: str, device):
    """A transformers GPT-2 of the preset's shape with random weights (no download), or None without transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    p = PRESETS[preset]
    cfg = GPT2Config(vocab_size=p["vocab"], n_positions=max(p["lengths"] + [p["length"]]) + 1, n_embd=p["d_model"],
                     n_layer=p["n_layers"], n_head=p["n_heads"], bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(device).eval()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _row(name, kind, sampler, *, batch, length, seconds, times, device, precision, **extra) -> dict:
    return {"name": name, "kind": kind, "sampler": sampler, "batch": batch, "seq_len": length,
            "latency_s": seconds, "latency_all_s": times, "tokens_per_s": batch * length / seconds,
            "device": str(device), "precision": precision, **extra}


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


@torch.no_grad()
def time_dlm(model, *, batch, length, steps, device, precision="fp32", repeats=1, schedule="loglinear",
             guidance=None) -> dict:
    """Latency of sampling one (batch, length) from all-mask in `steps` ancestral steps (no warm-up here);
    with `guidance` (DiDi-Instruct's RGAS) the guided sampler, discriminator calls included."""
    from fewstep.diffusion.sampling import sample
    from fewstep.diffusion.schedule import get_schedule

    gen = torch.Generator(device=device).manual_seed(0)
    cuda = torch.device(device).type == "cuda"
    fused = cuda and guidance is None  # RGAS draws through its own hook
    row_head = guidance is None and bool(getattr(model, "splits_head", False))  # RGAS reads every row
    fn = lambda: sample(model, get_schedule(schedule), batch=batch, length=length, steps=steps,
                        mask_id=model.mask_id, generator=gen, device=device, precision=precision, guidance=guidance,
                        fused_draw=fused, plan=cuda, row_head=row_head)
    _, sec, times = timed(fn, device=device, warmup=0, repeats=repeats)
    return _row("mdlm", "mdlm", "ancestral" if guidance is None else "rgas", batch=batch, length=length,
                seconds=sec, times=times, device=device, precision=precision, steps=steps, greedy_tail=False,
                sampling_dtype="float64", fused_draw=fused, unmask_plan=cuda, row_head=row_head,
                compile_fallbacks=fallbacks())


@torch.no_grad()
def time_ar(model, *, batch, length, device, precision="fp32", repeats=1, warmup=1, compile=False,
            cuda_graph=None) -> dict:
    """Latency of generating `length` tokens after one BOS with our KV-cached AR sampler; compile: its decode
    step compiled (ar_sample(compile=...); compiled during the warm-up, not again by the timed runs); cuda_graph:
    ar_sample's (None: on CUDA)."""
    from fewstep.ar import ar_sample

    gen = torch.Generator(device=device).manual_seed(0)
    fn = lambda: ar_sample(model, batch=batch, length=length, bos_id=0, generator=gen, device=device,
                           precision=precision, compile=compile, cuda_graph=cuda_graph)
    _, sec, times = timed(fn, device=device, warmup=warmup, repeats=repeats)
    return _row("ar-kv-cache", "ar", "ar-kv-cache", batch=batch, length=length, seconds=sec, times=times,
                device=device, precision=precision, sampling_dtype="float64", ar_compiled=bool(compile),
                ar_cuda_graph=cuda_graph if cuda_graph is not None else torch.device(device).type == "cuda")


@torch.no_grad()
def time_hf(lm, *, batch, length, device, precision="fp32", repeats=1, warmup=1) -> dict:
    """Latency of HF `generate` (KV cache, multinomial sampling, exactly `length` new tokens)."""
    x = torch.zeros(batch, 1, dtype=torch.long, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and device.type == "cuda" else None

    def fn():
        kw = dict(attention_mask=torch.ones_like(x), do_sample=True, top_k=0, max_new_tokens=length,
                  min_new_tokens=length, pad_token_id=0, use_cache=True)
        if ctx is None:
            return lm.generate(x, **kw)
        with ctx:
            return lm.generate(x, **kw)

    _, sec, times = timed(fn, device=device, warmup=warmup, repeats=repeats)
    return _row("hf-generate", "ar", "hf-generate", batch=batch, length=length, seconds=sec, times=times,
                device=device, precision=precision, sampling_dtype="model dtype")


def run_bench(dlm, ar=None, hf=None, *, steps, batches, length, lengths=(), sweep_steps=(1,), device,
              precision="fp32", repeats=1, warmup=1, log=print, guidance=None, on_row=None,
              ar_compile=False, ar_cuda_graph=None) -> list[dict]:
    """The whole grid: DLM at steps x batches, AR and HF at each batch, then the length sweep (smallest batch).
    ar_compile: time the AR sampler with its decode step compiled; ar_cuda_graph: replay it from a CUDA graph
    (None: on CUDA).

    A setting that runs out of memory gives a row with error="oom" instead of ending the run. on_row(row) is
    called as each row is final, so a run cut off by a time limit keeps what it measured.
    """
    device = torch.device(device)
    common = dict(device=device, precision=precision)

    def attempt(fn, model, **kw):
        try:
            row = fn(model, **common, **kw, **({"guidance": guidance} if fn is time_dlm and guidance else {}))
        except RuntimeError as e:
            if not _oom(e):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row = {"name": fn.__name__[5:], "error": "oom", **kw}
        log(f"  {row['name']} {kw} -> {row.get('latency_s', row.get('error'))}")
        return row

    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for b in batches:
        ref = {}
        if ar is not None:
            ref["ar"] = attempt(time_ar, ar, batch=b, length=length, repeats=repeats, warmup=warmup,
                                compile=ar_compile, cuda_graph=ar_cuda_graph)
        if hf is not None:
            ref["hf"] = attempt(time_hf, hf, batch=b, length=length, repeats=repeats, warmup=warmup)
        for r in ref.values():
            emit({**r, "name": f"{r['name']} B={b}"})  # no steps: a reference line
        for _ in range(warmup):
            attempt(time_dlm, dlm, batch=b, length=length, steps=2)
        for k in steps:
            row = attempt(time_dlm, dlm, batch=b, length=length, steps=k, repeats=repeats)
            for key, r in ref.items():
                if "latency_s" in r and "latency_s" in row:
                    row["speedup_vs_ar" if key == "ar" else "speedup_vs_hf"] = r["latency_s"] / row["latency_s"]
            emit({**row, "name": f"mdlm B={b}", "kind": "mdlm", "steps": k, "batch": b})
    b = min(batches)
    for n in lengths:
        if ar is not None:
            r = attempt(time_ar, ar, batch=b, length=n, repeats=repeats, warmup=warmup, compile=ar_compile,
                        cuda_graph=ar_cuda_graph)
            emit({**r, "kind": "length_sweep", "model_kind": r.get("kind", "ar"), "seq_len": n, "batch": b})
        for k in sweep_steps:
            attempt(time_dlm, dlm, batch=b, length=n, steps=min(k, 2))  # warm-up at this shape
            r = attempt(time_dlm, dlm, batch=b, length=n, steps=k, repeats=repeats)
            emit({**r, "name": f"mdlm T={k}", "steps": k, "kind": "length_sweep", "model_kind": "mdlm",
                  "seq_len": n, "batch": b})
    return rows


def bench_models(preset: str | None, ckpt: str | None, ar_ckpt: str | None, hf: str | None, device):
    """(dlm, ar, hf, info) from a preset with random weights or from checkpoints; hf: None, 'random' or a spec."""
    info: dict = {}
    if preset:
        dlm, ar = random_models(preset, device)
        info.update(preset=preset, weights="random")
    else:
        from fewstep.checkpoint import load_model

        dlm, dmeta = load_model(ckpt, device)
        if dmeta["kind"] != "mdlm":
            raise FewstepError(f"--ckpt must be an MDLM checkpoint, got a {dmeta['kind']!r} one")
        ar, ameta = load_model(ar_ckpt, device) if ar_ckpt else (None, {"kind": "ar", "data": dmeta["data"]})
        if ameta["kind"] != "ar":
            raise FewstepError(f"--ar-ckpt must be an AR checkpoint, got a {ameta['kind']!r} one")
        if (ameta["data"].get("tokenizer"), ameta["data"].get("vocab_size")) != (
                dmeta["data"].get("tokenizer"), dmeta["data"].get("vocab_size")):
            raise FewstepError(f"--ar-ckpt uses tokenizer {ameta['data'].get('tokenizer')!r} but --ckpt "
                               f"{dmeta['data'].get('tokenizer')!r}: their tokens (and latencies) would not compare")
        info.update(ckpt=dmeta["ckpt"], ar_ckpt=ar_ckpt, weights="checkpoint")
    lm = None
    if hf == "random" and preset:
        lm = hf_random_gpt2(preset, device)
    elif hf and hf != "random":
        from fewstep.eval.judge import load_judge

        lm = getattr(load_judge(hf, device).model, "lm", None)  # the transformers model inside the judge
        if lm is None:
            raise FewstepError(f"--hf {hf!r}: give 'random', 'smollm2' or 'hf:<path or id>'")
    info.update(params_dlm=_params(dlm), params_ar=_params(ar) if ar is not None else None,
                params_hf=_params(lm) if lm is not None else None, hf=hf if lm is not None else None)
    return dlm, ar, lm, info


def _ints(s: str, what: str) -> list[int]:
    from fewstep.config import int_list

    return [] if str(s).strip() == "none" else int_list(s, what)


def add_args(p) -> None:
    """The benchmark's command-line options (shared by `fewstep bench` and bench/speed.py)."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model shape for --random-weights")
    p.add_argument("--random-weights", action="store_true", help="time a preset's shape with random weights")
    p.add_argument("--ckpt", default=None, help="DLM checkpoint (instead of a preset)")
    p.add_argument("--ar-ckpt", default=None, help="AR checkpoint of the same size (with --ckpt)")
    p.add_argument("--hf", default=None, help="'random' (preset-shaped GPT-2, needs transformers), "
                   "'smollm2', 'hf:<id>' or 'none'; default: random with a preset when transformers is installed")
    for name, help_ in [("steps", "DLM step grid"), ("batches", "batch sizes"), ("lengths", "length sweep"),
                        ("sweep-steps", "DLM steps in the length sweep")]:
        p.add_argument(f"--{name}", default=None, help=f"{help_}, comma-separated, or none (default: the preset's)")
    p.add_argument("--length", type=int, default=None, help="generated tokens per sequence")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--eager", action="store_true", help="CUDA: keep float32 weights under autocast and no CUDA "
                   "graphs (default: bf16 weights, DLM call and AR decode step replayed from CUDA graphs)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the DLM's call and the AR decode "
                   "step (the step takes the KV cache as tensors, so it compiles when a shape first appears, in "
                   "the warm-up, not per generation; on CUDA it is still replayed from a CUDA graph)")
    p.add_argument("--device", default=None)
    add_guide_args(p)


def add_guide_args(p) -> None:
    """`--guide` options of `fewstep sample` and `fewstep bench`: DiDi-Instruct's reward-guided ancestral sampler
    (distill/rgas.py, RGAS); defaults are the reference implementation's settings."""
    p.add_argument("--guide", default=None, help="DiDi-Instruct run or step dir: sample with reward-guided "
                   "ancestral sampling (RGAS) using its discriminator")
    p.add_argument("--guide-scale", default="30,40", help="RGAS tilt scale h_0,h_1 over the early steps (0,0: none)")
    p.add_argument("--guide-candidates", type=int, default=4, help="RGAS re-ranking candidates M (1: none)")
    p.add_argument("--guide-rerank", type=float, default=0.5, help="RGAS: fraction of the steps (the last ones) "
                   "that re-rank candidates instead of tilting")


def bench_from_args(args, log=print, on_row=None) -> tuple[list[dict], dict]:
    """Run the benchmark an argparse namespace describes; returns (rows, summary), rows with provenance.

    on_row(row) receives each row, with its provenance, as soon as it is measured."""
    import importlib.util

    if (args.preset is None) == (args.ckpt is None):
        raise FewstepError("give either --preset NAME --random-weights or --ckpt DLM [--ar-ckpt AR]")
    if args.preset and not args.random_weights:
        raise FewstepError("--preset times random weights: add --random-weights")
    for key, low in (("repeats", 1), ("warmup", 0), ("length", 1)):
        if getattr(args, key) is not None and getattr(args, key) < low:
            raise FewstepError(f"--{key}={getattr(args, key)} must be >= {low}")
    if args.hf not in (None, "random", "none", "smollm2") and not str(args.hf).startswith("hf:"):
        raise FewstepError(f"--hf {args.hf!r}: give 'random', 'smollm2', 'hf:<path or id>' or 'none'")
    from fewstep.checkpoint import _device

    device = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p = PRESETS.get(args.preset or "", {})
    pick = lambda key, default: (_ints(getattr(args, key), "--" + key.replace("_", "-")) if getattr(args, key)
                                 else p.get(key, default))
    grid = dict(steps=pick("steps", [1, 4, 16, 64]), batches=pick("batches", [1]), lengths=pick("lengths", []),
                sweep_steps=pick("sweep_steps", [1]))
    for key, values in grid.items():
        if any(v < 1 for v in values) or (key == "batches" and not values):
            raise FewstepError(f"--{key.replace('_', '-')}={','.join(map(str, values)) or 'none'}: give "
                               f"{'at least one value, each' if key == 'batches' else 'values'} >= 1")
    precision = "bf16" if args.precision != "fp32" and device.type == "cuda" else "fp32"  # autocast: CUDA only
    hf = args.hf or ("random" if args.preset and importlib.util.find_spec("transformers") else None)
    dlm, ar, lm, info = bench_models(args.preset, args.ckpt, args.ar_ckpt, None if hf == "none" else hf, device)
    fast = device.type == "cuda" and not getattr(args, "eager", False)
    compile_ = bool(getattr(args, "compile", False))
    from fewstep.models.inference import for_inference

    dlm = for_inference(dlm, device, bf16=fast, compile=compile_, cuda_graph=fast)
    if fast:
        ar = ar.to(torch.bfloat16) if ar is not None else None
        lm = lm.to(torch.bfloat16) if lm is not None else None
    info.update(weights_dtype="bf16" if fast else "fp32", cuda_graphs=fast, dlm_compiled=compile_)
    length = args.length or p.get("length") or dlm.backbone.seq_len
    meta = {**info, **provenance(device), "repeats": args.repeats, "warmup": args.warmup, "command": " ".join(sys.argv)}
    guidance = None
    if getattr(args, "guide", None):
        from fewstep.diffusion.schedule import get_schedule
        from fewstep.distill.rgas import rgas_from_args

        guidance = rgas_from_args(args, dlm, get_schedule(), device)
        meta.update(guide=args.guide, guide_scale=args.guide_scale, guide_candidates=args.guide_candidates,
                    guide_rerank=args.guide_rerank)
    log(f"bench on {meta['device_name']} ({precision}), length {length}: {json.dumps(grid)}")
    rows = run_bench(dlm, ar, lm, length=length, device=device, precision=precision, repeats=args.repeats,
                     warmup=args.warmup, log=log, guidance=guidance, ar_compile=compile_, ar_cuda_graph=fast,
                     on_row=(lambda r: on_row({**r, **meta})) if on_row is not None else None, **grid)
    rows = [{**r, **meta} for r in rows]
    dl = [r for r in rows if r.get("kind") == "mdlm" and "latency_s" in r]
    summary = {**{k: meta[k] for k in ("git_sha", "device_name", "time")}, "preset": args.preset,
               "length": length, "precision": precision, "rows": len(rows),
               "one_step_latency_s": {r["batch"]: r["latency_s"] for r in dl if r["steps"] == 1},
               "max_speedup_vs_ar": max((r.get("speedup_vs_ar", 0) for r in dl), default=None),
               "oom": sum(r.get("error") == "oom" for r in rows)}
    return rows, summary
