"""Command line: `fewstep data | train | distill | sample | demo | eval | bench | report | experiment`.

Also `python -m fewstep`.

Every command takes `--config PRESET` (a TOML path or a name in configs/) and `--section.key=value` overrides.
User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from fewstep.config import FewstepError, int_list


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

    _report_run(pretrain(_cfg(args)))


def cmd_distill(args) -> None:
    from fewstep.distill.run import distill

    _report_run(distill(_cfg(args)))


def _rank0() -> bool:
    """True unless this is a rank > 0 of torchrun: results are printed once, by rank 0 (the others' are partial)."""
    return int(os.environ.get("RANK", "0")) == 0


def _report_run(summary: dict) -> None:
    if not _rank0():
        return
    if summary.get("start_step", 0) >= summary.get("steps", 0):
        print(f"nothing to do: {summary['out_dir']} already finished {summary['steps']} steps", file=sys.stderr)
    print(json.dumps(summary, default=str))


def cmd_sample(args) -> None:
    import time

    import torch

    from fewstep.checkpoint import load_model
    from fewstep.data import get_tokenizer
    from fewstep.diffusion.schedule import schedule_of
    from fewstep.distill.rgas import rgas_from_args
    from fewstep.eval.entropy import unigram_entropy
    from fewstep.pipeline import generate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(args.ckpt, device)
    tok = get_tokenizer(meta["data"]["tokenizer"])
    guidance = rgas_from_args(args, model, schedule_of(meta), device)
    t0 = time.perf_counter()
    x = generate(model, meta, n=args.n, steps=args.steps, length=args.length, batch=args.batch, seed=args.seed,
                 greedy_tail=args.greedy_tail, temperature=args.temperature, top_p=args.top_p, device=device,
                 guidance=guidance)
    elapsed = time.perf_counter() - t0
    ent = unigram_entropy(x)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    for ids, h in zip(x.tolist(), ent.tolist()):
        out.write(json.dumps({"text": tok.decode(ids), "entropy": h, "ids": ids if args.ids else None}) + "\n")
    if args.out:
        out.close()
    info = {"ckpt": meta["ckpt"], "kind": meta["kind"], "steps": args.steps if meta["kind"] != "ar" else None,
            "n": args.n, "seconds": elapsed, "entropy": float(ent.mean()), "greedy_tail": args.greedy_tail,
            "sampler": "rgas" if guidance is not None else "ancestral"}
    print(json.dumps(info), file=sys.stderr)


def cmd_demo(args) -> None:
    from fewstep.demo import run_demo

    run_demo(out_dir=args.out_dir, overrides=args.overrides, steps=args.steps, n=args.n)


def _no_overrides(args) -> None:
    extra = [o for o in args.overrides if o != "--train.deterministic=true"]
    if extra:
        raise FewstepError(f"{args.command} takes no config overrides (got {' '.join(extra)})")


def _write_rows(rows: list[dict], out: str | None) -> None:
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=1, default=str) + "\n", encoding="utf-8")


def cmd_eval(args) -> None:
    from fewstep.eval.harness import evaluate_checkpoint
    from fewstep.report import markdown_table

    _no_overrides(args)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    rows = evaluate_checkpoint(
        args.ckpt, steps=int_list(args.steps, "--steps"), n=args.n, batch=args.batch, judge=args.judge,
        greedy_tail=args.greedy_tail, val_batches=args.val_batches, val_mc=args.val_mc,
        tasks=[t for t in args.tasks.split(",") if t], task_n=args.task_n, task_mc=args.task_mc, seed=args.seed,
        precision=args.precision, device=args.device, data_dir=args.data_dir, name=args.name, log=log)
    _write_rows(rows, args.out)
    print(markdown_table([r for r in rows if r.get("kind") != "task"], [
        "name", "steps", "sampler", "greedy_tail", "precision", "n_samples", "seed", "val_ppl", "gen_ppl",
        "entropy", "judge", "latency_s", "tokens_per_s"]))
    tasks = [r for r in rows if r.get("kind") == "task"]
    if tasks:
        print(markdown_table(tasks, ["name", "task", "likelihood", "n_items", "acc", "acc_norm", "ppl"]))


