"""The one training loop: exact resume, NaN guard, only trained modules change, multi-process (gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_overrides
from fewstep import checkpoint
from fewstep.config import FewstepError, load
from fewstep.pipeline import pretrain


def _losses(out_dir):
    rows = [json.loads(ln) for ln in open(os.path.join(out_dir, "log.jsonl"))]
    return {r["step"]: r["loss/model"] for r in rows if "loss/model" in r}


@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_training_lowers_loss_and_reports_validation(pydoc_data, tmp_path, kind):
    cfg = load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "run", **{"model.kind": kind,
                                                                              "train.max_steps": 40,
                                                                              "train.lr": 3e-3}))
    summary = pretrain(cfg)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40
    first, last = sum(list(losses.values())[:5]) / 5, sum(list(losses.values())[-5:]) / 5
    assert last < first - 0.5, (first, last)  # byte-level text is learnable: the loss must drop
    assert 1 < summary["val_ppl"] < 257
    model, meta = checkpoint.load_model(tmp_path / "run")
    assert meta["kind"] == kind and meta["name"] == "model_ema"


def test_resume_reproduces_uninterrupted_losses(pydoc_data, tmp_path):
    full = load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "full"))
    pretrain(full)

    cfg = load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "cut"))
    from fewstep.diffusion.objective import DiffusionObjective

    real_step = DiffusionObjective.step

    def crashing_step(self, x0, step):
        if step == 6:  # dies mid-run, after the checkpoint at step 4
            raise RuntimeError("simulated crash")
        return real_step(self, x0, step)

    DiffusionObjective.step = crashing_step
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            pretrain(cfg)
    finally:
        DiffusionObjective.step = real_step
    assert checkpoint.latest(tmp_path / "cut").name == "step_0000004"
    summary = pretrain(cfg)
    assert summary["start_step"] == 4
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 13))
    assert a == b  # bit-identical losses after the resume
    wa = checkpoint.load_tensors(checkpoint.latest(tmp_path / "full") / "model.safetensors")
    wb = checkpoint.load_tensors(checkpoint.latest(tmp_path / "cut") / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(pydoc_data, tmp_path):
    cfg = load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "run"))
    from fewstep.diffusion.objective import DiffusionObjective

    real_step = DiffusionObjective.step

    def nan_step(self, x0, step):
        losses, logs = real_step(self, x0, step)
        return ({"model": losses["model"] * float("nan")} if step == 5 else losses), logs

    DiffusionObjective.step = nan_step
    try:
        with pytest.raises(FewstepError, match="non-finite loss.*step 5.*step_0000004"):
            pretrain(cfg)
        before = checkpoint.load_tensors(tmp_path / "run" / "step_0000004" / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in before.values())
        cfg.train.nan_policy = "skip"
        summary = pretrain(cfg)
        assert summary["skipped"] == 1 and summary["steps"] == 12
    finally:
        DiffusionObjective.step = real_step


def test_other_run_in_out_dir_is_refused(pydoc_data, tmp_path):
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "run", **{"train.max_steps": 4})))
    other = load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "run", **{"model.d_model": 64}))
    with pytest.raises(FewstepError, match="another model"):
        pretrain(other)


def test_torchrun_two_processes_gloo(pydoc_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "fewstep", "train", "--config", "tiny_mdlm",
           *tiny_overrides(pydoc_data, out, **{"train.max_steps": 4, "train.ckpt_every": 4})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert checkpoint.latest(out).name == "step_0000004"
    assert len(_losses(out)) == 4


def _bucket_worker(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from fewstep.train import _all_reduce_grads

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 5), (7,), (2, 2, 2), (1,)]]
    for p in ps:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in ps]
    _all_reduce_grads(ps, bucket_bytes=64)  # tiny buckets: several collectives, one tensor split across none
    out.put((rank, grads, [p.grad.clone() for p in ps]))
    dist.destroy_process_group()


def test_bucketed_all_reduce_averages_gradients_over_ranks():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_bucket_worker, args=(r, 2, 29541, out)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict((r, (g, a)) for r, g, a in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    for i in range(4):
        mean = (res[0][0][i] + res[1][0][i]) / 2
        torch.testing.assert_close(res[0][1][i], mean)
        torch.testing.assert_close(res[1][1][i], mean)
