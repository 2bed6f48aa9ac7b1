"""On-policy distillation of an autoregressive teacher into a bidirectional (masked diffusion) student.

Recipe of OPDLM (Su, Helwig, Parashar, ..., Ji; arXiv 2606.06712, `divelab/OPDLM`), in the unconditional setting
(no prompts) and with our own code. The student p_theta(x0 | x_t, t) is trained on the states its OWN inference
procedure visits, so train and test states match (no exposure bias); no data is read.

  1. Rollout (no gradient): x_{t_0} = m^L -> x_{t_1} -> ... -> x_{t_S} = x (B, L) with the student's sampler,
     `diffusion.sampling.sample` with confidence-based unmasking (LLaDA low-confidence remasking; optionally
     block-wise, i.e. semi-autoregressive), the procedure the student will be used with. The visited states
     (t_k, x_{t_k}) come from sample()'s `on_step` hook.
  2. Teacher targets on causal prefixes of the FINAL sequence (OPDLM's `clean_fill`), one teacher pass:
         q^i = p_AR(x^i = . | b, x^{<i})    (B, L, V)   (ar_teacher.py; top-K truncation optional)
  3. For `states` states per sequence, k ~ U{0..S-1}, minimise the forward KL on the masked positions M(x_{t_k}):

         L(theta) = E_{rollout, k} 1/|M| sum_{i in M(x_{t_k})} KL( q^i || p_theta(x0^i = . | x_{t_k}, t_k) )

     The rollout and the targets are stop-gradient; the student's prediction at its own state carries the gradient.

Forward KL (teacher to student) is mass-covering: the student is pushed to put probability on every continuation
the teacher finds likely given the student's own left context. Note q^i conditions on x^{<i}, which includes
tokens decoded AFTER step k (the student's later choices): the target is the teacher's next-token distribution
along the student's realised sequence, as in OPDLM.

Training tokens: 0 data tokens; `train_tokens` logs the running total of generated tokens the student trained on
(B L per step), comparable with TCS's data tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fewstep.config import FewstepError
from fewstep.diffusion.sampling import sample
from fewstep.distill.ar_teacher import ARDistillation, forward_kl, top_k_targets
from fewstep.distill.common import Setup, require
from fewstep.models import evaluating


class OnPolicy(ARDistillation):
    data_free = True

    @dataclass
    class Config:
        steps: int = 500  # optimiser steps when train.max_steps = 0
        decode_steps: int = 16  # student decoding steps per rollout (S)
        unmask: str = "confidence"  # "confidence" (LLaDA low-confidence remasking) | "random" (MDLM ancestral)
        block: int = 0  # block length for block-wise (semi-AR) decoding; 0 = the whole sequence is one block
        temperature: float = 1.0  # rollout temperature (float64 draws)
        top_k: int = 0  # teacher targets truncated to their top K tokens; 0 = full vocabulary
        states: int = 1  # trajectory states per rollout the loss is taken on
        time_cond: bool = False

    def __init__(self, config: Config, setup: Setup):
        require((config.decode_steps >= 1, "decode_steps", config.decode_steps, "must be >= 1"),
                (config.states >= 1, "states", config.states, "must be >= 1"),
                (config.top_k >= 0, "top_k", config.top_k, "must be >= 0 (0: the whole vocabulary)"),
                (config.block >= 0, "block", config.block, "must be >= 0 (0: no blocks)"),
                (config.unmask in ("confidence", "random"), "unmask", config.unmask,
                 "must be 'confidence' or 'random'"),
                (math.isfinite(config.temperature) and config.temperature > 0, "temperature", config.temperature,
                 "must be finite and > 0"))
        if 0 < config.block < setup.seq_len:
            n_blocks = -(-setup.seq_len // config.block)
            require((config.unmask == "confidence" and config.decode_steps % n_blocks == 0, "block", config.block,
                     f"needs unmask = 'confidence' and decode_steps a multiple of the {n_blocks} blocks"))
        super().__init__(config, setup)

    @torch.no_grad()
    def rollout(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's own decoding: (final x (B, L), visited states (S, B, L), their times (S,))."""
        states, times = [], []

        def keep(k, t, s, x_t, log_p, x_s):
            states.append(x_t.clone())
            times.append(t)

        c = self.cfg
        with evaluating(self.student):  # its own sampling law: no dropout
            x = sample(self.student, self.s.schedule, batch=self.s.batch, length=self.s.seq_len,
                       steps=c.decode_steps, mask_id=self.s.mask_id, temperature=c.temperature, unmask=c.unmask,
                       block=c.block, generator=generator, device=self.s.device, on_step=keep)
        return x, torch.stack(states), torch.tensor(times, device=x.device)

    def step(self, batch, step: int):
        if batch is not None:
            raise FewstepError("on-policy distillation is data-free: it must not be given data")
        x, traj, times = self.rollout()  # (B, L), (S, B, L), (S,)
        B, R = x.shape[0], self.cfg.states
        with torch.no_grad():
            log_q = self.teacher(x)  # (B, L, V): the teacher on causal prefixes of the final sequence
        k = torch.randint(0, traj.shape[0], (R, B), device=x.device)  # (R, B) one state per rollout and draw
        x_k = traj[k, torch.arange(B, device=x.device)[None]].flatten(0, 1)  # (R B, L)
        t_k = times[k].flatten().float()  # (R B,)
        masked = x_k == self.s.mask_id  # (R B, L)
        idx, log_q_m = top_k_targets(log_q.repeat(R, 1, 1)[masked], self.cfg.top_k)  # (N, K)
        log_s = self.student(x_k, t_k, masked_only=True)  # (N, V + 1): head on the masked rows only
        loss = forward_kl(log_s, idx, log_q_m)
        logs = {"kl": loss.detach(), "masked_frac": masked.float().mean(),
                "train_tokens": self.count(step, x.numel()), "data_tokens": 0,
                "teacher_nll": -log_q.gather(-1, x[..., None]).mean()}  # teacher's NLL of the student's samples
        return {"student": loss}, logs
