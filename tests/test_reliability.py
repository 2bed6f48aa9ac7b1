"""Reliability: SIGKILL at random points and exact resume, loading that never unpickles, the NaN guard
on weights, determinism, and one-line errors for failures of the machine (disk full, bad paths)."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import tiny_overrides
from fewstep import checkpoint
from fewstep.cli import main
from fewstep.config import FewstepError, load
from fewstep.pipeline import pretrain

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _log(out_dir: Path) -> dict[int, dict]:
    """step -> merged row of log.jsonl (losses and validation), skipping a torn last line."""
    rows: dict[int, dict] = {}
    path = out_dir / "log.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        row.pop("tokens_per_s", None)  # wall-clock, not a result
        for k in [k for k in row if k.startswith("mfu")]:
            row.pop(k)
        assert not set(row) & set(rows.get(row["step"], {})) - {"step"}, f"step {row['step']} logged twice"
        rows.setdefault(row["step"], {}).update(row)
    return rows


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return {f"{f.name}/{k}": v for f in sorted(ckpt.glob("*.safetensors"))
            for k, v in checkpoint.load_tensors(f).items()}


def _assert_complete(ckpt: Path) -> None:
    """What a resume reads: meta.json parses, every listed file has its size, every tensor file loads."""
    assert checkpoint.complete(ckpt), ckpt
    meta = checkpoint.read_meta(ckpt)
    assert ckpt.name == f"step_{meta['step']:07d}" and set(meta["files"]) <= {p.name for p in ckpt.iterdir()}
    assert _tensors(ckpt)


# ------------------------------------------------------------------------------------------ SIGKILL + resume


def _step_of(d: Path | None) -> int:
    return int(d.name.split("_")[1]) if d is not None else 0


def _pointer_step(out: Path) -> int:
    try:
        return _step_of(out / json.loads((out / "latest").read_text())["dir"])
    except (OSError, ValueError, KeyError):
        return 0


def _run_until_killed(cmd, out: Path, event: str, rng: random.Random, ckpt_every: int, err) -> str:
    """Start training, SIGKILL it at the moment `event` describes; returns what was seen when it died."""
    env = {**ENV, "FEWSTEP_TEST_SLOW_CKPT": "0.25"}  # widens the windows inside checkpoint.save
    start = _step_of(checkpoint.latest(out))
    target = start + rng.randint(1, ckpt_every + 1)
    launched = time.time()

    def fresh(p: Path) -> bool:  # written by this process, not left over by the one killed before
        try:
            return p.stat().st_mtime >= launched
        except OSError:
            return False

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 90
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            steps = [p for p in out.glob("step_*") if p.is_dir()]
            if event == "step" and fresh(out / "log.jsonl") and max(_log(out), default=0) >= target:
                time.sleep(rng.uniform(0.0, 0.03))  # somewhere inside one of the following steps
                break
            if event == "write" and any(fresh(p) for p in out.glob(".tmp_step_*")):  # half written (hook sleeps)
                break
            if event == "publish" and steps and _step_of(max(steps)) > max(_pointer_step(out), start):
                break  # step dir renamed into place, `latest` pointer not yet updated
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9, f"the run ended by itself (rc {proc.returncode}) before the '{event}' kill"
    if event == "write":
        assert any(out.glob(".tmp_step_*")), "killed outside a checkpoint write"
    if event == "publish":
        newest = max(p for p in out.glob("step_*") if p.is_dir())
        assert _pointer_step(out) < _step_of(newest) and checkpoint.latest(out) == newest
    return event


@pytest.mark.parametrize("command", ["train", "distill"])
def test_sigkill_at_random_points_then_resume_matches_uninterrupted_run(pydoc_data, tmp_path, command):
    every = 4
    if command == "train":
        total, events = 24, ["step", "write", "publish", "step", "write", "step"]
        args = ["train", *tiny_overrides(pydoc_data, "{out}", **{"train.max_steps": total, "train.ckpt_every": every,
                                                                 "train.eval_every": 8, "train.keep_last": 2})]
    else:  # SDTT: rounds of 6 steps (students of 8, 4, 2 steps) cut by checkpoints every 4: kills span rounds
        teacher = tmp_path / "teacher"
        pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, teacher, **{"train.max_steps": 4})))
        total, events = 18, ["step", "write", "publish", "step"]
        args = ["distill", "--config", "distill_sdtt_tiny", f"--method.teacher={teacher}", "--train.out_dir={out}",
                "--method.teacher_steps=16", "--method.student_steps=2", "--method.round_steps=6",
                "--train.batch_size=8", f"--train.ckpt_every={every}", "--train.log_every=1",
                "--train.eval_every=6", "--train.eval_batches=1", "--train.warmup_steps=2"]

    def cmd(out):
        return [sys.executable, "-m", "fewstep", *(a.replace("{out}", str(out)) for a in args)]

    ref = subprocess.run(cmd(tmp_path / "ref"), env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out, rng = tmp_path / "cut", random.Random(10)
    kills = []
    with open(tmp_path / "stderr.txt", "wb") as err:
        for event in events:
            resume = checkpoint.latest(out)
            if resume is not None:
                _assert_complete(resume)  # what the next process will read
            if _step_of(resume) >= total - every:  # too little left for another kill
                break
            _run_until_killed(cmd(out), out, event, rng, every, err)
            done = max(_log(out), default=0)  # steps finished when the process died
            kills.append((event, done, _step_of(checkpoint.latest(out))))
        resume = checkpoint.latest(out)
        _assert_complete(resume)
        fin = subprocess.run(cmd(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert fin.returncode == 0, fin.stderr[-2000:]
    assert json.loads(fin.stdout.strip().splitlines()[-1])["start_step"] == _step_of(resume)
    print("kills (event, steps done, checkpoint kept):", kills)
    assert len(kills) >= 3 and {"step", "write", "publish"} <= {k[0] for k in kills}, kills
    for _event, done, kept in kills:
        assert done - kept <= every, kills  # at most one checkpoint interval lost per kill
    a, b = _log(tmp_path / "ref"), _log(out)
    assert sorted(b) == list(range(1, total + 1)) and a == b  # every loss and val_nll bit-identical
    last_a, last_b = checkpoint.latest(tmp_path / "ref"), checkpoint.latest(out)
    assert last_a.name == last_b.name == f"step_{total:07d}"
    ta, tb = _tensors(last_a), _tensors(last_b)  # weights, EMA, Adam moments, RNG state
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not list(out.glob(".tmp_step_*")) and not list(out.glob(".del_*"))  # leftovers cleaned


# --------------------------------------------------------------------------------- latest() and torn logs


class _Toy:
    """A one-module task for the loop: data-free, a quadratic loss, optional weight corruption."""

    def __init__(self, corrupt_at: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 4)
        self.corrupt_at = corrupt_at

    def trainable(self):
        return {"model": self.model}

    def step(self, x0, step):
        return {"model": (self.model.weight - 1).pow(2).sum()}, {}

    def on_step_end(self, step):
        if step == self.corrupt_at:  # an update that overflowed the weights while loss and grads were finite
            with torch.no_grad():
                self.model.weight[0, 0] = float("inf")


def _toy_fit(out: Path, steps: int, corrupt_at: int | None = None):
    from fewstep.train import fit

    cfg = load(None, [f"--train.out_dir={out}", f"--train.max_steps={steps}", "--train.ckpt_every=4",
                      "--train.log_every=1", "--train.warmup_steps=1", "--train.lr=0.1", "--train.keep_last=3"])
    return fit(_Toy(corrupt_at), cfg, train_data=None, meta={"models": {}}, device=torch.device("cpu"))


def test_latest_skips_damaged_dirs_and_stale_pointer_and_save_cleans_leftovers(tmp_path):
    out = tmp_path / "run"
    _toy_fit(out, 12)
    assert checkpoint.latest(out).name == "step_0000012"
    assert [p.name for p in sorted(out.glob("step_*"))] == ["step_0000004", "step_0000008", "step_0000012"]
    (out / "latest").write_text('{"dir": "step_0000004"}')  # stale pointer: a newer complete dir wins
    assert checkpoint.latest(out).name == "step_0000012"
    f = out / "step_0000012" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])  # truncated: skipped, never read
    assert checkpoint.latest(out).name == "step_0000008"
    (out / "step_0000008" / "optim_model.safetensors").unlink()  # half-deleted by a crash
    (out / "latest").write_text("garbage{")
    assert checkpoint.latest(out).name == "step_0000004"
    (out / "step_0000004" / "meta.json").write_text("{ torn")
    assert checkpoint.latest(out) is None
    with pytest.raises(FewstepError, match="no checkpoint"):
        checkpoint.resolve(out)
    for p in out.glob("step_*"):  # start again from a clean slate, plus leftovers of killed writes
        shutil.rmtree(p)
    (out / ".tmp_step_0000004").mkdir()
    (out / ".tmp_step_0000004" / "model.safetensors").write_bytes(b"half")
    (out / ".del_step_0000002_123").mkdir()
    assert checkpoint.latest(out) is None  # a temporary dir is never a checkpoint
    (out / "log.jsonl").unlink()
    _toy_fit(out, 4)
    assert checkpoint.latest(out).name == "step_0000004"
    assert not list(out.glob(".tmp_step_*")) and not list(out.glob(".del_*"))


def test_pruning_keeps_the_new_checkpoint_whatever_damaged_dirs_lie_about(tmp_path):
    """keep_last counts complete checkpoints up to the one just written: damaged dirs with higher step numbers (a
    copy cut short, a changed ckpt_every) neither displace it nor get a good older one deleted."""
    model = nn.Linear(2, 2)
    save = lambda step, keep=2: checkpoint.save(tmp_path, step, modules={"model": model}, meta={}, keep_last=keep)
    for step in (1, 2, 3):
        save(step)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000002", "step_0000003"]
    for step in (8, 9):  # damaged: no meta.json
        (tmp_path / f"step_{step:07d}").mkdir()
    save(4)
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    assert names == ["step_0000003", "step_0000004", "step_0000008", "step_0000009"]
    assert checkpoint.latest(tmp_path).name == "step_0000004"
    save(5, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step_*") if checkpoint.complete(p)) == ["step_0000005"]


def test_torn_log_line_from_a_kill_does_not_break_resume(tmp_path):
    out = tmp_path / "run"
    _toy_fit(out, 6)  # checkpoints at 4 and 6 (the last step); drop 6 so the log runs past the checkpoint
    shutil.rmtree(out / "step_0000006")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 7, "loss/mo')  # SIGKILL in the middle of a write
    summary = _toy_fit(out, 8)
    assert summary["start_step"] == 4
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FewstepError, match=r"non-finite weights in model after step 8.*step_0000004"):
        _toy_fit(out, 12, corrupt_at=7)  # the step before checkpoint 8 overflows a weight
    assert checkpoint.latest(out).name == "step_0000004" and not (out / "step_0000008").exists()
    good = checkpoint.load_tensors(out / "step_0000004" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in good.values())


# -------------------------------------------------------------------------------------- never unpickle


class _Payload:
    """Unpickling this creates a marker file: proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny_run(pydoc_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "run"
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, out, **{"train.max_steps": 2, "train.ckpt_every": 2})))
    return out


