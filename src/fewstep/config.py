"""Typed run configuration: dataclasses, TOML presets and `--section.key=value` overrides.

A preset is a TOML file with the sections below. Every key is checked against the dataclass fields, so a typo is
an error, never a silently ignored setting. Derived values (steps from a token budget, per-rank batch) are
computed where they are used, not written in the preset.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class FewstepError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


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
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_last: int = 2
    antithetic: bool = True
    nan_policy: str = "stop"  # "stop" (keep last good checkpoint) or "skip" (drop the step and report)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: dict = field(default_factory=dict)  # parsed by the distillation method's own Config


def _coerce(value, typ, where: str):
    """Convert a TOML value or override string to the field's declared type."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise FewstepError(f"{where}: expected true/false, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[]").split(",") if v.strip()]
        args = typing.get_args(typ)
        if len(value) != len(args):
            raise FewstepError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if typ in (int, float):
        try:
            out = typ(value) if not isinstance(value, str) else typ(float(value) if typ is float else value)
        except (TypeError, ValueError):
            raise FewstepError(f"{where}: expected {typ.__name__}, got {value!r}") from None
        return out
    if typ is str:
        return str(value)
    if typ is dict:
        if not isinstance(value, dict):
            raise FewstepError(f"{where}: expected a table")
        return dict(value)
    return value


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
    if preset:
        path = resolve_preset(preset)
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise FewstepError(f"cannot parse config {path}: {e}") from None
    cfg = from_dict(table)
    apply_overrides(cfg, overrides)
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
    except tomllib.TOMLDecodeError:
        return value


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def section_from_dict(cls, table: dict, section: str):
    """Build one config dataclass (e.g. a method's Config) from a plain dict, rejecting unknown keys."""
    obj = cls()
    _fill(obj, table, section)
    return obj
