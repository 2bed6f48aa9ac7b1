"""Unigram entropy of generated samples (Duo, Sahoo et al. 2025, `metrics.record_entropy`).

For each sample, H = -sum_v p_v log p_v (nats) where p_v is the frequency of token id v among the sample's own
token ids (the generator's tokenizer, not the judge's); the reported number is the mean over samples. It is
reported beside generative perplexity because low-temperature sampling (float32 Gumbel, greedy tails, nucleus)
lowers gen PPL and entropy together: a low gen PPL with a low entropy is repetitive text, not better text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

Ids = torch.Tensor | Sequence[Sequence[int]]


def unigram_entropy(ids: Ids, ignore_ids: Iterable[int] = ()) -> torch.Tensor:
    """Per-sample unigram entropy in nats.

    ids: LongTensor (B, L) or a list of B lists of token ids (lengths may differ).
    ignore_ids: token ids left out of the counts (e.g. padding); nothing is left out by default, as in Duo.
    Returns a float64 tensor (B,); an empty sample has entropy 0.
    """
    if isinstance(ids, torch.Tensor):
        rows = list(ids.unbind(0))  # (L,) each
    else:
        rows = [torch.as_tensor(r, dtype=torch.long) for r in ids]
    ignore = torch.as_tensor(sorted(set(ignore_ids)), dtype=torch.long)
    out = torch.zeros(len(rows), dtype=torch.float64)
    for i, row in enumerate(rows):
        row = row.reshape(-1).cpu()
        if ignore.numel():
            row = row[~torch.isin(row, ignore)]
        if row.numel() == 0:
            continue
        _, counts = torch.unique(row, return_counts=True)  # (n_distinct,)
        p = counts.to(torch.float64) / counts.sum()
        out[i] = torch.special.entr(p).sum()  # entr(p) = -p log p
    return out


def mean_entropy(ids: Ids, ignore_ids: Iterable[int] = ()) -> float:
    """Mean over samples of `unigram_entropy` (nats), the number Duo reports; 0.0 for no samples."""
    h = unigram_entropy(ids, ignore_ids)
    return float(h.mean()) if h.numel() else 0.0
