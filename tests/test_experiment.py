"""`fewstep experiment`: a reduced tiny experiment end to end (one process and torchrun), resume by stage files,
config errors in one line."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from conftest import torchrun
from fewstep.cli import main
from fewstep.config import FewstepError
from fewstep.experiment import label, load, run_experiment

REDUCED = """
[experiment]
name = "ci"
runs_dir = "{runs}"
results_dir = "{results}"
index = "{index}"
unique_tokens = [2048]
epochs = [1, 2]

[data]
corpus = "pydoc"
tokenizer = "byte"
dir = "{data}"

[model]
seq_len = 32
d_model = 32
n_layers = 2
n_heads = 2

[train]
batch_size = 8
warmup_steps = 2
eval_every = 1000
eval_batches = 2
ckpt_every = 1000
log_every = 5

[judge]
spec = "best_ar"

[distill]
methods = ["sdtt"]
train = {{ batch_size = 8, warmup_steps = 1, eval_batches = 1, log_every = 1 }}

[distill.sdtt]
teacher_steps = 4
student_steps = 2
round_steps = 2
groups = 2

[eval]
teacher_steps = [1, 4]
student_steps = [1, 2]
n = 4
batch = 4
val_batches = 2
val_mc = 1
bench_batch = 2
bench_repeats = 1
"""


@pytest.fixture(scope="module")
def experiment(pydoc_data, tmp_path_factory):
    """(config path, results dir, first run's output): run once, shared by the tests below."""
    root = tmp_path_factory.mktemp("experiment")
    path = root / "ci.toml"
    path.write_text(REDUCED.format(runs=root / "runs", results=root / "results", data=pydoc_data,
                                   index=root / "RESULTS.md"))
    out = run_experiment(str(path), log=lambda msg: None)
    return path, root / "results", out


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_end_to_end_report(experiment):
    path, results, out = experiment
    assert len([s for s in out["stages_run"] if s.startswith("train/")]) == 4  # {ar, mdlm} x {1, 2} epochs
    assert [s for s in out["stages_run"] if s.startswith("bench/")] == ["bench/2048x2"]  # all timed in one process
    for name in ("train.jsonl", "samples.jsonl", "bench.jsonl", "summary.json", "results.md", "SUMMARY.md",
                 "val_loss_vs_epochs.png", "gen_ppl_vs_steps.png", "entropy_vs_steps.png", "latency_vs_steps.png",
                 "gen_ppl_vs_latency.png"):
        assert (results / name).is_file(), name
        assert (results / name).stat().st_size > 0, name
    grid = _rows(results / "train.jsonl")
    assert sorted((r["kind"], r["epochs"]) for r in grid) == [("ar", 1), ("ar", 2), ("mdlm", 1), ("mdlm", 2)]
    assert all(r["val_bound"] == (r["kind"] == "mdlm") and r["val_nll"] > 0 for r in grid)
    assert {r["train_steps"] for r in grid} == {8, 16}  # 2048 tokens x epochs / (8 x 32) per step
    assert sorted(r["epochs_seen"] for r in grid) == [1.0, 1.0, 2.0, 2.0]  # 64 blocks: exactly, no partial step
    gen = _rows(results / "samples.jsonl")
    assert [(r["name"], r["steps"]) for r in gen] == [("teacher", 1), ("teacher", 4), ("sdtt", 1), ("sdtt", 2),
                                                      ("AR", 32)]
    assert all(r["gen_ppl"] > 1 and r["entropy"] > 0 and r["n_samples"] == 4 for r in gen)
    assert len({r["judge"] for r in gen}) == 1  # one judge for every row
    bench = _rows(results / "bench.jsonl")
    assert sorted((r["name"], r.get("steps")) for r in bench if r["kind"] == "mdlm") == [
        ("sdtt", 1), ("sdtt", 2), ("teacher", 1), ("teacher", 4)]
    assert all(r["seq_len"] == 32 and r["latency_s"] > 0 for r in bench)
    (ar,) = [r for r in bench if r["kind"] == "ar"]  # timed once: every speed-up over AR comes from that timing
    assert all(r["speedup_vs_ar"] == pytest.approx(ar["latency_s"] / r["latency_s"]) for r in bench if r is not ar)
    assert all(r["genppl_protocol"] == 2 and r["judge_truncated"] == 0 for r in gen)
    summary = json.loads((results / "summary.json").read_text())
    (speed,) = summary["matched_speedup"]
    assert speed["student"] == "sdtt" and speed["teacher_ref_steps"] == 4
    if speed["matched_steps"] is not None:  # defined: fewest student steps with gen PPL <= teacher @4
        assert speed["student_gen_ppl"] <= speed["teacher_gen_ppl"]
        assert speed["speedup"] == pytest.approx(speed["teacher_latency_s"] / speed["student_latency_s"])
    (cross,) = summary["crossover"]
    assert cross["epochs"] == [1, 2] and len(cross["mdlm_ahead"]) == 2
    md, short = (results / "results.md").read_text(), (results / "SUMMARY.md").read_text()
    page = (results.parent / "RESULTS.md").read_text()  # experiment.index: every SUMMARY.md, links made relative
    assert "## Experiment `ci`" in page and "![val_loss_vs_epochs](results/val_loss_vs_epochs.png)" in page
    assert "| model | @1 | @2 | @4 | AR |" in short and "| teacher | " in short
    t1 = next(r for r in gen if r["name"] == "teacher" and r["steps"] == 1)
    assert f"{t1['entropy']:.3f}" in short.split("| teacher | ")[1].split("\n")[0]  # the pivot shows the rows
    assert "## Validation" in md and "## Speed-up at matched gen PPL" in md and "| sdtt |" in md
    assert cross["verdict"] in short and "crossover" in short


def test_pretraining_only_study(pydoc_data, tmp_path):
    """distill.methods = []: the grid, its best MDLM and its AR model are measured, nothing is distilled, and the
    report says so instead of showing empty student tables; an empty list elsewhere is still an error."""
    text = REDUCED.split("[distill]")[0] + "[distill]\nmethods = []\n\n[eval]" + REDUCED.split("[eval]")[1]
    path = tmp_path / "ci.toml"
    path.write_text(text.format(runs=tmp_path / "runs", results=tmp_path / "results", data=pydoc_data, index=""))
    out = run_experiment(str(path), ["--experiment.epochs=1"], log=lambda msg: None)
    assert not [s for s in out["stages_run"] if s.startswith("distill/")]
    gen = _rows(tmp_path / "results" / "samples.jsonl")
    assert [(r["name"], r["steps"]) for r in gen] == [("teacher", 1), ("teacher", 4), ("AR", 32)]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["matched_speedup"] == [] and summary["equal_steps"] == []
    short, md = (tmp_path / "results" / "SUMMARY.md").read_text(), (tmp_path / "results" / "results.md").read_text()
    assert "none in this experiment (distill.methods = [])" in short and "students have lower" not in short
    assert "## Students vs teacher" not in md and "## Speed-up at matched" not in md and "## Latency" in md
    with pytest.raises(FewstepError, match="eval.student_steps: expected a non-empty list"):
        run_experiment(str(path), ["--eval.student_steps=[]"], log=lambda msg: None)


def test_experiment_under_torchrun(experiment, pydoc_data, tmp_path):
    """`torchrun -m fewstep experiment` on 2 gloo processes: every rank trains and distills, rank 0 measures and
    writes the report. Same stages, grid and rows as the one-process run (values differ: each rank draws its own
    noise)."""
    path = tmp_path / "ci.toml"
    path.write_text(REDUCED.format(runs=tmp_path / "runs", results=tmp_path / "results", data=pydoc_data,
                                   index=tmp_path / "RESULTS.md"))
    res = torchrun("-m", "fewstep", "experiment", str(path), timeout=600)
    (out,) = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith('{"dir"')]  # rank 0 only
    one_process = experiment[2]
    assert out["stages_run"] == one_process["stages_run"] and out["files"] == one_process["files"]
    for name in ("train.jsonl", "samples.jsonl"):
        keys = [(r.get("kind"), r.get("epochs"), r.get("name"), r.get("steps"), r.get("train_steps"))
                for r in _rows(tmp_path / "results" / name)]
        assert keys == [(r.get("kind"), r.get("epochs"), r.get("name"), r.get("steps"), r.get("train_steps"))
                        for r in _rows(experiment[1] / name)], name


