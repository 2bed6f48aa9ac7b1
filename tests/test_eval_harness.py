"""Evaluation harness: float32 vs float64 sampling, likelihoods (val PPL, continuation log-probs), `fewstep eval`."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn as nn

from conftest import tiny_overrides
from fewstep.ar import ar_nll
from fewstep.cli import main
from fewstep.config import FewstepError
from fewstep.diffusion.mdlm import NEG_INF
from fewstep.diffusion.sampling import sample_categorical
from fewstep.eval.likelihood import continuation_logprob, dlm_greedy_fill, val_ppl
from fewstep.models.transformer import Transformer
from markov import MarkovChain, OracleDenoiser

K24 = 2**24  # torch.rand in float32 returns k / 2^24, k = 0 .. 2^24 - 1 (24 random bits)


def race_f32(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """MDLM / SEDD / SDTT `_sample_categorical` in float32: argmax p / E with E = 1e-10 - log(u + 1e-10)."""
    return (probs / (1e-10 - (u + 1e-10).log())).argmax(-1)


def two_level(p_top: float, n: int, dtype) -> torch.Tensor:
    """A peaked distribution: one token of probability p_top, then a flat tail of n tokens. (V,) = (n + 1,)"""
    p = torch.full((n + 1,), (1 - p_top) / n, dtype=dtype)
    p[0] = p_top
    return p


def entropy_two_level(p_top: float, n: int) -> float:
    return -p_top * math.log(p_top) - (1 - p_top) * math.log((1 - p_top) / n)


def test_float32_race_and_float64_agree_where_the_tail_is_representable():
    """Real draws, fixed seeds: with tail probabilities of 1e-4 both draws are right; this pins the race
    function and the tie rule (argmax takes the first index) that the exact computation below relies on."""
    p64 = two_level(0.9, 500, torch.float64)
    n = 10_000
    u = torch.rand(n, 501, generator=torch.Generator().manual_seed(0))  # float32, on the 2^-24 grid
    assert bool(((u * K24) == (u * K24).floor()).all()) and float(u.max()) < 1
    top32 = (race_f32(p64.float().expand(n, -1), u) == 0).double().mean()
    top64 = (sample_categorical(p64.expand(n, -1), torch.Generator().manual_seed(1)) == 0).double().mean()
    se = math.sqrt(0.9 * 0.1 / n)
    assert abs(top32 - 0.9) < 5 * se and abs(top64 - 0.9) < 5 * se


def test_float32_race_loses_entropy_on_a_peaked_long_tail_float64_keeps_it():
    """Zheng et al. 2024 (arXiv 2409.02908): float32 categorical sampling truncates the tail.

    Distribution: p_top = 0.9 and 2^23 tail tokens of 1.2e-8 each (10% of the mass, like the rare tokens of a
    50k vocabulary times a 1/1024 unmasking rate in a many-step MDLM update). A tail token wins iff its E is
    below ~1.3e-8 * E_top, but the smallest E float32 can produce is -log(1 - 2^-24) = 6e-8. Observing that by
    Monte Carlo needs ~1e9 draws, so the law of the float32 draw is computed exactly instead: the float32 race
    is evaluated on every one of the 2^24 uniforms torch.rand can return, and
        P(top wins) = E_{u_top}[ P(q_tail <= q_top(u_top))^n ]    (ties go to index 0, as argmax does).
    float64 (`sample_categorical`: u on a 2^-53 grid, E down to 1e-16) resolves these probabilities: the same
    formula with float64 exponentials gives back p_top, so the draw keeps the distribution's entropy.
    """
    p_top, n = 0.9, 2**23
    grid = torch.arange(K24, dtype=torch.float32) / K24  # (2^24,) every float32 uniform
    e32 = 1e-10 - (grid + 1e-10).log()  # the race's exponentials, decreasing in u
    assert 5.9e-8 < float(e32.min()) < 6.0e-8  # nothing smaller can ever be drawn
    q_top = torch.tensor(p_top, dtype=torch.float32) / e32  # (2^24,) p / E exactly as the race computes it
    q_tail = torch.tensor((1 - p_top) / n, dtype=torch.float32) / e32
    assert bool((q_tail.diff() >= 0).all())  # sorted: a CDF by binary search
    cdf = torch.searchsorted(q_tail, q_top, right=True).double() / K24  # P(q_tail <= q_top | u_top)
    top32 = float((n * cdf.log()).exp().mean())
    m = 2**20  # float64: midpoint quadrature over u_top of exp(-n * rho * E_top), rho = p_tail / p_top
    e64 = -torch.log1p(-(torch.arange(m, dtype=torch.float64) + 0.5) / m)
    top64 = float(torch.exp(-n * ((1 - p_top) / n / p_top) * e64).mean())
    h_true, h32, h64 = (entropy_two_level(p, n) for p in (p_top, top32, top64))
    assert top64 == pytest.approx(p_top, abs=1e-6) and h64 == pytest.approx(h_true, rel=1e-4)
    assert top32 > 0.99  # the tail gets < 1% of the draws instead of 10%
    assert h32 < 0.1 * h_true  # 0.10 nats instead of 1.92


# ------------------------------------------------------------------------------------------ likelihoods


class Unigram(nn.Module):
    """A context-free model: causal LM `(B, L) -> logits` or SUBS denoiser `(x_t, t) -> log p` over V + 1."""

    time_conditioned = False

    def __init__(self, probs: list[float], denoiser: bool):
        super().__init__()
        self.register_buffer("logp", torch.tensor(probs).log())
        self.denoiser, self.mask_id = denoiser, len(probs)

    def new_cache(self, *a, **k):
        return None

    def forward(self, x, t=None, cache=None):
        if not self.denoiser:
            return self.logp.expand(*x.shape, -1)
        log_p = torch.cat([self.logp, torch.tensor([NEG_INF])]).expand(*x.shape, -1).clone()
        carry = torch.full_like(log_p, NEG_INF).scatter_(-1, x[..., None], 0.0)
        return torch.where((x != self.mask_id)[..., None], carry, log_p)


def meta_for(kind, seq_len, eos=0, data_dir=None):
    return {"kind": kind, "model": {"seq_len": seq_len, "schedule": "loglinear"},
            "data": {"eos_id": eos, "dir": str(data_dir), "tokenizer": "byte"}}


def test_ar_continuation_logprob_is_exact():
    torch.manual_seed(0)
    model = Transformer(30, 16, 32, 2, 2, causal=True).eval()
    meta = meta_for("ar", 16, eos=29)
    ctx, cont = [3, 4, 5], [6, 7]
    lp, greedy = continuation_logprob(model, meta, [ctx, []], [cont, cont], greedy=True)
    for row, (c, lp_row) in enumerate([(ctx, lp[0]), ([], lp[1])]):
        x = torch.tensor([[29, *c, *cont]])
        with torch.no_grad():
            logp = model(x[:, :-1]).log_softmax(-1)[0]  # (L-1, V)
        hand = sum(float(logp[len(c) + i, cont[i]]) for i in range(len(cont)))
        assert float(lp_row) == pytest.approx(hand, abs=1e-4)
        assert bool(greedy[row]) == all(int(logp[len(c) + i].argmax()) == cont[i] for i in range(len(cont)))
    long = continuation_logprob(model, meta, [list(range(20))], [cont])  # context cut from the left to fit
    assert torch.isfinite(long).all()


@pytest.mark.parametrize("time_conditioned", [False, True])
def test_dlm_bound_is_exact_for_an_oracle_and_respects_the_prefix(time_conditioned):
    """E[-NELBO] of the exact denoiser equals log p(continuation | context) of a Markov chain, with either
    estimator (masked-count form for models without time conditioning, time form otherwise)."""
    chain = MarkovChain(vocab=3, seed=1)
    oracle = OracleDenoiser(chain, mask_id=3)
    oracle.time_conditioned = time_conditioned
    meta = meta_for("mdlm", 8, eos=0)
    ctx, cont = [2, 1], [1, 0, 2]
    est = continuation_logprob(oracle, meta, [ctx] * 8, [cont] * 8, mc=2048, seeds=range(8), batch_size=1 << 15)
    P = chain.P.log()
    exact = float(P[ctx[-1], cont[0]] + P[cont[0], cont[1]] + P[cont[1], cont[2]])  # EOS (0) and ctx observed
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - exact) < 4 * se + 1e-3
    assert 4 * se < 0.3  # the check has teeth: far tighter than the gap to the unconditional value below
    unconditional = float(chain.log_prob(torch.tensor([cont])))
    assert abs(unconditional - exact) > 0.3  # the prefix matters, and it was used


def test_dlm_scores_are_batch_independent_and_seeded():
    torch.manual_seed(0)
    from fewstep.diffusion.mdlm import MaskedDenoiser

    model = MaskedDenoiser(Transformer(11, 12, 32, 2, 2), mask_id=10).eval()
    meta = meta_for("mdlm", 12, eos=9)
    ctxs, conts = [[1, 2], [3], []], [[4, 5], [6, 7, 8], [1]]
    together = continuation_logprob(model, meta, ctxs, conts, mc=8, batch_size=64)
    alone = torch.cat([continuation_logprob(model, meta, [c], [d], mc=8, seed=i) for i, (c, d)
                       in enumerate(zip(ctxs, conts))])
    torch.testing.assert_close(together, alone)
    other = continuation_logprob(model, meta, ctxs, conts, mc=8, seed=100)
    assert not torch.allclose(together, other)  # a different seed draws different times and masks
    filled = dlm_greedy_fill(model, torch.tensor([[9, 1, 2, 10, 10]]), torch.tensor([[0, 0, 0, 1, 1]]).bool())
    assert filled[0, :3].tolist() == [9, 1, 2] and (filled != 10).all()


def test_greedy_fill_tells_the_model_the_time_of_the_fills_masked_fraction():
    from fewstep.diffusion.schedule import Cosine

    seen = []

    def probe(x, t):
        seen.append(t.clone())
        return torch.zeros(*x.shape, 11).log_softmax(-1)

    probe.mask_id = 10
    fill = torch.tensor([[0, 1, 1, 1, 1]]).bool()
    dlm_greedy_fill(probe, torch.tensor([[9, 10, 10, 10, 10]]), fill, schedule=Cosine())
    frac = torch.tensor([1.0, 0.75, 0.5, 0.25])  # 4, 3, 2, 1 of the 4 fill positions still masked
    assert torch.allclose(torch.cat(seen), Cosine().time_of(1 - frac))
    assert torch.allclose(1 - Cosine().alpha(torch.cat(seen)), frac.clamp(max=1 - Cosine().eps), atol=1e-6)


def test_dlm_bound_of_a_factorised_model_is_its_exact_likelihood():
    """Context-free denoiser: the NELBO of each token is (1 - eps) * its NLL, so the MC estimate converges."""
    probs = [0.5, 0.3, 0.15, 0.05]
    model = Unigram(probs, denoiser=True)
    meta = meta_for("mdlm", 10, eos=0)
    cont = [1, 2, 3, 3]
    est = continuation_logprob(model, meta, [[1, 2]] * 8, [cont] * 8, mc=512, seeds=range(8))
    exact = sum(math.log(probs[c]) for c in cont)
    assert float(est.mean()) == pytest.approx(exact, rel=0.02)
    ar = continuation_logprob(Unigram(probs, denoiser=False), meta_for("ar", 10), [[1, 2]], [cont])
    assert float(ar[0]) == pytest.approx(exact, rel=1e-6)


def test_val_ppl_exact_for_ar_and_bound_for_dlm(pydoc_data):
    from fewstep.data import TokenBlocks

    torch.manual_seed(0)
    ar = Transformer(257, 32, 32, 2, 2, causal=True).eval()
    out = val_ppl(ar, meta_for("ar", 32, 256, pydoc_data), batch_size=4, max_batches=2)
    x = torch.cat(list(TokenBlocks(pydoc_data, "val", 32).iter_eval(4, max_batches=2)))
    with torch.no_grad():
        hand = float(ar_nll(ar, x).sum()) / (x.shape[0] * 31)
    assert out["val_nll"] == pytest.approx(hand, rel=1e-5) and out["val_ppl"] == pytest.approx(math.exp(hand))
    assert out["val_bound"] is False and out["val_tokens"] == x.shape[0] * 31
    with torch.no_grad():  # each sequence's NLL per token, in order, and the standard error of their mean
        per = (ar_nll(ar, x) / 31).tolist()
    assert out["val_seq_nll"] == pytest.approx(per, rel=1e-5) and len(per) == x.shape[0] == 8
    assert out["val_nll_se"] == pytest.approx(statistics.stdev(per) / math.sqrt(8), rel=1e-4)
    probs = torch.softmax(torch.randn(257, generator=torch.Generator().manual_seed(0)), -1)
    dlm = Unigram(probs.tolist(), denoiser=True)  # factorised: its NELBO is (1 - eps) * its exact NLL
    out = val_ppl(dlm, meta_for("mdlm", 32, 256, pydoc_data), batch_size=4, max_batches=2, mc=64)
    exact = float(-probs.log()[x].mean())
    assert out["val_bound"] and out["val_mc"] == 64 and out["val_tokens"] == x.numel()
    assert out["val_nll"] == pytest.approx(exact, rel=0.03)
    assert statistics.fmean(out["val_seq_nll"]) == pytest.approx(out["val_nll"], rel=1e-9)  # equal token counts
    hand = [float(-probs.log()[row].mean()) for row in x]  # each sequence's exact NLL, which its bound estimates
    err = lambda ref: sum(abs(a - b) for a, b in zip(out["val_seq_nll"], ref))
    assert out["val_seq_nll"] == pytest.approx(hand, rel=0.1) and err(hand) < err(hand[1:] + hand[:1])  # in order
    assert out["val_nll_se"] == pytest.approx(statistics.stdev(out["val_seq_nll"]) / math.sqrt(8), rel=1e-9)
    wrong = {**meta_for("ar", 32, 256, pydoc_data), "data": {"eos_id": 50256, "tokenizer": "gpt2", "dir": "x"}}
    with pytest.raises(FewstepError, match="tokenizer='byte' but the model was trained with 'gpt2'"):
        val_ppl(ar, wrong, str(pydoc_data), batch_size=4, max_batches=1)  # another data dir's tokens: one line


# ------------------------------------------------------------------------------------------- fewstep eval


def test_eval_and_report_commands(pydoc_data, tmp_path, capsys):
    runs = {}
    for kind in ("mdlm", "ar"):
        runs[kind] = tmp_path / kind
        over = tiny_overrides(pydoc_data, runs[kind], **{"train.max_steps": 2, "model.kind": kind})
        assert main(["train", *over]) == 0
    (tmp_path / "lambada.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                                      ["the cat sat on the mat", "def f(x): return x"]))
    hs = {"ctx": "The value of", "endings": ["x is 3.", "y.", "the cat", "a b c"], "label": "0"}
    (tmp_path / "hs.jsonl").write_text(json.dumps(hs) + "\n")
    out = tmp_path / "res" / "eval.json"
    args = ["eval", "--ckpt", str(runs["mdlm"]), "--steps", "1,2", "--n", "2", "--judge", f"ckpt:{runs['ar']}",
            "--val-batches", "1", "--val-mc", "2", "--task-n", "2", "--task-mc", "2", "--out", str(out),
            "--tasks", f"lambada:{tmp_path / 'lambada.jsonl'},hellaswag:{tmp_path / 'hs.jsonl'}"]
    assert main(args) == 0
    rows = json.loads(out.read_text())
    samples, tasks = rows[:2], rows[2:]
    for k, r in zip((1, 2), samples):
        assert r["steps"] == k and r["sampler"] == "ancestral" and r["n_samples"] == 2 and r["seed"] == 0
        assert r["precision"] == "fp32" and r["greedy_tail"] is False and r["sampling_dtype"] == "float64"
        assert r["gen_ppl"] > 1 and r["entropy"] > 0 and r["judge"] == f"ckpt:{runs['ar']}"
        assert r["val_bound"] is True and r["val_mc"] == 2 and r["val_ppl"] > 1
    assert [t["task"] for t in tasks] == ["lambada", "hellaswag"]
    assert tasks[0]["n_items"] == 2 and 0 <= tasks[0]["acc"] <= 1 and tasks[0]["ppl"] > 1
    assert tasks[1]["n_items"] == 1 and tasks[1]["likelihood"] == "nelbo-mc2" and tasks[1]["chance"] == 0.25
    printed = capsys.readouterr().out
    assert "| gen_ppl |" in printed and "| acc |" in printed  # the sample table and the task table
    assert main(["eval", "--ckpt", str(runs["ar"]), "--n", "2", "--judge", "none", "--val-batches", "1",
                 "--out", str(tmp_path / "res" / "ar.json")]) == 0
    ar_rows = json.loads((tmp_path / "res" / "ar.json").read_text())
    assert len(ar_rows) == 1 and ar_rows[0]["sampler"] == "ar-kv-cache" and ar_rows[0]["val_bound"] is False
    assert "gen_ppl" not in ar_rows[0]
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep")]) == 0
    png = (tmp_path / "rep" / "gen_ppl_vs_steps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "--ckpt", str(runs["mdlm"]), "--judge", "nope"]) == 2


def test_latency_is_one_full_batch_when_the_last_batch_is_smaller(monkeypatch):
    """n = 10 at batch 8: the run is a batch of 8 and one of 2; the latency of one batch must be the batch of 8's,
    not the mean of the two. A fake clock charges 1 s per generated row (nothing is timed for real)."""
    import fewstep.eval.harness as harness
    import fewstep.pipeline

    monkeypatch.setattr(fewstep.pipeline, "generate", lambda model, meta, n, batch, **kw: torch.zeros(n, 4).long())
    monkeypatch.setattr(harness, "timed", lambda fn, **kw: (x := fn(), float(x.shape[0]), [float(x.shape[0])]))
    meta = {"kind": "mdlm", "name": "m"}
    model = nn.Linear(1, 1)
    row = harness.sample_eval(model, meta, steps=4, n=10, batch=8, tokenizer=null_tokenizer())
    assert row["latency_s"] == 8.0 and row["seconds_per_sample"] == 1.0
    assert harness.sample_eval(model, meta, steps=4, n=16, batch=8, tokenizer=null_tokenizer())["latency_s"] == 8.0


def null_tokenizer():
    class Tok:
        def decode(self, ids):
            return ""

    return Tok()


@pytest.mark.parametrize("args, needle", [
    (["--n", "0"], "n=0 is invalid"), (["--steps", ""], "at least one step count"),
    (["--steps", "1,0"], "steps=0 is invalid"), (["--batch", "0"], "batch=0 is invalid"),
    (["--seed", str(2**64)], "seed="), (["--task-mc", "0"], "--task-mc=0 must be >= 1"),
    (["--task-n", "-1"], "--task-n=-1 must be >= 1"), (["--val-mc", "0"], "--val-mc=0 must be >= 1"),
    (["--tasks", "bogus"], "unknown task 'bogus'"), (["--tasks", "lambada:/no/file"], "does not exist"),
    (["--data-dir", "/no/dir"], "is not a built data dir"), (["--device", "bogus"], "unknown device"),
])
def test_eval_arguments_are_checked_before_any_work(args, needle, capsys):
    """Each of these failed only after val PPL and sampling (or computed something else than recorded)."""
    assert main(["eval", "--ckpt", "/no/such/ckpt", *args]) == 2  # checked before the checkpoint is even read
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_val_ppl_of_a_uniform_state_model_is_its_nelbo(pydoc_data):
    from fewstep.config import ModelConfig
    from fewstep.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="uniform", seq_len=32, d_model=32, n_layers=1, n_heads=2), 257).eval()
    out = val_ppl(model, meta_for("uniform", 32, 256, pydoc_data), batch_size=4, max_batches=1, mc=2)
    assert out["val_bound"] and math.isfinite(out["val_nll"]) and out["val_nll"] > 0
    with pytest.raises(FewstepError, match="support 'mdlm' and 'ar'"):
        continuation_logprob(model, meta_for("uniform", 32, 256), [[1]], [[2]])


def test_race_never_picks_a_zero_probability_token_even_at_u_zero(monkeypatch):
    """u = 0 (probability 2^-53 per entry) gives E = 0; unclamped, a zero-probability entry would read 0 / 0 = NaN,
    which argmax picks: the mask token of an MDLM, or a token the nucleus filter removed."""
    from fewstep.diffusion import sampling

    log_p = torch.tensor([[math.log(0.5), math.log(0.5), -math.inf]], dtype=torch.float64)
    u = torch.tensor([[0.3, 0.6, 0.0]], dtype=torch.float64)
    assert int(sampling._race(log_p, u, 1.0)) == 0  # the live token with the smaller E (u = 0.3) wins
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: u.expand(shape).clone())
    assert int(sample_categorical(log_p.exp())) == 0  # the same draw through the probabilities path
