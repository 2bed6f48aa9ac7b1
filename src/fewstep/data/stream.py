"""The on-disk token stream of a data dir, and fixed-length blocks from it with exact, stateless epochs.

``<split>.bin`` is a flat array of token ids (uint16 when the vocabulary fits, else uint32), EOS after every
document, described by ``meta.json``. :func:`write_tokens` writes one; :class:`TokenBlocks` reads one.

The split file is cut into N = n_tokens // L non-overlapping blocks (no padding, no overlap). Training draws
blocks by a global sample index i = (step * world + rank) * B + j: epoch e = i // N and block perm_e[i % N],
where perm_e is a seeded permutation of the N blocks. So

* every block is seen exactly once per epoch (the repeated-data regime: ``unique_tokens`` x ``epochs``),
* a batch is a pure function of (step, rank, world, seed): resuming from a checkpoint needs only the step,
* ranks read disjoint samples without a sampler object or any loader state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from fewstep.config import FewstepError
from fewstep.data.tokenizers import Tokenizer, encode_batch


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 whenever the ids fit (GPT-2's 50257 do): half the disk and page cache of uint32."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def write_tokens(path: Path, batches: Iterable[list[str]], tok: Tokenizer) -> tuple[int, np.dtype]:
    """Tokenize batches of documents into a flat token file, EOS after each; returns (n_tokens, dtype)."""
    dtype, n_tokens = token_dtype(tok.vocab_size), 0
    with open(path, "wb") as f:
        for texts in batches:
            flat: list[int] = []
            for ids in encode_batch(tok, texts):
                flat += ids
                flat.append(tok.eos_id)  # the document boundary the models see
            arr = np.asarray(flat, dtype=dtype)  # numpy raises OverflowError rather than wrapping an id
            arr.tofile(f)
            n_tokens += arr.size
    return n_tokens, dtype


def check_tokens(dir: str | os.PathLike, data_meta: dict, dir_meta: dict | None = None) -> None:
    """One line when the data dir's tokens are not the model's (a checkpoint's meta["data"]): another tokenizer or
    vocabulary would index the embedding with foreign ids, or silently score the wrong text."""
    dm = dir_meta or load_meta(dir)
    for key in ("tokenizer", "vocab_size", "eos_id"):
        if key in data_meta and dm.get(key) != data_meta[key]:
            raise FewstepError(f"data dir {dir} has {key}={dm.get(key)!r} but the model was trained with "
                               f"{data_meta[key]!r}: give a data dir built with tokenizer "
                               f"{data_meta.get('tokenizer')!r} by this version (fewstep data --force)")


def load_meta(dir: str | os.PathLike) -> dict:
    """The ``meta.json`` of a built data dir."""
    path = Path(dir).expanduser() / "meta.json"
    if not path.is_file():
        raise FewstepError(f"data dir {dir} has no meta.json: run `fewstep data` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FewstepError(f"{path} is unreadable ({e}): rebuild it with `fewstep data --force`") from None


class TokenBlocks:
    """Blocks of ``seq_len`` tokens from ``<dir>/<split>.bin`` (memory-mapped, so any corpus size works).

    ``unique_tokens > 0`` keeps only the first ``unique_tokens`` tokens of the split (the unique-data budget;
    the builder wrote documents in shuffled order, so a prefix is a random sample of documents).
    """

    def __init__(self, dir: str | os.PathLike, split: str, seq_len: int, unique_tokens: int = 0):
        if split not in ("train", "val"):
            raise FewstepError(f"unknown split '{split}': use 'train' or 'val'")
        if seq_len < 1 or unique_tokens < 0:
            raise FewstepError(f"need seq_len >= 1 and unique_tokens >= 0, got {seq_len} and {unique_tokens}")
        self.meta = load_meta(dir)
        self.split, self.seq_len = split, seq_len
        path = Path(dir).expanduser() / f"{split}.bin"
        if not path.is_file():
            raise FewstepError(f"{path} is missing: rebuild the data dir with `fewstep data --force`")
        dtype = np.dtype(self.meta["dtype"])
        available = path.stat().st_size // dtype.itemsize
        if unique_tokens > available:
            raise FewstepError(
                f"data.unique_tokens={unique_tokens:,} but the {split} split of {dir} has only "
                f"{available:,} tokens: lower it or use a bigger corpus"
            )
        used = unique_tokens or available
        self._n = used // seq_len
        if self._n == 0:
            raise FewstepError(
                f"the {split} split of {dir} has {used:,} tokens, fewer than one block of "
                f"seq_len={seq_len}: corpus too small for this seq_len"
                + (" (or rebuild it with data.val_fraction > 0: validation needs held-out blocks)"
                   if split == "val" else "")
            )
        # (N, L) read-only view on disk; indexing it with an array of block ids copies just those rows
        self._blocks = np.memmap(path, dtype=dtype, mode="r", shape=(self._n, seq_len))
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def n_blocks(self) -> int:
        """N, the number of samples in one epoch."""
        return self._n

    @property
    def n_tokens(self) -> int:
        """N * L: the unique tokens actually used (the ragged tail shorter than a block is dropped)."""
        return self._n * self.seq_len

    def __len__(self) -> int:
        return self._n

    def permutation(self, epoch: int, seed: int = 0) -> np.ndarray:
        """perm_e: the order of the N blocks in epoch ``epoch``, from PCG64 seeded with (seed, epoch)."""
        key = (seed, epoch)
        if key not in self._perms:
            if len(self._perms) >= 2:  # a batch touches at most two epochs: keep the current and next only
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(self._n)
        return self._perms[key]

    def block_ids(
        self, step: int, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0
    ) -> np.ndarray:
        """Block indices of one batch (B,): ``batch`` without reading tokens (for tests and bookkeeping)."""
        if not 0 <= rank < world or step < 0 or batch_size < 1:
            raise ValueError(f"bad step/batch/rank/world: {step}, {batch_size}, {rank}, {world}")
        i = (step * world + rank) * batch_size + np.arange(batch_size, dtype=np.int64)  # (B,) global samples
        epoch, pos = i // self._n, i % self._n
        out = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epoch).tolist():  # one or two epochs per batch
            sel = epoch == e
            out[sel] = self.permutation(e, seed)[pos[sel]]
        return out

    def batch(
        self, step: int, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0
    ) -> torch.Tensor:
        """Training batch (B, L) int64 for this micro-step and rank; a pure function of its arguments."""
        ids = self.block_ids(step, batch_size, rank=rank, world=world, seed=seed)
        return torch.from_numpy(self._blocks[ids].astype(np.int64))  # (B, L)

    def iter_eval(
        self, batch_size: int, max_batches: int | None = None, *, rank: int = 0, world: int = 1
    ) -> Iterator[torch.Tensor]:
        """Validation batches (<= B, L) of consecutive blocks, in order; rank r takes blocks r, r+world, ...

        Deterministic and without shuffling, so every evaluation of a run scores the same tokens. The last
        batch may be smaller than ``batch_size``.
        """
        ids = np.arange(rank, self._n, world)
        for b, start in enumerate(range(0, len(ids), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield torch.from_numpy(self._blocks[ids[start : start + batch_size]].astype(np.int64))  # (b, L)
