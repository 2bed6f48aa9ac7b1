"""Per-token divergences between a student's and a target's log p(x0 | x_t), over the masked positions only.

Both arguments are log-probabilities (N, V) of the N masked positions that were selected by the caller (SUBS puts
NEG_INF = -1e6 at the mask token, so exp gives an exact 0 and no 0 * log 0 NaN appears). Each function returns
the mean over the N positions (a scalar), as SDTT does (Deschenaux & Gulcehre 2025, Sec. 3: the per-token matching
loss delta(x_nu(z_t, t) || x~_theta(z_t, t, m/k)), `distill_mode` kl-bwd / kl-fwd / mse / tvd), or with
reduction="none" one value per position for any leading shape, (..., V) -> (...), for callers that weigh sums:

  kl_reverse  KL(p_student || p_target) = sum_v p_s(v) (log p_s(v) - log p_t(v))   mode-seeking, SDTT's default
  kl_forward  KL(p_target || p_student) = sum_v p_t(v) (log p_t(v) - log p_s(v))   mass-covering
  mse         mean_v (log p_s(v) - log p_t(v))^2 over v with p_t(v) > 0             in log space, as SDTT
  tvd         1/2 sum_v |p_s(v) - p_t(v)|                                          total variation

The target is never differentiated (callers pass it detached or computed under no_grad); these functions still
detach it, so a mistake cannot leak a gradient into a teacher.
"""

from __future__ import annotations

import torch

from fewstep.diffusion.mdlm import NEG_INF


def _check(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    if log_s.shape != log_t.shape:
        raise ValueError(f"student and target log-probs differ in shape: {tuple(log_s.shape)} vs {tuple(log_t.shape)}")
    return log_t.detach().to(log_s.dtype)


def _reduce(per_pos: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_pos
    # An empty selection (no masked position) is a zero loss that still carries a graph, not a NaN.
    return per_pos.mean() if per_pos.numel() else per_pos.sum()


def kl_reverse(log_s: torch.Tensor, log_t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(p_s || p_t). log_s, log_t: (..., V) -> () averaged, or (...) with reduction="none"."""
    log_t = _check(log_s, log_t)
    return _reduce((log_s.exp() * (log_s - log_t)).sum(-1), reduction)


def kl_forward(log_s: torch.Tensor, log_t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(p_t || p_s). log_s, log_t: (..., V)."""
    log_t = _check(log_s, log_t)
    return _reduce((log_t.exp() * (log_t - log_s)).sum(-1), reduction)


def mse(log_s: torch.Tensor, log_t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean over the vocabulary of the squared log-probability difference (F.mse_loss in SDTT). (..., V).
    Tokens the target gives probability 0 (SUBS's mask column, at NEG_INF minus a log-normaliser) are left out:
    there the difference is the two normalisers' difference, a number that belongs to neither distribution."""
    log_t = _check(log_s, log_t)
    live = log_t > 0.5 * NEG_INF  # (..., V)
    sq = torch.where(live, (log_s - log_t).pow(2), torch.zeros_like(log_s))
    return _reduce(sq.sum(-1) / live.sum(-1).clamp_min(1), reduction)


def tvd(log_s: torch.Tensor, log_t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Total variation distance 1/2 sum_v |p_s - p_t|. (..., V)."""
    log_t = _check(log_s, log_t)
    return _reduce(0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1), reduction)


DIVERGENCES = {"kl_reverse": kl_reverse, "kl_forward": kl_forward, "mse": mse, "tvd": tvd}


def get_divergence(name: str):
    if name not in DIVERGENCES:
        from fewstep.config import FewstepError

        raise FewstepError(f"unknown divergence '{name}' (known: {', '.join(DIVERGENCES)})")
    return DIVERGENCES[name]
