"""MDLM: the NELBO against exact likelihoods on a Markov chain, and ancestral-sampler invariants."""

import math

import pytest
import torch

from fewstep.diffusion.mdlm import NEG_INF, MaskedDenoiser, nelbo, q_xt, sample_t
from fewstep.diffusion.sampling import sample, sample_categorical
from fewstep.diffusion.schedule import Cosine, LogLinear, weight
from fewstep.models.transformer import Transformer
from markov import MarkovChain, OracleDenoiser


@pytest.mark.parametrize("schedule", [LogLinear(), Cosine()])
def test_time_of_inverts_alpha(schedule):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(schedule.time_of(schedule.alpha(t)), t, atol=1e-6)
    assert schedule.time_of(torch.tensor([0.0, 1.5])).tolist() == [1.0, 0.0]  # clamped to [eps, 1]


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


def test_carry_over_is_the_subs_formula_with_gradients():
    """The full forward against SUBS written out (the mask column at log 0 before the softmax, then every unmasked
    row replaced by log of its own one-hot): equal values and equal parameter gradients, a fully masked and a fully
    unmasked row included."""
    model = _tiny_denoiser(time_cond=False)
    x_t = torch.randint(0, 21, (3, 16))
    x_t[0], x_t[1] = 20, torch.arange(16) % 20  # all masked, none masked
    w = torch.randn(3, 16, 21)  # a generic linear read-out of the log-probabilities
    logits = model.backbone(x_t, None).float()
    logits[..., 20] = NEG_INF
    want = torch.where((x_t != 20)[..., None], torch.full_like(logits, NEG_INF).scatter(-1, x_t[..., None], 0.0),
                       logits.log_softmax(-1))
    got = model(x_t, torch.rand(3))
    assert torch.equal(got, want)
    grads = [torch.autograd.grad((lp * w).sum(), list(model.parameters())) for lp in (got, want)]
    for g_got, g_want in zip(*grads):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    @property
    def time_conditioned(self):
        return self.inner.time_conditioned

    @property
    def splits_head(self):
        return self.inner.splits_head

    def head_log_probs(self, h):
        return self.inner.head_log_probs(h)

    def forward(self, x_t, t, **flags):
        self.calls += 1
        return self.inner(x_t, t, **flags)


@pytest.mark.parametrize("row_head", [False, True])
@pytest.mark.parametrize("plan", [False, True])
@pytest.mark.parametrize("steps", [1, 4, 16, 64])
def test_sampler_invariants(steps, plan, row_head):
    model = CountingModel(_tiny_denoiser(time_cond=True))
    x, traj = sample(model, LogLinear(), batch=5, length=24, steps=steps, mask_id=20, return_trajectory=True,
                     generator=torch.Generator().manual_seed(0), plan=plan, row_head=row_head)
    assert len(traj) == steps + 1 and (traj[0] == 20).all()
    assert not (x == 20).any()  # no mask remains
    for prev, nxt in zip(traj, traj[1:]):
        keep = prev != 20
        assert (nxt[keep] == prev[keep]).all()  # unmasked tokens never change
    moved = sum(bool((a != b).any()) for a, b in zip(traj, traj[1:]))  # steps that unmasked something
    # time-conditioned: no caching, one call per step; with the row head none for a step that unmasks nothing
    assert model.calls == (moved if row_head else steps)
    assert (moved < steps) == (steps == 64)  # at 64 steps some step unmasks nothing: the count above is tested


@pytest.mark.parametrize("row_head", [False, True])
@pytest.mark.parametrize("plan", [False, True])
def test_cached_sampler_skips_calls_and_matches_uncached(plan, row_head):
    model = CountingModel(_tiny_denoiser(time_cond=False))
    kw = dict(batch=2, length=24, steps=256, mask_id=20, plan=plan, row_head=row_head)
    a = sample(model, LogLinear(), cache=True, generator=torch.Generator().manual_seed(3), **kw)
    cached_calls = model.calls
    model.calls = 0
    b = sample(model, LogLinear(), cache=False, generator=torch.Generator().manual_seed(3), **kw)
    # the row head calls the model only at steps that unmask something, each after a change: nothing to cache
    assert model.calls == (cached_calls if row_head else 256) and cached_calls < 256
    assert torch.equal(a, b)  # caching is exact for a model without time conditioning


