"""Distillation of a masked diffusion teacher into few-step students: one file per method, one line here.

A method has a `Config` dataclass (filled from the `[method]` table of a run config), is built as
`Method(config, setup)` (see common.Setup), and exposes `trainable() -> {name: module}`,
`step(batch, step) -> ({name: loss}, logs)` (batch is None when `data_free`), and optionally `on_step_end(step)`,
`validate(x0, generator)`, `planned_steps()` and `restore(start_step)`. `fewstep distill` (run.py) does the rest.
"""

from fewstep.distill.boot import BOOT
from fewstep.distill.didi import DiDi
from fewstep.distill.idlm import IDLM
from fewstep.distill.onpolicy import OnPolicy
from fewstep.distill.sdtt import SDTT
from fewstep.distill.tcs import TCS

METHODS = {
    "sdtt": SDTT,  # self-distillation through time: the baseline (Deschenaux & Gulcehre 2025)
    "boot": BOOT,  # BOOT-style data-free bootstrapping, collapsed to one step (Gu et al. 2023, adapted)
    "idlm": IDLM,  # inverse distillation with a fake model, masked or uniform teachers (Li, Gushchin et al. 2026)
    "didi": DiDi,  # DiDi-Instruct: integral KL by policy gradient with a discriminator reward (Zheng et al. 2025)
    "tcs": TCS,  # AR teacher -> DLM student: target concrete score at masked positions (TCS / TCSM, Zhang et al. 2025)
    "onpolicy": OnPolicy,  # AR teacher -> DLM student on its own confidence-decoded rollouts, forward KL (OPDLM)
}

__all__ = ["METHODS"]
