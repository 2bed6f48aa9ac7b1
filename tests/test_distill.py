"""Distillation: every registered method trains on a tiny teacher without touching it, students are ordinary
checkpoints, BOOT is data-free, SDTT's rounds swap and halve, divergences match closed forms, and every method
keeps its ranks in step under torchrun."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import forbid_data_access, tiny_overrides, torchrun
from fewstep import checkpoint
from fewstep.config import FewstepError, load
from fewstep.distill import METHODS
from fewstep.distill.common import Halving
from fewstep.distill.divergences import DIVERGENCES, get_divergence
from fewstep.distill.run import distill, prepare
from fewstep.pipeline import generate, pretrain
from fewstep.train import fit

# A few optimiser steps' worth of settings per method; a new method must add its own line here.
SMALL = {
    "sdtt": {"teacher_steps": 8, "student_steps": 2, "round_steps": 2, "groups": 2},
    "boot": {"start_steps": 4, "min_steps": 1, "round_steps": 2},
    "idlm": {"steps": 3, "student_steps": 2},
    "didi": {"steps": 3, "group": 2, "teacher_steps": 2, "disc_blocks": 1},
    "tcs": {"steps": 3, "init": "scratch", "top_k": 4},  # AR teachers: see teacher_for
    "onpolicy": {"steps": 3, "init": "scratch", "decode_steps": 4, "states": 2, "top_k": 4},
}


def teacher_for(name, teacher, ar_ckpt):
    """The MDLM teacher, or the AR one for methods that distill an autoregressive teacher (tcs, onpolicy)."""
    return ar_ckpt if getattr(METHODS[name], "teacher_kinds", None) == ("ar",) else teacher


@pytest.fixture(scope="module")
def teacher(pydoc_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "mdlm"
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, out, **{"train.max_steps": 6, "train.lr": 3e-3})))
    return out


@pytest.fixture(scope="module")
def ar_ckpt(pydoc_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ar") / "ar"
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, out, **{"model.kind": "ar", "train.max_steps": 1})))
    return out


TRAIN = ["--train.batch_size=4", "--train.warmup_steps=1", "--train.log_every=1", "--train.ckpt_every=3",
         "--train.eval_every=3", "--train.eval_batches=1", "--train.ema=0.9", "--train.lr=1e-3"]


def distill_cfg(teacher, out, name, **method):
    cfg = load(None, [f"--train.out_dir={out}", *TRAIN])
    cfg.method = {"name": name, "teacher": str(teacher), **SMALL.get(name, {}), **method}
    return cfg


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_method_has_small_settings():
    assert set(METHODS) == set(SMALL)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_only_the_student_and_keeps_the_teacher(teacher, ar_ckpt, tmp_path, name):
    cfg = distill_cfg(teacher_for(name, teacher, ar_ckpt), tmp_path / name, name)
    run = prepare(cfg, "cpu")
    method, t_model = run["method"], run["teacher"]
    t_before, s_before = state(t_model), state(method.student)
    cfg = run["cfg"]
    summary = fit(method, cfg, train_data=run["train"], val_data=run["val"], meta=run["meta"],
                  device=torch.device("cpu"))
    assert summary["steps"] == method.planned_steps() == cfg.train.max_steps
    losses = [json.loads(ln) for ln in open(tmp_path / name / "log.jsonl")]
    losses = [r["loss/student"] for r in losses if "loss/student" in r]
    assert len(losses) == cfg.train.max_steps and all(math.isfinite(v) for v in losses)
    assert same(state(t_model), t_before)  # the teacher is bit-identical
    assert not t_model.training and not any(p.requires_grad for p in t_model.parameters())
    assert next(iter(method.trainable())) == "student"  # the loop validates and EMA-swaps the first module
    changed = {k for k, v in state(method.student).items() if not torch.equal(v, s_before[k])}
    assert changed  # the trained module moved


@pytest.mark.parametrize("name", sorted(METHODS))
def test_student_checkpoint_round_trips_and_samples(teacher, ar_ckpt, tmp_path, name):
    out = tmp_path / name
    teacher = teacher_for(name, teacher, ar_ckpt)
    cfg = distill_cfg(teacher, out, name)
    summary = distill(cfg)
    assert summary["method"] == name and summary["data_free"] == METHODS[name].data_free
    model, meta = checkpoint.load_model(out)
    assert meta["name"] == "student_ema" and meta["kind"] == "mdlm"
    assert meta["distill"]["method"] == name
    assert model.time_conditioned == METHODS[name].Config().time_cond
    raw, _ = checkpoint.load_model(out, name="student")
    tspec = checkpoint.load_model(teacher)[1]["model"]
    assert {k: v for k, v in meta["model"].items() if k not in ("time_cond", "kind")} == \
        {k: v for k, v in tspec.items() if k not in ("time_cond", "kind")}
    x = generate(model, meta, n=3, steps=2, seed=0)
    assert x.shape == (3, tspec["seq_len"]) and int(x.max()) < tspec["vocab_size"]  # no mask token left
    assert torch.equal(x, generate(model, meta, n=3, steps=2, seed=0))
    assert not same(state(model), state(raw))  # EMA and raw weights are both there and differ


def test_cli_distill_then_sample(teacher, tmp_path):
    from fewstep.cli import main

    toml = tmp_path / "d.toml"
    toml.write_text(f'[method]\nname = "sdtt"\nteacher = "{teacher}"\nteacher_steps = 4\nstudent_steps = 2\n'
                    f'round_steps = 2\ngroups = 2\n[train]\nout_dir = "{tmp_path / "run"}"\nbatch_size = 4\n'
                    'warmup_steps = 1\nlog_every = 1\neval_every = 100\n')
    assert main(["distill", "--config", str(toml)]) == 0
    assert checkpoint.latest(tmp_path / "run").name == "step_0000002"
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.jsonl")]) == 0
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_under_torchrun_keeps_ranks_in_step(teacher, ar_ckpt, tmp_path, name):
    """2 gloo processes (DDP): each rank takes half the global batch and draws its own noise, and the averaged
    gradients keep every trainable module (student, fake model, discriminator) bit-identical on both ranks."""
    out, spec = tmp_path / "run", tmp_path / "spec.json"
    method = {"name": name, "teacher": str(teacher_for(name, teacher, ar_ckpt)), **SMALL[name]}
    spec.write_text(json.dumps({"overrides": [f"--train.out_dir={out}", *TRAIN], "method": method,
                                "out": str(tmp_path / "ranks.json")}))
    torchrun(str(Path(__file__).with_name("torchrun_distill.py")), str(spec))
    report = json.loads((tmp_path / "ranks.json").read_text())
    assert report["world"] == 2 and report["modules"], report
    for module, r in report["modules"].items():
        assert r["same_on_every_rank"] and r["finite"], (module, r)
    assert checkpoint.latest(out).name == f"step_{report['steps']:07d}"


def test_boot_never_touches_the_data(teacher, tmp_path, monkeypatch):
    forbid_data_access(monkeypatch)
    summary = distill(distill_cfg(teacher, tmp_path / "boot", "boot"))
    assert summary["data_free"] and summary["steps"] == 6
    assert checkpoint.read_meta(checkpoint.latest(tmp_path / "boot"))["distill"]["data_free"]
    with pytest.raises(AssertionError, match="touched"):  # the probe works: SDTT reads data and trips it
        distill(distill_cfg(teacher, tmp_path / "sdtt", "sdtt"))


def test_sdtt_round_swap_copies_student_and_halves_steps(teacher, tmp_path):
    cfg = distill_cfg(teacher, tmp_path / "run", "sdtt", teacher_steps=8, student_steps=2, round_steps=3)
    run = prepare(cfg, "cpu")
    m, t_before = run["method"], state(run["teacher"])
    assert [m.rounds.steps(s) for s in range(9)] == [4, 4, 4, 2, 2, 2, 2, 2, 2]
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.on_step_end(1)  # mid-round: nothing happens
    assert not same(state(m.ref), state(m.student))
    m.on_step_end(2)  # last step of round 0
    assert same(state(m.ref), state(m.student)) and m.round == 1
    assert same(state(run["teacher"]), t_before)
    fresh = prepare(cfg, "cpu")["method"]  # a resumed run reloads the round's teacher copy
    fresh.restore(3)
    assert same(state(fresh.ref), state(m.student))


@pytest.mark.parametrize("init, time_cond", [("scratch", False), ("scratch", True), ("teacher", True)])
def test_sdtt_round_zero_targets_come_from_the_teacher(teacher, tmp_path, init, time_cond):
    """Round 0's teacher copy computes the teacher's function whatever the student starts from (a scratch
    student's copy was a random network) and whether or not the student adds time conditioning."""
    run = prepare(distill_cfg(teacher, tmp_path / "run", "sdtt", init=init, time_cond=time_cond), "cpu")
    m, t_model = run["method"], run["teacher"]
    x = torch.randint(0, m.student.mask_id, (2, 32))
    x[:, ::2] = m.student.mask_id  # masked positions: where the denoiser's prediction is not a carry-over
    t = torch.rand(2)
    assert torch.equal(m.ref(x, t), t_model(x, t))
    assert m.ref.time_conditioned == time_cond


def test_time_conditioned_student_starts_as_the_teacher(teacher, tmp_path):
    run = prepare(distill_cfg(teacher, tmp_path / "run", "boot"), "cpu")
    student, t_model = run["method"].student, run["teacher"]
    assert student.time_conditioned and not t_model.time_conditioned
    x = torch.randint(0, student.mask_id, (2, 32))
    x[:, ::2] = student.mask_id
    t = torch.rand(2)
    assert torch.equal(student(x, t), t_model(x, t))  # zero-initialised adaLN is an exact identity


@pytest.mark.parametrize("change, match", [
    ({"name": "nope"}, "unknown distillation method 'nope'.*sdtt"),
    ({"teacher": "/no/such/ckpt"}, "teacher checkpoint /no/such/ckpt does not exist"),
    ({"divergence": "l1"}, "unknown divergence 'l1'"),
    ({"teacher_steps": 5}, "method.teacher_steps=5 is invalid: must be even"),
    ({"round_size": 3}, "unknown config key 'method.round_size'"),
    ({"init": "/no/such/init"}, "student init checkpoint /no/such/init does not exist"),
])
def test_bad_method_settings_are_one_clear_error(teacher, tmp_path, change, match):
    cfg = distill_cfg(teacher, tmp_path / "run", "sdtt")
    cfg.method.update(change)
    with pytest.raises(FewstepError, match=match):
        prepare(cfg, "cpu")


@pytest.mark.parametrize("name, change, match", [
    ("sdtt", {"groups": 0}, "method.groups=0 is invalid: must be >= 1"),
    ("sdtt", {"groups": -1}, "method.groups=-1 is invalid: must be >= 1"),
    ("didi", {"reward": "elbo", "elbo_mc": 0}, "method.elbo_mc=0 is invalid: must be >= 1"),
    ("didi", {"label_smoothing": 2}, "method.label_smoothing=2.0 is invalid: must be in"),
    ("didi", {"disc_blocks": 0}, "method.disc_blocks=0 is invalid: must be in \\[1, 2\\]"),
    ("didi", {"disc_blocks": 99}, "method.disc_blocks=99 is invalid: must be in"),
    ("didi", {"match_beta": 2}, "method.match_beta=2"),
    ("idlm", {"loss_eps": 1.5}, "method.loss_eps=1.5 is invalid: must be in \\(0, 1\\)"),
    ("idlm", {"loss_eps": 0}, "method.loss_eps=0.0 is invalid: must be in"),
    ("idlm", {"fake_steps": 0}, "method.fake_steps=0 is invalid: must be >= 1"),
    ("idlm", {"data_weight": -1}, "method.data_weight=-1.0 is invalid: must be >= 0"),
    ("idlm", {"t_min": 0.5, "t_max": 0.2}, "method.t_min/t_max=\\(0.5, 0.2\\) is invalid: must satisfy"),
    ("idlm", {"relax": "gaussian"}, "method.relax='gaussian' is invalid: needs a uniform-state teacher"),
    ("sdtt", {"loss_dtype": "float16"}, "method.loss_dtype='float16' is invalid: must be float32 or float64"),
    ("boot", {"r2": "some"}, "method.r2='some' is invalid: must be 'jump' or 'all'"),
])
def test_out_of_range_method_settings_name_their_key(teacher, tmp_path, name, change, match):
    """Values that raised ZeroDivisionError or trained silently with a meaningless setting."""
    with pytest.raises(FewstepError, match=match):
        prepare(distill_cfg(teacher, tmp_path / "run", name, **change), "cpu")


def test_wrong_teacher_kind_shape_and_model_section(teacher, ar_ckpt, pydoc_data, tmp_path):
    with pytest.raises(FewstepError, match="'ar' model.*masked diffusion"):
        prepare(distill_cfg(ar_ckpt, tmp_path / "r1", "sdtt"), "cpu")
    small = tmp_path / "small"
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, small, **{"model.d_model": 16, "train.max_steps": 1})))
    with pytest.raises(FewstepError, match="does not match the teacher: d_model 16 vs 32"):
        prepare(distill_cfg(teacher, tmp_path / "r2", "sdtt", init=str(small)), "cpu")
    cfg = distill_cfg(teacher, tmp_path / "r3", "boot")
    cfg.model.d_model = 64
    with pytest.raises(FewstepError, match="remove \\[model\\]"):
        prepare(cfg, "cpu")


