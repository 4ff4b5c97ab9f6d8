"""What a user reads: strict JSON files, tables that fit a terminal, plots with honest axes."""
import json
import math
import os
import subprocess

import numpy as np
import pandas as pd
import pytest

from benchmark.console import WIDTH, Col, fit_table
from benchmark.utils_io import write_json
from sampling.app.strict_json import dumps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_load(text: str):
    def reject(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=reject)


def test_every_committed_json_file_is_strict():
    files = subprocess.run(["git", "ls-files", "*.json"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    bad = []
    for name in files:
        try:
            strict_load(open(os.path.join(ROOT, name)).read())
        except ValueError as e:
            bad.append(f"{name}: {e}")
    assert not bad, bad


def test_write_json_writes_missing_values_as_null(tmp_path):
    path = tmp_path / "env.json"
    write_json(str(path), dict(nan=float("nan"), inf=-math.inf, nested=[1.5, (float("nan"), 2)],
                               numpy=np.float32("nan"), count=np.int64(3), keys={1: "a"}, other=object))
    back = strict_load(path.read_text())
    assert back == dict(nan=None, inf=None, nested=[1.5, [None, 2]], numpy=None, count=3, keys={"1": "a"},
                        other=str(object))
    assert dumps({"x": float("nan")}) == '{"x": null}'


def table():
    df = pd.DataFrame(dict(name=["ar", "google tree"], fast=[12.345, float("nan")], wide=["x" * 70, "y"],
                           last=[1, 2]))
    cols = [Col("name", "name"), Col("fast", "tok/s", ".1f", "tokens per second"),
            Col("wide", "a very wide column", "", "its text", left=True), Col("last", "last")]
    return df, cols


def test_a_table_keeps_the_columns_that_fit_and_names_the_rest():
    df, cols = table()
    text = fit_table(df, cols, width=40, where="summary.csv")
    lines = text.splitlines()
    assert all(len(ln) <= 40 for ln in lines), text
    assert lines[0].split() == ["name", "tok/s"] and lines[1].split() == ["ar", "12.3"]
    assert lines[2].split() == ["google", "tree", "-"]                     # a missing value reads "-"
    assert "  tok/s: tokens per second" in lines
    assert " ".join(" ".join(lines[4:]).split()) == ("2 more column(s) (a very wide column, last) in summary.csv; "
                                                     "--wide prints them all")
    whole = fit_table(df, cols, width=40, wide=True).splitlines()
    assert whole[0].split()[-1] == "last" and "more column(s)" not in "\n".join(whole)
    assert max(len(ln) for ln in fit_table(df, cols).splitlines()) <= WIDTH


def test_plots_label_batch_sizes_and_keep_trees_off_the_gamma_axis(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmark import analyzer
    from benchmark.analyzer import batch_axis, plot_all
    figures = {}
    real_save = analyzer._save

    def keep(fig, path):
        figures[os.path.basename(path)] = [(ax.get_title(), [list(line.get_xdata()) for line in ax.get_lines()],
                                            [t.get_text() for t in ax.get_xticklabels()]) for ax in fig.axes]
        real_save(fig, path)
    monkeypatch.setattr(analyzer, "_save", keep)
    fig, ax = plt.subplots()
    ax.plot([1, 2, 4, 16], [1, 2, 3, 4])
    batch_axis(ax, [1, 2, 4, 16])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "16"]
    plt.close(fig)
    rows = []
    for mode, gamma, tree in (("ar", 0, ""), ("google", 2, ""), ("google", 4, ""), ("tree", 0, "dynamic:16")):
        for batch in (1, 2):
            rows.append(dict(mode=mode, draft="model" if mode != "ar" else "", batch=batch, gamma=gamma,
                             gamma_schedule="constant", temperature=0.0, sort_batch=False, finished_rows="drop",
                             tree=tree, kv_cache="dynamic", compile=False, press="", throughput=10.0 * batch,
                             speedup_vs_ar=1.2, drafted=0 if mode == "ar" else 10, acceptance_rate=0.5,
                             tokens_per_call=2.0))
    summary = pd.DataFrame(rows)
    raw = pd.DataFrame(dict(mode=["google", "tree"], category=["qa", "qa"], temperature=[0.0, 0.0],
                            accepted=[5, 2], drafted=[10, 10]))
    written = {os.path.basename(p) for p in plot_all(summary, raw, str(tmp_path))}
    assert written == {"throughput_t0.png", "speedup_t0.png", "acceptance_by_gamma.png", "acceptance_by_tree.png",
                       "acceptance_by_category.png"}
    by_gamma = figures["acceptance_by_gamma.png"]
    assert [title.split("\n")[0] for title, _, _ in by_gamma] == ["acceptance per draft token",
                                                                  "tokens per target call"]
    assert all(xs == [2, 4] for _, lines, _ in by_gamma for xs in lines)      # chains only: no tree at gamma 0
    assert figures["throughput_t0.png"][0][2] == ["1", "2"]
    assert "per drafted node" in figures["acceptance_by_tree.png"][1][0]
