"""Model construction from a `ModelConfig` and a tokenizer vocabulary."""

from __future__ import annotations

import contextlib
import dataclasses

import torch.nn as nn

from fewstep.models.transformer import Transformer

KINDS = ("mdlm", "uniform", "ar")


@contextlib.contextmanager
def evaluating(*modules: nn.Module):
    """Eval mode (no dropout) inside, each module's own mode restored after: a model's samples follow its sampling law,
    and a target or a measurement computed by a trainable model is a function of its weights alone."""
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)


def rope_tables(module: nn.Module) -> list:
    """Every Transformer's RoPE tables inside `module`, built now on its device (`Transformer.rope_tables`): call
    before compiling or capturing it."""
    return [m.rope_tables() for m in module.modules() if isinstance(m, Transformer)]


def build_model(cfg, vocab_size: int) -> nn.Module:
    """A masked denoiser (vocab + 1 mask token), a uniform-state denoiser (always time-conditioned) or a causal LM."""
    from fewstep.config import FewstepError
    from fewstep.diffusion.mdlm import MaskedDenoiser
    from fewstep.diffusion.uniform import UniformDenoiser

    if cfg.kind not in KINDS:
        raise FewstepError(f"unknown model.kind '{cfg.kind}' (known: {', '.join(KINDS)})")
    causal = cfg.kind == "ar"
    n_vocab = vocab_size + (1 if cfg.kind == "mdlm" else 0)
    backbone = Transformer(
        n_vocab, cfg.seq_len, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.mlp_ratio,
        causal=causal, time_cond=(cfg.time_cond or cfg.kind == "uniform") and not causal, dropout=cfg.dropout,
    )
    if cfg.kind == "uniform":
        return UniformDenoiser(backbone)
    if cfg.kind == "mdlm":
        return MaskedDenoiser(backbone, mask_id=vocab_size)
    return backbone


def model_spec(cfg, vocab_size: int) -> dict:
    """What a checkpoint records to rebuild the module: the model config plus the tokenizer vocabulary size."""
    return {**dataclasses.asdict(cfg), "vocab_size": vocab_size}
