"""Sampling for masked diffusion LMs, and the one categorical draw every sampler in fewstep uses.

All categorical sampling happens in float64 in `sample_categorical`: float32 Gumbel noise truncates the tail and
silently lowers the effective temperature, which lowers entropy and flatters generative perplexity (Zheng et al.
2024, arXiv 2409.02908).

Ancestral MDLM step from t to s < t (Sahoo et al. 2024, Eq. 7): a masked position stays masked with probability
(1 - alpha_s)/(1 - alpha_t) and is otherwise unmasked to v with probability (alpha_s - alpha_t)/(1 - alpha_t) *
p_theta(x0 = v | x_t); unmasked positions never change. At s = 0 nothing stays masked. The step is drawn in two
stages with the same law: first which masked positions unmask (a float64 Bernoulli per position), then a token
for those positions only, so the float64 vocabulary-wide draw costs B L V once per sample, not once per step.
Which positions unmask at which step can also be drawn before the loop, with the same law (`unmask_plan`; the
default on CUDA): the loop then never reads a tensor back, so the host queues step after step without waiting.
Only the rows a step unmasks are read from the prediction, so a model that splits off its vocabulary head
(`splits_head`: MaskedDenoiser) runs its trunk on every position and the head on those rows alone (`row_head`,
the default), and a step that unmasks nothing makes no model call.
Vocabulary-wide float64 work is done in chunks of rows of at most `DRAW_CHUNK` elements to bound memory.

Uniform-state models (mask_id=None) start from uniform noise and draw every position from the posterior
q(z_s | z_t, x_theta) of diffusion/uniform.py (UDLM/Duo ancestral sampler).

Guidance (masked models only) is a hook, not a second sampler: an object with `tilt(k, steps, t, s, x_t, log_p)
-> log_p` (may reshape the prediction before the step) and `draw(k, steps, s, x_t, rows, log_p_rows, generator)
-> tokens (N,)` (may replace the token draw `draw_rows(log_p_rows, ...)` for the N flat positions `rows` of x_t
that unmask at this step, e.g. by re-ranking candidates). DiDi-Instruct's reward-guided ancestral sampler
(distill/rgas.py, `RGAS`) is one; with zero guidance it returns log_p unchanged and draws exactly like the plain
sampler, so the tokens are bit-identical for the same seed (tests/test_didi.py).

Confidence-based unmasking (`unmask="confidence"`, masked models only; LLaDA's low-confidence remasking, Nie et
al. 2025): at each step a token is drawn (float64) at every masked position, and only the n = round(move * M) drawn
tokens the model is most confident in (largest p_theta(x0^l = drawn | x_t)) are kept, with M the masked positions
and move = (alpha_s - alpha_t) / (1 - alpha_t) the ancestral step's expected unmasking fraction (so the count of
tokens per step follows the schedule; all at s = 0). `block` > 0 adds block-wise (semi-autoregressive) decoding:
blocks of `block` positions are decoded left to right, each with steps / n_blocks steps on its own grid 1 -> 0, and
only the current block's masked positions may unmask. The default `unmask="random", block=0` is the ancestral
sampler above, unchanged.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from fewstep.compiled import kernel
from fewstep.diffusion.uniform import posterior_probs
from fewstep.parallel import is_sharded

TINY = torch.finfo(torch.float64).tiny


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw from unnormalised probabilities (..., V) by an exponential race in float64: argmax_v p_v / E_v."""
    probs = probs.double()
    u = torch.rand(probs.shape, dtype=torch.float64, device=probs.device, generator=generator)
    e = (-torch.log1p(-u)).clamp_min(TINY)  # Exp(1); log1p(-u) is exact near u = 0, and u < 1 always
    return (probs / e).argmax(-1)  # TINY: u = 0 (p = 2^-53) would make 0 / 0 = NaN, which argmax picks


