"""`fewstep distill`: load a teacher, build the student, run the one training loop, checkpoint the student.

The `[method]` table of the config selects the method (`name`) and holds its settings; two keys are shared by
every method: `teacher` (a checkpoint: run dir or step dir) and `init` ("teacher": start from the teacher's
weights, "scratch", or another checkpoint of the same shape, e.g. a previous student). The student's model config
is the teacher's (plus time conditioning when the method asks for it), and the tokenizer and data dir come from
the teacher's checkpoint, so a distill config has no [model] or [data] table. Checkpoints hold "student" (and
"student_ema"), which `load_model` picks, so `fewstep sample/eval/bench --ckpt` work on students unchanged.

Methods with `teacher_kinds = ("ar",)` (tcs, onpolicy) take an autoregressive teacher instead (`_ar_teacher`): a
fewstep "ar" checkpoint, "smollm2" or "hf:<path or id>". Their student is a masked DLM of the teacher's tokenizer
and vocabulary, shaped by [model] if given, else like the fewstep teacher (HF teacher: ModelConfig defaults);
`init` is "scratch" or a DLM checkpoint with the same tokenizer; the data dir must use the teacher's tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep import checkpoint
from fewstep.config import DataConfig, FewstepError, ModelConfig, RunConfig, section_from_dict

ADALN = ("ada", "t_mlp")  # parameter names that only a time-conditioned model has (zero-initialised)
SHAPE_KEYS = ("kind", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio", "vocab_size")


@dataclass
class Common:
    teacher: str = "runs/tiny_teacher"
    init: str = "teacher"  # "teacher" | "scratch" | a checkpoint path


def get_method(name):
    from fewstep.distill import METHODS

    if name not in METHODS:
        raise FewstepError(f"unknown distillation method {name!r}: set method.name to one of {', '.join(METHODS)}")
    return METHODS[name]


def parse_method(table: dict):
    """(Method class, its Config, Common) from the [method] table; unknown keys are errors."""
    table = dict(table)
    Method = get_method(table.pop("name", None))
    common_keys = {f.name for f in dataclasses.fields(Common)}
    common = section_from_dict(Common, {k: table.pop(k) for k in list(table) if k in common_keys}, "method")
    try:
        mcfg = section_from_dict(Method.Config, table, "method")
    except FewstepError as e:
        raise FewstepError(f"{e}; shared keys: {', '.join(sorted(common_keys))}") from None
    return Method, mcfg, common


def load_teacher(path: str, device, kinds=("mdlm",)) -> tuple[torch.nn.Module, dict]:
    """The frozen teacher (eval mode, no gradients) and its checkpoint meta; `kinds`: the method's teacher kinds."""
    if not Path(path).exists():
        raise FewstepError(f"teacher checkpoint {path} does not exist: train one first (fewstep train --config "
                           "tiny_teacher) or set method.teacher")
    teacher, meta = checkpoint.load_model(path, device)
    if meta["kind"] not in kinds:
        raise FewstepError(f"teacher {path} is a {meta['kind']!r} model; these methods distill masked diffusion "
                           f"LMs (kind 'mdlm'){' or uniform-state ones' if 'uniform' in kinds else ''}")
    return teacher.requires_grad_(False).eval(), meta


def _spec_config(spec: dict, **changes) -> ModelConfig:
    spec = {k: v for k, v in spec.items() if k != "vocab_size"}
    return dataclasses.replace(section_from_dict(ModelConfig, spec, "model"), **changes)


def _copy_weights(student: torch.nn.Module, source: torch.nn.Module, what: str) -> None:
    """Load `source` into `student`; only the student's own zero-initialised adaLN tensors may be missing."""
    own, src = student.state_dict(), source.state_dict()
    for k, v in src.items():
        if k in own and own[k].shape != v.shape:
            raise FewstepError(f"{what}: tensor '{k}' has shape {tuple(v.shape)} but the student expects "
                               f"{tuple(own[k].shape)} (different vocabulary or model size)")
    extra = [k for k in src if k not in own and not any(a in k for a in ADALN)]
    missing = [k for k in own if k not in src and not any(a in k for a in ADALN)]
    if extra or missing:
        raise FewstepError(f"{what} does not match the student: missing {missing[:3]}, unexpected {extra[:3]}")
    student.load_state_dict({k: v for k, v in src.items() if k in own}, strict=False)


