"""Typed run configuration: dataclasses, TOML presets and `--section.key=value` overrides.

A preset is a TOML file with the sections below. Every key is checked against the dataclass fields, so a typo is
an error, never a silently ignored setting. Derived values (steps from a token budget, per-rank batch) are
computed where they are used, not written in the preset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class FewstepError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


def int_list(text: str, what: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; anything else is one clear line naming the option."""
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise FewstepError(f"{what}={text!r}: expected comma-separated integers such as 1,4,16") from None


@dataclass
class DataConfig:
    corpus: str = "default"  # "default" (offline mix), a .txt/.jsonl file or folder, or "hf:<dataset>"
    tokenizer: str = "byte"  # "byte", "gpt2" (offline BPE) or "hf:<path or id>"
    dir: str = "data/default-byte"  # where train.bin / val.bin / meta.json live
    val_fraction: float = 0.05  # documents held out for validation, never seen in training
    unique_tokens: int = 0  # training-token budget taken from the start of train.bin (0 = all of it)
    epochs: float = 1.0  # passes over the unique tokens; steps = unique_tokens * epochs / tokens per step


@dataclass
class ModelConfig:
    kind: str = "mdlm"  # "mdlm" (masked diffusion), "uniform" (uniform-state diffusion) or "ar"
    schedule: str = "loglinear"  # noise schedule of a DLM: "loglinear" or "cosine"
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    time_cond: bool = False  # adaLN conditioning on t (MDLM does not need it; students may)
    dropout: float = 0.0
    vocab_size: int = 0  # filled from the tokenizer (+1 for the mask token of a masked DLM)


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny_mdlm"
    batch_size: int = 32  # global sequences per optimizer step
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 0  # 0 = derived from data.unique_tokens * data.epochs
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema: float = 0.0  # 0 disables the EMA copy
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32"
    compile: bool = False  # torch.compile every trained module (pays off on GPU for long runs)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_last: int = 2
    antithetic: bool = True
    nan_policy: str = "stop"  # "stop" (keep last good checkpoint) or "skip" (drop the step and report)
    deterministic: bool = False  # torch.use_deterministic_algorithms + every RNG seeded (see docs/reliability.md)
    parallel: str = "ddp"  # under torchrun: "ddp" (full weights per rank) or "fsdp" (FSDP2, see docs/performance.md)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: dict = field(default_factory=dict)  # parsed by the distillation method's own Config