def filter_probs(log_p: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature and nucleus filtering of log-probabilities (..., V); returns float64 probabilities."""
    log_p = log_p.double()
    if temperature != 1.0:  # the row max out first: at a tiny T, log p / T overflows to -inf everywhere (NaN)
        log_p = ((log_p - log_p.amax(-1, keepdim=True)) / temperature).log_softmax(-1)
    p = log_p.exp()
    if top_p < 1.0:
        sorted_p, idx = p.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix with mass >= top_p
        outside[..., 0] = False  # the top token always stays (mass before it: 0)
        p = p.scatter(-1, idx, sorted_p.masked_fill(outside, 0.0))
        p = p / p.sum(-1, keepdim=True)
    return p


DRAW_CHUNK = 2**26  # float64 elements per chunk of rows (512 MiB): bounds the draw's memory at any batch size


def _race(log_p: torch.Tensor, u: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """sample_categorical's exponential race on exp(log_p / T - max), unnormalised (the argmax does not care):
    (N, V) -> (N,). The row max is subtracted first: at a low T, exp(log_p / T) underflows to 0 on a whole row
    (T = 1e-3 and p_max < 0.47), whose argmax would then be token 0. Compiled (`_fused_race`), it is one kernel
    that reads log_p twice and u once, with no float64 temporaries."""
    log_p = log_p.double()  # (N, V)
    p = ((log_p - log_p.amax(-1, keepdim=True)) * inv_temperature).exp()  # (N, V), max 1 (also as T -> 0)
    return (p / (-torch.log1p(-u)).clamp_min(TINY)).argmax(-1)


def _fused_race():
    return kernel(_race)


def draw_rows(log_p: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, generator=None, probs_fn=None,
              fused: bool = False):
    """Tokens (N,) drawn in float64 from rows of log-probabilities (N, V), chunk by chunk of rows.

    probs_fn(p, rows) -> unnormalised probabilities maps each chunk's filtered float64 probabilities p (rows: the
    chunk's slice of the N rows) before the draw; the uniform-state posterior uses it.
    fused: draw through one compiled kernel (`_race`) when there is no nucleus filter and no probs_fn. The
    uniforms come from the same `torch.rand` call, so the tokens are the unfused draw's (the two differ only in the
    float64 rounding of exp and a per-row scale, which could reorder an exact tie); the unfused path writes and
    reads about five (N, V) float64 temporaries, which is most of a one-step sample's time on a GPU.
    """
    n = max(1, DRAW_CHUNK // log_p.shape[-1])
    inv_t = min(1.0 / temperature, 1e300)  # finite: 0 (the row max) x inf would be NaN; past 1e300 it is argmax
    out = []
    for i in range(0, log_p.shape[0], n):
        if fused and top_p >= 1.0 and probs_fn is None:
            u = torch.rand(log_p[i : i + n].shape, dtype=torch.float64, device=log_p.device, generator=generator)
            if u.shape[0] == 1:  # a 1-row input is a new specialisation of the compiled kernel: draw it as 2 rows
                two = log_p[i : i + n].repeat(2, 1)[:2]  # a view, as every other chunk: the same guards
                out.append(_fused_race()(two, u.repeat(2, 1), inv_t)[:1])
                continue
            out.append(_fused_race()(log_p[i : i + n], u, inv_t))
            continue
        p = filter_probs(log_p[i : i + n], temperature, top_p)
        out.append(sample_categorical(p if probs_fn is None else probs_fn(p, slice(i, i + n)), generator))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=log_p.device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device):
    """Autocast off inside a bf16 training step: for a signal that is a small difference of two networks' outputs."""
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def sample(
    model,
    schedule,
    *,
    batch: int,
    length: int,
    steps: int,
    mask_id: int | None,
    greedy_tail: bool = False,
    cache: bool | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    times: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    return_trajectory: bool = False,
    on_step=None,
    guidance=None,
    unmask: str = "random",
    block: int = 0,
    fused_draw: bool | None = None,
    plan: bool | None = None,
    row_head: bool | None = None,
):
    """Ancestral sampling of a masked denoiser `model(x_t, t) -> log p(x0 | x_t)` from the all-mask state.

    times: a decreasing grid from 1 to 0 with steps + 1 points (default uniform). greedy_tail: argmax instead of a
    draw at the last step (Duo's greedy tail / MDLM's noise removal; lowers entropy, report it). cache: reuse the
    last prediction when no token changed and the model is not time-conditioned (MDLM's ddpm_cache); None picks
    it automatically (with the row head below, a step that changes nothing makes no call: nothing to reuse).
    on_step: called as on_step(k, t, s, x_t, log_p, x_s) after every step with the model's log p(x0 | x_t)
    (B, L, V) that drove it (distillation targets read the teacher's predictions from it).
    guidance: an object with `tilt` and `draw` (module docstring), or None for the plain ancestral sampler.
    unmask: "random" (ancestral) or "confidence"; block: block length for block-wise decoding (0 = one block); both
    are described in the module docstring (confidence-based decoding; masked models only). fused_draw: the
    ancestral draw as one compiled kernel (`draw_rows`; the same tokens); None = on CUDA only. plan: draw before
    the loop the step at which each masked position unmasks (`unmask_plan`: the same law, one host synchronisation
    per sample instead of one per step, so the loop never waits for the device); None = on CUDA only (it draws
    other tokens for a seed than the per-step draws). Ancestral unmasking only. row_head: run the model's trunk on
    every position but its vocabulary head and log-softmax only on the rows that unmask at this step, the only
    rows of the prediction the ancestral step reads (the same law; a step that unmasks nothing calls no model);
    needs `model(x_t, t, hidden=True)` and `model.head_log_probs` (`model.splits_head`), ancestral unmasking, no
    guidance, no on_step; None = whenever the model has them and is not sharded by FSDP (a product over fewer rows
    can round differently, so a seed may, rarely, draw another token than with the full head).
    Returns x0 (B, L), or (x0, trajectory) with trajectory a list of steps + 1 states.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    fused = device.type == "cuda" if fused_draw is None else fused_draw
    pairs, blocks = _confidence_plan(unmask, block, steps, length, times, mask_id, guidance)
    if times is None:
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if len(times) != steps + 1:
        raise ValueError(f"times must have steps + 1 = {steps + 1} points, got {len(times)}")
    times = [float(t) for t in times]  # host floats: the loop reads no tensor back
    alphas = [_alpha(schedule, t) for t in times]
    if cache is None:
        cache = not getattr(model, "time_conditioned", True)
    if guidance is not None and mask_id is None:
        raise ValueError("guidance is implemented for masked (absorbing) models only")
    if x_init is not None:
        x = x_init.clone().to(device)
    elif mask_id is None:  # uniform-state prior
        n_vocab = model.backbone.vocab_size
        x = torch.randint(0, n_vocab, (batch, length), device=device, generator=generator)
    else:
        x = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    trajectory = [x.clone()] if return_trajectory else None
    planned = None  # the rows each step unmasks, drawn up front
    if mask_id is not None and unmask == "random" and (device.type == "cuda" if plan is None else plan):
        moves = [_move(alphas[k], alphas[k + 1], times[k + 1]) for k in range(steps)]
        planned = unmask_plan(x, mask_id, moves, generator)
    rows_only = _rows_only(row_head, model, device, mask_id, unmask, guidance, on_step)
    pred, changed = None, True
    for k in range(steps):
        t, s = (times[k], times[k + 1]) if pairs is None else pairs[k]
        if rows_only:  # the trunk on every position, the head on the rows that unmask now
            greedy = k == steps - 1 and greedy_tail  # every masked position: planned[k] too when s = 0
            if planned is not None and not (greedy and s > 0):
                rows = planned[k]  # (N,)
            elif greedy:
                rows = (x == mask_id).reshape(-1).nonzero().squeeze(1)
            else:
                rows = _unmasking_rows(x == mask_id, _move(alphas[k], alphas[k + 1], s), generator)
            # a step that unmasks nothing reads no prediction: no model call. Every other step follows a change of
            # x since the last call, so the cache has nothing to reuse here.
            if rows.numel():
                with autocast(device, precision):
                    h = model(x, torch.full((x.shape[0],), t, device=device), hidden=True)  # (B, L, D)
                    lp = model.head_log_probs(h.flatten(0, 1)[rows])  # (N, V)
                x = _write(x, rows, lp.argmax(-1) if greedy else draw_rows(lp, temperature, top_p, generator,
                                                                             fused=fused))
            if trajectory is not None:
                trajectory.append(x.clone())
            continue
        if pred is None or changed or not cache:
            with autocast(device, precision):
                pred = model(x, torch.full((x.shape[0],), t, device=device))  # (B, L, V)
        log_p = pred if guidance is None else guidance.tilt(k, steps, t, s, x, pred)  # the cache keeps pred
        a_t, a_s = (alphas[k], alphas[k + 1]) if pairs is None else (_alpha(schedule, t), _alpha(schedule, s))
        if mask_id is None:
            if k == steps - 1 and greedy_tail:
                x_new = log_p.argmax(-1)
            else:
                post = functools.partial(_posterior_rows, z_t=x.reshape(-1), alpha_s=a_s if s > 0 else 1.0, alpha_t=a_t)
                x_new = draw_rows(log_p.flatten(0, 1), temperature, top_p, generator, post).view_as(x)
            if on_step is not None:
                on_step(k, t, s, x, log_p, x_new)
            x = x_new
            if trajectory is not None:
                trajectory.append(x.clone())
            continue
        masked = x == mask_id  # (B, L)
        move = _move(a_t, a_s, s)
        if k == steps - 1 and greedy_tail:
            x_new, changed = torch.where(masked, log_p.argmax(-1), x), True  # unmasked tokens never change
        elif unmask == "confidence":
            eligible = masked if blocks is None else masked & blocks[k].to(x.device)  # (B, L)
            x_new = confidence_step(log_p, x, eligible, move, temperature, top_p, generator)
            changed = bool((x_new != x).any())
        else:
            rows = _unmasking_rows(masked, move, generator) if planned is None else planned[k]  # (N,)
            lp = log_p.flatten(0, 1)[rows]  # (N, V)
            x_new = _write(x, rows, draw_rows(lp, temperature, top_p, generator, fused=fused) if guidance is None
                           else guidance.draw(k, steps, s, x, rows, lp, generator))
            changed = rows.numel() > 0
        if on_step is not None:
            on_step(k, t, s, x, log_p, x_new)
        x = x_new
        if trajectory is not None:
            trajectory.append(x.clone())
    return (x, trajectory) if return_trajectory else x


def _unmasking_rows(masked: torch.Tensor, move: float, generator=None) -> torch.Tensor:
    """The flat positions (N,) that one ancestral step unmasks: each masked one with probability `move` (float64)."""
    u = torch.rand(masked.shape, dtype=torch.float64, device=masked.device, generator=generator)
    return (masked & (u < move)).reshape(-1).nonzero().squeeze(1)


def _write(x: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x (B, L) with the flat positions `rows` (N,) set to `tokens` (N,); nothing else changes."""
    out = x.reshape(-1).clone()
    out[rows] = tokens
    return out.view_as(x)


