"""Uniform-state diffusion: the NELBO against exact likelihoods, and its sampler's invariants."""

import math

import torch

from fewstep.diffusion.mdlm import sample_t
from fewstep.diffusion.schedule import LogLinear
from fewstep.diffusion.uniform import nelbo_terms, posterior_probs, q_zt
from markov import MarkovChain, exact_uniform_xbar


def test_exact_reverse_rates_give_exact_nll():
    """With the exact reverse rates, E_t,z_t[NELBO] = -log p(x0) (prior term at alpha_1 = 1e-3 is ~1e-6)."""
    torch.manual_seed(0)
    chain, sched = MarkovChain(vocab=3, seed=1), LogLinear()
    x0 = chain.sample(4, 6, generator=torch.Generator().manual_seed(2))
    K = 30_000  # the estimator is heavy-tailed at small t (a resampled token weighs ~1/t)
    xs = x0.repeat(K, 1)  # tiled: every sequence sees the whole antithetic time grid
    t = sample_t(xs.shape[0], "cpu", antithetic=True, eps=1e-3).double()
    alpha = sched.alpha(t)
    z_t = q_zt(xs, alpha, 3)
    terms = nelbo_terms(exact_uniform_xbar(chain, z_t, alpha), xs, z_t, alpha, sched.dalpha(t))
    est = terms.sum(-1).view(K, 4).T
    mean, se = est.mean(1), est.std(1) / math.sqrt(K)
    exact = -chain.log_prob(x0)
    assert torch.all((mean - exact).abs() < 4 * se + 2e-3), (mean, exact, se)
    assert torch.all(se < 0.05 * exact)


def test_nelbo_terms_zero_at_truth_positive_elsewhere():
    """With a one-sequence 'data distribution' the exact denoiser is x0 itself: the integrand vanishes."""
    N, B, L = 5, 3, 7
    x0 = torch.randint(0, N, (B, L))
    alpha = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    z_t = q_zt(x0, alpha, N)
    onehot = torch.nn.functional.one_hot(x0, N).double()
    xbar = N * alpha[:, None, None] * onehot + (1 - alpha[:, None, None])
    dalpha = -torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(nelbo_terms(xbar, x0, z_t, alpha, dalpha), torch.zeros(B, L, dtype=torch.float64))
    wrong = torch.softmax(torch.randn(B, L, N, dtype=torch.float64), -1)
    xbar_w = N * alpha[:, None, None] * wrong + (1 - alpha[:, None, None])
    assert (nelbo_terms(xbar_w, x0, z_t, alpha, dalpha) > 0).all()


def test_posterior_is_bayes_rule():
    N = 4
    x_theta = torch.softmax(torch.randn(2, 3, N, dtype=torch.float64), -1)
    z_t = torch.randint(0, N, (2, 3))
    a_s, a_t = 0.7, 0.3
    q = posterior_probs(x_theta, z_t, a_s, a_t)
    q = q / q.sum(-1, keepdim=True)
    # brute force: sum over x0 of x_theta(x0) * q(z_s | x0) q(z_t | z_s), normalised over z_s
    K_s = a_s * torch.eye(N, dtype=torch.float64) + (1 - a_s) / N  # q(z_s | x0): [x0, z_s]
    K_ts = (a_t / a_s) * torch.eye(N, dtype=torch.float64) + (1 - a_t / a_s) / N  # q(z_t | z_s): [z_s, z_t]
    ref = torch.empty_like(q)
    for b in range(2):
        for l in range(3):
            w = (x_theta[b, l] @ K_s) * K_ts[:, z_t[b, l]]
            ref[b, l] = w / w.sum()
    torch.testing.assert_close(q, ref)


def test_uniform_sampler_and_training(pydoc_data, tmp_path):
    from conftest import tiny_overrides
    from fewstep.checkpoint import load_model
    from fewstep.config import load
    from fewstep.diffusion.sampling import sample
    from fewstep.pipeline import generate, pretrain

    cfg = load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "u", **{"model.kind": "uniform",
                                                                          "train.max_steps": 30, "train.lr": 3e-3}))
    summary = pretrain(cfg)
    assert 1 < summary["val_ppl"] < 257
    model, meta = load_model(tmp_path / "u")
    assert meta["kind"] == "uniform" and model.time_conditioned and model.mask_id is None
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    seen = []  # on_step(k, t, s, x_t, log_p, x_s) after every step, as for masked models
    x, traj = sample(model, LogLinear(), batch=3, length=32, steps=8, mask_id=None, greedy_tail=True,
                     return_trajectory=True, generator=torch.Generator().manual_seed(0),
                     on_step=lambda k, t, s, x_t, log_p, x_s: seen.append((k, x_t.clone(), x_s.clone())))
    assert len(calls) == 8 and len(traj) == 9
    assert [k for k, _, _ in seen] == list(range(8))
    assert all(torch.equal(x_t, traj[k]) and torch.equal(x_s, traj[k + 1]) for k, x_t, x_s in seen)
    assert x.min() >= 0 and x.max() < 257 and x.shape == (3, 32)
    assert not torch.equal(traj[0], traj[-1])  # the noise is actually denoised
    last = model(traj[-2], torch.full((3,), 1 / 8)).argmax(-1)
    assert torch.equal(x, last)  # greedy tail: argmax of x_theta at the last step
    y = generate(model, meta, n=2, steps=4, seed=1)
    assert y.shape == (2, 32)