def test_rerun_skips_finished_stages(experiment, monkeypatch):
    path, results, _ = experiment
    stages = sorted((path.parent / "runs" / "stages").rglob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in stages}

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    import fewstep.distill.run
    import fewstep.eval.harness
    import fewstep.pipeline

    monkeypatch.setattr(fewstep.pipeline, "pretrain", boom)
    monkeypatch.setattr(fewstep.distill.run, "distill", boom)
    out = run_experiment(str(path), log=lambda msg: None)
    assert out["stages_run"] == []
    assert {p: p.stat().st_mtime_ns for p in stages} == before
    monkeypatch.setattr(fewstep.eval.harness, "sample_eval", boom)
    (path.parent / "runs" / "stages" / "bench" / "2048x2.json").unlink()  # a lost result: only it runs again
    assert run_experiment(str(path), log=lambda msg: None)["stages_run"] == ["bench/2048x2"]


def test_report_only_runs_nothing_and_reports_what_is_done(pydoc_data, tmp_path, monkeypatch):
    cfg = tmp_path / "ci.toml"
    cfg.write_text(REDUCED.format(runs=tmp_path / "runs", results=tmp_path / "results", data=pydoc_data, index=""))
    run_experiment(str(cfg), log=lambda msg: None)
    stages = tmp_path / "runs" / "stages"
    for lost in ("gen/sdtt", "bench/2048x2", "train/ar_2048x1"):  # as if the run had been cut
        (stages / f"{lost}.json").unlink()

    def boom(*a, **k):
        raise AssertionError("report-only ran a stage")

    import fewstep.distill.run
    import fewstep.eval.harness
    import fewstep.pipeline

    for mod, fn in ((fewstep.pipeline, "pretrain"), (fewstep.distill.run, "distill"),
                    (fewstep.eval.harness, "sample_eval")):
        monkeypatch.setattr(mod, fn, boom)
    out = run_experiment(str(cfg), log=lambda msg: None, report_only=True)
    assert out["stages_run"] == [] and not (stages / "gen" / "sdtt.json").exists()
    assert "written from the stage files alone (no stage ran)" in (tmp_path / "results" / "SUMMARY.md").read_text()
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert sorted(summary["stages_missing"]) == ["bench/2048x2", "gen/sdtt", "train/ar_2048x1"]
    gen = _rows(tmp_path / "results" / "samples.jsonl")
    assert {r["name"] for r in gen} == {"teacher", "AR"}  # the student's rows are the ones not measured yet
    (cross,) = summary["crossover"]
    assert cross["epochs"] == [2]  # E=1 lost its AR run: that epoch count is left out, not compared
    assert main(["experiment", str(cfg), "--report-only"]) == 0


