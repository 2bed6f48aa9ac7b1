"""Corpus builder: documents -> a held-out split -> flat token files, written atomically.

A data dir holds ``train.bin`` and ``val.bin`` (flat uint16/uint32 token ids, EOS after every document),
``meta.json`` (tokenizer, counts, sources and licences) and ``SOURCES.md`` (the same, for people).

Sources and the corpus spec (``default+notes.txt``, ``hf:<name>``, ...) are read by :mod:`fewstep.data.sources`.

The split is over documents, not tokens, so no validation document is ever seen in training; exact duplicate
documents of local sources are dropped first so a copy cannot land on both sides.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewstep import __version__
from fewstep.config import DataConfig, FewstepError
from fewstep.data.sources import MIN_DOC_CHARS, SOURCE_FORMS, Source, read_sources  # noqa: F401 (re-exported)
from fewstep.data.stream import load_meta, write_tokens
from fewstep.data.tokenizers import Tokenizer, get_tokenizer

FORMAT = 1
SPLIT_SEED = 20240601  # fixed: the split depends only on the documents and val_fraction
BATCH_DOCS = 1024  # documents per tokenizer call (bounded memory for large corpora)
PROGRESS_MIN_DOCS = 5000  # show a progress bar only for corpora that take noticeable time


# ------------------------------------------------------------------------------------------- split + write


def split_indices(n_docs: int, val_fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle of document indices -> (train, val); >= 1 document on each side when n_docs >= 2.

    Both splits keep the shuffled order, so any prefix (a ``unique_tokens`` budget, ``max_batches`` of eval)
    is a random sample of documents rather than, say, only the first source.
    """
    perm = np.random.default_rng(seed).permutation(n_docs)
    n_val = 0 if val_fraction <= 0 or n_docs < 2 else min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    return perm[n_val:], perm[:n_val]


def _batches(idx: np.ndarray, sources: list[Source], desc: str) -> Iterator[list[str]]:
    """Documents ``idx`` (global indices over all sources) in batches; counts what each source contributes."""
    offsets = np.cumsum([0] + [len(s.docs) for s in sources])  # global index -> (source, local index)
    quiet = True if offsets[-1] < PROGRESS_MIN_DOCS else None  # None: a bar only when stderr is a terminal
    with tqdm(total=len(idx), desc=f"tokenize {desc}", unit="doc", disable=quiet) as bar:
        for start in range(0, len(idx), BATCH_DOCS):
            chunk = idx[start : start + BATCH_DOCS]
            owner = np.searchsorted(offsets, chunk, side="right") - 1
            texts = []
            for i, k in zip(chunk.tolist(), owner.tolist(), strict=True):
                src = sources[k]
                text = src.docs[i - offsets[k]]
                if isinstance(text, str) and text.strip():  # lazily read datasets may hold empty or null rows
                    texts.append(text)
                    src.n_docs, src.n_chars = src.n_docs + 1, src.n_chars + len(text)
            yield texts
            bar.update(len(chunk))


def _sources_md(meta: dict) -> str:
    rows = "".join(
        f"| {s['name']} | {s['n_docs']:,} | {s['n_chars']:,} | {s['licence']} | {s['package'] or '-'} "
        f"| {s['url']} |\n"
        for s in meta["sources"]
    )
    return (
        f"# Sources of this data dir\n\ncorpus `{meta['corpus']}`, tokenizer `{meta['tokenizer']}` "
        f"(vocab {meta['vocab_size']}, EOS {meta['eos_id']}), val_fraction {meta['val_fraction']}, "
        f"tokens train {meta['n_tokens']['train']:,} / val {meta['n_tokens']['val']:,}.\n\n"
        "| source | documents | characters | licence | package | url |\n|---|---|---|---|---|---|\n"
        f"{rows}\n"
        "Anything derived from these files (token files, samples, models) inherits the sources' licence "
        "terms: credit each source, and keep share-alike terms (CC BY-SA) where they apply.\n"
    )


def _write(out: Path, cfg: DataConfig, tok: Tokenizer, sources: list[Source]) -> dict:
    """Split, tokenize and write every file of a data dir into ``out``; returns the meta dict."""
    train_idx, val_idx = split_indices(sum(len(s.docs) for s in sources), cfg.val_fraction)
    idx = {"train": train_idx, "val": val_idx}
    n_tokens, n_docs = {}, {}
    for split in ("train", "val"):
        before = sum(s.n_docs for s in sources)
        n_tokens[split], dtype = write_tokens(out / f"{split}.bin", _batches(idx[split], sources, split), tok)
        n_docs[split] = sum(s.n_docs for s in sources) - before
    meta = dict(format=FORMAT, fewstep_version=__version__, corpus=cfg.corpus, tokenizer=cfg.tokenizer,
                vocab_size=tok.vocab_size, eos_id=tok.eos_id, dtype=dtype.name, val_fraction=cfg.val_fraction,
                split_seed=SPLIT_SEED, n_tokens=n_tokens, n_docs=n_docs, sources=[s.meta() for s in sources])
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (out / "SOURCES.md").write_text(_sources_md(meta), encoding="utf-8")
    return meta


# ------------------------------------------------------------------------------------------------- public


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FewstepError(f"data dir {target} exists and is not a directory: pick another data.dir")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise FewstepError(f"data dir {target} already exists: pass --force to `fewstep data` to rebuild "
                               "it, or pick another data.dir")
        if not (target / "meta.json").is_file():  # never replace a folder we did not create
            raise FewstepError(f"{target} is not a fewstep data dir (no meta.json): refusing to replace it")


def build(cfg: DataConfig, *, force: bool = False) -> dict:
    """Build ``cfg.dir`` from ``cfg.corpus`` with ``cfg.tokenizer``; returns the meta dict.

    Everything is checked before anything is written, and the files are written into a temporary dir next to
    the target that replaces it only at the end: a failed or interrupted build leaves an existing dir as it
    was. With several processes (DDP), call this on one rank and wait at a barrier.
    """
    if not 0 <= cfg.val_fraction < 1:
        raise FewstepError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    target = Path(cfg.dir).expanduser()
    _check_target(target, force)
    tok = get_tokenizer(cfg.tokenizer)
    sources = read_sources(cfg.corpus)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"  # unique per build; mkdir (unlike mkdtemp) honours umask
    tmp, old = target.parent / f".{target.name}.tmp-{tag}", target.parent / f".{target.name}.old-{tag}"
    tmp.mkdir()
    try:
        meta = _write(tmp, cfg, tok, sources)
        if target.exists():
            os.replace(target, old)  # rename the old dir aside, then the new one into place
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return meta


def ensure(cfg: DataConfig) -> dict:
    """Build ``cfg.dir`` if it has no meta.json yet, else check it matches ``cfg`` and return its meta."""
    if not (Path(cfg.dir).expanduser() / "meta.json").is_file():
        return build(cfg)
    meta = load_meta(cfg.dir)
    want = {"corpus": cfg.corpus, "tokenizer": cfg.tokenizer, "val_fraction": cfg.val_fraction}
    diff = [f"{k}={meta.get(k)!r} (config: {v!r})" for k, v in want.items() if meta.get(k) != v]
    if diff:
        raise FewstepError(f"data dir {cfg.dir} was built with {', '.join(diff)}: pick another data.dir or "
                           "rebuild it with `fewstep data --force`")
    return meta
