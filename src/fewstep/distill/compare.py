"""Teacher vs students on one harness: generative perplexity and entropy at each step count, one judge.

    python -m fewstep.distill.compare --teacher runs/tiny_teacher --student SDTT=runs/distill_sdtt_tiny \
        --student BOOT=runs/distill_boot_tiny --judge runs/tiny_ar --n 64 --out results/distill

Every row comes from `fewstep.eval.harness.sample_eval` with the same judge, sample count, seed, batch and float64
categorical sampling; the undistilled teacher is measured with and without greedy tail at every step count (the
few-step baselines), and so is every student (`--greedy-tail off`: without it only, at half the cost). Writes
<out>/results.jsonl (raw rows) and <out>/table.md, and prints the acceptance check of docs/distillation.md:
student at 4 steps below the teacher at 4 steps in gen PPL, with entropy within 5% of the teacher's at the most
steps measured. `--seed 0,1,2` repeats the grid per sampling seed (the same seed for teacher and students) and a
student passes only if it passes at every seed; with `--temperature T` the check also says whether the student
beats the teacher sampled at T (lower gen PPL at no less entropy), i.e. whether it gains more than plain sharpening.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLS = ["name", "seed", "steps", "greedy_tail", "gen_ppl", "entropy", "n_samples", "seconds_per_sample"]


def compare(teacher: str, students: dict[str, str], judge: str, *, teacher_steps=(1, 4, 8, 16, 64),
            student_steps=(1, 4, 8, 16), n: int = 64, batch: int = 32, seed: int | list[int] = 0,
            device: str = "cpu", temperature: float | None = None, rgas: bool = False,
            greedy_tail: bool = True, out: str | None = None) -> list[dict]:
    """Measure the grid; returns the result rows (also written under `out` when given).

    temperature: also measure the teacher at the student step counts with this sampling temperature (no greedy
    tail): the plain sharpening baseline a distilled student must beat to show more than lower entropy.
    seed: one sampling seed or a list (the whole grid once per seed).
    rgas: also measure every student that holds a DiDi-Instruct discriminator with reward-guided ancestral sampling
    (the reference's settings), as "<name>+RGAS" at the student step counts.
    greedy_tail: also measure every model and step count with greedy tail (False: only without it).
    """
    import torch

    from fewstep.checkpoint import load_model
    from fewstep.data import get_tokenizer
    from fewstep.diffusion.schedule import schedule_of
    from fewstep.distill.rgas import discriminator_file, rgas_for
    from fewstep.eval.harness import sample_eval
    from fewstep.eval.judge import ar_judge

    ar, ar_meta = load_model(judge, device)
    tok = get_tokenizer(ar_meta["data"]["tokenizer"])
    j = ar_judge(ar, ar_meta, name=f"AR {judge}")
    rows = []

    def measure(model, meta, row_name, steps, sd, **kw):  # one row: same judge, n, batch and seed for every model
        torch.manual_seed(sd)
        row = sample_eval(model, meta, steps=steps, n=n, tokenizer=tok, judge=j, batch=batch, seed=sd,
                          device=device, name=row_name, **kw)
        row.update(method=meta.get("distill", {}).get("method", "teacher"), weights=meta["name"], seed=sd)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in COLS}), flush=True)

    runs = [("teacher", teacher, teacher_steps), *[(k, v, student_steps) for k, v in students.items()]]
    for name, path, grid in runs:
        model, meta = load_model(path, device)
        if meta["data"]["tokenizer"] != ar_meta["data"]["tokenizer"]:
            from fewstep.config import FewstepError

            raise FewstepError(f"{path} and the judge {judge} use different tokenizers")
        for sd in [seed] if isinstance(seed, int) else seed:
            for steps in grid:
                for greedy in (False, True)[:1 + greedy_tail]:
                    measure(model, meta, name, steps, sd, greedy_tail=greedy)
            extra = []  # (row name, sample_eval settings): the sharpened teacher, the RGAS-guided student
            if name == "teacher" and temperature is not None:
                extra.append((f"teacher T={temperature}", dict(temperature=temperature)))
            if name != "teacher" and rgas and meta["kind"] == "mdlm" and discriminator_file(path):
                extra.append((f"{name}+RGAS", dict(guidance=rgas_for(path, model, schedule_of(meta), device))))
            for row_name, kw in extra:
                for steps in student_steps:
                    measure(model, meta, row_name, steps, sd, **kw)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "results.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        (Path(out) / "table.md").write_text(table(rows) + "\n\n" + "\n".join(acceptance(rows)) + "\n",
                                            encoding="utf-8")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | seed | steps | greedy tail | gen PPL | entropy | s / sample |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('seed', 0)} | {r['steps']} | {'on' if r['greedy_tail'] else 'off'} | "
                     f"{r['gen_ppl']:.2f} | {r['entropy']:.3f} | {r['seconds_per_sample']:.4f} |")
    return "\n".join(lines)


def acceptance(rows: list[dict], steps: int = 4, tol: float = 0.05) -> list[str]:
    """Per student and seed: gen PPL at `steps` vs the teacher's (with the gap in standard errors, + = student lower),
    entropy vs the teacher's at its most steps, and, where a tempered teacher row exists, whether the student beats
    it; then one verdict over all seeds."""
    from fewstep.eval.genppl import z_gap

    def get(name, k, sd, greedy=False):
        return next((r for r in rows if r["name"] == name and r["steps"] == k and r["greedy_tail"] == greedy
                     and r.get("seed", 0) == sd), None)

    t_ref = max((r["steps"] for r in rows if r["name"] == "teacher"), default=None)
    seeds = list(dict.fromkeys(r.get("seed", 0) for r in rows))
    tempered = next((r["name"] for r in rows if r["name"].startswith("teacher T=")), None)
    out = []
    for name in dict.fromkeys(r["name"] for r in rows if not r["name"].startswith("teacher")):
        verdicts = []
        for sd in seeds:
            s4, t4, tref = get(name, steps, sd), get("teacher", steps, sd), get("teacher", t_ref, sd)
            if not (s4 and t4 and tref):
                continue
            rel = abs(s4["entropy"] - tref["entropy"]) / tref["entropy"]
            ok = s4["gen_ppl"] < t4["gen_ppl"] and rel <= tol
            verdicts.append(ok)
            z = z_gap(s4, t4)
            gap = "" if z is None else f" ({z:+.1f} SE)"
            line = (f"{name} @{steps} seed {sd} (no greedy tail): gen PPL {s4['gen_ppl']:.2f} vs teacher @{steps} "
                    f"{t4['gen_ppl']:.2f}{gap}; entropy {s4['entropy']:.3f} vs teacher @{t_ref} {tref['entropy']:.3f} "
                    f"({100 * rel:.1f}% off) -> {'PASS' if ok else 'FAIL'}")
            tt = get(tempered, steps, sd) if tempered else None
            if tt is not None:
                beats = s4["gen_ppl"] < tt["gen_ppl"] and s4["entropy"] >= tt["entropy"]
                line += (f"; {tempered} @{steps}: {tt['gen_ppl']:.2f} / {tt['entropy']:.3f} -> "
                         f"{'beats sharpening' if beats else 'does not beat sharpening'}")
            out.append(line)
        if len(verdicts) > 1:
            out.append(f"{name}: {'PASS' if all(verdicts) else 'FAIL'} at {sum(verdicts)} of {len(verdicts)} seeds")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fewstep.distill.compare", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", action="append", default=[], help="NAME=CKPT (repeatable)")
    p.add_argument("--judge", required=True, help="an AR checkpoint trained with fewstep")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", default="0", help="sampling seed, or seeds: 0,1,2 (the grid once per seed)")
    p.add_argument("--teacher-steps", default="1,4,8,16,64")
    p.add_argument("--student-steps", default="1,4,8,16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--temperature", type=float, default=None, help="add teacher rows at this temperature")
    p.add_argument("--rgas", action="store_true", help="add RGAS-guided rows for DiDi-Instruct students")
    p.add_argument("--greedy-tail", choices=("both", "off"), default="both",
                   help="'off': rows without greedy tail only (half the sampling)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from fewstep.config import FewstepError, int_list

    try:
        students = dict(s.split("=", 1) for s in a.student)
        seeds = int_list(a.seed, "--seed")
        rows = compare(a.teacher, students, a.judge, n=a.n, batch=a.batch, seed=seeds, device=a.device,
                       teacher_steps=int_list(a.teacher_steps, "--teacher-steps"),
                       student_steps=int_list(a.student_steps, "--student-steps"), temperature=a.temperature,
                       rgas=a.rgas, greedy_tail=a.greedy_tail == "both", out=a.out)
    except (FewstepError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    print("\n".join(acceptance(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