class ContextDenoiser(torch.nn.Module):
    """A MaskedDenoiser-like model whose every operation is row-wise (no matrix product over rows), so the head on
    a subset of rows is bit-identical to the full head's rows: log p^l = log_softmax(a_l + W[x^{l+1}]), the mask
    column at -inf, SUBS carry-over at unmasked positions. `hidden=True` returns the logits; the head normalises."""

    splits_head = True

    def __init__(self, time_conditioned: bool, vocab: int = 21, length: int = 24, mask_id: int = 20):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.a = torch.nn.Parameter(torch.randn(length, vocab, generator=g))
        self.W = torch.nn.Parameter(2 * torch.randn(vocab, vocab, generator=g))
        self.time_conditioned, self.mask_id, self.calls = time_conditioned, mask_id, 0

    def head_log_probs(self, h):
        return h.masked_fill(torch.arange(h.shape[-1]) == self.mask_id, NEG_INF).log_softmax(-1)

    def forward(self, x_t, t, hidden=False):
        self.calls += 1
        h = self.a + self.W[x_t.roll(-1, dims=1)] + (t[:, None, None] if self.time_conditioned else 0)  # (B, L, V)
        if hidden:
            return h
        log_p = self.head_log_probs(h)
        unmasked = (x_t != self.mask_id)[..., None]
        return torch.where(unmasked, torch.full_like(log_p, NEG_INF).scatter(-1, x_t[..., None], 0.0), log_p)


@pytest.mark.parametrize("time_conditioned", [False, True])
@pytest.mark.parametrize("plan", [False, True])
def test_row_head_draws_the_full_heads_tokens(plan, time_conditioned):
    """The head on the unmasking rows only is the same sampler: with a model whose rows are computed exactly the
    same way either way, every setting draws the full head's tokens bit for bit, with fewer model calls when some
    step unmasks nothing (every such step, time-conditioned or not)."""
    settings = [dict(steps=1), dict(steps=4, greedy_tail=True), dict(steps=64), dict(steps=16, temperature=0.7),
                dict(steps=8, top_p=0.9), dict(steps=64, cache=False),
                *(dict(steps=2, times=torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), greedy_tail=g,
                       x_init=torch.where(torch.rand(6, 24, generator=torch.Generator().manual_seed(1)) < 0.5, 20, 3))
                  for g in (False, True))]
    fewer = 0
    for kw in settings:
        out, calls = {}, {}
        for row_head in (False, True):
            model = ContextDenoiser(time_conditioned)
            out[row_head] = sample(model, Cosine(), batch=6, length=24, mask_id=20, device="cpu", plan=plan,
                                   row_head=row_head, return_trajectory=True,
                                   generator=torch.Generator().manual_seed(7), **kw)[1]
            calls[row_head] = model.calls
        for a, b in zip(*out.values()):
            assert torch.equal(a, b), kw
        assert calls[True] <= calls[False]
        fewer += calls[True] < calls[False]
    assert fewer >= 1  # some setting had a step that unmasked nothing


def test_row_head_is_refused_where_it_cannot_apply():
    model = _tiny_denoiser(time_cond=False)
    kw = dict(batch=2, length=24, steps=2, mask_id=20, row_head=True)
    with pytest.raises(ValueError, match="row_head=True needs"):
        sample(model, LogLinear(), on_step=lambda *a: None, **kw)
    with pytest.raises(ValueError, match="row_head=True needs"):
        sample(model, LogLinear(), unmask="confidence", **kw)
    with pytest.raises(ValueError, match="row_head=True needs"):
        sample(ConstantDenoiser(), LogLinear(), device="cpu", **kw)  # no splits_head
    assert model.splits_head and not MaskedDenoiser(torch.nn.Identity(), 20).splits_head


class ConstantDenoiser(torch.nn.Module):
    """log p(x0 | x_t) = a fixed row at every position (mask column at -inf)."""

    time_conditioned = False

    def __init__(self, vocab: int = 21, mask_id: int = 20):
        super().__init__()
        self.row = torch.randn(vocab, generator=torch.Generator().manual_seed(0))
        self.row[mask_id] = -math.inf
        self.row = self.row.log_softmax(-1)

    def forward(self, x_t, t):
        return self.row.expand(*x_t.shape, -1)


class SplitConstantDenoiser(ConstantDenoiser):
    """The same model through the row head's interface."""

    splits_head = True

    def forward(self, x_t, t, hidden=False):
        return x_t.new_zeros(*x_t.shape, 1, dtype=torch.float32) if hidden else super().forward(x_t, t)

    def head_log_probs(self, h):
        return self.row.expand(h.shape[0], -1)


