"""The one training loop: exact resume, NaN guard, only trained modules change, multi-process (gloo)."""

import json
import math
import os

import pytest
import torch

from conftest import tiny_overrides, torchrun
from fewstep import checkpoint
from fewstep.config import FewstepError, load
from fewstep.pipeline import pretrain


def _losses(out_dir, key="loss/model"):
    rows = [json.loads(ln) for ln in open(os.path.join(out_dir, "log.jsonl"))]
    return {r["step"]: r[key] for r in rows if key in r}


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


def test_resume_with_other_settings_or_while_running_is_refused(pydoc_data, tmp_path):
    """A resume may change how long a run trains and how it logs, not what it trains on or how: a changed data
    budget, lr or seed used to continue silently, splicing two runs into one log (and config.json was rewritten)."""
    run = tmp_path / "run"
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, run, **{"train.max_steps": 4})))
    config = (run / "config.json").read_text()
    for change in ({"data.unique_tokens": 5000}, {"train.lr": 1e-4}, {"train.seed": 7}):
        with pytest.raises(FewstepError, match=f"other settings \\({next(iter(change))}="):
            pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, run, **{"train.max_steps": 6, **change})))
    assert (run / "config.json").read_text() == config
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, run, **{"train.max_steps": 6, "train.log_every": 2})))
    assert checkpoint.latest(run).name == "step_0000006"  # longer, logged differently: a resume
    import fcntl

    with open(run / ".lock", "a+") as held:  # another live process holds the run
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FewstepError, match="in use by another running process"):
            pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, run, **{"train.max_steps": 8})))


def _torchrun(data, out, **overrides) -> None:
    """`fewstep train` on 2 CPU processes (gloo) under torchrun."""
    torchrun("-m", "fewstep", "train", "--config", "tiny_mdlm", *tiny_overrides(data, out, **overrides))


def test_torchrun_two_processes_gloo(pydoc_data, tmp_path):
    out = tmp_path / "ddp"
    _torchrun(pydoc_data, out, **{"train.max_steps": 4, "train.ckpt_every": 4})
    assert checkpoint.latest(out).name == "step_0000004"
    assert len(_losses(out)) == 4


def test_logged_loss_and_validation_do_not_depend_on_accumulation_or_processes(pydoc_data, tmp_path):
    """An AR model (no noise) trained on the same batches by one process at grad_accum 1 and 2 and by 2 DDP
    processes: the logged loss and the task's metrics are means over the whole batch (they were rank 0's last
    micro-batch) and val_nll is scored on one validation set (it was eval_batches x the micro-batch)."""
    run = {"model.kind": "ar", "train.max_steps": 2, "train.ckpt_every": 2, "train.eval_every": 2}
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "one", **run)))
    pretrain(load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "accum", **run, **{"train.grad_accum": 2})))
    _torchrun(pydoc_data, tmp_path / "ddp", **run)
    for key in ("loss/model", "nll", "val_nll"):
        ref = _losses(tmp_path / "one", key)
        assert sorted(ref) == ([2] if key == "val_nll" else [1, 2])
        for other in ("accum", "ddp"):
            got = _losses(tmp_path / other, key)
            assert got.keys() == ref.keys(), (key, other)
            assert all(got[s] == pytest.approx(ref[s], rel=1e-5) for s in ref), (key, other)
    with pytest.raises(FewstepError, match="train.eval_batches"):  # 0 used to score nothing and report val_ppl 1
        load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "x", **{"train.eval_batches": 0}))


