"""Zero-shot tasks scored by likelihood: multiple choice (HellaSwag / MMLU format) and last-word cloze (LAMBADA).

Multiple choice: pick the ending with the highest log p(ending | context); `acc` compares sums, `acc_norm`
compares sums divided by the ending's length in characters (as lm-evaluation-harness's acc_norm).
Cloze: LAMBADA's numbers, `acc` (greedy decoding reproduces the target word), `ppl` (perplexity per target
token) and `ppl_word` (per target word: exp of minus the mean log p(target | context) over items, which is
lm-evaluation-harness's LAMBADA perplexity). For a DLM, log p is the NELBO lower bound with the context never
masked (eval/likelihood.py), estimated with `mc` time samples, the endings of one item sharing their noise; for
AR it is exact.

Offline, items are built from held-out documents of our own corpus (the 'val' split, never trained on):
  cloze   the last word of a held-out paragraph (trailing punctuation dropped), the rest as context;
  mc      the last sentence of a held-out paragraph against last sentences of other held-out paragraphs of
          similar length (so length alone does not give the answer away).
Real sets load from JSONL files or, with `pip install datasets`, from the hub: `hellaswag` rows
{ctx, endings, label}, MMLU rows {question, choices, answer}, LAMBADA rows {text}.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.config import FewstepError
from fewstep.data.sources import jsonl_lines


@dataclass
class MCItem:
    context: str
    endings: list[str]  # each starts with its separating space, as in lm-evaluation-harness
    label: int


@dataclass
class ClozeItem:
    context: str
    target: str  # the last word with its leading space


def heldout_documents(data_dir: str, tokenizer, max_docs: int | None = None) -> list[str]:
    """Documents of the held-out split: val.bin decoded and cut at EOS (the builder ends each with EOS)."""
    from fewstep.data import load_meta

    meta = load_meta(data_dir)
    ids = np.fromfile(Path(data_dir).expanduser() / "val.bin", dtype=np.dtype(meta["dtype"]))
    ends = np.flatnonzero(ids == meta["eos_id"])
    docs, start = [], 0
    for end in ends.tolist():
        text = tokenizer.decode(ids[start:end].tolist()).strip()
        start = end + 1
        if text:
            docs.append(text)
        if max_docs and len(docs) >= max_docs:
            break
    return docs


_WORD = re.compile(r"^(.*\S)\s+([A-Za-z][A-Za-z'-]+)[.!?,;:\"')\]]*$", re.S)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def cloze_from_documents(docs: list[str], n: int, *, seed: int = 0, min_context: int = 64) -> list[ClozeItem]:
    """LAMBADA-style items from paragraphs: the final word (3+ letters) is the target."""
    items = []
    for doc in docs:
        m = _WORD.match(doc.strip())
        if m and len(m.group(2)) >= 3 and len(m.group(1)) >= min_context:
            items.append(ClozeItem(m.group(1), " " + m.group(2)))
    random.Random(seed).shuffle(items)
    return items[:n]


def mc_from_documents(docs: list[str], n: int, *, n_endings: int = 4, seed: int = 0, min_context: int = 64,
                      pool: int = 32, ending_ok=None) -> list[MCItem]:
    """HellaSwag-style items: the true last sentence and n_endings - 1 last sentences of other paragraphs.

    ending_ok: optional predicate on an ending (e.g. "fits the model's length in tokens").
    """
    split = []
    for doc in docs:
        parts = _SENTENCE.split(doc.strip())
        if len(parts) >= 2 and len(parts[-1]) >= 20 and (ending_ok is None or ending_ok(" " + parts[-1])):
            ctx = " ".join(parts[:-1])
            if len(ctx) >= min_context:
                split.append((ctx, " " + parts[-1]))
    if len(split) < n_endings:
        raise FewstepError(f"only {len(split)} usable held-out paragraphs for {n_endings}-way multiple choice")
    rng = random.Random(seed)
    order = list(range(len(split)))
    rng.shuffle(order)
    items = []
    for i in order[:n]:
        ctx, true = split[i]
        others = rng.sample([j for j in range(len(split)) if j != i], min(pool, len(split) - 1))
        others.sort(key=lambda j: abs(len(split[j][1]) - len(true)))  # similar length: no length give-away
        endings = [true] + [split[j][1] for j in others[: n_endings - 1]]
        rng.shuffle(endings)
        items.append(MCItem(ctx, endings, endings.index(true)))
    return items


def _rows(source: str, n: int | None) -> list[dict]:
    """JSON lines from a file, or `hf:<dataset>[:config][@split]` through `datasets` (when installed)."""
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError as e:
            raise FewstepError("hf: task sources need `pip install datasets` and a reachable hub") from e
        name, _, split = source[3:].partition("@")
        name, _, config = name.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split or "validation")
        return [dict(ds[i]) for i in range(min(n or len(ds), len(ds)))]
    path = Path(source).expanduser()
    if not path.is_file():
        raise FewstepError(f"task file {source!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FewstepError(f"task file {source!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for i, row in jsonl_lines(text, lambda i: f"task file {source!r} line {i}"):
        if not isinstance(row, dict):
            raise FewstepError(f"task file {source!r} line {i}: a row must be a JSON object, got "
                               f"{json.dumps(row)[:40]!r}")
        rows.append(row)
    return rows[:n] if n else rows


def _text(r: dict, key: str, source: str) -> str:
    if not isinstance(r.get(key), str):
        raise FewstepError(f"{source}: a row needs a text field {key!r} (got {r.get(key)!r:.60})")
    return r[key]


def _texts(r: dict, key: str, source: str) -> list[str]:
    v = r.get(key)
    if not isinstance(v, list) or len(v) < 2 or not all(isinstance(e, str) for e in v):
        raise FewstepError(f"{source}: a row needs {key!r} as a list of at least 2 strings (got {v!r:.60})")
    return v


def _label(label, n: int, source: str) -> int:
    """A row's answer index: an int, its digits, or a letter A-D; an unlabeled row (HellaSwag's test split) is an
    error, not choice 0."""
    s = str(label).strip() if label is not None else ""
    i = "ABCD".index(s) if len(s) == 1 and s in "ABCD" else int(s) if s.lstrip("-").isdigit() else None
    if i is None or not 0 <= i < n:
        raise FewstepError(f"{source}: a multiple-choice row has label {label!r}, not an answer index below {n} "
                           "(unlabeled rows such as HellaSwag's test split cannot be scored: use the validation split)")
    return i


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing: WikiHow's " [title]" becomes ". ", other [tags] go."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def load_multiple_choice(source: str, n: int | None = None) -> list[MCItem]:
    """HellaSwag rows {ctx, endings, label} or MMLU rows {question, choices, answer} from JSONL or `hf:`. Rows with
    HellaSwag's ctx_a / ctx_b fields are read as lm-evaluation-harness reads them: context "activity_label: ctx_a
    Ctx_b", context and endings preprocessed (`_hellaswag_text`), so accuracies compare with its numbers."""
    items = []
    for r in _rows(source, n):
        if "endings" in r and "ctx_a" in r:
            ctx = (f"{_text(r, 'activity_label', source) if 'activity_label' in r else ''}: "
                   f"{_text(r, 'ctx_a', source)} {_text(r, 'ctx_b', source).capitalize()}")  # as lm-eval
            endings = [_hellaswag_text(e) for e in _texts(r, "endings", source)]
            ctx, label = _hellaswag_text(ctx), r.get("label")
        elif "endings" in r:
            ctx, endings, label = _text(r, "ctx", source), _texts(r, "endings", source), r.get("label")
        elif "choices" in r:
            ctx = f"{_text(r, 'question', source).strip()}\nAnswer:"
            endings, label = _texts(r, "choices", source), r.get("answer")
        else:
            raise FewstepError(f"{source}: a multiple-choice row needs ctx/endings/label or question/choices/answer")
        label = _label(label, len(endings), source)
        items.append(MCItem(ctx, [" " + e.strip() for e in endings], label))
    return items