def test_changed_eval_setting_reruns_only_its_stages(experiment):
    path, results, _ = experiment
    ran = run_experiment(str(path), ["--eval.n=2", "--eval.batch=2"], log=lambda msg: None)["stages_run"]
    assert ran and all(s.startswith("gen/") for s in ran)
    assert {r["n_samples"] for r in _rows(results / "samples.jsonl")} == {2}


def test_teacher_temperatures_add_only_their_gen_stages_and_weigh_the_student(experiment):
    """eval.teacher_temperatures samples the teacher @ref at each T (one gen stage each, nothing else reruns, not
    timed: it costs what the teacher @ref costs) and the matched student is weighed against the one of highest
    entropy not above its own."""
    path, results, _ = experiment
    same_eval = ["--eval.n=2", "--eval.batch=2"]  # as the test above left them
    ran = run_experiment(str(path), [*same_eval, "--eval.teacher_temperatures=0.5,2"], log=lambda m: None)
    assert sorted(ran["stages_run"]) == ["gen/teacher_T=0.5", "gen/teacher_T=2"]
    gen = _rows(results / "samples.jsonl")
    rows = {r["name"]: r for r in gen if r["role"] == "teacher_T"}
    assert sorted(rows) == ["teacher T=0.5", "teacher T=2"]
    assert all(r["steps"] == 4 and r["temperature"] == float(n.split("=")[1]) for n, r in rows.items())
    assert not any("T=" in r["name"] for r in _rows(results / "bench.jsonl"))
    (speed,) = json.loads((results / "summary.json").read_text())["matched_speedup"]
    if speed["matched_steps"] is not None:  # the student's entropy picks the rows among T = 0.5, 1 and 2
        ref = next(r for r in gen if r["name"] == "teacher" and r["steps"] == 4)
        pool = [ref, *rows.values()]
        lo = [r for r in pool if r["entropy"] <= speed["student_entropy"]]
        assert speed["sharp_lo_temperature"] == (max(lo, key=lambda r: r["entropy"])["temperature"] if lo else None)
        assert speed["sharpening"] in ("beats", "matched", "unresolved")
    assert run_experiment(str(path), same_eval, log=lambda m: None)["stages_run"] == []  # off again: rows gone
    assert not any(r["role"] == "teacher_T" for r in _rows(results / "samples.jsonl"))


