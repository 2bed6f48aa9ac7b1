"""One distillation under torchrun; rank 0 then writes whether every rank ends with the same trainable weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_distill.py SPEC.json

SPEC.json: {"overrides": [CLI-style overrides], "method": {the [method] table}, "out": result JSON path}.
Run by tests/test_distill.py::test_every_method_under_torchrun_keeps_ranks_in_step.
"""

import json
import sys

import torch
import torch.distributed as dist

from fewstep import train
from fewstep.cli import leave
from fewstep.config import load
from fewstep.distill.run import distill

spec = json.loads(open(sys.argv[1]).read())
real_fit, report = train.fit, {}


def fit_then_compare(task, cfg, **kw):
    """The one training loop, then every trainable module's flat weights all-gathered and compared with rank 0's."""
    summary = real_fit(task, cfg, **kw)
    for name, m in task.trainable().items():
        flat = torch.cat([p.detach().float().flatten() for p in m.parameters()])  # (P,)
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        report[name] = {"same_on_every_rank": all(torch.equal(parts[0], q) for q in parts[1:]),
                        "finite": bool(torch.isfinite(flat).all()), "params": flat.numel()}
    return summary


train.fit = fit_then_compare
cfg = load(None, spec["overrides"])
cfg.method = spec["method"]
summary = distill(cfg)
if dist.get_rank() == 0:
    with open(spec["out"], "w") as f:
        json.dump({"modules": report, "steps": summary["steps"], "world": dist.get_world_size()}, f)
leave(0)
