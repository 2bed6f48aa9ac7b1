"""Diffusion pre-training as a `step()` for the one training loop: the NELBO per token of a masked (MDLM) or a
uniform-state (UDLM / Duo) denoiser, with antithetic time sampling, and the same bound as the validation metric."""

from __future__ import annotations

import torch
import torch.nn as nn

from fewstep.diffusion import mdlm, uniform
from fewstep.diffusion.mdlm import sample_t


class DiffusionObjective:
    """NELBO of `model` (a MaskedDenoiser or a UniformDenoiser) under `schedule`, in nats per token.

    t ~ U[eps, 1] (antithetic across the batch): eps = 1e-5 for the masked NELBO, 1e-3 for the uniform-state one
    (its integrand grows near t = 0).
    """

    def __init__(self, model: nn.Module, schedule, antithetic: bool = True):
        self.model, self.schedule, self.antithetic = model, schedule, antithetic
        self.masked = getattr(model, "mask_id", None) is not None  # uniform-state denoisers have no mask
        self.eps = 1e-5 if self.masked else 1e-3

    def trainable(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def head_fraction(self) -> float:
        """Expected fraction of positions that reach the vocabulary head: the masked NELBO runs it on the masked
        rows only (`masked_only`), E_t[1 - alpha_t] for t ~ U[eps, 1]; the uniform-state NELBO needs every row.
        The loop's MFU counts the head's FLOPs at this fraction, the ones actually needed."""
        if not self.masked:
            return 1.0
        t = torch.linspace(self.eps, 1.0, 10_001, dtype=torch.float64)
        return float((1 - self.schedule.alpha(t)).mean())

    def nelbo(self, x0: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        """Per-sequence NELBO estimate in nats, one t per sequence. x0: (B, L), t: (B,) -> (B,)."""
        if self.masked:
            return mdlm.nelbo(self.model, self.schedule, x0, t, self.model.mask_id, generator)
        return uniform.nelbo(self.model, self.schedule, x0, t, generator)

    def step(self, x0: torch.Tensor, step: int):
        t = sample_t(x0.shape[0], x0.device, self.antithetic, eps=self.eps)
        loss = self.nelbo(x0, t).mean() / x0.shape[1]  # nats/token
        return {"model": loss}, {"nelbo": loss.detach()}

    @torch.no_grad()
    def validate(self, x0: torch.Tensor, generator: torch.Generator) -> dict:
        """Summed NELBO (nats) of a validation batch, and each sequence's (seq_nats, (B,)); a fixed generator makes
        the estimate repeatable."""
        t = sample_t(x0.shape[0], x0.device, antithetic=True, eps=self.eps, generator=generator)
        nelbo = self.nelbo(x0, t, generator)  # (B,)
        return {"nats": nelbo.sum().item(), "tokens": x0.numel(), "seq_nats": nelbo.double().cpu()}
