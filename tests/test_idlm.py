"""IDLM: on an enumerable toy the objective with oracle denoisers is exactly KL(p_theta || p*) (0 when the student
is the teacher's distribution), for masked and uniform-state losses; each loss trains only its own module; the
method runs end to end through `fewstep distill` for masked and uniform teachers."""

import json
import math
import types

import pytest
import torch
import torch.nn as nn

from conftest import tiny_overrides
from fewstep import checkpoint
from fewstep.config import FewstepError, load
from fewstep.diffusion.schedule import get_schedule
from fewstep.diffusion.uniform import duo_latent, nelbo_terms
from fewstep.distill.common import Setup
from fewstep.distill.idlm import IDLM, soft_uniform_terms
from fewstep.distill.run import distill, prepare
from fewstep.pipeline import generate, pretrain
from fewstep.train import fit

V, L = 3, 3


class Oracle(nn.Module):
    """Optimal denoiser of a distribution p over V^L (a table), for the masked (mask id V) or uniform process."""

    def __init__(self, p: torch.Tensor, masked: bool):
        super().__init__()
        self.p, self.masked, self.schedule = p, masked, get_schedule()
        self.seqs = torch.cartesian_prod(*[torch.arange(V)] * L)  # (S, L)
        self.backbone = types.SimpleNamespace(vocab_size=V)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, z, t):
        a = self.schedule.alpha(t.double())[:, None, None]  # (B, 1, 1)
        eq = (z[:, None, :] == self.seqs[None]).double()  # (B, S, L)
        like = a * eq + (1 - a) * ((z[:, None, :] == V).double() if self.masked else 1.0 / V)
        # Uniform: the exact reverse rates need x_theta^l = p(x0^l | z^{-l}) (leave z^l out: UDLM's xbar_theta
        # ratio re-applies q(z^l | x0^l)); masked: z^l is m or x0^l, so p(x0^l | z) is the same thing.
        post = self.p[None, :, None] * like.prod(-1, keepdim=True) / (like if not self.masked else 1.0)  # (B, S, L)
        post = post / post.sum(1, keepdim=True)
        marg = torch.einsum("bsl,slv->blv", post, nn.functional.one_hot(self.seqs, V).double())  # (B, L, V)
        if self.masked:
            marg = torch.cat([marg, torch.zeros_like(marg[..., :1])], -1)
        return torch.where(marg > 0, marg.clamp_min(1e-300).log(), torch.full_like(marg, -1e6))


def product(pi):  # (L, V) marginals -> table over V^L
    seqs = torch.cartesian_prod(*[torch.arange(V)] * L)
    return pi[torch.arange(L), seqs].prod(-1)


def method_for(p_star, pi, masked, B):
    setup = Setup(teacher=Oracle(p_star, masked), student=nn.Identity(), schedule=get_schedule(),
                  mask_id=V if masked else None, batch=B, seq_len=L, device=torch.device("cpu"))
    m = IDLM(IDLM.Config(), setup)
    m.fake = Oracle(product(pi), masked)  # the optimal fake for the student's distribution
    probs = pi.double()
    if masked:
        probs = torch.cat([probs, torch.zeros(L, 1, dtype=probs.dtype)], -1)
    return m, probs.expand(B, L, -1)


@pytest.mark.parametrize("masked", [True, False])
def test_objective_is_kl_and_zero_at_the_teacher(masked):
    torch.manual_seed(0)
    p_star = torch.softmax(1.5 * torch.randn(V**L, dtype=torch.float64), 0)  # correlated positions
    marg = torch.einsum("s,slv->lv", p_star, nn.functional.one_hot(torch.cartesian_prod(*[torch.arange(V)] * L), V)
                        .double())
    B = 20000
    # student == teacher distribution (a product p*): fake == teacher exactly, so every sample is ~0
    m, probs = method_for(product(marg), marg, masked, 64)
    assert abs(m.student_loss(probs)[1].item()) < 1e-9
    for pi in (marg, torch.softmax(torch.randn(L, V, dtype=torch.float64), -1)):
        q = product(pi)
        kl = (q * (q / p_star).log()).sum().item()
        m, probs = method_for(p_star, pi, masked, B)
        est = sum(m.student_loss(probs)[1].item() for _ in range(4)) / 4 * L  # per sequence
        assert kl > 0.05 and est == pytest.approx(kl, rel=0.1), (est, kl)


