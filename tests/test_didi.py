"""DiDi-Instruct: the score-function (policy-gradient) estimator through the student's two-step trajectory is
unbiased for the exact integral-KL gradient on an enumerable toy; grouped normalisation is standardisation per
group; RGAS with zero guidance is the plain sampler token for token; the method trains student and discriminator
(only their trained parameters) on a tiny teacher and `fewstep sample --guide` uses the saved discriminator."""

import itertools
import json
import math

import pytest
import torch
import torch.nn as nn

from conftest import tiny_overrides
from fewstep import checkpoint
from fewstep.config import FewstepError, ModelConfig, load
from fewstep.diffusion.mdlm import MaskedDenoiser
from fewstep.diffusion.sampling import sample
from fewstep.diffusion.schedule import get_schedule
from fewstep.distill.common import Setup
from fewstep.distill.didi import DiDi, group_normalize
from fewstep.distill.rgas import RGAS, Discriminator, load_discriminator
from fewstep.distill.run import distill, prepare
from fewstep.models import build_model
from fewstep.pipeline import pretrain
from fewstep.train import fit

V, L = 3, 2  # toy vocabulary (mask id V) and length


class ToyNet(nn.Module):
    """logits^l = a_l + W[x^{l'}] (l' the other position): a denoiser whose prediction depends on the context."""

    time_cond = False

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(L, V + 1, generator=g))
        self.W = nn.Parameter(torch.randn(V + 1, V + 1, generator=g))

    def forward(self, x, t=None):
        return self.a + self.W[x.flip(-1)]  # (B, L, V + 1)


def states(n_values):
    return torch.tensor(list(itertools.product(range(n_values), repeat=L)))  # (n_values**L, L)


def exact_marginal(student, schedule, tau: float) -> torch.Tensor:
    """p_nu(x) over V^L of the two-step sampler m -> z_tau -> x, differentiable in the student's parameters."""
    a1, at = (float(schedule.alpha(torch.tensor(v, dtype=torch.float64))) for v in (1.0, tau))
    move = (at - a1) / (1 - a1)  # P(masked -> token) in the first step
    m = torch.full((1, L), V)
    p1 = student(m, torch.ones(1)).exp()[0]  # (L, V + 1)
    zs, xs = states(V + 1), states(V)
    p2 = student(zs, torch.full((len(zs),), tau)).exp()  # (Z, L, V + 1)
    stay = zs == V  # (Z, L)
    pz = torch.where(stay, torch.full(zs.shape, 1 - move), move * p1[torch.arange(L), zs.clamp(max=V - 1)]).prod(-1)
    # P(x | z): masked positions drawn from p2, revealed ones must agree
    px_z = torch.where(stay[:, None], p2[:, None].expand(-1, len(xs), -1, -1).gather(-1, xs[None, ..., None].expand(
        len(zs), -1, -1, -1)).squeeze(-1), (zs[:, None] == xs[None]).float()).prod(-1)  # (Z, X)
    return (pz[:, None] * px_z).sum(0)  # (X,)


def forward_marginal(px: torch.Tensor, alpha: float) -> torch.Tensor:
    """q(z_t) = sum_x p(x) q(z_t | x) over (V + 1)^L."""
    zs, xs = states(V + 1), states(V)
    qz_x = torch.where(zs[:, None] == V, torch.tensor(1 - alpha), torch.where(zs[:, None] == xs[None],
                       torch.tensor(alpha), torch.tensor(0.0))).prod(-1)  # (Z, X)
    return qz_x @ px


