"""A toy distribution whose conditionals are known exactly: a stationary first-order Markov chain.

Gives exact log-likelihoods, exact entropies, and an oracle masked denoiser p(x0^l | unmasked positions) computed
by forward-backward with the unmasked positions clamped.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fewstep.diffusion.mdlm import NEG_INF


class MarkovChain:
    def __init__(self, vocab: int = 3, seed: int = 0, sharpness: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        self.P = torch.softmax(sharpness * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), -1)
        # stationary distribution: left eigenvector of P for eigenvalue 1
        evals, evecs = torch.linalg.eig(self.P.T)
        pi = evecs[:, evals.real.argmax()].real
        self.pi = pi / pi.sum()
        self.V = vocab

    def sample(self, n: int, length: int, generator=None) -> torch.Tensor:
        x = torch.empty(n, length, dtype=torch.long)
        x[:, 0] = torch.multinomial(self.pi.expand(n, -1), 1, generator=generator).squeeze(-1)
        for i in range(1, length):
            x[:, i] = torch.multinomial(self.P[x[:, i - 1]], 1, generator=generator).squeeze(-1)
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B,)
        lp = self.pi.log()[x[:, 0]]
        return lp + self.P.log()[x[:, :-1], x[:, 1:]].sum(-1)

    def entropy(self, length: int) -> float:
        """H(x_1..x_L) in nats = H(pi) + (L - 1) * sum_v pi_v H(P_v) (stationary chain)."""
        h_pi = -(self.pi * self.pi.log()).sum()
        h_rows = -(self.P * self.P.log()).sum(-1)
        return float(h_pi + (length - 1) * (self.pi * h_rows).sum())


class OracleDenoiser(nn.Module):
    """Exact p(x0^l | x_t) for the chain: forward-backward with observed (unmasked) positions clamped."""

    time_conditioned = False

    def __init__(self, chain: MarkovChain, mask_id: int):
        super().__init__()
        self.chain, self.mask_id = chain, mask_id
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.calls = 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        B, L = x_t.shape
        V = self.chain.V
        obs = torch.ones(B, L, V, dtype=torch.float64)  # evidence: 1 everywhere for a mask, one-hot if observed
        known = x_t != self.mask_id
        obs[known] = torch.nn.functional.one_hot(x_t[known], V).double()
        post = posterior_marginals(self.chain, obs)  # (B, L, V)
        log_p = torch.full((B, L, V + 1), NEG_INF, dtype=torch.float32)
        log_p[..., :V] = post.clamp_min(1e-300).log().float()
        return log_p


def posterior_marginals(chain: MarkovChain, evidence: torch.Tensor) -> torch.Tensor:
    """p(x^l = v | observations) for per-position likelihoods evidence[b, l, v] = p(obs^l | x^l = v)."""
    B, L, V = evidence.shape
    P = chain.P
    fwd = torch.empty(B, L, V, dtype=torch.float64)
    bwd = torch.ones(B, L, V, dtype=torch.float64)
    f = chain.pi * evidence[:, 0]
    fwd[:, 0] = f / f.sum(-1, keepdim=True)
    for i in range(1, L):
        f = (fwd[:, i - 1] @ P) * evidence[:, i]
        fwd[:, i] = f / f.sum(-1, keepdim=True)
    for i in range(L - 2, -1, -1):
        b = (bwd[:, i + 1] * evidence[:, i + 1]) @ P.T
        bwd[:, i] = b / b.sum(-1, keepdim=True)
    post = fwd * bwd
    return post / post.sum(-1, keepdim=True)


def exact_uniform_xbar(chain: MarkovChain, z_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The xbar_theta (B, L, N) whose ratios xbar_y / xbar_z are the exact marginal ratios p_t(z^{l->y}) / p_t(z)
    of the uniform-state process at noise level alpha (B,): the exact reverse rates."""
    N = chain.V
    a = alpha.double()[:, None, None]
    onehot = torch.nn.functional.one_hot(z_t, N).double()  # (B, L, N)
    evidence = a * onehot + (1 - a) / N  # q(z^l | x^l = v)
    p = posterior_marginals(chain, evidence)  # (B, L, N)
    # ratio_y = sum_v p_v xbar(v)_y / xbar(v)_z with xbar(v) = N a e_v + (1 - a)
    xbar_v = N * a[..., None] * torch.eye(N, dtype=torch.float64) + (1 - a[..., None])  # (B, 1, N, N): [v, y]
    xbar_vz = (xbar_v * onehot[:, :, None, :]).sum(-1)  # (B, L, N): xbar(v)_z
    ratio = (p[..., None] * xbar_v / xbar_vz[..., None]).sum(-2)  # (B, L, N)
    return N * ratio / ratio.sum(-1, keepdim=True)
