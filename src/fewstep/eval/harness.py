"""One measurement of a checkpoint at one setting: samples, time, unigram entropy and generative perplexity.

Every number comes back with the settings that produced it (steps, sampler, greedy tail, precision, sample count,
seed), as the measurement protocol asks, so result rows can be compared and reported without guessing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fewstep.config import FewstepError
from fewstep.eval.entropy import unigram_entropy
from fewstep.eval.genppl import PROTOCOL, documents, generative_perplexity
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
    temperature: float = 1.0,
    guidance=None,
) -> dict:
    """Generate n samples (timed after one warm-up batch), then score them. Returns a result row.

    temperature: the sampler's (1 = the model's distribution); guidance: a masked-DLM sampling hook such as
    DiDi-Instruct's RGAS (`distill.rgas.RGAS`), whose `settings()` the row records."""
    from fewstep.pipeline import generate

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if guidance is not None and getattr(guidance, "temperature", temperature) != temperature:
        raise FewstepError(f"the guidance hook samples at temperature {guidance.temperature}, the sampler at "
                           f"{temperature}: build it with the same temperature")
    batch = min(batch or n, n)
    kw = dict(steps=steps, seed=seed, greedy_tail=greedy_tail, precision=precision, device=device,
              temperature=temperature, guidance=guidance)
    generate(model, meta, n=batch, batch=batch, **kw)  # warm-up: allocator, kernels, caches
    x, seconds, _ = timed(lambda: generate(model, meta, n=n, batch=batch, **kw), device=device, warmup=0)
    latency = seconds / (n // batch)  # one batch of `batch` rows
    if n % batch:  # the smaller last batch would pull the mean down: time one full batch on its own
        latency = timed(lambda: generate(model, meta, n=batch, batch=batch, **kw), device=device, warmup=0)[1]
    samples = x.tolist()
    is_ar = meta["kind"] == "ar"
    row = {
        "name": name or meta.get("name", "model"),
        "kind": meta["kind"],
        "ckpt": meta.get("ckpt"),
        "steps": x.shape[1] if is_ar else steps,
        "sampler": "ar-kv-cache" if is_ar else "ancestral",
        "greedy_tail": False if is_ar else greedy_tail,
        "temperature": temperature,
        "precision": precision,
        "sampling_dtype": "float64",
        "n_samples": n,
        "batch": batch,
        "seed": seed,
        "seq_len": x.shape[1],
        "device": str(device),
        "entropy": float(unigram_entropy(x).mean()),
        "latency_s": latency,  # one batch
        "seconds_per_sample": seconds / n,
        "tokens_per_s": x.numel() / seconds,
    }
    if guidance is not None and not is_ar:
        row.update(guidance.settings())
    if judge is not None:
        g = generative_perplexity([documents(ids, tokenizer, judge) for ids in samples], judge)
        row.update(gen_ppl=g["gen_ppl"], gen_ppl_log_se=g["nll_se"], judge=g["judge"], judge_tokens=g["n_tokens"],
                   judge_truncated=g["n_truncated"], genppl_protocol=PROTOCOL)
    row["example"] = tokenizer.decode(samples[0])[:160]
    return row


def evaluate_checkpoint(ckpt, *, steps=(1, 4, 16, 64), n: int = 64, batch: int | None = None,
                        judge: str | None = "smollm2", greedy_tail: bool = False, val_batches: int = 16,
                        val_mc: int = 4, tasks=(), task_n: int = 200, task_mc: int = 32, seed: int = 0,
                        precision: str = "fp32", device=None, data_dir: str | None = None,
                        name: str | None = None, log=print) -> list[dict]:
    """`fewstep eval`: validation PPL, then one `sample_eval` row per step count (one row for AR), then tasks.

    Every row carries the validation numbers (val_ppl, val_bound, val_mc, val_tokens) and its own settings.
    """
    from fewstep.checkpoint import _device, load_model
    from fewstep.data import get_tokenizer
    from fewstep.eval.judge import load_judge
    from fewstep.eval.likelihood import val_ppl
    from fewstep.eval.tasks import check_task_spec, run_task
    from fewstep.pipeline import check_steps

    # every argument before minutes of val PPL and sampling, not after
    check_steps(steps, n=n, batch=batch, seed=seed)
    for key, value, low in (("val-batches", val_batches, 0), ("val-mc", val_mc, 1), ("task-n", task_n, 1),
                            ("task-mc", task_mc, 1)):
        if value < low:
            raise FewstepError(f"--{key}={value} must be >= {low}")
    for spec in tasks:
        check_task_spec(spec)
    if data_dir is not None and not (Path(data_dir) / "meta.json").is_file():
        raise FewstepError(f"--data-dir {data_dir} is not a built data dir (no meta.json): fewstep data first")
    device = _device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision if device.type == "cuda" else "fp32"  # bf16 autocast is CUDA-only: record what ran
    model, meta = load_model(ckpt, device)
    tok = get_tokenizer(meta["data"]["tokenizer"])
    name = name or f"{meta['kind']}:{meta['ckpt']}"
    j = None if judge in (None, "", "none") else load_judge(judge, device)
    val = {}
    if val_batches > 0:
        val = val_ppl(model, meta, data_dir, max_batches=val_batches, mc=val_mc, device=device, precision=precision)
        log(f"val_ppl {val['val_ppl']:.3f} ({'NELBO bound' if val['val_bound'] else 'exact'}, "
            f"{val['val_tokens']:,} tokens)")
    rows = []
    for k in [1] if meta["kind"] == "ar" else steps:  # AR: one row; its steps are its length
        row = sample_eval(model, meta, steps=k, n=n, tokenizer=tok, judge=j, batch=batch, seed=seed,
                          greedy_tail=greedy_tail, precision=precision, device=device, name=name)
        rows.append({**row, **val})
        log(f"steps {row['steps']}: gen_ppl {row.get('gen_ppl')} entropy {row['entropy']:.3f}")
    for spec in tasks:
        row = run_task(spec, model, meta, tok, n=task_n, mc=task_mc, seed=seed, data_dir=data_dir, device=device)
        rows.append({"name": name, "ckpt": meta["ckpt"], **row})
        log(f"task {row['task']}: acc {row['acc']:.3f} ({row['n_items']} items)")
    return rows