def test_policy_gradient_is_unbiased_on_a_toy():
    """E[R(z_t) grad log P_nu(m -> z_tau -> x)] = grad KL(q_nu(z_t) || q_theta(z_t)) at fixed t, tau, with the exact
    log-ratio R as reward: the method's rollout and trajectory log-prob, compared within 4.5 standard errors."""
    torch.manual_seed(0)
    schedule, tau, t = get_schedule(), 0.6, 0.5
    student = MaskedDenoiser(ToyNet(1), mask_id=V)
    p_theta = torch.softmax(2 * torch.randn(V**L), 0)  # a correlated teacher over V^L
    alpha = float(schedule.alpha(torch.tensor(t)))
    q_theta = forward_marginal(p_theta, alpha)
    params = list(student.parameters())
    q_nu = forward_marginal(exact_marginal(student, schedule, tau), alpha)
    exact = torch.autograd.grad((q_nu * (q_nu / q_theta).log()).sum(), params)
    exact = torch.cat([g.flatten() for g in exact])
    R = (q_nu / q_theta).log().detach()  # (Z,) the exact reward log q_nu / q_theta

    K, n = 40, 1000
    method = DiDi.__new__(DiDi)  # only rollout() and student_terms() are exercised
    method.cfg = DiDi.Config(group=n, match_beta=0.5)
    method.s = Setup(teacher=student, student=student, schedule=schedule, mask_id=V, batch=n, seq_len=L,
                     device=torch.device("cpu"))
    method.student, method.teacher = student, student
    z_tau, x = method.rollout(torch.full((K,), tau))  # (K n, L) each
    z_t = torch.where(torch.rand(x.shape) < 1 - alpha, torch.full_like(x, V), x)
    r = R[(z_t * torch.tensor([(V + 1) ** (L - 1 - i) for i in range(L)])).sum(-1)]  # (K n,)
    grads = []
    for c in range(K):
        sl = slice(c * n, (c + 1) * n)
        log_traj, _, _ = method.student_terms([torch.full_like(x[sl], V), z_tau[sl], x[sl]], [1.0, tau, 0.0])
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad((r[sl] * log_traj).mean(), params)]))
    grads = torch.stack(grads)  # (K, P)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(K)
    assert exact.norm() > 0.05
    assert ((mean - exact).abs() <= 4.5 * se + 1e-4).all(), (mean, exact, se)
    assert torch.nn.functional.cosine_similarity(mean, exact, 0) > 0.97


def test_group_normalisation_is_zero_mean_unit_variance_per_group():
    torch.manual_seed(0)
    r = torch.randn(24) * torch.tensor([0.01, 1.0, 30.0, 5.0, 2.0, 0.3]).repeat_interleave(4) + 7.0
    a = group_normalize(r, 4).view(6, 4)
    assert torch.allclose(a.mean(-1), torch.zeros(6), atol=1e-5)
    assert torch.allclose(a.var(-1, unbiased=False), torch.ones(6), atol=1e-3)
    assert torch.equal(group_normalize(torch.full((8,), 3.0), 4), torch.zeros(8))  # equal rewards: no signal


# --- RGAS --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_pair():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mdlm", seq_len=16, d_model=32, n_layers=2, n_heads=2), 11).eval()
    disc = Discriminator(model.backbone, 1).eval()
    nn.init.normal_(disc.head[2].weight, std=1.0)  # a discriminator with an opinion
    return model, disc


@pytest.mark.parametrize("steps, temperature, top_p", [(4, 1.0, 1.0), (5, 0.8, 0.9), (1, 1.0, 1.0)])
def test_rgas_with_zero_guidance_is_the_plain_sampler(random_pair, steps, temperature, top_p):
    model, disc = random_pair
    sched = get_schedule()
    kw = dict(batch=3, length=16, steps=steps, mask_id=model.mask_id, temperature=temperature, top_p=top_p)
    plain = sample(model, sched, generator=torch.Generator().manual_seed(5), **kw)
    zero = RGAS(disc, sched, model.mask_id, scale=(0.0, 0.0), candidates=1, temperature=temperature, top_p=top_p)
    guided = sample(model, sched, generator=torch.Generator().manual_seed(5), guidance=zero, **kw)
    assert torch.equal(plain, guided)
    full = RGAS(disc, sched, model.mask_id, temperature=temperature, top_p=top_p)  # h 30 -> 40, M = 4
    a = sample(model, sched, generator=torch.Generator().manual_seed(5), guidance=full, **kw)
    b = sample(model, sched, generator=torch.Generator().manual_seed(5), guidance=full, **kw)
    assert torch.equal(a, b) and a.shape == (3, 16) and int(a.max()) < model.mask_id  # seeded, nothing masked


