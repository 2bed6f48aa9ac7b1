"""The experiment's report: result files, markdown tables, PNG plots and a summary whose claims are computed.

Two derived quantities:
* Crossover (per unique-token budget): the sign of MDLM val NLL - AR val NLL across the epoch counts. The MDLM
  number is a NELBO upper bound, so "MDLM below AR" is conclusive and "AR below MDLM" is not, beyond the noise of
  the estimates: both kinds score the same held-out sequences, so a difference's standard error is that of the
  per-sequence differences (the sequences' spread and the bound's time samples; the AR side leaves out each
  sequence's first token).
* Speed-up at matched gen PPL (per student): k* = the smallest student step count whose gen PPL is <= the
  teacher's gen PPL at its reference step count (eval.ref_steps); speed-up = latency(teacher @ ref) /
  latency(student @ k*), both from the same benchmark settings. Reported with both entropies: a student that
  matches gen PPL only by losing entropy is flagged. Against the baseline of no distillation, the teacher itself
  sampled with k* steps: a speed-up is credited to distillation only when the teacher @k* is worse than its @ref
  beyond the sampling noise and the student @k* is better than the teacher @k* beyond it. With
  eval.teacher_temperatures, against sharpening too (a lower temperature lowers gen PPL and entropy): the teacher
  @ref at the measured temperatures (1 included) of entropy nearest the student's from below (sharp_lo_*) and from
  above (sharp_hi_*), z = the student's log gen PPL below each in standard errors. sharpening = "beats" when the
  student is below the lo row beyond the noise (lower gen PPL at no less entropy), "matched" when the hi row is not
  worse than the student beyond it (as good at no less entropy), else "unresolved".
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fewstep.eval.genppl import z_gap
from fewstep.report import _fmt, line_plot, markdown_table, plot

GEN_COLS = ["name", "steps", "sampler", "greedy_tail", "precision", "n_samples", "seed", "gen_ppl", "entropy",
            "judge", "seconds_per_sample"]
BENCH_COLS = ["name", "steps", "batch", "seq_len", "precision", "device", "latency_s", "tokens_per_s",
              "speedup_vs_ar"]
ENTROPY_TOL = 0.05  # a relative entropy drop beyond this is flagged next to a gen PPL win


def _get(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _diff_se(grid: list[dict], u: int, e_ar: float, e_mdlm: float) -> float | None:
    """Standard error of (MDLM @e_mdlm - AR @e_ar) val NLL from their per-sequence NLLs on the same held-out
    sequences (module doc); None where a run has none (stage files from before they were kept)."""
    a, m = (_get(grid, kind=k, unique_tokens=u, epochs=e).get("val_seq_nll") for k, e in (("ar", e_ar),
                                                                                          ("mdlm", e_mdlm)))
    if not a or not m or len(a) != len(m) or len(a) < 2:
        return None
    return statistics.stdev(y - x for x, y in zip(a, m)) / math.sqrt(len(a))


def crossover(grid: list[dict]) -> list[dict]:
    """Per budget: AR and MDLM val NLL at each epoch count, which is ahead, and a one-line verdict."""
    out = []
    for u in sorted({r["unique_tokens"] for r in grid}):
        eps = sorted({r["epochs"] for r in grid if r["unique_tokens"] == u  # both kinds done (a partial report)
                      and all(_get(grid, kind=k, unique_tokens=u, epochs=r["epochs"]) for k in ("ar", "mdlm"))})
        if not eps:
            continue
        ar = [_get(grid, kind="ar", unique_tokens=u, epochs=e)["val_nll"] for e in eps]
        md = [_get(grid, kind="mdlm", unique_tokens=u, epochs=e)["val_nll"] for e in eps]
        ahead = [m < a for m, a in zip(md, ar)]
        E = lambda i, eps=eps: f"E={eps[i]:g}"
        if all(ahead):
            verdict = f"MDLM (bound) below AR at every epoch count ({E(0)} to {E(-1)}): no crossover in the grid"
        elif not any(ahead):
            trend = "narrows" if md[-1] - ar[-1] < md[0] - ar[0] else "widens"
            verdict = (f"AR below MDLM at every epoch count: no crossover up to {E(-1)} (gap {md[0] - ar[0]:.3f} "
                       f"nats at {E(0)}, {md[-1] - ar[-1]:.3f} at {E(-1)}: it {trend})")
        elif ahead == sorted(ahead):
            i = ahead.index(True)
            verdict = f"crossover: AR ahead up to {E(i - 1)}, MDLM (bound) ahead from {E(i)}"
        else:
            verdict = "mixed: MDLM (bound) ahead at " + ", ".join(E(i) for i, a in enumerate(ahead) if a)
        ia, im = min(range(len(eps)), key=lambda i: ar[i]), min(range(len(eps)), key=lambda i: md[i])
        if ia < len(eps) - 1:
            verdict += f"; AR's held-out NLL is lowest at {E(ia)} and rises after it (over-fitting)"
        best_se = _diff_se(grid, u, eps[ia], eps[im])
        if len(eps) > 1:  # each kind at its own best epoch count: what a budget-limited user would train
            gap = md[im] - ar[ia]
            verdict += (f"; best of each: AR {ar[ia]:.3f} ({E(ia)}), MDLM {md[im]:.3f} ({E(im)}), "
                        f"{'MDLM' if gap < 0 else 'AR'} ahead by {abs(gap):.3f} nats")
            if best_se:
                n = len(_get(grid, kind="ar", unique_tokens=u, epochs=eps[ia])["val_seq_nll"])
                verdict += f" ({abs(gap) / best_se:.1f} standard errors, paired over {n} held-out sequences)"
        out.append({"unique_tokens": u, "epochs": eps, "ar_val_nll": ar, "mdlm_val_nll": md, "mdlm_ahead": ahead,
                    "diff_se": [_diff_se(grid, u, e, e) for e in eps],
                    "crossover": any(ahead) and not all(ahead) and ahead == sorted(ahead),
                    "best_ar": [eps[ia], ar[ia]], "best_mdlm": [eps[im], md[im]], "best_diff_se": best_se,
                    "verdict": verdict})
    return out


def _student(r: dict) -> bool:
    return r["role"] not in ("teacher", "teacher_T", "ar")  # teacher_T: the teacher at another temperature


def _control(gen: list[dict], group, ref: int, t: dict | None, hit: dict | None) -> dict:
    """The matched student against the teacher @ref sharpened (module doc): lo / hi = the measured temperature (T = 1
    included) of entropy nearest the student's from below / above, with z of the student below each. {} without
    eval.teacher_temperatures."""
    temps = [r for r in gen if r["group"] == group and r["role"] == "teacher_T" and r["steps"] == ref]
    if not (temps and t and hit):
        return {}
    out = {}
    for side, pool, pick in (("lo", [r for r in [t, *temps] if r["entropy"] <= hit["entropy"]], max),
                             ("hi", [r for r in [t, *temps] if r["entropy"] >= hit["entropy"]], min)):
        c = pick(pool, key=lambda r: r["entropy"]) if pool else {}
        out.update({f"sharp_{side}_temperature": c.get("temperature", 1.0) if c else None,
                    f"sharp_{side}_gen_ppl": c.get("gen_ppl"), f"sharp_{side}_entropy": c.get("entropy"),
                    f"sharp_{side}_z": z_gap(hit, c) if c else None})
    lo, hi = out["sharp_lo_z"], out["sharp_hi_z"]
    out["sharpening"] = ("beats" if lo is not None and lo >= 2 else "matched" if hi is not None and hi < 2
                         else "unresolved")
    return out


def matched_speedup(gen: list[dict], bench: list[dict], ref: int) -> list[dict]:
    """One row per student: k*, both gen PPLs and entropies, both latencies and their ratio (module doc)."""
    out = []
    for g in dict.fromkeys(r["group"] for r in gen):
        t = _get(gen, group=g, role="teacher", steps=ref)
        t_lat = _get(bench, group=g, role="teacher", kind="mdlm", steps=ref)
        for name in dict.fromkeys(r["name"] for r in gen if r["group"] == g and _student(r)):
            rows = sorted((r for r in gen if r["name"] == name), key=lambda r: r["steps"])
            hit = next((r for r in rows if t and r.get("gen_ppl") is not None and r["gen_ppl"] <= t["gen_ppl"]), None)
            s_lat = hit and _get(bench, name=name, kind="mdlm", steps=hit["steps"])
            row = {"student": name, "teacher_ref_steps": ref, "teacher_gen_ppl": t and t.get("gen_ppl"),
                   "teacher_entropy": t and t["entropy"], "matched_steps": hit and hit["steps"],
                   "student_gen_ppl": hit and hit["gen_ppl"], "student_entropy": hit and hit["entropy"],
                   "teacher_latency_s": t_lat and t_lat.get("latency_s"),
                   "student_latency_s": s_lat and s_lat.get("latency_s"), "speedup": None, "entropy_flag": False,
                   "z_below_teacher": z_gap(hit, t) if hit else None}
            tk = hit and _get(gen, group=g, role="teacher", steps=hit["steps"])  # the baseline: no distillation
            row.update(teacher_at_k_gen_ppl=tk and tk.get("gen_ppl"), teacher_at_k_z_above_ref=z_gap(t, tk) if tk
                       else None, z_below_teacher_at_k=z_gap(hit, tk) if tk else None,
                       **_control(gen, g, ref, t, hit))
            if row["teacher_latency_s"] and row["student_latency_s"]:
                row["speedup"] = row["teacher_latency_s"] / row["student_latency_s"]
            if hit and t:
                row["entropy_flag"] = hit["entropy"] < (1 - ENTROPY_TOL) * t["entropy"]
            out.append(row)
    return out


def _equal_steps(gen: list[dict]) -> list[dict]:
    out = []
    for s in filter(_student, gen):
        t = _get(gen, group=s["group"], role="teacher", steps=s["steps"])
        if t and s.get("gen_ppl") is not None and t.get("gen_ppl") is not None:
            out.append({"student": s["name"], "steps": s["steps"], "student_gen_ppl": s["gen_ppl"],
                        "teacher_gen_ppl": t["gen_ppl"], "gen_ppl_ratio": s["gen_ppl"] / t["gen_ppl"],
                        "z_below_teacher": z_gap(s, t),
                        "student_entropy": s["entropy"], "teacher_entropy": t["entropy"]})
    return out


def _params(grid) -> str:
    """'854,528 (AR) / 854,784 (MDLM)': the MDLM has one more embedding row (the mask token)."""
    n = {r["kind"]: r.get("params") for r in grid if r.get("params")}
    return " / ".join(f"{_fmt(v)} ({k.upper()})" for k, v in sorted(n.items())) or "?"


def _plots(out: Path, grid, gen, bench, ref) -> list[Path]:
    lines = {}
    for r in grid:
        lines.setdefault(f"{r['kind'].upper()} U={r['unique_tokens']:,}", []).append(
            (r["epochs"], r["val_nll"], r.get("val_nll_se")))
    bars = ", bars: ±1 standard error" if any(r.get("val_nll_se") for r in grid) else ""
    made = [line_plot(lines, out / "val_loss_vs_epochs.png", title=f"Held-out NLL vs epochs (MDLM: NELBO bound{bars})",
                      xlabel="epochs over the unique tokens", ylabel="val NLL (nats/token)", logx=2)]
    drop = ("latency_s", "tokens_per_s", "seconds_per_sample", "speedup_vs_ar")
    made += plot([{**{k: v for k, v in r.items() if k not in drop}, **({"steps": None} if r["role"] == "ar" else {})}
                  for r in gen], out)  # gen_ppl / entropy vs steps; the AR model as a dashed line
    made += plot(bench, out)  # latency / speed-up over AR vs steps; AR as a dashed line
    pareto, refs = {}, {}
    for r in gen:
        b = (_get(bench, group=r["group"], kind="ar") if r["role"] == "ar" else  # teacher_T: the teacher's timing
             _get(bench, group=r["group"], role="teacher", kind="mdlm", steps=r["steps"]) if r["role"] == "teacher_T"
             else _get(bench, name=r["name"], kind="mdlm", steps=r["steps"]))
        if b and r.get("gen_ppl") is not None:
            pareto.setdefault(r["name"], []).append((b.get("latency_s"), r["gen_ppl"]))
        if r["role"] == "teacher" and r["steps"] == ref:
            refs[f"{r['name']} @{ref} gen PPL"] = r.get("gen_ppl")
    made.append(line_plot(pareto, out / "gen_ppl_vs_latency.png", refs=refs, logx=10,
                          title="Gen PPL vs latency: speed-up at matched gen PPL", xlabel="latency of one batch (s)",
                          ylabel="gen PPL"))
    return [p for p in made if p is not None]


def _table(rows: list[dict], cols: list[str]) -> str:
    return markdown_table(rows, cols) if rows else "(none)\n"


def by_steps(rows: list[dict], cell) -> str:
    """A markdown table: one row per model (in order of appearance), one column per step count, cell(row) values;
    the AR model's single row goes in an "AR" column."""
    of_ar = lambda r: r.get("kind") == "ar" or r.get("role") == "ar"
    steps = sorted({r["steps"] for r in rows if not of_ar(r)})
    names = list(dict.fromkeys(r["name"] for r in rows))
    if not names:
        return "(none)\n"
    ar = any(map(of_ar, rows))
    lines = ["| model | " + " | ".join(f"@{k}" for k in steps) + (" | AR |" if ar else " |"),
             "|---|" + "---|" * (len(steps) + ar)]
    for n in names:
        mine = [r for r in rows if r["name"] == n]
        is_ar = any(map(of_ar, mine))
        cells = ["" if is_ar else next((cell(r) for r in mine if r["steps"] == k), "") for k in steps]
        if ar:
            cells.append(cell(mine[0]) if is_ar else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out_dir: str, grid: list[dict], gen: list[dict], bench: list[dict], info: dict) -> dict:
    """Write everything under out_dir; returns {"dir", "files", "summary"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = info["config"]["eval"]["ref_steps"]
    for name, rows in (("train.jsonl", grid), ("samples.jsonl", gen), ("bench.jsonl", bench)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cross, speed, equal = crossover(grid), matched_speedup(gen, bench, ref), _equal_steps(gen)
    summary = {**info, "crossover": cross, "matched_speedup": speed, "equal_steps": equal}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    pngs = _plots(out, grid, gen, bench, ref)
    cfg, ev = info["config"], info["config"]["eval"]
    m, d = cfg["base"]["model"], cfg["base"]["data"]
    students = bool(cfg["distill"]["methods"])  # distill.methods = []: a study of pre-training alone
    one = gen[0] if gen else {}
    val_tokens = next((r.get("val_tokens") for r in grid if r["kind"] == "mdlm"), None)
    setup = (f"Data `{d['corpus']}` ({d['tokenizer']} tokens), model d={m['d_model']} x {m['n_layers']} layers, "
             f"L={m['seq_len']}, {_params(grid)} parameters, batch "
             f"{cfg['base']['train']['batch_size']}. Judge `{info['judge']}`; {ev['n']} samples per row, "
             f"seed {ev['seed']}, float64 sampling, greedy tail {'on' if ev['greedy_tail'] else 'off'}, "
             f"{one.get('precision', 'fp32')} on {one.get('device', '?')}; latency: batch {ev['bench_batch']}, "
             f"median of {ev['bench_repeats']}. Val NLL: {_fmt(val_tokens)} held-out tokens (MDLM; AR scores all "
             f"but each sequence's first), MDLM with {ev['val_mc']} NELBO time samples per sequence.")
    has_se = any(se is not None for c in cross for se in c.get("diff_se") or [])  # older stage files: none
    val_rows = [{"unique_tokens": c["unique_tokens"], "epochs": e, "ar_val_nll": a, "mdlm_val_nll": md,
                 "mdlm_minus_ar": md - a, **({"diff_se": se} if has_se else {}),
                 "ahead": "MDLM" if md < a else "AR",
                 "train_steps": _get(grid, kind="ar", unique_tokens=c["unique_tokens"], epochs=e)["train_steps"]}
                for c in cross for e, a, md, se in zip(c["epochs"], c["ar_val_nll"], c["mdlm_val_nll"],
                                                       c.get("diff_se") or [None] * len(c["epochs"]))]
    img = lambda stem: "".join(f"![{p.stem}]({p.name})\n" for p in pngs if p.stem == stem)
    md = [f"# {cfg['experiment']['name']}: repeated data, distillation, speed", "", setup, "",
          "## Validation (held-out; MDLM: NELBO upper bound, AR: exact)", "", _table(val_rows, list(
              val_rows[0]) if val_rows else []), img("val_loss_vs_epochs"),
          *[f"- U={c['unique_tokens']:,}: {c['verdict']}" for c in cross], "",
          f"## Generative perplexity and entropy (teacher(s): {', '.join(info['teachers'])})", "",
          _table(gen, GEN_COLS), img("gen_ppl_vs_steps"), img("entropy_vs_steps"),
          *(["## Students vs teacher at equal steps", "", _table(equal, list(equal[0]) if equal else [])]
            if students else []),
          "## Latency (one batch, vs KV-cached AR at the same length)", "", _table(bench, BENCH_COLS),
          img("latency_vs_steps"), img("speedup_vs_steps"),
          *([f"## Speed-up at matched gen PPL (k*: fewest student steps with gen PPL <= teacher @{ref})", "",
             _table(speed, list(speed[0]) if speed else [])] if students else []), img("gen_ppl_vs_latency")]
    (out / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "SUMMARY.md").write_text(summary_md(cfg["experiment"]["name"], setup, cross, speed, equal, bench,
                                               info, ref, gen=gen, pngs=[p.name for p in pngs], students=students),
                                    encoding="utf-8")
    index = cfg["experiment"].get("index")
    if index and out.resolve().is_relative_to(Path(index).resolve().parent):  # results elsewhere: leave it alone
        write_index(index, out.parent)
    return {"dir": str(out), "files": sorted(p.name for p in out.iterdir()), "summary": str(out / "SUMMARY.md")}


def write_index(path: str, results_root: Path) -> Path:
    """docs/RESULTS.md: every experiment's SUMMARY.md under results_root (image links made relative to path)."""
    import os

    from fewstep import checkpoint

    path = Path(path)
    parts = ["# Results", "", "Written by `fewstep experiment <name>` from the stage files of each experiment; every "
             "number and sentence below is computed (docs/experiments.md). Raw rows and all tables: "
             "`docs/results/<name>/` (results.md, *.jsonl, summary.json).", ""]
    for summary in sorted(results_root.glob("*/SUMMARY.md")):
        rel = Path(os.path.relpath(summary.parent, path.parent)).as_posix()
        text = summary.read_text(encoding="utf-8")
        parts.append(text.replace("](./", f"]({rel}/").replace("](results.md)", f"]({rel}/results.md)"))
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text_atomic(path, "\n".join(parts))
    return path


