"""Cross-entropy through the vocabulary head, chunk by chunk of rows, never holding the (N, V) logits.

    linear_nll(h, W, y, exclude) = -log softmax(h W^T)[y],  h: (N, D), W: (V, D), y: (N,) -> (N,) float32

with column `exclude` (the MDLM's mask token: SUBS zero-masking) at probability 0. The plain path (head, float32
copy, log-softmax, gather, and the gradient of each) writes and reads several (N, V) float32 tensors: at a 50k
vocabulary, most of a training step's memory traffic outside the matmuls, and its largest activations. Here the
forward keeps only each row's log-normaliser lse = logsumexp_v z_v (N,), and the backward recomputes each chunk's
logits z = h W^T and forms the gradient (softmax(z) - onehot(y)) * dL/dnll in one pass over z:

    dL/dh = G W,  dL/dW = G^T h,  G = (exp(z - lse) - onehot(y)) * dL/dnll   (a chunk of rows at a time)

Cost: one more head matmul (its FLOPs go from 3 to 4 forward-equivalents); memory: a chunk of logits instead of
several (N, V) tensors. The logits use autocast's dtype when autocast is on (bf16 on a GPU), as `head(h)` would, and
lse, the NLL and the softmax are float32. On CUDA the two per-chunk passes are compiled kernels (`fused=None`;
`fewstep.compiled`), and W gets zero rows up to a multiple of 64 (`pad_to`; columns past V get probability 0): at
V = 50,258 a row of bf16 logits is 100,516 bytes, not a multiple of 16, which keeps the GEMMs that write or read
the (n, V) chunk off the GPU's aligned tensor-core kernels.
"""

from __future__ import annotations

import torch

from fewstep.compiled import kernel

CHUNK = 2**26  # logits per chunk (rows x V): 256 MB in float32, 1,335 rows at V = 50,258
NEG_INF = -1e6  # finite "log 0": keeps 0 * log 0 terms free of NaN in divergences