def test_logging_settings_and_ar_val_are_not_stage_settings(experiment):
    """How a stage logs, evaluates and saves does not change what it produces: changing it reruns nothing (it was
    refused as "trained with other settings"); AR validation is exact, so val_mc reruns the MDLM's only."""
    path, _, _ = experiment
    quiet, same_eval = dict(log=lambda msg: None), ["--eval.n=2", "--eval.batch=2"]  # as the test above left them
    logging = ["--train.log_every=3", "--train.eval_batches=1", "--distill.train.log_every=2", "--train.keep_last=1"]
    assert run_experiment(str(path), [*same_eval, *logging], **quiet)["stages_run"] == []
    ran = run_experiment(str(path), [*same_eval, "--eval.val_mc=2"], **quiet)["stages_run"]
    assert sorted(ran) == ["val/mdlm_2048x1", "val/mdlm_2048x2"]
    run_experiment(str(path), same_eval, **quiet)  # back to the fixture's val_mc for the tests below


def test_changed_training_setting_is_refused_then_rerun_with_dependents(experiment):
    path, results, _ = experiment
    quiet = dict(log=lambda msg: None)
    same_eval = ["--eval.n=2", "--eval.batch=2"]  # as the previous test left the gen stages
    with pytest.raises(FewstepError, match=r"sdtt_2048x2 was trained with other settings \(method.round_steps 2 -> 3"):
        run_experiment(str(path), [*same_eval, "--distill.sdtt.round_steps=3"], **quiet)
    import shutil

    shutil.rmtree(path.parent / "runs" / "distill" / "sdtt_2048x2")
    ran = run_experiment(str(path), [*same_eval, "--distill.sdtt.round_steps=3"], **quiet)["stages_run"]
    assert ran == ["distill/sdtt_2048x2", "bench/2048x2", "gen/sdtt"]  # the student and what measured it


def test_didi_student_is_also_measured_with_rgas(pydoc_data, tmp_path):
    """eval.rgas: the DiDi student is measured twice, plain and with RGAS from its own discriminator."""
    page = tmp_path / "docs" / "RESULTS.md"  # a results page whose folder does not hold these results
    cfg = REDUCED.format(runs=tmp_path / "runs", results=tmp_path / "results", data=pydoc_data, index=page)
    cfg = cfg.replace("epochs = [1, 2]", "epochs = [1]").replace('methods = ["sdtt"]', 'methods = ["didi"]')
    cfg = cfg[:cfg.index("[distill.sdtt]")] + (
        "[distill.didi]\nsteps = 2\nteacher_steps = 2\ngroup = 2\ndisc_blocks = 1\n\n" + cfg[cfg.index("[eval]"):])
    (tmp_path / "ci.toml").write_text(cfg + "rgas = true\nrgas_candidates = 2\n")
    results = tmp_path / "results"
    ran = run_experiment(str(tmp_path / "ci.toml"), log=lambda msg: None)["stages_run"]
    assert [s for s in ran if not s.startswith(("train/", "val/"))] == [
        "distill/didi_2048x1", "bench/2048x1", "gen/teacher", "gen/didi", "gen/didi+RGAS", "gen/AR"]
    gen = {(r["name"], r["steps"]): r for r in _rows(results / "samples.jsonl")}
    for k in (1, 2):
        plain, guided = gen[("didi", k)], gen[("didi+RGAS", k)]
        assert plain["sampler"] == "ancestral" and guided["sampler"] == "rgas" and guided["role"] == "didi+RGAS"
        assert guided["guide_candidates"] == 2 and guided["guide_scale"] == [30.0, 40.0]
        assert guided["gen_ppl"] > 1 and guided["n_samples"] == plain["n_samples"] == 4
    bench = [r for r in _rows(results / "bench.jsonl") if r["name"] == "didi+RGAS"]
    assert sorted(r["steps"] for r in bench) == [1, 2] and all(r["sampler"] == "rgas" for r in bench)
    students = {s["student"] for s in json.loads((results / "summary.json").read_text())["matched_speedup"]}
    assert students == {"didi", "didi+RGAS"} and not page.exists()  # an index elsewhere is never overwritten
    again = run_experiment(str(tmp_path / "ci.toml"), ["--eval.rgas_candidates=3"], log=lambda msg: None)
    assert again["stages_run"] == ["bench/2048x1", "gen/didi+RGAS"]  # only the guided stages depend on it


