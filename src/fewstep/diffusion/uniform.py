"""Uniform-state discrete diffusion (UDLM, Schiff et al. 2024, arXiv 2412.10193; the base process of Duo, Sahoo et
al. 2025, arXiv 2506.10892).

Forward process: q(z_t | x) = Cat(alpha_t x + (1 - alpha_t) / N), i.e. each token is resampled uniformly with
probability 1 - alpha_t. Write xbar = N alpha_t x + (1 - alpha_t) 1, so q_t(. | x) = xbar / N, and
xbar_theta = N alpha_t x_theta + (1 - alpha_t) 1 for the denoiser's mean x_theta = p_theta(x0 | z_t).

The forward CTMC resamples at rate beta_t = -alpha'_t / alpha_t, jumping z -> y (y != z) at rate beta_t / N. Its
time reversal jumps at rate (beta_t / N) q_t(y) / q_t(z); the model uses xbar_theta,y / xbar_theta,z for that ratio.
The continuous-time ELBO of a CTMC (Campbell et al. 2022) then gives, per position with i = z_t (the UDLM/Duo
NELBO, Duo Eq. 17 in Rao-Blackwellised form):

    L = E_t E_{z_t} sum_l (beta_t / N) [ N/xbar_theta,i - N/xbar_i
                                         + sum_y (xbar_y / xbar_i) log( xbar_y xbar_theta,i / (xbar_i xbar_theta,y) ) ]

which is zero iff the model's reverse rates equal the true ones, and whose expectation equals -log p(x0) (up to the
negligible prior term at alpha_1 = eps) when they are exact; the tests check this on a Markov chain.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn


class UniformDenoiser(nn.Module):
    """`forward(z_t: (B, L) long, t: (B,)) -> (B, L, N) log x_theta(z_t, t)` in float32. Always time-conditioned:
    a uniform-state z_t does not reveal its noise level."""

    time_conditioned = True
    mask_id = None  # no mask token: samplers start from uniform noise

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if not backbone.time_cond:
            raise ValueError("a uniform-state denoiser must be time-conditioned")
        self.backbone = backbone

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.backbone(z_t, t).float().log_softmax(-1)


def q_zt(x0: torch.Tensor, alpha_t: torch.Tensor, vocab: int, generator=None) -> torch.Tensor:
    """Resample each token uniformly with probability 1 - alpha_t. x0: (B, L), alpha_t: (B,)."""
    move = torch.rand(x0.shape, device=x0.device, generator=generator) < (1 - alpha_t)[:, None]
    noise = torch.randint(0, vocab, x0.shape, device=x0.device, generator=generator)
    return torch.where(move, noise, x0)


def nelbo_terms(xbar_theta: torch.Tensor, x0: torch.Tensor, z_t: torch.Tensor, alpha_t: torch.Tensor,
                dalpha_t: torch.Tensor) -> torch.Tensor:
    """Per-position NELBO integrand (B, L) given xbar_theta (B, L, N) > 0, with t's alpha_t, alpha'_t: (B,)."""
    N = xbar_theta.shape[-1]
    a = alpha_t[:, None].to(xbar_theta.dtype)  # (B, 1)
    beta = (-dalpha_t / alpha_t)[:, None].to(xbar_theta.dtype)
    hit = (x0 == z_t).to(xbar_theta.dtype)  # xbar_i = N a + 1 - a if z_t = x0 else 1 - a
    xbar_i = (1 - a) + N * a * hit  # (B, L)
    xth_i = xbar_theta.gather(-1, z_t[..., None]).squeeze(-1)
    log_xth = xbar_theta.log()  # (B, L, N)
    # sum_y xbar_y log xbar_y and sum_y xbar_y log xbar_theta,y in closed form: xbar takes two values
    s_xx = (N - 1) * (1 - a) * torch.log(1 - a) + (N * a + 1 - a) * torch.log(N * a + 1 - a)
    s_xth = (1 - a) * log_xth.sum(-1) + N * a * log_xth.gather(-1, x0[..., None]).squeeze(-1)
    kl = (s_xx - N * xbar_i.log() + N * xth_i.log() - s_xth) / xbar_i
    return beta / N * (N / xth_i - N / xbar_i + kl)


def nelbo(model, schedule, x0: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
    """Per-sequence NELBO estimate in nats, one t per sequence. x0: (B, L), t: (B,) -> (B,)."""
    alpha = schedule.alpha(t)
    z_t = q_zt(x0, alpha, model.backbone.vocab_size, generator)
    x_theta = model(z_t, t).exp()  # (B, L, N)
    N = x_theta.shape[-1]
    xbar_theta = N * alpha[:, None, None] * x_theta + (1 - alpha[:, None, None])
    return nelbo_terms(xbar_theta, x0, z_t, alpha, schedule.dalpha(t)).sum(-1)


def posterior_probs(x_theta: torch.Tensor, z_t: torch.Tensor, alpha_s: float, alpha_t: float) -> torch.Tensor:
    """Unnormalised q(z_s | z_t, x_theta) in float64 (B, L, N): [a_ts d(z_s = z_t) + (1 - a_ts)/N] *
    [alpha_s x_theta + (1 - alpha_s)/N], with a_ts = alpha_t / alpha_s (Bayes on the two forward kernels)."""
    x_theta = x_theta.double()
    N = x_theta.shape[-1]
    a_ts = alpha_t / alpha_s
    like = torch.full_like(x_theta, (1 - a_ts) / N).scatter_add_(
        -1, z_t[..., None], torch.full_like(x_theta[..., :1], a_ts))  # q(z_t | z_s = v)
    return like * (alpha_s * x_theta + (1 - alpha_s) / N)


# --- Duo's Gaussian latent (Sahoo et al. 2025, Sec. 3) -----------------------------------------------------------
# w_t = alphatilde_t x + sigmatilde_t eps (sigmatilde = sqrt(1 - alphatilde^2), eps ~ N(0, I_N)) and z_t = argmax w_t:
# for one-hot x, z_t follows q(z_t | x) above with alpha_t = T(alphatilde_t), the diffusion transformation operator
#     T(at) = (N P(at) - 1) / (N - 1),   P(at) = P(argmax w = x) = int phi(u) Phi(u + at / st)^(N-1) du.


@functools.lru_cache(maxsize=8)
def _duo_table(vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, r = alphatilde / sigmatilde) on a grid of r in [0, 16] (alpha reaches 1 on it), float64, alpha
    increasing in r; computed once per vocabulary and kept on `device`, so lookups need no host sync."""
    r = torch.linspace(0.0, 16.0, 2048, dtype=torch.float64)[:, None]  # (R, 1)
    u = torch.linspace(-10.0, 10.0, 4001, dtype=torch.float64)[None]  # (1, U) quadrature nodes
    phi = torch.exp(-0.5 * u**2) / math.sqrt(2 * math.pi)
    P = torch.trapezoid(phi * torch.exp((vocab - 1) * torch.special.log_ndtr(u + r)), u, dim=-1)  # (R,)
    alpha = ((vocab * P - 1) / (vocab - 1)).clamp(0.0, 1.0)
    return torch.cummax(alpha, 0).values.to(device), r.squeeze(-1).to(device)


