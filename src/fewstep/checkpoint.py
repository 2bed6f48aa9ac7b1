"""Checkpoints: safetensors tensors + JSON metadata, written atomically, never pickle.

Layout of a run directory:
    run/step_0000200/{model.safetensors, model_ema.safetensors, optim_model.safetensors, meta.json}
    run/latest  -> JSON naming the newest checkpoint (a hint for people and tools)
A step directory is written under a temporary name (`.tmp_step_*`), fsynced and renamed into place, then `latest`
is replaced atomically, so a crash at any point leaves the previous checkpoint readable and never exposes a
half-written one. meta.json records every file's size; `latest()` returns the newest step directory whose files
are all present with those sizes, so a damaged or half-deleted directory is skipped, never read.

Loading never unpickles: weights, optimizer moments and RNG states are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fewstep.config import FewstepError

PREFERRED = ("model_ema", "model", "student_ema", "student")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
DEVICE_TYPES = ("cpu", "cuda", "mps")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file and a rename: a kill leaves the old file or the new
    one, never half of either."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause() -> None:
    """Test-only hook: FEWSTEP_TEST_SLOW_CKPT=<seconds> sleeps inside `save` (once with the temporary dir half
    written, once with the step dir published but `latest` not yet updated), so tests/test_reliability.py can
    SIGKILL a run in exactly those windows. Unset in normal use; it changes no file."""
    delay = os.environ.get("FEWSTEP_TEST_SLOW_CKPT")
    if delay:
        time.sleep(float(delay))


def _remove(path: Path) -> None:
    """Delete a directory so that no reader ever sees it half-deleted: rename it aside first (atomic)."""
    trash = path.with_name(f".del_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _optim_tensors(opt: torch.optim.Optimizer | dict) -> tuple[dict, dict]:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
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


def save(run_dir: str | Path, step: int, *, modules: dict[str, nn.Module | dict], meta: dict,
         optimizers: dict[str, torch.optim.Optimizer | dict] | None = None, state: dict | None = None,
         rng: dict[str, torch.Tensor] | None = None, keep_last: int = 2) -> Path:
    """Write step_XXXXXXX atomically; `meta` is JSON (configs, model specs), `state` JSON-able loop state.
    A module or optimizer may be given as its (full) state dict, e.g. one gathered from FSDP shards."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*run_dir.glob(".tmp_step_*"), *run_dir.glob(".del_step_*")]:  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / f"step_{step:07d}"
    tmp = run_dir / f".tmp_step_{step:07d}"
    tmp.mkdir()
    for name, module in modules.items():
        sd = module if isinstance(module, dict) else module.state_dict()
        sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        save_file(sd, tmp / f"{name}.safetensors")
        if name == next(iter(modules)):
            _test_pause()
    optim_info = {}
    for name, opt in (optimizers or {}).items():
        tensors, optim_info[name] = _optim_tensors(opt)
        save_file(tensors, tmp / f"optim_{name}.safetensors")
    if rng:
        save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _write_json(tmp / "meta.json", {**meta, "step": step, "state": state or {}, "optim": optim_info,
                                    "files": files})
    _fsync_dir(tmp)  # its entries too: after a power loss the renamed directory must hold every file
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    _test_pause()
    _write_json(run_dir / "latest", {"step": step, "dir": final.name})
    # keep_last complete checkpoints, this one always among them; a damaged dir never displaces a good one
    older = sorted((p for p in run_dir.glob("step_*") if p.is_dir() and complete(p)
                    and _step_order(p) < _step_order(final)), key=_step_order)
    if keep_last > 0:
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            _remove(old)
    return final


def _step_order(p: Path) -> tuple[int, str]:
    return len(p.name), p.name  # numeric order, also past step_9999999