ALL_METHODS = """
[distill.sdtt]
teacher_steps = 4
student_steps = 2
round_steps = 2
groups = 2

[distill.boot]
start_steps = 2
min_steps = 1
round_steps = 1

[distill.idlm]
steps = 2

[distill.didi]
steps = 2
teacher_steps = 2
group = 2
disc_blocks = 1

[distill.tcs]
init = "scratch"
target = "taylor"
top_k = 4
data_weight = 1.0
steps = 2

"""


def all_methods_experiment(pydoc_data, tmp_path) -> dict:
    """The reduced experiment with every method of the small preset (sdtt boot idlm didi tcs) and RGAS rows; the
    device is whatever the runner picks (CUDA when present). Returns the first run's output."""
    cfg = REDUCED.format(runs=tmp_path / "runs", results=tmp_path / "results", data=pydoc_data, index="")
    cfg = cfg.replace("epochs = [1, 2]", "epochs = [1]").replace(
        'methods = ["sdtt"]', 'methods = ["sdtt", "boot", "idlm", "didi", "tcs"]')
    cfg = cfg[:cfg.index("[distill.sdtt]")] + ALL_METHODS + cfg[cfg.index("[eval]"):]
    (tmp_path / "ci.toml").write_text(cfg + "rgas = true\nrgas_candidates = 2\n")
    return run_experiment(str(tmp_path / "ci.toml"), log=lambda msg: None)


def check_every_method_runs(pydoc_data, tmp_path, device: str) -> None:
    out = all_methods_experiment(pydoc_data, tmp_path)
    assert {s.split("/")[1] for s in out["stages_run"] if s.startswith("distill/")} == {
        f"{m}_2048x1" for m in ("sdtt", "boot", "idlm", "didi", "tcs")}
    gen = _rows(tmp_path / "results" / "samples.jsonl")
    assert {r["name"] for r in gen} == {"teacher", "sdtt", "boot", "idlm", "didi", "didi+RGAS", "tcs", "AR"}
    assert all(r["device"].startswith(device) and math.isfinite(r["gen_ppl"]) for r in gen)
    bench = _rows(tmp_path / "results" / "bench.jsonl")
    assert bench and all(r["latency_s"] > 0 and str(r["device"]).startswith(device) for r in bench)
    assert len([r for r in bench if r["kind"] == "ar"]) == 1  # one AR timing for the whole group


