"""Likelihood of held-out text: validation perplexity and per-sequence log-likelihoods for tasks.

Validation (DESIGN.md): on the held-out 'val' split, exact next-token NLL for AR models and the MDLM NELBO for
DLMs (Sahoo et al. 2024, Eq. 10). The NELBO is an upper bound on the NLL, so the DLM's val PPL is an upper bound
on its perplexity; it is estimated with `mc` antithetic time samples per sequence (the objectives' `validate`,
through `train.evaluate`, so training and `fewstep eval` report the same quantity).

Per-sequence (tasks, lm-eval): log p(continuation | context). AR: exact, sum of next-token log-probs. DLM: minus
the NELBO of x0 = [EOS, context, continuation] with the context never masked, so only continuation positions are
noised and scored:
    log p(c | ctx) >= -E_t [ w(t) * sum_{l in c, x_t^l = m} -log p_theta(x0^l | x_t) ],  w(t) = -alpha'_t/(1-alpha_t)
estimated with K antithetic draws (stratified times t_k, or for models without time conditioning stratified
masked-token counts l_k, the same bound with bounded weights; see `_dlm_logprob`). Sequences
are right-padded with mask tokens to the model's training length (positions that are never revealed, i.e. the
unknown rest of the block), so a score does not depend on what else is in the batch. Every row draws its noise
from its own seed: rows with the same seed share t's and masks (common random numbers), which makes comparisons
between the endings of one multiple-choice item far less noisy than independent estimates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fewstep.config import FewstepError
from fewstep.diffusion.sampling import autocast
from fewstep.eval.judge import module_device


def objective(model, meta: dict):
    """The pre-training objective of a loaded checkpoint; its `validate` is the validation metric."""
    from fewstep.ar import ARObjective
    from fewstep.diffusion.objective import DiffusionObjective
    from fewstep.diffusion.schedule import schedule_of

    if meta["kind"] == "ar":
        return ARObjective(model)
    if meta["kind"] in ("mdlm", "uniform"):  # the masked NELBO, or the uniform-state one: both are bounds
        return DiffusionObjective(model, schedule_of(meta))
    raise FewstepError(f"no likelihood for a model of kind '{meta['kind']}'")


class _MonteCarlo:
    """`validate` averaged over K independent NELBO draws (K time samples per sequence): same bound, less noise."""

    def __init__(self, task, k: int):
        self.task, self.k = task, k

    def validate(self, x0: torch.Tensor, generator: torch.Generator) -> dict:
        outs = [self.task.validate(x0, generator) for _ in range(self.k)]
        return {"nats": sum(o["nats"] for o in outs) / self.k, "tokens": outs[0]["tokens"],
                "seq_nats": sum(o["seq_nats"] for o in outs) / self.k}


@torch.no_grad()
def val_ppl(model, meta: dict, data_dir: str | None = None, *, batch_size: int = 16, max_batches: int = 16,
            mc: int = 4, device=None, precision: str = "fp32") -> dict:
    """Validation NLL/PPL on the held-out split (NELBO bound for DLMs with `mc` time samples, exact for AR), its
    standard error over the held-out sequences (val_nll_se: the spread of the sequences and, for a bound, of its
    time samples) and each sequence's NLL per token (val_seq_nll, in order: two models scored on the same data dir
    with the same batches can be compared sequence by sequence)."""
    from fewstep.data import TokenBlocks
    from fewstep.data.stream import check_tokens
    from fewstep.models import evaluating
    from fewstep.train import evaluate

    device = torch.device(device) if device is not None else module_device(model)
    task = objective(model, meta)
    is_ar = meta["kind"] == "ar"
    if not is_ar and mc > 1:
        task = _MonteCarlo(task, mc)
    seq_len = meta["model"]["seq_len"]
    val = TokenBlocks(data_dir or meta["data"]["dir"], "val", seq_len)
    check_tokens(data_dir or meta["data"]["dir"], meta["data"], val.meta)
    with evaluating(model), autocast(device, precision):
        out = evaluate(task, val, batch_size, max_batches, device, per_seq=True)
    n_seq = min(val.n_blocks, batch_size * max_batches)
    return {**out, "val_bound": not is_ar, "val_mc": 1 if is_ar else mc,
            "val_tokens": n_seq * (seq_len - 1 if is_ar else seq_len)}


def _pack(meta: dict, contexts, continuations, pad_id: int, fixed_len: int | None):
    """Rows [EOS, context, continuation], context cut from the left to fit the model's length.

    Returns x (N, L) long, score (N, L) bool (continuation positions) and the row lengths.
    """
    seq_len, eos = meta["model"]["seq_len"], meta["data"]["eos_id"]
    limit = seq_len + 1 if meta["kind"] == "ar" else seq_len  # AR scores x[1:] from x[:-1]: L + 1 tokens fit
    rows = []
    for ctx, cont in zip(contexts, continuations):
        cont = list(cont)
        if not cont:
            raise FewstepError("empty continuation: nothing to score")
        if len(cont) + 1 > limit:
            raise FewstepError(f"continuation of {len(cont)} tokens does not fit the model's length {seq_len}")
        keep = limit - 1 - len(cont)
        ctx = list(ctx)[-keep:] if keep > 0 else []
        rows.append(([eos, *ctx], cont))
    L = fixed_len or max(len(a) + len(b) for a, b in rows)
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    score = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (a, b) in enumerate(rows):
        x[i, : len(a) + len(b)] = torch.tensor(a + b)
        score[i, len(a) : len(a) + len(b)] = True
    return x, score


def _ar_logprob(model, x: torch.Tensor, score: torch.Tensor, device, precision):
    """Exact log p(continuation | context) and whether greedy decoding reproduces it. x, score: (B, L)."""
    x, score = x.to(device), score.to(device)
    with autocast(device, precision):
        logits = model(x[:, :-1]).float()  # (B, L-1, V)
    tgt, m = x[:, 1:], score[:, 1:]
    lp = F.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1).double()  # (B, L-1)
    greedy = ((logits.argmax(-1) == tgt) | ~m).all(-1)
    return (lp * m).sum(-1).cpu(), greedy.cpu()


def _dlm_logprob(model, schedule, x0, score, seeds, mc, device, precision, eps=1e-5):
    """Minus the NELBO of the scored positions, averaged over mc antithetic draws per row. x0, score: (B, L).

    A model without time conditioning uses the discrete form of the same bound (LLaDA, Nie et al. 2025, Eq. 6):
    integrating t out of Eq. 10 for n scored tokens gives E_t[w(t) f(M_t)] = sum_l (1/l) E[f(M) | |M| = l] for
    ANY schedule, i.e. l ~ U{1..n}, a uniform l-subset masked, weight n / l. Same expectation, and its weights are
    bounded by n where w(t) = 1/t is not, so short continuations (one word, one answer) get far less noise.
    A time-conditioned model needs t itself: t is stratified and masks drawn from q(x_t | x0) (Eq. 10 directly).
    """
    from fewstep.diffusion.schedule import weight

    B, L = x0.shape
    u0 = torch.empty(B, dtype=torch.float64)
    u_pos = torch.empty(B, mc, L, dtype=torch.float64)
    for i, s in enumerate(seeds):  # per-row generators: same seed -> same t's and masks (common random numbers)
        g = torch.Generator().manual_seed(int(s))
        u0[i] = torch.rand((), generator=g, dtype=torch.float64)
        u_pos[i] = torch.rand(mc, L, generator=g, dtype=torch.float64)
    strata = (u0[:, None] + torch.arange(mc, dtype=torch.float64) / mc) % 1  # (B, K) antithetic in [0, 1)
    if getattr(model, "time_conditioned", True):
        t = eps + (1 - eps) * strata
        masked = (u_pos < (1 - schedule.alpha(t))[..., None]) & score[:, None]  # (B, K, L): continuation only
        w = weight(schedule, t)  # (B, K)
    else:
        n = score.sum(-1, keepdim=True).double()  # (B, 1) scored tokens
        n_masked = 1 + (strata * n).floor()  # (B, K) uniform on 1..n
        rank = u_pos.masked_fill(~score[:, None], 2.0).argsort(-1).argsort(-1)  # random order, scored first
        masked = rank < n_masked[..., None]  # (B, K, L) a uniform subset of n_masked scored positions
        t, w = n_masked / n, n / n_masked
    pad = x0 == model.mask_id  # right padding: mask tokens that are never revealed nor scored
    x_t = torch.where(masked | pad[:, None], model.mask_id, x0[:, None])  # (B, K, L)
    x_t, t = x_t.view(B * mc, L).to(device), t.reshape(B * mc).to(device)
    with autocast(device, precision):
        log_p = model(x_t, t.float())  # (B*K, L, V) float32
    tgt = x0.to(device).repeat_interleave(mc, 0)
    nll = -log_p.gather(-1, tgt[..., None]).squeeze(-1).double()  # (B*K, L)
    nll = torch.where(masked.view(B * mc, L).to(device), nll, torch.zeros_like(nll))
    est = w.reshape(B * mc).to(device) * nll.sum(-1)  # (B*K,) one NELBO draw each
    return -est.view(B, mc).mean(-1).cpu()


@torch.no_grad()
def dlm_greedy_fill(model, x: torch.Tensor, fill: torch.Tensor, per_step: int = 1, schedule=None) -> torch.Tensor:
    """Fill the positions `fill` (B, L) of x by confidence-ordered greedy decoding: each forward unmasks the
    `per_step` most confident masked positions to their argmax token. Returns the filled x (B, L). A
    time-conditioned model is told the t whose masked fraction 1 - alpha_t is the fill's (`schedule`, as the
    sampler's grid from 1 to 0 over the fill; the fraction itself when None)."""
    x = torch.where(fill, model.mask_id, x)
    n0 = fill.sum(-1).clamp_min(1)  # (B,)
    while True:
        remaining = (x == model.mask_id) & fill
        n = remaining.sum(-1)
        if not bool(n.any()):
            return x
        frac = (n.double() / n0).float()  # (B,) masked fraction of the fill
        t = frac if schedule is None else schedule.time_of(1 - frac)
        conf, pred = model(x, t).max(-1)  # (B, L)
        conf = conf.masked_fill(~remaining, -math.inf)
        k = min(per_step, int(n.max()))
        top = conf.topk(k, -1).indices  # (B, k)
        ok = remaining.gather(-1, top)  # rows with fewer than k left skip the extra picks
        x.scatter_(-1, top, torch.where(ok, pred.gather(-1, top), x.gather(-1, top)))