def _rows_only(row_head, model, device, mask_id, unmask, guidance, on_step) -> bool:
    """Whether `sample` runs the head on the unmasking rows only (`row_head`; None: whenever it can)."""
    able = mask_id is not None and unmask == "random" and guidance is None and on_step is None
    has = getattr(model, "splits_head", False)  # MaskedDenoiser over a Transformer
    if row_head is None:  # not under FSDP: the head's weights are gathered by forward only
        return able and has and not is_sharded(next(iter(model.parameters()), None))
    if row_head and not (able and has):
        raise ValueError("row_head=True needs a model with splits_head (a MaskedDenoiser over a Transformer), "
                         "ancestral unmasking, no guidance and no on_step; pass row_head=None or False")
    return bool(row_head)


def _move(a_t: float, a_s: float, s: float) -> float:
    """P(masked -> token) of one ancestral step from t to s; at s = 0 nothing stays masked."""
    return 1.0 if s <= 0 else (a_s - a_t) / (1 - a_t)


def unmask_plan(x: torch.Tensor, mask_id: int, moves: list[float], generator=None) -> list[torch.Tensor]:
    """The flat positions that unmask at each of the K steps, drawn up front: K tensors (N_k,), ascending.

    Step k unmasks a still-masked position with probability move_k, independently of the tokens, so a masked
    position unmasks at the first k with u < c_k = 1 - prod_{j <= k} (1 - move_j), u ~ U[0, 1) once per position
    (never, if the grid ends above t = 0 and u >= c_{K-1}): the per-step Bernoulli draws' law. Sorting positions by
    that step gives each step's rows with one host synchronisation (the K counts), not one per step. x: (B, L).
    """
    K, n = len(moves), x.numel()
    c = 1 - torch.tensor([1 - m for m in moves], dtype=torch.float64).cumprod(0)  # (K,) non-decreasing
    u = torch.rand(n, dtype=torch.float64, device=x.device, generator=generator)  # (B L,)
    step = torch.searchsorted(c.to(x.device), u, right=True)  # (B L,): first k with u < c_k, K if none
    step = torch.where(x.reshape(-1) == mask_id, step, K)  # unmasked positions never unmask
    step, order = step.sort(stable=True)  # positions by step, ascending within a step
    bounds = torch.searchsorted(step, torch.arange(K + 1, device=x.device)).tolist()  # the one synchronisation
    return [order[bounds[k] : bounds[k + 1]] for k in range(K)]


