"""MDLM: the NELBO against exact likelihoods on a Markov chain, and ancestral-sampler invariants."""

import math

import pytest
import torch

from fewstep.diffusion.mdlm import MaskedDenoiser, nelbo, q_xt, sample_t
from fewstep.diffusion.sampling import sample, sample_categorical
from fewstep.diffusion.schedule import Cosine, LogLinear, weight
from fewstep.models.transformer import Transformer
from markov import MarkovChain, OracleDenoiser


@pytest.mark.parametrize("schedule", [LogLinear(), Cosine()])
def test_oracle_nelbo_equals_exact_nll(schedule):
    """E_t,x_t[NELBO] of the exact denoiser is exactly -log p(x0): check within Monte-Carlo error."""
    torch.manual_seed(0)
    chain = MarkovChain(vocab=3, seed=1)
    oracle = OracleDenoiser(chain, mask_id=3)
    x0 = chain.sample(4, 8, generator=torch.Generator().manual_seed(2))
    K = 4000
    xs = x0.repeat(K, 1)  # (K*4, L); tiled so every sequence sees the whole antithetic time grid
    est = nelbo(oracle, schedule, xs, sample_t(xs.shape[0], "cpu", antithetic=True), 3).double().view(K, 4).T
    mean, se = est.mean(1), est.std(1) / math.sqrt(K)
    exact = -chain.log_prob(x0)
    assert torch.all((mean - exact).abs() < 4 * se + 1e-3), (mean, exact, se)
    assert torch.all(se < 0.1 * exact)  # the check has teeth: the error bar is small compared to the NLL


def test_weight_loglinear_is_one_over_t():
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(weight(LogLinear(), t), 1 / t)


def test_q_xt_masks_at_rate_one_minus_alpha():
    x0 = torch.zeros(200, 500, dtype=torch.long)
    alpha = torch.full((200,), 0.3)
    frac = (q_xt(x0, alpha, mask_id=9) == 9).float().mean().item()
    assert abs(frac - 0.7) < 0.01


def test_antithetic_times_cover_unit_interval():
    t = sample_t(64, "cpu", antithetic=True, eps=0.0)
    assert t.min() >= 0 and t.max() <= 1
    gaps = t.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 64), atol=1e-6, rtol=0)


def test_subs_parameterisation():
    torch.manual_seed(0)
    model = MaskedDenoiser(Transformer(11, 16, 32, 2, 2), mask_id=10)
    x_t = torch.randint(0, 11, (3, 16))
    log_p = model(x_t, torch.rand(3))
    assert log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(3, 16))
    assert (log_p[..., 10].exp() == 0).all()  # zero-masking: never predict the mask
    unmasked = x_t != 10
    assert (log_p.argmax(-1)[unmasked] == x_t[unmasked]).all()  # carry-over


def _tiny_denoiser(time_cond: bool):
    torch.manual_seed(0)
    return MaskedDenoiser(Transformer(21, 24, 32, 2, 2, time_cond=time_cond), mask_id=20)


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    @property
    def time_conditioned(self):
        return self.inner.time_conditioned

    def forward(self, x_t, t):
        self.calls += 1
        return self.inner(x_t, t)


@pytest.mark.parametrize("steps", [1, 4, 16, 64])
def test_sampler_invariants(steps):
    model = CountingModel(_tiny_denoiser(time_cond=True))
    x, traj = sample(model, LogLinear(), batch=5, length=24, steps=steps, mask_id=20, return_trajectory=True,
                     generator=torch.Generator().manual_seed(0))
    assert len(traj) == steps + 1 and (traj[0] == 20).all()
    assert not (x == 20).any()  # no mask remains
    for prev, nxt in zip(traj, traj[1:]):
        keep = prev != 20
        assert (nxt[keep] == prev[keep]).all()  # unmasked tokens never change
    assert model.calls == steps  # time-conditioned: no caching, exactly one call per step


def test_cached_sampler_skips_calls_and_matches_uncached():
    model = CountingModel(_tiny_denoiser(time_cond=False))
    kw = dict(batch=2, length=24, steps=256, mask_id=20)
    a = sample(model, LogLinear(), cache=True, generator=torch.Generator().manual_seed(3), **kw)
    cached_calls = model.calls
    model.calls = 0
    b = sample(model, LogLinear(), cache=False, generator=torch.Generator().manual_seed(3), **kw)
    assert model.calls == 256 and cached_calls < 256
    assert torch.equal(a, b)  # caching is exact for a model without time conditioning


def test_greedy_tail_and_single_step():
    model = _tiny_denoiser(time_cond=False)
    x = sample(model, LogLinear(), batch=3, length=24, steps=1, mask_id=20, greedy_tail=True)
    ref = model(torch.full((3, 24), 20), torch.ones(3)).argmax(-1)
    assert torch.equal(x, ref)


def test_sample_categorical_frequencies_in_float64():
    p = torch.tensor([0.5, 0.3, 0.2 - 1e-4, 1e-4], dtype=torch.float64)
    n = 400_000
    draws = sample_categorical(p.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert torch.all((freq - p).abs() < 5 * se)
    assert freq[3] > 0  # the 1e-4 tail is reached


def test_oracle_sampler_reproduces_the_chain():
    """Many small steps with the exact denoiser draw from the true joint distribution."""
    chain = MarkovChain(vocab=2, seed=4)
    oracle = OracleDenoiser(chain, mask_id=2)
    x = sample(oracle, LogLinear(), batch=4000, length=4, steps=200, mask_id=2, device="cpu",
               generator=torch.Generator().manual_seed(0))
    codes = (x * torch.tensor([8, 4, 2, 1])).sum(-1)
    emp = torch.bincount(codes, minlength=16).double() / len(codes)
    grid = torch.tensor([[(c >> k) & 1 for k in (3, 2, 1, 0)] for c in range(16)])
    true = chain.log_prob(grid).exp()
    assert 0.5 * (emp - true).abs().sum() < 0.04
