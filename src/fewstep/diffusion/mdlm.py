"""Masked diffusion language model (MDLM; Sahoo et al. 2024, arXiv 2406.07524).

Forward process (Eq. 1): q(x_t | x0) = Cat(alpha_t x0 + (1 - alpha_t) m), each token independently.
SUBS parameterisation (Sec. 3.2.3): the mask token gets zero probability (zero-masking) and unmasked positions copy
their token (carry-over). Continuous-time NELBO (Eq. 10):
    L = E_{t ~ U[0,1], x_t ~ q} [ w(t) * sum_{l : x_t^l = m} -log p_theta(x0^l | x_t) ],  w(t) = -alpha'_t/(1-alpha_t)
With a perfect denoiser the expected NELBO equals -log p(x0) (an average over decoding orders of exact
autoregressive factorisations), which the tests check on a Markov chain, up to the alpha in [0, eps] part that
the schedule's alpha_1 = eps leaves out (about eps x the all-masked cross-entropy; docs/evaluation.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fewstep.diffusion.schedule import weight
from fewstep.models.linear_nll import NEG_INF, linear_nll


class MaskedDenoiser(nn.Module):
    """`forward(x_t: (B, L) long, t: (B,) float) -> (B, L, V) log p_theta(x0 | x_t)` in float32 (SUBS).

    `forward(x_t, t, masked_only=True) -> (N, V)`: the same log-probabilities at the N masked positions of x_t only,
    in row-major order (`forward(x_t, t)[x_t == mask_id]`), with the vocabulary head and the float32 log-softmax
    run on those N rows instead of all B x L: what the NELBO needs (`nelbo` below). It is a flag of `forward`, not
    a separate method, so that whatever wraps the module's call (in-place `Module.compile()`, FSDP2's all-gather
    hooks) wraps this path too.

    `forward(x_t, t, targets=x0) -> (N,)`: -log p_theta(x0^l | x_t) at the N masked positions, through
    `linear_nll` (the head and the cross-entropy chunk by chunk of rows: no (N, V) tensor is kept for the backward).
    The NELBO's path (`masked_nll`).

    `forward(x_t, t, hidden=True) -> (B, L, D)`: the final hidden states alone, and `head_log_probs(h[rows])` the
    log-probabilities at chosen masked rows (N, V): the sampler's path (`sample(row_head=...)`), which needs the
    head only where a token is drawn. A CUDA graph or compiled call wraps the trunk; the head runs on N rows.
    """

    def __init__(self, backbone: nn.Module, mask_id: int):
        super().__init__()
        self.backbone, self.mask_id = backbone, mask_id

    @property
    def time_conditioned(self) -> bool:
        return self.backbone.time_cond

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, masked_only: bool = False,
                targets: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        t = t if self.backbone.time_cond else None
        if hidden:
            return self.backbone.hidden(x_t, t)  # (B, L, D)
        if masked_only or targets is not None:
            masked = x_t == self.mask_id  # (B, L)
            h = self.backbone.hidden(x_t, t)[masked]  # (N, D)
            if targets is not None:  # (N,): the head has no bias (Transformer)
                return linear_nll(h, self.backbone.head.weight, targets[masked], exclude=self.mask_id)
            return self.head_log_probs(h)  # (N, V)
        log_p = self._log_probs(self.backbone(x_t, t))  # (B, L, V)
        unmasked, x = (x_t != self.mask_id)[..., None], x_t[..., None]  # (B, L, 1)
        # carry-over: an unmasked row is log 0 but for 0 at its own token; a masked row keeps its value at x = mask
        own = torch.where(unmasked, 0.0, log_p.gather(-1, x))  # (B, L, 1)
        return log_p.masked_fill(unmasked, NEG_INF).scatter_(-1, x, own)  # one (B, L, V) tensor, not three

    @property
    def splits_head(self) -> bool:
        """Whether `hidden=True` and `head_log_probs` work: a backbone with `hidden` and a linear `head`."""
        return hasattr(self.backbone, "hidden") and isinstance(getattr(self.backbone, "head", None), nn.Linear)

    def head_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """log p_theta(x0 | x_t) (N, V) float32 at N masked positions from their final hidden states (N, D): the
        head and zero-masking, no carry-over (a masked row has none)."""
        return self._log_probs(self.backbone.head(h))

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        logits[..., self.mask_id] = NEG_INF  # zero-masking
        return logits.log_softmax(-1)


def sample_t(batch: int, device, antithetic: bool = True, eps: float = 1e-5, generator=None) -> torch.Tensor:
    """t in [eps, 1]; antithetic (low-discrepancy) sampling t_i = (u + i/B) mod 1 lowers the loss variance."""
    u = torch.rand(batch if not antithetic else 1, device=device, generator=generator)
    if antithetic:
        u = (u + torch.arange(batch, device=device) / batch) % 1
    return eps + (1 - eps) * u


def q_xt(x0: torch.Tensor, alpha_t: torch.Tensor, mask_id: int, generator=None) -> torch.Tensor:
    """Mask each token independently with probability 1 - alpha_t. x0: (B, L), alpha_t: (B,)."""
    u = torch.rand(x0.shape, device=x0.device, generator=generator)
    return torch.where(u < (1 - alpha_t)[:, None], torch.full_like(x0, mask_id), x0)


def masked_nll(model, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p(x0^l | x_t) at the masked positions of x_t, 0 elsewhere. x_t, x0: (B, L), t: (B,) -> (B, L).

    A MaskedDenoiser predicts at the masked positions only (`targets=x0`: the head and the cross-entropy run on the
    masked rows alone, chunk by chunk); any other model (e.g. an oracle returning (B, L, V)) is called in full.
    """
    masked = x_t == mask_id  # (B, L)
    inner = getattr(model, "_orig_mod", model)  # _orig_mod: the module under a torch.compile wrapper
    if isinstance(inner, MaskedDenoiser) and inner.mask_id == mask_id:
        nll_rows = model(x_t, t, targets=x0)  # (N,), rows of `masked` in row-major order
        return torch.zeros(x0.shape, dtype=nll_rows.dtype, device=x0.device).masked_scatter(masked, nll_rows)
    log_p = model(x_t, t)  # (B, L, V)
    nll = -log_p.gather(-1, x0[..., None]).squeeze(-1)  # (B, L)
    return torch.where(masked, nll, torch.zeros_like(nll))


def nelbo(model, schedule, x0: torch.Tensor, t: torch.Tensor, mask_id: int, generator=None) -> torch.Tensor:
    """Per-sequence NELBO estimate in nats, one t per sequence. x0: (B, L), t: (B,) -> (B,). The model is called
    on the masked rows only when it can be (`masked_nll`): about half the rows on average."""
    x_t = q_xt(x0, schedule.alpha(t), mask_id, generator)
    return weight(schedule, t) * masked_nll(model, x_t, t, x0, mask_id).sum(-1)