def test_halving_schedule():
    h = Halving(8, 1, 5)
    assert h.n_rounds == 4 and h.planned == 20
    assert [h.steps(s) for s in (0, 4, 5, 10, 15, 19, 40)] == [8, 8, 4, 2, 1, 1, 1]
    assert [s for s in range(30) if h.ends_round(s)] == [4, 9, 14]
    for bad in [(6, 4, 5), (2, 4, 5), (8, 0, 5), (8, 1, 0)]:
        with pytest.raises(FewstepError):
            Halving(*bad)


def test_divergences_match_closed_forms():
    p, q = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]], dtype=torch.float64)
    log_p, log_q = torch.where(torch.stack([p, q]) > 0, torch.stack([p, q]).log(), -1e6)[:, None]  # SUBS log 0
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    mse = ((math.log(0.5) - math.log(0.9)) ** 2 + (math.log(0.5) - math.log(0.1)) ** 2) / 2  # the 2 live tokens
    expect = {"kl_reverse": kl_pq, "kl_forward": kl_qp, "tvd": 0.4, "mse": mse}
    assert set(expect) == set(DIVERGENCES)
    for name, value in expect.items():
        got = DIVERGENCES[name](log_p, log_q)
        assert got.item() == pytest.approx(value, rel=1e-12), name
        assert DIVERGENCES[name](log_p, log_p).item() == pytest.approx(0.0, abs=1e-7)  # zero at equality
    shifted = log_p.clone()
    shifted[..., 2] -= 3.0  # SUBS: the mask column is NEG_INF minus each model's own log-normaliser
    assert DIVERGENCES["mse"](shifted, log_q).item() == pytest.approx(mse, rel=1e-12)  # not part of either law
    two = DIVERGENCES["kl_reverse"](torch.cat([log_p, log_q]), torch.cat([log_q, log_q]))  # mean over positions
    assert two.item() == pytest.approx(kl_pq / 2, rel=1e-6)
    per = DIVERGENCES["kl_reverse"](torch.stack([log_p, log_q]), torch.stack([log_q, log_q]), reduction="none")
    assert per.shape == (2, 1) and per[0, 0].item() == pytest.approx(kl_pq) and per[1, 0].item() == 0.0
    empty = DIVERGENCES["kl_reverse"](torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 3))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(FewstepError, match="unknown divergence"):
        get_divergence("js")