def test_uniform_gradient_matches_the_kl_gradient():
    """xbar_i / sg(xbar_i) makes the relaxed uniform loss exact in gradient too: E grad = grad KL(q_pi || p*) when
    no position's prediction depends on the others' draws (a product p*; with correlations the context's own
    dependence on pi is stop-gradient, as in the paper's MDLM relaxation). Without the factor: cos 0.995, norm -8%."""
    torch.manual_seed(1)
    p_star = product(torch.softmax(1.5 * torch.randn(L, V, dtype=torch.float64), -1))
    logits = torch.randn(L, V, dtype=torch.float64, requires_grad=True)
    pi = torch.softmax(logits, -1)
    q = product(pi)
    (exact,) = torch.autograd.grad((q * (q / p_star).log()).sum(), logits)
    m, _ = method_for(p_star, pi.detach(), False, 40000)

    def grad():
        return sum(torch.autograd.grad(m.student_loss(torch.softmax(logits, -1).expand(40000, L, V))[0] * L,
                                       logits)[0] for _ in range(4)) / 4

    est = grad()
    assert torch.nn.functional.cosine_similarity(est.flatten(), exact.flatten(), 0) > 0.9995
    assert est.norm().item() == pytest.approx(exact.norm().item(), rel=0.02)
    m.cfg.own_score = False  # the ablation: no factor, so the gradient misses its own draw's score
    assert grad().norm().item() < 0.95 * exact.norm().item()


def test_masked_gradient_matches_the_kl_gradient():
    """The masked (SUBS) relaxation with the optimal fake: E grad = grad KL(q_pi || p*) for a product p* (the fake's
    own term needs no gradient: sum_v grad pi_v = 0)."""
    torch.manual_seed(1)
    p_star = product(torch.softmax(1.5 * torch.randn(L, V, dtype=torch.float64), -1))
    logits = torch.randn(L, V, dtype=torch.float64, requires_grad=True)
    q = product(torch.softmax(logits, -1))
    (exact,) = torch.autograd.grad((q * (q / p_star).log()).sum(), logits)
    m, _ = method_for(p_star, torch.softmax(logits, -1).detach(), True, 40000)

    def probs():  # (B, L, V + 1): the student's simplex output, no mass on the mask
        p = torch.softmax(logits, -1)
        return torch.cat([p, torch.zeros(L, 1, dtype=p.dtype)], -1).expand(40000, L, V + 1)

    est = sum(torch.autograd.grad(m.student_loss(probs())[0] * L, logits)[0] for _ in range(4)) / 4
    assert torch.nn.functional.cosine_similarity(est.flatten(), exact.flatten(), 0) > 0.9995
    assert est.norm().item() == pytest.approx(exact.norm().item(), rel=0.02)


@pytest.mark.parametrize("masked", [True, False])
def test_context_grad_makes_the_gradient_exact_with_correlated_positions(masked):
    """With a correlated p*, the other positions' losses depend on each position's draw: the plain relaxation drops
    that (cos 0.93 / 0.91 here, norm -8%); method.context_grad adds its score-function term and the estimator
    matches grad KL(q_pi || p*)."""
    torch.manual_seed(2)
    p_star = torch.softmax(1.5 * torch.randn(V**L, dtype=torch.float64), 0)
    logits = torch.randn(L, V, dtype=torch.float64, requires_grad=True)
    q = product(torch.softmax(logits, -1))
    (exact,) = torch.autograd.grad((q * (q / p_star).log()).sum(), logits)
    m, _ = method_for(p_star, torch.softmax(logits, -1).detach(), masked, 40000)

    def probs():
        p = torch.softmax(logits, -1)
        p = torch.cat([p, torch.zeros(L, 1, dtype=p.dtype)], -1) if masked else p
        return p.expand(40000, L, -1)

    cos = {}
    for ctx in (False, True):
        m.cfg.context_grad = ctx
        est = sum(torch.autograd.grad(m.student_loss(probs())[0] * L, logits)[0] for _ in range(4)) / 4
        cos[ctx] = torch.nn.functional.cosine_similarity(est.flatten(), exact.flatten(), 0).item()
    assert cos[False] < 0.95 and cos[True] > 0.999, cos
    assert est.norm().item() == pytest.approx(exact.norm().item(), rel=0.03)


