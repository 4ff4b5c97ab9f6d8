"""Plots of a sweep's summary (matplotlib, PNG, written atomically)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .metrics import spread_label, upgrade_raw  # noqa: E402
from .utils_io import save_figure  # noqa: E402


def _save(fig, path: str) -> None:
    save_figure(fig, path)


def cache_label(r) -> str:
    """" static" / " static compiled" / " press hybrid on draft" for a configuration off the default
    cache, else ""."""
    kv = r.get("kv_cache")
    compiled = str(r.get("compile")) in ("True", "true", "1")
    compiled_draft = str(r.get("compile")) == "draft"
    press = r.get("press") or ""
    press = "" if press != press else f" press {press.split(':')[0]} on {press.split(':')[3]}" if press else ""
    return (f" {kv}" if kv not in (None, "", "dynamic") else "") + (" compiled" if compiled else "") + \
        (" draft compiled" if compiled_draft else "") + press


def config_label(r) -> str:
    """A configuration in one short string: mode, drafter, gamma and schedule, tree, batching and cache."""
    sched = "" if r.gamma_schedule == "constant" or r["mode"] in ("ar", "hf") else f"/{r.gamma_schedule}"
    gamma = f" g{r.gamma}" if r.gamma else ""
    masked = (" masked" if r.get("finished_rows") == "mask" else "") + (f" {r.tree}" if r.get("tree") else "") + \
        (" sorted" if str(r.get("sort_batch")) in ("True", "true", "1") else "")
    draft = f" {r.draft}" if r.get("draft") not in (None, "", "model") else ""
    always = " always" if r.get("speculate") == "always" else ""           # the controller off
    dtype = f" {r['dtype']}" if r.get("dtype") else ""                        # --baseline_dtype's AR
    return f"{r['mode']}{draft}{gamma}{sched}{masked}{always}{cache_label(r)}{dtype}"


def batch_axis(ax, batches) -> None:
    """A log2 batch axis labelled with the batch sizes themselves (1, 2, 4, not 2^0, 2^1, 2^2)."""
    ticks = sorted({int(b) for b in batches})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.minorticks_off()
    ax.set_xlabel("batch size")


def plot_all(summary: pd.DataFrame, raw: pd.DataFrame, folder: str) -> list[str]:
    """Throughput and speedup over AR by batch size (one PNG per temperature); for chains, acceptance
    per draft token and tokens per target call by gamma; for trees, tokens per target call and
    acceptance per drafted node by tree (by the gamma or tree asked: with the controller on, fewer
    may be drafted); the controller's mean draft length by batch size; chains' acceptance by Dolly
    category. Each quantity on its own axis, titled with its definition."""
    written = []
    s = summary.assign(label=[config_label(r) for _, r in summary.iterrows()])
    for temp, part in s.groupby("temperature"):
        for metric, name, ylabel in (("throughput", "throughput", "new tokens / s"),
                                     ("speedup_vs_ar", "speedup", "throughput / AR's at the same batch")):
            fig, ax = plt.subplots(figsize=(7, 4.2))
            for label, line in part.groupby("label"):
                line = line.sort_values("batch")
                ax.plot(line.batch, line[metric], marker="o", label=label)
            batch_axis(ax, part.batch)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name} by configuration and batch size, temperature {temp:g}")
            if metric == "speedup_vs_ar":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            path = os.path.join(folder, f"{name}_t{temp:g}.png")
            _save(fig, path)
            written.append(path)
    auto = s[s.get("speculate", pd.Series("", index=s.index)) == "auto"]
    if len(auto):                                                    # what the controller chose, by batch
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, line in auto.groupby("label"):
            line = line.sort_values("batch")
            ax.plot(line.batch, line.mean_gamma, marker="o", label=label)
        batch_axis(ax, auto.batch)
        ax.set_ylabel("mean drafted per step (tokens; a tree: levels)")
        ax.set_ylim(bottom=0)
        ax.set_title("the controller's draft length by batch size (0: AR steps)\n(speculate auto; mean over the "
                     "steps of every generation)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = os.path.join(folder, "controller_choices.png")
        _save(fig, path)
        written.append(path)
    spec = s[s.drafted > 0]
    chains = spec[(spec["mode"] != "tree") & (spec.gamma > 0) & (spec.gamma_schedule == "constant")]
    if len(chains):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
        for (mode, draft, temp), part in chains.groupby(["mode", "draft", "temperature"]):
            part = part.groupby("gamma")[["acceptance_rate", "tokens_per_call"]].mean().reset_index()
            name = mode + (f" {draft}" if draft not in ("", "model") else "")
            for ax, metric in zip(axes, ("acceptance_rate", "tokens_per_call")):
                ax.plot(part.gamma, part[metric], marker="o", label=f"{name} T={temp:g}")
        for ax, title in zip(axes, ("acceptance per draft token\n(accepted / drafted tokens)",
                                    "tokens per target call\n(new tokens / target forward passes)")):
            ax.set_xlabel("gamma (draft tokens per step)")
            ax.set_xticks(sorted(chains.gamma.unique()))
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("chains, constant gamma asked (mean over batch sizes; with speculate auto the controller may "
                     "draft fewer: mean_gamma in summary.csv)", fontsize=9)
        path = os.path.join(folder, "acceptance_by_gamma.png")
        _save(fig, path)
        written.append(path)
    trees = spec[spec["mode"] == "tree"]
    if len(trees):
        t = trees.assign(name=[f"{r.tree} {r.draft}".strip() + f" T={r.temperature:g}" for _, r in trees.iterrows()])
        t = t.groupby("name")[["tokens_per_call", "acceptance_rate"]].mean().sort_values("tokens_per_call")
        fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.35 * len(t)), sharey=True, layout="constrained")
        axes[0].barh(t.index, t.tokens_per_call)
        axes[0].set_title("tokens per target call\n(new tokens / target forward passes)", fontsize=10)
        axes[1].barh(t.index, t.acceptance_rate, color="tab:orange")
        axes[1].set_title("acceptance per drafted node\n(accepted / drafted nodes; not per draft token)", fontsize=10)
        for ax in axes:
            ax.grid(alpha=0.3, axis="x")
        fig.suptitle("trees (mean over batch sizes)", fontsize=10)
        path = os.path.join(folder, "acceptance_by_tree.png")
        _save(fig, path)
        written.append(path)
    chain_raw = raw[(raw.drafted > 0) & (raw["mode"] != "tree")]
    if len(chain_raw):
        cat = chain_raw.groupby(["category", "temperature"])[["accepted", "drafted"]].sum()
        cat = (cat.accepted / cat.drafted).unstack("temperature")
        fig, ax = plt.subplots(figsize=(8, 4))
        cat.plot.barh(ax=ax)
        ax.set_xlabel("acceptance per draft token (accepted / drafted, every chain configuration)")
        ax.set_title("acceptance by Dolly category, chains")
        ax.legend(title="temperature", fontsize=7)
        path = os.path.join(folder, "acceptance_by_category.png")
        _save(fig, path)
        written.append(path)
    return written


def replot(folder: str) -> list[str]:
    """Redraw a sweep's plots from the summary.csv and raw.csv in ``folder``."""
    summary = pd.read_csv(os.path.join(folder, "summary.csv"), keep_default_na=False, na_values=[""])
    raw = upgrade_raw(pd.read_csv(os.path.join(folder, "raw.csv"), keep_default_na=False, na_values=[""]))
    for col, default in (("draft", "model"), ("tree", ""), ("kv_cache", "dynamic"), ("press", ""),
                         ("speculate", "always"), ("dtype", "")):
        # an empty cell reads back as NaN: "" (ar drafts nothing); an older file without the column ran the default
        summary[col] = summary[col].astype(object).where(summary[col].notna(), "") if col in summary else default
    return plot_all(summary, raw, folder)