def test_malicious_pickle_is_refused_and_never_executed(tiny_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _Payload(marker)})
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()

    step = tmp_path / "step_0000002"
    shutil.copytree(checkpoint.latest(tiny_run), step)
    (step / "model_ema.safetensors").write_bytes(payload)  # a pickle posing as safetensors
    zipped = tmp_path / "model.pt"
    torch.save({"weight": _Payload(marker)}, zipped)  # torch.save's zip-of-pickle format
    (tmp_path / "zip_ckpt").mkdir()
    shutil.copy(step / "meta.json", tmp_path / "zip_ckpt" / "meta.json")
    shutil.copy(zipped, tmp_path / "zip_ckpt" / "model_ema.safetensors")
    (tmp_path / "raw.pkl").write_bytes(payload)

    cases = {step: "not a safetensors file", tmp_path / "zip_ckpt": "not a safetensors file",
             zipped: "never unpickles", tmp_path / "raw.pkl": "never unpickles"}
    for ckpt, needle in cases.items():
        assert main(["sample", "--ckpt", str(ckpt), "--n", "1", "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert not marker.exists(), f"loading {ckpt} executed code"
    res = subprocess.run([sys.executable, "-m", "fewstep", "sample", "--ckpt", str(step), "--n", "1"],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not marker.exists()


def test_checkpoint_with_non_finite_weights_is_refused(tiny_run, tmp_path):
    """Saving refuses NaN weights, so a NaN in a file is damage: loading it gave all-NUL samples and val_ppl nan."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_run, bad)
    f = checkpoint.resolve(bad) / "model_ema.safetensors"
    sd = load_file(f)
    k = sorted(sd)[1]
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, f)
    with pytest.raises(FewstepError, match=f"tensor '{k}' holds NaN or inf"):
        checkpoint.load_model(bad)


def test_loading_calls_no_unpickler(tiny_run, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("unpickler called while loading a checkpoint")

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, forbidden)
    model, meta = checkpoint.load_model(tiny_run)
    assert meta["name"] == "model_ema"
    state = checkpoint.load_training_state(checkpoint.latest(tiny_run), {"model_ema": model}, {})
    assert state["step"] == 2 and "cpu" in state["rng"]


def test_source_tree_has_no_unsafe_deserialisation():
    """torch.load only with weights_only=True, never pickle/marshal/eval of file contents, np.load without pickle."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\((?P<args>[^)]*)\)", text):
            if "weights_only=True" not in m.group("args"):
                bad.append(f"{path}: {m.group(0)}")
        for pat in (r"\bpickle\.loads?\(", r"\bUnpickler\(", r"\bmarshal\.loads?\(", r"allow_pickle\s*=\s*True",
                    r"weights_only\s*=\s*False", r"\bdill\b", r"\bjoblib\.load\(", r"trust_remote_code\s*=\s*True"):
            bad += [f"{path}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert not bad, bad


# ----------------------------------------------------------------------------------------- determinism


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_mode_same_seed_same_losses_and_samples(pydoc_data, tmp_path, restore_determinism):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        argv = ["--deterministic", "train", *tiny_overrides(pydoc_data, out, **{"train.max_steps": 6,
                                                                                 "train.seed": seed})]
        assert main(argv) == 0
        assert torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(False)
        runs[name] = (_log(out), _tensors(checkpoint.latest(out)))
    assert runs["a"][0] == runs["b"][0] and len(runs["a"][0]) == 6
    assert all(torch.equal(runs["a"][1][k], runs["b"][1][k]) for k in runs["a"][1])
    assert runs["a"][0] != runs["c"][0]  # the seed matters: the comparison is not vacuous
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["train"]["deterministic"] is True

    def sample(seed, name):  # separate processes: nothing shared but the checkpoint and the seed
        path = tmp_path / name
        res = subprocess.run([sys.executable, "-m", "fewstep", "--deterministic", "sample", "--ckpt",
                              str(tmp_path / "a"), "--n", "3", "--steps", "4", "--seed", str(seed), "--ids",
                              "--out", str(path)], env=ENV, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return path.read_bytes()

    first, second = sample(7, "s1.jsonl"), sample(7, "s2.jsonl")
    assert main(["--deterministic", "sample", "--ckpt", str(tmp_path / "a"), "--n", "3", "--steps", "4",
                 "--seed", "8", "--ids", "--out", str(tmp_path / "s3.jsonl")]) == 0
    assert first == second and first != (tmp_path / "s3.jsonl").read_bytes()
    assert len(first.splitlines()) == 3


# ------------------------------------------------------------------------------ errors of the machine


def test_disk_full_and_bad_output_paths_are_one_line_errors(tiny_run, tmp_path, capsys, pydoc_data):
    def one_line(rc, *needles):
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
        assert all(n in err[0] for n in needles), err[0]

    one_line(main(["sample", "--ckpt", str(tiny_run), "--n", "1", "--steps", "1", "--out", "/dev/full"]),
             "No space left on device")
    one_line(main(["sample", "--ckpt", str(tiny_run), "--n", "1", "--steps", "1", "--out",
                   str(tmp_path / "no" / "dir" / "s.jsonl")]), "No such file or directory")
    (tmp_path / "file").write_text("x")
    one_line(main(["train", *tiny_overrides(pydoc_data, tmp_path / "file" / "run", **{"train.max_steps": 1})]),
             "Not a directory", str(tmp_path / "file"))


def test_bugs_keep_their_traceback_and_debug_shows_every_traceback(monkeypatch, capsys):
    import fewstep.cli as cli

    def buggy(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_data", buggy)
    with pytest.raises(ZeroDivisionError):  # a real bug is not disguised as a user error
        main(["data"])
    assert main(["train", "--config", "no_such_preset"]) == 2
    monkeypatch.setenv("FEWSTEP_DEBUG", "1")
    with pytest.raises(FewstepError, match="unknown preset"):
        main(["train", "--config", "no_such_preset"])


def test_sample_rejects_config_overrides_and_bad_arguments(tiny_run, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--ckpt", str(tiny_run), "--train.lr=1"])
    assert e.value.code == 2 and "no config overrides" in capsys.readouterr().err
    for args, needle in ((["--n", "0"], "n=0"), (["--temperature", "nan"], "temperature"),
                         (["--top-p", "1.5"], "top_p"), (["--device", "bogus"], "unknown device"),
                         (["--device", "cuda:7"], "not available")):
        assert main(["sample", "--ckpt", str(tiny_run), "--steps", "1", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
