"""`fewstep experiment <config>`: the repeated-data study and the distillation study in one resumable command.

Stages (each writes <runs_dir>/stages/<stage>.json holding its config key and result; a stage whose file exists
with the same key is skipped, so a rerun after a crash or an edit redoes only what is missing or changed):
  train/<kind>_<budget>    AR and MDLM pre-training at every data.unique_tokens x data.epochs pair of the grid,
                           same [data], [model] and [train] for both kinds (pipeline.pretrain)
  val/<kind>_<budget>      held-out NLL (exact for AR, NELBO bound for MDLM; eval.likelihood.val_ppl)
  train/judge              only for judge.spec = "train": an AR judge on all unique tokens for a few epochs
  distill/<method>_<t>     each configured method on each chosen MDLM teacher (distill.run.distill); AR-teacher
                           methods (tcs, onpolicy) take the AR model of the teacher's budget
  gen/<model>              gen PPL under one judge + unigram entropy per step count (eval.harness.sample_eval)
  bench/<t>                latency of one batch at the experiment's length for teacher <t>, each of its students
                           and the KV-cached AR model of its budget, all in one process, so every latency ratio
                           comes from one run (eval.bench.bench_from_args); redone when any of them changes
The report (experiment/report.py) is rebuilt from the stage files on every run. Under torchrun the training
stages run on every rank and the measurements on rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path

from fewstep import checkpoint
from fewstep.config import FewstepError, to_dict
from fewstep.experiment.config import ExperimentConfig, _methods, label, load


class Missing(Exception):
    """A stage that has not run, met in report-only mode: what depends on it is left out of the report."""


class Runner:
    """Runs the stages in order; `ran` lists the stages computed in this call (the rest were done before).
    report_only: run nothing; write the report from the stages already done (`missing` lists the others)."""

    def __init__(self, ex: ExperimentConfig, log=print, report_only: bool = False):
        from fewstep.train import init_distributed

        self.ex, self.log, self.ran, self.fp, self.seconds = ex, log, [], {}, {}
        self.report_only, self.missing = report_only, []
        self.rank, self.world, self.device = init_distributed()
        self.runs = Path(ex.experiment.runs_dir)

    def _barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and not getattr(self, "solo", False):
            dist.barrier()

    def stage(self, name: str, key, fn, all_ranks: bool = False, out: str | None = None):
        """fn()'s result, computed once per key: <runs_dir>/stages/<name>.json holds {key, result}. `out`: the
        checkpoint dir the stage trains; later stages' keys carry its fingerprint, so they rerun when it does."""
        path = self.runs / "stages" / f"{name}.json"
        key = json.loads(json.dumps(key, default=str))
        if out:
            self.fp[out] = hashlib.sha1(json.dumps(_what_counts(key), sort_keys=True).encode()).hexdigest()[:12]
        if path.is_file():
            done = json.loads(path.read_text(encoding="utf-8"))
            if _what_counts(done.get("key")) == _what_counts(key):
                self.log(f"[skip] {name}: done")
                self.seconds[name] = done.get("seconds")
                return done["result"]
            if out and checkpoint.latest(out) is not None and not self.report_only:  # would mix two configs
                what = _diff(_what_counts(done.get("key")), _what_counts(key))
                raise FewstepError(f"{out} was trained with other settings ({what}): delete it, or set "
                                   "experiment.runs_dir to start the experiment afresh")
        if self.report_only:
            self.missing.append(name)
            raise Missing(name)
        result = None
        if all_ranks or self.rank == 0:
            self.log(f"[run] {name}")
            t0 = time.perf_counter()
            result = json.loads(json.dumps(fn(), default=str))
            self.seconds[name] = time.perf_counter() - t0
            if isinstance(result, dict):
                result["stage_seconds"] = self.seconds[name]
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"key": key, "result": result, "seconds": self.seconds[name]}
            checkpoint.write_text_atomic(path, json.dumps(record, indent=1))  # a kill leaves no half-written marker
            self.ran.append(name)
        self._barrier()
        return json.loads(path.read_text(encoding="utf-8"))["result"]

    def pretrain(self, kind: str, unique_tokens: int, epochs: float, name: str, max_steps: int = 0) -> dict:
        from fewstep.pipeline import pretrain

        cfg = copy.deepcopy(self.ex.base)
        cfg.model.kind, cfg.data.unique_tokens, cfg.data.epochs = kind, unique_tokens, epochs
        cfg.train.max_steps = max_steps or cfg.train.max_steps
        cfg.train.out_dir = str(self.runs / "train" / name)
        s = self.stage(f"train/{name}", to_dict(cfg), lambda: pretrain(cfg), all_ranks=True, out=cfg.train.out_dir)
        return {"ckpt": cfg.train.out_dir, "fp": self.fp[cfg.train.out_dir], "kind": kind,
                "unique_tokens": unique_tokens, "epochs": epochs,
                "train_steps": s["steps"], "epochs_seen": s.get("epochs_seen"), "params": s.get("params"),
                "train_seconds": s.get("stage_seconds")}

    def validate(self, run: dict, name: str) -> dict:
        def fn():
            from fewstep.checkpoint import load_model
            from fewstep.eval.likelihood import val_ppl

            model, meta = load_model(run["ckpt"], self.device)
            return val_ppl(model, meta, max_batches=self.ex.eval.val_batches, mc=self.ex.eval.val_mc,
                           device=self.device)
        key = {"ckpt": run, "val_batches": self.ex.eval.val_batches,  # AR's NLL is exact: no time samples
               **({"val_mc": self.ex.eval.val_mc} if run["kind"] != "ar" else {})}
        return {**run, **self.stage(f"val/{name}", key, fn), "name": name}

    def run(self) -> dict:
        ex, ev = self.ex, self.ex.eval
        t0 = time.perf_counter()
        grid = []
        for u in ex.experiment.unique_tokens:
            for e in ex.experiment.epochs:
                for kind in ("ar", "mdlm"):
                    name = f"{kind}_{label(u, e)}"
                    with self.optional():
                        grid.append(self.validate(self.pretrain(kind, u, e, name), name))
        if not any(r["kind"] == "mdlm" for r in grid):
            raise FewstepError(f"no MDLM pre-training stage of {ex.experiment.name} is done yet: nothing to report")
        judge = None
        with self.optional():
            judge = self.judge_path(grid)
        mdlm = [r for r in grid if r["kind"] == "mdlm"]
        top = max(r["unique_tokens"] or float("inf") for r in mdlm)
        picked = {}
        for t in ex.distill.teachers:
            pool = (mdlm if t == "all" else [r for r in mdlm if (r["unique_tokens"] or float("inf")) == top]
                    if t == "largest" else [r for r in mdlm if label(r["unique_tokens"], r["epochs"]) == t])
            if not pool:  # report-only, before this teacher's stages are done
                self.missing.append(f"teacher {t}")
                continue
            for r in pool if t == "all" else [min(pool, key=lambda r: r["val_nll"])]:  # largest: best epochs
                picked[label(r["unique_tokens"], r["epochs"])] = r
        many = len(picked) > 1
        models = []  # what is measured: teachers, students and the AR model of each teacher's budget
        for tl, teacher in picked.items():
            ar = next((r for r in grid if r["kind"] == "ar" and label(r["unique_tokens"], r["epochs"]) == tl), None)
            if ar is None:  # report-only, before the AR run of this budget is done
                continue
            tag, start = f" {tl}" if many else "", len(models)
            models.append(dict(name=f"teacher{tag}", ckpt=teacher["ckpt"], steps=ev.teacher_steps, role="teacher"))
            models += [dict(name=f"teacher{tag} T={T:g}", ckpt=teacher["ckpt"], steps=[ev.ref_steps],
                            role="teacher_T", temperature=T) for T in ev.teacher_temperatures]  # not timed: same cost
            for m in ex.distill.methods:
                cfg = copy.deepcopy(ex.methods[m])
                src = ar if getattr(_methods()[m], "teacher_kinds", ("mdlm",)) == ("ar",) else teacher
                cfg.method["teacher"], cfg.train.out_dir = src["ckpt"], str(self.runs / "distill" / f"{m}_{tl}")
                cfg.data.unique_tokens = src["unique_tokens"]  # the teacher's data budget, no more unique tokens
                from fewstep.distill.run import distill

                with self.optional() as done:
                    self.stage(f"distill/{m}_{tl}", {**to_dict(cfg), "teacher_fp": src["fp"]},
                               lambda cfg=cfg: distill(cfg), all_ranks=True, out=cfg.train.out_dir)
                if not done:
                    continue
                models.append(dict(name=f"{m}{tag}", ckpt=cfg.train.out_dir, steps=ev.student_steps, role=m))
                if m == "didi" and ev.rgas and cfg.method.get("reward", "disc") == "disc":  # RGAS needs the disc
                    models.append(dict(name=f"didi+RGAS{tag}", ckpt=cfg.train.out_dir, steps=ev.student_steps,
                                       role="didi+RGAS", guide=True))
            models.append(dict(name=f"AR{tag}", ckpt=ar["ckpt"], steps=[1], role="ar"))
            for mod in models[start:]:
                mod.update(group=tl, ar=ar["ckpt"])
        if self.rank != 0:  # the measurements below are rank 0's alone: no collective call may follow
            return {"stages_run": self.ran}
        self.solo = True
        gen, bench = [], []
        for g in dict.fromkeys(mod["group"] for mod in models):  # first: a run cut during the gen stages keeps them
            with self.optional():
                ar_name = next(mod["name"] for mod in models if mod["group"] == g and mod["role"] == "ar")
                bench += self.bench(g, [mod for mod in models if mod["group"] == g
                                        and mod["role"] not in ("ar", "teacher_T")], ar_name)
        for mod in models:
            with self.optional():
                if judge is None:
                    raise Missing("the judge")
                gen += [{**r, "role": mod["role"], "group": mod["group"]}
                        for r in self.gen(mod["name"], mod["ckpt"], mod["steps"], judge, mod.get("guide", False),
                                          mod.get("temperature", 1.0))]
        from fewstep.experiment.report import write

        info = {"config": {"experiment": dataclasses.asdict(ex.experiment), "base": to_dict(ex.base),
                           "judge": dataclasses.asdict(ex.judge), "distill": dataclasses.asdict(ex.distill),
                           "eval": dataclasses.asdict(ev)},
                "judge": judge, "judge_run": getattr(self, "judge_run", None), "teachers": list(picked),
                "stages_run": self.ran, "wall_seconds": time.perf_counter() - t0, "stage_seconds": self.seconds,
                "stages_missing": self.missing}
        out = write(ex.experiment.results_dir, grid, gen, bench, info)
        return {**out, "stages_run": self.ran, "wall_seconds": info["wall_seconds"]}

    @contextlib.contextmanager
    def optional(self):
        """In report-only mode a stage not yet done leaves out what depends on it: yields [True], emptied on Missing
        (falsy), so the caller can tell."""
        done = [True]
        try:
            yield done
        except Missing as e:
            if not self.report_only:
                raise
            self.log(f"[missing] {e}")
            done.clear()

    def judge_path(self, grid: list[dict]) -> str:
        """The judge spec: our own AR checkpoint as "ckpt:<path>", or a smollm2 / hf: spec unchanged."""
        j = self.ex.judge
        if j.spec == "best_ar":
            ars = [r for r in grid if r["kind"] == "ar"]
            if not ars:  # report-only, before any AR stage is done
                raise Missing("the judge (best_ar: no AR run done yet)")
            return "ckpt:" + min(ars, key=lambda r: r["val_nll"])["ckpt"]
        if j.spec == "train":
            self.judge_run = self.validate(self.pretrain("ar", j.unique_tokens, j.epochs, "judge", j.max_steps),
                                           "judge")
            return "ckpt:" + self.judge_run["ckpt"]
        return j.spec

    def _rgas(self) -> dict:
        """The RGAS settings of eval (a stage key part, and what the sampler is built with)."""
        ev = self.ex.eval
        return {"scale": list(ev.rgas_scale), "candidates": ev.rgas_candidates, "rerank": ev.rgas_rerank}

    def gen(self, name: str, ckpt: str, steps: list[int], judge: str, guide: bool = False,
            temperature: float = 1.0) -> list[dict]:
        """guide: sample with DiDi-Instruct's RGAS, the discriminator being the one saved in `ckpt`."""
        ev = self.ex.eval

        def fn():
            import torch

            from fewstep.checkpoint import load_model
            from fewstep.data import get_tokenizer
            from fewstep.eval.harness import sample_eval

            j = self._judge(judge)
            model, meta = load_model(ckpt, self.device)
            tok = get_tokenizer(meta["data"]["tokenizer"])
            guidance = None
            if guide:
                from fewstep.diffusion.schedule import schedule_of
                from fewstep.distill.rgas import rgas_for

                guidance = rgas_for(ckpt, model, schedule_of(meta), self.device, **self._rgas())
            rows = []
            for k in steps:
                torch.manual_seed(ev.seed)
                rows.append(sample_eval(model, meta, steps=k, n=ev.n, tokenizer=tok, judge=j, batch=ev.batch,
                                        seed=ev.seed, greedy_tail=ev.greedy_tail, device=self.device, name=name,
                                        guidance=guidance, temperature=temperature))
            return rows
        from fewstep.eval.genppl import PROTOCOL

        key = {"ckpt": ckpt, "fp": self.fp.get(ckpt), "steps": steps, "judge": judge, **self._guide_key(guide),
               "genppl_protocol": PROTOCOL, **({"temperature": temperature} if temperature != 1 else {}),
               "judge_fp": self.fp.get(judge[5:]), **{k: getattr(ev, k) for k in
               ("n", "batch", "seed", "greedy_tail")}}
        return self.stage(f"gen/{name.replace(' ', '_')}", key, fn)

    def _judge(self, spec: str):
        if getattr(self, "_j", (None,))[0] != spec:
            from fewstep.eval.judge import load_judge

            self._j = (spec, load_judge(spec, self.device))  # ckpt: ours, EOS as its start of text (ar_judge)
        return self._j[1]

    def _guide_key(self, guide: bool) -> dict:
        return {"rgas": self._rgas()} if guide else {}  # unguided stages keep their keys from before RGAS rows

    def bench(self, group: str, mods: list[dict], ar_name: str = "AR") -> list[dict]:
        """Latency rows of every DLM of one teacher group (mods) and of its AR model (`ar_name`), timed in one
        process; the AR model once, first, and every speed-up over it from that one timing."""
        ev, g = self.ex.eval, self._rgas()

        def one(mod: dict, ar: bool) -> list[dict]:
            import argparse

            from fewstep.eval.bench import add_args, bench_from_args

            p = argparse.ArgumentParser()
            add_args(p)
            ckpt = mod["ckpt"]
            args = p.parse_args(["--ckpt", ckpt, *(["--ar-ckpt", mod["ar"]] if ar else []),
                                 "--steps", ",".join(map(str, mod["steps"])),
                                 "--batches", str(ev.bench_batch), "--length", str(self.ex.base.model.seq_len),
                                 "--repeats", str(ev.bench_repeats), "--hf", "none", "--device", str(self.device),
                                 *(["--guide", ckpt, "--guide-scale", ",".join(map(str, g["scale"])),
                                    "--guide-candidates", str(g["candidates"]), "--guide-rerank",
                                    str(g["rerank"])] if mod.get("guide") else [])])
            rows, _ = bench_from_args(args, log=lambda msg: None)
            return [{**r, "name": mod["name"], "model": mod["name"], "role": mod["role"], "group": group}
                    if r.get("kind") == "mdlm" else
                    {**r, "name": f"{ar_name} KV-cache", "model": ar_name, "role": "ar", "group": group}
                    for r in rows]

        def fn() -> list[dict]:
            rows = [r for i, m in enumerate(mods) for r in one(m, ar=i == 0)]
            ar = next(r for r in rows if r.get("kind") == "ar")
            for r in rows:
                if r.get("kind") == "mdlm" and r.get("latency_s") and ar.get("latency_s"):
                    r["speedup_vs_ar"] = ar["latency_s"] / r["latency_s"]
            return rows
        key = {"models": [{"name": m["name"], "ckpt": m["ckpt"], "fp": self.fp.get(m["ckpt"]), "steps": m["steps"],
                           **self._guide_key(m.get("guide", False))} for m in mods],
               "ar": mods[0]["ar"], "ar_fp": self.fp.get(mods[0]["ar"]), "batch": ev.bench_batch,
               "repeats": ev.bench_repeats, "length": self.ex.base.model.seq_len}
        return self.stage(f"bench/{group}", key, fn)