def build_student(common: Common, teacher, tspec: dict, time_cond: bool, device, seed: int):
    """(student, its ModelConfig): the teacher's architecture, initialised as `common.init` says."""
    from fewstep.models import build_model

    scfg = _spec_config(tspec, time_cond=time_cond)
    torch.manual_seed(seed)  # same initial adaLN / scratch weights on every rank and every rerun
    student = build_model(scfg, tspec["vocab_size"]).to(device)
    if common.init == "scratch":
        return student, scfg
    if common.init == "teacher":
        source, what = teacher, f"teacher {common.teacher}"
    else:
        if not Path(common.init).exists():
            raise FewstepError(f"student init checkpoint {common.init} does not exist")
        source, smeta = checkpoint.load_model(common.init, device)
        bad = [k for k in SHAPE_KEYS if smeta["model"].get(k) != tspec.get(k)]
        if bad:
            k = bad[0]
            raise FewstepError(f"student init {common.init} does not match the teacher: {k} "
                               f"{smeta['model'].get(k)} vs {tspec.get(k)}")
        what = f"student init {common.init}"
    _copy_weights(student, source, what)
    return student, scfg


def _data_dir(cfg: RunConfig, tmeta: dict) -> str:
    """The teacher's data dir, unless data.dir names another one with the same tokenizer."""
    tdata = tmeta["data"]
    if cfg.data.dir == DataConfig().dir or cfg.data.dir == tdata.get("dir"):
        return tdata["dir"]
    from fewstep.data import load_meta

    tok = load_meta(cfg.data.dir).get("tokenizer")
    if tok != tdata.get("tokenizer"):
        raise FewstepError(f"data.dir {cfg.data.dir} uses tokenizer {tok!r} but the teacher uses "
                           f"{tdata.get('tokenizer')!r}")
    return cfg.data.dir


def _same_tokenizer(what: str, tok, tmeta: dict) -> None:
    if tok != tmeta["data"]["tokenizer"]:
        raise FewstepError(f"{what} uses tokenizer {tok!r} but the teacher {tmeta['ckpt']} uses "
                           f"{tmeta['data']['tokenizer']!r}: student and teacher must share one tokenizer")


def _data_tokenizer(data_dir: str):
    from fewstep.data import load_meta

    if not (Path(data_dir) / "meta.json").is_file():
        raise FewstepError(f"data dir {data_dir} is not built: fewstep data --data.dir={data_dir} "
                           "--data.tokenizer=<the teacher's tokenizer>")
    return load_meta(data_dir).get("tokenizer")


def _ar_teacher(cfg: RunConfig, common: Common, device):
    """(frozen ARTeacher, its meta, the student's spec) for an autoregressive teacher (module doc)."""
    from fewstep.distill.ar_teacher import load_ar_teacher
    from fewstep.models import model_spec

    if common.init == "teacher":
        raise FewstepError("an autoregressive teacher cannot initialise a diffusion student: set method.init to "
                           "'scratch' or a DLM checkpoint with the teacher's tokenizer")
    teacher, tmeta = load_ar_teacher(common.teacher, device)
    if common.init != "scratch" and Path(common.init).exists():
        init_tok = checkpoint.read_meta(checkpoint.resolve(common.init)).get("data", {}).get("tokenizer")
        _same_tokenizer(f"student init {common.init}", init_tok, tmeta)
    if cfg.model != ModelConfig():
        base = cfg.model
    elif tmeta["model"] is not None:
        base = _spec_config(tmeta["model"])
    else:
        base = ModelConfig()
    base = dataclasses.replace(base, kind="mdlm", vocab_size=0)
    if base.seq_len > teacher.max_len:
        raise FewstepError(f"model.seq_len={base.seq_len} exceeds the teacher's context of {teacher.max_len}")
    tmeta["data"].setdefault("dir", cfg.data.dir)
    return teacher, tmeta, model_spec(base, tmeta["data"]["vocab_size"])


