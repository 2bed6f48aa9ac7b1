"""Tables (markdown) and plots (PNG) from result files.

A result is a flat JSON object; a file holds one object, a list of objects, or JSONL (one object per line);
a folder means every *.json / *.jsonl in it. Known keys (any subset; a missing value renders blank): name kind
method steps sampler greedy_tail precision n_samples seed seq_len batch device gen_ppl entropy judge
val_ppl latency_s tokens_per_s speedup_vs_ar. Rows of kind "length_sweep" feed the latency-vs-length plot
only. Per DESIGN.md every number travels with steps, sampler, greedy tail, precision and #samples, so those
columns come first in the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from fewstep.config import FewstepError

COLUMNS = [
    "name", "kind", "method", "steps", "sampler", "greedy_tail", "precision", "n_samples", "seed", "seq_len",
    "batch", "device", "gen_ppl", "entropy", "judge", "val_ppl", "latency_s", "tokens_per_s", "speedup_vs_ar",
]  # fmt: skip
SWEEP_KINDS = {"length_sweep", "seq_len_sweep"}
# (x key, y key, title, file, log x, log y); x = "steps" plots skip length-sweep rows.
PLOTS = [
    ("steps", "gen_ppl", "Generative perplexity vs sampling steps", "gen_ppl_vs_steps.png", True, True),
    ("steps", "entropy", "Unigram entropy (nats) vs sampling steps", "entropy_vs_steps.png", True, False),
    ("steps", "latency_s", "Latency of one batch (s) vs sampling steps", "latency_vs_steps.png", True, True),
    ("steps", "speedup_vs_ar", "Speed-up over KV-cached AR vs steps", "speedup_vs_steps.png", True, True),
    ("seq_len", "latency_s", "Latency of one batch (s) vs length", "latency_vs_seq_len.png", True, True),
]


def load_results(paths: str | Path | Iterable[str | Path]) -> list[dict]:
    """Read result rows from JSON / JSONL files or folders of them, in the given order."""
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise FewstepError(f"result file {str(p)!r} does not exist")
    rows: list[dict] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FewstepError(f"{f}: cannot read it as UTF-8 text ({e})") from None
        if f.suffix == ".jsonl":
            from fewstep.data.sources import jsonl_lines

            objs = [obj for _, obj in jsonl_lines(text, lambda i, f=f: f"{f} line {i}")]
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise FewstepError(f"{f}: not valid JSON ({e})") from None
            objs = obj if isinstance(obj, list) else [obj]
        bad = [o for o in objs if not isinstance(o, dict)]
        if bad:
            raise FewstepError(f"{f}: every result must be a JSON object, got {type(bad[0]).__name__}")
        for o in objs:
            if not isinstance(o.get("name", ""), str | int | float | type(None)):
                raise FewstepError(f"{f}: a result's name must be text, got {o['name']!r:.60}")
        rows += objs
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, dict | list):
        v = json.dumps(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _short(v) -> bool:
    return not isinstance(v, dict | list) and len(str(v)) <= 32


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table; default columns: the known keys present in any row, then other short scalar keys."""
    if columns is None:
        present = {k for r in rows for k in r}
        extra = dict.fromkeys(k for r in rows for k in r if k not in COLUMNS)
        # Long free text (a sample excerpt, a path) and nested values would swamp the table: JSON keeps them.
        extra = [k for k in extra if all(_short(r.get(k)) for r in rows)]
        columns = [c for c in COLUMNS if c in present] + extra
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# Settings that split one model's rows into separate lines when they vary (short names for the legend).
LINE_SETTINGS = {"seq_len": "L", "batch": "B", "sampler": "sampler", "greedy_tail": "greedy tail",
                 "temperature": "T", "precision": "precision", "seed": "seed"}