def test_soft_uniform_terms_match_nelbo_terms_on_one_hot():
    torch.manual_seed(0)
    B, N = 4, 5
    x0, z = torch.randint(0, N, (B, L)), torch.randint(0, N, (B, L))
    t = torch.rand(B) * 0.9 + 0.05
    s = get_schedule()
    a = s.alpha(t)[:, None, None]
    xth = N * a * torch.softmax(torch.randn(B, L, N), -1) + (1 - a)
    xbar = N * a * nn.functional.one_hot(x0, N).float() + (1 - a)
    got = soft_uniform_terms(xth, xbar, z, s.alpha(t), s.dalpha(t))
    assert torch.allclose(got, nelbo_terms(xth, x0, z, s.alpha(t), s.dalpha(t)), rtol=1e-5, atol=1e-6)


# --- the method in the loop, on tiny real teachers -------------------------------------------------------------

@pytest.fixture(scope="module", params=["mdlm", "uniform"])
def teacher(request, pydoc_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / request.param
    pretrain(load(f"tiny_{request.param}", tiny_overrides(pydoc_data, out, **{"train.max_steps": 6,
                                                                               "train.lr": 3e-3})))
    return out


def idlm_cfg(teacher, out, **method):
    cfg = load(None, [f"--train.out_dir={out}", "--train.batch_size=4", "--train.warmup_steps=1",
                      "--train.log_every=1", "--train.ckpt_every=3", "--train.eval_every=3", "--train.eval_batches=1",
                      "--train.ema=0.9", "--train.lr=1e-3"])
    cfg.method = {"name": "idlm", "teacher": str(teacher), "steps": 3, "student_steps": 2, **method}
    return cfg


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Only:
    """The method with one of its losses dropped: the loop then steps only that module's optimiser."""

    def __init__(self, method, keep):
        self.m, self.keep = method, keep

    def trainable(self):
        return self.m.trainable()

    def step(self, x0, step):
        losses, logs = self.m.step(x0, step)
        return {self.keep: losses[self.keep]}, logs


@pytest.mark.parametrize("keep", ["fake", "student"])
def test_each_loss_moves_only_its_own_module(teacher, tmp_path, keep):
    run = prepare(idlm_cfg(teacher, tmp_path / keep, steps=1), "cpu")
    m = run["method"]
    with torch.no_grad():  # f_hat = f* makes the student loss and its gradient exactly 0: move the fake first
        for p in m.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {n: state(x) for n, x in {"teacher": run["teacher"], **m.trainable()}.items()}
    fit(Only(m, keep), run["cfg"], train_data=run["train"], meta=run["meta"], device=torch.device("cpu"))
    after = {n: state(x) for n, x in {"teacher": run["teacher"], **m.trainable()}.items()}
    other = "student" if keep == "fake" else "fake"
    assert same(after["teacher"], before["teacher"]) and same(after[other], before[other])
    assert not same(after[keep], before[keep])


def test_losses_have_no_graph_into_the_other_module(teacher, tmp_path):
    run = prepare(idlm_cfg(teacher, tmp_path / "g"), "cpu")
    m = run["method"]
    with torch.no_grad():
        for p in m.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    losses, _ = m.step(run["train"].batch(0, 4), 0)
    for name, other in (("student", "fake"), ("fake", "student")):
        ps = [p for p in m.trainable()[other].parameters()]
        assert all(g is None for g in torch.autograd.grad(losses[name], ps, allow_unused=True, retain_graph=True))
        own = torch.autograd.grad(losses[name], list(m.trainable()[name].parameters()), allow_unused=True,
                                  retain_graph=True)
        assert any(g is not None and g.abs().sum() > 0 for g in own)
    m.cfg.fake_steps = 2  # fake-only steps in between student steps
    assert set(m.step(run["train"].batch(0, 4), 0)[0]) == {"fake"}
    assert set(m.step(run["train"].batch(1, 4), 1)[0]) == {"student", "fake"}


def test_student_signal_is_float32_inside_a_bf16_step(teacher, tmp_path):
    """f_hat - f* is about one learning rate a step: under bf16 autocast (the training step's on a GPU) the
    difference would be rounding noise, so teacher and fake run in float32 inside the student loss."""
    run = prepare(idlm_cfg(teacher, tmp_path / "p"), "cpu")
    m = run["method"]
    with torch.no_grad():
        for p in m.fake.parameters():
            p.add_(1e-4 * torch.randn_like(p))
        logits = torch.randn(4, m.s.seq_len, m.student.backbone.head.out_features)
        if m.masked:
            logits[..., m.student.mask_id] = -math.inf  # no mass on the mask
        probs = torch.softmax(logits, -1)

    def value(**autocast):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, **autocast):
            return m.student_loss(probs)[1]

    exact = value(enabled=False)
    assert exact != 0 and torch.allclose(value(), exact, rtol=1e-5, atol=0), (value(), exact)


