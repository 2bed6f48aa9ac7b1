"""Checkpoints: safetensors tensors + JSON metadata, written atomically, never pickle.

Layout of a run directory:
    run/step_0000200/{model.safetensors, model_ema.safetensors, optim_model.safetensors, meta.json}
    run/latest  -> text file naming the newest complete step directory
A step directory is written under a temporary name and renamed into place, then `latest` is replaced atomically,
so a crash at any point leaves the previous checkpoint readable and never exposes a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fewstep.config import FewstepError

PREFERRED = ("model_ema", "model", "student_ema", "student")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optim(opt: torch.optim.Optimizer, tensors: dict, info: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in info["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save(run_dir: str | Path, step: int, *, modules: dict[str, nn.Module], meta: dict,
         optimizers: dict[str, torch.optim.Optimizer] | None = None, state: dict | None = None,
         rng: dict[str, torch.Tensor] | None = None, keep_last: int = 2) -> Path:
    """Write step_XXXXXXX atomically; `meta` is JSON (configs, model specs), `state` JSON-able loop state."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step:07d}"
    tmp = run_dir / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(sd, tmp / f"{name}.safetensors")
    optim_info = {}
    for name, opt in (optimizers or {}).items():
        tensors, optim_info[name] = _optim_tensors(opt)
        save_file(tensors, tmp / f"optim_{name}.safetensors")
    if rng:
        save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
    _write_json(tmp / "meta.json", {**meta, "step": step, "state": state or {}, "optim": optim_info})
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    _write_json(run_dir / "latest", {"step": step, "dir": final.name})
    steps = sorted(p for p in run_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        try:
            d = run_dir / json.loads(pointer.read_text(encoding="utf-8"))["dir"]
            if (d / "meta.json").is_file():
                return d
        except (ValueError, KeyError, UnicodeDecodeError):
            pass
    steps = sorted(p for p in run_dir.glob("step_*") if (p / "meta.json").is_file())
    return steps[-1] if steps else None


def resolve(path: str | Path) -> Path:
    """A step directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    found = latest(path) if path.is_dir() else None
    if found is None:
        raise FewstepError(f"no checkpoint at {path}: give a run directory or one of its step_* directories")
    return found


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FewstepError(f"corrupt checkpoint metadata {ckpt / 'meta.json'}: {e}") from None


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FewstepError(f"checkpoint file missing: {file}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise FewstepError(f"cannot read {file} (truncated or not a safetensors file): {e}") from None


def load_into(module: nn.Module, file: Path) -> None:
    """Load weights, naming the first mismatching tensor instead of a long PyTorch traceback."""
    sd = load_tensors(file)
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise FewstepError(f"{file.name} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise FewstepError(
                f"{file.name}: tensor '{k}' has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)} "
                "(different vocabulary or model size)"
            )
        if not v.dtype.is_floating_point == own[k].dtype.is_floating_point:
            raise FewstepError(f"{file.name}: tensor '{k}' has dtype {v.dtype}, expected {own[k].dtype}")
    module.load_state_dict(sd)


def load_training_state(ckpt: Path, modules: dict[str, nn.Module], optimizers: dict) -> dict:
    """Restore modules and optimizers for an exact resume; returns the checkpoint's meta (with `state`)."""
    meta = read_meta(ckpt)
    for name, module in modules.items():
        load_into(module, ckpt / f"{name}.safetensors")
    for name, opt in optimizers.items():
        _load_optim(opt, load_tensors(ckpt / f"optim_{name}.safetensors"), meta["optim"][name])
    rng_file = ckpt / "rng.safetensors"
    meta["rng"] = load_tensors(rng_file) if rng_file.is_file() else {}
    return meta


def load_model(path: str | Path, device="cpu", name: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint for sampling or evaluation (EMA weights when present).

    Returns (module in eval mode, meta) with meta["kind"] ("mdlm" | "ar" | ...), meta["model"] (its spec),
    meta["data"] (tokenizer spec, vocab size, eos id) and meta["name"] (which module was loaded).
    """
    from fewstep.config import ModelConfig, section_from_dict
    from fewstep.models import build_model

    ckpt = resolve(path)
    meta = read_meta(ckpt)
    specs = meta.get("models", {})
    if name is None:
        name = next((n for n in PREFERRED if n in specs), None) or next(iter(specs), None)
    if name not in specs:
        raise FewstepError(f"checkpoint {ckpt} has no model '{name}' (has: {', '.join(specs) or 'none'})")
    spec = dict(specs[name])
    vocab = spec.pop("vocab_size")
    model = build_model(section_from_dict(ModelConfig, spec, "model"), vocab)
    load_into(model, ckpt / f"{name}.safetensors")
    model.to(device).eval()
    return model, {**meta, "kind": spec["kind"], "model": specs[name], "name": name, "ckpt": str(ckpt)}
