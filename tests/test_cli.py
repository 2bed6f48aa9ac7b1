"""Command line: every bad input ends in one clear line and a non-zero exit, and nothing is overwritten."""

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_overrides
from fewstep.cli import main


def run_cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fewstep", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line_error(res, *needles):
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in err[0], err[0]


def test_missing_corpus(tmp_path):
    res = run_cli("data", f"--data.corpus={tmp_path / 'nope.txt'}", f"--data.dir={tmp_path / 'd'}")
    one_line_error(res, "nope.txt")
    assert not (tmp_path / "d").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n\n")
    one_line_error(run_cli("data", f"--data.corpus={tmp_path / 'empty.txt'}", f"--data.dir={tmp_path / 'd'}"),
                   "empty")


def test_non_utf8_corpus_leaves_existing_data_untouched(tmp_path, pydoc_data):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    before = {p.name: p.read_bytes() for p in pydoc_data.iterdir()}
    res = run_cli("data", f"--data.corpus={tmp_path / 'latin1.txt'}", f"--data.dir={pydoc_data}", "--force")
    one_line_error(res, "UTF-8")
    assert {p.name: p.read_bytes() for p in pydoc_data.iterdir()} == before


def test_unknown_preset_and_key(capsys):
    assert main(["train", "--config", "no_such_preset"]) == 2
    assert "unknown preset 'no_such_preset'" in capsys.readouterr().err
    assert main(["train", "--train.learning_rate=1"]) == 2
    assert "unknown config key 'train.learning_rate'" in capsys.readouterr().err
    assert main(["train", "--train.lr=fast"]) == 2
    assert "train.lr: expected float" in capsys.readouterr().err
    for argv in (["eval", "--ckpt", "no/such/run", "--steps", "1,x"], ["demo", "--steps", "4,sixteen"]):
        assert main(argv) == 2  # parsed before any checkpoint is read or any model trained
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "expected comma-separated integers" in err[0], err
    for argv, needle in ((["--n", "0"], "n=0 is invalid"), (["--steps", "0,4"], "steps=0 is invalid"),
                         (["--steps", ","], "at least one step count")):
        assert main(["demo", "--out-dir", "/no/such/dir/demo", *argv]) == 2  # before minutes of training
        assert needle in capsys.readouterr().err


def test_checkpoint_shape_mismatch_is_one_line(pydoc_data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(pydoc_data, out, **{"train.max_steps": 2})]) == 0
    meta_path = out / "step_0000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["models"]["model_ema"]["vocab_size"] = 300  # a checkpoint claiming another vocabulary
    meta_path.write_text(json.dumps(meta))
    res = run_cli("sample", "--ckpt", str(out), "--n", "1", "--steps", "2")
    one_line_error(res, "shape", "vocabulary")


def test_truncated_checkpoint_is_one_line(pydoc_data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(pydoc_data, out, **{"train.max_steps": 2})]) == 0
    f = out / "step_0000002" / "model_ema.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    one_line_error(run_cli("sample", "--ckpt", str(out), "--n", "1"), "truncated")


@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_sample_command_writes_jsonl(pydoc_data, tmp_path, kind):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(pydoc_data, out, **{"train.max_steps": 2, "model.kind": kind})]) == 0
    res = run_cli("sample", "--ckpt", str(out), "--n", "3", "--steps", "4", "--out", str(tmp_path / "s.jsonl"))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(ln) for ln in open(tmp_path / "s.jsonl")]
    assert len(rows) == 3 and all(isinstance(r["text"], str) and r["entropy"] > 0 for r in rows)
    assert json.loads(res.stderr.strip().splitlines()[-1])["n"] == 3


def test_experiment_bad_config_is_one_line(tmp_path):
    one_line_error(run_cli("experiment", "no_such_experiment"), "unknown experiment config 'no_such_experiment'")
    bad = tmp_path / "bad.toml"
    bad.write_text("[eval]\nn = 4\nsteps = [1]\n")
    one_line_error(run_cli("experiment", str(bad)), "unknown config key 'eval.steps'")
    bad.write_text("[eval\nn = 4\n")
    one_line_error(run_cli("experiment", str(bad)), "cannot parse experiment config")
    assert not (tmp_path / "runs").exists()


def test_distill_help_lists_every_registered_method(capsys):
    from fewstep.distill import METHODS

    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert all(f" {name} " in out or f" {name})" in out for name in METHODS), out