def line_labels(rows: list[dict], x_key: str) -> list[str]:
    """A legend label per row: its name, plus the settings that vary among the rows of that name (x_key aside),
    so one model measured under several settings gives one line per setting, never a zig-zag through them."""
    seen: dict[object, dict[str, set]] = {}  # per name: the values each setting takes
    for r in rows:
        for k in LINE_SETTINGS:
            seen.setdefault(r.get("name"), {}).setdefault(k, set()).add(repr(r.get(k)))
    out = []
    for r in rows:
        label = str(r.get("name") or r.get("method") or r.get("kind") or "?")
        vary = [k for k, v in seen[r.get("name")].items() if len(v) > 1 and k != x_key]
        out.append(label + (" (" + ", ".join(f"{LINE_SETTINGS[k]}={r.get(k)}" for k in vary) + ")" if vary else ""))
    return out


def plot(rows: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Write one PNG per entry of PLOTS that has data, one line per model name; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for xk, yk, title, fname, logx, logy in PLOTS:
        sweep = xk == "seq_len"
        use = [r for r in rows if _num(r.get(yk)) and (r.get("kind") in SWEEP_KINDS) == sweep]
        lines: dict[str, list[tuple[float, float]]] = {}
        refs: dict[str, float] = {}  # rows with y but no x (e.g. an AR baseline): dashed horizontal line
        for r, label in zip(use, line_labels(use, xk), strict=True):
            if _num(r.get(xk)):
                lines.setdefault(label, []).append((float(r[xk]), float(r[yk])))
            elif not sweep:
                refs[label] = float(r[yk])
        if not lines:
            continue  # no data for this plot: skip it rather than draw an empty frame
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for label, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for label, y in refs.items():
            ax.axhline(y, linestyle="--", linewidth=1, color="gray", label=label)
        if yk == "speedup_vs_ar":
            ax.axhline(1.0, linestyle=":", linewidth=1, color="black")
        if logx:  # steps and lengths are powers of two: base-2 ticks, printed as plain numbers
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4, not 1.0
        ax.set_yscale("log" if logy else "linear")
        ax.set_xlabel(xk)
        ax.set_ylabel(yk)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def write_report(paths: str | Path | Iterable[str | Path], out_dir: str | Path) -> dict:
    """Load results, write out_dir/results.md (table + plots) and the PNGs; returns what was written."""
    rows = load_results(paths)
    if not rows:
        raise FewstepError("no result rows found in the given files")
    out_dir = Path(out_dir)
    pngs = plot(rows, out_dir)
    md = ["# Results", "", markdown_table(rows)]
    md += [f"![{p.stem}]({p.name})\n" for p in pngs]
    md_path = out_dir / "results.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return {"rows": len(rows), "markdown": md_path, "plots": pngs}


def line_plot(lines: dict[str, list[tuple[float, float]]], path: str | Path, *, title: str, xlabel: str,
              ylabel: str, logx: int = 0, logy: bool = False, refs: dict[str, float] | None = None) -> Path | None:
    """One PNG with a line per label (a single point draws as a marker) and a dashed horizontal line per entry of
    `refs`; None (no file written) when there is no data. A point is (x, y) or (x, y, err): err draws a +-err bar
    (None: none). logx: 0 (linear) or the log base (2: plain-number ticks for steps and epochs; 10: for times)."""
    lines = {k: sorted((p for p in v if _num(p[0]) and _num(p[1])), key=lambda p: p[:2]) for k, v in lines.items()}
    lines = {k: v for k, v in lines.items() if v}
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, pts in lines.items():
        err = [p[2] if len(p) > 2 and _num(p[2]) else 0.0 for p in pts]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err if any(err) else None, marker="o",
                    capsize=3, label=label)
    for label, y in (refs or {}).items():
        if _num(y):
            ax.axhline(y, linestyle="--", linewidth=1, color="gray", label=label)
    if logx:
        ax.set_xscale("log", base=logx)
        if logx == 2:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        else:  # labelled minor ticks crowd a narrow decade
            ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log" if logy else "linear")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