def test_torchrun_fsdp_matches_ddp_resumes_and_loads_with_one_process(pydoc_data, tmp_path):
    """FSDP2 on 2 gloo processes, grad_accum 2, stopped after step 2 and resumed to step 4, against DDP.

    Same seed, data and global batch, so step 1 sees the same weights, batch and noise on every rank: identical
    losses up to float rounding. After that the two differ only in the order in which the gradient reduction
    adds (FSDP reduce-scatter vs bucketed all-reduce), about 1e-7 relative, which three AdamW steps keep far
    below the 1e-5 relative tolerance (measured: bit-identical losses, gradient norms and weights within 1e-7)."""
    run = {"train.max_steps": 4, "train.grad_accum": 2, "train.ckpt_every": 4}
    _torchrun(pydoc_data, tmp_path / "ddp", **run)
    _torchrun(pydoc_data, tmp_path / "fsdp", **{**run, "train.max_steps": 2, "train.parallel": "fsdp"})
    assert checkpoint.latest(tmp_path / "fsdp").name == "step_0000002"  # written from the gathered shards
    _torchrun(pydoc_data, tmp_path / "fsdp", **{**run, "train.parallel": "fsdp"})  # resumes the shards
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3, 4] and all(math.isfinite(v) for v in fsdp.values())
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5), step
    ddp_norm, fsdp_norm = _losses(tmp_path / "ddp", "grad_norm/model"), _losses(tmp_path / "fsdp", "grad_norm/model")
    for step in ddp_norm:  # the loss alone would miss a wrong gradient scale (clipping and AdamW undo it)
        assert fsdp_norm[step] == pytest.approx(ddp_norm[step], rel=1e-5), step
    a, b = checkpoint.latest(tmp_path / "ddp"), checkpoint.latest(tmp_path / "fsdp")
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())  # the one format
    for name in ("model", "model_ema", "optim_model"):
        wa, wb = checkpoint.load_tensors(a / f"{name}.safetensors"), checkpoint.load_tensors(b / f"{name}.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    assert checkpoint.read_meta(a)["optim"] == checkpoint.read_meta(b)["optim"]
    model, meta = checkpoint.load_model(tmp_path / "fsdp")  # one process, no process group
    assert meta["name"] == "model_ema"
    with torch.no_grad():
        out = model(torch.zeros(1, 32, dtype=torch.long), torch.full((1,), 0.5))
    assert out.shape[:2] == (1, 32) and not out.isnan().any()


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
    # numpy arrays travel by value: a tensor is shared through this process's fd server, which is gone if the
    # worker exits before the parent reads the queue (a flaky FileNotFoundError)
    out.put((rank, [g.numpy() for g in grads], [p.grad.numpy().copy() for p in ps]))
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
        torch.testing.assert_close(torch.as_tensor(res[0][1][i]), torch.as_tensor(mean))
        torch.testing.assert_close(torch.as_tensor(res[1][1][i]), torch.as_tensor(mean))


def test_fsdp_refuses_two_player_methods_and_unknown_modes(pydoc_data, tmp_path):
    from fewstep.train import fit

    class TwoModules:  # the shape of IDLM / DiDi with a discriminator
        def trainable(self):
            return {"student": torch.nn.Linear(2, 2), "fake": torch.nn.Linear(2, 2)}

    cfg = load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "run", **{"train.parallel": "fsdp"}))
    with pytest.raises(FewstepError, match="train.parallel=ddp"):
        fit(TwoModules(), cfg, train_data=None, meta={}, device=torch.device("cpu"), rank=0, world=2)
    with pytest.raises(FewstepError, match="train.parallel"):
        load("tiny_mdlm", ["--train.parallel=zero3"])


def test_lr_scale_sets_each_modules_learning_rate(pydoc_data, tmp_path):
    """A task's lr_scale() multiplies train.lr per module: factor 0 leaves that module bit-identical, factor 1 and 2
    move theirs (AdamW's first step moves each weight by about lr, so the factor-2 module moves about twice as far)."""
    from fewstep.train import fit

    class ThreeModules:
        def __init__(self):
            torch.manual_seed(0)
            self.m = {n: torch.nn.Linear(4, 4) for n in ("a", "b", "c")}

        def trainable(self):
            return self.m

        def lr_scale(self):
            return {"b": 0.0, "c": 2.0}

        def step(self, x, step):
            z = torch.randn(8, 4)
            return {n: (m(z) ** 2).mean() for n, m in self.m.items()}, {}

    task = ThreeModules()
    before = {n: m.weight.detach().clone() for n, m in task.m.items()}
    cfg = load("tiny_mdlm", tiny_overrides(pydoc_data, tmp_path / "run", **{
        "train.max_steps": 1, "train.warmup_steps": 0, "train.ema": 0, "train.weight_decay": 0,
        "train.grad_clip": 0, "train.lr": 1e-3, "train.ckpt_every": 100, "train.eval_every": 100}))
    fit(task, cfg, train_data=None, meta={}, device=torch.device("cpu"))
    moved = {n: (m.weight.detach() - before[n]).abs().mean().item() for n, m in task.m.items()}
    assert moved["b"] == 0.0 and moved["a"] > 0
    assert moved["c"] == pytest.approx(2 * moved["a"], rel=0.05)


def test_mfu_counts_the_vocabulary_head_where_it_runs():
    from fewstep.diffusion.mdlm import MaskedDenoiser
    from fewstep.diffusion.objective import DiffusionObjective
    from fewstep.diffusion.schedule import LogLinear
    from fewstep.models.transformer import Transformer
    from fewstep.train import flops_per_token

    bb = Transformer(vocab_size=50, d_model=16, n_layers=2, n_heads=2, seq_len=32, causal=False, time_cond=False)
    model = MaskedDenoiser(bb, mask_id=49)
    outside = ("backbone.embed", "backbone.head")
    blocks = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(outside))
    head, attn = 16 * 50, 12 * 2 * 16 * 32
    assert flops_per_token(model, 32) == 6 * (blocks + head) + attn
    frac = DiffusionObjective(model, LogLinear()).head_fraction()
    assert frac == pytest.approx(0.5, abs=1e-3)  # E[1 - alpha_t] ~ E[t], t ~ U[0, 1]: about half the rows are masked
    assert flops_per_token(model, 32, frac) == pytest.approx(6 * (blocks + frac * head) + attn, rel=1e-12)
    # time conditioning (time MLP, adaLN) acts on one vector per sequence: 6 n / L per token, not 6 n
    tc = MaskedDenoiser(Transformer(vocab_size=50, d_model=16, n_layers=2, n_heads=2, seq_len=32, time_cond=True),
                        mask_id=49)
    cond = sum(p.numel() for n, p in tc.named_parameters() if "t_mlp" in n or ".ada" in n)
    assert cond == (2 * (16 * 16 + 16)) + 2 * (16 * 96 + 96) + (16 * 32 + 32)
    assert flops_per_token(tc, 32) == pytest.approx(6 * (blocks + head + cond / 32) + attn, rel=1e-12)
