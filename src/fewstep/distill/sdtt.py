"""SDTT: self-distillation through time (Deschenaux & Gulcehre, ICLR 2025, arXiv 2410.21035), the baseline.

One student step of size 2 dt is trained to match two teacher (ancestral) steps of size dt from the same state
(Sec. 3, Alg. 1). With x0 ~ data, t ~ U[eps, 1], z_t ~ q(z_t | x0) = Cat(alpha_t x0 + (1 - alpha_t) m) (MDLM Eq. 1):

    L(nu) = E_{x0, t, z_t} 1/|M(z_t)| sum_{l in M(z_t)} delta( log x_nu^l(z_t, t) || log x~^l )

where M(z_t) are the masked positions of z_t, delta a divergence of divergences.py (reverse KL by default, the
paper's "KLD"), and the target x~^l collects the teacher's predictions along its two steps t -> t - dt -> t - 2 dt
(SDTT's `_teacher_logprobs_on_mask`): the teacher's log p(x0^l | z) at the step that unmasked position l (z = z_t
for the first step, z = z_{t - dt} for the second), and the second step's prediction for positions still masked.
The teacher's steps are ordinary `sample()` calls started from x_init = z_t on the grid (t, t - dt, t - 2 dt)
(halved to (t, t/2, 0) when t < 2 dt: the last step then unmasks everything).

Rounds (Sec. 3.2): round r trains a student of N_r = N_0 / 2**(r+1) steps against a teacher of 2 N_r steps
(dt = 1 / (2 N_r)); at the end of a round the student's weights are copied into the teacher copy and dt doubles.
The original teacher is never modified: the copy has the student's architecture (so it can take the student's
weights even when the student adds time conditioning) and starts as the teacher: the teacher's weights, and zero
for the adaLN tensors only the student has (the identity), whatever the student was initialised from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fewstep.config import FewstepError
from fewstep.diffusion.mdlm import nelbo, q_xt, sample_t
from fewstep.diffusion.sampling import sample, time_grid
from fewstep.distill.common import Halving, Setup, require
from fewstep.distill.divergences import get_divergence


class SDTT:
    data_free = False

    @dataclass
    class Config:
        divergence: str = "kl_reverse"  # kl_reverse | kl_forward | mse | tvd (SDTT's kl-bwd / kl-fwd / mse / tvd)
        teacher_steps: int = 64  # N_0: the teacher copy's step count in round 0 (students start at N_0 / 2)
        student_steps: int = 4  # last round's student step count
        round_steps: int = 200  # optimiser steps per round (SDTT: 10k at OWT scale)
        groups: int = 4  # t is drawn per group of sequences (each group is one teacher rollout)
        time_cond: bool = False  # add adaLN time conditioning to the student (SDTT's students have none)
        loss_dtype: str = "float32"  # "float64" computes the divergence in double (SDTT's loss_precision)

    def __init__(self, config: Config, setup: Setup):
        self.cfg, self.s = config, setup
        self.div = get_divergence(config.divergence)
        require((config.teacher_steps >= 2 and config.teacher_steps % 2 == 0, "teacher_steps", config.teacher_steps,
                 "must be even and >= 2 (the student takes half as many)"),
                (config.groups >= 1 and setup.batch % config.groups == 0, "groups", config.groups,
                 f"must be >= 1 and divide the micro-batch of {setup.batch}"),
                (config.loss_dtype in ("float32", "float64"), "loss_dtype", config.loss_dtype,
                 "must be float32 or float64"))
        self.rounds = Halving(config.teacher_steps // 2, config.student_steps, config.round_steps)
        self.student, self.teacher = setup.student, setup.teacher
        # The round-r teacher: a frozen copy with the student's architecture, starting equal to the teacher.
        self.ref = copy.deepcopy(setup.student).requires_grad_(False).eval()
        own, src = self.ref.state_dict(), setup.teacher.state_dict()
        with torch.no_grad():
            for k, v in own.items():  # adaLN tensors the teacher lacks: zero, the identity at every t
                v.copy_(src[k]) if k in src else v.zero_()
        self.round = 0

    def trainable(self):
        return {"student": self.student}

    def planned_steps(self) -> int:
        return self.rounds.planned

    @torch.no_grad()
    def targets(self, z_t: torch.Tensor, t: float, dt: float) -> torch.Tensor:
        """Teacher log-probs (B, L, V) for every position of z_t (B, L), from two steps t -> t - 2 dt."""
        target = torch.zeros((*z_t.shape, self.ref.backbone.vocab_size), device=z_t.device)  # (B, L, V)

        def collect(k, t_k, s_k, x_t, log_p, x_s):
            hit = (x_s != x_t) if k == 0 else (x_t == self.s.mask_id)  # 2nd step: newly unmasked + still masked
            target[hit] = log_p[hit]

        times = time_grid(2, t, max(t - 2 * dt, 0.0))
        sample(self.ref, self.s.schedule, batch=z_t.shape[0], length=z_t.shape[1], steps=2, mask_id=self.s.mask_id,
               times=times, x_init=z_t, on_step=collect)
        return target

    def step(self, x0: torch.Tensor, step: int):
        steps = self.rounds.steps(step)  # the student's step count this round
        dt = 1.0 / (2 * steps)  # the teacher copy takes 2 * steps steps
        B, G = x0.shape[0], self.cfg.groups
        t = sample_t(G, x0.device).repeat_interleave(B // G)  # (B,), antithetic across groups
        z_t = q_xt(x0, self.s.schedule.alpha(t), self.s.mask_id)  # (B, L)
        target = torch.cat([self.targets(z, float(tg[0]), dt) for z, tg in zip(z_t.chunk(G), t.chunk(G))])
        log_s = self.student(z_t, t)  # (B, L, V)
        masked = z_t == self.s.mask_id  # (B, L): the loss runs over every masked position
        dtype = torch.float64 if self.cfg.loss_dtype == "float64" else torch.float32
        loss = self.div(log_s[masked].to(dtype), target[masked].to(dtype)).float()
        logs = {"round": self.rounds.round(step), "student_steps": steps, "masked_frac": masked.float().mean()}
        return {"student": loss}, logs

    def on_step_end(self, step: int) -> None:
        """SDTT's round swap: copy the student into the teacher copy and halve the step count."""
        if self.rounds.ends_round(step):
            self.ref.load_state_dict(self.student.state_dict())
            self.round = self.rounds.round(step + 1)
            self._save_ref()

    @torch.no_grad()
    def validate(self, x0: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        """The student's NELBO on held-out text: shows what distillation costs in likelihood."""
        t = sample_t(x0.shape[0], x0.device, antithetic=True, generator=generator)
        nats = nelbo(self.student, self.s.schedule, x0, t, self.s.mask_id, generator).sum().item()
        return {"nats": nats, "tokens": x0.numel()}

    # The teacher copy is state the loop does not checkpoint: keep one file per round so a resumed run
    # continues against the same teacher.
    def _ref_file(self, r: int) -> Path | None:
        return self.s.out_dir / "sdtt_rounds" / f"teacher_round{r}.safetensors" if self.s.out_dir else None

    def _save_ref(self) -> None:
        path = self._ref_file(self.round)
        if path is None or self.s.rank != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.ref.state_dict().items()}, tmp)
        tmp.replace(path)

    def restore(self, start_step: int) -> None:
        """Called before a resumed run: reload the teacher copy of the round that `start_step` is in."""
        self.round = self.rounds.round(start_step)
        if self.round == 0:
            return
        path = self._ref_file(self.round)
        if path is None or not path.is_file():
            raise FewstepError(f"cannot resume SDTT round {self.round}: teacher copy {path} is missing")
        self.ref.load_state_dict(load_file(path, device=str(self.s.device)))
