"""Fast inference for the denoiser call inside `sample`: bf16 weights, optional torch.compile, CUDA graphs.

A few-step sampler is a handful of network calls, so on a GPU its latency is dominated by kernel launches unless
the call is replayed from a CUDA graph: `GraphedDenoiser` captures `model(x_t, t)` once per input shape with
static input buffers and replays it, with the same signature and attributes as the model it wraps, so the one
sampling function runs it unchanged. The output lives in the graph's buffer until the next call (`sample` reads
it within the step). The AR baseline gets the same treatment in `fewstep.ar.ar_sample(cuda_graph=True)`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn

from fewstep.models import rope_tables


def capture(fn, *args, warmup: int = 2):
    """(graph, out): fn(*args) captured in a CUDA graph after `warmup` runs on a side stream (kernel selection,
    compilation); replaying the graph recomputes `out` in place from the current contents of `args`.

    Under an enclosing autocast, the capture runs with autocast's weight cache off: cached bf16 copies of float32
    weights are freed when that autocast block exits, and a replay would read freed memory; uncached, the casts
    are part of the graph."""
    no_cache = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), no_cache:
        for _ in range(warmup):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), no_cache:
        out = fn(*args)
    return graph, out


class GraphedDenoiser:
    """`model(x_t, t, **flags) -> log p(x0 | x_t)` replayed from one CUDA graph per (x_t, t) shape and flags (e.g.
    `hidden=True`, the trunk alone); other methods (`head_log_probs`) run the wrapped model's, eagerly."""

    def __init__(self, model: nn.Module, compile: bool = False):
        self.model = model
        self.fn = torch.compile(model) if compile else model
        self.graphs: dict = {}

    def __getattr__(self, name):  # mask_id, time_conditioned, backbone, ... come from the wrapped model
        return getattr(self.__dict__["model"], name)

    def parameters(self):
        return self.model.parameters()

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **flags) -> torch.Tensor:
        key = (tuple(x_t.shape), tuple(t.shape), tuple(sorted(flags.items())))
        if key not in self.graphs:
            sx, st = x_t.clone(), t.clone()
            graph, out = capture(functools.partial(self.fn, **flags), sx, st)
            # the RoPE tables this graph read stay referenced: a longer input later replaces the model's tables,
            # and the graph would then read freed memory
            self.graphs[key] = (graph, out, sx, st, rope_tables(self.model))
        graph, out, sx, st, _ = self.graphs[key]
        sx.copy_(x_t)
        st.copy_(t)
        graph.replay()
        return out


def for_inference(model: nn.Module, device, *, bf16: bool | None = None, compile: bool = False,
                  cuda_graph: bool | None = None):
    """The model ready for sampling on `device`: eval mode, bf16 weights and a CUDA graph by default on CUDA.

    Casts in place (pass a copy to keep the float32 weights). Returns the model itself, or a GraphedDenoiser.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    model = model.to(device).eval()
    rope_tables(model)  # before compiling or capturing: lazily inside the compiled call it compiled twice
    if bf16 if bf16 is not None else cuda:
        model = model.to(torch.bfloat16)
    if cuda_graph if cuda_graph is not None else cuda:
        if not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        return GraphedDenoiser(model, compile=compile)
    return torch.compile(model) if compile else model
