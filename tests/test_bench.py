"""Speed benchmark: the schema of its rows and of bench/speed.py's output. Timings are never asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep.cli import main
from fewstep.eval import bench
from fewstep.eval.bench import PRESETS, random_models, run_bench

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"name", "kind", "sampler", "batch", "seq_len", "latency_s", "latency_all_s", "tokens_per_s", "device",
          "precision"}


def test_run_bench_rows_and_speedups():
    dlm, ar = random_models("tiny", "cpu")
    rows = run_bench(dlm, ar, steps=[1, 2], batches=[1, 2], length=8, lengths=[4, 8], sweep_steps=[1],
                     device="cpu", log=lambda m: None)
    main_rows = [r for r in rows if r["kind"] != "length_sweep"]
    assert [(r["name"], r["batch"], r.get("steps")) for r in main_rows] == [
        ("ar-kv-cache B=1", 1, None), ("mdlm B=1", 1, 1), ("mdlm B=1", 1, 2),
        ("ar-kv-cache B=2", 2, None), ("mdlm B=2", 2, 1), ("mdlm B=2", 2, 2)]  # AR: a reference, not a step count
    for r in rows:
        assert COMMON <= set(r), COMMON - set(r)
        assert r["latency_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / r["latency_s"])
    ar_lat = {r["batch"]: r["latency_s"] for r in main_rows if r["kind"] == "ar"}
    for r in main_rows:
        if r["kind"] == "mdlm":  # the speed-up is computed from the same run, same batch and length
            assert r["speedup_vs_ar"] == pytest.approx(ar_lat[r["batch"]] / r["latency_s"])
            assert r["sampler"] == "ancestral" and r["sampling_dtype"] == "float64" and r["greedy_tail"] is False
    sweep = [r for r in rows if r["kind"] == "length_sweep"]
    assert [(r["name"], r["seq_len"]) for r in sweep] == [("ar-kv-cache", 4), ("mdlm T=1", 4),
                                                           ("ar-kv-cache", 8), ("mdlm T=1", 8)]
    assert {r["model_kind"] for r in sweep} == {"ar", "mdlm"} and {r["batch"] for r in sweep} == {1}


def test_out_of_memory_becomes_a_row(monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 13.20 GiB")

    dlm, ar = random_models("tiny", "cpu")
    monkeypatch.setattr(bench, "time_dlm", oom)
    rows = run_bench(dlm, ar, steps=[4], batches=[1], length=8, device="cpu", warmup=0, log=lambda m: None)
    assert rows[0]["kind"] == "ar" and "latency_s" in rows[0]
    assert rows[1]["error"] == "oom" and rows[1]["steps"] == 4 and "speedup_vs_ar" not in rows[1]


def test_presets_have_the_shapes_they_claim():
    p = PRESETS["owt-small-shape"]
    assert (p["n_layers"], p["d_model"], p["n_heads"], p["vocab"], p["length"]) == (12, 768, 12, 50257, 1024)
    assert p["steps"][0] == 1 and p["steps"][-1] == 1024 and p["batches"] == [1, 32]
    # ~160M parameters: 12 * 12 * d^2 in the blocks plus untied input and output embeddings of 50k x 768
    blocks = 12 * 12 * 768**2
    assert 155e6 < blocks + 2 * 50258 * 768 < 165e6
    dlm, ar = random_models("tiny", "cpu")
    assert dlm.backbone.seq_len == PRESETS["tiny"]["length"] and ar.vocab_size == PRESETS["tiny"]["vocab"]


def test_hf_generate_row():
    pytest.importorskip("transformers")
    lm = bench.hf_random_gpt2("tiny", "cpu")
    row = bench.time_hf(lm, batch=2, length=6, device=torch.device("cpu"), warmup=0)
    assert row["sampler"] == "hf-generate" and row["batch"] == 2 and row["seq_len"] == 6 and row["latency_s"] > 0


def test_bench_script_appends_jsonl_and_prints_json_last(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "bench" / "speed.py"), "--preset", "tiny", "--random-weights", "--steps",
           "1,2", "--batches", "1", "--lengths", "8", "--sweep-steps", "1", "--length", "8", "--hf", "none",
           "--results", str(tmp_path)]
    for _ in range(2):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"git_sha", "device_name", "one_step_latency_s", "max_speedup_vs_ar", "results"} <= set(summary)
    lines = (tmp_path / "speed-tiny.jsonl").read_text().splitlines()
    assert len(lines) == 2 * summary["rows"] == 2 * 5  # appended, not overwritten: ar + 2 mdlm + 2 sweep
    row = json.loads(lines[-1])
    assert row["git_sha"] == summary["git_sha"] and row["preset"] == "tiny" and row["weights"] == "random"
    assert row["device_name"].startswith("cpu") and row["params_dlm"] > 0


def test_bench_command_errors_are_one_line(capsys):
    assert main(["bench", "--preset", "tiny"]) == 2  # random weights must be asked for
    assert "--random-weights" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--random-weights", "--ckpt", "x"]) == 2
    capsys.readouterr()
    tiny = ["bench", "--preset", "tiny", "--random-weights", "--hf", "none"]
    for args, needle in [(["--steps", "0"], "--steps=0"), (["--steps", "-1"], "--steps=-1"),
                         (["--batches", "0"], "--batches=0"), (["--batches", "none"], "--batches=none"),
                         (["--lengths", "-4"], "--lengths=-4"), (["--sweep-steps", "0"], "--sweep-steps=0"),
                         (["--repeats", "0"], "--repeats=0 must be >= 1"), (["--length", "0"], "--length=0"),
                         (["--length", "-5"], "--length=-5"), (["--warmup", "-1"], "--warmup=-1"),
                         (["--device", "bogus"], "unknown device 'bogus'"), (["--hf", "bogus"], "--hf 'bogus'")]:
        assert main([*tiny, *args]) == 2, args  # these gave silently wrong speed-ups or tracebacks
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (args, err)


def test_bench_from_checkpoints(pydoc_data, tmp_path, capsys):
    from conftest import tiny_overrides

    runs = {k: tmp_path / k for k in ("mdlm", "ar")}
    for kind, out in runs.items():
        assert main(["train", *tiny_overrides(pydoc_data, out, **{"train.max_steps": 1, "model.kind": kind})]) == 0
    capsys.readouterr()
    out = tmp_path / "bench.json"
    assert main(["bench", "--ckpt", str(runs["mdlm"]), "--ar-ckpt", str(runs["ar"]), "--steps", "1,2",
                 "--length", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["ar-kv-cache B=1", "mdlm B=1", "mdlm B=1"]
    assert all(r["weights"] == "checkpoint" and r["ckpt"].startswith(str(runs["mdlm"])) for r in rows)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["one_step_latency_s"]) == {"1"} and summary["oom"] == 0  # JSON keys are strings
    assert main(["bench", "--ckpt", str(runs["ar"])]) == 2  # an AR checkpoint is not a DLM
    assert "--ckpt must be an MDLM checkpoint, got a 'ar' one" in capsys.readouterr().err
    from fewstep.config import DataConfig
    from fewstep.data import build

    data = tmp_path / "pydoc-gpt2"  # an AR model of another tokenizer: its latency is for other tokens
    build(DataConfig(corpus="pydoc", tokenizer="gpt2", dir=str(data)))
    over = tiny_overrides(data, tmp_path / "ar_gpt2", **{"train.max_steps": 1, "model.kind": "ar",
                                                         "data.tokenizer": "gpt2"})
    assert main(["train", *over]) == 0
    capsys.readouterr()
    assert main(["bench", "--ckpt", str(runs["mdlm"]), "--ar-ckpt", str(tmp_path / "ar_gpt2")]) == 2
    assert "--ar-ckpt uses tokenizer 'gpt2' but --ckpt 'byte'" in capsys.readouterr().err


@pytest.mark.parametrize("script, args, keys", [
    ("roofline.py", ["--preset", "tiny", "--repeats", "2", "--no-compile"],
     {"floor_s", "step_floor_s", "variants_s", "best_step_over_floor", "head_matmul", "git_sha", "device_name"}),
    ("draw.py", ["--rows", "16", "--vocab", "1000", "--warmup", "1", "--repeats", "1", "--no-append"],
     {"same_tokens", "fused_s", "unfused_s", "rand_s", "git_sha"}),
    ("row_head.py", ["--d-model", "32", "--layers", "1", "--heads", "2", "--len", "32", "--vocab", "500", "--steps",
                     "1,4", "--warmup", "0", "--repeats", "1", "--no-append"],
     {"rows", "params", "git_sha", "device_name"}),
    ("loss_head.py", ["--vocab", "500", "--d-model", "32", "--layers", "1", "--heads", "2", "--batch", "2", "--len",
                      "32", "--warmup", "1", "--repeats", "1", "--no-append"],
     {"full_ms", "masked_ms", "chunked_ms", "full_saved_bytes", "chunked_saved_bytes", "git_sha"}),
])
def test_device_bench_scripts_run_on_cpu(script, args, keys):
    """The scripts bench/gpu_checks.sh runs on a GPU, at toy sizes on CPU: they run and print their JSON last,
    so a lent device's minutes are not lost to a script that broke since its last run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert keys <= set(out), keys - set(out)
    assert out.get("same_tokens", True) is True  # draw.py: the fused race draws the unfused tokens
    if script == "row_head.py":  # both heads timed at each step count
        assert [r["steps"] for r in out["rows"]] == [1, 4] and all(r["row_head_s"] > 0 for r in out["rows"])
    failed = [k for k, v in out.get("variants_s", {}).items() if v is None]  # roofline.py: a variant that raised
    assert not failed
    assert script != "roofline.py" or "4-step sample bf16 weights, eager, row head" in out["variants_s"]


