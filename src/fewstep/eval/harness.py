"""One measurement of a checkpoint at one setting: samples, time, unigram entropy and generative perplexity.

Every number comes back with the settings that produced it (steps, sampler, greedy tail, precision, sample count,
seed), as the measurement protocol asks, so result rows can be compared and reported without guessing.
"""

from __future__ import annotations

import torch

from fewstep.eval.entropy import unigram_entropy
from fewstep.eval.genppl import generative_perplexity
from fewstep.eval.speed import timed


def sample_eval(
    model,
    meta: dict,
    *,
    steps: int,
    n: int,
    tokenizer,
    judge=None,
    batch: int | None = None,
    seed: int = 0,
    greedy_tail: bool = False,
    precision: str = "fp32",
    device=None,
    name: str | None = None,
) -> dict:
    """Generate n samples (timed after one warm-up batch), then score them. Returns a result row."""
    from fewstep.pipeline import generate

    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch = min(batch or n, n)
    kw = dict(steps=steps, seed=seed, greedy_tail=greedy_tail, precision=precision, device=device)
    generate(model, meta, n=batch, batch=batch, **kw)  # warm-up: allocator, kernels, caches
    x, seconds, _ = timed(lambda: generate(model, meta, n=n, batch=batch, **kw), device=device, warmup=0)
    texts = [tokenizer.decode(ids) for ids in x.tolist()]
    is_ar = meta["kind"] == "ar"
    row = {
        "name": name or meta.get("name", "model"),
        "kind": meta["kind"],
        "ckpt": meta.get("ckpt"),
        "steps": x.shape[1] if is_ar else steps,
        "sampler": "ar-kv-cache" if is_ar else "ancestral",
        "greedy_tail": False if is_ar else greedy_tail,
        "precision": precision,
        "sampling_dtype": "float64",
        "n_samples": n,
        "batch": batch,
        "seed": seed,
        "seq_len": x.shape[1],
        "device": str(device),
        "entropy": float(unigram_entropy(x).mean()),
        "latency_s": seconds / -(-n // batch),  # one batch
        "seconds_per_sample": seconds / n,
        "tokens_per_s": x.numel() / seconds,
    }
    if judge is not None:
        g = generative_perplexity(texts, judge)
        row.update(gen_ppl=g["gen_ppl"], judge=g["judge"], judge_tokens=g["n_tokens"])
    row["example"] = texts[0][:160]
    return row
