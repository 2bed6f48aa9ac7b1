"""fewstep: train diffusion language models and distill them into few-step generators."""

__version__ = "0.1.0"
