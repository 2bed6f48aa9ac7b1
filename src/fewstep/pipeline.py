"""Library entry points behind the CLI: pre-train a model from a config, and generate from any checkpoint."""

from __future__ import annotations

import torch

from fewstep.config import FewstepError, RunConfig


def data_meta(cfg: RunConfig, rank: int = 0, world: int = 1) -> dict:
    """Build the corpus if needed (rank 0 only) and return what checkpoints record about it."""
    from fewstep.data import ensure, load_meta

    if rank == 0:
        meta = ensure(cfg.data)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        meta = load_meta(cfg.data.dir)
    keys = ("tokenizer", "vocab_size", "eos_id", "corpus")
    return {k: meta[k] for k in keys if k in meta} | {"dir": cfg.data.dir}


def pretrain(cfg: RunConfig) -> dict:
    """Train an MDLM or AR model (cfg.model.kind) with the one training loop; returns the run summary."""
    from fewstep.ar import ARObjective
    from fewstep.data import TokenBlocks
    from fewstep.diffusion.objective import DiffusionObjective
    from fewstep.diffusion.schedule import get_schedule
    from fewstep.models import build_model, model_spec
    from fewstep.train import fit, init_distributed

    rank, world, device = init_distributed()
    dmeta = data_meta(cfg, rank, world)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, dmeta["vocab_size"]).to(device)
    if cfg.model.kind in ("mdlm", "uniform"):
        task = DiffusionObjective(model, get_schedule(cfg.model.schedule), cfg.train.antithetic)
    else:
        task = ARObjective(model)
    train = TokenBlocks(cfg.data.dir, "train", cfg.model.seq_len, cfg.data.unique_tokens)
    val = TokenBlocks(cfg.data.dir, "val", cfg.model.seq_len)
    meta = {"models": {"model": model_spec(cfg.model, dmeta["vocab_size"])}, "data": dmeta}
    summary = fit(task, cfg, train_data=train, val_data=val, meta=meta, device=device, rank=rank, world=world)
    summary.update(params=sum(p.numel() for p in model.parameters()), unique_tokens=train.n_tokens)
    return summary


def check_sampling(*, n, steps, length, batch, seed, temperature, top_p) -> None:
    """One clear line for sampling arguments that would otherwise fail deep inside a sampler."""
    import math

    rules = [(n >= 1, "n", n, ">= 1"), (steps >= 1, "steps", steps, ">= 1"),
             (length is None or length >= 1, "length", length, ">= 1"),
             (batch is None or batch >= 1, "batch", batch, ">= 1"),
             (-(2**63) <= seed < 2**64, "seed", seed, "in [-2**63, 2**64)"),
             (math.isfinite(temperature) and temperature > 0, "temperature", temperature, "finite and > 0"),
             (0 < top_p <= 1, "top_p", top_p, "in (0, 1]")]
    for ok, name, value, rule in rules:
        if not ok:
            raise FewstepError(f"sampling argument {name}={value!r} is invalid: must be {rule}")


def check_steps(steps, *, n: int, batch: int | None = None, seed: int = 0) -> None:
    """A step list and the sample settings used with each of its step counts, before any work."""
    if not steps:
        raise FewstepError("--steps: give at least one step count")
    for k in steps:
        check_sampling(n=n, steps=k, length=None, batch=batch, seed=seed, temperature=1.0, top_p=1.0)


@torch.no_grad()
def generate(model, meta: dict, *, n: int, steps: int, length: int | None = None, batch: int | None = None,
             seed: int = 0, greedy_tail: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             precision: str = "fp32", device=None, guidance=None) -> torch.Tensor:
    """n samples (n, L) from a loaded checkpoint: ancestral sampling for DLMs, KV-cached sampling for AR.
    guidance: a sampling hook for masked DLMs (diffusion/sampling.sample), e.g. DiDi-Instruct's RGAS."""
    from fewstep.ar import ar_sample
    from fewstep.diffusion.sampling import sample
    from fewstep.diffusion.schedule import schedule_of

    check_sampling(n=n, steps=steps, length=length, batch=batch, seed=seed, temperature=temperature, top_p=top_p)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    length = length or meta["model"]["seq_len"]
    batch = min(batch or n, n)
    gen = torch.Generator(device=device).manual_seed(seed)
    schedule = schedule_of(meta)  # diffusion kinds only; unused for AR
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        if meta["kind"] == "ar":
            x = ar_sample(model, batch=b, length=length, bos_id=meta["data"]["eos_id"], generator=gen,
                          temperature=temperature, top_p=top_p, device=device, precision=precision)
        elif meta["kind"] in ("mdlm", "uniform"):
            x = sample(model, schedule, batch=b, length=length, steps=steps, mask_id=model.mask_id,
                       greedy_tail=greedy_tail, temperature=temperature, top_p=top_p, generator=gen, device=device,
                       precision=precision, guidance=guidance)
        else:
            raise FewstepError(f"cannot sample a model of kind '{meta['kind']}'")
        out.append(x.cpu())
    return torch.cat(out)
