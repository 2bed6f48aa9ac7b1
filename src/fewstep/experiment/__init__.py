"""`fewstep experiment`: pre-training on a grid of unique-token budgets x epochs (AR and MDLM), distillation of
the MDLM teacher with each registered method, and one evaluation harness for all, resumable stage by stage.

config.py reads and checks the TOML (configs/experiments/*.toml), run.py runs the stages, report.py writes
docs/results/<name>/ (JSONL results, markdown tables, PNG plots, SUMMARY.md). See docs/experiments.md.
"""

from fewstep.experiment.config import ExperimentConfig, label, load, parse
from fewstep.experiment.run import Runner, run_experiment

__all__ = ["ExperimentConfig", "Runner", "label", "load", "parse", "run_experiment"]