def _nll_rows(z: torch.Tensor, y: torch.Tensor, exclude: int | None, n_valid: int) -> tuple[torch.Tensor, ...]:
    """(n, V) logits, (n,) targets -> (nll, lse), both (n,) float32 (float64 for float64 logits); the columns from
    n_valid on (padding) and `exclude` get probability 0. Overwrites z when it is float32 or float64 already (a
    chunk's own logits)."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if exclude is not None:
        z[:, exclude] = NEG_INF
    if n_valid < z.shape[-1]:
        z[:, n_valid:] = NEG_INF
    lse = z.logsumexp(-1)  # (n,)
    return lse - z.gather(-1, y[:, None]).squeeze(-1), lse


def _grad_rows(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, g_nll: torch.Tensor,
               exclude: int | None) -> torch.Tensor:
    """d nll / d z scaled by each row's upstream gradient: (softmax(z) - onehot(y)) * g_nll, (n, V), in z's dtype.
    In place on a float32 copy of z (on z itself when it is float32 already)."""
    p = z.to(lse.dtype).sub_(lse[:, None]).exp_()  # (n, V): softmax, the excluded column included for now
    if exclude is not None:
        p[:, exclude] = 0.0
    p.scatter_add_(-1, y[:, None], torch.full_like(lse[:, None], -1.0))  # - onehot(y)
    return p.mul_(g_nll[:, None]).to(z.dtype)


def _grad_rows_fused(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, g_nll: torch.Tensor,
                     exclude: int | None) -> torch.Tensor:
    """`_grad_rows` without in-place steps (the scatter of the one-hot would be a kernel of its own), so that the
    compiled form is one pass: read z, write the gradient."""
    cols = torch.arange(z.shape[-1], device=z.device)  # (V,)
    p = (z.to(lse.dtype) - lse[:, None]).exp()  # (n, V)
    if exclude is not None:
        p = torch.where(cols == exclude, 0.0, p)
    return ((p - (cols == y[:, None]).to(p.dtype)) * g_nll[:, None]).to(z.dtype)


class _LinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, y, exclude, chunk, fused, dtype, pad_to):
        nll_rows, grad_rows = (kernel(_nll_rows), kernel(_grad_rows_fused)) if fused else (_nll_rows, _grad_rows)
        V, D = weight.shape
        h_c, w_c = h.to(dtype), weight.to(dtype)  # (N, D), (V, D): the head's matmul dtype
        if -V % pad_to:  # zero rows up to a multiple of pad_to: (V', D), the columns past V excluded below
            w_c = torch.cat([w_c, w_c.new_zeros(-V % pad_to, D)])
        chunk = max(1, chunk // w_c.shape[0])  # rows per chunk
        nll = torch.empty(h.shape[0], dtype=torch.promote_types(dtype, torch.float32), device=h.device)  # (N,)
        lse = torch.empty_like(nll)
        for i in range(0, h.shape[0], chunk):
            nll[i : i + chunk], lse[i : i + chunk] = nll_rows(h_c[i : i + chunk] @ w_c.T, y[i : i + chunk], exclude,
                                                              V)
        ctx.save_for_backward(h_c, w_c, y, lse)
        ctx.exclude, ctx.chunk, ctx.grad_rows, ctx.dtypes, ctx.V = exclude, chunk, grad_rows, (h.dtype, weight.dtype), V
        return nll

    @staticmethod
    def backward(ctx, g_nll):
        h_c, w_c, y, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h_c) if want_h else None  # (N, D)
        grad_w = torch.zeros(w_c.shape, dtype=lse.dtype, device=w_c.device) if want_w else None  # (V, D)
        n = ctx.chunk
        with torch.autocast(h_c.device.type, enabled=False):  # the dtypes are the forward's, whatever is active now
            for i in range(0, h_c.shape[0], n):
                # padding columns: their entries of g meet zero rows of W in g W and fill rows of g^T h cut below
                g = ctx.grad_rows(h_c[i : i + n] @ w_c.T, lse[i : i + n], y[i : i + n], g_nll[i : i + n], ctx.exclude)
                if want_h:
                    grad_h[i : i + n] = g @ w_c
                if want_w:
                    grad_w += g.T @ h_c[i : i + n]
        return (grad_h.to(ctx.dtypes[0]) if want_h else None, grad_w[: ctx.V].to(ctx.dtypes[1]) if want_w else None,
                None, None, None, None, None, None)


@torch.compiler.disable  # a Python loop over a data-dependent row count: run eagerly inside a compiled model
def linear_nll(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, exclude: int | None = None,
               chunk: int = CHUNK, fused: bool | None = None, pad_to: int | None = None) -> torch.Tensor:
    """-log softmax(h weight^T)[y] with column `exclude` at probability 0: (N, D), (V, D), (N,) -> (N,) float32
    (float64 for float64 inputs).

    The same values and gradients as `(h @ weight.T).float()`, the excluded column set to log 0, `log_softmax`,
    gather, in O(chunk) memory (module docstring). chunk: logits per chunk (rows x V). fused: compile the per-chunk
    passes (default: on CUDA). pad_to: compute over W with zero rows up to a multiple of this, the extra columns at
    probability 0 (the same values; aligned GEMMs; default: 64 on CUDA, 1 elsewhere). A y equal to `exclude` is a
    row of probability 0 (NLL about 1e6)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or y.shape != h.shape[:1]:
        raise ValueError(f"linear_nll: shapes h {tuple(h.shape)}, weight {tuple(weight.shape)}, y {tuple(y.shape)} "
                         "must be (N, D), (V, D), (N,)")
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(h.dtype,
                                                                                                      weight.dtype)
    fused = dev == "cuda" if fused is None else fused
    pad_to = (64 if dev == "cuda" else 1) if pad_to is None else pad_to
    if pad_to < 1:
        raise ValueError(f"linear_nll: pad_to={pad_to} must be >= 1")
    with torch.autocast(dev, enabled=False):
        return _LinearNLL.apply(h, weight, y, exclude, chunk, fused, dtype, pad_to)
