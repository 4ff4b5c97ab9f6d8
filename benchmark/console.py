"""Console tables that fit a terminal: the columns in priority order, as many as fit the width, each
shown column's definition in a legend under the table, and a line naming what was left out (the
full table is in the files a command writes; ``--wide`` prints it whole)."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import pandas as pd

WIDTH = 120          # the default width of every console table


@dataclass(frozen=True)
class Col:
    key: str         # the DataFrame column
    header: str      # what the table prints above it
    fmt: str = ""    # a format spec for numbers ("" prints the value as it is)
    legend: str = "" # its definition, printed under the table ("" for self-evident columns)
    left: bool = False  # align left (text); numbers align right; the first column is always left


def para(text: str, width: int = WIDTH) -> str:
    """A sentence for the console, wrapped to ``width`` columns."""
    return textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False)


def cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def fit_table(df: pd.DataFrame, cols: list[Col], width: int = WIDTH, wide: bool = False,
              where: str = "", hint: str = "--wide prints them all") -> str:
    """``df``'s ``cols`` (those present), left to right while they fit ``width`` characters (all of
    them with ``wide``), then the legend of each shown column and, when some were left out, one line
    naming them and ``where`` the whole table is."""
    cols = [c for c in cols if c.key in df]
    cells = {c.key: [cell(v, c.fmt) for v in df[c.key]] for c in cols}
    widths = {c.key: max([len(c.header)] + [len(v) for v in cells[c.key]]) for c in cols}
    shown, used = [], -2
    for c in cols:
        if not wide and shown and used + 2 + widths[c.key] > width:
            break                                      # priority order: the rest are left out
        shown.append(c)
        used += 2 + widths[c.key]
    left = [c for c in cols if c not in shown]
    first = shown[0].key if shown else None

    def line(values):
        return "  ".join(v.ljust(widths[c.key]) if c.key == first or c.left else v.rjust(widths[c.key])
                         for c, v in zip(shown, values)).rstrip()
    out = [line([c.header for c in shown])]
    out += [line([cells[c.key][i] for c in shown]) for i in range(len(df))]
    wrap = dict(width=width, subsequent_indent="    ")
    for c in shown:
        if c.legend:
            out += textwrap.wrap(f"  {c.header}: {c.legend}", **wrap)
    if left:
        out += textwrap.wrap(f"  {len(left)} more column(s) ({', '.join(c.header for c in left)})"
                             + (f" in {where}" if where else "") + (f"; {hint}" if hint else ""), **wrap)
    return "\n".join(out)


# The columns of the sweeps' tables (run_experiment, eval_dolly), defined once.
SPEEDUP_NOTE = ("each configuration's tokens/s over ar's at the same batch, temperature, sorting and cache "
                "(tokens/s from each batch's median timed run)")
SWEEP_COLS = {c.key: c for c in [
    Col("label", "configuration"),
    Col("mode", "mode"),
    Col("batch", "batch"),
    Col("temperature", "T", "g"),
    Col("samples", "samples"),
    Col("new_tokens", "new tokens"),
    Col("throughput", "tok/s", ".1f",
        "new tokens / the summed wall time of the batches' median timed runs (one process's rate in a sharded run)"),
    Col("throughput_total", "tok/s all procs", ".1f", "the sum of every process's tok/s (they ran side by side)"),
    Col("speedup_vs_ar", "speedup", ".2f", SPEEDUP_NOTE),
    Col("rounds", "rounds", "",
        "the lowest-highest of the same ratio taken round by round (a round times every configuration once, "
        "close in time); the speedup uses each batch's median run, which may come from different rounds, so it "
        "can fall outside this range"),
    Col("speedup_vs_baseline", "vs baseline", ".2f",
        "tokens/s over AR's with the target in --baseline_dtype, at the same batch, temperature and cache"),
    Col("acceptance_rate", "accept", ".3f", "accepted / drafted tokens (a tree: per node drafted)"),
    Col("tokens_per_call", "tok/call", ".2f", "new tokens per target forward pass, prefill included"),
    Col("alpha", "alpha", ".3f",
        "a chain's per-token acceptance probability implied by its accepted tokens per verification"),
    Col("latency_ms", "seq ms/tok", ".1f",
        "what one sequence waits per token of its own: its batch's wall time / its new tokens, averaged over "
        "sequences (a batch of 8 shares its wall time, so batched modes read higher here while their tok/s "
        "is higher too)"),
    Col("ttft_s", "TTFT s", ".3f", "time to a batch's first new token (prefill and the first step)"),
    Col("decode_speedup_vs_ar", "decode speedup", ".2f", "the speedup after each batch's first token"),
    Col("target_calls", "target calls", ".0f"),
    Col("wall_time_s", "wall s", ".2f", "the summed wall time of the batches' median runs"),
    Col("predicted_speedup", "predicted", ".2f",
        "Leviathan et al.'s speedup from alpha, the mean draft length and the measured cost ratio c"),
    Col("efficiency", "measured/predicted", ".2f"),
    Col("predicted_verify", "predicted (verify cost)", ".2f", "the same with the measured verify-pass cost"),
    Col("efficiency_verify", "measured/predicted (verify)", ".2f"),
    Col("flagged", "flagged"),
]}


def sweep_cols(*keys: str, processes: int = 1) -> list[Col]:
    """The named sweep columns, tok/s labelled per process (and the total added) in a sharded run."""
    out = []
    for k in keys:
        c = SWEEP_COLS[k]
        if k == "throughput" and processes > 1:
            out += [Col(k, "tok/s 1 proc", c.fmt, c.legend), SWEEP_COLS["throughput_total"]]
        else:
            out.append(c)
    return out


def fit_markdown(md: str, where: str = "table.md", width: int = WIDTH) -> str:
    """A markdown text (what a tool writes to ``where``) for the console: each table through
    ``fit_table`` (its leading columns that fit ``width``, the others named), every other line
    wrapped (``para``)."""
    out, block = [], []

    def flush():
        if not block:
            return
        rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in block]
        header, body = rows[0], [r for r in rows[1:] if not all(set(c) <= set(":-") for c in r)]
        keys = [f"c{i}" for i in range(len(header))]
        df = pd.DataFrame([dict(zip(keys, r)) for r in body], columns=keys)
        out.append(fit_table(df, [Col(k, h) for k, h in zip(keys, header)], width, where=where, hint=""))
        block.clear()
    for line in md.splitlines():
        if line.lstrip().startswith("|"):
            block.append(line)
            continue
        flush()
        out.append(para(line, width) if line.strip() else "")
    flush()
    return "\n".join(out)
