"""DiDi-Instruct's discriminator and its reward-guided ancestral sampler (RGAS; Zheng et al., arXiv 2509.25035).

The discriminator d_lambda(z, t) estimates log q_theta(z_t) / q_nu(z_t), the log density ratio of noised teacher
and student samples (distill/didi.py trains it); RGAS samples the student with it.

Reward-guided ancestral sampling (RGAS, Sec. 3.4; `RGAS` below, a `guidance` hook of diffusion/sampling.sample):
for the first (1 - rho) N of N steps, gradient tilting of the prediction by the discriminator,

    log p~(x0 | z_t) = log_softmax( log p_nu(x0 | z_t) + h_k clip( grad_{log p} d_lambda(u_s, s), -1, 1 ) ),

on masked positions, h_k ramping from h_0 to h_1, u_s the expected next state E[z_s] (soft tokens: mask with
probability (1 - alpha_s)/(1 - alpha_t), else p; the reference feeds p itself); for the last rho N steps,
M candidate ancestral steps z_s^(j) and one of them drawn with probability softmax_j d_lambda(z_s^(j), s) (the
candidates share which positions unmask, drawn once by the sampler, and differ in the tokens drawn there).
h = 0 and M = 1 is the plain ancestral sampler, token for token.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewstep.config import FewstepError
from fewstep.diffusion.sampling import draw_rows, sample_categorical


class Discriminator(nn.Module):
    """d_lambda(z, t) -> (B,) logit that z (B, L) tokens, or (B, L, V) soft tokens, is a noised teacher sample.

    A copy of the teacher's backbone (frozen except its last `train_blocks` blocks and final norm) whose vocabulary
    head is replaced by a per-position MLP; the logit is the sum over positions (a log-ratio of sequences).
    """

    def __init__(self, backbone: nn.Module, train_blocks: int):
        super().__init__()
        self.backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.backbone.head = nn.Identity()  # the vocabulary head is not used
        blocks = self.backbone.blocks
        for m in [*blocks[len(blocks) - min(train_blocks, len(blocks)):], self.backbone.norm]:
            m.requires_grad_(True)
        D = self.backbone.embed.embedding_dim
        self.head = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, 1))
        nn.init.zeros_(self.head[2].weight)  # d = 0 at step 0: the student starts as the teacher
        nn.init.zeros_(self.head[2].bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        w = bb.embed.weight  # (V, D)
        h = bb.embed(z) if z.dtype == torch.long else z.to(w.dtype) @ w  # (B, L, D); soft tokens: expected embedding
        return self.head(bb.hidden(h, t if bb.time_cond else None)).squeeze(-1).float().sum(-1)  # (B,)


def discriminator_file(path):
    """The discriminator weights of a run or step dir (EMA first), or None if it holds none."""
    from fewstep import checkpoint

    ckpt = checkpoint.resolve(path)
    return next((ckpt / f"{n}.safetensors" for n in ("disc_ema", "disc") if (ckpt / f"{n}.safetensors").is_file()),
                None)


def load_discriminator(path, device="cpu") -> Discriminator:
    """The discriminator of a DiDi run or step dir (EMA weights when present), in eval mode."""
    from fewstep import checkpoint
    from fewstep.config import ModelConfig, section_from_dict
    from fewstep.models import build_model

    ckpt = checkpoint.resolve(path)
    meta = checkpoint.read_meta(ckpt)
    file = discriminator_file(ckpt)
    if file is None or "student" not in meta.get("models", {}):
        raise FewstepError(f"{ckpt} holds no DiDi-Instruct discriminator: guidance needs a checkpoint of "
                           "`fewstep distill` with method.name = \"didi\"")
    spec = dict(meta["models"]["student"])
    vocab = spec.pop("vocab_size")
    keys = checkpoint.load_tensors(file).keys()
    spec["time_cond"] = any(k.startswith("backbone.t_mlp") for k in keys)  # the teacher's, not the student's
    disc = Discriminator(build_model(section_from_dict(ModelConfig, spec, "model"), vocab).backbone, 0)
    checkpoint.load_into(disc, file)
    return disc.to(device).eval()


class RGAS:
    """Reward-guided ancestral sampling: the `guidance` hook of diffusion/sampling.sample (module docstring).

    scale: (h_0, h_1), the tilt ramp over the first (1 - rerank) of the steps; candidates: M for the rest.
    temperature, top_p: the sampler's filter settings (must equal those given to `sample`).
    """

    def __init__(self, disc: Discriminator, schedule, mask_id: int, scale=(30.0, 40.0), candidates: int = 4,
                 rerank: float = 0.5, temperature: float = 1.0, top_p: float = 1.0):
        if candidates < 1 or not 0.0 <= rerank <= 1.0:
            raise FewstepError(f"RGAS needs candidates >= 1 and 0 <= rerank <= 1, got {candidates}, {rerank}")
        if len(tuple(scale)) != 2 or not all(abs(h) <= 1e6 for h in scale):  # also NaN, inf: an all-NUL sample
            raise FewstepError(f"RGAS scale (h_0, h_1) must be two finite numbers of magnitude <= 1e6, got {scale}")
        self.disc, self.schedule, self.mask_id = disc, schedule, mask_id
        self.scale, self.candidates, self.rerank = tuple(scale), candidates, rerank
        self.temperature, self.top_p = temperature, top_p  # the draw hook gets no filter settings: pass the same

    def settings(self) -> dict:
        """What a result row records about this sampler."""
        return {"sampler": "rgas", "guide_scale": list(self.scale), "guide_candidates": self.candidates,
                "guide_rerank": self.rerank}

    def _tilt_steps(self, steps: int) -> int:
        return int(steps * (1 - self.rerank))  # steps k < this tilt, the others re-rank (the reference's split)

    def _alpha(self, t: float) -> float:
        return float(self.schedule.alpha(torch.tensor(t, dtype=torch.float64)))

    def tilt(self, k, steps, t, s, x, log_p):
        n = self._tilt_steps(steps)
        h = self.scale[0] + (self.scale[1] - self.scale[0]) * k / max(1, n - 1) if k < n else 0.0
        if h == 0.0:
            return log_p
        masked = (x == self.mask_id)[..., None]  # (B, L, 1)
        a_t, a_s = self._alpha(t), self._alpha(s)
        keep = (1 - a_s) / (1 - a_t) if s > 0 else 0.0  # probability that a masked position stays masked
        with torch.enable_grad():
            lp = log_p.detach().float().requires_grad_(True)
            stay = F.one_hot(torch.full_like(x, self.mask_id), lp.shape[-1]).float()
            u = torch.where(masked, keep * stay + (1 - keep) * lp.softmax(-1),
                            F.one_hot(x, lp.shape[-1]).float())  # (B, L, V) the expected next state
            (g,) = torch.autograd.grad(self.disc(u, torch.full((x.shape[0],), s, device=x.device)).sum(), lp)
        g = torch.where(masked, g, torch.zeros_like(g)).clamp(-1.0, 1.0)
        return (log_p + h * g).log_softmax(-1)

    def draw(self, k, steps, s, x, rows, lp, generator):
        """Tokens (N,) for the flat positions `rows` (N,) of x (B, L) that unmask now; lp: their (N, V) log p."""
        M = self.candidates
        if k < self._tilt_steps(steps) or M == 1 or rows.numel() == 0:
            return draw_rows(lp, self.temperature, self.top_p, generator)  # exactly the plain sampler's draw
        B, L = x.shape
        tok = draw_rows(lp.repeat(M, 1), self.temperature, self.top_p, generator).view(M, -1)  # (M, N)
        cand = x.reshape(-1).repeat(M, 1)  # (M, B L): the candidate next states z_s^(j)
        cand[:, rows] = tok
        cand = cand.view(M, B, L).transpose(0, 1).reshape(B * M, L)  # (B M, L), sequence-major
        r = self.disc(cand, torch.full((B * M,), s, device=x.device)).view(B, M)  # (B, M)
        j = sample_categorical(r.double().softmax(-1), generator)  # (B,): one candidate per sequence
        return tok[j[rows // L], torch.arange(rows.numel(), device=x.device)]


def rgas_for(run, model, schedule, device, scale=(30.0, 40.0), candidates: int = 4, rerank: float = 0.5,
             temperature: float = 1.0, top_p: float = 1.0) -> RGAS:
    """RGAS for sampling the masked DLM `model` with the discriminator of the DiDi run (or step dir) `run`;
    the defaults are the reference implementation's settings."""
    if getattr(model, "mask_id", None) is None:
        raise FewstepError("RGAS (--guide) works with masked diffusion models only")
    return RGAS(load_discriminator(run, device), schedule, model.mask_id, scale, candidates, rerank, temperature,
                top_p)


def rgas_from_args(args, model, schedule, device) -> RGAS | None:
    """The RGAS hook that `--guide ...` (eval/bench.add_guide_args) asks for, or None without --guide."""
    if not getattr(args, "guide", None):
        return None
    try:
        h0, h1 = (float(v) for v in str(args.guide_scale).split(","))
    except ValueError:
        raise FewstepError(f"--guide-scale must be two numbers h_0,h_1, got {args.guide_scale!r}") from None
    return rgas_for(args.guide, model, schedule, device, (h0, h1), args.guide_candidates, args.guide_rerank,
                    getattr(args, "temperature", 1.0), getattr(args, "top_p", 1.0))
