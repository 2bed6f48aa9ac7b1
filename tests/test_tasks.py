"""Likelihood tasks (multiple choice, cloze): builders, loaders, scoring; the lm-evaluation-harness adapter."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from fewstep.config import FewstepError
from fewstep.data import get_tokenizer
from fewstep.eval.lm_eval import FewstepLM, harness_class
from fewstep.eval.tasks import (
    ClozeItem,
    MCItem,
    cloze_from_documents,
    encode_pair,
    heldout_documents,
    load_cloze,
    load_multiple_choice,
    mc_from_documents,
    run_task,
    score_cloze,
    score_multiple_choice,
)
from test_eval_harness import Unigram, meta_for

BYTE = get_tokenizer("byte")
DOCS = [
    "Alpha centauri is a star system. It is the closest to the Sun, at about four light years.",
    "The river flows north through the valley. Farmers there grow wheat and barley on the banks.",
    "Python is a programming language. Its design emphasises code readability with indentation.",
    "The museum opened in 1901 in the old town. It holds paintings from the Dutch golden age.",
    "Tea is an aromatic beverage. It is prepared by pouring hot water over cured tea leaves.",
    "short one",
]


def byte_unigram(favoured: str, p: float, denoiser: bool) -> Unigram:
    """Bytes: each character of `favoured` has probability p / len(favoured); the rest share 1 - p."""
    probs = torch.full((257,), (1 - p) / (257 - len(favoured)))
    for c in favoured:
        probs[ord(c)] = p / len(favoured)
    return Unigram(probs.tolist(), denoiser=denoiser)


def test_cloze_builder_takes_the_last_word():
    items = cloze_from_documents(DOCS, 10, min_context=20)
    assert len(items) == 5  # "short one" has no long enough context
    by_target = {it.target: it for it in items}
    it = by_target[" banks"]
    assert it.context.endswith("wheat and barley on the") and it.target == " banks"
    assert all(it.target.startswith(" ") and it.target[1:].isalpha() for it in items)
    assert cloze_from_documents(DOCS, 3, seed=1, min_context=20) == cloze_from_documents(DOCS, 3, seed=1,
                                                                                           min_context=20)


def test_mc_builder_true_ending_and_distractors_from_other_documents():
    items = mc_from_documents(DOCS, 10, n_endings=3, min_context=20)
    assert len(items) == 5
    lasts = {d: " " + d.split(". ")[-1] for d in DOCS[:5]}
    for it in items:
        doc = next(d for d in DOCS if d.startswith(it.context))
        assert it.endings[it.label] == lasts[doc] and len(set(it.endings)) == 3
        assert all(e in lasts.values() for e in it.endings)
    assert {it.label for it in items} != {0}  # the answer position is shuffled
    short = mc_from_documents(DOCS, 10, n_endings=2, min_context=20, ending_ok=lambda e: len(e) < 60)
    assert all(len(e) < 60 for it in short for e in it.endings)
    with pytest.raises(FewstepError):
        mc_from_documents(DOCS[:2], 5, n_endings=4, min_context=20)


def test_loaders_read_hellaswag_mmlu_and_lambada_jsonl(tmp_path):
    hs = [{"ctx": "A man", "endings": ["runs.", "sings."], "label": "1"},
          {"ctx_a": "She", "ctx_b": "opens", "endings": ["a door", "a can"], "label": 0, "activity_label": "Home"},
          {"activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a spot.",
           "ctx_b": "you", "endings": ["water them. [title] Water daily.", "dig."], "label": 0}]
    (tmp_path / "hs.jsonl").write_text("\n".join(map(json.dumps, hs)))
    items = load_multiple_choice(str(tmp_path / "hs.jsonl"))
    assert items == [MCItem("A man", [" runs.", " sings."], 1), MCItem("Home: She Opens", [" a door", " a can"], 0),
                     MCItem("Home and Garden: How to grow tomatoes. Pick a spot. You",  # lm-eval's preprocessing
                            [" water them.. Water daily.", " dig."], 0)]
    mmlu = {"question": "2 + 2 = ?", "choices": ["3", "4"], "answer": "B"}
    (tmp_path / "mmlu.jsonl").write_text(json.dumps(mmlu))
    assert load_multiple_choice(str(tmp_path / "mmlu.jsonl")) == [MCItem("2 + 2 = ?\nAnswer:", [" 3", " 4"], 1)]
    (tmp_path / "lam.jsonl").write_text(json.dumps({"text": "he opened the door"}) + "\n\n")
    assert load_cloze(str(tmp_path / "lam.jsonl")) == [ClozeItem("he opened the", " door")]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}))
    for fn, path in [(load_multiple_choice, "bad.jsonl"), (load_cloze, "missing.jsonl")]:
        with pytest.raises((FewstepError, KeyError)):
            fn(str(tmp_path / path))
    for label in ("", None, "E", 2, "x"):  # "" is HellaSwag's test split: an error, never silently choice 0
        (tmp_path / "nolabel.jsonl").write_text(json.dumps({**hs[0], "label": label}))
        with pytest.raises(FewstepError, match="not an answer index below 2"):
            load_multiple_choice(str(tmp_path / "nolabel.jsonl"))


@pytest.mark.parametrize("content, needle", [
    (b'{"text": "a b"}\nnot json\n', "line 2: not valid JSON"),
    (b"\xff\xfe{}", "is not UTF-8"),
    (b"5\n", "line 1: a row must be a JSON object"),
    (b'{"txt": "a b"}', "a row needs a text field 'text'"),
    (b'{"text": 5}', "a row needs a text field 'text'"),
])
def test_bad_cloze_files_are_one_clear_error(tmp_path, content, needle):
    (tmp_path / "t.jsonl").write_bytes(content)
    with pytest.raises(FewstepError, match=needle):
        load_cloze(str(tmp_path / "t.jsonl"))


def test_task_rows_may_hold_raw_line_separators(tmp_path):
    """JSON strings may hold U+2028 raw; the task reader (now the corpora's JSONL reader) splits on newlines only:
    str.splitlines() cut such a row in two and called it not JSON."""
    (tmp_path / "t.jsonl").write_text('{"text": "one\u2028two three"}\n{"text": "four five"}\n', encoding="utf-8")
    items = load_cloze(str(tmp_path / "t.jsonl"))
    assert [i.target for i in items] == [" three", " five"] and items[0].context == "one\u2028two"
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError traceback before
    with pytest.raises(FewstepError, match="line 1: JSON nested too deeply"):
        load_cloze(str(tmp_path / "deep.jsonl"))


@pytest.mark.parametrize("row, needle", [
    ({"endings": ["a", "b"], "label": 0}, "text field 'ctx'"),
    ({"ctx": "c", "endings": "xyzw", "label": 0}, "'endings' as a list of at least 2 strings"),
    ({"ctx": "c", "endings": [1, 2], "label": 0}, "'endings' as a list"),
    ({"question": 3, "choices": ["a", "b"], "answer": 0}, "text field 'question'"),
    ({"ctx_a": "She", "endings": ["a", "b"], "label": 0}, "text field 'ctx_b'"),
])
def test_bad_multiple_choice_rows_are_one_clear_error(tmp_path, row, needle):
    """Wrong schemas raised KeyError/AttributeError; a string of endings was split into one-letter endings."""
    (tmp_path / "m.jsonl").write_text(json.dumps(row))
    with pytest.raises(FewstepError, match=needle):
        load_multiple_choice(str(tmp_path / "m.jsonl"))


def test_heldout_documents_are_the_val_split(pydoc_data):
    docs = heldout_documents(str(pydoc_data), BYTE)
    meta = json.loads((pydoc_data / "meta.json").read_text())
    assert len(docs) == meta["n_docs"]["val"] and all(d.strip() == d and d for d in docs)
    train = (pydoc_data / "train.bin").read_bytes()
    assert all(d[:40].encode() not in train for d in docs)  # held out: never in the training stream


def test_encode_pair_concatenates_to_the_whole():
    gpt2 = get_tokenizer("gpt2")
    ctx, cont = encode_pair(gpt2, "The capital of France is", " Paris")
    assert ctx + cont == gpt2.encode("The capital of France is Paris") and gpt2.decode(cont) == " Paris"
    spaced = encode_pair(gpt2, "The capital of France is ", "Paris")  # lm-eval: the space joins the answer
    assert spaced == (ctx, cont)


@pytest.mark.parametrize("kind", ["ar", "mdlm"])
def test_multiple_choice_acc_and_acc_norm(kind):
    """Unigram model favouring 'a' and ' ': per-character scoring picks the long 'aaaa' ending, the sum picks 'b'."""
    model = byte_unigram("a ", 0.9, denoiser=kind == "mdlm")
    meta = meta_for(kind, 64, eos=256)
    items = [MCItem("ctx", [" " + "a" * 12, " b", " zz"], 0), MCItem("ctx", [" q", " aa"], 1)]
    out = score_multiple_choice(model, meta, BYTE, items, mc=256)
    # item 0: log p(" b") = -0.8 - 7.8 beats 13 * -0.8 for the right ending; per character the 'a's win
    assert out["acc_norm"] == 1.0 and out["acc"] == 0.5 and out["n_items"] == 2
    assert out["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_acc_norm_divides_by_the_ending_without_its_joining_space():
    """lm-eval's acc_norm: log p / len(choice), the choice without the space that joins it to the context. With
    log p = -10 over 10 characters and -10.95 over 11, the second wins (-0.9955 vs -1.0); counting the space made
    the first win (-0.909 vs -0.9125)."""
    import fewstep.eval.likelihood as likelihood

    items = [MCItem("ctx", [" " + "a" * 10, " " + "b" * 11], 1)]
    lp = torch.tensor([-10.0, -10.95], dtype=torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(likelihood, "continuation_logprob", lambda *a, **k: lp)
        out = score_multiple_choice(None, meta_for("ar", 64, eos=256), BYTE, items)
    assert out["acc_norm"] == 1.0 and out["acc"] == 0.0


@pytest.mark.parametrize("kind", ["ar", "mdlm"])
def test_cloze_accuracy_is_greedy_match_and_ppl_is_per_token(kind):
    model = byte_unigram("a", 0.9, denoiser=kind == "mdlm")
    meta = meta_for(kind, 32, eos=256)
    items = [ClozeItem("x", "aaa"), ClozeItem("x", "ab")]  # greedy decoding writes 'a' everywhere
    out = score_cloze(model, meta, BYTE, items, mc=256)
    assert out["acc"] == 0.5 and out["n_items"] == 2
    lp = 3 * math.log(0.9) + math.log(0.9) + math.log(0.1 / 256)
    assert out["ppl"] == pytest.approx(math.exp(-lp / 5), rel=0.05 if kind == "mdlm" else 1e-6)
    assert out["ppl_word"] == pytest.approx(math.exp(-lp / 2), rel=0.1 if kind == "mdlm" else 1e-6)  # per item


def test_run_task_specs(tmp_path):
    model = byte_unigram("a", 0.5, denoiser=False)
    meta = meta_for("ar", 64, eos=256)
    (tmp_path / "lam.jsonl").write_text(json.dumps({"text": "one two three"}))
    row = run_task(f"lambada:{tmp_path / 'lam.jsonl'}", model, meta, BYTE)
    assert row["task"] == "lambada" and row["likelihood"] == "exact" and row["n_items"] == 1
    for bad in ("nope", "lambada:", "hellaswag"):
        with pytest.raises(FewstepError):
            run_task(bad, model, meta, BYTE)


# --------------------------------------------------------------------------- lm-evaluation-harness adapter


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("kind", ["ar", "mdlm"])
def test_adapter_answers_the_three_request_types(kind):
    model = byte_unigram("a ", 0.9, denoiser=kind == "mdlm")
    lm = FewstepLM(model=model, meta=meta_for(kind, 16, eos=256), tokenizer=BYTE, mc=64, stride=5)
    out = lm.loglikelihood([Req("hello", " aa"), Req("", "b")])
    pa, pb = math.log(0.45), math.log(0.1 / 255)  # ' ' and 'a' share 0.9, 255 other bytes the rest
    tol = dict(rel=0.1) if kind == "mdlm" else dict(rel=1e-5)
    assert out[0][0] == pytest.approx(3 * pa, **tol) and out[1][0] == pytest.approx(pb, **tol)
    assert [g for _, g in out] == [False, False]  # ' ' and 'a' tie, argmax picks ' ' (id 32) before 'a'
    text = "a a a a a a a a a a a a"  # 23 characters: rolling scores each exactly once, in chunks of 5
    roll = lm.loglikelihood_rolling([Req(text)])[0]
    assert roll == pytest.approx(len(text) * pa, **tol)
    gen = lm.generate_until([Req("q", {"until": ["\n"], "max_gen_toks": 6}), Req("q", {"until": "  ",
                                                                                     "max_gen_toks": 4})])
    assert gen == ["      ", ""]  # greedy: ' ' every time; the second stops at the first "  "
    sampled = lm.generate_until([Req("q", {"max_gen_toks": 8, "do_sample": True, "temperature": 1.0})])[0]
    assert "a" in sampled and sampled != gen[0]  # sampling (seeded) is not greedy: 'a' shows up
    assert lm.generate_until([Req("q", {"max_gen_toks": 8, "do_sample": True})])[0] == sampled  # T = 1 default
    one, two = lm.loglikelihood([Req("hello", " aa")]), lm.loglikelihood([Req("x", "b"), Req("hello", " aa")])
    assert one[0] == two[1]  # a request's noise is its context's: neither its place nor its batch changes it
    probs = torch.full((257,), 0.1 / 256)
    probs[256] = 0.9  # EOS is the likeliest token: the answer ends there, nothing of the next document follows
    eos_lm = FewstepLM(model=Unigram(probs.tolist(), denoiser=kind == "mdlm"), meta=meta_for(kind, 16, eos=256),
                       tokenizer=BYTE, mc=4)
    assert eos_lm.generate_until([Req("q", {"until": ["\n"], "max_gen_toks": 6})]) == [""]


def test_harness_class_registers_with_lm_eval(monkeypatch):
    """With a stand-in for lm_eval (the real one is an optional install), the adapter subclasses its LM."""
    registry: dict = {}

    class LM:
        def __init__(self):
            self._rank, self._world_size, self.cache_hook = 0, 1, Hook()

    class Hook:
        calls: list = []

        def add_partial(self, kind, args, result):
            self.calls.append((kind, args, result))

    def register_model(name):
        def deco(cls):
            registry[name] = cls
            return cls

        return deco

    mods = {"lm_eval": types.ModuleType("lm_eval"), "lm_eval.api": types.ModuleType("lm_eval.api"),
            "lm_eval.api.model": types.ModuleType("lm_eval.api.model"),
            "lm_eval.api.registry": types.ModuleType("lm_eval.api.registry")}
    mods["lm_eval.api.model"].LM = LM
    mods["lm_eval.api.registry"].register_model = register_model
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    harness_class.cache_clear()
    try:
        cls = harness_class()
        assert registry["fewstep"] is cls and issubclass(cls, LM) and issubclass(cls, FewstepLM)
        lm = cls(model=byte_unigram("a", 0.9, False), meta=meta_for("ar", 16, eos=256), tokenizer=BYTE)
        (lp, _), = lm.loglikelihood([Req("x", " a")])
        assert Hook.calls == [("loglikelihood", ("x", " a"), (lp, False))] and lm._rank == 0
    finally:
        harness_class.cache_clear()
    with pytest.raises(FewstepError):
        FewstepLM()
