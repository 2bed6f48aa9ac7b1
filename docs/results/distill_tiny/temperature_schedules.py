"""Per-step temperature schedules of the undistilled tiny teacher at 4 steps (diagnostic for docs/distillation.md).

Does sharpening some of the four steps beat sharpening all of them alike, at matched entropy? That bounds what a
distilled 4-step student can gain beyond plain temperature along one family of structured sharpenings. Run from
the repository root (runs/tiny_mdlm, judge runs/tiny_ar): one schedule per argument, NAME=T_1,T_2,T_3,T_4, or
NAME=adj:T_adj,T_0 (positions unmasking together with a neighbour at T_adj, the others at T_0).
    python docs/results/distill_tiny/temperature_schedules.py plain=1,1,1,1 u95=.95,.95,.95,.95 last2_90=1,1,.9,.9 \
        adj90=adj:0.9,1
256 samples (4 batches of 64) per schedule and seed (0, 1), float64 draws; each line: gen PPL, the standard error
of log gen PPL, mean unigram entropy. A schedule is applied through the sampler's guidance hook (tilt: log p / T_k
renormalised; draw: the plain float64 draw), so plain = the ancestral sampler.
"""
import json
import sys

import torch

from fewstep.checkpoint import load_model
from fewstep.data import get_tokenizer
from fewstep.diffusion.sampling import draw_rows, sample
from fewstep.diffusion.schedule import get_schedule
from fewstep.eval.entropy import unigram_entropy
from fewstep.eval.genppl import generative_perplexity
from fewstep.eval.judge import Judge


class Adjacent:
    """A guidance hook: positions unmasking in the same step as a neighbour are drawn at t_adj, the others at t_0
    (a sharpening that knows which tokens of one jump can clash)."""

    def __init__(self, t_adj, t_0):
        self.t_adj, self.t_0, self.temperature, self.top_p = t_adj, t_0, 1.0, 1.0

    def tilt(self, k, steps, t, s, x, log_p):
        return log_p

    def draw(self, k, steps, s, x, rows, lp, generator):
        now = torch.zeros(x.numel(), dtype=torch.bool)
        now[rows] = True
        now = now.view_as(x)  # (B, L): unmasking at this step
        nb = torch.zeros_like(now)
        nb[:, 1:] |= now[:, :-1]
        nb[:, :-1] |= now[:, 1:]
        T = torch.where(nb.view(-1)[rows], self.t_adj, self.t_0).to(lp.dtype)[:, None]  # (N, 1)
        return draw_rows((lp / T).log_softmax(-1), 1.0, 1.0, generator)


class Sched:
    """A guidance hook of diffusion.sampling.sample: temperature T_k at step k."""

    def __init__(self, temps):
        self.temps, self.temperature, self.top_p = temps, 1.0, 1.0

    def tilt(self, k, steps, t, s, x, log_p):
        T = self.temps[k]
        return log_p if T == 1.0 else (log_p / T).log_softmax(-1)

    def draw(self, k, steps, s, x, rows, lp, generator):
        return draw_rows(lp, 1.0, 1.0, generator)

model, meta = load_model("runs/tiny_mdlm", "cpu")
ar, am = load_model("runs/tiny_ar", "cpu")
tok = get_tokenizer(am["data"]["tokenizer"])
j = Judge.from_module(ar, tok, max_len=am["model"]["seq_len"] + 1, name="AR", bos_id=tok.eos_id)
args = [a.split("=", 1) for a in sys.argv[1:]]
scheds = {name: [float(t) for t in v.removeprefix("adj:").split(",")] for name, v in args}
adjacent = {name for name, v in args if v.startswith("adj:")}
for name, temps in scheds.items():
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        xs = [sample(model, get_schedule("loglinear"), batch=64, length=128, steps=4, mask_id=model.mask_id,
                     generator=g, guidance=Adjacent(*temps) if name in adjacent else None if all(
                         t == 1 for t in temps) else Sched(temps)) for _ in range(4)]
        x = torch.cat(xs)
        r = generative_perplexity([tok.decode(i) for i in x.tolist()], j)
        print(json.dumps({"sched": name, "temps": temps, "seed": seed, "gen_ppl": round(r["gen_ppl"], 2),
                          "se": round(r["nll_se"], 4), "entropy": round(float(unigram_entropy(x).mean()), 4)}),
              flush=True)