@pytest.mark.parametrize("row_head", [False, True])
@pytest.mark.parametrize("plan", [False, True])
@pytest.mark.parametrize("case", ["loglinear_from_mask", "cosine_uneven_grid", "partial_start_ending_above_0"])
def test_unmasking_steps_have_the_ancestral_law(case, plan, row_head):
    """The step at which each masked position unmasks, with and without the up-front plan, against the exact law:
    P(step k) = move_k prod_{j < k} (1 - move_j), move = (alpha_s - alpha_t) / (1 - alpha_t) (1 at s = 0), and
    P(never) = prod_j (1 - move_j) when the grid ends above 0. 24,000 positions (~12,000 masked ones from the
    half-masked start), every frequency within 5 SE."""
    from fewstep.diffusion.sampling import _alpha, _move

    B, L, mask = 480, 50, 20
    schedule, times, x_init = LogLinear(), None, None
    if case == "cosine_uneven_grid":
        schedule, times = Cosine(), torch.tensor([1.0, 0.7, 0.65, 0.2, 0.0], dtype=torch.float64)
    if case == "partial_start_ending_above_0":
        times = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
        x_init = torch.where(torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.5, mask, 3)
    steps = 4 if times is None else len(times) - 1
    grid = (times if times is not None else torch.linspace(1, 0, steps + 1, dtype=torch.float64)).tolist()
    moves = [_move(_alpha(schedule, t), _alpha(schedule, s), s) for t, s in zip(grid, grid[1:])]
    stay = torch.tensor([1 - m for m in moves], dtype=torch.float64)
    before = torch.cat([torch.ones(1, dtype=torch.float64), stay.cumprod(0)])  # (K + 1,): masked through step k
    exact = torch.cat([before[:-1] * torch.tensor(moves, dtype=torch.float64), before[-1:]])  # (K + 1,)
    model = SplitConstantDenoiser() if row_head else ConstantDenoiser()
    _, traj = sample(model, schedule, batch=B, length=L, steps=steps, mask_id=mask, times=times, x_init=x_init,
                     device="cpu", plan=plan, row_head=row_head, return_trajectory=True,
                     generator=torch.Generator().manual_seed(2))
    masked = torch.stack(traj) == mask  # (K + 1, B, L)
    start = masked[0]
    step = masked.long().sum(0) - 1  # (B, L): the step that unmasked a position; K if it never did
    step = torch.where(masked[-1], steps, step)[start]
    freq = torch.bincount(step, minlength=steps + 1).double() / step.numel()
    se = (exact * (1 - exact) / step.numel()).sqrt()
    assert torch.all((freq - exact).abs() <= 5 * se + 1e-12), (freq, exact)
    assert (case == "partial_start_ending_above_0") == bool(exact[-1] > 0)  # the case tests what it says
    for prev, nxt in zip(traj, traj[1:]):
        assert torch.equal(nxt[prev != mask], prev[prev != mask])  # unmasked tokens never change


def test_planned_loop_reads_nothing_back_from_the_device():
    """With the plan, the ancestral loop issues no operation that makes the host wait for the device (a tensor
    read back as a Python number, nonzero, boolean indexing): the host queues every step at once on a GPU. The
    plan's own read (the step counts) comes before the first model call; without the plan each step reads back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    events = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            bool_index = func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default) or bool_index:
                events.append(str(func))
            return func(*args, **(kwargs or {}))

    class Marked(SplitConstantDenoiser):
        def forward(self, x_t, t, hidden=False):
            events.append("model")
            return super().forward(x_t, t, hidden)

    counts = {}
    for plan in (True, False):
        for row_head in (False, True):
            events.clear()
            with Reads():
                sample(Marked(), LogLinear(), batch=3, length=16, steps=8, mask_id=20, device="cpu", cache=False,
                       plan=plan, row_head=row_head, temperature=0.9, generator=torch.Generator().manual_seed(0))
            first = events.index("model")
            counts[plan, row_head] = sum(e != "model" for e in events[first:])
    # without the plan, each of the 8 steps reads its row count back (the row head: the 7 after the first call)
    assert counts == {(True, False): 0, (True, True): 0, (False, False): 8, (False, True): 7}


class StrictAfterFirstCall:
    """The model, with torch.cuda's sync debug mode set to "error" once its first call has been queued."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **flags):
        out = self.inner(*args, **flags)
        torch.cuda.set_sync_debug_mode("error")
        return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("row_head", [False, True])