def _baseline(s: dict) -> str:
    """The matched student against the teacher itself at the same step count (module doc)."""
    zt, zs, k = s.get("teacher_at_k_z_above_ref"), s.get("z_below_teacher_at_k"), s["matched_steps"]
    if zt is None or zs is None:
        return ""
    tk = f"the teacher itself @{k} (gen PPL {_fmt(s['teacher_at_k_gen_ppl'])})"
    if zt < 2:
        return (f"; but {tk} is not worse than its @{s['teacher_ref_steps']} beyond the sampling noise ({zt:+.1f} "
                f"standard errors): this setup shows no gain from distillation at {k} steps")
    if zs < 2:
        return (f"; {tk} is {zt:.1f} standard errors worse than its @{s['teacher_ref_steps']}, but the student's "
                f"edge over it is within the noise ({zs:+.1f}): the gain from distillation is not resolved")
    return f"; {tk} is {zt:.1f} standard errors worse, the student {zs:.1f} below it: a gain from distillation"


def _sharpening(s: dict) -> str:
    """The matched student against the teacher @ref sharpened to a lower temperature (`_control`)."""
    if "sharpening" not in s:
        return ""
    at = lambda side, rel: (f"T={s[f'sharp_{side}_temperature']:g} (gen PPL {_fmt(s[f'sharp_{side}_gen_ppl'])}, "
                            f"entropy {s[f'sharp_{side}_entropy']:.3f} {rel} its own)")
    how = lambda side: "sharpened to " if s[f"sharp_{side}_temperature"] != 1 else "at "  # T=1: the reference row
    ref = s["teacher_ref_steps"]
    if s["sharpening"] == "beats":
        return (f"; it also beats the teacher @{ref} {how('lo')}{at('lo', '<=')} by {s['sharp_lo_z']:.1f} "
                "standard errors: a gain beyond sharpening")
    if s["sharpening"] == "matched":
        return (f"; the teacher @{ref} {how('hi')}{at('hi', '>=')} is as good or better "
                f"({s['sharp_hi_z']:+.1f} standard errors): the student reaches the @{ref} teacher's trade-off "
                "between gen PPL and entropy, not beyond it")
    parts = [f"{at('lo', '<=')}: {s['sharp_lo_z']:+.1f} standard errors" if s["sharp_lo_temperature"] else
             "no measured temperature of no more entropy",
             f"{at('hi', '>=')}: {s['sharp_hi_z']:+.1f}" if s["sharp_hi_temperature"] else
             "no measured temperature of no less entropy"]
    return f"; against the teacher @{ref} sharpened, not resolved at the measured temperatures ({'; '.join(parts)})"