def test_rgas_tilts_and_reranks_toward_the_discriminator(random_pair):
    model, disc = random_pair
    sched, mask = get_schedule(), model.mask_id
    x = torch.full((4, 16), mask)
    x[:, :4] = 3  # some positions already revealed
    log_p = model(x, torch.ones(4))
    rgas = RGAS(disc, sched, mask, scale=(30.0, 30.0), candidates=8, rerank=0.5)
    tilted = rgas.tilt(0, 4, 1.0, 0.75, x, log_p)
    assert torch.equal(tilted[:, :4], log_p[:, :4])  # revealed positions keep their carry-over prediction
    assert torch.allclose(tilted.logsumexp(-1), torch.zeros(4, 16), atol=1e-4) and not torch.equal(tilted, log_p)
    assert rgas.tilt(2, 4, 0.5, 0.25, x, log_p) is log_p  # the late steps re-rank instead
    # Re-ranking: the chosen candidates score higher under the discriminator than plain draws, on average.
    rows = (x == mask).reshape(-1).nonzero().squeeze(1)
    lp = log_p.flatten(0, 1)[rows]

    def score(tokens):
        z = x.reshape(-1).clone()
        z[rows] = tokens
        return disc(z.view_as(x), torch.zeros(4)).mean().item()

    gen = torch.Generator().manual_seed(0)
    picked = sum(score(rgas.draw(3, 4, 0.0, x, rows, lp, gen)) for _ in range(10))
    plain = sum(score(RGAS(disc, sched, mask, candidates=1).draw(3, 4, 0.0, x, rows, lp, gen)) for _ in range(10))
    assert picked > plain
    for bad in ((float("nan"), 1.0), (1e308, 1e308), (1.0,)):  # NaN / overflowing tilts sampled all-NUL text
        with pytest.raises(FewstepError, match="two finite numbers"):
            RGAS(disc, sched, mask, scale=bad)


def trajectory_joint(student, schedule):
    """P_nu(z_1, x) (Z, X) of the 2-step uniform-grid sampler m -> z_{1/2} -> x, and its l_nu(z_1, x) (Z, X)."""
    a_half = float(schedule.alpha(torch.tensor(0.5, dtype=torch.float64)))
    a1 = float(schedule.alpha(torch.tensor(1.0, dtype=torch.float64)))
    move = (a_half - a1) / (1 - a1)
    zs, xs = states(V + 1), states(V)
    lp1 = student(torch.full((1, L), V), torch.ones(1))[0]  # (L, V + 1)
    lp2 = student(zs, torch.full((len(zs),), 0.5))  # (Z, L, V + 1)
    stay = zs == V  # (Z, L)
    l1 = torch.where(stay, torch.zeros(()), lp1[torch.arange(L), zs.clamp(max=V - 1)]).sum(-1)  # (Z,)
    p_sets = torch.where(stay, torch.tensor(1 - move), torch.tensor(move)).prod(-1)  # (Z,)
    l2 = torch.where(stay[:, None], lp2[:, None].expand(-1, len(xs), -1, -1).gather(-1, xs[None, ..., None].expand(
        len(zs), -1, -1, -1)).squeeze(-1), torch.zeros(())).sum(-1)  # (Z, X)
    agree = ((zs[:, None] == xs[None]) | stay[:, None]).all(-1)  # (Z, X): revealed tokens must be x's
    ell = l1[:, None] + l2
    joint = torch.where(agree, p_sets[:, None] * ell.exp(), torch.zeros(()))
    return joint, ell, agree, p_sets