def test_sample_on_step_reports_every_step(teacher):
    from fewstep.diffusion.sampling import sample
    from fewstep.diffusion.schedule import get_schedule

    model, _ = checkpoint.load_model(teacher)
    seen = []
    x = sample(model, get_schedule(), batch=2, length=32, steps=3, mask_id=model.mask_id,
               generator=torch.Generator().manual_seed(0),
               on_step=lambda k, t, s, x_t, log_p, x_s: seen.append((k, t, s, log_p.shape, x_s.clone())))
    assert [(k, round(t, 3), round(s, 3)) for k, t, s, *_ in seen] == [(0, 1.0, 0.667), (1, 0.667, 0.333),
                                                                       (2, 0.333, 0.0)]
    assert seen[0][3] == (2, 32, model.mask_id + 1) and torch.equal(seen[-1][4], x)


def test_compare_grid_writes_rows_table_and_acceptance(teacher, ar_ckpt, tmp_path):
    from fewstep.distill.compare import compare

    distill(distill_cfg(teacher, tmp_path / "boot", "boot"))
    rows = compare(str(teacher), {"BOOT": str(tmp_path / "boot")}, str(ar_ckpt), teacher_steps=(2, 4),
                   student_steps=(4,), n=2, batch=2, temperature=0.9, out=str(tmp_path / "res"))
    assert [(r["name"], r["steps"], r["greedy_tail"]) for r in rows] == [
        ("teacher", 2, False), ("teacher", 2, True), ("teacher", 4, False), ("teacher", 4, True),
        ("teacher T=0.9", 4, False), ("BOOT", 4, False), ("BOOT", 4, True)]
    assert all(r["n_samples"] == 2 and r["seed"] == 0 and math.isfinite(r["gen_ppl"]) for r in rows)
    assert len((tmp_path / "res" / "results.jsonl").read_text().splitlines()) == len(rows)
    text = (tmp_path / "res" / "table.md").read_text()
    assert "BOOT @4 seed 0 (no greedy tail)" in text and "teacher T=0.9 @4" in text
    off = compare(str(teacher), {"BOOT": str(tmp_path / "boot")}, str(ar_ckpt), teacher_steps=(4,),
                  student_steps=(4,), n=2, batch=2, greedy_tail=False)
    assert [(r["name"], r["greedy_tail"]) for r in off] == [("teacher", False), ("BOOT", False)]
    assert [r["gen_ppl"] for r in off] == [rows[2]["gen_ppl"], rows[5]["gen_ppl"]]  # the same rows, same seed