def test_roofline_cut_by_a_time_limit_still_writes_its_row():
    """bench/gpu_checks.sh stops a part with SIGTERM at its time limit: the roofline then stops timing and prints
    its row with the variants measured so far and "cut": true (a lent GPU's minutes are not lost to a cut part)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "roofline.py"), "--preset", "tiny", "--repeats",
                             "20", "--no-compile"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        for line in proc.stderr:  # the floor first, then one line per variant timed
            if "x floor)" in line:
                break
        proc.send_signal(signal.SIGTERM)  # seconds of variants are left (the 64-step samples)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    row = json.loads(out.strip().splitlines()[-1])
    assert row["cut"] is True and "cut by SIGTERM" in err
    measured = [k for k, v in row["variants_s"].items() if v is not None]
    assert measured and measured[0] == "forward fp32 weights + autocast" and row["floor_s"] > 0
    assert "64-step sample bf16 weights, eager, row head" not in row["variants_s"]  # really cut short


def test_train_throughput_cut_by_a_time_limit_keeps_the_logged_windows(tmp_path):
    """The same for bench/train_throughput.py: SIGTERM stops the training run it waits for, and the row is built
    from the windows that run logged so far ("cut": true)."""
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--procs", "1",
                             "--steps", "100000", "--log-every", "2", "--no-append"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait for two logged windows of the run (the first is dropped)
            logs = list(tmp_path.glob("*/run0/log.jsonl"))
            if logs and logs[0].read_text().count("tokens_per_s") >= 2:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    row = json.loads(err.strip().splitlines()[-1])  # the row; stdout's last line is the summary
    assert row["cut"] is True and row["steps"] == 100000 and len(row["tokens_per_s_windows"]) >= 2
    assert row["tokens_per_s"] > 0 and json.loads(out.strip().splitlines()[-1])["rows"][0]["tokens_per_s"] > 0