def test_cuda_sampler_loop_never_synchronises(row_head):
    """On CUDA (up-front plan and fused draw by default; the denoiser a CUDA graph, as in the bench), everything
    after the first model call runs under torch.cuda's sync debug mode "error": an operation that waits for the
    device raises. With and without the head on the unmasking rows only; the trunk's graph equals the eager trunk."""
    from fewstep.models.inference import GraphedDenoiser

    inner = _tiny_denoiser(time_cond=True).cuda().eval()
    model = GraphedDenoiser(inner)
    kw = dict(batch=3, length=24, steps=8, mask_id=20, device="cuda", row_head=row_head)
    sample(model, LogLinear(), generator=torch.Generator("cuda").manual_seed(0), **kw)  # capture and compile first
    try:
        x = sample(StrictAfterFirstCall(model), LogLinear(), generator=torch.Generator("cuda").manual_seed(1), **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not (x == 20).any()
    x_t, t = torch.full((3, 24), 20, device="cuda"), torch.rand(3, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(x_t, t, hidden=True).clone(), inner(x_t, t, hidden=True))
        torch.testing.assert_close(model(x_t, t).clone(), inner(x_t, t))  # the two graphs kept apart


def test_graphed_denoiser_keeps_a_graph_per_flag(monkeypatch):
    """GraphedDenoiser on CPU with a stand-in for the CUDA graph (replay recomputes the captured output in place,
    from the captured input buffers): the trunk (`hidden=True`) and the full call get graphs of their own, and the
    sampler's row head through it draws the unwrapped model's tokens."""
    from fewstep.models import inference

    class Replay:
        def __init__(self, fn, args):
            self.fn, self.args, self.out = fn, args, fn(*args)

        def replay(self):
            self.out.copy_(self.fn(*self.args))

    def fake_capture(fn, *args, warmup=2):
        graph = Replay(fn, args)
        return graph, graph.out

    monkeypatch.setattr(inference, "capture", fake_capture)
    inner = _tiny_denoiser(time_cond=True).eval()
    model = inference.GraphedDenoiser(inner)
    kw = dict(batch=3, length=24, steps=6, mask_id=20, device="cpu", row_head=True)
    with torch.no_grad():
        got = sample(model, LogLinear(), generator=torch.Generator().manual_seed(4), **kw)
        want = sample(inner, LogLinear(), generator=torch.Generator().manual_seed(4), **kw)
        assert torch.equal(got, want)
        x_t, t = torch.full((3, 24), 20), torch.rand(3)
        torch.testing.assert_close(model(x_t, t), inner(x_t, t), rtol=0, atol=0)
    assert sorted(flags for *_, flags in model.graphs) == [(), (("hidden", True),)]


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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_draw_is_the_unfused_draw(temperature, monkeypatch):
    """The compiled one-kernel race draws the same tokens from the same uniforms, chunk by chunk too."""
    import fewstep.diffusion.sampling as sampling

    log_p = (3 * torch.randn(300, 97, generator=torch.Generator().manual_seed(0))).log_softmax(-1)
    log_p[:, 5] = -math.inf  # a zero-probability token (the mask) is never drawn
    monkeypatch.setattr(sampling, "DRAW_CHUNK", 97 * 128)  # three chunks of rows
    draw = lambda fused: sampling.draw_rows(log_p, temperature, generator=torch.Generator().manual_seed(1),
                                            fused=fused)
    fused = draw(True)
    assert torch.equal(fused, draw(False)) and not (fused == 5).any()
    one = lambda fused: sampling.draw_rows(log_p[7:8], temperature, generator=torch.Generator().manual_seed(3),
                                           fused=fused)  # one row: drawn padded to two, the same token
    assert torch.equal(one(True), one(False))
    model = _tiny_denoiser(time_cond=False)  # and inside the sampler
    kw = dict(batch=3, length=24, steps=4, mask_id=20, temperature=temperature)
    a = sample(model, LogLinear(), generator=torch.Generator().manual_seed(2), fused_draw=True, **kw)
    assert torch.equal(a, sample(model, LogLinear(), generator=torch.Generator().manual_seed(2), **kw))


def test_nucleus_keeps_the_smallest_prefix_reaching_top_p():
    """An exact tie at top_p: [.5, .25, .25] at 0.5 keeps only the first token, [.5, .25, .125, .125] at 0.75 two."""
    from fewstep.diffusion.sampling import filter_probs

    one = filter_probs(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log(), top_p=0.5)
    two = filter_probs(torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64).log(), top_p=0.75)
    assert one.tolist() == [1.0, 0.0, 0.0] and torch.allclose(two, torch.tensor([2 / 3, 1 / 3, 0, 0]).double())
    assert filter_probs(torch.tensor([0.7, 0.2, 0.1]).log(), top_p=0.85).tolist()[2] == 0.0
    assert filter_probs(torch.tensor([0.7, 0.2, 0.1]).log(), top_p=0.95).tolist()[2] > 0.0


