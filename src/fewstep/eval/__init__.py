"""Evaluation: generative perplexity with a judge LM (MDLM protocol) and unigram entropy (Duo)."""

from fewstep.eval.entropy import mean_entropy, unigram_entropy
from fewstep.eval.genppl import generative_perplexity, score_texts, token_weights
from fewstep.eval.judge import Judge, load_judge

__all__ = [
    "Judge",
    "generative_perplexity",
    "load_judge",
    "mean_entropy",
    "score_texts",
    "token_weights",
    "unigram_entropy",
]
