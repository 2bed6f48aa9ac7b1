"""The chunked head + cross-entropy against the plain formula: values, gradients, dtypes and what it keeps."""

import pytest
import torch

from fewstep.models.linear_nll import linear_nll


def _problem(N=23, D=8, V=37, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    w = (0.5 * torch.randn(V, D, generator=g, dtype=dtype)).requires_grad_()
    y = torch.randint(0, V - 1, (N,), generator=g)  # never the last column, the excluded one below
    g_nll = torch.rand(N, generator=g, dtype=dtype)  # a generic upstream gradient, one per row
    return h, w, y, g_nll


def _plain(h, w, y, exclude):
    z = h @ w.T  # (N, V)
    z = z.float() if z.dtype != torch.float64 else z
    if exclude is not None:
        z = z.index_fill(-1, torch.tensor([exclude]), float("-inf"))
    return -z.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)


def _value_and_grads(fn, h, w, y, g_nll, **kw):
    h.grad = w.grad = None
    out = fn(h, w, y, **kw)
    (out * g_nll).sum().backward()
    return out.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk_rows", [1, 5, 23, 100])  # one row, a ragged last chunk, exactly N, more than N
@pytest.mark.parametrize("exclude", [None, 36])
def test_values_and_gradients_are_the_plain_cross_entropy(chunk_rows, exclude):
    h, w, y, g_nll = _problem()
    ref = _value_and_grads(lambda h, w, y: _plain(h, w, y, exclude), h, w, y, g_nll)
    new = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=exclude, chunk=chunk_rows * w.shape[0])
    assert new[0].dtype == torch.float64 and (new[0] > 0).all()
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if exclude is not None:  # the excluded column gets no probability, hence no gradient through its logit...
        assert new[2][exclude].abs().max() < 1e-12
        # ...and excluding it changes the normaliser: the NLL differs from the plain softmax over all V columns
        assert (new[0] - _plain(h, w, y, None).detach()).abs().max() > 1e-3


def test_float32_and_bf16_autocast_match_the_head_under_the_same_dtypes():
    """float32: as the plain float32 path, to rounding; under CPU bf16 autocast the logits are bf16 (as `head(h)`
    there) and the gradients come back in the inputs' dtypes."""
    h, w, y, g_nll = _problem(N=64, D=16, V=301, dtype=torch.float32)
    ref = _value_and_grads(lambda h, w, y: _plain(h, w, y, 300), h, w, y, g_nll)
    new = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=300, chunk=10 * 301)
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _value_and_grads(lambda h, w, y: _plain(h, w, y, 300), h, w, y, g_nll)
        new = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=300, chunk=10 * 301)
    torch.testing.assert_close(new[0], ref[0], rtol=0, atol=1e-5)  # the same bf16 logits, float32 softmax
    for a, b in zip(new[1:], ref[1:]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())
    bf16 = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=300)  # autocast off again: float32
    assert (bf16[0] - new[0]).abs().max() > 1e-4  # the bf16 logits were not float32 ones


def test_keeps_no_row_by_vocabulary_tensor_for_the_backward():
    """What autograd keeps: the plain path saves (N, V) tensors, this one (N, D), (V, D) and (N,) ones only."""
    h, w, y, _ = _problem(N=200, D=8, V=301, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _plain(h, w, y, 300).sum()
        plain = max(saved)
        saved.clear()
        linear_nll(h, w, y, exclude=300, chunk=20 * 301).sum()
    assert plain >= 200 * 301 and max(saved) == 301 * 8


def test_frozen_head_and_empty_rows():
    h, w, y, g_nll = _problem()
    w.requires_grad_(False)
    (linear_nll(h, w, y) * g_nll).sum().backward()
    assert h.grad is not None and w.grad is None
    w.requires_grad_()
    empty = linear_nll(h[:0], w, y[:0], exclude=36)  # a batch with no masked position
    assert empty.shape == (0,)
    empty.sum().backward()
    assert w.grad is not None and (w.grad == 0).all()


def test_compiled_chunk_passes_are_the_eager_ones():
    h, w, y, g_nll = _problem(N=40, D=8, V=301, dtype=torch.float32)
    eager = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=300, chunk=16 * 301, fused=False)
    fused = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=300, chunk=16 * 301, fused=True)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shape_mismatch_is_one_clear_error():
    h, w, y, _ = _problem()
    with pytest.raises(ValueError, match=r"must be \(N, D\), \(V, D\), \(N,\)"):
        linear_nll(h, w[:, :4], y)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("exclude", [None, 300])
def test_padded_vocabulary_gives_the_same_values_and_gradients(exclude, fused):
    """pad_to (the CUDA default: 64) computes over W with zero rows up to a multiple of it and gives the padded
    columns probability 0: the same NLL and gradients as V columns (V = 301 -> 320), the weight's gradient of
    shape (V, D); float64, so only the summation order could differ."""
    h, w, y, g_nll = _problem(N=40, D=8, V=301)
    ref = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=exclude, chunk=16 * 301, fused=fused, pad_to=1)
    pad = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=exclude, chunk=16 * 301, fused=fused, pad_to=64)
    assert pad[2].shape == w.shape
    for a, b in zip(pad, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    plain = _value_and_grads(lambda h, w, y: _plain(h, w, y, exclude), h, w, y, g_nll)
    torch.testing.assert_close(pad[0], plain[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="pad_to=0 must be >= 1"):
        linear_nll(h, w, y, pad_to=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_pads_the_vocabulary_and_matches_the_unpadded_path():
    h, w, y, g_nll = (t.detach().cuda() for t in _problem(N=64, D=16, V=301, dtype=torch.float32))
    h.requires_grad_(), w.requires_grad_()
    pad = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=300)  # CUDA default: pad_to=64, compiled passes
    ref = _value_and_grads(linear_nll, h, w, y, g_nll, exclude=300, pad_to=1)
    for a, b in zip(pad, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