def prepare(cfg: RunConfig, device, rank: int = 0, world: int = 1) -> dict:
    """Everything `fit` needs for a distillation run: {"cfg", "method", "train", "val", "meta", "teacher"}.

    The returned cfg is a copy of `cfg` with the student's model config, the teacher's data dir and tokenizer,
    and max_steps filled in (so the run's recorded config says what actually ran).
    """
    from fewstep.diffusion.schedule import get_schedule
    from fewstep.distill.common import Setup
    from fewstep.models import model_spec

    cfg = copy.deepcopy(cfg)
    Method, mcfg, common = parse_method(cfg.method)
    ar = getattr(Method, "teacher_kinds", ("mdlm",)) == ("ar",)
    if cfg.model != ModelConfig() and not ar:
        raise FewstepError("the student's model comes from the teacher checkpoint: remove [model] settings from "
                           "a distill config")
    if ar:
        teacher, tmeta, tspec = _ar_teacher(cfg, common, device)
    else:
        teacher, tmeta = load_teacher(common.teacher, device, getattr(Method, "teacher_kinds", ("mdlm",)))
        tspec = tmeta["model"]
    student, scfg = build_student(common, teacher, tspec, getattr(mcfg, "time_cond", False), device, cfg.train.seed)
    cfg.model = scfg
    tc = cfg.train
    micro = tc.batch_size // (world * tc.grad_accum)
    setup = Setup(teacher=teacher, student=student, schedule=get_schedule(scfg.schedule), mask_id=student.mask_id,
                  batch=micro, seq_len=scfg.seq_len, device=torch.device(device), out_dir=Path(tc.out_dir),
                  rank=rank)
    method = Method(mcfg, setup)
    if tc.max_steps <= 0 and hasattr(method, "planned_steps"):
        tc.max_steps = method.planned_steps()  # all rounds, rather than a data budget
    train = val = None
    if not getattr(Method, "data_free", False):
        from fewstep.data import TokenBlocks

        cfg.data.dir = _data_dir(cfg, tmeta)
        if ar:
            from fewstep.data.stream import check_tokens

            _same_tokenizer(f"data.dir {cfg.data.dir}", _data_tokenizer(cfg.data.dir), tmeta)
            check_tokens(cfg.data.dir, tmeta["data"])  # also its vocabulary and document separator
        train = TokenBlocks(cfg.data.dir, "train", scfg.seq_len, cfg.data.unique_tokens)
        val = TokenBlocks(cfg.data.dir, "val", scfg.seq_len)
    cfg.data.tokenizer = tmeta["data"].get("tokenizer", cfg.data.tokenizer)
    name = cfg.method.get("name")
    meta = {"models": {"student": model_spec(scfg, tspec["vocab_size"])}, "data": tmeta["data"],
            "distill": {"method": name, "teacher": tmeta["ckpt"], "teacher_name": tmeta["name"],
                        "init": common.init, "config": dataclasses.asdict(mcfg), "data_free": train is None}}
    return {"cfg": cfg, "method": method, "train": train, "val": val, "meta": meta, "teacher": teacher}


def distill(cfg: RunConfig) -> dict:
    """Run a distillation from a config (see module doc); returns the training summary."""
    from fewstep.train import fit, init_distributed

    rank, world, device = init_distributed()
    run = prepare(cfg, device, rank, world)
    cfg = run["cfg"]
    ckpt = checkpoint.latest(cfg.train.out_dir)
    if ckpt is not None and hasattr(run["method"], "restore"):
        run["method"].restore(int(checkpoint.read_meta(ckpt)["step"]))
    summary = fit(run["method"], cfg, train_data=run["train"], val_data=run["val"], meta=run["meta"],
                  device=device, rank=rank, world=world)
    summary.update(method=cfg.method.get("name"), teacher=run["meta"]["distill"]["teacher"],
                   data_free=run["train"] is None)
    return summary
