"""Plots of a sweep's summary (matplotlib, PNG, written atomically)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .metrics import spread_label  # noqa: E402
from .utils_io import save_figure  # noqa: E402


def _save(fig, path: str) -> None:
    save_figure(fig, path)


def cache_label(r) -> str:
    """" static" / " static compiled" / " press hybrid on draft" for a configuration off the default
    cache, else ""."""
    kv = r.get("kv_cache")
    compiled = str(r.get("compile")) in ("True", "true", "1")
    press = r.get("press") or ""
    press = "" if press != press else f" press {press.split(':')[0]} on {press.split(':')[3]}" if press else ""
    return (f" {kv}" if kv not in (None, "", "dynamic") else "") + (" compiled" if compiled else "") + press


def _label(r) -> str:
    sched = "" if r.gamma_schedule == "constant" or r["mode"] in ("ar", "hf") else f"/{r.gamma_schedule}"
    gamma = f" g{r.gamma}" if r.gamma else ""
    masked = (" masked" if r.get("finished_rows") == "mask" else "") + (f" {r.tree}" if r.get("tree") else "")
    draft = f" {r.draft}" if r.get("draft") not in (None, "", "model") else ""
    return f"{r['mode']}{draft}{gamma}{sched}{masked}{cache_label(r)}"


def plot_all(summary: pd.DataFrame, raw: pd.DataFrame, folder: str) -> list[str]:
    """throughput by mode and batch, speedup over AR by batch, acceptance and tokens per call by
    gamma, acceptance by Dolly category; one PNG per temperature for the first two."""
    written = []
    s = summary.assign(label=[_label(r) for _, r in summary.iterrows()])
    for temp, part in s.groupby("temperature"):
        for metric, name, ylabel in (("throughput", "throughput", "new tokens / s"),
                                     ("speedup_vs_ar", "speedup", "throughput / AR at the same batch")):
            fig, ax = plt.subplots(figsize=(7, 4.2))
            for label, line in part.groupby("label"):
                line = line.sort_values("batch")
                ax.plot(line.batch, line[metric], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name} by mode and batch size, temperature {temp:g}")
            if metric == "speedup_vs_ar":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            path = os.path.join(folder, f"{name}_t{temp:g}.png")
            _save(fig, path)
            written.append(path)
    spec = s[s.drafted > 0]
    if len(spec):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for (mode, temp), part in spec[spec.gamma_schedule == "constant"].groupby(["mode", "temperature"]):
            part = part.groupby("gamma")[["acceptance_rate", "tokens_per_call"]].mean().reset_index()
            for ax, metric in zip(axes, ("acceptance_rate", "tokens_per_call")):
                ax.plot(part.gamma, part[metric], marker="o", label=f"{mode} T={temp:g}")
        for ax, title in zip(axes, ("acceptance rate", "tokens per target call")):
            ax.set_xlabel("gamma")
            ax.set_title(f"{title} by gamma")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        path = os.path.join(folder, "acceptance_by_gamma.png")
        _save(fig, path)
        written.append(path)
        cat = raw[raw.drafted > 0].groupby(["category", "temperature"])[["accepted", "drafted"]].sum()
        cat = (cat.accepted / cat.drafted).unstack("temperature")
        fig, ax = plt.subplots(figsize=(8, 4))
        cat.plot.barh(ax=ax)
        ax.set_xlabel("acceptance rate (all speculative configurations)")
        ax.set_title("acceptance by Dolly category")
        ax.legend(title="temperature", fontsize=7)
        path = os.path.join(folder, "acceptance_by_category.png")
        _save(fig, path)
        written.append(path)
    return written


def markdown_table(summary: pd.DataFrame) -> str:
    """The project card's table per temperature: throughput gain and per-sequence latency change
    against AR at the smallest batch size of the sweep (batch 1 when it ran; unsorted before sorted),
    with acceptance, tokens per target call and the Leviathan prediction."""
    def f(x, fmt, suffix=""):
        return "" if x != x else format(x, fmt) + suffix

    lines = []
    nan = float("nan")
    for temp, part in summary.groupby("temperature"):
        base = part[part["mode"] == "ar"].sort_values(["batch", "sort_batch"])
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
                  " | efficiency | predicted with verify cost | efficiency (verify-aware) |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        order = [k for k in ("mode", "draft", "batch", "gamma", "gamma_schedule", "sort_batch", "finished_rows")
                 if k in part]
        for _, r in part.sort_values(order).iterrows():
            gamma = "" if r.gamma == 0 else \
                f"{r.gamma}" + ("" if r.gamma_schedule == "constant" else f" {r.gamma_schedule}")
            name = r["mode"] + (f" {r.draft}" if r.get("draft") not in (None, "", "model") else "") + \
                (f" {r.tree}" if r.get("tree") else "") + (" sorted" if r.sort_batch else "") + \
                (" masked" if r.get("finished_rows") == "mask" else "") + cache_label(r)
            lines.append(f"| {name} | {r.batch} | {gamma} | "
                         f"{r.throughput:.1f} | {f(r.throughput / tput, '.2f', 'x')} | {r.latency_ms:.1f} | "
                         f"{f(r.latency_ms / lat, '.2f', 'x')} | {f(r.acceptance_rate, '.3f')} | {f(r.alpha, '.3f')} | "
                         f"{f(r.tokens_per_call, '.2f')} | {f(r.speedup_vs_ar, '.2f')} | "
                         f"{spread_label(r.get('speedup_min_round', nan), r.get('speedup_max_round', nan))} | "
                         f"{f(r.decode_throughput, '.1f')} | {f(r.decode_speedup_vs_ar, '.2f')} | "
                         f"{f(r.get('predicted_speedup', float('nan')), '.2f')} | "
                         f"{f(r.get('efficiency', float('nan')), '.2f')} | "
                         f"{f(r.get('predicted_verify', float('nan')), '.2f')} | "
                         f"{f(r.get('efficiency_verify', float('nan')), '.2f')} |")
    return "\n".join(lines) + "\n"
