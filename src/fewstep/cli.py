"""Command line: `fewstep data | train | sample | demo` (also `python -m fewstep`).

Every command takes `--config PRESET` (a TOML path or a name in configs/) and `--section.key=value` overrides.
User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from fewstep.config import FewstepError


def _cfg(args):
    from fewstep.config import load

    return load(args.config, args.overrides)


def cmd_data(args) -> None:
    from fewstep.data import build

    cfg = _cfg(args)
    meta = build(cfg.data, force=args.force)
    keys = ("tokenizer", "vocab_size", "n_tokens")
    print(json.dumps({k: meta[k] for k in keys if k in meta} | {"dir": cfg.data.dir}))


def cmd_train(args) -> None:
    from fewstep.pipeline import pretrain

    summary = pretrain(_cfg(args))
    if summary.get("start_step", 0) >= summary.get("steps", 0):
        print(f"nothing to do: {summary['out_dir']} already finished {summary['steps']} steps", file=sys.stderr)
    print(json.dumps(summary, default=str))


def cmd_sample(args) -> None:
    import time

    import torch

    from fewstep.checkpoint import load_model
    from fewstep.data import get_tokenizer
    from fewstep.eval.entropy import unigram_entropy
    from fewstep.pipeline import generate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(args.ckpt, device)
    tok = get_tokenizer(meta["data"]["tokenizer"])
    t0 = time.perf_counter()
    x = generate(model, meta, n=args.n, steps=args.steps, length=args.length, batch=args.batch, seed=args.seed,
                 greedy_tail=args.greedy_tail, temperature=args.temperature, top_p=args.top_p, device=device)
    elapsed = time.perf_counter() - t0
    ent = unigram_entropy(x)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    for ids, h in zip(x.tolist(), ent.tolist()):
        out.write(json.dumps({"text": tok.decode(ids), "entropy": h, "ids": ids if args.ids else None}) + "\n")
    if args.out:
        out.close()
    info = {"ckpt": meta["ckpt"], "kind": meta["kind"], "steps": args.steps if meta["kind"] != "ar" else None,
            "n": args.n, "seconds": elapsed, "entropy": float(ent.mean()), "greedy_tail": args.greedy_tail}
    print(json.dumps(info), file=sys.stderr)


def cmd_demo(args) -> None:
    from fewstep.demo import run_demo

    run_demo(out_dir=args.out_dir, overrides=args.overrides, steps=args.steps, n=args.n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, default=None):
        sp.add_argument("--config", default=default, help="TOML preset: a path or a name in configs/")
        return sp

    d = with_config(sub.add_parser("data", help="build the token streams (train.bin / val.bin)"), "tiny_mdlm")
    d.add_argument("--force", action="store_true", help="rebuild even if the data dir exists")
    d.set_defaults(fn=cmd_data)
    with_config(sub.add_parser("train", help="pre-train an MDLM or AR model"), "tiny_mdlm").set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="sample from a checkpoint (JSONL: text, entropy)")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--steps", type=int, default=64)
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--batch", type=int, default=None)
    s.add_argument("--length", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--greedy-tail", action="store_true")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--ids", action="store_true", help="also write token ids")
    s.add_argument("--device", default=None)
    s.add_argument("--out", default=None)
    s.set_defaults(fn=cmd_sample, config=None)

    m = sub.add_parser("demo", help="end to end on CPU: data, tiny MDLM + AR, sampling table")
    m.add_argument("--out-dir", default="runs/demo")
    m.add_argument("--steps", default="1,4,16,64")
    m.add_argument("--n", type=int, default=16, help="samples per setting")
    m.set_defaults(fn=cmd_demo, config=None)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "." in r.split("=", 1)[0] and "=" in r)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --train.lr=1e-4)")
    args.overrides = rest
    try:
        args.fn(args)
    except FewstepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
