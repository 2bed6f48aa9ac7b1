"""AR baseline: KV-cached sampling equals uncached sampling, and the loss is next-token cross-entropy."""

import math

import pytest
import torch

from fewstep.ar import ar_nll, ar_sample
from fewstep.models.transformer import Transformer


def _model():
    torch.manual_seed(0)
    return Transformer(30, 32, 32, 2, 2, causal=True).double().eval()


def test_kv_cache_sampling_equals_uncached():
    model = _model()
    kw = dict(batch=4, length=20, bos_id=29, temperature=0.9, top_p=0.95)
    a = ar_sample(model, kv_cache=True, generator=torch.Generator().manual_seed(7), **kw)
    b = ar_sample(model, kv_cache=False, generator=torch.Generator().manual_seed(7), **kw)
    assert a.shape == (4, 20)
    assert torch.equal(a, b)


def test_kv_cache_logits_match_full_forward():
    model = _model()
    x = torch.randint(0, 30, (2, 12))
    full = model(x)
    cache = model.new_cache(2, 12)
    steps = [model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_static_kv_cache_logits_match_full_forward():
    """The CUDA-graph decode path (write at pos_t, masked attention over the whole buffer) equals the full pass."""
    model = _model()
    x = torch.randint(0, 30, (2, 12))
    full = model(x)
    cache = model.new_cache(2, 16)  # a longer buffer than used: the mask must hide the unwritten tail
    steps = [model(x[:, :5], cache=cache)]
    cache.pos_t = torch.tensor([cache.pos])
    for i in range(5, 12):
        steps.append(model(x[:, i : i + 1], cache=cache))
        cache.pos_t.add_(1)
    torch.testing.assert_close(torch.cat(steps, 1), full)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_decode():
    model = _model().float().cuda()
    kw = dict(batch=3, length=24, bos_id=29, device="cuda")
    a = ar_sample(model, cuda_graph=True, generator=torch.Generator("cuda").manual_seed(3), **kw)
    b = ar_sample(model, cuda_graph=False, generator=torch.Generator("cuda").manual_seed(3), **kw)
    assert torch.equal(a, b)


def _three_generations(model, compile, **kw):
    """Tokens of three same-shape generations (seeds 0, 1, 2) and the backend's compile count after each."""
    out, frames = [], []
    for seed in range(3):
        gen = torch.Generator(kw.get("device", "cpu")).manual_seed(seed)
        out.append(ar_sample(model, compile=compile, generator=gen, **kw))
        frames.append(compile.frame_count)
    return out, frames


def test_compiled_decode_step_compiles_once_and_samples_the_eager_tokens():
    """ar_sample(compile=...): the decode step takes the KV cache as tensors, so three generations of one shape
    compile it once (before, each generation's new KVCache object made dynamo compile again), and it samples the
    eager path's tokens. aot_eager: dynamo's guards and graphs, and the functionalised in-place cache writes,
    without a C++ compiler."""
    from torch._dynamo.testing import CompileCounterWithBackend

    import fewstep.ar

    model = _model().float()
    kw = dict(batch=3, length=16, bos_id=29, temperature=0.9, top_p=0.95)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    try:
        compiled, frames = _three_generations(model, counter, **kw)
        again, _ = _three_generations(_model().float(), counter, **kw)  # a second model of the same shape
        assert counter.frame_count == frames[-1]
        # the static cache (and on CUDA its captured graph) is one per model and shape, reused by every
        # generation: a capture inside each timed generation made the AR baseline look slower
        (entry,) = fewstep.ar._STATIC[model].values()
        assert entry["state"]["pos_t"].item() == 15 and len(entry["k"]) == model.n_layers  # last decoded position
        prompt = torch.full((3, 4), 29)  # another prompt length, the same total: the same buffers, stale K/V masked
        kw_p = {**kw, "length": 13}
        got = ar_sample(model, prompt=prompt, compile=counter, generator=torch.Generator().manual_seed(5), **kw_p)
        assert len(fewstep.ar._STATIC[model]) == 1
        assert torch.equal(got, ar_sample(model, prompt=prompt, generator=torch.Generator().manual_seed(5), **kw_p))
    finally:
        torch._dynamo.reset()
        fewstep.ar._COMPILED.pop(counter, None)
    assert frames == [1, 1, 1]  # one graph (fullgraph=True), never recompiled
    for seed, (a, b) in enumerate(zip(compiled, again)):
        eager = ar_sample(model, generator=torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(a, eager) and torch.equal(b, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_graph_decode_compiles_once_and_equals_eager_decode():
    from torch._dynamo.testing import CompileCounterWithBackend

    import fewstep.ar

    model = _model().float().cuda()
    kw = dict(batch=3, length=24, bos_id=29, device="cuda", cuda_graph=True)
    counter = CompileCounterWithBackend("inductor")
    torch._dynamo.reset()
    try:
        compiled, frames = _three_generations(model, counter, **kw)
    finally:
        torch._dynamo.reset()
        fewstep.ar._COMPILED.pop(counter, None)
    assert frames == [1, 1, 1]
    for seed, a in enumerate(compiled):
        assert torch.equal(a, ar_sample(model, generator=torch.Generator("cuda").manual_seed(seed), **kw))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_denoiser_equals_model():
    from fewstep.diffusion.mdlm import MaskedDenoiser
    from fewstep.models.inference import GraphedDenoiser

    torch.manual_seed(0)
    model = MaskedDenoiser(Transformer(31, 32, 32, 2, 2), mask_id=30).cuda().eval()
    g = GraphedDenoiser(model)
    for _ in range(2):  # the second call replays the graph with new inputs
        x = torch.randint(0, 31, (2, 32), device="cuda")
        t = torch.rand(2, device="cuda")
        torch.testing.assert_close(g(x, t).clone(), model(x, t))


def test_causal_model_ignores_future_tokens():
    model = _model()
    x = torch.randint(0, 30, (1, 10))
    y = x.clone()
    y[0, 6:] = (y[0, 6:] + 1) % 30
    torch.testing.assert_close(model(x)[:, :6], model(y)[:, :6])


def test_ar_nll_of_uniform_model_is_log_vocab():
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 30)

    x = torch.randint(0, 30, (3, 9))
    torch.testing.assert_close(ar_nll(Uniform(), x), torch.full((3,), 8 * math.log(30)))


def test_ar_nll_of_a_transformer_is_the_cross_entropy_of_its_logits_with_gradients():
    """A Transformer's loss goes through its chunked head (`forward(..., targets=)`): the values and every parameter
    gradient of the next-token cross-entropy of its (B, L, V) logits, in float64."""
    model = _model().train()
    x = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(1))
    w = torch.rand(3, dtype=torch.float64)  # a generic per-sequence upstream gradient

    def run(fn):
        model.zero_grad()
        out = fn(model, x)
        (w * out).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def from_logits(model, x):
        log_p = model(x[:, :-1]).log_softmax(-1)  # (B, L-1, V)
        return -log_p.gather(-1, x[:, 1:, None]).squeeze(-1).sum(-1)

    new, g_new = run(ar_nll)
    ref, g_ref = run(from_logits)
    torch.testing.assert_close(new, ref, rtol=1e-12, atol=0)
    for name in g_ref:
        torch.testing.assert_close(g_new[name], g_ref[name], rtol=1e-9, atol=1e-12, msg=name)
