"""FSDP2 for `train.parallel = "fsdp"`: shard the trained modules, gather full tensors for checkpoints.

Under DDP every rank holds the full weights and train.py averages gradients itself. Under FSDP2
(`torch.distributed.fsdp.fully_shard`) each rank keeps 1/world of every weight, gradient and AdamW moment, as
DTensors sharded on dim 0: each Transformer block (and the root: embedding, final norm, head) is all-gathered just
before its forward and its backward and freed after, and FSDP reduce-scatters (averages) the gradients.

Checkpoints keep the one format: every sharded tensor is gathered to a full tensor, one at a time, and rank 0
writes it, so an FSDP checkpoint loads with one process and resumes under DDP or FSDP alike (and the reverse).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

# torch.distributed.fsdp / .tensor are imported on first use: they add ~0.7 s to every `fewstep` command.


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (nothing can be one before torch.distributed.tensor is imported)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def shard(module: nn.Module, mesh) -> nn.Module:
    """FSDP2 in place: every Transformer block is its own unit (all-gathered on its own), then the root."""
    from torch.distributed.fsdp import fully_shard

    from fewstep.models.transformer import Block

    for sub in module.modules():
        if isinstance(sub, Block):
            fully_shard(sub, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage); a plain tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered: every rank must call it, in the same order); a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def full_state(sd: dict, keep: bool) -> dict:
    """A state dict with every tensor gathered to CPU; `keep` False (ranks that do not write) gathers and drops."""
    out = {}
    for k, v in sd.items():
        v = full(v.detach()) if torch.is_tensor(v) else v
        if keep:
            out[k] = v.cpu() if torch.is_tensor(v) else v
    return out


def full_optim_state(opt: torch.optim.Optimizer, keep: bool) -> dict:
    """`opt.state_dict()` with full moments, the format of a one-process optimizer (parameters by index)."""
    sd = opt.state_dict()
    state = {i: full_state(st, keep) for i, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else {}


def shard_optim_state_(opt: torch.optim.Optimizer) -> None:
    """After `opt.load_state_dict` of a full state (a checkpoint): shard each moment like its parameter."""
    from torch.distributed.tensor import distribute_tensor

    for p, st in opt.state.items():
        if is_sharded(p):
            for k, v in st.items():
                if torch.is_tensor(v) and not is_sharded(v) and v.shape == p.shape:
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
