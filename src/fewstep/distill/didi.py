"""DiDi-Instruct: discrete diffusion divergence instruct (Zheng et al., arXiv 2509.25035, Sec. 3).

A few-step student p_nu (initialised from the teacher p_theta) minimises the integral KL between the two models'
forward marginals q(z_t, t) = sum_x p(x) q(z_t | x), q(z_t | x) = Cat(alpha_t x + (1 - alpha_t) m):

    D_IKL(q_nu || q_theta) = int_0^1 omega(t) KL( q_nu(z_t, t) || q_theta(z_t, t) ) dt

Score-function identity (Thm. 3.1): the student's samples are discrete, so the gradient is a policy gradient,

    grad_nu D_IKL = E_{t ~ pi, x ~ p_nu, z_t ~ q(.|x)} [ omega(t)/pi(t) R(z_t, t) grad_nu log p_nu(x) ],
    R(z_t, t) = log q_nu(z_t, t) - log q_theta(z_t, t),

with no gradient through the sampling path. Density ratio: a discriminator D_lambda = sigmoid(d_lambda), a copy of
the teacher backbone (last `disc_blocks` blocks and the final norm trained) with a small MLP head, is trained by
binary cross-entropy to tell noised teacher samples (label 1) from noised student samples (label 0) at the same t:

    L_D(lambda) = -E_{x' ~ p_theta} log D_lambda(z'_t) - E_{x ~ p_nu} log(1 - D_lambda(z_t)),
    d*(z_t) = log q_theta(z_t, t) / q_nu(z_t, t) = -R(z_t, t),

so the reward r = d_lambda(z_t) (the paper's "reward = discriminator output") estimates -R. For masked diffusion
q(z_t, t) = alpha_t^|U| (1 - alpha_t)^(L - |U|) P(x^U = z^U) with U the unmasked positions of z_t, so the ratio
q_nu / q_theta = P_nu(x^U = z^U) / P_theta(x^U = z^U) does not depend on t: a backbone without time conditioning
(the usual MDLM teacher) is a complete discriminator. d_lambda(z) = sum_l head(h_l(z)), (B,), the head's last
layer zero-initialised so that d = 0 (ratio 1) at step 0, which is exact: the student starts as the teacher.
Label smoothing eps (targets 1 - eps/2, eps/2, the paper's 0.1) turns d* into a bounded monotone function of it.

Grouped reward normalisation (GRPO-style): the B samples of a micro-batch form B/G groups of G that share the
intermediate time tau and the corruption time t; within group g

    A_i = (r_i - mu_g) / (sigma_g + eps),   mu_g, sigma_g: mean and standard deviation of r over the group,

so A has zero mean and unit variance per group (the reward's t-dependent scale drops out).

Intermediate-state matching (score decomposition): the student's sample is the end of a two-step ancestral
trajectory m -> z_tau -> x, tau ~ pi(tau) = U[t_min, t_max] (the paper's Beta(1, 1)), and grad log p_nu(x) is
replaced by the score of the trajectory,

    grad log P_nu(z_tau | m) + grad log P_nu(x | z_tau, tau),
    log P_nu(z_s | z_t) = sum_{l: z_t^l = m, z_s^l != m} log p_nu(z_s^l | z_t, t) + (terms free of nu),

which is still unbiased (the reward depends on the trajectory only through x: tests/test_didi.py checks the
estimator against the exact gradient on an enumerable toy) and trains the student at the intermediate states it
visits. A generalised Jeffrey divergence between student and teacher predictions at those states (the paper's
regulariser; its exact form is unreleased, this one is ours)

    J_beta = sum_{z in {m, z_tau}} mean_{l: z^l = m} [ beta KL(p_nu^l || p_theta^l)
                                                      + (1 - beta) KL(p_theta^l || p_nu^l) ]

anchors the student to the teacher there (against mode collapse). Coupled time (the paper's ablation): t = tau.
With omega = pi (weights omega/pi = 1) the student loss per micro-batch is

    L(nu) = -1/B sum_i A_i log P_nu(traj_i) / L + gamma J_beta.

The loop alternates: every step trains the discriminator on (z'_t, z_t); every `disc_steps`-th step after
`disc_warmup` also the student, with rewards from the discriminator before that step's update. Real samples x'
come from the teacher (`real = "teacher"`, `teacher_steps` ancestral steps: the exact IKL target) or from the data
batch (`real = "data"`, cheaper, the distribution the teacher was fitted to).

Reward-guided ancestral sampling (RGAS, Sec. 3.4) and the discriminator's module: distill/rgas.py.

Exact reward (`reward = "elbo"`; ours, no discriminator). At t -> 0 the integral KL's integrand is the plain KL
between the student's K-step sampling distribution p_nu^K(x) and the teacher p_theta(x), and both log densities
have computable bounds, so the ratio need not be learnt. Let tau = (z_1, ..., z_K = x) be the student's K-step
ancestral trajectory on the uniform grid t_k = 1 - k/K (the grid it is sampled on), and r(tau | x) the forward
(masking) process's law of the same trajectory given x. Which positions unmask at each step has the same law under
both (it does not depend on the tokens), so
    log P_nu(tau) - log r(tau | x) = l_nu(tau) = sum_k sum_{l unmasked at step k} log p_nu(x^l | z_{k-1}, t_{k-1}).
With N_theta(x) >= -log p_theta(x) the teacher's NELBO, estimated in its any-order form: for the log-linear schedule
and a denoiser without time input, int_0^1 (1/t) C(L, k) t^k (1 - t)^(L - k) dt = 1/k turns the continuous NELBO into
    N_theta(x) = sum_{k=1}^{L} E_{|M| = k} [ 1/k sum_{l in M} -log p_theta(x^l | x with the positions M masked) ]
(the expected any-order autoregressive NLL), estimated with `elbo_mc` mask sizes k stratified over 1..L: 15 nats of
noise per sequence at 4 passes on the tiny teacher against 44 for the t-sampled estimator (whose 1/t weight is
heavy-tailed), for an 8-nat spread of R across samples. Then
    U(nu) = E_{tau ~ P_nu} [ l_nu(tau) + N_theta(x) ]
          = KL(p_nu^K || p_theta) + E_x KL(P_nu(tau | x) || r(tau | x)) + E_x [N_theta(x) + log p_theta(x)]
          >= KL(p_nu^K(x) || p_theta(x)),
an upper bound on the reverse KL of the student's few-step samples. Because E[grad l_nu(tau)] = E[grad log
P_nu(tau)] = 0, grad U = E[ R(tau) grad l_nu(tau) ] with R = l_nu(tau) + N_theta(x) (detached): the same policy
gradient as above with this exact R in place of -d_lambda, the same grouped normalisation (A = -normalised R) and
the same Jeffrey term at every visited state. The gap terms make the student prefer sequences whose decoding order
does not matter (E_x KL(P_nu(tau | x) || r(tau | x))) and on which the teacher's bound is tight. tests/test_didi.py
checks U >= KL and the estimator against grad U by enumeration on a toy. Logged: `kl_bound` = E[R] / L (nats per
token, falls as the student's K-step samples approach the teacher), `teacher_nll` = E[N_theta] / L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewstep.diffusion.mdlm import masked_nll, nelbo, q_xt, sample_t
from fewstep.diffusion.sampling import sample, time_grid
from fewstep.distill.common import Setup, require
from fewstep.distill.divergences import kl_forward, kl_reverse
from fewstep.distill.rgas import Discriminator
from fewstep.models import evaluating


def group_normalize(r: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mu_g) / (sigma_g + eps) over consecutive groups of `group` entries. r: (B,) -> (B,)."""
    g = r.view(-1, group)  # (B/G, G)
    mu, sigma = g.mean(-1, keepdim=True), g.std(-1, unbiased=False, keepdim=True)
    return ((g - mu) / (sigma + eps)).view(-1)


