"""Sampling for masked diffusion LMs, and the one categorical draw every sampler in fewstep uses.

All categorical sampling happens in float64 in `sample_categorical`: float32 Gumbel noise truncates the tail and
silently lowers the effective temperature, which lowers entropy and flatters generative perplexity (Zheng et al.
2024, arXiv 2409.02908).

Ancestral MDLM step from t to s < t (Sahoo et al. 2024, Eq. 7): a masked position stays masked with probability
(1 - alpha_s)/(1 - alpha_t) and is otherwise unmasked to v with probability (alpha_s - alpha_t)/(1 - alpha_t) *
p_theta(x0 = v | x_t); unmasked positions never change. At s = 0 nothing stays masked.

Uniform-state models (mask_id=None) start from uniform noise and draw every position from the posterior
q(z_s | z_t, x_theta) of diffusion/uniform.py (UDLM/Duo ancestral sampler).
"""

from __future__ import annotations

import contextlib

import torch

from fewstep.diffusion.uniform import posterior_probs


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw from unnormalised probabilities (..., V) by an exponential race in float64: argmax_v p_v / E_v."""
    probs = probs.double()
    u = torch.rand(probs.shape, dtype=torch.float64, device=probs.device, generator=generator)
    e = -torch.log1p(-u)  # Exp(1); log1p(-u) is exact near u = 0, and u < 1 always
    return (probs / e).argmax(-1)


def filter_probs(log_p: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature and nucleus filtering of log-probabilities (..., V); returns float64 probabilities."""
    log_p = log_p.double()
    if temperature != 1.0:
        log_p = (log_p / temperature).log_softmax(-1)
    p = log_p.exp()
    if top_p < 1.0:
        sorted_p, idx = p.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix with mass >= top_p
        p = p.scatter(-1, idx, sorted_p.masked_fill(outside, 0.0))
        p = p / p.sum(-1, keepdim=True)
    return p


def autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
):
    """Ancestral sampling of a masked denoiser `model(x_t, t) -> log p(x0 | x_t)` from the all-mask state.

    times: a decreasing grid from 1 to 0 with steps + 1 points (default uniform). greedy_tail: argmax instead of a
    draw at the last step (Duo's greedy tail / MDLM's noise removal; lowers entropy, report it). cache: reuse the
    last prediction when no token changed and the model is not time-conditioned (MDLM's ddpm_cache); None picks
    it automatically. on_step: called as on_step(k, t, s, x_t, log_p, x_s) after every step with the model's
    log p(x0 | x_t) (B, L, V) that drove it (distillation targets read the teacher's predictions from it).
    Returns x0 (B, L), or (x0, trajectory) with trajectory a list of steps + 1 states.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if times is None:
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if len(times) != steps + 1:
        raise ValueError(f"times must have steps + 1 = {steps + 1} points, got {len(times)}")
    if cache is None:
        cache = not getattr(model, "time_conditioned", True)
    if x_init is not None:
        x = x_init.clone().to(device)
    elif mask_id is None:  # uniform-state prior
        n_vocab = model.backbone.vocab_size
        x = torch.randint(0, n_vocab, (batch, length), device=device, generator=generator)
    else:
        x = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    trajectory = [x.clone()] if return_trajectory else None
    log_p, changed = None, True
    for k in range(steps):
        t, s = float(times[k]), float(times[k + 1])
        if log_p is None or changed or not cache:
            with autocast(device, precision):
                log_p = model(x, torch.full((x.shape[0],), t, device=device))  # (B, L, V)
        a_t, a_s = _alpha(schedule, t), _alpha(schedule, s)
        if mask_id is None:
            x = log_p.argmax(-1) if k == steps - 1 and greedy_tail else sample_categorical(
                posterior_probs(filter_probs(log_p, temperature, top_p), x, a_s if s > 0 else 1.0, a_t), generator)
            if trajectory is not None:
                trajectory.append(x.clone())
            continue
        masked = x == mask_id  # (B, L)
        if k == steps - 1 and greedy_tail:
            x0 = log_p.argmax(-1)
        else:
            p = filter_probs(log_p, temperature, top_p)  # (B, L, V) float64
            q = p * ((a_s - a_t) / (1 - a_t))
            q[..., mask_id] = 0.0 if s <= 0 else (1 - a_s) / (1 - a_t)  # at s = 0 nothing stays masked
            x0 = sample_categorical(q, generator)
        x_new = torch.where(masked, x0, x)  # unmasked tokens never change
        changed = bool((x_new != x).any()) if cache else True
        if on_step is not None:
            on_step(k, t, s, x, log_p, x_new)
        x = x_new
        if trajectory is not None:
            trajectory.append(x.clone())
    return (x, trajectory) if return_trajectory else x


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """Uniform decreasing grid t_start = t_0 > ... > t_steps = t_end (float64, steps + 1 points) for `times`.

    Any sub-interval of the sampling path is a valid grid, so a few-step student's large jump t_k -> t_{k+1} and
    a teacher's finer steps over the same interval (DDIM-like: the same path, fewer and larger steps) both come
    from here; `time_grid(steps)` is sample()'s default grid.
    """
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def _alpha(schedule, t: float) -> float:
    return float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))