def test_fused_draw_at_a_low_temperature_draws_the_mode():
    """At T = 1e-3, exp(log p / T) underflows on a row whose top probability is below 0.47: the race must still
    pick that row's mode (it picked token 0, a zero-probability token here, when the row max was not taken out)."""
    import fewstep.diffusion.sampling as sampling

    log_p = torch.tensor([0.0, 0.1, 0.4, 0.3, 0.2]).log().expand(64, -1)  # token 0 has probability 0
    for fused in (True, False):
        for temperature in (1e-3, 1e-308, 5e-324):  # log p / T overflowed to -inf on the whole row: NaN
            draw = sampling.draw_rows(log_p, temperature, generator=torch.Generator().manual_seed(0), fused=fused)
            assert (draw == 2).all(), (fused, temperature, draw.bincount(minlength=5))


def test_rope_tables_built_before_compiling_compile_the_model_once():
    """Built lazily inside the first compiled forward, the RoPE tables changed an attribute dynamo guards on, so
    every compiled model (training with train.compile, the bench's compiled denoiser) compiled twice."""
    from torch._dynamo.testing import CompileCounter

    from fewstep.models import rope_tables
    from fewstep.models.inference import for_inference

    x, t = torch.randint(0, 20, (2, 24)), torch.rand(2)
    counts = []
    for prepare in (False, True):
        torch._dynamo.reset()
        model = _tiny_denoiser(time_cond=False)
        if prepare:
            rope_tables(model)
        cnt = CompileCounter()
        compiled = torch.compile(model, backend=cnt)
        compiled(x, t)
        compiled(x, t)
        counts.append(cnt.frame_count)
    assert counts == [2, 1]
    assert for_inference(_tiny_denoiser(time_cond=False), "cpu").backbone._rope_len >= 24  # built up front


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


def _nelbo_full_forward(model, schedule, x0, t, mask_id, generator):
    """The NELBO as computed before the masked-rows path: full (B, L, V) forward, gather, zero the unmasked."""
    x_t = q_xt(x0, schedule.alpha(t), mask_id, generator)
    log_p = model(x_t, t)
    nll = -log_p.gather(-1, x0[..., None]).squeeze(-1)
    nll = torch.where(x_t == mask_id, nll, torch.zeros_like(nll))
    return weight(schedule, t) * nll.sum(-1)


def _nelbo_and_grads(fn, model, *args, seed: int):
    model.zero_grad()
    out = fn(model, *args, generator=torch.Generator().manual_seed(seed))
    out.sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("time_cond", [False, True])