def complete(ckpt: Path) -> bool:
    """True when ckpt/meta.json parses, names this step, and every file it lists has its recorded size."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
        files = meta.get("files", {})
        return (type(meta.get("step")) is int and ckpt.name == f"step_{meta['step']:07d}" and isinstance(files, dict)
                and all((ckpt / n).stat().st_size == s for n, s in files.items()))
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return False


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None.

    Every `step_*` directory counts, newest first, so a stale or damaged `latest` pointer, a step directory
    published just before a crash, or one half-deleted by a crash are all handled; `.tmp_step_*` dirs (a write
    that never finished) are never considered.
    """
    run_dir = Path(run_dir)
    try:
        steps = sorted((p for p in run_dir.glob("step_*") if p.is_dir()), key=_step_order, reverse=True)
    except OSError:
        return None
    return next((p for p in steps if complete(p)), None)


def resolve(path: str | Path) -> Path:
    """A step directory, or a run directory (its latest checkpoint)."""
    if "\0" in str(path):
        raise FewstepError(f"checkpoint path {str(path)!r} contains a NUL character")
    path = Path(path)
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise FewstepError(f"refusing to load {path}: fewstep never unpickles files (a pickle can run code); "
                           "give a checkpoint directory of .safetensors files and meta.json")
    if (path / "meta.json").is_file():
        return path
    found = latest(path) if path.is_dir() else None
    if found is None:
        n = len(list(path.glob("step_*"))) if path.is_dir() else 0
        damaged = f" ({n} step_* dirs, none complete)" if n else ""
        raise FewstepError(f"no checkpoint at {path}{damaged}: give a run directory or one of its step_* directories")
    return found


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    except OSError as e:
        raise FewstepError(f"cannot read {ckpt / 'meta.json'}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FewstepError(f"corrupt checkpoint metadata {ckpt / 'meta.json'}: {e}") from None
    if not isinstance(meta, dict):
        raise FewstepError(f"corrupt checkpoint metadata {ckpt / 'meta.json'}: not a JSON object")
    return meta


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FewstepError(f"checkpoint file missing: {file}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FewstepError(f"cannot read {file} (truncated or not a safetensors file): {_first_line(e)}") from None


def _check_state(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], file: Path) -> None:
    """Name the first mismatching tensor instead of a long PyTorch traceback."""
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise FewstepError(f"{file.name} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise FewstepError(
                f"{file.name}: tensor '{k}' has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)} "
                "(different vocabulary or model size)"
            )
        if v.dtype.is_floating_point != own[k].dtype.is_floating_point or v.dtype.is_complex:
            raise FewstepError(f"{file.name}: tensor '{k}' has dtype {v.dtype}, expected {own[k].dtype}")
        if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):  # saving refuses them: a damaged file
            raise FewstepError(f"{file.parent / file.name}: tensor '{k}' holds NaN or inf: the file is damaged; "
                               "use another checkpoint of the run")


def load_into(module: nn.Module, file: Path) -> None:
    """Load weights, naming the first mismatching tensor instead of a long PyTorch traceback."""
    sd = load_tensors(file)
    _check_state(module.state_dict(), sd, file)
    module.load_state_dict(sd)


def load_training_state(ckpt: Path, modules: dict[str, nn.Module], optimizers: dict) -> dict:
    """Restore modules and optimizers for an exact resume; returns the checkpoint's meta (with `state`)."""
    meta = read_meta(ckpt)
    for name, module in modules.items():
        load_into(module, ckpt / f"{name}.safetensors")
    load_optimizers(ckpt, optimizers, meta)
    meta["rng"] = rng = load_tensors(ckpt / "rng.safetensors")  # an exact resume needs the RNG states
    cpu = rng.get("cpu")
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape or any(
            v.dtype != torch.uint8 or v.dim() != 1 for v in rng.values()):
        raise FewstepError(f"{ckpt / 'rng.safetensors'} holds no valid RNG state: delete {ckpt.name} to resume from "
                           "the checkpoint before it")
    return meta


