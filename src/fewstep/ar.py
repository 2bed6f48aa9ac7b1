"""Autoregressive baseline: next-token loss, exact validation NLL and KV-cached sampling.

Sequences are packed blocks of documents joined with EOS, so generation starts from EOS (the document boundary).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewstep.diffusion.sampling import autocast, filter_probs, sample_categorical


def ar_nll(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per sequence in nats. x: (B, L) -> (B,); L - 1 tokens are predicted."""
    logits = model(x[:, :-1]).float()  # (B, L-1, V)
    nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, L-1)
    return nll.sum(-1)


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
    def validate(self, x: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        return {"nats": ar_nll(self.model, x).sum().item(), "tokens": x.shape[0] * (x.shape[1] - 1)}


@torch.no_grad()
def ar_sample(
    model: nn.Module,
    *,
    batch: int,
    length: int,
    bos_id: int,
    prompt: torch.Tensor | None = None,
    kv_cache: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Generate `length` tokens after a prompt (default: one BOS/EOS token). Returns (B, length) new tokens.

    With kv_cache the prompt is prefilled once and each new token costs one single-position forward pass;
    without it every step re-runs the whole prefix (the reference the cached path is tested against).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = prompt.to(device) if prompt is not None else torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    cache = model.new_cache(x.shape[0], x.shape[1] + length, device) if kv_cache else None
    out = []
    step_in = x
    for _ in range(length):
        with autocast(device, precision):
            logits = model(step_in, cache=cache) if cache is not None else model(x)
        log_p = logits[:, -1].float().log_softmax(-1)  # (B, V)
        nxt = sample_categorical(filter_probs(log_p, temperature, top_p), generator)  # (B,)
        out.append(nxt)
        x = torch.cat([x, nxt[:, None]], dim=1)
        step_in = nxt[:, None]
    return torch.stack(out, dim=1)
