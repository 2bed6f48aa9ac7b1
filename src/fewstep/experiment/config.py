"""The experiment config: [experiment] grid, shared [data]/[model]/[train], [judge], [distill], [eval].

Every key is checked against the dataclasses below and every distillation method's settings against its own
Config (distill.run.parse_method) when the file is read, so a typo fails in one line before any training.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fewstep.config import CONFIG_DIR, FewstepError, RunConfig, _coerce, _parse_scalar, check, from_dict, tomllib

MDLM_METHODS = ["sdtt", "boot", "idlm", "didi"]  # the registered methods that distill an MDLM teacher
SECTIONS = ("experiment", "data", "model", "train", "judge", "distill", "eval")


@dataclass
class Experiment:
    name: str = "experiment"
    runs_dir: str = ""  # checkpoints and stage files; default runs/experiments/<name>
    results_dir: str = ""  # report; default docs/results/<name>
    unique_tokens: list[int] = field(default_factory=lambda: [0])  # budgets (0 = all of train.bin)
    epochs: list[float] = field(default_factory=lambda: [1.0])
    index: str = ""  # results page rebuilt from every <results_dir>/../*/SUMMARY.md, e.g. docs/RESULTS.md ("" = none)


@dataclass
class Judge:
    spec: str = "train"  # train | best_ar | smollm2 | hf:<path or id> | ckpt:<AR checkpoint>
    unique_tokens: int = 0  # spec = "train": budget (0 = all) and epochs of the judge's run
    epochs: float = 4.0
    max_steps: int = 0


@dataclass
class Distill:
    methods: list[str] = field(default_factory=lambda: list(MDLM_METHODS))  # [] = none: pre-training alone
    teachers: list[str] = field(default_factory=lambda: ["largest"])  # largest | all | <unique_tokens>x<epochs>
    preset: str = ""  # base config per method, e.g. "distill_{method}_tiny" ("" = none)
    train: dict = field(default_factory=dict)  # [train] overrides for every method
    per_method: dict = field(default_factory=dict)  # [distill.<method>]: method keys, plus a [train] table


@dataclass
class Eval:
    teacher_steps: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 64])
    student_steps: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    ref_steps: int = 0  # the teacher's reference step count for the matched-gen-PPL speed-up (0 = most)
    # the teacher also sampled @ref_steps at these temperatures (< 1 sharpens): a matched student is then weighed
    # against the teacher at the temperatures of entropy nearest its own (report.py: does it beat sharpening?)
    teacher_temperatures: list[float] = field(default_factory=list)
    n: int = 64  # samples per setting
    batch: int = 32
    seed: int = 0
    greedy_tail: bool = False
    val_batches: int = 16
    val_mc: int = 4
    bench_batch: int = 32
    bench_repeats: int = 3
    rgas: bool = False  # also measure each DiDi-Instruct student with reward-guided ancestral sampling
    rgas_scale: list[float] = field(default_factory=lambda: [30.0, 40.0])  # tilt h_0, h_1 (the reference's)
    rgas_candidates: int = 4  # re-ranking candidates M
    rgas_rerank: float = 0.5  # fraction of the steps (the last ones) that re-rank instead of tilting


@dataclass
class ExperimentConfig:
    experiment: Experiment = field(default_factory=Experiment)
    base: RunConfig = field(default_factory=RunConfig)  # [data] [model] [train] of every pre-training run
    judge: Judge = field(default_factory=Judge)
    distill: Distill = field(default_factory=Distill)
    eval: Eval = field(default_factory=Eval)
    methods: dict = field(default_factory=dict)  # method name -> its full distillation RunConfig (teacher unset)


def _fill(obj, table: dict, section: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in table.items():
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(obj) if f.name != "per_method")
            extra = f", or a method name ({', '.join(_methods())})" if section == "distill" else ""
            raise FewstepError(f"unknown config key '{section}.{key}' (known: {known}{extra})")
        typ = hints[key]
        if typing.get_origin(typ) is list:
            items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
            # "", "4," and [] are errors, except distill.methods = []: a study of pre-training alone
            empty_ok = (section, key) == ("distill", "methods") and value == []
            if (not items and not empty_ok) or any(isinstance(v, str) and not v.strip() for v in items):
                raise FewstepError(f"{section}.{key}: expected a non-empty list, got {value!r}")
            value = [_coerce(v.strip() if isinstance(v, str) else v, typing.get_args(typ)[0], f"{section}.{key}")
                     for v in items]
        else:
            value = _coerce(value, typ, f"{section}.{key}")
        setattr(obj, key, value)


def _methods() -> dict:
    from fewstep.distill import METHODS

    return METHODS


def _set(table: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for p in path:
        table = table.setdefault(p, {})
        if not isinstance(table, dict):
            raise FewstepError(f"override '{dotted}': '{p}' is not a table")
    table[last] = value


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise FewstepError(msg)


def method_config(ex: ExperimentConfig, name: str) -> RunConfig:
    """The distillation RunConfig of one method: preset, then distill.train, then [distill.<name>]."""
    table: dict = {}
    if ex.distill.preset:
        path = CONFIG_DIR / f"{ex.distill.preset.format(method=name)}.toml"
        _require(path.is_file(), f"distill.preset {ex.distill.preset!r} gives {path.name}, which does not exist "
                 f"in {CONFIG_DIR} for method {name!r}: add [distill.{name}] settings or change distill.preset")
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    own = dict(ex.distill.per_method.get(name, {}))
    table.setdefault("train", {}).update({**ex.distill.train, **own.pop("train", {})})
    table.setdefault("method", {}).update({**own, "name": name})
    cfg = from_dict(table)
    check(cfg)
    from fewstep.distill.run import parse_method

    Method, _, common = parse_method(cfg.method)  # unknown method keys fail here, before any training
    _require(getattr(Method, "teacher_kinds", ()) != ("ar",) or common.init != "teacher", f"distill.{name}.init="
             f"'teacher' is invalid: {name} distills the AR model into a diffusion student; use 'scratch'")
    return cfg


def parse(table: dict, overrides: list[str] = ()) -> ExperimentConfig:
    """An ExperimentConfig from a TOML table and `--section.key=value` overrides; every key is checked."""
    table = copy.deepcopy(table)
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        _require("." in key and sep, f"bad override '{item}': use --section.key=value, e.g. --eval.n=16")
        _set(table, key, _parse_scalar(value))
    for s, v in table.items():
        _require(s in SECTIONS, f"unknown experiment config section '{s}' (known: {', '.join(SECTIONS)})")
        _require(isinstance(v, dict), f"experiment config section '{s}' must be a table")
    for sec, key in (("model", "kind"), ("data", "unique_tokens"), ("data", "epochs"), ("train", "max_steps"),
                     ("train", "out_dir")):
        _require(key not in table.get(sec, {}), f"{sec}.{key} is set by the experiment (grid: experiment."
                 "unique_tokens x experiment.epochs, both kinds, out dirs under experiment.runs_dir): remove it")
    ex = ExperimentConfig(base=from_dict({k: table[k] for k in ("data", "model", "train") if k in table}))
    check(ex.base)
    dist = dict(table.get("distill", {}))
    ex.distill.per_method = {k: dist.pop(k) for k in list(dist) if k in _methods() and isinstance(dist[k], dict)}
    for name, obj in (("experiment", ex.experiment), ("judge", ex.judge), ("distill", ex.distill),
                      ("eval", ex.eval)):
        _fill(obj, dist if name == "distill" else table.get(name, {}), name)
    e, ev = ex.experiment, ex.eval
    e.runs_dir, e.results_dir = e.runs_dir or f"runs/experiments/{e.name}", e.results_dir or f"docs/results/{e.name}"
    _require(all(u >= 0 for u in e.unique_tokens) and len(set(e.unique_tokens)) == len(e.unique_tokens),
             f"experiment.unique_tokens={e.unique_tokens} must be distinct and >= 0 (0 = all of train.bin)")
    _require(all(x > 0 for x in e.epochs) and len(set(e.epochs)) == len(e.epochs),
             f"experiment.epochs={e.epochs} must be distinct and > 0")
    for key in ("teacher_steps", "student_steps"):
        _require(all(k >= 1 for k in getattr(ev, key)), f"eval.{key}={getattr(ev, key)} must be >= 1")
    for key in ("n", "batch", "bench_batch", "bench_repeats"):
        _require(getattr(ev, key) >= 1, f"eval.{key}={getattr(ev, key)} must be >= 1")
    _require(ev.ref_steps == 0 or ev.ref_steps in ev.teacher_steps,
             f"eval.ref_steps={ev.ref_steps} must be one of eval.teacher_steps {ev.teacher_steps} (or 0: the most)")
    ev.ref_steps = ev.ref_steps or max(ev.teacher_steps)
    _require(all(math.isfinite(T) and 0 < T != 1 for T in ev.teacher_temperatures)
             and len(set(ev.teacher_temperatures)) == len(ev.teacher_temperatures),
             f"eval.teacher_temperatures={ev.teacher_temperatures} must be distinct, finite, > 0 and not 1 (the "
             "teacher's own rows)")
    _require(len(ev.rgas_scale) == 2 and ev.rgas_candidates >= 1 and 0 <= ev.rgas_rerank <= 1,
             f"eval.rgas_scale={ev.rgas_scale} (two numbers), eval.rgas_candidates={ev.rgas_candidates} (>= 1) and "
             f"eval.rgas_rerank={ev.rgas_rerank} (0 to 1) are invalid")
    j = ex.judge.spec
    _require(j in ("train", "best_ar", "smollm2") or j.split(":", 1)[0] in ("hf", "ckpt") and ":" in j,
             f"judge.spec={j!r} is invalid: use train, best_ar, smollm2, hf:<path or id> or ckpt:<AR checkpoint>")
    pairs = {label(u, x) for u in e.unique_tokens for x in e.epochs}
    for t in ex.distill.teachers:
        _require(t in ("largest", "all") or t in pairs, f"distill.teachers entry {t!r} is invalid: use largest, "
                 f"all or a grid pair ({', '.join(sorted(pairs))})")
    for m in ex.distill.methods:
        _require(m in _methods(), f"unknown distillation method {m!r} in distill.methods (known: "
                 f"{', '.join(_methods())})")
    for m in ex.distill.per_method:
        _require(m in ex.distill.methods, f"[distill.{m}] is set but {m!r} is not in distill.methods")
    ex.methods = {m: method_config(ex, m) for m in ex.distill.methods}
    return ex


def load(path: str, overrides: list[str] = ()) -> ExperimentConfig:
    """Load an experiment TOML: a path, or a name in configs/experiments/ (e.g. `tiny`)."""
    p = Path(path)
    if not p.is_file():
        p = CONFIG_DIR / "experiments" / f"{path}.toml"
    if not p.is_file():
        known = sorted(q.stem for q in (CONFIG_DIR / "experiments").glob("*.toml"))
        raise FewstepError(f"unknown experiment config {path!r}: give a .toml path or one of {', '.join(known)}")
    try:
        table = tomllib.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FewstepError(f"cannot parse experiment config {p}: {e}") from None
    return parse(table, overrides)


def label(unique_tokens: int, epochs: float) -> str:
    """'200kx4': a grid pair as the config names it (distill.teachers) and as run directories do."""
    u = ("all" if unique_tokens == 0 else f"{unique_tokens / 1e6:g}M" if unique_tokens >= 10**6 and
         unique_tokens % 10**5 == 0 else f"{unique_tokens / 1e3:g}k" if unique_tokens % 100 == 0 else
         str(unique_tokens))
    return f"{u}x{epochs:g}"