def test_masked_only_forward_is_the_full_forward_at_masked_rows(time_cond):
    model = _tiny_denoiser(time_cond)
    with torch.no_grad():  # make the adaLN modulation (zero at init) non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_t = torch.randint(0, 21, (3, 24), generator=torch.Generator().manual_seed(1))
    t = torch.rand(3)
    rows = model(x_t, t, masked_only=True)
    assert rows.dtype == torch.float32 and rows.shape == (int((x_t == 20).sum()), 21)
    torch.testing.assert_close(rows, model(x_t, t)[x_t == 20], rtol=1e-5, atol=1e-5)
    assert (rows[:, 20] < -1e5).all()  # zero-masking
    h = model(x_t, t, hidden=True)  # (B, L, D): the sampler's row head, on the masked rows
    assert h.shape == (3, 24, 32)
    torch.testing.assert_close(model.head_log_probs(h[x_t == 20]), rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("time_cond", [False, True])
def test_nelbo_masked_rows_equals_full_forward_with_gradients(time_cond):
    """nelbo runs the head on the masked rows only: the same per-sequence NELBO and parameter gradients as the full
    (B, L, V) forward; a model that is not a MaskedDenoiser takes the full path."""
    model = _tiny_denoiser(time_cond)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0 = torch.randint(0, 20, (6, 24), generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0.2, 0.95, 6)
    new, g_new = _nelbo_and_grads(nelbo, model, LogLinear(), x0, t, 20, seed=4)
    ref, g_ref = _nelbo_and_grads(_nelbo_full_forward, model, LogLinear(), x0, t, 20, seed=4)
    assert new.shape == (6,) and (new > 0).all()
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=0)
    assert g_new.keys() == g_ref.keys()
    for name in g_ref:
        # float32 rounding of a different summation order (chunked head): relative to the tensor's largest entry
        torch.testing.assert_close(g_new[name], g_ref[name], rtol=1e-4, atol=2e-6 * g_ref[name].abs().max(), msg=name)
    fallback = nelbo(CountingModel(model), LogLinear(), x0, t, 20, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fallback.detach(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["some_sequence_unmasked", "all_masked"])
def test_nelbo_masked_rows_edge_cases(case):
    model = _tiny_denoiser(time_cond=True)
    x0 = torch.randint(0, 20, (4, 24), generator=torch.Generator().manual_seed(5))
    if case == "some_sequence_unmasked":  # t = 1e-6: no position of sequence 0 is masked
        schedule, t = LogLinear(), torch.tensor([1e-6, 0.3, 0.6, 0.9])
    else:  # alpha_1 = 0: every position is masked
        schedule, t = LogLinear(eps=0.0), torch.ones(4)
    x_t = q_xt(x0, schedule.alpha(t), 20, torch.Generator().manual_seed(6))
    if case == "some_sequence_unmasked":
        assert not (x_t[0] == 20).any() and (x_t[1:] == 20).any()
    else:
        assert (x_t == 20).all()
    new, g_new = _nelbo_and_grads(nelbo, model, schedule, x0, t, 20, seed=6)
    ref, g_ref = _nelbo_and_grads(_nelbo_full_forward, model, schedule, x0, t, 20, seed=6)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=0)
    if case == "some_sequence_unmasked":
        assert new[0] == 0
    for name in g_ref:
        # float32 rounding of a different summation order (chunked head): relative to the tensor's largest entry
        torch.testing.assert_close(g_new[name], g_ref[name], rtol=1e-4, atol=2e-6 * g_ref[name].abs().max(), msg=name)


def test_nelbo_with_no_masked_position_has_zero_loss_and_gradients():
    model = _tiny_denoiser(time_cond=False)
    x0 = torch.randint(0, 20, (2, 24))
    out = nelbo(model, LogLinear(), x0, torch.full((2,), 1e-6), 20, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    assert (out == 0).all()  # no position was masked
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_transformer_forward_is_head_of_hidden_and_hidden_takes_embeddings():
    torch.manual_seed(0)
    net = Transformer(21, 24, 32, 2, 2, time_cond=True)
    with torch.no_grad():
        net.ada_out.weight.normal_(0, 0.1)
    x, t = torch.randint(0, 21, (2, 24)), torch.rand(2)
    h = net.hidden(x, t)
    assert h.shape == (2, 24, 32)
    torch.testing.assert_close(net(x, t), net.head(h))
    torch.testing.assert_close(net.hidden(net.embed(x), t), h)  # (B, L, D) input embeddings, e.g. soft tokens


def test_time_conditioned_transformer_starts_as_its_unconditioned_twin():
    """adaLN-zero: every modulation (each block's and the final one) starts at zero, so a fresh time-conditioned
    network is the same function at every t as the unconditioned network with the same shared weights."""
    torch.manual_seed(0)
    net = Transformer(21, 24, 32, 2, 2, time_cond=True)
    assert all(p.abs().max() == 0 for n, p in net.named_parameters() if "ada" in n)
    plain = Transformer(21, 24, 32, 2, 2)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k in plain.state_dict()})
    x = torch.randint(0, 21, (2, 24))
    for t in (0.05, 0.5, 0.95):
        assert torch.equal(net(x, torch.full((2,), t)), plain(x))


def test_nelbo_masked_rows_runs_through_the_compiled_call():
    """The masked-rows path is a flag of forward (targets=), so in-place Module.compile() (train.compile) wraps it."""
    from torch._dynamo.testing import CompileCounter

    model, ref = _tiny_denoiser(time_cond=True), _tiny_denoiser(time_cond=True)
    counter = CompileCounter()
    model.compile(backend=counter)
    for seed in range(3):  # the number of masked rows changes between calls
        x0 = torch.randint(0, 20, (4, 24), generator=torch.Generator().manual_seed(seed))
        t = torch.rand(4, generator=torch.Generator().manual_seed(seed))
        got = nelbo(model, LogLinear(), x0, t, 20, generator=torch.Generator().manual_seed(seed))
        want = nelbo(ref, LogLinear(), x0, t, 20, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert counter.frame_count > 0  # the compiled forward ran
