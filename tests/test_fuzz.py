"""Fuzzing with hypothesis: the config parser, the CLI, corpora and checkpoints.

Contract: every input ends in success or in one clear line (FewstepError / `error: ...`), never in another
exception, a traceback or a hang. Runs are derandomized (the same cases every time) and sized to finish in well
under a minute on 2 CPU cores; the number of cases tried is printed at the end of the module (`-s` shows it) and
recorded in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import tiny_overrides
from fewstep import checkpoint
from fewstep.cli import build_parser, main
from fewstep.config import DataConfig, FewstepError, ModelConfig, RunConfig, TrainConfig, load
from fewstep.data import build
from fewstep.pipeline import pretrain

COUNTS: Counter = Counter()
RANDOM = bool(os.environ.get("FEWSTEP_FUZZ_RANDOM"))  # 1: new cases on every run (exploration, not CI)
FAST = settings(deadline=None, derandomize=not RANDOM, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SCALE = float(os.environ.get("FEWSTEP_FUZZ_SCALE", "1"))  # e.g. 20 for a long fuzzing session
N_CONFIG, N_CLI, N_CORPUS, N_CKPT = (max(1, int(n * SCALE)) for n in (400, 150, 80, 250))
_ids = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    if COUNTS:
        line = ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items()))
        print(f"\nfuzz cases: {line} (total {sum(v for k, v in COUNTS.items() if '.' not in k)})",
              file=sys.__stderr__)


@pytest.fixture(scope="module")
def box(tmp_path_factory, pydoc_data):
    """Everything the fuzzers point at: data, good and damaged checkpoints, hostile corpora, a scratch cwd."""
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "pydoc-byte"
    shutil.copytree(pydoc_data, data)  # a private copy, read by every fuzzed training run
    runs = {}
    for kind in ("mdlm", "ar"):
        runs[kind] = root / f"run_{kind}"
        pretrain(load("tiny_mdlm", tiny_overrides(data, runs[kind], **{"train.max_steps": 2, "model.kind": kind,
                                                                         "train.ckpt_every": 2})))
    bad = root / "bad_ckpt"
    shutil.copytree(checkpoint.latest(runs["mdlm"]), bad)
    f = bad / "model_ema.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    corpora = root / "corpora"
    corpora.mkdir()
    samples = {"binary.txt": bytes(range(256)) * 4, "empty.txt": b"", "latin1.txt": "caf\xe9 ".encode("latin-1") * 9,
               "bom.txt": b"\xef\xbb\xbf" + b"hello world\n\n" * 30, "nul.txt": b"a\x00b\n\n" * 50,
               "utf16.txt": "hi there\n".encode("utf-16"), "line.txt": b"x" * 200_000,
               "ok.jsonl": b'{"text": "a document"}\n' * 20, "surrogate.jsonl": b'{"text": "\\ud800"}\n',
               "deep.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n", "notes.md": b"plain text\n\n" * 40}
    for name, content in samples.items():
        (corpora / name).write_bytes(content)
    (root / "bad.toml").write_text("[train\nlr = ", encoding="utf-8")
    (root / "unknown.toml").write_text("[train]\nlearning_rate = 1\n", encoding="utf-8")
    (root / "good.toml").write_text("[model]\nd_model = 32\nn_heads = 2\nn_layers = 1\nseq_len = 32\n",
                                    encoding="utf-8")
    (root / "a_file").write_text("not a dir", encoding="utf-8")
    (root / "cwd").mkdir()
    shutil.copytree(pydoc_data, root / "victim")  # what `data --force` may replace (training reads `data`)
    return {"root": root, "data": data, "runs": runs, "bad": bad, "corpora": corpora}


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# -------------------------------------------------------------------------------------- config parser

FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in
          (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig))}
SCALARS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.booleans().map(lambda b: str(b).lower()),
    st.text(max_size=12).map(json.dumps),
    st.sampled_from(["1979-05-27", "1979-05-27T07:32:00Z", "1e1000", "[1, 2]", "[0.9, 0.99]", "[0.9, 0.99, 0.5]",
                     "{a = 1}", "[[1]]", "0x10", "1_000", "'lit'", '"""multi\nline"""', "[" * 40 + "]" * 40,
                     "9" * 5000, "-0", "+inf", "nan", "1e6", "2.0", "1.5", '"1e6"', '"true"', "[]", "{}"]),
)
KEYS = st.one_of(st.sampled_from(sorted({k for ks in FIELDS.values() for k in ks})), st.text(max_size=8))
SECTIONS = st.sampled_from(["data", "model", "train", "method", "bogus", "data.x", ""])


@st.composite
def toml_texts(draw):
    if draw(st.booleans()):
        return draw(st.text(max_size=200))  # arbitrary text, mostly not TOML
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        lines.append(f"[{draw(SECTIONS)}]")
        for _ in range(draw(st.integers(0, 4))):
            lines.append(f"{draw(KEYS)} = {draw(SCALARS)}")
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=20)))
    return "\n".join(lines)


OVERRIDE_VALUES = st.one_of(SCALARS, st.text(max_size=12), st.sampled_from(["", "=", "x=y", "1,2", "(0.9,0.95)"]))
OVERRIDES = st.lists(st.one_of(
    st.builds(lambda s, k, v: f"--{s}.{k}={v}", SECTIONS, KEYS, OVERRIDE_VALUES),
    st.text(max_size=20),
), max_size=4)


def _check_types(cfg: RunConfig) -> None:
    """A config that loads has exactly the declared types (no '[1, 2]' strings where a list was given)."""
    for section in ("data", "model", "train"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            want = {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type))
            if want is not None:
                assert type(value) is want, (section, f.name, value)
    assert isinstance(cfg.method, dict) and isinstance(cfg.train.betas, tuple)


@settings(FAST, max_examples=N_CONFIG)
@given(text=toml_texts(), overrides=OVERRIDES, use_preset=st.booleans())
def test_fuzz_config_parser(box, text, overrides, use_preset):
    path = box["root"] / "fuzz.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    COUNTS["config"] += 1
    try:
        cfg = load(str(path) if use_preset else None, overrides)
    except FewstepError as e:
        assert str(e).strip(), "empty error message"
        COUNTS["config.error"] += 1
        return
    _check_types(cfg)
    COUNTS["config.ok"] += 1


# ------------------------------------------------------------------------------------------------ CLI

SMALL_INT = st.sampled_from(["-1", "0", "1", "2", "3", "x", "", "1e1", "2.0", str(2**64)])
JUNK = st.text(max_size=8).filter(lambda s: not (set("/~") & set(s)) and not s.startswith("."))
COMMANDS = set(next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)


def _value(key: str):
    """Values per key: realistic, out of range and garbage, but never a multi-minute job."""
    sizes = st.sampled_from(["-1", "0", "1", "2", "4", "8", "16", "x", "2.0", "1e1"])
    table = {
        "model.d_model": sizes, "model.n_heads": sizes, "model.n_layers": st.sampled_from(["-1", "0", "1", "2", "x"]),
        "model.seq_len": sizes, "model.mlp_ratio": st.sampled_from(["0", "1", "2", "x"]),
        "model.kind": st.sampled_from(["mdlm", "ar", "uniform", "gpt", ""]),
        "model.schedule": st.sampled_from(["loglinear", "cosine", "linear"]),
        "model.time_cond": st.sampled_from(["true", "false", "2", "yes"]),
        "model.dropout": st.sampled_from(["0", "0.5", "1", "-0.1", "nan"]),
        "train.batch_size": st.sampled_from(["-1", "0", "1", "2", "3", "8"]),
        "train.grad_accum": st.sampled_from(["0", "1", "2", "3"]),
        "train.lr": st.sampled_from(["0", "1e-3", "-1", "nan", "inf", "1e30"]),
        "train.precision": st.sampled_from(["auto", "fp32", "bf16", "fp16"]),
        "train.nan_policy": st.sampled_from(["stop", "skip", "ignore"]),
        "train.betas": st.sampled_from(["0.9,0.99", "1,1", "0.9", "x,y", "[0.9, 0.95]"]),
        "train.seed": st.sampled_from(["0", "-1", str(2**63), "7"]),
        "data.unique_tokens": st.sampled_from(["0", "100", "-5", str(10**12)]),
        "data.epochs": st.sampled_from(["1", "0", "0.5", "-1", "inf"]),
        "data.val_fraction": st.sampled_from(["0.05", "0", "1", "0.5", "nan"]),
    }
    default = st.one_of(SMALL_INT, st.sampled_from(["true", "nan", "[1,2]", "\x00"]), JUNK)
    return table.get(key, default)


TRAIN_KEYS = [f"model.{k}" for k in FIELDS["model"]] + [f"train.{k}" for k in FIELDS["train"]
                                                        if k not in ("out_dir", "max_steps", "compile")]
TRAIN_KEYS += ["data.unique_tokens", "data.epochs", "data.val_fraction", "method.x"]


@st.composite
def overrides_for(draw, keys):
    out = []
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        out.append(f"--{key}={draw(_value(key))}")
    return out


def _pick(draw, good: list, bad: list, p_bad: float = 0.3):
    """Mostly valid choices (so the commands really run), sometimes hostile ones."""
    hostile = draw(st.integers(0, 99)) >= round(100 * (1 - p_bad))  # hypothesis starts at 0: valid first
    return draw(st.sampled_from(bad if bad and hostile else good))


@st.composite
def argvs(draw, box):
    cmd = draw(st.sampled_from(["train", "sample", "data", "train", "sample", "data", "distill", "other", "junk"]))
    root, uid = box["root"], next(_ids)
    top = ["--deterministic"] if draw(st.integers(0, 4)) == 0 else []
    bad_configs = ["no_such_preset", str(root / "bad.toml"), str(root / "unknown.toml"), str(root / "nope.toml")]
    corpora = sorted(str(p) for p in box["corpora"].iterdir())
    if cmd == "data":
        good = [c for c in corpora if c.endswith(("ok.jsonl", "bom.txt", "nul.txt", "line.txt", "notes.md"))]
        corpus = _pick(draw, [*good, f"{box['corpora']}/ok.jsonl+{box['corpora']}/bom.txt"],
                       [*corpora, str(box["corpora"]), "", "+", "wikipedia", "hf:", "hf:x", str(root / "no.txt")])
        ddir = _pick(draw, [str(root / f"d{uid}")], [str(root / "a_file"), str(root / "victim"), ""])
        argv = ["data", "--config", _pick(draw, ["tiny_mdlm", str(root / "good.toml")], bad_configs, 0.15)]
        argv += ["--force"] if draw(st.booleans()) else []
        argv += [f"--data.corpus={corpus}", f"--data.dir={ddir}",
                 f"--data.tokenizer={_pick(draw, ['byte', 'gpt2'], ['hf:', 'bpe', ''], 0.15)}"]
        argv += draw(overrides_for(["data.val_fraction", "data.epochs", "data.bogus"]))
    elif cmd == "train":
        out = _pick(draw, [root / f"r{uid}", root / "shared_run"], [root / "a_file" / "run"], 0.1)
        argv = ["train", "--config", _pick(draw, ["tiny_mdlm", "tiny_ar", "tiny_uniform"], bad_configs, 0.1)]
        argv += tiny_overrides(box["data"], out, **{"train.eval_every": 2, "train.ckpt_every": 2})
        argv += draw(overrides_for(TRAIN_KEYS))
        argv += [f"--train.max_steps={_pick(draw, ['1', '2'], ['0.5', '-1'], 0.1)}"]  # last: never long
    elif cmd == "sample":
        run = box["runs"][draw(st.sampled_from(["mdlm", "ar"]))]
        ckpt = _pick(draw, [str(run), str(checkpoint.latest(run))],
                     [str(box["bad"]), str(root / "nope"), str(root / "a_file"), "", str(box["data"])], 0.25)
        argv = ["sample", "--ckpt", ckpt]
        for flag, good, bad in (("--steps", ["1", "2", "3"], ["-1", "0", "x"]), ("--n", ["1", "2"], ["-1", "0"]),
                                ("--length", ["1", "8", "40"], ["-1", "0"]), ("--batch", ["1", "5"], ["0"]),
                                ("--seed", ["0", "3"], ["-1", str(2**64)]),
                                ("--temperature", ["1e-9", "0.5", "1", "3"], ["0", "-1", "nan", "inf", "x"]),
                                ("--top-p", ["0.3", "1", "1e-9"], ["0", "-0.5", "1.5", "nan"]),
                                ("--device", ["cpu"], ["cuda", "cuda:3", "bogus", "meta", ""]),
                                ("--out", [str(root / f"s{uid}.jsonl")], [str(root), "/dev/full",
                                                                          str(root / "no" / "s.jsonl")])):
            if draw(st.booleans()):
                argv += [flag, _pick(draw, good, bad, 0.2)]
        argv += [f for f in ("--ids", "--greedy-tail") if draw(st.booleans())]
        if draw(st.integers(0, 9)) == 0:
            argv += [draw(st.sampled_from(["--train.lr=1", "--bogus", "x"]))]
        if draw(st.integers(0, 9)) == 0:
            argv = argv[:1]  # without --ckpt
        if "--n" not in argv:
            argv += ["--n", "1"]
        if "--steps" not in argv:
            argv += ["--steps", "2"]
    elif cmd == "distill":  # its runs are long: fuzz only what fails before training starts
        argv = ["distill", "--config", draw(st.sampled_from(bad_configs))] + draw(overrides_for(TRAIN_KEYS))
    elif cmd == "other":  # demo, eval, bench, report belong to other parts: their argument parsing only
        name = draw(st.sampled_from(sorted(COMMANDS - {"data", "train", "sample", "distill"})))
        argv = [name, *draw(st.sampled_from([["--help"], ["--bogus"], ["--n", "x"], ["--steps"]]))]
    else:
        argv = draw(st.lists(st.one_of(JUNK, st.sampled_from(["--help", "--config", "--ckpt", "-h", "--"])),
                             max_size=5).filter(lambda a: not COMMANDS & set(a)))
    return top + argv


def _one_clear_line(err: str) -> None:
    assert "Traceback" not in err, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-2000:]


@settings(FAST, max_examples=N_CLI)
@given(data=st.data())
def test_fuzz_cli(box, data):
    argv = data.draw(argvs(box))
    out, err = io.StringIO(), io.StringIO()
    COUNTS["cli"] += 1
    with _cwd(box["root"] / "cwd"), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
            rc = ("argparse", e.code)
        finally:
            torch.use_deterministic_algorithms(False)
    cmd = next((a for a in argv if a in COMMANDS), "junk")
    COUNTS[f"cli.{cmd}.rc={rc[1] if isinstance(rc, tuple) else rc}"] += 1
    if os.environ.get("FEWSTEP_FUZZ_VERBOSE"):
        print(rc, argv, err.getvalue().strip().splitlines()[-1:], file=sys.__stderr__)
    assert rc in (0, 1, 2, ("argparse", 0), ("argparse", 2)), (argv, rc, err.getvalue()[-2000:])
    if rc in (1, 2):
        _one_clear_line(err.getvalue())
    if isinstance(rc, tuple):
        assert "Traceback" not in err.getvalue()


# ------------------------------------------------------------------------------------------------ corpora


@st.composite
def corpus_bytes(draw):
    kind = draw(st.sampled_from(["binary", "text", "encoded", "mixed", "bom", "nul", "huge_line", "empty",
                                 "jsonl", "jsonl_junk", "crlf"]))
    text = st.text(max_size=300)
    if kind == "binary":
        return kind, draw(st.binary(max_size=2000))
    if kind == "text":
        return kind, draw(text).encode("utf-8", "surrogatepass")
    if kind == "encoded":
        enc = draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252", "shift_jis", "utf-8-sig"]))
        return kind, draw(text).encode(enc, "replace")
    if kind == "mixed":
        return kind, draw(text).encode("utf-8") + "\n\nna\u00efve caf\u00e9".encode("latin-1") + draw(st.binary())
    if kind == "bom":
        return kind, b"\xef\xbb\xbf" + draw(text).encode("utf-8", "surrogatepass")
    if kind == "nul":
        return kind, draw(text).encode("utf-8", "surrogatepass").replace(b" ", b"\x00") + b"\x00" * 10
    if kind == "huge_line":
        return kind, draw(st.text(min_size=1, max_size=4)).encode("utf-8", "replace") * draw(
            st.integers(10_000, 250_000))
    if kind == "empty":
        return kind, draw(st.sampled_from([b"", b"\n", b" \t\r\n" * 10, b"\xef\xbb\xbf"]))
    if kind == "crlf":
        return kind, (draw(text) + "\r\n\r\n" + draw(text)).encode("utf-8", "surrogatepass")
    values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                          max_leaves=6)
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        if kind == "jsonl":
            obj = {"text": draw(st.text(max_size=50))} if draw(st.integers(0, 3)) else draw(values)
            lines.append(json.dumps(obj))
        else:
            lines.append(draw(st.sampled_from(['{"text": "\\ud83d"}', '{"text": 1}', "[" * 3000 + "]" * 3000,
                                               '{"text": "ok"', "9" * 5000, '{"text": "a\\u0000b"}', "null"])))
    return kind, "\n".join(lines).encode("utf-8", "surrogatepass")


@settings(FAST, max_examples=N_CORPUS)
@given(case=corpus_bytes(), suffix=st.sampled_from([".txt", ".jsonl", ".md", ""]),
       tokenizer=st.sampled_from(["byte", "byte", "gpt2"]), val_fraction=st.sampled_from([0.0, 0.05, 0.5]),
       as_folder=st.booleans())
def test_fuzz_corpus_build(box, case, suffix, tokenizer, val_fraction, as_folder):
    kind, content = case
    uid = next(_ids)
    src = box["root"] / f"c{uid}"
    src.mkdir()
    f = src / f"corpus{suffix if not as_folder else (suffix or '.txt')}"
    f.write_bytes(content)
    if as_folder:
        (src / "also.jsonl").write_text('{"text": "second file"}\n', encoding="utf-8")
    target = box["root"] / f"cd{uid}"
    COUNTS["corpus"] += 1
    try:
        meta = build(DataConfig(corpus=str(src if as_folder else f), tokenizer=tokenizer, dir=str(target),
                                val_fraction=val_fraction))
    except FewstepError as e:
        assert str(e).strip() and "\n" not in str(e), repr(str(e))
        assert not target.exists()  # a failed build writes nothing
        COUNTS["corpus.error"] += 1
    else:
        COUNTS["corpus.ok"] += 1
        itemsize = 2 if meta["dtype"] == "uint16" else 4
        for split in ("train", "val"):
            assert (target / f"{split}.bin").stat().st_size == itemsize * meta["n_tokens"][split]
        assert meta["n_docs"]["train"] >= 1
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)


# -------------------------------------------------------------------------------------------- checkpoints

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)
SPEC_KEYS = [*FIELDS["model"], "bogus"]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool, torch.uint8]


def _mutate(d: Path, draw) -> str:
    files = sorted(p.name for p in d.iterdir())
    what = draw(st.sampled_from(["truncate", "delete", "garbage", "meta_json", "meta_key", "meta_key", "meta_bytes",
                                 "tensor", "tensor", "tensor"]))
    if what in ("truncate", "delete", "garbage"):
        f = d / draw(st.sampled_from(files))
        if what == "truncate":
            f.write_bytes(f.read_bytes()[: draw(st.integers(0, f.stat().st_size))])
        elif what == "delete":
            f.unlink()
        else:
            f.write_bytes(draw(st.binary(max_size=300)))
    elif what == "meta_json":
        (d / "meta.json").write_text(json.dumps(draw(JSON_VALUES)))
    elif what == "meta_bytes":
        (d / "meta.json").write_bytes(draw(st.binary(max_size=100)))
    elif what == "meta_key":
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        path = draw(st.sampled_from([["models"], ["models", "model_ema"], ["data"], ["data", "tokenizer"],
                                     ["data", "eos_id"], ["step"], ["files"], ["optim"],
                                     *(["models", "model_ema", k] for k in SPEC_KEYS)]))
        node = meta
        for k in path[:-1]:
            node = node.setdefault(k, {}) if isinstance(node, dict) else {}
        value = draw(st.one_of(JSON_VALUES, st.sampled_from([0, -1, 1, 2, 3, 16, 2**31, 2**40, "ar", "uniform",
                                                             "mdlm", True, "byte", "gpt2"])))
        if isinstance(node, dict):
            node[path[-1]] = value
        (d / "meta.json").write_text(json.dumps(meta))
    else:
        f = d / draw(st.sampled_from([n for n in files if n.endswith(".safetensors")] or ["model_ema.safetensors"]))
        try:
            sd = checkpoint.load_tensors(f)
        except FewstepError:  # already destroyed by an earlier mutation
            sd = {}
        if sd:
            key = draw(st.sampled_from(sorted(sd)))
            how = draw(st.sampled_from(["dtype", "shape", "vocab", "drop", "add", "nan"]))
            v = sd[key]
            if how == "dtype":
                sd[key] = v.to(draw(st.sampled_from(DTYPES)))
            elif how == "shape":
                sd[key] = v.reshape(-1)[: max(0, v.numel() - 1)].clone() if v.numel() else torch.zeros(3)
            elif how == "vocab" and v.dim() >= 1:
                extra = draw(st.integers(-2, 2)) or 1
                sd[key] = torch.cat([v, v[:extra]]) if extra > 0 else v[:extra].clone()
            elif how == "drop":
                del sd[key]
            elif how == "add":
                sd["bogus.weight"] = torch.zeros(2)
            else:
                sd[key] = torch.full_like(v, float("nan")) if v.is_floating_point() else v
            save_file({k: t.contiguous() for k, t in sd.items()}, f)
        what += f".{how}" if sd else ""
    return what


@settings(FAST, max_examples=N_CKPT)
@given(data=st.data(), kind=st.sampled_from(["mdlm", "ar"]), name=st.sampled_from([None, None, "model", "bogus"]))
def test_fuzz_checkpoint_loading(box, data, kind, name):
    run = box["root"] / f"k{next(_ids)}"
    shutil.copytree(checkpoint.latest(box["runs"][kind]), run / "step_0000002")
    whats = [_mutate(run / "step_0000002", data.draw) for _ in range(data.draw(st.integers(1, 3)))]
    COUNTS["checkpoint"] += 1
    try:
        for target in (run / "step_0000002", run):  # a step dir is read as given; a run dir via latest()
            try:
                model, meta = checkpoint.load_model(target, "cpu", name=name)
            except FewstepError as e:
                assert str(e).strip(), whats
                COUNTS["checkpoint.error"] += 1
            else:
                assert isinstance(model, torch.nn.Module) and not model.training
                assert meta["kind"] in ("mdlm", "ar", "uniform")
                COUNTS["checkpoint.ok"] += 1
        resume = checkpoint.latest(run)  # what a resumed run would read: only complete checkpoints
        if resume is not None:
            from fewstep.models import build_model

            cfg = load("tiny_mdlm", tiny_overrides(box["data"], run, **{"model.kind": kind}))
            mods = {n: build_model(cfg.model, 257) for n in ("model", "model_ema")}
            opt = {"model": torch.optim.AdamW(mods["model"].parameters())}
            try:
                state = checkpoint.load_training_state(resume, mods, opt)
                assert type(state["step"]) is int
            except FewstepError:
                COUNTS["checkpoint.resume_error"] += 1
    finally:
        shutil.rmtree(run, ignore_errors=True)