def test_every_method_of_the_small_preset_runs_here(pydoc_data, tmp_path):
    """The small preset's method list (sdtt boot idlm didi tcs, RGAS rows) through the experiment at toy sizes on
    this machine's device (CPU in CI): every stage runs and every measurement is finite."""
    check_every_method_runs(pydoc_data, tmp_path, "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_method_of_the_small_preset_runs_on_cuda(pydoc_data, tmp_path):
    """What the small experiment does on a GPU (bf16 training, CUDA-graphed and fused-draw sampling, RGAS, TCS's
    Taylor targets), at toy sizes: every stage runs and every measurement is finite and on CUDA."""
    check_every_method_runs(pydoc_data, tmp_path, "cuda")


@pytest.mark.parametrize("override, needle", [
    ("--eval.nn=3", "unknown config key 'eval.nn'"),
    ("--distill.methods=sdtt,nope", "unknown distillation method 'nope'"),
    ("--distill.sdtt.round_stepz=3", "unknown config key 'method.round_stepz'"),
    ("--judge.spec=gpt9", "judge.spec='gpt9' is invalid"),
    ("--distill.teachers=3x3", "distill.teachers entry '3x3' is invalid"),
    ("--model.kind=ar", "model.kind is set by the experiment"),
    ("--train.max_steps=5", "train.max_steps is set by the experiment"),
    ("--eval.ref_steps=3", "eval.ref_steps=3 must be one of eval.teacher_steps"),
    ("--eval.teacher_temperatures=0.9,1", "eval.teacher_temperatures=[0.9, 1.0] must be distinct, finite, > 0"),
    ("--eval.teacher_temperatures=0", "eval.teacher_temperatures=[0.0] must be"),
    ("--eval.teacher_temperatures=0.9,0.9", "eval.teacher_temperatures=[0.9, 0.9] must be distinct"),
    ("--bogus.x=1", "unknown experiment config section 'bogus'"),
    ("--distill.methods=sdtt,tcs", "distill.tcs.init='teacher' is invalid"),
])
def test_bad_config_is_one_line(experiment, capsys, override, needle):
    path = experiment[0]
    assert main(["experiment", str(path), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_presets_parse():
    tiny, repeated, small, paper = load("tiny"), load("repeated"), load("small"), load("paper")
    assert tiny.base.data.tokenizer == "byte" and tiny.judge.spec == "best_ar"
    assert repeated.base.model == tiny.base.model and max(repeated.experiment.epochs) >= 64  # the regime's depth
    assert repeated.methods["sdtt"].method["round_steps"] == 100  # the method presets' own lengths, not tiny's
    assert small.base.data.tokenizer == "gpt2" and small.judge.spec == "train" and small.judge.epochs <= 10
    assert small.eval.teacher_temperatures == [0.9]  # the GPU result carries the sharpening control
    assert paper.base.data.tokenizer == "gpt2" and paper.base.data.corpus.startswith("hf:")
    assert paper.base.model.d_model == 768 and paper.base.model.n_layers == 12
    long = load("repeated_long")  # the repeated preset's 25k budget, longer, pre-training alone
    assert long.base == repeated.base and long.distill.methods == [] and long.methods == {}
    assert set(repeated.experiment.epochs) < set(long.experiment.epochs) and long.experiment.unique_tokens == [25_000]
    dist = load("repeated_distill")  # repeated_long's best MDLM (25k x 512), distilled longer
    assert dist.base == repeated.base and set(dist.experiment.epochs) <= set(long.experiment.epochs)
    sdtt = dist.methods["sdtt"].method  # 64 -> 4: four rounds, each longer than the repeated preset's
    assert (sdtt["teacher_steps"], sdtt["student_steps"]) == (64, 4) and sdtt["round_steps"] > 100
    assert dist.methods["idlm"].method["steps"] > repeated.methods["idlm"].method["steps"]
    for ex in (tiny, repeated, long, dist, small, paper):
        assert set(ex.methods) == set(ex.distill.methods) and ex.eval.ref_steps in ex.eval.teacher_steps
    assert {"sdtt", "boot", "idlm", "didi"} <= set(paper.distill.methods)
    with pytest.raises(FewstepError, match="unknown experiment config"):
        load("no_such_experiment")
    assert label(200_000, 4) == "200kx4" and label(1_000_000, 1.5) == "1Mx1.5" and label(0, 2) == "allx2"
    one = load("tiny", ["--experiment.epochs=4", "--experiment.unique_tokens=50000"])
    assert one.experiment.epochs == [4] and one.experiment.unique_tokens == [50_000]  # one-item lists
    with pytest.raises(FewstepError, match="expected a non-empty list"):
        load("tiny", ["--experiment.epochs=4,"])


@pytest.mark.parametrize("teacher_at_1, student_se, verdict", [
    (50.5, 0.01, "this setup shows no gain from distillation at 1 steps"),  # +0.7 standard errors above @64
    (51.5, 0.02, "the gain from distillation is not resolved"),  # teacher @1 worse (+2.1), student edge +1.3
    (80.0, 0.01, "a gain from distillation"),
])
def test_matched_speedup_is_weighed_against_the_teacher_at_the_same_steps(teacher_at_1, student_se, verdict):
    """A student matching the teacher @ref at k steps is credited to distillation only when the teacher itself @k
    is worse beyond the sampling noise and the student beats it beyond the noise (hand-computed z values)."""
    from fewstep.experiment.report import matched_speedup, summary_md

    row = lambda role, name, steps, ppl, se: {"group": "t", "role": role, "name": name, "steps": steps,
                                              "gen_ppl": ppl, "entropy": 3.0, "gen_ppl_log_se": se}
    gen = [row("teacher", "teacher", 1, teacher_at_1, 0.01), row("teacher", "teacher", 64, 50.0, 0.01),
           row("student", "sdtt", 1, 49.99, student_se)]
    bench = [{"group": "t", "role": r["role"], "kind": "mdlm", "name": r["name"], "steps": r["steps"],
              "latency_s": 0.1 * r["steps"]} for r in gen]
    (s,) = matched_speedup(gen, bench, ref=64)
    assert s["matched_steps"] == 1 and s["speedup"] == pytest.approx(64.0)
    assert s["teacher_at_k_gen_ppl"] == teacher_at_1
    assert s["teacher_at_k_z_above_ref"] == pytest.approx(math.log(teacher_at_1 / 50) / math.hypot(0.01, 0.01))
    assert s["z_below_teacher_at_k"] == pytest.approx(math.log(teacher_at_1 / 49.99) / math.hypot(0.01, student_se))
    text = summary_md("x", "setup", [], [s], [], bench, {"teachers": ["t"], "judge": "j", "stage_seconds": {},
                                                          "stages_run": [], "wall_seconds": 0}, 64)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("- sdtt: matches")]
    assert "64.0x faster" in line and line.endswith(verdict + ".")
    verdicts = ("shows no gain from distillation", "gain from distillation is not resolved", "a gain from distillation")
    assert sum(v in line for v in verdicts) == 1


@pytest.mark.parametrize("student, verdict, want", [
    ((30.0, 2.95), "beats", "beats the teacher @64 sharpened to T=0.9 (gen PPL 40.00, entropy 2.900 <= its own) by "
                            "20.3 standard errors: a gain beyond sharpening"),
    ((45.0, 3.05), "beats", "beats the teacher @64 at T=1 (gen PPL 50.00, entropy 3.000 <= its own) by 7.5 "
                            "standard errors"),
    ((40.2, 2.85), "matched", "the teacher @64 sharpened to T=0.9 (gen PPL 40.00, entropy 2.900 >= its own) is as "
                              "good or better (-0.4 standard errors): the student reaches the @64 teacher's trade-off"),
    ((49.0, 2.95), "matched", "the teacher @64 at T=1 (gen PPL 50.00, entropy 3.000 >= its own) is as good or better "
                              "(+1.4 standard errors)"),
    ((45.0, 2.75), "matched", "sharpened to T=0.8 (gen PPL 35.00, entropy 2.800 >= its own) is as good or better "
                              "(-17.8"),
    ((45.0, 2.95), "unresolved", "not resolved at the measured temperatures (T=0.9 (gen PPL 40.00, entropy 2.900 "
                                 "<= its own): -8.3 standard errors; T=1 (gen PPL 50.00, entropy 3.000 >= its own): "
                                 "+7.5)"),
    ((33.0, 2.75), "unresolved", "(no measured temperature of no more entropy; T=0.8 (gen PPL 35.00, entropy 2.800 "
                                 ">= its own): +4.2)"),
])
def test_matched_student_is_weighed_against_the_sharpened_teacher(student, verdict, want):
    """Sharpening (a lower temperature) lowers gen PPL and entropy: the student beats it when its gen PPL is below
    the teacher's at the nearest temperature of no more entropy, and sharpening does as well when the teacher at the
    nearest one of no less entropy is not worse beyond the noise; z = log(teacher / student) / hypot(0.01, 0.01),
    e.g. log(40 / 30) / 0.01414 = 20.3 (hand-computed)."""
    from fewstep.experiment.report import matched_speedup, summary_md

    row = lambda role, name, ppl, h, T=1.0, steps=64: {"group": "t", "role": role, "name": name, "steps": steps,
                                                        "gen_ppl": ppl, "entropy": h, "gen_ppl_log_se": 0.01,
                                                        "temperature": T}
    gen = [row("teacher", "teacher", 50.0, 3.0), row("teacher_T", "teacher T=0.9", 40.0, 2.9, 0.9),
           row("teacher_T", "teacher T=0.8", 35.0, 2.8, 0.8), row("student", "sdtt", *student, steps=1)]
    (s,) = matched_speedup(gen, [], ref=64)  # the teacher_T rows are neither students nor the reference
    assert s["matched_steps"] == 1 and s["sharpening"] == verdict
    lo = max((r for r in gen[:3] if r["entropy"] <= student[1]), key=lambda r: r["entropy"], default=None)
    assert s["sharp_lo_z"] == (lo and pytest.approx(math.log(lo["gen_ppl"] / student[0]) / math.hypot(0.01, 0.01)))
    text = summary_md("x", "setup", [], [s], [], [], {"teachers": ["t"], "judge": "j", "stage_seconds": {},
                                                      "stages_run": [], "wall_seconds": 0}, 64)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("- sdtt: matches")]
    assert want in line and line.endswith(")." if verdict == "unresolved" else ".")
    assert matched_speedup([r for r in gen if r["role"] != "teacher_T"], [], ref=64)[0].keys().isdisjoint(
        {"sharpening", "sharp_lo_z"})  # no temperatures measured: no control, as before


def test_crossover_is_ar_ahead_then_mdlm_ahead_only():
    """A reversed pattern (MDLM ahead at few epochs, AR at more) or a mixed one is not counted as a crossover."""
    from fewstep.experiment.report import crossover

    grid = lambda ar, md: [{"kind": k, "unique_tokens": 1000, "epochs": e, "val_nll": v}
                           for k, vals in (("ar", ar), ("mdlm", md)) for e, v in zip((1, 4, 16), vals)]
    (c,) = crossover(grid([2.0, 1.9, 2.1], [2.2, 1.8, 1.7]))
    assert c["crossover"] and c["verdict"] == "crossover: AR ahead up to E=1, MDLM (bound) ahead from E=4" + \
        "; AR's held-out NLL is lowest at E=4 and rises after it (over-fitting)" + \
        "; best of each: AR 1.900 (E=4), MDLM 1.700 (E=16), MDLM ahead by 0.200 nats"
    assert c["best_ar"] == [4, 1.9] and c["best_mdlm"] == [16, 1.7]
    assert c["diff_se"] == [None] * 3 and c["best_diff_se"] is None  # no per-sequence NLLs: no standard error
    rows = grid([2.0, 1.9, 2.1], [2.2, 1.8, 1.7])
    for r in rows:  # three held-out sequences, the same for every run: AR @4 = (1.8, 1.9, 2.0), MDLM @16 = (1.5, ...)
        r["val_seq_nll"] = [r["val_nll"] + d for d in ((-0.1, 0.0, 0.1) if r["kind"] == "ar" else (-0.2, 0.0, 0.2))]
    (c,) = crossover(rows)
    se = statistics.stdev([-0.1, 0.0, 0.1]) / math.sqrt(3)  # differences (MDLM - AR): -0.3, -0.2, -0.1
    assert c["best_diff_se"] == pytest.approx(se) and c["diff_se"] == pytest.approx([se] * 3)
    assert c["verdict"].endswith(f"MDLM ahead by 0.200 nats ({0.2 / se:.1f} standard errors, paired over 3 held-out "
                                 "sequences)")
    (c,) = crossover(grid([2.0, 1.9, 1.8], [1.9, 2.0, 1.9]))
    assert not c["crossover"] and c["verdict"].startswith("mixed: MDLM (bound) ahead at E=1")
    (c,) = crossover(grid([2.0, 1.9, 1.8], [1.9, 1.8, 1.9]))
    assert not c["crossover"] and c["mdlm_ahead"] == [True, True, False]


def test_gpt2_tokens_with_a_trained_judge_as_the_small_preset(tmp_path):
    """The small preset's data and judge path at toy sizes: GPT-2 BPE tokens and judge.spec = "train" (an AR judge
    trained on the budget). The judge reads the generator's own tokenizer, so samples reach it as generated ids:
    nothing is retokenized or cut to its context."""
    from fewstep.config import DataConfig
    from fewstep.data import build

    data = tmp_path / "pydoc-gpt2"
    build(DataConfig(corpus="pydoc", tokenizer="gpt2", dir=str(data)))
    cfg = REDUCED.format(runs=tmp_path / "runs", results=tmp_path / "results", data=data, index="")
    cfg = cfg.replace('tokenizer = "byte"', 'tokenizer = "gpt2"').replace("epochs = [1, 2]", "epochs = [1]")
    cfg = cfg.replace('spec = "best_ar"', 'spec = "train"\nunique_tokens = 2048\nepochs = 1')
    (tmp_path / "ci.toml").write_text(cfg)
    out = run_experiment(str(tmp_path / "ci.toml"), log=lambda msg: None)
    assert "train/judge" in out["stages_run"]
    gen = _rows(tmp_path / "results" / "samples.jsonl")
    assert {r["name"] for r in gen} == {"teacher", "sdtt", "AR"}
    assert all(r["judge"].endswith("train/judge") and r["judge_truncated"] == 0 for r in gen)
    assert all(0 < r["judge_tokens"] <= 4 * 32 and 1 < r["gen_ppl"] for r in gen)
