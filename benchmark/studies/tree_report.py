"""The draft-efficiency tables and plots of the tree study, from run_experiment folders and the
positional acceptance ``tree_fit`` measured for the same pair and temperature.

    python -m benchmark.studies.tree_report \\
        --run "embedded, greedy=results/trees/study/pair_t0@results/trees/fit/pair" \\
        --run "embedded, t=1=results/trees/study/pair_t1@results/trees/fit/pair" --out results/trees/study

Each ``--run`` is ``label=RUN_FOLDER@FIT_FOLDER``; the run's temperature picks the fit's column.
Per tree: draft tokens, acceptance rate (accepted / drafted), acceptance length (accepted drafts per
verification), its analytic expectation (Sequoia's: the sum over nodes of the product of the
positional acceptance along the path; static trees only), tokens per target call (prefills
counted), and speedup over AR and over the chain of gamma 4 (``bass``), all from one run.
Writes study.md and study.png.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sampling.app.cli import Parser, run  # noqa: E402
from sampling.tree_shapes import TreeShape, parse_tree  # noqa: E402

from ..utils_io import save_figure, write_text  # noqa: E402
from .tree_fit import expected_accepted  # noqa: E402

FAMILIES = ("chain", "wide-shallow", "narrow-deep", "binary", "sequoia (fitted)", "dynamic", "dynamic, sharpened",
            "other")


def family(tree: str) -> str:
    """The family of the study a tree belongs to, from its shape."""
    shape = parse_tree(tree)
    if not isinstance(shape, TreeShape):
        return "dynamic" if shape.sharpen == 1 else "dynamic, sharpened"
    b = shape.branching
    if b is None:
        return "sequoia (fitted)"
    if set(b) == {1}:
        return "chain"
    if len(b) == 2 and b[1] == 1:
        return "wide-shallow"
    if b[0] == 2 and set(b[1:]) == {1}:
        return "narrow-deep"
    if set(b) == {2}:
        return "binary"
    return "other"


def study_rows(run_dir: str, fit_dir: str) -> pd.DataFrame:
    s = pd.read_csv(os.path.join(run_dir, "summary.csv"))
    raw = pd.read_csv(os.path.join(run_dir, "raw.csv"), usecols=["mode", "tree", "batch_id"])
    s["tree"], raw["tree"] = s.tree.fillna("").astype(str), raw.tree.fillna("").astype(str)
    ranks = pd.read_csv(os.path.join(fit_dir, "ranks.csv"))
    temp = float(s.temperature.iloc[0])
    r = ranks[f"r_t{temp:g}"].tolist()
    batches = raw.groupby(["mode", "tree"]).batch_id.nunique()
    ar = s[s["mode"] == "ar"].throughput.iloc[0]
    chain = s[s["mode"] == "bass"].throughput.iloc[0] if (s["mode"] == "bass").any() else float("nan")
    out = []
    for _, row in s[s["mode"].isin(["tree", "bass"])].iterrows():
        tree = row.tree if row["mode"] == "tree" else "1,1,1,1"
        shape = parse_tree(tree)
        n_batches = batches[(row["mode"], row.tree)]
        verifications = row.target_calls - n_batches                     # every batch has one prefill
        out.append(dict(
            family="chain (bass, gamma 4)" if row["mode"] == "bass" else family(tree), tree=tree,
            draft_tokens=shape.n, acceptance_rate=row.acceptance_rate,
            acceptance_length=row.accepted / max(1, verifications),
            analytic_length=expected_accepted(shape, r) if isinstance(shape, TreeShape) else float("nan"),
            tokens_per_call=row.tokens_per_call, throughput=row.throughput,
            speedup_vs_ar=row.throughput / ar, speedup_vs_chain=row.throughput / chain))
    return pd.DataFrame(out).sort_values(["family", "draft_tokens"], key=lambda c: c.map(
        {f: i for i, f in enumerate(FAMILIES)}).fillna(-1) if c.name == "family" else c)


def markdown(label: str, df: pd.DataFrame) -> str:
    head = ("| family | tree | draft tokens | accepted / drafted | accepted per verification | analytic | "
            "tokens / target call | tokens/s | vs AR | vs chain |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for _, r in df.iterrows():
        tree = r.tree if len(r.tree) <= 24 else r.tree[:21] + "..."
        analytic = "" if pd.isna(r.analytic_length) else f"{r.analytic_length:.2f}"
        lines.append(f"| {r.family} | `{tree}` | {r.draft_tokens} | {r.acceptance_rate:.3f} | "
                     f"{r.acceptance_length:.2f} | "
                     f"{analytic} | {r.tokens_per_call:.2f} | {r.throughput:.1f} | {r.speedup_vs_ar:.2f}x | "
                     f"{r.speedup_vs_chain:.2f}x |")
    return f"### {label}\n\n" + head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True,
                    help="label=RUN_FOLDER@FIT_FOLDER (repeat the flag for each run)")
    ap.add_argument("--out", required=True, help="folder for study.md and study.png")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.run:
        label, _, rest = spec.partition("=")
        run_dir, _, fit_dir = rest.partition("@")
        for path in (os.path.join(run_dir, "summary.csv"), os.path.join(fit_dir, "ranks.csv")):
            if not label or not os.path.exists(path):
                raise ValueError(f"--run {spec!r}: want label=RUN_FOLDER@FIT_FOLDER with {path} present")
        runs.append((label, study_rows(run_dir, fit_dir)))
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, "study.md"), "\n".join(markdown(label, df) for label, df in runs))
    fig, axes = plt.subplots(2, len(runs), figsize=(4.6 * len(runs), 7.2), squeeze=False)
    for j, (label, df) in enumerate(runs):
        for fam in FAMILIES:
            part = df[df.family == fam].sort_values("draft_tokens")
            if len(part):
                axes[0][j].plot(part.draft_tokens, part.tokens_per_call, marker="o", label=fam)
                axes[1][j].plot(part.draft_tokens, part.speedup_vs_ar, marker="o", label=fam)
        for i, (ylabel, ref) in enumerate((("tokens per target call", None), ("speedup over AR (same run)", 1.0))):
            ax = axes[i][j]
            chain = df[df.family.str.startswith("chain (bass")]
            if len(chain):
                ax.axhline(chain.iloc[0]["tokens_per_call" if i == 0 else "speedup_vs_ar"], color="grey", ls="--",
                           label="chain, gamma 4 (bass)")
            if ref:
                ax.axhline(ref, color="black", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("draft tokens per step")
            ax.set_ylabel(ylabel)
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, os.path.join(args.out, "study.png"))
    print(f"wrote {args.out}/study.md and study.png")


if __name__ == "__main__":
    run(main)