def _what_counts(key):
    """A stage key without the run settings that do not change what a training stage produces (how it logs,
    evaluates, saves and executes: `train.RESUME_MAY_CHANGE`, except its length), so changing them neither reruns
    a stage nor refuses its checkpoint, as a plain resume allows."""
    from fewstep.train import RESUME_MAY_CHANGE

    if not (isinstance(key, dict) and isinstance(key.get("train"), dict) and isinstance(key.get("data"), dict)):
        return key
    drop = RESUME_MAY_CHANGE - {"train.max_steps"}
    return {**key, **{sec: {k: v for k, v in key[sec].items() if f"{sec}.{k}" not in drop}
                      for sec in ("train", "data")}}


def _diff(old, new, where: str = "") -> str:
    """The first setting that differs between two stage keys, as 'train.lr 0.001 -> 0.0005'."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in dict.fromkeys([*old, *new]):
            if old.get(k) != new.get(k):
                return _diff(old.get(k), new.get(k), f"{where}.{k}" if where else k)
    return f"{where or 'settings'} {old!r} -> {new!r}"


def run_experiment(config: str, overrides: list[str] = (), log=print, report_only: bool = False) -> dict:
    """Load the experiment config, run (or resume) every stage, write the report; returns what was written.
    report_only: run nothing, and write the report from the stages already done (a cut run, another machine's
    stage files)."""
    return Runner(load(config, overrides), log, report_only).run()
