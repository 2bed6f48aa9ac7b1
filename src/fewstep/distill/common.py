"""What every distillation method receives (`Setup`), and the round schedule that halves the step count.

A method is built as `Method(config, setup)`; `setup` carries the frozen teacher, the student to train, the noise
schedule and the shapes a data-free method needs to start its own rollouts. Methods read nothing else: no global
config objects, no optimizers, no data loader (the loop passes a batch to `step`, or None when the method is
data-free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fewstep.config import FewstepError
from fewstep.config import require as require_setting


def require(*checks: tuple[bool, str, object, str]) -> None:
    """(ok, key, value, rule) per method setting: the first that fails is one error naming its key."""
    for ok, key, value, rule in checks:
        require_setting(ok, f"method.{key}", value, rule)


@dataclass
class Setup:
    teacher: nn.Module  # frozen masked denoiser: teacher(x_t (B, L), t (B,)) -> (B, L, V) log p(x0 | x_t)
    student: nn.Module  # same interface; the only module a method trains unless it adds its own
    schedule: object  # alpha_t of the teacher (fewstep.diffusion.schedule)
    mask_id: int
    batch: int  # sequences per micro-batch on this rank (what `step` must produce when data-free)
    seq_len: int
    device: torch.device
    out_dir: Path | None = None  # where a method keeps state the loop does not checkpoint (SDTT's teacher copy)
    rank: int = 0


@dataclass
class Halving:
    """Rounds of `round_steps` optimiser steps; round r trains for start / 2**r sampling steps, down to `end`.

    SDTT (Sec. 3.2) and the progressive collapse of BOOT-style students both use it: halving is what keeps
    each round's target only two steps away from the model that produced it. The last round runs until the loop
    stops (train.max_steps defaults to `planned`).
    """

    start: int
    end: int
    round_steps: int

    def __post_init__(self):
        ratio = self.start / max(self.end, 1)
        if self.end < 1 or self.start < self.end or ratio != 2 ** round(math.log2(ratio)):
            raise FewstepError(f"step counts must halve from {self.start} to {self.end}: both >= 1 and "
                               "start / end a power of two")
        if self.round_steps < 1:
            raise FewstepError(f"round_steps must be >= 1, got {self.round_steps}")
        self.n_rounds = int(round(math.log2(self.start / self.end))) + 1

    @property
    def planned(self) -> int:
        return self.n_rounds * self.round_steps

    def round(self, step: int) -> int:
        """Round of optimiser step `step` (0-based)."""
        return min(step // self.round_steps, self.n_rounds - 1)

    def steps(self, step: int) -> int:
        return self.start >> self.round(step)

    def ends_round(self, step: int) -> bool:
        """True after the last optimiser step of a round that is followed by another round."""
        return self.round(step + 1) > self.round(step)


class FixedPrediction(nn.Module):
    """A 'denoiser' that returns one precomputed log p(x0 | x_t) (B, L, V): lets `sample()` take a step with a
    prediction that was already computed (with gradients elsewhere) instead of running the model again."""

    def __init__(self, log_p: torch.Tensor, time_conditioned: bool = True):
        super().__init__()
        self.log_p, self.time_conditioned = log_p.detach(), time_conditioned
        self.anchor = nn.Parameter(torch.empty(0, device=log_p.device), requires_grad=False)  # gives a device

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.shape != self.log_p.shape[:2]:
            raise ValueError("FixedPrediction answers for the state it was computed on only")
        return self.log_p