def markdown_table(summary: pd.DataFrame) -> str:
    """The project card's table per temperature: throughput gain and per-sequence latency change
    against AR at the smallest batch size of the sweep (batch 1 when it ran; unsorted before sorted),
    with acceptance, tokens per target call and the Leviathan prediction."""
    def f(x, fmt, suffix=""):
        return "" if x != x else format(x, fmt) + suffix

    lines = []
    nan = float("nan")
    for temp, part in summary.groupby("temperature"):
        own = part["dtype"] == ""                                         # not --baseline_dtype's ar
        base = part[(part["mode"] == "ar") & own].sort_values(["batch", "sort_batch"])
        versus = "speedup_vs_baseline" in part                            # run_experiment --baseline_dtype
        if base.empty:
            tput = lat = float("nan")
            lines.append(f"\n**temperature {temp:g}** (no ar configuration: the gain columns are empty)\n")
        else:
            tput, lat = float(base.throughput.iloc[0]), float(base.latency_ms.iloc[0])
            name = f"ar at batch {base.batch.iloc[0]}" + (", sorted" if base.sort_batch.iloc[0] else "")
            lines.append(f"\n**temperature {temp:g}** (baseline: {name}, {tput:.1f} tokens/s, {lat:.1f} ms/token)\n")
        lines += ["| mode | batch | gamma | throughput (tok/s) | throughput gain | latency (ms/token) | latency change"
                  " | acceptance | alpha | tokens / target call | speedup vs ar, same batch"
                  " | that speedup per round, lowest-highest | decode-phase tok/s"
                  " | decode speedup vs ar | predicted (Leviathan)"
                  " | efficiency | predicted with verify cost | efficiency (verify-aware) |"
                  + (" speedup vs the baseline dtype's ar, same batch |" if versus else ""),
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                  + ("---:|" if versus else "")]
        order = [k for k in ("mode", "draft", "batch", "gamma", "gamma_schedule", "sort_batch", "finished_rows")
                 if k in part]
        for _, r in part.sort_values(order).iterrows():
            gamma = "" if r.gamma == 0 else \
                f"{r.gamma}" + ("" if r.gamma_schedule == "constant" else f" {r.gamma_schedule}")
            name = r["mode"] + (f" {r.draft}" if r.get("draft") not in (None, "", "model") else "") + \
                (f" {r.tree}" if r.get("tree") else "") + (" sorted" if r.sort_batch else "") + \
                (" masked" if r.get("finished_rows") == "mask" else "") + cache_label(r) + \
                (f" {r['dtype']}" if r["dtype"] else "")
            lines.append(f"| {name} | {r.batch} | {gamma} | "
                         f"{r.throughput:.1f} | {f(r.throughput / tput, '.2f', 'x')} | {r.latency_ms:.1f} | "
                         f"{f(r.latency_ms / lat, '.2f', 'x')} | {f(r.acceptance_rate, '.3f')} | {f(r.alpha, '.3f')} | "
                         f"{f(r.tokens_per_call, '.2f')} | {f(r.speedup_vs_ar, '.2f')} | "
                         f"{spread_label(r.get('speedup_min_round', nan), r.get('speedup_max_round', nan))} | "
                         f"{f(r.decode_throughput, '.1f')} | {f(r.decode_speedup_vs_ar, '.2f')} | "
                         f"{f(r.get('predicted_speedup', float('nan')), '.2f')} | "
                         f"{f(r.get('efficiency', float('nan')), '.2f')} | "
                         f"{f(r.get('predicted_verify', float('nan')), '.2f')} | "
                         f"{f(r.get('efficiency_verify', float('nan')), '.2f')} |"
                         + (f" {f(r.speedup_vs_baseline, '.2f')} |" if versus else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":      # python -m benchmark.analyzer FOLDER ...: redraw sweeps' plots
    import sys
    for f in sys.argv[1:]:
        print("\n".join(replot(f)))
