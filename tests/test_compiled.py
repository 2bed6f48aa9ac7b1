"""fewstep.compiled: a compiler failure falls back to the eager function (warned, listed); real errors do not."""

import pytest
import torch

import fewstep.compiled as compiled


class Broken:
    """A stand-in for torch.compile whose compiled functions raise `error` (a compiler failure) and count calls."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __call__(self, fn, dynamic=True):
        def run(*args):
            self.calls += 1
            raise self.error

        return run


@pytest.fixture
def fresh(monkeypatch):
    """No fallback on record, and no kernel built before (or by) the test kept: later tests compile for real."""
    monkeypatch.setattr(compiled, "_FAILED", {})
    compiled.kernel.cache_clear()
    yield
    compiled.kernel.cache_clear()


def test_a_failing_compiler_falls_back_to_eager_once_warned_and_listed(fresh, monkeypatch):
    broken = Broken(RuntimeError("triton: unsupported dtype\nmore lines"))
    monkeypatch.setattr(torch, "compile", broken)

    def double(x):
        return 2 * x

    k = compiled.kernel(double)
    with pytest.warns(RuntimeWarning, match="torch.compile of double failed .RuntimeError: triton: unsupported dtype"):
        assert torch.equal(k(torch.arange(3)), torch.tensor([0, 2, 4]))
    assert compiled.fallbacks() == ["double"]
    assert torch.equal(k(torch.ones(2)), torch.full((2,), 2.0))  # eager from then on: the compiled form not retried
    assert broken.calls == 1


def test_a_genuine_error_propagates_and_marks_nothing(fresh, monkeypatch):
    monkeypatch.setattr(torch, "compile", Broken(RuntimeError("shape mismatch")))

    def add(x, y):
        return x + y

    with pytest.raises(RuntimeError, match="must match the size"):  # the eager function's own error
        compiled.kernel(add)(torch.ones(2), torch.ones(3))
    assert compiled.fallbacks() == []


def test_out_of_memory_propagates_without_an_eager_retry(fresh, monkeypatch):
    monkeypatch.setattr(torch, "compile", Broken(torch.OutOfMemoryError("CUDA out of memory")))
    ran = []

    def ident(x):
        ran.append(1)
        return x

    with pytest.raises(torch.OutOfMemoryError):
        compiled.kernel(ident)(torch.ones(1))
    assert ran == [] and compiled.fallbacks() == []


def test_the_fused_draw_and_the_chunked_loss_survive_a_failing_compiler(fresh, monkeypatch):
    """Both users of kernel(): the same tokens and the same loss and gradients as their eager forms."""
    from fewstep.diffusion.sampling import draw_rows
    from fewstep.models.linear_nll import linear_nll

    monkeypatch.setattr(torch, "compile", Broken(RuntimeError("no backend for this device")))
    gen = torch.Generator().manual_seed(0)
    log_p = torch.randn(6, 11, generator=gen).log_softmax(-1)
    with pytest.warns(RuntimeWarning, match="_race"):
        a = draw_rows(log_p, generator=torch.Generator().manual_seed(1), fused=True)
    assert torch.equal(a, draw_rows(log_p, generator=torch.Generator().manual_seed(1), fused=False))
    h = torch.randn(5, 4, generator=gen, requires_grad=True)
    w = torch.randn(7, 4, generator=gen, requires_grad=True)
    y = torch.tensor([1, 2, 3, 4, 5])

    def run(fused):  # the loss and its gradients
        nll = linear_nll(h, w, y, exclude=0, fused=fused)
        return (nll.detach(), *torch.autograd.grad(nll.sum(), (h, w)))
    with pytest.warns(RuntimeWarning, match="_nll_rows|_grad_rows_fused"):
        got = run(True)  # forward and backward: each pass falls back on its first call
    for a, b in zip(got, run(False)):
        torch.testing.assert_close(a, b)
    assert compiled.fallbacks() == ["_grad_rows_fused", "_nll_rows", "_race"]


def test_a_working_compiler_is_used(fresh):
    """The real torch.compile: the compiled form runs, nothing is marked."""
    def square(x):
        return x * x

    x = torch.arange(5.0)
    assert torch.equal(compiled.kernel(square)(x), x * x) and compiled.fallbacks() == []
