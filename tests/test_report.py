"""report.py: result files -> markdown table and PNG plots."""

from __future__ import annotations

import json

import pytest

from fewstep.config import FewstepError
from fewstep.report import line_labels, load_results, markdown_table, plot, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"name": "mdlm", "kind": "mdlm", "steps": 1024, "sampler": "ancestral", "greedy_tail": False,
     "precision": "fp64", "n_samples": 64, "gen_ppl": 41.29, "entropy": 5.28, "latency_s": 12.5,
     "speedup_vs_ar": 0.4},
    {"name": "mdlm", "kind": "mdlm", "steps": 64, "sampler": "ancestral", "greedy_tail": False,
     "precision": "fp64", "n_samples": 64, "gen_ppl": 98.7, "entropy": 5.35, "latency_s": 0.81,
     "speedup_vs_ar": 6.2},
    {"name": "sdtt", "kind": "mdlm", "method": "sdtt", "steps": 16, "sampler": "ancestral",
     "greedy_tail": True, "precision": "fp64", "n_samples": 64, "gen_ppl": 60.1, "entropy": 5.21,
     "latency_s": 0.2, "speedup_vs_ar": 25.0},
    {"name": "sdtt", "kind": "mdlm", "method": "sdtt", "steps": 64, "gen_ppl": 45.5, "entropy": 5.25,
     "latency_s": 0.8, "speedup_vs_ar": 6.3},
    {"name": "ar", "kind": "ar", "n_samples": 64, "gen_ppl": 36.45, "entropy": 5.6, "latency_s": 5.0,
     "tokens_per_s": 13107.2},
    {"name": "ar", "kind": "length_sweep", "seq_len": 128, "latency_s": 0.6},
    {"name": "ar", "kind": "length_sweep", "seq_len": 1024, "latency_s": 5.0},
    {"name": "sdtt", "kind": "length_sweep", "seq_len": 128, "latency_s": 0.05},
    {"name": "sdtt", "kind": "length_sweep", "seq_len": 1024, "latency_s": 0.2},
]  # fmt: skip


@pytest.fixture
def result_files(tmp_path):
    one = tmp_path / "mdlm.json"
    one.write_text(json.dumps(ROWS[0]))
    many = tmp_path / "runs.jsonl"
    many.write_text("\n".join(json.dumps(r) for r in ROWS[1:5]) + "\n\n")
    sweep = tmp_path / "sweep" / "lengths.json"
    sweep.parent.mkdir()
    sweep.write_text(json.dumps(ROWS[5:]))
    return [one, many, sweep.parent]


def test_load_results_reads_json_jsonl_and_folders(result_files, tmp_path):
    rows = load_results(result_files)
    assert rows == ROWS
    with pytest.raises(FewstepError):
        load_results([tmp_path / "absent.json"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    with pytest.raises(FewstepError):
        load_results(bad)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"name": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(FewstepError, match="cannot read it as UTF-8"):
        load_results(latin)
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"name": "a"}\n' * 50 + "garbage\n")
    with pytest.raises(FewstepError, match="torn.jsonl line 51: not valid JSON"):  # it said line 1 column 1
        load_results(torn)
    listed = tmp_path / "listed.json"
    listed.write_text('[{"name": ["a"], "steps": 4, "gen_ppl": 10}]')
    with pytest.raises(FewstepError, match="a result's name must be text"):  # TypeError: unhashable type
        load_results(listed)


def test_markdown_table_has_values_and_blanks():
    md = markdown_table(ROWS[:5])
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 5
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["name", "kind", "method", "steps"]
    assert "gen_ppl" in header and "seq_len" not in header
    for v in ("41.29", "5.28", "98.70", "1024", "36.45", "13,107", "0.4", "sdtt"):
        assert v in md
    ar = [c.strip() for c in lines[6].strip("|").split("|")]
    assert ar[header.index("name")] == "ar" and ar[header.index("steps")] == ""  # missing -> blank
    assert ar[header.index("entropy")] == "5.60"
    assert "| on |" in md and "| off |" in md  # greedy tail shown as on/off
    extra = markdown_table([{"name": "m", "judge": "smollm2", "example": "long sample text " * 4, "x": 3}])
    assert extra.splitlines()[0] == "| name | judge | x |"  # known keys first; long free text left out
    custom = markdown_table(ROWS[:1], columns=["name", "gen_ppl", "val_ppl"])
    assert custom.splitlines()[2] == "| mdlm | 41.29 |  |"


def test_plots_are_png_and_skip_absent_data(tmp_path):
    paths = plot(ROWS, tmp_path / "plots")
    names = {p.name for p in paths}
    assert names == {
        "gen_ppl_vs_steps.png", "entropy_vs_steps.png", "latency_vs_steps.png", "speedup_vs_steps.png",
        "latency_vs_seq_len.png",
    }  # fmt: skip
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    only_ppl = plot([{"name": "m", "steps": 8, "gen_ppl": 50.0}], tmp_path / "few")
    assert [p.name for p in only_ppl] == ["gen_ppl_vs_steps.png"]


def test_write_report(result_files, tmp_path):
    out = write_report(result_files, tmp_path / "report")
    md = out["markdown"].read_text()
    assert out["rows"] == len(ROWS) and len(out["plots"]) == 5
    assert "41.29" in md and "![gen_ppl_vs_steps](gen_ppl_vs_steps.png)" in md
    assert all(p.parent == tmp_path / "report" and p.stat().st_size > 0 for p in out["plots"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(FewstepError):
        write_report([empty], tmp_path / "r2")


def test_one_model_under_several_settings_gets_one_line_per_setting():
    """Rows of one name that differ in a setting (greedy tail, sampler, temperature, seed, length, ...) are labelled
    apart, so a plot never joins them into one zig-zag line; a constant setting adds nothing to the label."""
    rows = [{"name": "m", "steps": k, "greedy_tail": g, "seq_len": 128, "temperature": 1.0}
            for g in (False, True) for k in (1, 4)] + [{"name": "ar", "steps": 128, "seq_len": 128}]
    assert line_labels(rows, "steps") == ["m (greedy tail=False)"] * 2 + ["m (greedy tail=True)"] * 2 + ["ar"]
    sweep = [{"name": "m", "seq_len": n, "steps": 1} for n in (64, 128)]
    assert line_labels(sweep, "seq_len") == ["m", "m"]  # the x axis itself never splits a line
    assert line_labels(sweep, "steps") == ["m (L=64)", "m (L=128)"]