def test_exact_reward_bounds_the_kl_and_its_policy_gradient_is_unbiased():
    """reward = "elbo": U = E[l_nu(tau) + N(x)] = KL(p_nu^K || p_theta) + E_x KL(P_nu(tau | x) || r(tau | x)) with
    N = -log p_theta exactly (so U >= KL), and E[R grad l_nu(tau)] = grad U (method's rollout and trajectory
    log-prob, K = 2, within 4.5 standard errors)."""
    torch.manual_seed(0)
    schedule = get_schedule()
    student = MaskedDenoiser(ToyNet(2), mask_id=V)
    nll_theta = -torch.log_softmax(2 * torch.randn(V**L), 0)  # -log p_theta(x) of a correlated teacher
    params = list(student.parameters())
    joint, ell, agree, p_sets = trajectory_joint(student, schedule)
    U = (joint * torch.where(agree, ell + nll_theta[None], torch.zeros(()))).sum()
    px = joint.sum(0)
    assert torch.allclose(px, exact_marginal(student, schedule, 0.5), atol=1e-6)  # the same sampler
    kl = (px * (px.log() + nll_theta)).sum()
    r = torch.where(agree, p_sets[:, None], torch.zeros(()))  # forward process r(z_1 | x): tokens are x's
    gap = torch.where(agree, joint * (joint.clamp_min(1e-30).log() - (px[None] * r).log()), torch.zeros(())).sum()
    assert U.item() >= kl.item() > 0.05 and gap.item() > 1e-3
    assert abs(U.item() - kl.item() - gap.item()) < 1e-5
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(U, params)])

    K, n = 40, 1000
    method = DiDi.__new__(DiDi)  # only rollout_grid() and student_terms() are exercised
    method.cfg = DiDi.Config(group=n, reward="elbo", student_steps=2)
    method.s = Setup(teacher=student, student=student, schedule=schedule, mask_id=V, batch=n, seq_len=L,
                     device=torch.device("cpu"))
    method.student, method.teacher = student, student
    code = torch.tensor([V ** (L - 1 - i) for i in range(L)])
    grads = []
    for _ in range(K):
        traj, times = method.rollout_grid(n)
        assert times == [1.0, 0.5, 0.0] and (traj[-1] != V).all()
        log_traj, _, _ = method.student_terms(traj, times)
        R = log_traj.detach() + nll_theta[(traj[-1] * code).sum(-1)]
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad((R * log_traj).mean(), params)]))
    grads = torch.stack(grads)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(K)
    assert exact.norm() > 0.05
    assert ((mean - exact).abs() <= 4.5 * se + 1e-4).all(), (mean, exact, se)
    assert torch.nn.functional.cosine_similarity(mean, exact, 0) > 0.97