def load_optimizers(ckpt: Path, optimizers: dict, meta: dict) -> None:
    """Restore optimizer states (part of load_training_state; separate for FSDP, whose optimizers are built on the
    sharded parameters after the full weights are loaded)."""
    for name, opt in optimizers.items():
        tensors = load_tensors(ckpt / f"optim_{name}.safetensors")
        try:
            _load_optim(opt, tensors, meta["optim"][name])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FewstepError(f"{ckpt}: optimizer state '{name}' does not fit this run ({type(e).__name__}: "
                               f"{e}); delete {ckpt.name} to resume from the checkpoint before it") from None


def _device(device) -> torch.device:
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError, ValueError):
        raise FewstepError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type not in DEVICE_TYPES:
        raise FewstepError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise FewstepError(f"device {device!r} is not available here (CUDA devices: {torch.cuda.device_count()})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise FewstepError(f"device {device!r} is not available here")
    return dev


def _spec(ckpt: Path, meta: dict, name: str | None) -> tuple[str, dict]:
    """The model spec to rebuild (checked shallowly: types here, values by config.check_model)."""
    specs = meta.get("models", {})
    if not isinstance(specs, dict) or not all(isinstance(s, dict) for s in specs.values()):
        raise FewstepError(f"corrupt checkpoint metadata {ckpt / 'meta.json'}: 'models' must map names to specs")
    if name is None:
        name = next((n for n in PREFERRED if n in specs), None) or next(iter(specs), None)
    if name not in specs:
        raise FewstepError(f"checkpoint {ckpt} has no model '{name}' (has: {', '.join(specs) or 'none'})")
    data = meta.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("tokenizer"), str):
        raise FewstepError(f"corrupt checkpoint metadata {ckpt / 'meta.json'}: no data.tokenizer")
    vocab = specs[name].get("vocab_size")
    if type(vocab) is not int or vocab < 1:  # a wrong but valid size is caught by the shape check
        raise FewstepError(f"corrupt checkpoint metadata {ckpt / 'meta.json'}: model '{name}' has vocab_size "
                           f"{vocab!r}")
    if specs[name].get("kind") == "ar" and type(data.get("eos_id")) is not int:
        raise FewstepError(f"corrupt checkpoint metadata {ckpt / 'meta.json'}: an AR model needs data.eos_id")
    return name, specs[name]


def load_model(path: str | Path, device="cpu", name: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint for sampling or evaluation (EMA weights when present).

    Returns (module in eval mode, meta) with meta["kind"] ("mdlm" | "ar" | ...), meta["model"] (its spec),
    meta["data"] (tokenizer spec, vocab size, eos id) and meta["name"] (which module was loaded).
    Everything is checked before memory is allocated: the spec is built on the meta device and compared with
    the tensors in the file, so corrupt metadata cannot ask for a huge model.
    """
    from fewstep.config import ModelConfig, check_model, section_from_dict
    from fewstep.models import build_model

    dev = _device(device)
    ckpt = resolve(path)
    meta = read_meta(ckpt)
    name, spec = _spec(ckpt, meta, name)
    spec = dict(spec)
    vocab = spec.pop("vocab_size")
    mcfg = section_from_dict(ModelConfig, spec, "model")
    check_model(mcfg, where=f"checkpoint {ckpt}: model")
    file = ckpt / f"{name}.safetensors"
    sd = load_tensors(file)
    if mcfg.n_layers > len(sd):  # every layer has tensors: a larger count is corrupt metadata
        raise FewstepError(f"checkpoint {ckpt}: model.n_layers={mcfg.n_layers} but {file.name} holds only "
                           f"{len(sd)} tensors: the metadata is corrupt")
    try:
        with torch.device("meta"):  # shapes only, no memory
            shapes = build_model(mcfg, vocab).state_dict()
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as e:  # e.g. sizes beyond int64
        raise FewstepError(f"checkpoint {ckpt}: cannot build model '{name}' ({_first_line(e)})") from None
    _check_state(shapes, sd, file)
    model = build_model(mcfg, vocab)  # now known to be exactly as large as the tensors in the file
    model.load_state_dict(sd)
    model.to(dev).eval()
    return model, {**meta, "kind": mcfg.kind, "model": meta["models"][name], "name": name, "ckpt": str(ckpt)}