def test_distill_end_to_end_and_student_samples(teacher, tmp_path):
    out = tmp_path / "run"
    t_before = state(checkpoint.load_model(teacher)[0])
    summary = distill(idlm_cfg(teacher, out))
    assert summary["method"] == "idlm" and summary["steps"] == 3
    rows = [json.loads(ln) for ln in open(out / "log.jsonl")]
    assert all(math.isfinite(r["loss/student"]) and math.isfinite(r["loss/fake"]) for r in rows if "lr" in r)
    model, meta = checkpoint.load_model(out)
    tmeta = checkpoint.load_model(teacher)[1]
    assert meta["name"] == "student_ema" and meta["kind"] == tmeta["kind"]
    assert same(state(checkpoint.load_model(teacher)[0]), t_before)
    x = generate(model, meta, n=3, steps=2, seed=0)
    assert x.shape == (3, tmeta["model"]["seq_len"]) and int(x.max()) < tmeta["model"]["vocab_size"]


def test_own_states_come_from_the_students_rollout_not_the_data(teacher, tmp_path):
    """states = "student": the generator's inputs are states of the student's own K-step rollout (times on its grid,
    the all-mask state at t = 1, masked fractions that fall with t), whatever the data batch holds; it trains."""
    run = prepare(idlm_cfg(teacher, tmp_path / "own", states="student", student_steps=4), "cpu")
    m = run["method"]
    torch.manual_seed(0)
    x_t, t = m.own_states(64, torch.device("cpu"))
    assert set(t.tolist()) <= {1.0, 0.75, 0.5, 0.25} and len(set(t.tolist())) > 1
    if m.masked:
        frac = (x_t == m.s.mask_id).float().mean(-1)  # (B,)
        assert torch.all(frac[t == 1.0] == 1.0)
        assert frac[t == 0.25].mean() < frac[t == 0.75].mean() < 1.0
    batch = run["train"].batch(0, 4)
    other = torch.randint_like(batch, 0, 5)  # other "data"
    torch.manual_seed(1)
    a = m.generate(batch)
    torch.manual_seed(1)
    b = m.generate(other)  # the same generator inputs and outputs
    assert torch.equal(a, b)
    losses, _ = m.step(batch, 0)
    assert set(losses) == {"student", "fake"} and all(math.isfinite(v.item()) for v in losses.values())


def test_fake_lr_scale_reaches_the_loop_and_bad_values_are_refused():
    setup = Setup(teacher=Oracle(product(torch.full((L, V), 1 / V, dtype=torch.float64)), False), student=nn.Identity(),
                  schedule=get_schedule(), mask_id=None, batch=2, seq_len=L, device=torch.device("cpu"))
    assert IDLM(IDLM.Config(fake_lr_scale=5.0), setup).lr_scale() == {"fake": 5.0}
    with pytest.raises(FewstepError, match="fake_lr_scale"):
        IDLM(IDLM.Config(fake_lr_scale=0.0), setup)


# --- the Gaussian reparameterisation (relax = "gaussian", uniform teachers) ----------------------------------------

@pytest.mark.parametrize("N", [5, 64])
def test_duo_latent_argmax_has_the_uniform_state_law(N):
    """For one-hot x, argmax(alphatilde x + sigmatilde eps) with alphatilde = T^-1(alpha_t) keeps x w.p.
    alpha_t + (1 - alpha_t) / N, and every other token equally often (q(z_t | x) of the uniform process)."""
    torch.manual_seed(0)
    n = 40_000
    for a in (0.05, 0.5, 0.95):
        x = torch.zeros(n, 1, N)
        x[..., 0] = 1.0
        z = duo_latent(x, torch.full((n,), a)).argmax(-1).flatten()
        keep, p = (z == 0).double().mean().item(), a + (1 - a) / N
        assert abs(keep - p) < 4 * math.sqrt(p * (1 - p) / n), (N, a, keep, p)
        counts = torch.bincount(z[z != 0], minlength=N)[1:].double()
        assert counts.max() / counts.mean() < 1.5 if N == 5 else counts.std() / counts.mean() < 0.3