def cmd_bench(args) -> None:
    from fewstep.eval.bench import bench_from_args

    _no_overrides(args)
    rows, summary = bench_from_args(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    _write_rows(rows, args.out)
    print(json.dumps(summary, default=str))


def cmd_report(args) -> None:
    from fewstep.report import write_report

    _no_overrides(args)
    out = write_report(args.results, args.out)
    print(out["markdown"].read_text(encoding="utf-8"))
    print(json.dumps({"rows": out["rows"], "markdown": str(out["markdown"]), "plots": [str(p) for p in out["plots"]]}))


def cmd_experiment(args) -> None:
    from fewstep.experiment import run_experiment

    out = run_experiment(args.experiment, args.overrides, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                         report_only=args.report_only)
    if not _rank0():
        return
    if out.get("summary"):
        from pathlib import Path

        print(Path(out["summary"]).read_text(encoding="utf-8"))
    print(json.dumps({k: out.get(k) for k in ("dir", "files", "stages_run", "wall_seconds")}, default=str))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description=__doc__.splitlines()[0])
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels and seeded RNGs (before the command: fewstep --deterministic train)")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, default=None):
        sp.add_argument("--config", default=default, help="TOML preset: a path or a name in configs/")
        return sp

    d = with_config(sub.add_parser("data", help="build the token streams (train.bin / val.bin)"), "tiny_mdlm")
    d.add_argument("--force", action="store_true", help="rebuild even if the data dir exists")
    d.set_defaults(fn=cmd_data)
    with_config(sub.add_parser("train", help="pre-train an MDLM or AR model"), "tiny_mdlm").set_defaults(fn=cmd_train)
    distill_help = "distill a teacher checkpoint into a few-step student ([method] table: name = sdtt | boot | idlm " \
                   "| didi | tcs | onpolicy)"
    with_config(sub.add_parser("distill", help=distill_help), "distill_sdtt_tiny").set_defaults(fn=cmd_distill)

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
    from fewstep.eval.bench import add_guide_args

    add_guide_args(s)
    s.set_defaults(fn=cmd_sample, config=None)

    m = sub.add_parser("demo", help="end to end on CPU: data, tiny MDLM + AR, sampling table")
    m.add_argument("--out-dir", default="runs/demo")
    m.add_argument("--steps", default="1,4,16,64")
    m.add_argument("--n", type=int, default=16, help="samples per setting")
    m.set_defaults(fn=cmd_demo, config=None)

    e = sub.add_parser("eval", help="val PPL, gen PPL under a judge, entropy, speed and tasks of a checkpoint")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--steps", default="1,4,16,64", help="DLM sampling steps, comma-separated (ignored for AR)")
    e.add_argument("--n", type=int, default=64, help="samples per setting")
    e.add_argument("--batch", type=int, default=None)
    e.add_argument("--judge", default="smollm2", help="smollm2 | ckpt:<AR ckpt> | hf:<path or id> | none")
    e.add_argument("--greedy-tail", action="store_true")
    e.add_argument("--val-batches", type=int, default=16, help="validation batches of 16 (0: skip val PPL)")
    e.add_argument("--val-mc", type=int, default=4, help="NELBO time samples per validation sequence (DLM)")
    e.add_argument("--tasks", default="", help="comma-separated: cloze, mc, lambada:<src>, hellaswag:<src>, "
                   "mmlu:<src> (<src>: a JSONL file or hf:<dataset>[:config][@split])")
    e.add_argument("--task-n", type=int, default=200, help="items per task")
    e.add_argument("--task-mc", type=int, default=32, help="NELBO time samples per task item (DLM)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    e.add_argument("--device", default=None)
    e.add_argument("--data-dir", default=None, help="data dir of the held-out split (default: the checkpoint's)")
    e.add_argument("--name", default=None)
    e.add_argument("--out", default=None, help="JSON file for the result rows")
    e.set_defaults(fn=cmd_eval, config=None)

    from fewstep.eval.bench import add_args as add_bench_args

    b = sub.add_parser("bench", help="latency and tokens/s: DLM at a grid of steps vs KV-cached AR")
    add_bench_args(b)
    b.add_argument("--out", default=None, help="JSON file for the result rows")
    b.set_defaults(fn=cmd_bench, config=None)

    r = sub.add_parser("report", help="markdown table and PNG plots from result JSON/JSONL files")
    r.add_argument("results", nargs="+", help="result files or folders of them")
    r.add_argument("--out", default="report", help="output folder")
    r.set_defaults(fn=cmd_report, config=None)

    x = sub.add_parser("experiment", help="train AR + MDLM on a budget x epochs grid, distill, evaluate, report "
                       "(resumable; overrides: --eval.n=16, --experiment.epochs=1,4, --distill.sdtt.round_steps=50)")
    x.add_argument("experiment", help="configs/experiments/<name>.toml, or a name in it (tiny, small, paper)")
    x.add_argument("--report-only", action="store_true", help="run nothing: write the report from the stages "
                   "already done (a cut run, or stage files from another machine)")
    x.set_defaults(fn=cmd_experiment, config=None)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _environment_error(e: BaseException) -> str | None:
    """One line for failures of the machine rather than the input (disk full, permissions, out of memory)."""
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or _one_line(e)}{where} (check the path, its permissions and the free disk space)"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e):
        first = (str(e).strip().splitlines() or ["out of memory"])[0]
        return f"out of memory ({first[:200]}): lower the batch size, model size or sample count"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors in the input (FewstepError) print one line and return 2; errors of the machine
    (OSError such as a full disk or a denied permission, out of memory) print one line and return 1. Anything
    else is a bug in fewstep and keeps its traceback. FEWSTEP_DEBUG=1 shows the traceback of every error."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "." in r.split("=", 1)[0] and "=" in r)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --train.lr=1e-4)")
    if rest and args.command == "sample":
        parser.error(f"sample takes no config overrides (got {' '.join(rest)}): it reads the checkpoint's config")
    if args.deterministic and args.command != "sample":
        rest = [*rest, "--train.deterministic=true"]
    args.overrides = rest
    debug = os.environ.get("FEWSTEP_DEBUG", "") not in ("", "0")
    try:
        if args.deterministic:
            from fewstep.train import set_deterministic

            set_deterministic()
        args.fn(args)
    except FewstepError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fewstep sample | head`: the reader left; exit quietly like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        msg = None if debug else _environment_error(e)
        if msg is None:
            raise  # a bug in fewstep: keep the traceback so it can be reported
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The console entry (`fewstep`, `python -m fewstep`): `main`, then `leave` with its exit code."""
    leave(main())


def leave(code: int) -> NoReturn:
    """Exit the process with `code`.

    A process that joined a process group (torchrun) leaves through `os._exit` once its output is flushed. Its
    gloo worker threads can still be freeing the tensors of the last collective when the interpreter finalizes,
    and a thread that needs the GIL then aborts the whole process (SIGABRT after a run that had finished and
    saved). Everything a run writes is closed by then: checkpoints, logs, TensorBoard."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
