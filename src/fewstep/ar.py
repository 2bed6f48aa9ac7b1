"""Autoregressive baseline: next-token loss, exact validation NLL and KV-cached sampling.

Sequences are packed blocks of documents joined with EOS, so generation starts from EOS (the document boundary).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewstep.diffusion.sampling import autocast, filter_probs, sample_categorical
from fewstep.models import rope_tables
from fewstep.models.inference import capture
from fewstep.models.transformer import KVCache, Transformer


def ar_nll(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per sequence in nats. x: (B, L) -> (B,); L - 1 tokens are predicted.

    A Transformer computes it through its chunked head (`forward(..., targets=)`); any other model from its logits."""
    if isinstance(getattr(model, "_orig_mod", model), Transformer):  # _orig_mod: under a torch.compile wrapper
        return model(x[:, :-1], targets=x[:, 1:]).sum(-1)
    logits = model(x[:, :-1]).float()  # (B, L-1, V)
    # Rows of V contiguous classes: the (B, V, L-1) transposed layout makes the kernel read with stride V.
    nll = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")  # (B (L-1),)
    return nll.view(x.shape[0], -1).sum(-1)


class ARObjective:
    """AR pre-training as a `step()` for the one training loop."""

    def __init__(self, model: nn.Module):
        self.model = model

    def trainable(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def step(self, x: torch.Tensor, step: int):
        loss = ar_nll(self.model, x).mean() / (x.shape[1] - 1)  # nats/token
        return {"model": loss}, {"nll": loss.detach()}

    @torch.no_grad()
    def validate(self, x: torch.Tensor, generator: torch.Generator) -> dict:
        nll = ar_nll(self.model, x)  # (B,)
        return {"nats": nll.sum().item(), "tokens": x.shape[0] * (x.shape[1] - 1), "seq_nats": nll.double().cpu()}


@torch.no_grad()
def ar_sample(
    model: nn.Module,
    *,
    batch: int,
    length: int,
    bos_id: int,
    prompt: torch.Tensor | None = None,
    kv_cache: bool = True,
    cuda_graph: bool | None = None,
    compile: bool | str | Callable = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Generate `length` tokens after a prompt (default: one BOS/EOS token). Returns (B, length) new tokens.

    With kv_cache the prompt is prefilled once and each new token costs one single-position forward pass;
    without it every step re-runs the whole prefix (the reference the cached path is tested against).
    cuda_graph (default: on CUDA with kv_cache) and compile switch the decode step to the static cache
    (models/transformer.py, KVCache): `decode_step`, whose inputs are tensors only. The static cache's buffers are
    kept per model and shape and reused by every later generation of that shape; cuda_graph captures the step once
    per model and shape (not inside every timed generation) and replays it per token; compile (True:
    torch.compile's default backend, or a backend name or callable) runs it compiled: compiled when a shape first
    appears, then reused without recompiling by every later generation of that shape (tests/test_ar.py counts
    the compilations). The float64 draw stays outside the graph.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = prompt.to(device) if prompt is not None else torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    if cuda_graph is None:
        cuda_graph = kv_cache and device.type == "cuda"
    if (cuda_graph or compile) and not kv_cache:
        raise ValueError("cuda_graph and compile need kv_cache=True")
    decode = cache = None
    if kv_cache and (cuda_graph or compile):  # static cache: buffers (and graph) kept per shape across generations
        step = _compiled_step(compile) if compile else decode_step
        key = (x.shape[0], x.shape[1] + length, str(device), precision, step, bool(cuda_graph))
        entry = _STATIC.setdefault(model, {}).get(key)
        if entry is None:
            new = model.new_cache(x.shape[0], x.shape[1] + length, device)
            entry = _STATIC[model][key] = {"k": new.k, "v": new.v, "state": {}}
        cache = KVCache(entry["k"], entry["v"])  # dynamic mode for the prefill; stale later positions are masked
        decode = _static_decode(model, cache, step, precision, cuda_graph=cuda_graph, warmup=2 if compile else 1,
                                state=entry["state"])
    elif kv_cache:
        cache = model.new_cache(x.shape[0], x.shape[1] + length, device)

    def forward(inp):
        with autocast(device, precision):
            return model(inp, cache=cache)[:, -1] if cache is not None else model(inp)[:, -1]  # (B, V)

    out = []
    logits = forward(x)  # prefill (or the whole prefix without a cache)
    for i in range(length):
        log_p = logits.float().log_softmax(-1)  # (B, V)
        nxt = sample_categorical(filter_probs(log_p, temperature, top_p), generator)  # (B,)
        out.append(nxt)
        if i == length - 1:
            break
        if cache is None:  # without a cache every step re-reads the whole prefix
            x = torch.cat([x, nxt[:, None]], dim=1)
            logits = forward(x)
        else:
            logits = decode(nxt) if decode is not None else forward(nxt[:, None])
    return torch.stack(out, dim=1)


def decode_step(model: nn.Module, tok: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
                pos_t: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Logits (B, V) after token tok (B, 1) at position pos_t ((1,) long) of a static KV cache: k, v hold one
    (B, H, L_max, Dh) buffer per layer, written in place at pos_t; attention sees the positions <= pos_t.

    The cache object is built here from the tensors, so a compiled step guards on the tensors' shapes and dtypes
    only, not on a KVCache that every generation creates anew (which made dynamo recompile per generation).
    """
    with autocast(tok.device, precision):
        return model(tok, cache=KVCache(k, v, pos_t))[:, -1]


_COMPILED: dict = {}  # backend -> torch.compile(decode_step); the compiled graphs live in dynamo's cache


def _compiled_step(backend: bool | str | Callable) -> Callable:
    backend = "inductor" if backend is True else backend
    if backend not in _COMPILED:  # fullgraph: a graph break in the step is an error, not a slow split step
        _COMPILED[backend] = torch.compile(decode_step, backend=backend, fullgraph=True)
    return _COMPILED[backend]


_STATIC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {shape key: static cache entry}


def _static_decode(model, cache, step, precision: str, *, cuda_graph: bool, warmup: int = 1,
                   state: dict | None = None):
    """decode(token (B,)) -> logits (B, V) of the next position: `step` on the static cache, replayed from a
    CUDA graph with cuda_graph.

    Switched to static mode after the prefill has run (first call): the step writes K/V at cache.pos_t, which is
    advanced in place after each step. With cuda_graph the returned logits live in the graph's output buffer until
    the next call. `state` (the token and position buffers, the graph) persists across generations of one shape
    over the same K/V buffers: the graph is captured once, not inside every timed generation.
    """
    state = {} if state is None else state
    started = []

    def run(tok: torch.Tensor) -> torch.Tensor:  # tok: (B, 1)
        return step(model, tok, cache.k, cache.v, cache.pos_t, precision)

    def decode(tok: torch.Tensor) -> torch.Tensor:
        if not started:
            started.append(True)
            if "pos_t" not in state:
                state["pos_t"], state["tok"] = torch.zeros(1, dtype=torch.long, device=tok.device), tok[:, None].clone()
            cache.pos_t = state["pos_t"]
            cache.pos_t.fill_(cache.pos)  # the first position after this generation's prefill
            if cuda_graph and "graph" not in state:  # the warm-up writes K/V at pos_t too: the replay rewrites it
                state["graph"], state["out"] = capture(run, state["tok"], warmup=warmup)
                state["rope"] = rope_tables(model)  # the tables the graph reads, kept alive
        else:
            cache.pos_t.add_(1)
        state["tok"].copy_(tok[:, None])
        if not cuda_graph:
            return run(state["tok"])
        state["graph"].replay()
        return state["out"]

    return decode