def _coerce(value, typ, where: str):
    """Convert a TOML value or override string to the field's declared type."""
    origin = typing.get_origin(typ)
    if typ in (int, float) and isinstance(value, bool):  # TOML true is not a number
        raise FewstepError(f"{where}: expected {typ.__name__}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise FewstepError(f"{where}: expected true/false, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise FewstepError(f"{where}: expected a list of {len(typing.get_args(typ))} values, got {value!r}")
        args = typing.get_args(typ)
        if len(value) != len(args):
            raise FewstepError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if typ in (int, float):
        num = _number(value, typ)
        if num is None:
            raise FewstepError(f"{where}: expected {typ.__name__}, got {value!r}")
        return num
    if typ is str:
        if isinstance(value, (dict, list, tuple, bool)) or value is None:
            raise FewstepError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if typ is dict:
        if not isinstance(value, dict):
            raise FewstepError(f"{where}: expected a table")
        return dict(value)
    return value


def _number(value, typ):
    """int or finite float from a TOML value or an override string; None if it is not one."""
    if typ is int and isinstance(value, int):
        return value
    try:
        if typ is int and isinstance(value, str):
            try:
                return int(value)
            except ValueError:  # "1e6" or "2.0": an integral number written as a float
                pass
        num = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(num):
        return None
    return num if typ is float else (int(num) if num == int(num) else None)


def _fill(obj, table: dict, section: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in table.items():
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(obj))
            raise FewstepError(f"unknown config key '{section}.{key}' (known: {known})")
        setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def from_dict(table: dict) -> RunConfig:
    cfg = RunConfig()
    for section, value in table.items():
        if section == "method":
            if not isinstance(value, dict):
                raise FewstepError("config section 'method' must be a table")
            cfg.method = dict(value)
        elif section in ("data", "model", "train"):
            if not isinstance(value, dict):
                raise FewstepError(f"config section '{section}' must be a table")
            _fill(getattr(cfg, section), value, section)
        else:
            raise FewstepError(f"unknown config section '{section}' (known: data, model, train, method)")
    return cfg


def resolve_preset(name: str) -> Path:
    """A preset is a path to a TOML file or the stem of one in configs/ (e.g. `tiny_mdlm`)."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name}.toml", CONFIG_DIR / name):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) if CONFIG_DIR.is_dir() else []
    raise FewstepError(f"unknown preset '{name}': give a .toml path or one of {', '.join(known) or '(none)'}")


def load(preset: str | None, overrides: list[str] = ()) -> RunConfig:
    """Load a preset (or the defaults) and apply `section.key=value` overrides."""
    table: dict = {}
    if preset is not None and not str(preset).strip():
        raise FewstepError("--config is empty: give a preset name (e.g. tiny_mdlm) or a .toml path, or leave it out")
    if preset:
        path = resolve_preset(preset)
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise FewstepError(f"cannot read config {path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # TOMLDecodeError is a ValueError
            raise FewstepError(f"cannot parse config {path}: {str(e) or type(e).__name__}") from None
    cfg = from_dict(table)
    apply_overrides(cfg, overrides)
    check(cfg)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> None:
    for item in overrides:
        item = item.removeprefix("--")
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise FewstepError(f"bad override '{item}': use --section.key=value, e.g. --train.lr=1e-4")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section == "method":
            cfg.method[name] = _parse_scalar(value)
        elif section in ("data", "model", "train"):
            _fill(getattr(cfg, section), {name: value}, section)
        else:
            raise FewstepError(f"unknown config section '{section}' in override '{item}'")


def _parse_scalar(value: str):
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except (ValueError, RecursionError, KeyError):  # not a TOML scalar (TOMLDecodeError is a ValueError)
        return value


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def section_from_dict(cls, table: dict, section: str):
    """Build one config dataclass (e.g. a method's Config) from a plain dict, rejecting unknown keys."""
    obj = cls()
    _fill(obj, table, section)
    return obj


def require(ok: bool, where: str, value, rule: str) -> None:
    """One setting's check: `where=value is invalid: rule` when not ok."""
    if not ok:
        raise FewstepError(f"{where}={value!r} is invalid: {rule}")


def check_model(m: ModelConfig, where: str = "model") -> None:
    """Value checks a model needs to be built at all (types are checked when the config is read)."""
    for key in ("seq_len", "d_model", "n_heads", "mlp_ratio"):
        require(getattr(m, key) >= 1, f"{where}.{key}", getattr(m, key), "must be >= 1")
    require(m.n_layers >= 0, f"{where}.n_layers", m.n_layers, "must be >= 0")
    require(m.vocab_size >= 0, f"{where}.vocab_size", m.vocab_size, "must be >= 0")
    require(0 <= m.dropout < 1, f"{where}.dropout", m.dropout, "must be in [0, 1)")
    require(m.d_model % m.n_heads == 0 and (m.d_model // m.n_heads) % 2 == 0, f"{where}.d_model", m.d_model,
             f"must split into model.n_heads={m.n_heads} heads of even size (RoPE)")


def check(cfg: RunConfig) -> None:
    """Reject values that would crash or silently misbehave later, with the key and the rule in one line."""
    d, t = cfg.data, cfg.train
    for key, value in (("data.dir", d.dir), ("data.corpus", d.corpus), ("data.tokenizer", d.tokenizer)):
        require(bool(value.strip()) and "\0" not in value, key, value, "must be non-empty, without NUL")
    require(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in [0, 1)")
    require(d.unique_tokens >= 0, "data.unique_tokens", d.unique_tokens, "must be >= 0 (0 = all)")
    require(d.epochs > 0, "data.epochs", d.epochs, "must be > 0")
    check_model(cfg.model)
    for key in ("batch_size", "grad_accum", "log_every", "eval_every", "ckpt_every", "eval_batches"):
        require(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    for key in ("lr", "warmup_steps", "max_steps", "weight_decay", "grad_clip", "keep_last"):
        require(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "must be >= 0")
    require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    require(all(0 <= b < 1 for b in t.betas), "train.betas", t.betas, "both must be in [0, 1)")
    require(0 <= t.ema < 1, "train.ema", t.ema, "must be in [0, 1) (0 disables the EMA)")
    require(0 <= t.seed < 2**63, "train.seed", t.seed, "must be in [0, 2**63)")
    require(t.precision in ("auto", "bf16", "fp32"), "train.precision", t.precision, "use auto, bf16 or fp32")
    require(t.nan_policy in ("stop", "skip"), "train.nan_policy", t.nan_policy, "use stop or skip")
    require(t.parallel in ("ddp", "fsdp"), "train.parallel", t.parallel, "use ddp or fsdp")
    require(bool(t.out_dir.strip()) and "\0" not in t.out_dir, "train.out_dir", t.out_dir,
             "must be non-empty, without NUL")
