"""Adapter that lets lm-evaluation-harness (EleutherAI) evaluate a fewstep checkpoint, AR or DLM.

    pip install lm_eval
    python -m fewstep.eval.lm_eval --model fewstep --model_args pretrained=runs/tiny_ar,mc=64 \
        --tasks lambada_openai,hellaswag --limit 200
or in Python: `lm_eval.simple_evaluate(model=FewstepLM(...) wrapped by harness_class(), tasks=[...])`.

The harness's three request types (`Instance.args`):
  loglikelihood          (context, continuation) -> (log p, is_greedy): exact for AR; for a DLM the NELBO lower
                         bound with the context never masked, `mc` antithetic time samples (eval/likelihood.py)
  loglikelihood_rolling  (text,) -> log p(text), scored in chunks of `stride` tokens, each conditioned on as much
                         preceding text as fits the model's length
  generate_until         (context, {until, max_gen_toks, do_sample, temperature}) -> text; greedy by default
                         (AR: argmax with a KV cache; DLM: confidence-ordered greedy unmasking in `steps` forwards)
lm_eval is imported only by `harness_class()`; `FewstepLM` works without it (and is what the tests exercise).
The harness requires subclassing its `LM` ABC, the one place fewstep inherits from a foreign class.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch

from fewstep.config import FewstepError
from fewstep.eval.judge import module_device
from fewstep.eval.likelihood import continuation_logprob, dlm_greedy_fill, objective


class FewstepLM:
    """A fewstep model answering lm-evaluation-harness requests (duck-typed to `lm_eval.api.model.LM`)."""

    def __init__(self, pretrained: str | None = None, *, model=None, meta: dict | None = None, tokenizer=None,
                 device: str | None = None, mc: int = 32, steps: int | None = None, batch_size=32, seed: int = 0,
                 stride: int | None = None, max_batch_size=None):
        from fewstep.data import get_tokenizer

        if model is None:
            if not pretrained:
                raise FewstepError("FewstepLM needs pretrained=<checkpoint dir> or model=/meta=")
            from fewstep.checkpoint import load_model

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, meta = load_model(pretrained, device)
        self.model, self.meta = model, meta
        self.tok = tokenizer or get_tokenizer(meta["data"]["tokenizer"])
        self._device = module_device(model)  # lm_eval's LM exposes it as the read-only property `device`
        self.seq_len = int(meta["model"]["seq_len"])
        self.is_ar = meta["kind"] == "ar"
        self.mc, self.seed = int(mc), int(seed)
        self.steps = int(steps) if steps else None
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32  # the harness may pass "auto"
        self.stride = int(stride) if stride else max(1, self.seq_len // 2)

    @property
    def device(self) -> torch.device:
        return self._device

    def _cache(self, kind: str, args, result) -> None:
        hook = getattr(self, "cache_hook", None)  # set by lm_eval.api.model.LM.__init__
        if hook is not None:
            hook.add_partial(kind, args, result)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from fewstep.eval.tasks import encode_pair

        pairs = [encode_pair(self.tok, ctx, cont) if ctx else ([], self.tok.encode(cont))
                 for ctx, cont in (r.args for r in requests)]
        # one noise seed per context: the choices of one item share their noise (common random numbers, as the
        # in-house scorer), and no score depends on the order or batch of the requests
        seeds = [self.seed + zlib.crc32(ctx.encode("utf-8")) % 2**31 for ctx, _ in (r.args for r in requests)]
        lp, greedy = continuation_logprob(self.model, self.meta, [a for a, _ in pairs], [b for _, b in pairs],
                                          mc=self.mc, seeds=seeds, batch_size=self.batch_size, greedy=True)
        out = [(float(v), bool(g)) for v, g in zip(lp, greedy)]
        for r, o in zip(requests, out):
            self._cache("loglikelihood", r.args, o)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            ids = self.tok.encode(r.args[0])
            chunks = [(ids[:i], ids[i : i + self.stride]) for i in range(0, len(ids), self.stride)]
            if not chunks:
                out.append(0.0)
                continue
            lp = continuation_logprob(self.model, self.meta, [a for a, _ in chunks], [b for _, b in chunks],
                                      mc=self.mc, seed=self.seed, batch_size=self.batch_size)
            out.append(float(lp.sum()))
            self._cache("loglikelihood_rolling", r.args, out[-1])
        return out

    @torch.no_grad()
    def _generate(self, ctx: list[int], n: int, kw: dict) -> list[int]:
        eos = self.meta["data"]["eos_id"]
        sample = bool(kw.get("do_sample")) and float(kw.get("temperature", 1.0) or 0) > 0
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        if self.is_ar:
            ctx = [eos, *ctx][-(self.seq_len + 1 - n) :]
            x = torch.tensor([ctx], device=self.device)
            if sample:
                from fewstep.ar import ar_sample

                out = ar_sample(self.model, batch=1, length=n, bos_id=eos, prompt=x, generator=gen,
                                temperature=float(kw.get("temperature", 1.0)), top_p=float(kw.get("top_p", 1.0)),
                                device=self.device)
                return out[0].tolist()
            cache = self.model.new_cache(1, x.shape[1] + n, self.device)
            logits, new = self.model(x, cache=cache), []
            for _ in range(n):
                nxt = logits[:, -1].argmax(-1)  # (1,)
                new.append(int(nxt))
                if new[-1] == eos:  # the end of the document: generation stops there
                    break
                logits = self.model(nxt[:, None], cache=cache)
            return new
        ctx = [eos, *ctx][-(self.seq_len - n) :]
        x = torch.tensor([ctx + [self.model.mask_id] * n], device=self.device)  # (1, len(ctx) + n)
        schedule = objective(self.model, self.meta).schedule
        if sample:
            from fewstep.diffusion.sampling import sample as dlm_sample

            out = dlm_sample(self.model, schedule, batch=1, length=x.shape[1],
                             steps=self.steps or n, mask_id=self.model.mask_id, x_init=x, generator=gen,
                             temperature=float(kw.get("temperature", 1.0)), top_p=float(kw.get("top_p", 1.0)),
                             device=self.device)
        else:
            fill = torch.zeros_like(x, dtype=torch.bool)
            fill[:, len(ctx) :] = True
            out = dlm_greedy_fill(self.model, x, fill, per_step=math.ceil(n / (self.steps or n)), schedule=schedule)
        return out[0, len(ctx) :].tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            ctx, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = min(int(kw.get("max_gen_toks", 256)), self.seq_len - 1)  # lm-evaluation-harness's default
            ids = self._generate(self.tok.encode(ctx), n, kw)
            eos = self.meta["data"]["eos_id"]
            text = self.tok.decode(ids[: ids.index(eos)] if eos in ids else ids)  # EOS ends the answer (lm-eval)
            cut = [text.index(u) for u in until if u and u in text]
            out.append(text[: min(cut)] if cut else text)
            self._cache("generate_until", r.args, out[-1])
        return out


@functools.cache
def harness_class():
    """FewstepLM as an `lm_eval.api.model.LM` subclass, registered under the model name "fewstep"."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise FewstepError("the lm-evaluation-harness adapter needs `pip install lm_eval`") from e

    class FewstepHarnessLM(FewstepLM, LM):
        def __init__(self, pretrained: str | None = None, **kwargs):
            LM.__init__(self)  # rank, world size, cache hook
            FewstepLM.__init__(self, pretrained, **kwargs)

    return register_model("fewstep")(FewstepHarnessLM)


if __name__ == "__main__":  # python -m fewstep.eval.lm_eval <lm_eval CLI arguments>
    harness_class()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
