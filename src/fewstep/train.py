"""The one training loop: MDLM and AR pre-training and every distillation method run through `fit`.

A task exposes `trainable() -> {name: module}`, `step(x0, step) -> ({name: loss}, logs)`, and optionally
`on_step_end(step)` and `validate(x0, generator) -> {"nats", "tokens"}`. The loop owns one AdamW per trained
module: each loss is back-propagated only into its own module (`backward(inputs=...)`), which is what alternating
two-player methods (IDLM's fake model, DiDi's discriminator) need, without any method touching optimizers, AMP,
clipping or checkpoints.

Exact resume: data batches are a pure function of the step (see data.stream), and the checkpoint holds weights,
EMA, optimizer moments and RNG states; a resumed run reproduces the uninterrupted run's losses.

Under torchrun, `train.parallel` picks data parallelism: "ddp" (every rank holds the full weights; gradients are
averaged by `_all_reduce_grads`) or "fsdp" (FSDP2: weights, gradients and optimizer moments sharded over ranks,
see fewstep.parallel). Both write the same checkpoint format.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from fewstep import checkpoint, parallel
from fewstep.compiled import fallbacks
from fewstep.config import FewstepError, RunConfig, to_dict
from fewstep.diffusion.sampling import autocast
from fewstep.models import rope_tables

# Dense bf16 tensor-core peaks; the first name found in the device name wins (PCIe and NVL parts before SXM).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device); under torchrun this joins the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def total_steps(cfg: RunConfig, unique_tokens: int) -> int:
    """max_steps, else the steps that show `unique_tokens` to the model `epochs` times, rounded up to a whole step
    (the run's summary records the exact `epochs_seen`)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.model.seq_len
    return max(1, math.ceil(unique_tokens * cfg.data.epochs / per_step))


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


PER_SEQUENCE = {"t_mlp", "ada", "ada_out"}  # time-conditioning modules: applied to one vector c per sequence


def flops_per_token(module: torch.nn.Module, seq_len: int, head_fraction: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward): 6N for the weights plus 12 * layers * d * L for attention,
    with the vocabulary head's 6 d V counted at `head_fraction` of the positions (the MDLM loss runs it on the masked
    rows only: counting it everywhere would credit FLOPs that are never computed) and the time-conditioning weights
    (adaLN, time MLP) at 1 / L: they act on one vector per sequence."""
    backbone = getattr(module, "backbone", module)
    head = getattr(backbone, "head", None)
    n_head = sum(p.numel() for p in head.parameters()) if isinstance(head, torch.nn.Module) else 0
    params = [(n_, p.numel()) for n_, p in module.named_parameters() if "embed" not in n_]
    n_seq = sum(k for n_, k in params if PER_SEQUENCE & set(n_.split(".")))
    n = sum(k for _, k in params) - n_head - n_seq
    d = backbone.embed.weight.shape[1]
    return 6 * (n + head_fraction * n_head + n_seq / seq_len) + 12 * backbone.n_layers * d * seq_len


def _swap(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            if parallel.is_sharded(p):  # FSDP holds its own reference to a shard: swap the values in place
                p, q = p.to_local(), q.to_local()
                tmp = p.clone()
                p.copy_(q)
                q.copy_(tmp)
            else:
                p.data, q.data = q.data, p.data


def set_deterministic(seed: int | None = None) -> None:
    """Deterministic mode: deterministic kernels and every RNG seeded, so the same seed gives the same losses and
    samples. Bit-exact on CPU for the same thread count; on CUDA ops without a deterministic kernel warn."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS GEMMs are reproducible only with it
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if seed is not None:
        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def _all_reduce_grads(params: list[torch.nn.Parameter], bucket_bytes: int = 64 * 2**20) -> None:
    """Average gradients over ranks in a few flat buckets (one collective per bucket, not one per tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    while grads:
        size, n = 0, 0
        while n < len(grads) and (n == 0 or size + grads[n].numel() * grads[n].element_size() <= bucket_bytes):
            size += grads[n].numel() * grads[n].element_size()
            n += 1
        bucket, grads = grads[:n], grads[n:]
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.AVG)
        for g, v in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(v.view_as(g))


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch onto the device. On CUDA through pinned memory and without blocking: a copy from pageable
    memory synchronises the stream, so the host would wait for the last step's optimizer before queueing this one."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def _mean_over_ranks(metrics: dict, device: torch.device) -> dict[str, float]:
    """Each metric's mean over the ranks (each saw its own share of the batch): one collective, keys sorted."""
    keys = sorted(metrics)
    v = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    torch_dist.all_reduce(v)
    return dict(zip(keys, (v / torch_dist.get_world_size()).tolist()))


