"""TCS: target concrete score distillation of an autoregressive teacher into a masked diffusion student.

Paper: "Distilled Diffusion Language Models" (TCS; ICLR 2025 submission) and its successor, Target Concrete Score
Matching (TCSM; Zhang, Zhai, Zhang, Thornton, Ou, Susskind, Jaitly, ICML 2025, arXiv 2504.16431), Sec. on
distillation from AR models. Our estimator is written from the maths below, not from their code (none is public).

Concrete score. For a distribution p over sequences and the 1-Hamming neighbourhood, the concrete score of p at x
is the vector of ratios c_p(x)_{i,y} = p(x^{i<-y}) / p(x) (x with token i replaced by y). Normalised over y at
position i it is the full conditional p(x^i = y | x^{!=i}). TCSM's insight is that the TARGET score lives in clean
data space, where an AR teacher p_AR can evaluate it; a masked denoiser p_theta(x0^i | x_t) (SUBS, MDLM) implies the
concrete score p_theta(x0^i = y | x_t) / p_theta(x0^i = x0^i | x_t) at a masked position i. Matching the normalised
scores with a KL divergence, for x0 ~ data, t ~ U[eps, 1], x_t ~ q(x_t | x0) = Cat(alpha_t x0 + (1 - alpha_t) m):

    L_TCS(theta) = E_{x0, t, x_t} 1/|M(x_t)| sum_{i in M(x_t)} KL( q^i(. | x0) || p_theta(x0^i = . | x_t, t) )   (1)

with M(x_t) the masked positions and q^i the target at position i, truncated to its top K tokens (ar_teacher.py).
KL(q || p) = CE(q, p) - H(q): only the cross-entropy moves theta, so (1) is linear in q, and its minimiser is
p*(y | x_t) = E_{x0 ~ data | x_t}[ q^i(y | x0) ].  Two targets (`target`):

  "full"    q^i(y | x0) = p_AR(x^i = y | x0^{!=i}) ∝ p_AR(x0^{i<-y}) over the K candidates y in top_K(q_pre^i),
            log p_AR(x0^{i<-y}) = log p_AR(y | x0^{<i}) + sum_{j>i} log p_AR(x0^j | x0^{<j} with x^i = y) + const.
            The exact TCS target (the normalised target concrete score, restricted to K candidates). With data
            drawn from p_AR, p* = p_AR(x0^i | x_t): the student becomes the exact denoiser of the teacher's
            distribution. Cost: K re-scorings of the suffix per masked position (|M| K teacher passes per sequence):
            tests and small models only.
  "prefix"  q^i(y | x0) = q_pre^i(y) = p_AR(x^i = y | x0^{<i}): every position in ONE teacher pass (the practical
            choice for a left-to-right factorisation). Assumption: the target ignores the clean tokens right of i.
            p* = E[p_AR(y | x0^{<i}) | x_t] equals the teacher's denoiser p_AR(x0^i = y | x_t) exactly when no
            unmasked token of x_t lies right of i (left-to-right / block-causal states, the last-masked positions
            of semi-AR decoding); with unmasked tokens on the right it is biased toward the left-to-right conditional.
  "taylor"  q^i(y | x0) ∝ p_AR(y | x0^{<i}) exp(delta_i(y)), delta_i(y) = (E_y - E_{x0^i}) . dS_i/de_i: the suffix
            term of "full" replaced by its first-order expansion in the input embedding e_i of token i
            (ARTeacher.suffix_taylor), S_i = sum_{j>i} log p_AR(x0^j | x0^{<j}). One forward and one backward
            teacher pass for every position at once; it sees the right context, at the price of the linearisation
            (exact only where S_i is linear in e_i). Top K is taken on the combined logits.
            `data_weight` lambda > 0 adds lambda * MDLM's cross-entropy on the data token, -log p_theta(x0^i | x_t)
            (the one-hot target, unbiased for the data distribution), as an anchor.

Training tokens: every step reads B L data tokens; `train_tokens` logs the running total (data efficiency).
Student: from scratch (method.init = "scratch") or a pre-trained DLM of the teacher's tokenizer (init = <ckpt>).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewstep.diffusion.mdlm import nelbo, q_xt, sample_t
from fewstep.distill.ar_teacher import ARDistillation, forward_kl, top_k_targets
from fewstep.distill.common import Setup, require


class TCS(ARDistillation):
    data_free = False

    @dataclass
    class Config:
        steps: int = 1000  # optimiser steps when train.max_steps = 0
        target: str = "prefix"  # "prefix" (one pass) | "taylor" (+ one backward) | "full" (exact, K |M| passes)
        top_k: int = 16  # K: teacher targets truncated to their top K tokens; 0 = full vocabulary ("prefix" only)
        data_weight: float = 0.0  # lambda: weight of MDLM's cross-entropy on the data token (anchor, see doc)
        full_chunk: int = 256  # candidate sequences per teacher pass for target = "full"
        time_cond: bool = False  # add adaLN time conditioning to the student

    def __init__(self, config: Config, setup: Setup):
        require((config.target in ("prefix", "taylor", "full"), "target", config.target,
                 "must be 'prefix', 'taylor' or 'full'"),
                (config.top_k >= (config.target == "full"), "top_k", config.top_k,
                 "must be >= 0, and >= 1 for target = 'full'"),
                (config.data_weight >= 0, "data_weight", config.data_weight, "must be >= 0"),
                (config.full_chunk >= 1, "full_chunk", config.full_chunk, "must be >= 1"))
        super().__init__(config, setup)

    @torch.no_grad()
    def targets(self, x0: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(indices (N, K) or None, log q (N, K)) at the N masked positions of x0 (B, L), row-major order."""
        if self.cfg.target == "taylor":
            log_pre, delta = self.teacher.suffix_taylor(x0)  # (B, L, V) each
            return top_k_targets((log_pre + delta)[masked].log_softmax(-1), self.cfg.top_k)  # (N, K)
        log_pre = self.teacher(x0)  # (B, L, V): p_AR(x^i | x0^{<i}) for every i, one pass
        idx, log_q = top_k_targets(log_pre[masked], self.cfg.top_k)  # (N, K)
        if self.cfg.target == "prefix":
            return idx, log_q
        if idx is None:  # K >= V: every token is a candidate
            idx = torch.arange(log_q.shape[-1], device=x0.device).expand(log_q.shape[0], -1)
        return idx, self._full(x0, masked, idx, log_pre[masked].gather(-1, idx))

    def _full(self, x0, masked, idx, log_pre_k) -> torch.Tensor:
        """log p_AR(x^i = y | x0^{!=i}) over the K candidates idx (N, K): prefix term + re-scored suffix."""
        b, i = masked.nonzero(as_tuple=True)  # (N,) sequence and position of each masked token
        N, K, L = idx.shape[0], idx.shape[1], x0.shape[1]
        seqs = x0[b][:, None, :].repeat(1, K, 1)  # (N, K, L)
        seqs.scatter_(2, i[:, None, None].expand(N, K, 1), idx[..., None])  # x0^{i <- y}
        seqs, pos = seqs.view(N * K, L), i.repeat_interleave(K)  # (N K, L), (N K,)
        suffix = torch.empty(N * K, device=x0.device)
        for a in range(0, N * K, self.cfg.full_chunk):
            z = seqs[a : a + self.cfg.full_chunk]
            lp = self.teacher(z).gather(-1, z[..., None]).squeeze(-1)  # (n, L) log p_AR(z^j | z^{<j})
            after = torch.arange(L, device=z.device)[None] > pos[a : a + self.cfg.full_chunk, None]  # j > i
            suffix[a : a + z.shape[0]] = (lp * after).sum(-1)
        return (log_pre_k + suffix.view(N, K)).log_softmax(-1)  # (N, K)

    def step(self, x0: torch.Tensor, step: int):
        t = sample_t(x0.shape[0], x0.device)  # (B,) antithetic
        x_t = q_xt(x0, self.s.schedule.alpha(t), self.s.mask_id)  # (B, L)
        masked = x_t == self.s.mask_id  # (B, L): the loss runs over every masked position
        idx, log_q = self.targets(x0, masked)  # (N, K)
        log_s = self.student(x_t, t, masked_only=True)  # (N, V + 1): head on the masked rows only
        kl = forward_kl(log_s, idx, log_q)
        loss = kl
        if self.cfg.data_weight > 0 and log_s.shape[0]:
            loss = loss + self.cfg.data_weight * F.nll_loss(log_s, x0[masked])
        tokens = self.count(step, x0.numel())
        logs = {"kl": kl.detach(), "masked_frac": masked.float().mean(), "train_tokens": tokens,
                "data_tokens": tokens}
        return {"student": loss}, logs

    @torch.no_grad()
    def validate(self, x0: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        """The student's NELBO on held-out text (comparable with an MDLM trained on the same data)."""
        t = sample_t(x0.shape[0], x0.device, antithetic=True, generator=generator)
        nats = nelbo(self.student, self.s.schedule, x0, t, self.s.mask_id, generator).sum().item()
        return {"nats": nats, "tokens": x0.numel()}