def _confidence_plan(unmask, block, steps, length, times, mask_id, guidance):
    """(t, s) per step and the positions each step may unmask (L,) for block-wise decoding; (None, None) if plain."""
    if unmask not in ("random", "confidence"):
        raise ValueError(f"unmask must be 'random' or 'confidence', got {unmask!r}")
    if unmask == "confidence" and (mask_id is None or guidance is not None):
        raise ValueError("confidence-based unmasking is implemented for masked models without guidance")
    if block <= 0 or block >= length:
        return None, None
    if unmask != "confidence" or times is not None:
        raise ValueError("block-wise decoding needs unmask='confidence' and its own per-block time grid")
    n_blocks = -(-length // block)
    if steps % n_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the {n_blocks} blocks of {block} positions")
    per = steps // n_blocks
    grid = time_grid(per)
    pairs = [(float(grid[j]), float(grid[j + 1])) for _ in range(n_blocks) for j in range(per)]
    pos = torch.arange(length)
    blocks = [(pos // block == k // per) for k in range(steps)]  # (L,) bool each
    return pairs, blocks


def confidence_step(log_p, x, eligible, move: float, temperature=1.0, top_p=1.0, generator=None):
    """One confidence-based step: draw at every eligible position, keep the round(move * #eligible) most confident
    draws per row (all of them when move = 1), leave the rest masked. log_p (B, L, V), x and eligible (B, L)."""
    B, L = x.shape
    rows = eligible.reshape(-1).nonzero().squeeze(1)  # (N,) flat eligible positions
    lp = log_p.flatten(0, 1)[rows]  # (N, V)
    tok = draw_rows(lp, temperature, top_p, generator)  # (N,)
    conf = torch.full((B * L,), -float("inf"), dtype=torch.float64, device=x.device)
    conf[rows] = lp.gather(-1, tok[:, None]).squeeze(1).double()  # log p_theta of the drawn token
    count = eligible.sum(1)  # (B,)
    n = count if move >= 1 else torch.floor(count * move + 0.5).long()
    rank = conf.view(B, L).argsort(dim=-1, descending=True, stable=True).argsort(-1)  # (B, L): 0 = most confident
    drawn = x.reshape(-1).clone()
    drawn[rows] = tok
    return torch.where(eligible & (rank < n[:, None]), drawn.view(B, L), x)


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """Uniform decreasing grid t_start = t_0 > ... > t_steps = t_end (float64, steps + 1 points) for `times`.

    Any sub-interval of the sampling path is a valid grid, so a few-step student's large jump t_k -> t_{k+1} and
    a teacher's finer steps over the same interval (DDIM-like: the same path, fewer and larger steps) both come
    from here; `time_grid(steps)` is sample()'s default grid.
    """
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def _posterior_rows(p: torch.Tensor, rows: slice, *, z_t: torch.Tensor, alpha_s: float, alpha_t: float):
    return posterior_probs(p, z_t[rows], alpha_s, alpha_t)  # (N, V): the uniform-state posterior of these rows


def _alpha(schedule, t: float) -> float:
    return float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))