def test_any_order_teacher_nelbo_is_the_exact_nll_of_an_oracle():
    """The stratified any-order estimator N_theta(x) of an exact denoiser has expectation -log p(x) (4 s.e.), with
    less noise per sequence than the t-sampled NELBO at the same number of teacher passes."""
    from fewstep.diffusion.mdlm import nelbo
    from markov import MarkovChain, OracleDenoiser

    torch.manual_seed(0)
    chain = MarkovChain(vocab=3, seed=1)
    oracle = OracleDenoiser(chain, mask_id=3)
    x = chain.sample(4, 8, generator=torch.Generator().manual_seed(2))
    method = DiDi.__new__(DiDi)
    method.cfg = DiDi.Config(reward="elbo", elbo_mc=4)
    method.s = Setup(teacher=oracle, student=oracle, schedule=get_schedule(), mask_id=3, batch=4, seq_len=8,
                     device=torch.device("cpu"))
    method.teacher = oracle
    K = 1000  # one call per estimate: a call draws one stratum offset for its whole batch
    est = torch.stack([method.teacher_nelbo(x) for _ in range(K)]).double()  # (K, 4)
    mean, se = est.mean(0), est.std(0) / math.sqrt(K)
    exact = -chain.log_prob(x)
    assert torch.all((mean - exact).abs() < 4 * se + 1e-3), (mean, exact, se)
    assert torch.all(se < 0.05 * exact)
    xs = x.repeat(4 * K, 1)  # 4 t-sampled passes per estimate, as many passes as elbo_mc = 4
    t_based = nelbo(oracle, get_schedule(), xs, torch.rand(xs.shape[0]), 3).double().view(K, 4, 4).mean(1)
    assert (est.std(0) < t_based.std(0)).all()


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_teacher_nelbo_tells_the_teacher_the_time_of_its_masked_fraction(schedule):
    """A time-conditioned teacher scoring a state with k of L positions masked is given the t at which the
    expected masked fraction 1 - alpha_t is k / L (under cosine, t = k / L would claim a noisier state)."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x_t, t):
            seen.append((x_t.eq(3).float().mean(-1), t.clone()))
            return torch.zeros(*x_t.shape, 4).log_softmax(-1)

    sched = get_schedule(schedule)
    method = DiDi.__new__(DiDi)
    method.cfg = DiDi.Config(reward="elbo", elbo_mc=8)
    method.s = Setup(teacher=Probe(), student=Probe(), schedule=sched, mask_id=3, batch=2, seq_len=16,
                     device=torch.device("cpu"))
    method.teacher = method.s.teacher
    method.teacher_nelbo(torch.randint(0, 3, (2, 16)))
    (frac, t), = seen
    assert torch.allclose(1 - sched.alpha(t), frac.clamp(max=1 - sched.eps), atol=1e-6), (frac, t)


# --- the method in the loop, on a tiny real teacher -----------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(pydoc_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "mdlm"
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, out, **{"train.max_steps": 6, "train.lr": 3e-3})))
    return out


def didi_cfg(teacher, out, **method):
    cfg = load(None, [f"--train.out_dir={out}", "--train.batch_size=4", "--train.warmup_steps=1",
                      "--train.log_every=1", "--train.ckpt_every=3", "--train.eval_every=3", "--train.eval_batches=1",
                      "--train.ema=0.9", "--train.lr=1e-3"])
    cfg.method = {"name": "didi", "teacher": str(teacher), "steps": 3, "group": 2, "teacher_steps": 2,
                  "disc_blocks": 1, **method}
    return cfg


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("real", ["teacher", "data"])
def test_trains_student_and_only_the_trained_part_of_the_discriminator(teacher, tmp_path, real):
    run = prepare(didi_cfg(teacher, tmp_path / real, real=real), "cpu")
    m, t_model = run["method"], run["teacher"]
    before = {n: state(x) for n, x in {"teacher": t_model, **m.trainable()}.items()}
    fit(m, run["cfg"], train_data=run["train"], val_data=run["val"], meta=run["meta"], device=torch.device("cpu"))
    after = {n: state(x) for n, x in {"teacher": t_model, **m.trainable()}.items()}
    assert all(torch.equal(after["teacher"][k], v) for k, v in before["teacher"].items())
    moved = {k for k, v in after["disc"].items() if not torch.equal(v, before["disc"][k])}
    trained = {k for k, p in m.disc.named_parameters() if p.requires_grad}
    assert moved and moved <= trained  # frozen layers of the discriminator stay as the teacher's
    assert any(k.startswith("head.") for k in moved) and not any(k.startswith("backbone.blocks.0.") for k in moved)
    assert any(not torch.equal(v, before["student"][k]) for k, v in after["student"].items())
    rows = [json.loads(ln) for ln in open(tmp_path / real / "log.jsonl")]
    rows = [r for r in rows if "lr" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss/student"]) and math.isfinite(r["loss/disc"]) for r in rows)


def test_losses_have_no_graph_into_the_other_module_and_warmup(teacher, tmp_path):
    run = prepare(didi_cfg(teacher, tmp_path / "g", disc_warmup=1, disc_steps=2), "cpu")
    m = run["method"]
    with torch.no_grad():
        nn.init.normal_(m.disc.head[2].weight, std=0.1)  # rewards that differ, so the student loss has a gradient
    assert set(m.step(run["train"].batch(0, 4), 0)[0]) == {"disc"}  # warm-up: discriminator only
    assert set(m.step(run["train"].batch(1, 4), 1)[0]) == {"disc"}  # then one student step per disc_steps
    losses, logs = m.step(run["train"].batch(2, 4), 2)
    assert set(losses) == {"student", "disc"} and math.isfinite(logs["match"])
    for name, other in (("student", "disc"), ("disc", "student")):
        ps = [p for p in m.trainable()[other].parameters() if p.requires_grad]
        assert all(g is None for g in torch.autograd.grad(losses[name], ps, allow_unused=True, retain_graph=True))
        own = [p for p in m.trainable()[name].parameters() if p.requires_grad]
        grads = torch.autograd.grad(losses[name], own, allow_unused=True, retain_graph=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_distill_then_sample_and_bench_with_rgas(teacher, tmp_path):
    from fewstep.cli import main

    out = tmp_path / "run"
    summary = distill(didi_cfg(teacher, out))
    assert summary["method"] == "didi" and summary["steps"] == 3
    disc = load_discriminator(out)
    assert not disc.training and torch.isfinite(disc(torch.zeros(2, 32, dtype=torch.long), torch.ones(2))).all()
    samples = tmp_path / "s.jsonl"
    assert main(["sample", "--ckpt", str(out), "--n", "2", "--steps", "4", "--guide", str(out), "--ids",
                 "--out", str(samples)]) == 0
    ids = [json.loads(ln)["ids"] for ln in samples.read_text().splitlines()]
    vocab = checkpoint.load_model(out)[1]["model"]["vocab_size"]
    assert len(ids) == 2 and all(len(s) == 32 and max(s) < vocab for s in ids)  # no mask token left
    assert main(["bench", "--ckpt", str(out), "--guide", str(out), "--steps", "2", "--batches", "1",
                 "--hf", "none", "--out", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert any(r.get("sampler") == "rgas" for r in rows)
    assert main(["sample", "--ckpt", str(teacher), "--n", "1", "--steps", "2", "--guide", str(teacher)]) == 2  # no disc


def test_compare_measures_a_didi_student_with_and_without_rgas(teacher, pydoc_data, tmp_path):
    from fewstep.distill.compare import compare

    judge = tmp_path / "ar"
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, judge, **{"model.kind": "ar", "train.max_steps": 1})))
    distill(didi_cfg(teacher, tmp_path / "didi"))
    rows = compare(str(teacher), {"DiDi": str(tmp_path / "didi"), "teacher copy": str(teacher)}, str(judge),
                   teacher_steps=(4,), student_steps=(2,), n=2, batch=2, rgas=True)
    names = [(r["name"], r["steps"], r["greedy_tail"], r["sampler"]) for r in rows]
    assert names == [("teacher", 4, False, "ancestral"), ("teacher", 4, True, "ancestral"),
                     ("DiDi", 2, False, "ancestral"), ("DiDi", 2, True, "ancestral"), ("DiDi+RGAS", 2, False, "rgas"),
                     ("teacher copy", 2, False, "ancestral"), ("teacher copy", 2, True, "ancestral")]  # no disc
    guided = rows[4]
    assert guided["guide_candidates"] == 4 and guided["guide_scale"] == [30.0, 40.0] and guided["gen_ppl"] > 1


def test_exact_reward_trains_the_student_alone(teacher, tmp_path):
    run = prepare(didi_cfg(teacher, tmp_path / "elbo", reward="elbo", student_steps=2, elbo_mc=2), "cpu")
    m, t_model = run["method"], run["teacher"]
    assert set(m.trainable()) == {"student"} and m.disc is None
    before = {n: state(x) for n, x in {"teacher": t_model, **m.trainable()}.items()}
    fit(m, run["cfg"], train_data=run["train"], val_data=run["val"], meta=run["meta"], device=torch.device("cpu"))
    after = {n: state(x) for n, x in {"teacher": t_model, **m.trainable()}.items()}
    assert all(torch.equal(after["teacher"][k], v) for k, v in before["teacher"].items())
    assert any(not torch.equal(v, before["student"][k]) for k, v in after["student"].items())
    rows = [r for r in map(json.loads, open(tmp_path / "elbo" / "log.jsonl")) if "lr" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss/student"]) for r in rows)
    assert all(r["teacher_nll"] > 0 and math.isfinite(r["kl_bound"]) for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rgas_runs_on_the_fast_cuda_path(teacher, tmp_path):
    """`fewstep bench --guide` on CUDA: bf16 weights and a CUDA-graphed denoiser, the discriminator's gradient tilt
    and re-ranking around it (the path the small experiment's didi+RGAS latency rows take)."""
    from fewstep.cli import main

    out = tmp_path / "run"
    distill(didi_cfg(teacher, out))
    assert main(["bench", "--ckpt", str(out), "--guide", str(out), "--steps", "1,4", "--batches", "2",
                 "--hf", "none", "--device", "cuda", "--out", str(tmp_path / "b.json")]) == 0
    rows = [r for r in json.loads((tmp_path / "b.json").read_text()) if r.get("kind") == "mdlm"]
    assert {r["steps"] for r in rows} == {1, 4} and all(r["sampler"] == "rgas" and r["latency_s"] > 0 for r in rows)


def test_student_is_sampled_and_scored_without_dropout_and_keeps_its_mode(teacher, tmp_path):
    """With dropout in the student, the rollout and log P of the policy gradient are the same (eval-mode) law, and
    the student is back in train mode after the step (common.evaluating)."""
    from fewstep.models import evaluating

    run = prepare(didi_cfg(teacher, tmp_path / "d", disc_warmup=0), "cpu")
    m = run["method"]
    modes = []
    m.student.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    m.student.train()
    m.step(run["train"].batch(0, 4), 0)
    assert modes and not any(modes) and m.student.training  # every student call of the step ran in eval mode
    with pytest.raises(RuntimeError), evaluating(m.student, m.disc):
        raise RuntimeError  # restored on the way out of an error too
    assert m.student.training and m.disc.training
