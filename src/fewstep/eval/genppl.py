"""Generative perplexity: how likely a judge causal LM finds decoded samples.

Protocol of MDLM (Sahoo et al. 2024, `diffusion.py::compute_generative_perplexity`), as in Duo and IDLM:
  1. split each sample at the generator's EOS into documents and decode each to text (done by the caller,
     `documents`); a judge that reads the generator's own tokenizer gets the documents' ids as generated;
  2. retokenize each document with the judge's tokenizer and join a sample's documents with the judge's EOS
     (prepend the judge's BOS if it uses one). MDLM gets this implicitly: its HF GPT-2 tokenizer parses a decoded
     "<|endoftext|>" back into the special token. Decoding a separator as text would not work here: tiktoken's
     plain encoding reads it as 7 ordinary tokens, the byte tokenizer drops it (documents run together), and a
     SmolLM2 generator's <|im_end|> is not SmolLM2's document separator <|endoftext|>. Nor is a decode/encode
     round trip exact: bytes that are not valid UTF-8 come back as the 3 bytes of U+FFFD;
  3. truncate to the judge's context `max_len` (MDLM: `truncation=True, max_length=model.length`);
  4. next-token NLL from the judge, log-softmax in float32 (or float64);
  5. weights: every non-EOS token plus the FIRST EOS of the text; later EOS tokens and padding weigh 0;
  6. gen PPL = exp(sum(nll * w) / sum(w)) over ALL samples (corpus-level, token-weighted). Never the mean of
     per-batch perplexities: that was the bug fixed in MDLM PR #4, and it depends on the batch size.

Truncation, not chunking: a chunk scored without the text before it has a context-free start, which inflates
PPL and makes the number depend on the chunk size; MDLM truncates (samples of 1024 GPT-2 tokens fit
gpt2-large's 1024 context nearly always). `n_truncated` in the result says how often it happened.

One deliberate difference from MDLM: there, a text with no EOS of its own gets its first padding EOS counted
when a longer text shares its batch, so the number depends on batching. Here padding never counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.config import FewstepError
from fewstep.eval.judge import Judge, module_device
from fewstep.models import evaluating

PROTOCOL = 2  # 1: each sample decoded as one text (EOS dropped or spelt out); 2: documents (docs/evaluation.md)
Doc = str | list[int]  # a document's text, or its ids in the judge's own vocabulary
Sample = str | Sequence[Doc]  # one text, or a sample's documents (`documents`)


def documents(ids: Sequence[int], tokenizer, judge: Judge | None = None) -> list[Doc]:
    """A sample's documents: its ids split at the generator's EOS (empty parts kept, so the judge sees every
    separator: 'a EOS EOS b' -> ['a', '', 'b']), each decoded, or kept as ids when `judge` reads this tokenizer."""
    keep = judge is not None and judge.tokenizer is not None and judge.tokenizer == getattr(tokenizer, "name", None)
    docs, cur = [], []
    for i in [*ids, tokenizer.eos_id]:
        if i == tokenizer.eos_id:
            docs.append(cur if keep else tokenizer.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def _retokenize(samples: Sequence[Sample], judge: Judge) -> tuple[list[list[int]], int]:
    """Judge token ids per sample (documents joined with the judge's EOS), BOS prepended and truncated to
    judge.max_len; also how many were cut."""
    docs = [[t] if isinstance(t, str) else list(t) for t in samples]
    strs = [d for ds in docs for d in ds if isinstance(d, str)]
    texts = iter(judge.encode(strs) if strs else [])  # one call: the judge's batch encoder
    seqs, n_cut = [], 0
    for ds in docs:
        ids = [judge.bos_id] if judge.bos_id is not None else []
        for j, d in enumerate(ds):
            ids += ([judge.eos_id] if j else []) + list(next(texts) if isinstance(d, str) else d)
        if len(ids) > judge.max_len:
            n_cut += 1
            ids = ids[: judge.max_len]
        seqs.append(ids)
    return seqs, n_cut


def token_weights(x: torch.Tensor, lengths: torch.Tensor, eos_id: int, start: int) -> torch.Tensor:
    """Weights of the targets x[:, 1:] (MDLM step 5).

    x: (B, L) judge ids, right-padded; lengths: (B,) real lengths (with BOS); start: 1 if a BOS was prepended.
    A prepended BOS equal to EOS (GPT-2's <|endoftext|>) must not count as the text's first EOS: `start`.
    Returns float (B, L-1).
    """
    pos = torch.arange(x.shape[1], device=x.device)  # (L,)
    text = (pos[None, :] >= start) & (pos[None, :] < lengths[:, None])  # (B, L) real text tokens
    is_eos = (x == eos_id) & text
    first_eos = is_eos & (is_eos.long().cumsum(-1) == 1)
    w = text & ((x != eos_id) | first_eos)
    return w[:, 1:].float()


@torch.no_grad()
def score_texts(
    texts: Sequence[Sample],
    judge: Judge,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Per-sample summed NLL (nats, float64 (N,)) and weighted token counts (N,) under the judge.

    Also returns n_truncated. Samples are scored in batches of `batch_size` padded with EOS to the batch's
    longest; the sums do not depend on the batching.
    """
    if dtype not in (torch.float32, torch.float64):
        raise FewstepError(f"gen PPL is scored in float32 or float64, not {dtype}")
    if device is None:  # the module's current device: an in-process model may have moved since wrapping
        device = module_device(judge.model) if isinstance(judge.model, nn.Module) else judge.device
    device = torch.device(device)
    seqs, n_cut = _retokenize(texts, judge)
    start = 1 if judge.bos_id is not None else 0
    nll_sum = torch.zeros(len(seqs), dtype=torch.float64)
    n_tok = torch.zeros(len(seqs), dtype=torch.float64)
    model = judge.model
    # dropout off; restored after, so an in-process model keeps training afterwards
    with evaluating(*[model] if isinstance(model, nn.Module) else []):
        for b0 in range(0, len(seqs), batch_size):
            batch = seqs[b0 : b0 + batch_size]
            lengths = torch.tensor([len(s) for s in batch])  # (B,)
            L = int(lengths.max()) if len(batch) else 0
            if L < 2:
                continue  # nothing to predict: every sequence has at most one token
            x = torch.full((len(batch), L), judge.eos_id, dtype=torch.long)  # (B, L), EOS padding as in MDLM
            for i, s in enumerate(batch):
                x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            x = x.to(device)
            out = model(x)
            logits = getattr(out, "logits", out)  # (B, L, V)
            logp = F.log_softmax(logits[:, :-1].to(dtype), dim=-1)  # (B, L-1, V)
            nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, L-1)
            w = token_weights(x, lengths.to(device), judge.eos_id, start).to(dtype)  # (B, L-1)
            nll_sum[b0 : b0 + len(batch)] = (nll * w).sum(-1).double().cpu()
            n_tok[b0 : b0 + len(batch)] = w.sum(-1).double().cpu()
    return {"nll_sum": nll_sum, "n_tokens": n_tok, "n_truncated": n_cut}


def generative_perplexity(
    texts: Sequence[Sample],
    judge: Judge,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Corpus-level, token-weighted generative perplexity of `texts` under `judge` (protocol: module doc).

    Returns {"gen_ppl", "nll" (mean nats per counted token), "nll_se", "n_tokens", "n_samples", "n_truncated",
    "judge"}. nll_se: the standard error of nll = log(gen PPL) over the samples (`ratio_se`), so
    gen PPL x exp(+-1.96 nll_se) is an approximate 95% interval for the sampler's expected gen PPL.
    """
    s = score_texts(texts, judge, batch_size=batch_size, device=device, dtype=dtype)
    total_w = float(s["n_tokens"].sum())
    if total_w == 0:
        raise FewstepError("gen PPL: no tokens to score (every sample is empty or a single judge token)")
    nll = float(s["nll_sum"].sum()) / total_w
    return {
        "gen_ppl": math.exp(nll),
        "nll": nll,
        "nll_se": ratio_se(s["nll_sum"], s["n_tokens"]),
        "n_tokens": int(total_w),
        "n_samples": len(texts),
        "n_truncated": s["n_truncated"],
        "judge": judge.name,
    }


def ratio_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of the ratio estimator R = sum(a) / sum(b) over n i.i.d. samples (a_i, b_i), by the delta
    method: SE(R)^2 = n / (n - 1) * sum_i (a_i - R b_i)^2 / (sum_i b_i)^2. For gen PPL, a_i is sample i's summed NLL
    and b_i its token count, so R is the corpus-level NLL per token. NaN for fewer than two samples."""
    a, b = a.double(), b.double()
    n = a.numel()
    if n < 2 or float(b.sum()) == 0:
        return float("nan")
    r = a.sum() / b.sum()
    return float(((a - r * b).pow(2).sum() * n / (n - 1)).sqrt() / b.sum())


def z_gap(a: dict | None, b: dict | None) -> float | None:
    """(log gen PPL of b - log gen PPL of a) in standard errors of that difference, the two rows' samples taken as
    independent (conservative when they share a sampling seed): > 2 means a is lower beyond the sampling noise.
    None without both standard errors (rows written before they were recorded)."""
    se = [r.get("gen_ppl_log_se") if r else None for r in (a, b)]
    if None in se or any(math.isnan(x) for x in se) or not (a.get("gen_ppl") and b.get("gen_ppl")):
        return None
    return (math.log(b["gen_ppl"]) - math.log(a["gen_ppl"])) / max(math.hypot(*se), 1e-12)