def _finite_weights(modules: dict[str, torch.nn.Module], sharded_on: torch.device | None = None) -> list[str]:
    """Names of modules holding a non-finite parameter (a step that overflowed the weights themselves). With
    sharded weights (`sharded_on` the collective's device) each rank checks its shards and all ranks agree."""
    bad = torch.tensor([not all(bool(torch.isfinite(parallel.local(p)).all()) for p in m.parameters())
                        for m in modules.values()], dtype=torch.int32)
    if sharded_on is not None:
        bad = bad.to(sharded_on)
        torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)
    return [n for n, b in zip(modules, bad.tolist()) if b]


def _rng_state(device: torch.device, world: int = 1) -> dict[str, torch.Tensor]:
    """This process's RNG states; under torchrun every rank's (a collective), rank r > 0 as "cpu.r", "cuda.r"."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if world > 1:  # each rank draws its own noise: an exact resume restores every rank's generator
        gathered = {}
        for k, v in rng.items():  # byte tensors of one size on every rank (no pickling, even in transit)
            parts = [torch.empty_like(v.to(device)) for _ in range(world)]
            torch_dist.all_gather(parts, v.to(device))
            gathered.update({k if r == 0 else f"{k}.{r}": t.cpu() for r, t in enumerate(parts)})
        rng = gathered
    return rng


def _set_rng_state(rng: dict[str, torch.Tensor], device: torch.device, rank: int, seed: int, step: int) -> None:
    suffix = f".{rank}" if rank else ""
    if f"cpu{suffix}" in rng:
        torch.set_rng_state(rng[f"cpu{suffix}"])
        if f"cuda{suffix}" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng[f"cuda{suffix}"], device)
    else:  # a checkpoint from a run with fewer processes: a fresh, rank-specific stream (not an exact resume)
        torch.manual_seed((seed + rank * 1_000_003 + step) % 2**63)


def _row(line: str) -> dict | None:
    """One log line, or None for a blank or torn line (a SIGKILL in the middle of a write)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class _Logger:
    """JSONL metrics (plus TensorBoard when it is installed)."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.path = out_dir / "log.jsonl"
        if self.path.exists():  # drop lines a crashed run wrote after the checkpoint we resume from
            keep = [ln for ln in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if (row := _row(ln)) is not None and row.get("step", 0) <= resume_step]
            checkpoint.write_text_atomic(self.path, "".join(k + "\n" for k in keep))  # a kill loses no line
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except ImportError:
            pass

    def log(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def evaluate(task, val_data, batch_size: int, max_batches: int, device, per_seq: bool = False) -> dict:
    """Validation NLL per token (a NELBO bound for DLMs, exact for AR) with a fixed noise seed; where the task
    gives each sequence's nats (seq_nats), also val_nll_se, the standard error of val_nll over the sequences
    (genppl.ratio_se, the estimator gen PPL uses), and with per_seq the sequences' NLLs per token (val_seq_nll)."""
    gen = torch.Generator(device=device).manual_seed(1234)
    nats = tokens = 0.0
    seq = []  # per batch: (seq_nats (b,), tokens per sequence (b,))
    for x in val_data.iter_eval(batch_size, max_batches=max_batches):
        out = task.validate(x.to(device), gen)
        nats, tokens = nats + out["nats"], tokens + out["tokens"]
        if seq is not None and "seq_nats" in out:
            seq.append((out["seq_nats"], torch.full((x.shape[0],), out["tokens"] / x.shape[0], dtype=torch.float64)))
        else:
            seq = None
    if not tokens:
        raise FewstepError("the validation split has no block to score: rebuild the data with a larger "
                           "data.val_fraction or lower model.seq_len")
    nll = nats / tokens
    row = {"val_nll": nll, "val_ppl": math.exp(min(nll, 50.0))}
    if seq:
        from fewstep.eval.genppl import ratio_se

        a, b = (torch.cat(part) for part in zip(*seq))  # (N,) nats and tokens of each sequence
        se = ratio_se(a, b)
        row["val_nll_se"] = None if math.isnan(se) else se
        if per_seq:
            row["val_seq_nll"] = (a / b).tolist()
    return row