@torch.no_grad()
def continuation_logprob(model, meta: dict, contexts, continuations, *, mc: int = 32, seeds=None, seed: int = 0,
                         batch_size: int = 32, greedy: bool = False, device=None, precision: str = "fp32"):
    """log p(continuation | context) per request, in nats (float64 (N,)); a lower bound (in expectation) for DLMs.

    contexts, continuations: lists of token-id lists (a context may be empty: EOS is always prepended).
    seeds: one noise seed per request (DLM only; default seed + index). greedy: also return (N,) bool, whether
    greedy decoding reproduces the continuation (AR: argmax at every position; DLM: `dlm_greedy_fill`).
    batch_size: rows per forward pass (a DLM request takes mc rows).
    """
    device = torch.device(device) if device is not None else module_device(model)
    is_ar = meta["kind"] == "ar"
    if not is_ar and meta["kind"] != "mdlm":
        raise FewstepError(f"continuation log-likelihoods (tasks) support 'mdlm' and 'ar' models, not "
                           f"'{meta['kind']}' (val PPL does)")
    pad = meta["data"]["eos_id"] if is_ar else model.mask_id
    x, score = _pack(meta, contexts, continuations, pad, None if is_ar else meta["model"]["seq_len"])
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(x))]
    schedule = None if is_ar else objective(model, meta).schedule
    lps, greedys = [], []
    rows = batch_size if is_ar else max(1, batch_size // mc)  # a DLM request is mc rows of the forward batch
    for b in range(0, len(x), rows):
        xb, sb = x[b : b + rows], score[b : b + rows]
        if is_ar:
            lp, gr = _ar_logprob(model, xb, sb, device, precision)
            greedys.append(gr)
        else:
            lp = _dlm_logprob(model, schedule, xb, sb, seeds[b : b + rows], mc, device, precision)
        lps.append(lp)
    if greedy and not is_ar:
        for b in range(0, len(x), batch_size):
            xb, sb = x[b : b + batch_size], score[b : b + batch_size]
            with autocast(device, precision):
                filled = dlm_greedy_fill(model, xb.to(device), sb.to(device), schedule=schedule)
            greedys.append((filled.cpu() == xb).all(-1))
    lp = torch.cat(lps).double()
    return (lp, torch.cat(greedys)) if greedy else lp