def test_acceptance_needs_every_seed_and_compares_with_sharpening():
    from fewstep.distill.compare import acceptance

    def row(name, steps, seed, ppl, ent):
        return {"name": name, "steps": steps, "greedy_tail": False, "seed": seed, "gen_ppl": ppl, "entropy": ent}

    rows = [row("teacher", 4, 0, 50.0, 2.90), row("teacher", 64, 0, 45.0, 3.00), row("teacher T=0.9", 4, 0, 46.0, 2.88),
            row("teacher", 4, 1, 52.0, 2.90), row("teacher", 64, 1, 46.0, 3.00), row("teacher T=0.9", 4, 1, 48.0, 2.88),
            row("S", 4, 0, 47.0, 2.89), row("S", 4, 1, 53.0, 2.90),  # passes at seed 0 only
            row("R", 4, 0, 45.0, 2.95), row("R", 4, 1, 49.0, 2.70)]  # seed 1: entropy 10% off
    lines = acceptance(rows)
    assert lines[0].endswith("PASS; teacher T=0.9 @4: 46.00 / 2.880 -> does not beat sharpening")
    assert "-> FAIL" in lines[1] and lines[2] == "S: FAIL at 1 of 2 seeds"
    assert lines[3].endswith("-> beats sharpening") and "(10.0% off) -> FAIL" in lines[4]
    assert lines[5] == "R: FAIL at 1 of 2 seeds"
    one = acceptance([r for r in rows if r["seed"] == 0 and r["name"] != "teacher T=0.9"])
    assert len(one) == 2 and one[0].endswith("-> PASS") and one[1].endswith("-> PASS")  # one seed: no summary line
