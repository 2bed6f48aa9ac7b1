"""Noise schedules for discrete diffusion: alpha_t = probability that a token is still clean at time t.

MDLM (Sahoo et al. 2024, arXiv 2406.07524, Sec. 3): the continuous-time NELBO weight for absorbing diffusion is
w(t) = -alpha'_t / (1 - alpha_t). Log-linear: alpha_t = 1 - (1 - eps) t, so w(t) = 1 / t. Cosine (MD4, Shi et
al. 2024): alpha_t = eps + (1 - eps)(1 - cos(pi/2 (1 - t))). Both have alpha_0 = 1 and alpha_1 = eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogLinear:
    eps: float = 1e-3  # alpha_1 = eps as MDLM's LogLinearNoise; the NELBO then omits alpha in [0, eps] (~eps x CE)
    name: str = "loglinear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1 - self.eps))

    def time_of(self, alpha: torch.Tensor) -> torch.Tensor:
        """The inverse: t with alpha_t = alpha, for alpha in [eps, 1] (clamped there)."""
        return ((1 - alpha) / (1 - self.eps)).clamp(0, 1)


@dataclass(frozen=True)
class Cosine:
    eps: float = 1e-3
    name: str = "cosine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.eps + (1 - self.eps) * (1 - torch.cos(0.5 * math.pi * (1 - t)))

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return -(1 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * (1 - t))

    def time_of(self, alpha: torch.Tensor) -> torch.Tensor:
        """The inverse: t with alpha_t = alpha, for alpha in [eps, 1] (clamped there)."""
        c = ((alpha - self.eps) / (1 - self.eps)).clamp(0, 1)
        return 1 - torch.acos(1 - c) * (2 / math.pi)


def weight(schedule, t: torch.Tensor) -> torch.Tensor:
    """NELBO weight w(t) = -alpha'_t / (1 - alpha_t) > 0."""
    return -schedule.dalpha(t) / (1 - schedule.alpha(t))


SCHEDULES = {"loglinear": LogLinear, "cosine": Cosine}


def get_schedule(name: str = "loglinear"):
    if name not in SCHEDULES:
        from fewstep.config import FewstepError

        raise FewstepError(f"unknown schedule '{name}' (known: {', '.join(SCHEDULES)})")
    return SCHEDULES[name]()


def schedule_of(meta: dict):
    """The noise schedule a checkpoint was trained with (its meta's model.schedule; loglinear when absent)."""
    return get_schedule(meta["model"].get("schedule", "loglinear"))