def test_gaussian_relax_soft_tokens_gradient_and_validation(teacher, tmp_path):
    """relax = gaussian: at tau = 1e-3 the soft token is one-hot(z = argmax w) but at near-ties; a one-hot soft token
    gives the teacher the same output as the hard z; the student gradient also flows through the models' soft inputs
    (it changes when they are detached) and never into the fake or the teacher; a masked teacher, context_grad or a
    bad relax are refused."""
    if "mdlm" in str(teacher):
        with pytest.raises(FewstepError, match="uniform-state teacher"):
            prepare(idlm_cfg(teacher, tmp_path / "m", relax="gaussian"), "cpu")
        return
    with pytest.raises(FewstepError, match="method.relax"):
        prepare(idlm_cfg(teacher, tmp_path / "bad", relax="gumbel"), "cpu")
    with pytest.raises(FewstepError, match="context_grad"):
        prepare(idlm_cfg(teacher, tmp_path / "ctx", relax="gaussian", context_grad=True), "cpu")
    run = prepare(idlm_cfg(teacher, tmp_path / "gauss", relax="gaussian"), "cpu")
    m = run["method"]
    torch.manual_seed(0)
    probs = m.generate(run["train"].batch(0, 4))  # (B, L, N)
    t = torch.rand(probs.shape[0]) * 0.9 + 0.05
    z, y = m.corrupt(probs, t)
    assert y.shape == probs.shape and torch.equal(y.argmax(-1), z)
    assert (y.amax(-1) < 0.999).float().mean() < 0.05  # tau = 1e-3: one-hot(z) except at near-ties of w
    with torch.no_grad():
        one_hot = nn.functional.one_hot(z, probs.shape[-1]).float()
        assert torch.allclose(m.denoise(m.teacher, one_hot, t), m.teacher(z, t), atol=1e-5)
        for p in m.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.cfg.tau = 1.0  # soft enough for a visible pathwise term
    leaf = probs.detach().requires_grad_(True)
    torch.manual_seed(1)
    full = torch.autograd.grad(m.student_loss(leaf)[0], leaf)[0]
    m.denoise, denoise = (lambda model, x, t, frozen=False: IDLM.denoise(model, x.detach(), t, frozen)), m.denoise
    torch.manual_seed(1)
    through_xbar = torch.autograd.grad(m.student_loss(leaf)[0], leaf)[0]
    m.denoise = denoise
    assert full.isfinite().all() and (full - through_xbar).norm() > 1e-5 * full.norm()  # 0 if no pathwise term
    losses, _ = m.step(run["train"].batch(0, 4), 0)
    for p in list(m.fake.parameters()) + list(run["teacher"].parameters()):
        assert p.grad is None
    assert torch.autograd.grad(losses["student"], list(m.fake.parameters()), allow_unused=True) == \
        tuple(None for _ in m.fake.parameters())


def test_data_weight_adds_the_students_data_nelbo(teacher, tmp_path):
    """method.data_weight = lambda: the student loss is the IDLM surrogate + lambda x the student's NELBO per token on
    the data batch (same draws: the difference is exactly lambda x the logged data_nelbo); negative is refused."""
    with pytest.raises(FewstepError, match="data_weight"):
        prepare(idlm_cfg(teacher, tmp_path / "neg", data_weight=-1.0), "cpu")
    m = prepare(idlm_cfg(teacher, tmp_path / "dw", data_weight=0.5), "cpu")["method"]
    x0 = prepare(idlm_cfg(teacher, tmp_path / "d0"), "cpu")["train"].batch(0, 4)
    torch.manual_seed(0)
    with_anchor, logs = m.step(x0, 0)
    m.cfg.data_weight = 0.0
    torch.manual_seed(0)
    without, logs0 = m.step(x0, 0)
    assert "data_nelbo" not in logs0 and logs["data_nelbo"] > 0
    diff = (with_anchor["student"] - without["student"]).item()
    assert diff == pytest.approx(0.5 * logs["data_nelbo"].item(), rel=1e-5)
    assert with_anchor["fake"].item() == pytest.approx(without["fake"].item(), rel=1e-6)