# Settings a resumed run may change: how it logs, evaluates, saves and runs, and how long it trains. Any other
# difference (data, model, optimiser, method) would splice two different runs into one log and one checkpoint.
RESUME_MAY_CHANGE = {"data.dir", "train.out_dir", "train.max_steps", "train.log_every", "train.eval_every",
                     "train.eval_batches", "train.ckpt_every", "train.keep_last", "train.nan_policy",
                     "train.compile", "train.parallel", "train.deterministic"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _resume_changes(old: dict, new: dict) -> list[str]:
    """The settings (dotted keys) that differ between the run being resumed and this one; a key the older run did
    not record is not a difference."""
    old, new = _flat(old), _flat(new)
    return [f"{k}={old[k]!r} -> {new[k]!r}" for k in sorted(new)
            if k in old and k not in RESUME_MAY_CHANGE and json.dumps(old[k]) != json.dumps(new[k])]


@contextlib.contextmanager
def _exclusive(out_dir: Path, rank: int):
    """Hold out_dir/.lock for the run (rank 0): a second run started into the same directory while the first is
    alive would interleave checkpoints and log lines. The lock dies with its process, so a killed run leaves none."""
    if rank != 0:
        yield
        return
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FewstepError(f"{out_dir} is in use by another running process: wait for it to finish or choose "
                               "another --train.out_dir") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fit(task, cfg: RunConfig, *, train_data, val_data=None, meta: dict, device: torch.device,
        rank: int = 0, world: int = 1) -> dict:
    """Train `task` for the configured steps; checkpoints and logs go to cfg.train.out_dir. Returns a summary."""
    with _exclusive(Path(cfg.train.out_dir), rank):
        return _fit(task, cfg, train_data=train_data, val_data=val_data, meta=meta, device=device, rank=rank,
                    world=world)


def _fit(task, cfg: RunConfig, *, train_data, val_data, meta: dict, device: torch.device, rank: int,
         world: int) -> dict:
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    if tc.deterministic:
        set_deterministic(tc.seed + rank)
    modules = task.trainable()
    fsdp = tc.parallel == "fsdp" and world > 1  # one process: nothing to shard
    if fsdp and (len(modules) > 1 or hasattr(task, "on_step_end")):
        raise FewstepError("train.parallel=fsdp trains one module without an on_step_end hook (pre-training and "
                           "single-student methods); use train.parallel=ddp for this method")
    for m in modules.values():
        m.train()
        if tc.compile:  # compiles forward in place; the state dict keeps its keys, so checkpoints are unchanged
            rope_tables(m)  # not lazily inside the compiled forward: that compiled it twice
            m.compile()
    micro = tc.batch_size // (world * tc.grad_accum)
    if micro * world * tc.grad_accum != tc.batch_size:
        raise FewstepError(f"train.batch_size={tc.batch_size} must be divisible by world size {world} x "
                           f"train.grad_accum={tc.grad_accum}")
    if train_data is None and tc.max_steps <= 0:  # no token budget to derive the step count from
        raise FewstepError("a data-free run needs train.max_steps > 0")
    total = total_steps(cfg, train_data.n_tokens if train_data is not None else 0)
    emas = {f"{n}_ema": copy.deepcopy(m).requires_grad_(False) for n, m in modules.items()} if tc.ema > 0 else {}
    specs = dict(meta.get("models", {}))
    specs.update({e: specs[e[:-4]] for e in emas if e[:-4] in specs})
    meta = {**meta, "run": to_dict(cfg), "models": specs}

    start, state = 0, None
    ckpt = checkpoint.latest(out_dir)
    if ckpt is not None:  # full weights are loaded before FSDP shards them
        old = checkpoint.read_meta(ckpt)
        if old.get("models") != specs or old.get("data", {}).get("tokenizer") != meta.get("data", {}).get("tokenizer"):
            raise FewstepError(f"{out_dir} holds a run with another model or data config: choose a new "
                               "--train.out_dir or delete the old run")
        changed = _resume_changes(old.get("run", {}), meta["run"])
        if changed:
            raise FewstepError(f"{out_dir} holds a run with other settings ({'; '.join(changed[:3])}): resume it "
                               "with its own settings, or choose a new --train.out_dir")
        state = checkpoint.load_training_state(ckpt, {**modules, **emas}, {})
    if fsdp:  # the EMA copies are sharded like their modules, so the EMA update stays shard by shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
        for m in [*modules.values(), *emas.values()]:
            parallel.shard(m, mesh)
    fused = device.type == "cuda"
    optims = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=tc.lr, betas=tc.betas,
                                   weight_decay=tc.weight_decay, fused=fused) for n, m in modules.items()}
    lr_scale = getattr(task, "lr_scale", dict)()  # {module: factor of train.lr}, e.g. a faster discriminator
    if state is not None:
        checkpoint.load_optimizers(ckpt, optims, state)
        for opt in optims.values() if fsdp else ():
            parallel.shard_optim_state_(opt)
        start = state["step"]
        _set_rng_state(state["rng"], device, rank, tc.seed, start)
    else:
        torch.manual_seed(tc.seed + rank)
    logger = _Logger(out_dir, start) if rank == 0 else None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(meta["run"], indent=2), encoding="utf-8")

    def save(step: int) -> None:
        bad = _finite_weights({**modules, **emas}, device if fsdp else None)  # the same list on every rank
        if bad:
            raise FewstepError(f"non-finite weights in {', '.join(bad)} after step {step}: not saved; last good "
                               f"checkpoint: {checkpoint.latest(out_dir) or 'none'}; lower train.lr")
        mods, opts = {**modules, **emas}, optims
        if fsdp:  # gather full tensors on every rank (collectives), keep them on rank 0: the one checkpoint format
            mods = {n: parallel.full_state(m.state_dict(), keep=rank == 0) for n, m in mods.items()}
            opts = {n: parallel.full_optim_state(o, keep=rank == 0) for n, o in opts.items()}
        rng = _rng_state(device, world)
        if rank == 0:
            checkpoint.save(out_dir, step, modules=mods, meta=meta, optimizers=opts, rng=rng,
                            keep_last=tc.keep_last)
        if world > 1:
            torch_dist.barrier()

    params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in modules.items()}
    precision = tc.precision if tc.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    tokens_per_step = tc.batch_size * cfg.model.seq_len
    first = next(iter(modules.values()))
    fpt = (flops_per_token(first, cfg.model.seq_len, getattr(task, "head_fraction", lambda: 1.0)())
           if hasattr(getattr(first, "backbone", first), "embed") else 0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda"
                 and k in torch.cuda.get_device_name(device)), None)
    summary: dict = {"steps": total, "start_step": start, "skipped": 0}
    if train_data is not None:  # whole steps: up to batch_size - 1 blocks past data.epochs (total_steps rounds up)
        summary["epochs_seen"] = total * tc.batch_size / train_data.n_blocks
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0, desc=out_dir.name)
    t0, s0 = time.perf_counter(), start  # the clock and the step it (re)started at
    for step in bar:
        lr = lr_at(step, total, tc)
        for name, opt in optims.items():
            for g in opt.param_groups:
                g["lr"] = lr * lr_scale.get(name, 1.0)
        sums: dict[str, torch.Tensor] = {}
        step_logs: dict = {}
        for k in range(tc.grad_accum):
            for m in modules.values() if fsdp else ():  # reduce-scatter once per step, after the last micro-batch
                m.set_requires_gradient_sync(k == tc.grad_accum - 1)
            x = (_to(train_data.batch(step * tc.grad_accum + k, micro, rank=rank, world=world, seed=tc.seed), device)
                 if train_data is not None else None)
            with autocast(device, precision):
                losses, logs = task.step(x, step)
            for name, loss in losses.items():
                if fsdp:  # one trained module; `inputs=` cannot name the weights FSDP gathers for the backward
                    (loss / tc.grad_accum).backward()
                else:
                    (loss / tc.grad_accum).backward(inputs=params[name])
                sums[name] = sums.get(name, 0.0) + loss.detach() / tc.grad_accum
            for key, v in logs.items():  # the step's metrics: means over its micro-batches
                step_logs[key] = step_logs.get(key, 0.0) + (v.detach() if torch.is_tensor(v) else v) / tc.grad_accum
        ok = True
        norms = {}
        for name, ps in params.items():
            if name not in losses:
                continue
            if world > 1 and not fsdp:  # FSDP has reduce-scattered the gradients already
                _all_reduce_grads(ps)
            norm = torch.nn.utils.clip_grad_norm_(ps, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            norms[name] = parallel.full(norm)  # the global norm (a replicated DTensor under FSDP)
        finite = torch.stack([torch.isfinite(v) for v in [*sums.values(), *norms.values()]]).all()
        if world > 1:  # every rank takes the same decision, also when only one rank's loss is non-finite
            finite = finite.to(torch.int32)
            torch_dist.all_reduce(finite, op=torch_dist.ReduceOp.MIN)
        if not bool(finite):
            ok = False
            bad = ", ".join(f"{n}={float(v):.4g}" for n, v in sums.items())
            if tc.nan_policy != "skip":
                bar.close()
                good = checkpoint.latest(out_dir)
                raise FewstepError(f"non-finite loss or gradient at step {step} ({bad}); last good checkpoint: "
                                   f"{good or 'none'}; lower train.lr or set train.nan_policy=skip")
            summary["skipped"] += 1
            if rank == 0:
                tqdm.write(f"step {step}: non-finite loss ({bad}), step skipped")
        for name, opt in optims.items():
            if ok and name in losses:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if ok and emas:
            with torch.no_grad():
                decay = min(tc.ema, (1 + step) / (10 + step))  # warmup: early EMA must not remember the init
                for n, m in modules.items():
                    torch._foreach_lerp_(list(emas[f"{n}_ema"].parameters()), list(m.parameters()), 1 - decay)
        if hasattr(task, "on_step_end"):
            task.on_step_end(step)
        done = step + 1
        if done % tc.log_every == 0 or done == total:
            metrics = {**{f"loss/{n}": v for n, v in sums.items()}, **step_logs}
            metrics = _mean_over_ranks(metrics, device) if world > 1 else {k: float(v) for k, v in metrics.items()}
        if rank == 0 and (done % tc.log_every == 0 or done == total):
            dt = time.perf_counter() - t0
            row = {"step": done, "lr": lr, **{k: v for k, v in metrics.items() if k.startswith("loss/")},
                   **{f"grad_norm/{n}": float(v) for n, v in norms.items()},
                   **{k: v for k, v in metrics.items() if not k.startswith("loss/")},
                   "tokens_per_s": tokens_per_step * (done - s0) / dt if done > s0 else None}
            if peak and fpt and row["tokens_per_s"]:
                row["mfu"] = row["tokens_per_s"] * fpt / (peak * world)
            if fallbacks():  # a compiled pass (fewstep.compiled) fell back to eager: this rate is not the compiled one
                row["compile_fallbacks"] = fallbacks()
            logger.log(row)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in row.items() if k.startswith("loss/")})
            summary.update(row)
            t0, s0 = time.perf_counter(), done
        if val_data is not None and hasattr(task, "validate") and (done % tc.eval_every == 0 or done == total):
            if rank == 0 or fsdp:  # a sharded forward needs every rank; they compute the same numbers
                ema = emas.get(f"{next(iter(modules))}_ema")
                model = next(iter(modules.values()))
                if ema is not None:
                    _swap(model, ema)
                model.eval()
                with autocast(device, precision):  # eval_batches x batch_size blocks, micro at a time: one
                    # validation set whatever the process count and accumulation
                    n_eval = tc.eval_batches * world * tc.grad_accum
                    row = {"step": done, **evaluate(task, val_data, micro, n_eval, device)}
                if fsdp:  # FSDP keeps the root's weights gathered after a forward with no backward: free them
                    model.reshard()
                model.train()
                if ema is not None:
                    _swap(model, ema)
                if rank == 0:
                    logger.log(row)
                summary.update(row)
            t0, s0 = time.perf_counter(), done  # evaluation and saving are not training time
        if done % tc.ckpt_every == 0 or done == total:
            save(done)
            t0, s0 = time.perf_counter(), done
    if logger is not None:
        logger.close()
    summary["out_dir"] = str(out_dir)
    return summary