def transition_log_prob(log_p: torch.Tensor, x_t: torch.Tensor, x_s: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The nu-dependent part of log P_nu(x_s | x_t) of one ancestral step: sum over the positions the step
    unmasked of log p_nu(x_s^l | x_t). log_p: (B, L, V), x_t, x_s: (B, L) -> (B,)."""
    new = (x_t == mask_id) & (x_s != mask_id)  # (B, L)
    lp = log_p.gather(-1, x_s[..., None]).squeeze(-1)  # (B, L)
    return torch.where(new, lp, torch.zeros_like(lp)).sum(-1)


def jeffrey(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """beta KL(s || t) + (1 - beta) KL(t || s), mean over rows (N, V)."""
    return beta * kl_reverse(log_s, log_t) + (1 - beta) * kl_forward(log_s, log_t)


class DiDi:
    data_free = False

    @dataclass
    class Config:
        steps: int = 500  # optimiser steps when train.max_steps = 0 (paper: 10k at OWT scale)
        group: int = 4  # G: samples per group sharing (tau, t); rewards are normalised within a group
        t_min: float = 0.02  # tau ~ U[t_min, t_max] (the paper's Beta(1, 1)); t too when not coupled
        t_max: float = 0.98
        coupled_time: bool = True  # corruption time t = tau (the paper's "coupled time")
        real: str = "teacher"  # teacher | data: where the discriminator's real samples x' come from
        teacher_steps: int = 32  # the teacher's ancestral steps for x' (real = "teacher")
        disc_blocks: int = 4  # trained last blocks of the discriminator (the reference: 4 of 12)
        disc_steps: int = 1  # discriminator updates per student update
        disc_lr_scale: float = 1.0  # the discriminator's lr = this x train.lr (the paper's ratio: 10, 1e-5 vs 1e-6)
        disc_warmup: int = 0  # discriminator-only steps before the student starts
        label_smoothing: float = 0.1
        match_weight: float = 1.0  # gamma: intermediate-state Jeffrey divergence to the teacher
        match_beta: float = 0.5  # beta: 1 = reverse KL (mode-seeking), 0 = forward KL
        time_cond: bool = False  # adaLN time conditioning for the student
        reward: str = "disc"  # disc: discriminator logit (the paper) | elbo: exact bound, no discriminator (ours)
        student_steps: int = 4  # K: the student's trajectory, uniform grid (reward = elbo)
        elbo_mc: int = 8  # teacher passes per sequence for its NELBO, mask sizes stratified over 1..L (reward = elbo)

    def __init__(self, config: Config, setup: Setup):
        self.cfg, self.s = config, setup
        c = config
        n_layers = setup.teacher.backbone.n_layers
        require((c.group >= 2 and setup.batch % c.group == 0, "group", c.group,
                 f"must be >= 2 and divide the micro-batch of {setup.batch}"),
                (0.0 < c.t_min <= c.t_max < 1.0, "t_min/t_max", (c.t_min, c.t_max),
                 "must satisfy 0 < t_min <= t_max < 1"),
                (c.real in ("teacher", "data"), "real", c.real, "must be 'teacher' or 'data'"),
                (c.reward in ("disc", "elbo"), "reward", c.reward, "must be 'disc' or 'elbo'"),
                *((v >= 1, k, v, "must be >= 1") for k, v in (("steps", c.steps), ("teacher_steps", c.teacher_steps),
                  ("disc_steps", c.disc_steps), ("student_steps", c.student_steps), ("elbo_mc", c.elbo_mc))),
                (c.elbo_mc < 1 or c.reward != "elbo" or setup.seq_len % c.elbo_mc == 0, "elbo_mc", c.elbo_mc,
                 f"must divide the sequence length {setup.seq_len} (the mask sizes are stratified over 1..L)"),
                (c.disc_warmup >= 0, "disc_warmup", c.disc_warmup, "must be >= 0"),
                (0 <= c.match_beta <= 1, "match_beta", c.match_beta, "must be in [0, 1]"),
                (c.disc_lr_scale > 0, "disc_lr_scale", c.disc_lr_scale, "must be > 0"),
                (0 <= c.label_smoothing < 1, "label_smoothing", c.label_smoothing, "must be in [0, 1)"),
                (1 <= c.disc_blocks <= n_layers, "disc_blocks", c.disc_blocks,
                 f"must be in [1, {n_layers}] (the teacher's blocks)"))
        self.student, self.teacher = setup.student, setup.teacher
        self.disc = Discriminator(setup.teacher.backbone, c.disc_blocks) if c.reward == "disc" else None

    def trainable(self):
        if self.disc is None:
            return {"student": self.student}
        return {"student": self.student, "disc": self.disc}  # student first: the loop validates/EMA-swaps it

    def planned_steps(self) -> int:
        return self.cfg.steps

    def lr_scale(self) -> dict[str, float]:
        return {"disc": self.cfg.disc_lr_scale}

    @torch.no_grad()
    def rollout(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student trajectories m -> z_tau -> x, G per group (one tau per group). tau: (B/G,) -> 2 x (B, L)."""
        z, x = [], []
        with evaluating(self.student):  # the law whose log P the policy gradient differentiates: no dropout
            for tg in tau.tolist():
                _, traj = sample(self.student, self.s.schedule, batch=self.cfg.group, length=self.s.seq_len,
                                 steps=2, mask_id=self.s.mask_id,
                                 times=torch.tensor([1.0, tg, 0.0], dtype=torch.float64), return_trajectory=True)
                z.append(traj[1])
                x.append(traj[2])
        return torch.cat(z), torch.cat(x)

    @torch.no_grad()
    def rollout_grid(self, batch: int) -> tuple[list[torch.Tensor], list[float]]:
        """The student's K-step ancestral trajectory on the uniform grid: K + 1 states (B, L) and their times."""
        K = self.cfg.student_steps
        with evaluating(self.student):
            _, traj = sample(self.student, self.s.schedule, batch=batch, length=self.s.seq_len, steps=K,
                             mask_id=self.s.mask_id, return_trajectory=True)
        return traj, time_grid(K).tolist()

    @torch.no_grad()
    def teacher_nelbo(self, x: torch.Tensor) -> torch.Tensor:
        """N_theta(x) >= -log p_theta(x) in nats, (B, L) -> (B,): the NELBO in its any-order form (docstring),
        sum_{k=1}^{L} E_{|M| = k} [ 1/k sum_{l in M} -log p_theta(x^l | x with M masked) ], with elbo_mc mask
        sizes k stratified over 1..L (one uniformly random mask set of each size per sequence)."""
        M, (B, L), dev = self.cfg.elbo_mc, x.shape, x.device
        k = ((torch.arange(M, device=dev) + torch.rand(1, device=dev)) * L / M).floor().long() + 1  # (M,)
        hide = torch.rand(M, B, L, device=dev).argsort(-1).argsort(-1) < k[:, None, None]  # (M, B, L): |M| = k
        x_t = torch.where(hide, self.s.mask_id, x[None]).view(M * B, L)
        # time-conditioned teachers: the t whose masked fraction 1 - alpha_t is k / L (not k / L itself: cosine)
        t = self.s.schedule.time_of(1 - k.float() / L).repeat_interleave(B)
        nll = masked_nll(self.teacher, x_t, t, x.repeat(M, 1), self.s.mask_id).view(M, B, L)
        return (nll.sum(-1) / k[:, None]).sum(0) * L / M  # (M, B) means per mask size -> (B,)

    @torch.no_grad()
    def real(self, x_data: torch.Tensor) -> torch.Tensor:
        if self.cfg.real == "data":
            return x_data
        return sample(self.teacher, self.s.schedule, batch=x_data.shape[0], length=self.s.seq_len,
                      steps=self.cfg.teacher_steps, mask_id=self.s.mask_id)

    def student_terms(self, traj: list[torch.Tensor], times: list):
        """(log P_nu(trajectory) (B,), J_beta, log p_nu at the all-mask state (1, L, V)) with gradients into the
        student only. traj: K + 1 states (B, L) from the all-mask state; times: K + 1 floats or (B,) tensors."""
        B, mask, dev = traj[-1].shape[0], self.s.mask_id, traj[-1].device
        log_traj, match, log_p1 = 0.0, 0.0, None
        with evaluating(self.student):  # the law the rollout sampled from (no dropout), with gradients
            for k in range(len(traj) - 1):
                z = traj[k][:1] if k == 0 else traj[k]  # the all-mask state: one prediction serves every sequence
                t = torch.as_tensor(times[k], dtype=torch.float32, device=dev).expand(B)[: z.shape[0]]
                log_p = self.student(z, t)  # (B or 1, L, V)
                if self.cfg.match_weight > 0:
                    with torch.no_grad():
                        log_q = self.teacher(z, t)
                    hid = z == mask
                    match = match + jeffrey(log_p[hid], log_q[hid], self.cfg.match_beta)
                log_traj = log_traj + transition_log_prob(log_p.expand(B, -1, -1), traj[k], traj[k + 1], mask)
                log_p1 = log_p if k == 0 else log_p1  # (1, L, V)
        return log_traj, match, log_p1

    def step(self, x0: torch.Tensor, step: int):
        if self.cfg.reward == "elbo":
            return self.step_elbo(x0.shape[0])
        c, dev = self.cfg, x0.device
        B, L, G = x0.shape[0], x0.shape[1], self.cfg.group
        tau = c.t_min + (c.t_max - c.t_min) * torch.rand(B // G, device=dev)  # (B/G,)
        t = tau if c.coupled_time else c.t_min + (c.t_max - c.t_min) * torch.rand(B // G, device=dev)
        tau, t = tau.repeat_interleave(G), t.repeat_interleave(G)  # (B,)
        z_tau, x = self.rollout(tau[::G])
        alpha = self.s.schedule.alpha(t)
        z_fake = q_xt(x, alpha, self.s.mask_id)  # (B, L): noised student samples
        z_real = q_xt(self.real(x0), alpha, self.s.mask_id)  # same t: the ratio is estimated per noise level
        d_real, d_fake = self.disc(torch.cat([z_real, z_fake]), torch.cat([t, t])).chunk(2)  # (B,) each
        eps = c.label_smoothing
        disc_loss = (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 1 - eps / 2))
                     + F.binary_cross_entropy_with_logits(d_fake, torch.full_like(d_fake, eps / 2)))
        losses = {"disc": disc_loss}
        logs = {"disc_loss": disc_loss.detach(), "disc_acc": ((d_real > 0).float().mean() + (d_fake < 0).float()
                                                              .mean()).detach() / 2,
                "reward": d_fake.mean().detach(), "reward_std": d_fake.view(-1, G).std(-1).mean().detach()}
        if step >= c.disc_warmup and (step - c.disc_warmup) % c.disc_steps == c.disc_steps - 1:
            adv = group_normalize(d_fake.detach(), G)  # A_i, (B,); r = d_lambda(z_t) estimates -R
            log_traj, match, log_p1 = self.student_terms([torch.full_like(x, self.s.mask_id), z_tau, x],
                                                         [1.0, tau, 0.0])
            pg = -(adv * log_traj).mean() / L
            losses["student"] = pg + c.match_weight * match
            logs.update(pg=pg.detach(), match=torch.as_tensor(match).detach(),
                        student_entropy=-(log_p1.exp() * log_p1).sum(-1).mean().detach())
        return {k: losses[k] for k in ("student", "disc") if k in losses}, logs

    def step_elbo(self, B: int):
        """One student update with the exact reward R = l_nu(tau) + N_theta(x) (module docstring)."""
        c, L = self.cfg, self.s.seq_len
        traj, times = self.rollout_grid(B)
        n_theta = self.teacher_nelbo(traj[-1])  # (B,)
        log_traj, match, log_p1 = self.student_terms(traj, times)
        R = log_traj.detach() + n_theta  # (B,): a one-sample estimate of the KL bound U per sequence
        pg = -(group_normalize(-R, c.group) * log_traj).mean() / L
        h1 = -(log_p1.exp() * log_p1).sum(-1).mean()  # the student's entropy at the all-mask state
        logs = {"kl_bound": R.mean() / L, "teacher_nll": n_theta.mean() / L, "pg": pg.detach(),
                "match": torch.as_tensor(match).detach(), "student_entropy": h1.detach()}
        return {"student": pg + c.match_weight * match}, logs

    @torch.no_grad()
    def validate(self, x0: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        """The student's NELBO on held-out text: what distillation costs in likelihood."""
        t = sample_t(x0.shape[0], x0.device, antithetic=True, generator=generator)
        nats = nelbo(self.student, self.s.schedule, x0, t, self.s.mask_id, generator).sum().item()
        return {"nats": nats, "tokens": x0.numel()}
