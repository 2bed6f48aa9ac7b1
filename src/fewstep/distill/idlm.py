"""IDLM: inverse distillation of a diffusion LM into a few-step student (Li, Gushchin et al., arXiv 2602.19066).

Teacher f* (frozen) minimises E_{p*} L(f, x0) for the teacher's own diffusion loss L (MDLM or uniform-state NELBO).
A student generator G_theta induces p_theta; a fake model f_hat (initialised from the teacher) is fitted to it:

    fake:    min_f_hat  E_{x0 ~ p_theta} L(f_hat, sg(x0))
    student: L_IDLM(theta) = E_{x0 ~ p_theta} [ L(f*, x0) - L(f_hat, x0) ]      (f_hat detached)

with L_IDLM >= KL(p_theta || p*) >= 0 and = 0 iff p_theta = p* when f_hat is the optimal fake (paper Thm. 1; for
the exact MDLM NELBO of oracle denoisers the difference is exactly KL(p_theta || p*), tests/test_idlm.py).
Multistep generation (the paper's `multistep_generation`): x_data ~ batch, t_g ~ U[t_min, t_max],
x_tg ~ q(x_t | x_data), and x0 = G_theta(x_tg, t_g) on the simplex (softmax probs pi, (B, L, V)), so at inference
the student is an ordinary few-step sampler. `states = "student"` (ours) takes x_tg instead from the student's own
K-step ancestral rollout (a uniform step k of K, t_g = t_k, stop-gradient): p_theta is then the law of the
student's completions from the states it actually visits, and L_IDLM >= KL(p_theta || p*) still holds for it.
The loop alternates by back-propagating each loss only into its own module; teacher and fake outputs inside the
student loss are computed under no_grad, so the student loss has no graph into f_hat (and the fake loss sees
sg(pi), so none into G).

Masked teachers (MDLM Eq. 10, SUBS): with t' ~ U[eps, 1], z ~ q(. | x0) drawn as an x0-independent mask
(prob 1 - alpha_t') and clean tokens drawn hard from sg(pi), only masked positions count and the loss is linear in x0:

    L(f, pi) = w(t') sum_{l: z^l = m} sum_v pi^l_v (-log f(z, t')^l_v),   w(t') = -alpha'_t' / (1 - alpha_t')

so the gradient flows through the cross-entropy weights pi (the paper's SUBS relaxation).

Uniform-state teachers (diffusion/uniform.py, Duo base process): the per-position NELBO integrand, written for a
relaxed xbar = N alpha_t pi + (1 - alpha_t) (one-hot x0 replaced by pi) and i = z^l,

    l(xbar, i) = beta_t/N [ N/xth_i - N/xbar_i + sum_y (xbar_y/xbar_i) log(xbar_y xth_i / (xbar_i xth_y)) ],

with z^l drawn from the noised sg(pi) (a hard draw x ~ sg(pi), then q(z | x)). Its model-dependent part satisfies
E_{v ~ pi} E_{i ~ q(.|v)} l_f(v, i) = sum_i (xbar_i / N) l_f(xbar, i), which is LINEAR in pi (xbar_i l_f(xbar, i) is
affine in xbar); the x0-only terms cancel in L(f*) - L(f_hat). We use the estimator (xbar_i / sg(xbar_i)) l(xbar, i):
its value equals l, and given the other positions' draws z^{-l} both its expectation and its gradient in pi^l are
exact (the factor supplies the score-function term of z^l's own law, which sg(pi) in the draw would drop; without
it the gradient is biased, tests/test_idlm.py). As in the paper's MDLM relaxation, the law of the context z^{-l}
is stop-gradient: with correlated teachers the total gradient drops that term (on three toys: cos 0.91-0.996 to the
exact KL gradient). Teacher and fake see ordinary token states; for one-hot pi it is exactly uniform.nelbo_terms.

Gaussian reparameterisation (`relax = "gaussian"`, uniform teachers; the paper's Duo variant). Duo's latent
w = alphatilde_t pi + sigmatilde_t eps (uniform.duo_latent, alpha_t = T(alphatilde_t)) gives z = argmax w, and teacher
and fake read the soft token softmax(w / tau) (its embedding, sum_v y_v E_v), so the gradient flows pathwise through
their inputs as well as through the relaxed xbar in l(xbar, z) (no xbar_i / sg(xbar_i) factor: z's law is now the
latent's). For one-hot pi, z has exactly the uniform-state law; as tau -> 0 the soft token is one-hot(z) (tau = 1e-3
in the paper's scripts), and the pathwise term vanishes away from near-ties of w. For a soft pi the latent's law of z
is not the noised pi that l(xbar, z) assumes (docs/distillation.md measures the gap and the student diverging).

Exact gradient (`context_grad = true`, ours; masked and uniform). With d_l = l(f*)^l - l(f_hat)^l per position and
D = sum_l d_l, the dropped term is the score of each position's draw times the OTHER positions' losses,

    grad_ctx = E [ sum_m (D - d_m - b) grad log q(z^m | pi^m) ],   log q: log pi^m_{z^m} (masked, z^m a token),
                                                                    log xbar_{z^m} (uniform),

with b the mean of D over the other sequences of the batch (a baseline free of the sequence's own draws). On the
correlated toy the estimator then matches grad KL(q_pi || p*) (cos > 0.999, tests/test_idlm.py), but at L = 128 it
is a sequence-level score-function term and far noisier than the relaxation (docs/distillation.md measures both).

Data anchor (`data_weight = lambda`, ours): the student loss adds lambda x the student's own diffusion NELBO on the
data batch (per token), which keeps the student a denoiser of the training text while IDLM sharpens it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fewstep.diffusion.mdlm import sample_t
from fewstep.diffusion.sampling import full_precision, sample_categorical
from fewstep.diffusion.schedule import weight
from fewstep.distill.common import Setup, require
from fewstep.models import evaluating


def soft_uniform_terms(xbar_theta: torch.Tensor, xbar: torch.Tensor, z_t: torch.Tensor, alpha_t: torch.Tensor,
                       dalpha_t: torch.Tensor) -> torch.Tensor:
    """uniform.nelbo_terms for a relaxed xbar (B, L, N) (sum_y xbar_y = N) instead of a one-hot x0 -> (B, L)."""
    N = xbar_theta.shape[-1]
    beta = (-dalpha_t / alpha_t)[:, None].to(xbar_theta.dtype)  # (B, 1)
    xbar_i = xbar.gather(-1, z_t[..., None]).squeeze(-1)  # (B, L)
    xth_i = xbar_theta.gather(-1, z_t[..., None]).squeeze(-1)
    s_xx = (xbar * xbar.log()).sum(-1)
    s_xth = (xbar * xbar_theta.log()).sum(-1)
    kl = (s_xx - N * xbar_i.log() + N * xth_i.log() - s_xth) / xbar_i
    return beta / N * (N / xth_i - N / xbar_i + kl)


def masked_loss(log_f: torch.Tensor, probs: torch.Tensor, z: torch.Tensor, t: torch.Tensor, schedule,
                mask_id: int) -> torch.Tensor:
    """Per-position w(t) <pi^l, -log f^l> on masked positions, 0 elsewhere (B, L), linear in probs (B, L, V)."""
    ce = -(probs * log_f).sum(-1)  # (B, L); probs of the mask column are exactly 0
    return weight(schedule, t)[:, None] * torch.where(z == mask_id, ce, torch.zeros_like(ce))


def uniform_loss(log_f: torch.Tensor, probs: torch.Tensor, z: torch.Tensor, t: torch.Tensor, schedule,
                 own_score: bool = True) -> torch.Tensor:
    """Per-position relaxed uniform-state NELBO (B, L) with the exact-gradient factor xbar_i / sg(xbar_i)
    (own_score=False drops it: the gradient then flows only through the relaxed xbar, and is biased)."""
    N = probs.shape[-1]
    a = schedule.alpha(t)[:, None, None]
    xbar = N * a * probs + (1 - a)  # (B, L, N)
    xbar_theta = N * a * log_f.exp() + (1 - a)
    xbar_i = xbar.gather(-1, z[..., None]).squeeze(-1)
    terms = soft_uniform_terms(xbar_theta, xbar, z, schedule.alpha(t), schedule.dalpha(t))
    return xbar_i / xbar_i.detach() * terms if own_score else terms


def log_q_z(probs: torch.Tensor, z: torch.Tensor, t: torch.Tensor, schedule, mask_id: int | None) -> torch.Tensor:
    """log q(z^l | pi^l) up to terms free of pi (B, L): the law of each position's draw in `IDLM.corrupt`.
    Masked: log pi^l_{z^l} where z^l is a token, 0 where it is masked; uniform: log xbar_{z^l}, as
    q(z^l = i | pi^l) = (N alpha_t pi^l_i + 1 - alpha_t) / N."""
    p_z = probs.gather(-1, z[..., None]).squeeze(-1)  # (B, L); the mask column of probs is 0
    if mask_id is not None:
        return torch.where(z == mask_id, torch.zeros_like(p_z), p_z.clamp_min(1e-30).log())
    a = schedule.alpha(t)[:, None]
    return (probs.shape[-1] * a * p_z + (1 - a)).log()


def context_score(d: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """The score-function term of the context's law (B,): sum_m sg(D - d_m - b) log q(z^m | pi^m), D = sum_l d_l.
    Each position's own term d_m carries its own score already (uniform_loss's factor; masked: linear in pi);
    this adds the dependence of the OTHER positions' losses on z^m, with a leave-one-sequence-out baseline b.
    d, log_q: (B, L)."""
    d = d.detach()
    D = d.sum(-1, keepdim=True)  # (B, 1)
    b = (D.sum() - D) / max(D.shape[0] - 1, 1)  # independent of the sequence's own draws
    return ((D - d - b) * log_q).sum(-1)


class IDLM:
    data_free = False
    teacher_kinds = ("mdlm", "uniform")

    @dataclass
    class Config:
        student_steps: int = 4  # the student's sampling steps (eval; and the grid when t_grid)
        fake_steps: int = 1  # fake updates per student update (the paper's fake_frequency)
        fake_lr_scale: float = 1.0  # the fake model's lr = this x train.lr (the paper: 1, same lr for both)
        steps: int = 1000  # optimiser steps when train.max_steps = 0
        t_min: float = 1e-3  # generator input time t_g ~ U[t_min, t_max]
        t_max: float = 1.0
        t_grid: bool = False  # draw t_g from the student's sampling grid {k / student_steps} instead
        states: str = "data"  # data: x_tg ~ q(x_t | x_data) | student: a state of the student's own rollout (ours)
        loss_eps: float = 1e-3  # t' ~ U[loss_eps, 1] for the diffusion losses
        context_grad: bool = False  # add the score-function term of the noised context's law (exact gradient)
        own_score: bool = True  # uniform: the xbar_i / sg(xbar_i) factor (false: an ablation; the student diverges)
        relax: str = "hard"  # uniform: hard (hard z, exact in expectation) | gaussian (Duo latent, soft inputs)
        tau: float = 1e-3  # relax = gaussian: temperature of the soft token softmax(w / tau) (paper: 1e-3)
        data_weight: float = 0.0  # + this x the student's own diffusion NELBO on the data batch (ours; an anchor)
        time_cond: bool = False  # adaLN time conditioning for a masked student (uniform ones always have it)

    def __init__(self, config: Config, setup: Setup):
        self.cfg, self.s = config, setup
        c = config
        self.student, self.teacher = setup.student, setup.teacher
        self.masked = setup.mask_id is not None
        require(*((v >= 1, k, v, "must be >= 1") for k, v in (("fake_steps", c.fake_steps),
                                                               ("student_steps", c.student_steps), ("steps", c.steps))),
                (c.data_weight >= 0, "data_weight", c.data_weight, "must be >= 0"),
                (c.fake_lr_scale > 0, "fake_lr_scale", c.fake_lr_scale, "must be > 0"),
                (0.0 < c.t_min <= c.t_max <= 1.0, "t_min/t_max", (c.t_min, c.t_max),
                 "must satisfy 0 < t_min <= t_max <= 1"),
                (0.0 < c.loss_eps < 1.0, "loss_eps", c.loss_eps, "must be in (0, 1) (t' ~ U[loss_eps, 1])"),
                (c.states in ("data", "student"), "states", c.states, "must be 'data' or 'student'"),
                (c.relax in ("hard", "gaussian"), "relax", c.relax, "must be 'hard' or 'gaussian'"),
                (c.relax != "gaussian" or (not self.masked and not c.context_grad and c.tau > 0), "relax", c.relax,
                 "needs a uniform-state teacher, method.tau > 0 and method.context_grad = false"))
        self.gaussian = c.relax == "gaussian"
        self.fake = copy.deepcopy(setup.teacher).requires_grad_(True).train()  # f_hat starts as f*

    def trainable(self):
        return {"student": self.student, "fake": self.fake}  # student first: the loop validates/EMA-swaps it

    def planned_steps(self) -> int:
        return self.cfg.steps

    def lr_scale(self) -> dict[str, float]:
        return {"fake": self.cfg.fake_lr_scale}

    def generate(self, x_data: torch.Tensor) -> torch.Tensor:
        """Student 'x0' on the simplex (B, L, V): probs of G(x_tg, t_g) with x_tg ~ q(x_t | x_data)."""
        from fewstep.diffusion.mdlm import q_xt
        from fewstep.diffusion.uniform import q_zt

        B, dev, c = x_data.shape[0], x_data.device, self.cfg
        if c.states == "student":
            x_t, t = self.own_states(B, dev)
            return self.student(x_t, t).exp()
        if c.t_grid:
            t = torch.randint(1, c.student_steps + 1, (B,), device=dev) / c.student_steps
        else:
            t = c.t_min + (c.t_max - c.t_min) * torch.rand(B, device=dev)
        alpha = self.s.schedule.alpha(t)
        x_t = q_xt(x_data, alpha, self.s.mask_id) if self.masked else q_zt(x_data, alpha, self.vocab)
        return self.student(x_t, t).exp()

    @torch.no_grad()
    def own_states(self, B: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_tk (B, L), t_k (B,)): for each sequence, the state at a uniform step k in {0..K-1} of the student's
        own K-step ancestral rollout (the states it meets at inference) instead of noised data; stop-gradient."""
        from fewstep.diffusion.sampling import sample, time_grid

        K = self.cfg.student_steps
        with evaluating(self.student):
            _, traj = sample(self.student, self.s.schedule, batch=B, length=self.s.seq_len, steps=K,
                             mask_id=self.s.mask_id, return_trajectory=True)
        k = torch.randint(0, K, (B,), device=dev)
        x_t = torch.stack(traj[:K])[k, torch.arange(B, device=dev)]  # (B, L)
        return x_t, time_grid(K).to(dev, torch.float32)[k]

    @property
    def vocab(self) -> int:
        return self.teacher.backbone.vocab_size

    def corrupt(self, probs: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z (B, L), the models' input): z ~ q(z | x0) with x0 drawn hard from sg(probs), the input z itself (the
        mask draw never depends on x0); relax = gaussian: z = argmax w for Duo's latent w of probs, the input the
        soft token softmax(w / tau) (B, L, N), differentiable in probs."""
        from fewstep.diffusion.mdlm import q_xt
        from fewstep.diffusion.uniform import duo_latent, q_zt

        alpha = self.s.schedule.alpha(t)
        if self.gaussian:
            w = duo_latent(probs, alpha)  # (B, L, N)
            return w.argmax(-1), torch.softmax(w / self.cfg.tau, -1)
        x0 = sample_categorical(probs.detach())
        z = q_xt(x0, alpha, self.s.mask_id) if self.masked else q_zt(x0, alpha, self.vocab)
        return z, z

    @staticmethod
    def denoise(model, x_in: torch.Tensor, t: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """model(x_in, t) for token ids (B, L); a soft token (B, L, N) enters as its embedding y @ E (B, L, D).
        frozen: with the model's parameters detached (when grad is on), so a gradient reaches its input only."""
        params = None
        if frozen and torch.is_grad_enabled():
            params = {n: p.detach() for n, p in model.named_parameters()}
        if x_in.dim() == 3:
            x_in = x_in @ (model.backbone.embed.weight if params is None else params["backbone.embed.weight"])
        return model(x_in, t) if params is None else torch.func.functional_call(model, params, (x_in, t))

    def loss(self, log_f: torch.Tensor, probs: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.masked:
            return masked_loss(log_f, probs, z, t, self.s.schedule, self.s.mask_id)
        return uniform_loss(log_f, probs, z, t, self.s.schedule, self.cfg.own_score and not self.gaussian)

    def student_loss(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(surrogate, L(f*, pi) - L(f_hat, pi)) per token; gradient only through pi (both models' outputs are
        detached, except through their soft inputs when relax = gaussian; the loop steps only the student). The
        surrogate is the difference itself, plus `context_score` when method.context_grad. Teacher and fake run in
        float32 even in a bf16 step: f_hat starts as f* and drifts by about one learning rate a step, far below
        bf16's resolution, so their difference under autocast would be mostly rounding noise."""
        t = sample_t(probs.shape[0], probs.device, eps=self.cfg.loss_eps)
        z, x_in = self.corrupt(probs, t)
        with (torch.set_grad_enabled(self.gaussian and torch.is_grad_enabled()), evaluating(self.fake),
              full_precision(probs.device)):
            x_in = x_in.float() if x_in.is_floating_point() else x_in  # soft tokens (relax = gaussian) or ids
            log_t, log_f = (self.denoise(m, x_in, t, frozen=True) for m in (self.teacher, self.fake))
        d = self.loss(log_t, probs, z, t) - self.loss(log_f, probs, z, t)  # (B, L)
        value = d.sum(-1)  # (B,)
        surrogate = value
        if self.cfg.context_grad:
            surrogate = value + context_score(d, log_q_z(probs, z, t, self.s.schedule, self.s.mask_id))
        L = probs.shape[1]
        return surrogate.mean() / L, value.mean().detach() / L

    def fake_loss(self, probs: torch.Tensor) -> torch.Tensor:
        """The teacher's diffusion loss of f_hat on the student's (detached) samples, per token."""
        probs = probs.detach()
        t = sample_t(probs.shape[0], probs.device, eps=self.cfg.loss_eps)
        z, x_in = self.corrupt(probs, t)
        return self.loss(self.denoise(self.fake, x_in, t), probs, z, t).sum(-1).mean() / probs.shape[1]

    def step(self, x0: torch.Tensor, step: int):
        train_student = step % self.cfg.fake_steps == self.cfg.fake_steps - 1
        with torch.set_grad_enabled(train_student and torch.is_grad_enabled()):
            probs = self.generate(x0)  # (B, L, V)
        losses = {"fake": self.fake_loss(probs)}
        logs = {"fake_loss": losses["fake"].detach()}
        if train_student:
            losses["student"], logs["idlm"] = self.student_loss(probs)
            if self.cfg.data_weight > 0:
                t = sample_t(x0.shape[0], x0.device, antithetic=True, eps=self.cfg.loss_eps)
                nll = self.data_nelbo(x0, t).mean() / x0.shape[1]  # nats per token
                losses["student"] = losses["student"] + self.cfg.data_weight * nll
                logs["data_nelbo"] = nll.detach()
        logs["student_entropy"] = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().detach()
        return {k: losses[k] for k in ("student", "fake") if k in losses}, logs

    def data_nelbo(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None):
        """The student's NELBO (the teacher's objective) on text x0 (B, L) at times t (B,) -> (B,) nats."""
        from fewstep.diffusion import mdlm, uniform

        if self.masked:
            return mdlm.nelbo(self.student, self.s.schedule, x0, t, self.s.mask_id, generator)
        return uniform.nelbo(self.student, self.s.schedule, x0, t, generator)

    @torch.no_grad()
    def validate(self, x0: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        """The student's NELBO (teacher's objective) on held-out text."""
        t = sample_t(x0.shape[0], x0.device, antithetic=True, eps=1e-5 if self.masked else 1e-3, generator=generator)
        return {"nats": self.data_nelbo(x0, t, generator).sum().item(), "tokens": x0.numel()}