def duo_alpha_tilde(alpha_t: torch.Tensor, vocab: int) -> torch.Tensor:
    """alphatilde_t = T^{-1}(alpha_t) (same shape as alpha_t), by linear interpolation of the tabulated operator."""
    a_tab, r_tab = _duo_table(vocab, alpha_t.device)
    a = alpha_t.detach().double().clamp(0.0, 1.0)
    i = torch.searchsorted(a_tab, a).clamp(1, len(a_tab) - 1)
    lo, hi = a_tab[i - 1], a_tab[i]
    r = r_tab[i - 1] + (r_tab[i] - r_tab[i - 1]) * ((a - lo) / (hi - lo).clamp_min(1e-300)).clamp(0.0, 1.0)
    return (r / (1 + r**2).sqrt()).to(alpha_t.dtype)


def duo_latent(x: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """w_t = alphatilde_t x + sigmatilde_t eps for x (B, L, N) on the simplex (one-hot: argmax w_t ~ q(z_t | x)),
    alpha_t: (B,) -> (B, L, N); differentiable in x (the pathwise reparameterisation)."""
    at = duo_alpha_tilde(alpha_t, x.shape[-1])[:, None, None].to(x.dtype)
    return at * x + (1 - at**2).sqrt() * torch.randn_like(x)