def summary_md(name, setup, cross, speed, equal, bench, info, ref, gen=(), pngs=(), students=True) -> str:
    """The RESULTS.md section of one experiment: every sentence below is computed from the numbers in
    summary.json; the tables are the measured rows, pivoted by step count; pngs: the plots written beside it;
    students: whether any distillation method is configured."""
    img = lambda stem: [f"![{stem}](./{stem}.png)", ""] if f"{stem}.png" in pngs else []
    lines = [f"## Experiment `{name}`", "", setup, ""]
    n_cross = sum(c["crossover"] for c in cross)
    lines.append(f"**AR vs MDLM under repeated data.** A crossover (AR ahead at few epochs, MDLM ahead at more) "
                 f"appears at {n_cross} of {len(cross)} unique-token budgets:")
    lines += [f"- U={c['unique_tokens']:,}: {c['verdict']}." for c in cross]
    lines += ["", *img("val_loss_vs_epochs")]
    if gen:
        import math
        import statistics

        se = [r["gen_ppl_log_se"] for r in gen if math.isfinite(r.get("gen_ppl_log_se") or math.nan)]
        m = statistics.median(se) if se else None
        noise = "" if m is None else (f"; the standard error of log gen PPL is {100 * m:.1f}% per row (median), so "
                                      "two rows differ beyond the sampling noise (2 standard errors of the difference) "
                                      f"when about {283 * m:.0f}% apart")
        lines += [f"**Gen PPL / unigram entropy at @k sampling steps** (one judge; AR: its own full-length "
                  f"sample{noise}).", "",
                  by_steps(gen, lambda r: f"{_fmt(r.get('gen_ppl'))} / {r['entropy']:.3f}"),
                  *img("gen_ppl_vs_steps"), *img("entropy_vs_steps")]
    lat = [r for r in bench if r.get("latency_s")]
    if lat:
        b = lat[0]
        lines += [f"**Latency of one batch** (s; batch {b.get('batch')}, L={b.get('seq_len')}, "
                  f"{b.get('device_name') or b.get('device') or ''}; AR: KV-cached, the same length).", "",
                  by_steps(lat, lambda r: f"{r['latency_s']:.4g}"),
                  *img("latency_vs_steps"), *img("gen_ppl_vs_latency")]
    lines += ["", f"**Distillation** (teacher(s) {', '.join(info['teachers'])}; judge `{info['judge']}`)"
              + ("." if students else ": none in this experiment (distill.methods = []).")]
    for s in speed:
        if s["teacher_gen_ppl"] is None:
            lines.append(f"- {s['student']}: the teacher's @{ref} gen PPL is not measured: no matched-quality claim.")
            continue
        if s["matched_steps"] is None:
            lines.append(f"- {s['student']}: no measured step count reaches the teacher's gen PPL @{ref} "
                         f"({_fmt(s['teacher_gen_ppl'])}): no matched-quality speed-up.")
            continue
        flag = (f" but its entropy is {100 * (1 - s['student_entropy'] / s['teacher_entropy']):.1f}% lower "
                "(part of the gain is lost diversity)" if s["entropy_flag"] else "")
        sp = ("latency not measured" if not s["speedup"] else f"{s['speedup']:.1f}x faster" if s["speedup"] >= 1
              else f"{1 / s['speedup']:.1f}x slower")
        z = s.get("z_below_teacher")
        noise = "" if z is None else (f"; {z:.1f} standard errors below it" if z >= 2 else
                                      f"; a tie within the sampling noise ({z:+.1f} standard errors)")
        lines.append(f"- {s['student']}: matches the teacher @{ref} (gen PPL {_fmt(s['teacher_gen_ppl'])}) at "
                     f"{s['matched_steps']} steps (gen PPL {_fmt(s['student_gen_ppl'])}, entropy "
                     f"{s['student_entropy']:.3f} vs {s['teacher_entropy']:.3f}{noise}){flag}: {sp}"
                     f"{_baseline(s)}{_sharpening(s)}.")
    wins = [e for e in equal if e["gen_ppl_ratio"] < 1]
    sure = [e for e in wins if (e.get("z_below_teacher") or 0) >= 2]
    lines += [f"- At equal step counts students have lower gen PPL than the teacher in {len(wins)} of {len(equal)} "
              f"(student, steps) pairs; {len(sure)} of them by more than 2 standard errors."] if students else []
    groups = list(dict.fromkeys(b.get("group") for b in bench))
    for g in groups:  # per teacher group: its own AR timing, same process
        rows = [b for b in bench if b.get("group") == g and b.get("latency_s")]
        ar = [b for b in rows if b.get("kind") == "ar"]
        t_ref = [b for b in rows if b.get("role") == "teacher" and b.get("steps") == ref]
        dlm = [b for b in rows if b.get("kind") == "mdlm"]
        if ar and t_ref and dlm:
            fast = min(dlm, key=lambda b: b["latency_s"])
            lines += ["", f"**Latency**{f' ({g})' if len(groups) > 1 else ''} (batch "
                      f"{ar[0]['batch']}, L={ar[0]['seq_len']}, {ar[0].get('device_name') or ''}): "
                      f"KV-cached AR {ar[0]['latency_s']:.4g} s, teacher @{ref} {t_ref[0]['latency_s']:.4g} s "
                      f"({_fmt(t_ref[0].get('speedup_vs_ar'))}x AR's speed), fastest DLM setting {fast['name']} "
                      f"@{fast['steps']} {fast['latency_s']:.4g} s ({_fmt(fast.get('speedup_vs_ar'))}x)."]
    times = info.get("stage_seconds", {})
    total = sum(v for v in times.values() if v)
    ran = (f"this invocation ran {len(info['stages_run'])} of them in {info['wall_seconds']:.0f} s"
           if info["stages_run"] else "this report was written from the stage files alone (no stage ran)")
    lines += ["", f"Time: {total:.0f} s for all {len(times)} stages (as recorded when each ran); {ran}. Tables and "
              "plots: [results.md](results.md); raw rows: train.jsonl, samples.jsonl, bench.jsonl, summary.json.", ""]
    return "\n".join(lines)