def load_cloze(source: str, n: int | None = None) -> list[ClozeItem]:
    """LAMBADA rows {text} from JSONL or `hf:`: the last whitespace-separated word is the target."""
    items = []
    for r in _rows(source, n):
        ctx, _, word = _text(r, "text", source).strip().rpartition(" ")
        if not ctx:
            raise FewstepError(f"{source}: a cloze row needs at least two words")
        items.append(ClozeItem(ctx, " " + word))
    return items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation such that their concatenation is the encoding of the whole text
    (lm-evaluation-harness's rules: trailing spaces of the context move to the continuation, "Answer: " + "Paris"
    scores " Paris"; BPE merges across the boundary are given to the continuation)."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[: len(ctx)] != ctx:  # a merge across the boundary: fall back to separate encodings
        return ctx, tokenizer.encode(continuation)
    return ctx, whole[len(ctx) :]


def score_multiple_choice(model, meta, tokenizer, items: list[MCItem], *, mc: int = 32, seed: int = 0,
                          batch_size: int = 32, device=None) -> dict:
    """Accuracy (sum of log-probs) and acc_norm (per character) over items."""
    from fewstep.eval.likelihood import continuation_logprob

    ctxs, conts, seeds = [], [], []
    for i, it in enumerate(items):
        for e in it.endings:
            a, b = encode_pair(tokenizer, it.context, e)
            ctxs.append(a)
            conts.append(b)
            seeds.append(seed * 1_000_003 + i)  # one seed per item: its endings share t's and masks
    lp = continuation_logprob(model, meta, ctxs, conts, mc=mc, seeds=seeds, batch_size=batch_size, device=device)
    acc = acc_norm = 0
    k = 0
    for it in items:
        s = lp[k : k + len(it.endings)]
        # per character of the ending, without the space that joins it to the context (lm-eval's len(choice))
        norm = s / torch.tensor([max(1, len(e.removeprefix(" "))) for e in it.endings], dtype=torch.float64)
        acc += int(s.argmax()) == it.label
        acc_norm += int(norm.argmax()) == it.label
        k += len(it.endings)
    n = max(len(items), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n_items": len(items), "chance": _chance(items)}


def _chance(items: list[MCItem]) -> float:
    return sum(1 / len(it.endings) for it in items) / max(len(items), 1)


def score_cloze(model, meta, tokenizer, items: list[ClozeItem], *, mc: int = 32, seed: int = 0,
                batch_size: int = 32, device=None) -> dict:
    """LAMBADA accuracy (greedy decoding reproduces the target) and target perplexity (a bound for DLMs)."""
    from fewstep.eval.likelihood import continuation_logprob

    pairs = [encode_pair(tokenizer, it.context, it.target) for it in items]
    lp, greedy = continuation_logprob(model, meta, [a for a, _ in pairs], [b for _, b in pairs], mc=mc,
                                      seed=seed, batch_size=batch_size, greedy=True, device=device)
    n_tok = sum(len(b) for _, b in pairs)
    return {"acc": float(greedy.double().mean()) if len(items) else 0.0,
            "ppl": math.exp(min(-float(lp.sum()) / max(n_tok, 1), 50.0)),
            "ppl_word": math.exp(min(-float(lp.sum()) / max(len(items), 1), 50.0)), "n_items": len(items)}


def check_task_spec(spec: str) -> None:
    """One line for a task spec `run_task` cannot run (checked before any work by `fewstep eval`)."""
    kind, _, source = spec.partition(":")
    if not ((kind in ("cloze", "mc") and not source) or (kind in ("lambada", "hellaswag", "mmlu") and source)):
        raise FewstepError(f"unknown task {spec!r}: use cloze, mc, lambada:<src>, hellaswag:<src> or mmlu:<src>")
    if not source.startswith("hf:") and source and not Path(source).expanduser().is_file():
        raise FewstepError(f"task file {source!r} does not exist")


def run_task(spec: str, model, meta, tokenizer, *, n: int = 200, mc: int = 32, seed: int = 0, data_dir=None,
             batch_size: int = 32, device=None) -> dict:
    """One task row. spec: 'cloze' | 'mc' (held-out text), 'lambada:<src>', 'hellaswag:<src>', 'mmlu:<src>'
    where <src> is a JSONL path or hf:<dataset>[:config][@split]."""
    check_task_spec(spec)
    kind, _, source = spec.partition(":")
    if kind in ("cloze", "mc") and not source:
        from fewstep.data.stream import check_tokens

        check_tokens(data_dir or meta["data"]["dir"], meta["data"])
        docs = heldout_documents(data_dir or meta["data"]["dir"], tokenizer, max_docs=max(2000, 20 * n))
        if kind == "cloze":
            items = cloze_from_documents(docs, n, seed=seed)
        else:  # endings of at most half the model's length, so each item keeps some context
            fits = lambda e: len(tokenizer.encode(e)) <= meta["model"]["seq_len"] // 2
            items = mc_from_documents(docs, n, seed=seed, ending_ok=fits)
        name = f"{kind}-heldout"
    elif kind == "lambada" and source:
        items, name = load_cloze(source, n), "lambada"
    else:  # hellaswag:<src> or mmlu:<src>
        items, name = load_multiple_choice(source, n), kind
    if not items:
        raise FewstepError(f"task {spec!r}: no items")
    cloze = isinstance(items[0], ClozeItem)
    score = score_cloze if cloze else score_multiple_choice
    out = score(model, meta, tokenizer, items, mc=mc, seed=seed, batch_size=batch_size, device=device)
    return {"kind": "task", "task": name, "source": source or "heldout", "model_kind": meta["kind"],
            "likelihood": "exact" if meta["kind"] == "ar" else f"nelbo-mc{mc}", "seed": seed, **out}
