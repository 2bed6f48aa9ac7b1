"""BOOT-style data-free distillation of a masked diffusion LM, collapsed from K steps to one.

BOOT (Gu et al. 2023, arXiv 2306.05544) trains a time-conditioned student from noise alone: the student's own output
at time t, advanced one teacher step to s < t, is the (stop-gradient) target of the student at s ("bootstrapping
from two consecutive sampled steps"). No training data is read. This module is our derivation of the idea for
absorbing (masked) diffusion, where a student's step is a categorical draw, not a differentiable ODE step.

Paths. For absorbing diffusion the posterior q(x_s | x_t, x0) has the same form for every s < t, so a K-step grid
t_k = 1 - k/K is a DDIM-style skip-step process with the marginals q(x_t | x0) of the full chain: a jump t -> s
unmasks each masked position with probability w(t, s) = (alpha_s - alpha_t) / (1 - alpha_t), drawn from the model's
p(x0 | x_t). Every path starts from the all-mask state m^L, so no data is needed to start one.

Student f_theta(x_t, t) -> log p(x0 | x_t), time-conditioned (adaLN, zero-initialised: at step 0 it is exactly the
teacher p_phi). Its jump is factorised: q_theta(x^R | x_t) = prod_l q^l, q^l = f_theta^l(x_t, t). Training step, in
round r with K = start_steps / 2**r student steps:

  1. k ~ U{0..K-1};  t = t_k, s = t_{k+1}, m = (t + s) / 2
  2. x_t = the student's own k-jump path from m^L (stop-gradient)                        data-free, on-policy
  3. x_m = x_t advanced t -> m with the student's own draws from sg[q_theta]; R1 = positions it unmasked
                                                                        "its own prediction at one time ..."
  4. teacher at both states: p_phi(. | x_t) for R1, and p_phi(. | x_m), which drives the teacher's step m -> s;
     R2 = the positions that step unmasks (r2 = "jump": R1 + R2 is exactly one student jump), or every position
     still masked at m (r2 = "all", SDTT's rule)                              "... advanced one teacher step"

  J(theta) = E_{k, x_t} E_{x^R1 ~ q_theta} [ sum_{l in R1} delta(q^l || p_phi^l(. | x_t))
                                           + sum_{l in R2} delta(q^l || p_phi^l(. | x_m)) ] / |R1 + R2|

With delta = reverse KL the bracket is exactly KL( q_theta(x^R1) prod_{R2} q^l || p_phi(x^R1 | x_t) prod_{R2}
p_phi^l(. | x_m) ): the student's one factorised jump against the stack "teacher step to m on the student's own
draws, then the teacher's prediction for the rest". R1 is independent of theta (it comes from the schedule), but
the draws x^R1 are not, and they are not reparameterisable, so the exact gradient has a score-function term:

  grad J = E[ grad(pathwise terms at fixed x_m) + (F - b) grad sum_{l in R1} log q^l(x^l) ],
  F = sum_{l in R2} delta(q^l || p_phi^l(. | x_m))  (per sequence, detached),  b = leave-one-out batch mean of F.

The score term rewards draws at R1 after which the teacher predicts what the student already predicts at R2, so the
minimiser is the mean-field (factorised, mode-seeking) approximation of the teacher's two-stage joint: it
concentrates where the teacher couples the positions of one jump strongly (on the tiny byte-level teacher it barely
moves: docs/distillation.md). Without it (score_function = false) each q^l is only pulled toward the normalised
geometric mean of the teacher's conditionals exp E[log p_phi^l(. | x_m)], which is flatter whenever they disagree
(measured: higher entropy, worse gen PPL; docs/distillation.md). The R1 term anchors the student to the teacher at
its own state, BOOT's boundary condition (the teacher's prediction at the path's start), so the student cannot drift
to a degenerate sequence that the teacher merely completes.
Rounds halve K (Halving) from `start_steps` to `min_steps` (1: the one-step student). The target is always the
original teacher, one step from the student's own state, so no teacher copy is kept. A one-step student from the
all-mask state outputs one factorised distribution per position: it can concentrate but not correlate tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.config import FewstepError
from fewstep.diffusion.sampling import sample, time_grid
from fewstep.distill.common import FixedPrediction, Halving, Setup, require
from fewstep.distill.divergences import get_divergence
from fewstep.models import evaluating


class BOOT:
    data_free = True  # step() receives None: the run never opens the data

    @dataclass
    class Config:
        divergence: str = "kl_reverse"  # kl_reverse | kl_forward | mse | tvd
        start_steps: int = 8  # K_0, the student's step count in round 0
        min_steps: int = 1  # K of the last round (1 = one-step student)
        round_steps: int = 200  # optimiser steps per round
        time_cond: bool = True  # BOOT's student is time-conditioned
        score_function: bool = True  # exact gradient through the student's own draws (false: pathwise part only)
        r2: str = "jump"  # "jump": R2 = what the teacher's step m -> s unmasks; "all": every position masked at m
        loss_dtype: str = "float32"

    def __init__(self, config: Config, setup: Setup):
        self.cfg, self.s = config, setup
        self.div = get_divergence(config.divergence)
        self.rounds = Halving(config.start_steps, config.min_steps, config.round_steps)
        require((config.r2 in ("jump", "all"), "r2", config.r2, "must be 'jump' or 'all'"),
                (config.loss_dtype in ("float32", "float64"), "loss_dtype", config.loss_dtype,
                 "must be float32 or float64"))
        self.student, self.teacher = setup.student, setup.teacher

    def trainable(self):
        return {"student": self.student}

    def planned_steps(self) -> int:
        return self.rounds.planned

    @torch.no_grad()
    def rollout(self, grid: torch.Tensor, k: int) -> torch.Tensor:
        """x_{t_k} (B, L): k jumps of the student's own path from the all-mask state (stop-gradient)."""
        B, L, dev = self.s.batch, self.s.seq_len, self.s.device
        if k == 0:
            return torch.full((B, L), self.s.mask_id, dtype=torch.long, device=dev)
        with evaluating(self.student):  # rollouts are samples: no dropout
            return sample(self.student, self.s.schedule, batch=B, length=L, steps=k, mask_id=self.s.mask_id,
                          times=grid[: k + 1], device=dev)

    def step(self, batch, step: int):
        if batch is not None:
            raise FewstepError("BOOT is data-free: it must be run without training data")
        K = self.rounds.steps(step)
        grid = time_grid(K)  # (K + 1,) float64: 1 = t_0 > ... > t_K = 0
        k = int(torch.randint(K, ()))
        t, s = float(grid[k]), float(grid[k + 1])
        m = 0.5 * (t + s)
        mask = self.s.mask_id
        x_t = self.rollout(grid, k)  # (B, L)
        tt = torch.full((x_t.shape[0],), t, device=x_t.device)
        log_s = self.student(x_t, tt)  # (B, L, V), the only forward with gradients
        own = FixedPrediction(log_s, time_conditioned=True)  # sg[q_theta]: the student's own half-jump
        x_m = sample(own, self.s.schedule, batch=x_t.shape[0], length=x_t.shape[1], steps=1, mask_id=mask,
                     times=torch.tensor([t, m], dtype=torch.float64), x_init=x_t)
        with torch.no_grad():
            log_pt = self.teacher(x_t, tt)  # (B, L, V) p_phi(. | x_t), target on R1
            log_pm = self.teacher(x_m, torch.full_like(tt, m))  # p_phi(. | x_m), drives the teacher's step m -> s
        r1 = (x_t == mask) & (x_m != mask)  # (B, L) unmasked by the student's own draws
        r2 = x_m == mask  # (B, L) still masked at m
        if self.cfg.r2 == "jump":  # keep the positions the teacher's own step m -> s unmasks: the rest of the jump
            x_s = sample(FixedPrediction(log_pm), self.s.schedule, batch=x_t.shape[0], length=x_t.shape[1], steps=1,
                         mask_id=mask, times=torch.tensor([m, s], dtype=torch.float64), x_init=x_m)
            r2 = r2 & (x_s != mask)
        dtype = torch.float64 if self.cfg.loss_dtype == "float64" else torch.float32
        log_s = log_s.to(dtype)
        d1 = self.div(log_s, log_pt.to(dtype), reduction="none") * r1  # (B, L)
        d2 = self.div(log_s, log_pm.to(dtype), reduction="none") * r2  # (B, L)
        total = d1.sum(-1) + d2.sum(-1)  # (B,) the bracket of J per sequence
        if self.cfg.score_function and x_t.shape[0] > 1:
            F = d2.sum(-1).detach()  # (B,)
            b = (F.sum() - F) / (F.shape[0] - 1)  # leave-one-out baseline: no bias, less variance
            logq = (log_s.gather(-1, x_m[..., None]).squeeze(-1) * r1).sum(-1)  # (B,) log q(x^R1)
            total = total + (F - b) * (logq - logq.detach())  # value 0: the logged loss stays J
        n = (r1 | r2).sum().clamp(min=1)
        loss = (total.sum() / n).float()
        logs = {"round": self.rounds.round(step), "student_steps": K, "jump": k,
                "masked_frac": (x_t == mask).float().mean(), "kl_r1": d1.detach().sum() / r1.sum().clamp(min=1),
                "kl_r2": d2.detach().sum() / r2.sum().clamp(min=1)}
        return {"student": loss}, logs
