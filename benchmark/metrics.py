"""Aggregation of raw per-sample rows, and the analytic expectation (Leviathan et al. 2023)."""
from __future__ import annotations

import pandas as pd

from sampling import DEFAULTS
from sampling.modes import MODES_TABLE

KEYS = ["mode", "draft", "batch", "gamma", "gamma_schedule", "temperature", "sort_batch", "finished_rows",
        "max_tokens", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "tree", "kv_cache", "compile",
        "press", "speculate", "dtype"]   # every field of RunConfig
NEWER_COLUMNS = {"finished_rows": DEFAULTS.finished_rows,   # columns older raw.csv files lack, and
                 "rows_verified": float("nan"),             # what those runs did or what is unknown
                 "min_p": DEFAULTS.min_p, "repetition_penalty": DEFAULTS.repetition_penalty,
                 "peak_mem_mib": float("nan"), "output": "", "tree": "", "accepted_hist": "",
                 "kv_cache": "dynamic", "compile": False, "press": "", "process": 0, "round_walls": "",
                 "ttft_tokens": float("nan"), "dtype": ""}
EFFICIENCY_MAX = 1.25   # a speedup this far above its analytic expectation means mismeasured step costs


def upgrade_raw(raw: pd.DataFrame) -> pd.DataFrame:
    """raw with every column of the current format (an older file resumes and summarises as is);
    the text columns read back from CSV as text ("" rather than NaN)."""
    if raw.empty:
        return raw
    raw = raw.assign(**{k: v for k, v in NEWER_COLUMNS.items() if k not in raw.columns})
    if "speculate" not in raw.columns:            # before the controller: every step drafted (modes with drafts)
        raw = raw.assign(speculate=["always" if m in MODES_TABLE and "speculate" in MODES_TABLE[m].options else ""
                                    for m in raw["mode"]])
    # compile reads back from CSV as text when "draft" shares the column: the values RunConfig holds
    raw = raw.assign(compile=["draft" if str(c) == "draft" else str(c) in ("True", "true", "1")
                              for c in raw["compile"]])
    if "draft" not in raw.columns:                # before drafters: the draft model, or none
        raw = raw.assign(draft=["" if m in ("ar", "hf") else "model" for m in raw["mode"]])
    text = {c: raw[c].astype(object).where(raw[c].notna(), "").astype(str)
            for c in ("tree", "output", "draft", "accepted_hist", "press", "round_walls", "speculate", "dtype")}
    return raw.assign(**text)


def first_step_tokens(raw: pd.DataFrame) -> pd.Series:
    """Per raw row, the tokens its first hand-out is expected to give when the file does not say
    (``ttft_tokens`` NaN: written before it was recorded): AR's one; a speculative row's mean tokens
    per verify (its new tokens over its target passes after the prefill); unknown passes: one."""
    steps = raw.target_calls - 1
    est = (raw.new_tokens / steps).where((raw["mode"] != "ar") & (steps > 0), 1.0)
    return est.fillna(1.0)


def decode_tokens(raw: pd.DataFrame, by) -> pd.Series:
    """New tokens of each batch (raw rows grouped by ``by``, a batch's keys) after its first
    hand-out (the decode phase: wall time less TTFT). A speculative loop's first hand-out, after the
    prefill and the first verify, gives each row its accepted drafts and one token; AR's one token.
    ``ttft_tokens`` counts them; NaN (files written before it was recorded): the sum of
    ``first_step_tokens``, an expectation that runs low where the first step accepts more than the
    others (one token per row there put BASS with the heads' decode rate at batch 8 12% high,
    results/heads/b8-first-hand-out)."""
    g = raw.assign(first_estimate=first_step_tokens(raw)).groupby(by, dropna=False)
    known = g.ttft_tokens.first()
    return g.new_tokens.sum() - known.where(known.notna(), g.first_estimate.sum())


def expected_tokens_per_call(alpha: float, gamma: float) -> float:
    """E[tokens per target call] = (1 - a^(g+1)) / (1 - a)."""
    return gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def alpha_from_accepted(accepted_per_step: float, gamma: float) -> float:
    """Leviathan et al.'s alpha (per-token acceptance probability) from the mean number of drafts
    accepted per verification: invert E[accepted] = alpha + alpha^2 + ... + alpha^gamma (bisection;
    a fractional gamma, the mean of an adaptive schedule, is used as is)."""
    if not accepted_per_step == accepted_per_step or gamma <= 0:
        return float("nan")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        expected = gamma if a >= 1 else a * (1 - a ** gamma) / (1 - a)
        lo, hi = (a, hi) if expected < accepted_per_step else (lo, a)
    return (lo + hi) / 2


def leviathan_speedup(alpha: float, gamma: float, c: float) -> float:
    """Predicted walltime speedup over AR: (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
    return expected_tokens_per_call(alpha, gamma) / (gamma * c + 1)


def verify_aware_speedup(alpha: float, gamma: float, c: float, v: float) -> float:
    """The same with the measured cost v of a (gamma + 1)-token verify pass in target steps
    (Leviathan et al. take v = 1; on a CPU it is larger)."""
    return expected_tokens_per_call(alpha, gamma) / (gamma * c + v)


def cost_key(batch: int, gamma: int) -> str:
    return f"{batch}x{gamma}"


def round_throughputs(raw: pd.DataFrame) -> pd.DataFrame:
    """KEYS and ``round_tps``: each configuration's new tokens over the summed wall time of its
    batches in each timed round, a list in round order (empty where the rows lack ``round_walls``,
    files from before it was recorded)."""
    per_batch = raw.groupby(KEYS + ["process", "batch_id"], dropna=False).agg(
        tokens=("new_tokens", "sum"), walls=("round_walls", "first")).reset_index()

    def rates(g: pd.DataFrame) -> list[float]:
        walls = [[float(w) for w in text.split()] for text in g.walls]
        if not walls or not walls[0] or any(len(w) != len(walls[0]) for w in walls):
            return []
        return [g.tokens.sum() / sum(w[r] for w in walls) for r in range(len(walls[0]))]
    return pd.DataFrame([dict(zip(KEYS, k), round_tps=rates(g)) for k, g in per_batch.groupby(KEYS, dropna=False)])


def round_spread(rates: list[float], base: list[float]) -> tuple[float, float]:
    """The lowest and highest of rates / base, round by round (nan where either is missing)."""
    paired = [a / b for a, b in zip(rates, base)]
    return (min(paired), max(paired)) if paired else (float("nan"), float("nan"))


def spread_label(lo: float, hi: float) -> str:
    """"lo-hi" for a table ("" where unknown)."""
    return f"{lo:.2f}-{hi:.2f}" if lo == lo and hi == hi else ""


def summarise(raw: pd.DataFrame, cost: dict | None = None) -> pd.DataFrame:
    """One row per configuration from the per-sample rows.

    throughput: new tokens / the summed wall time of the config's batches (in a sharded run, the
    rate of one process; throughput_total adds the processes', ``process_throughput``); latency: the
    mean over sequences of (its batch's wall time / its new tokens); decode_throughput: new tokens
    after each batch's first hand-out / the wall time after it (TTFT, which holds the prefill and a
    speculative loop's first step, excluded; ``decode_tokens``); speedup: throughput over ``ar`` at
    the same batch size, temperature and sorting; alpha: the per-token acceptance probability
    estimated from the accepted drafts per verification (``alpha_from_accepted``; acceptance_rate, accepted / drafted,
    is lower, since drafts after a rejection are counted but never tested); predicted: Leviathan
    et al. from alpha, the mean draft length and the cost ratio c measured at that batch size and
    gamma (``cost``, keyed by ``cost_key``); predicted_verify: the same with the measured verify cost.
    """
    raw = upgrade_raw(raw)
    raw = raw.assign(latency_ms=1000 * raw.wall_time_s / raw.new_tokens.clip(lower=1))
    nan_sum = lambda s: s.sum(min_count=1)  # noqa: E731  (NaN, not 0, where nothing is known)
    g = raw.groupby(KEYS, dropna=False)
    out = g.agg(samples=("sample", "count"), new_tokens=("new_tokens", "sum"),
                prompt_tokens=("prompt_tokens", "mean"), accepted=("accepted", "sum"),
                drafted=("drafted", "sum"), target_calls=("target_calls", nan_sum),
                latency_ms=("latency_ms", "mean"), mean_gamma=("mean_gamma", "mean")).reset_index()
    # one row per timed batch; the decode phase is what follows its first token (TTFT holds the
    # prefill, which padding inflates)
    per_batch = raw.groupby(KEYS + ["batch_id"], dropna=False).agg(
        wall=("wall_time_s", "first"), ttft=("ttft_s", "first"), padding=("padding_fraction", "first"),
        prompt_padding=("prompt_padding", "first"), rows_verified=("rows_verified", "first"))
    per_batch = per_batch.assign(dec_tokens=decode_tokens(raw, KEYS + ["batch_id"]),
                                 dec_time=per_batch.wall - per_batch.ttft).reset_index()
    walls = per_batch.groupby(KEYS, dropna=False).agg(
        wall_time_s=("wall", "sum"), ttft_s=("ttft", "mean"), padding_fraction=("padding", "mean"),
        prompt_padding=("prompt_padding", "mean"), rows_verified=("rows_verified", nan_sum),
        dec_tokens=("dec_tokens", "sum"),
        dec_time=("dec_time", nan_sum)).reset_index()
    out = out.merge(walls, on=KEYS)
    out["throughput"] = out.new_tokens / out.wall_time_s
    procs = process_throughput(raw).groupby(KEYS, dropna=False).agg(
        processes=("process", "count"), throughput_total=("throughput", "sum")).reset_index()
    out = out.merge(procs, on=KEYS)
    out["decode_throughput"] = out.dec_tokens / out.dec_time
    out = out.drop(columns=["dec_tokens", "dec_time"])
    out["acceptance_rate"] = (out.accepted / out.drafted).where(out.drafted > 0)
    out["tokens_per_call"] = (out.new_tokens / out.target_calls).where(out.target_calls > 0)
    steps = out.target_calls - out.samples                 # verifications: calls less the prefills
    out["alpha"] = [alpha_from_accepted(a / s_, g_) if d > 0 and s_ > 0 and m != "tree" else float("nan")
                    for a, s_, g_, d, m in zip(out.accepted, steps, out.mean_gamma, out.drafted, out["mode"])]
    # (a chain's alpha; a tree's acceptance follows no geometric law in gamma)
    out = out.merge(round_throughputs(raw), on=KEYS, how="left")
    # ar with the same batching and cache, compiled where the target's passes were (not for a draft compiled alone)
    out["target_compiled"] = [str(c) in ("True", "true", "1") for c in out["compile"]]
    same = ["batch", "temperature", "sort_batch", "kv_cache", "target_compiled"]
    plain = (out["mode"] == "ar") & (out["press"] == "")                   # (no press: the model itself)
    ar = out[plain & (out["dtype"] == "")].set_index(same)                # in the run's own dtype
    for col, name in (("throughput", "speedup_vs_ar"), ("decode_throughput", "decode_speedup_vs_ar")):
        out[name] = [t / ar[col].get(k, float("nan")) for t, k in zip(out[col], zip(*(out[c] for c in same)))]
    baseline = out[plain & (out["dtype"] != "")].set_index(same)          # run_experiment --baseline_dtype
    if not baseline.empty:
        out["speedup_vs_baseline"] = [t / baseline["throughput"].get(k, float("nan"))
                                      for t, k in zip(out.throughput, zip(*(out[c] for c in same)))]
    # the same speedup round by round (a round's runs of one batch are close in time): its spread is
    # how far the machine's noise moves the figure
    spreads = [round_spread(r if isinstance(r, list) else [], ar["round_tps"].get(k, []))
               for r, k in zip(out.round_tps, zip(*(out[c] for c in same)))]
    out["speedup_min_round"], out["speedup_max_round"] = [s[0] for s in spreads], [s[1] for s in spreads]
    out = out.drop(columns=["round_tps", "target_compiled"])
    if cost:
        nan = float("nan")
        costs = [cost.get(cost_key(b, g_), {}) if d == "model" else {}      # c is the draft model's
                 for b, g_, d in zip(out.batch, out.gamma, out["draft"])]
        out["cost_ratio_c"] = [c.get("c", nan) for c in costs]
        out["verify_cost_v"] = [c.get("verify_over_step", nan) for c in costs]
        out["predicted_speedup"] = [leviathan_speedup(a, g_, c) if a == a and c == c else nan
                                    for a, g_, c in zip(out.alpha, out.mean_gamma, out.cost_ratio_c)]
        out["predicted_verify"] = [verify_aware_speedup(a, g_, c, v) if a == a and c == c else nan for a, g_, c, v
                                   in zip(out.alpha, out.mean_gamma, out.cost_ratio_c, out.verify_cost_v)]
        out["efficiency"] = out.speedup_vs_ar / out.predicted_speedup
        out["efficiency_verify"] = out.speedup_vs_ar / out.predicted_verify
        out = flag_out_of_range(out)
    return out


def process_throughput(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration and process of a sharded run (``benchmark.shard``): the new tokens
    and summed batch wall time of the process's share, and their ratio. The processes ran at the
    same time, so a configuration's total throughput is the sum of its processes' (``summarise``:
    throughput_total; throughput is the rate of one process)."""
    raw = upgrade_raw(raw)
    per_batch = raw.groupby(KEYS + ["process", "batch_id"], dropna=False).agg(
        tokens=("new_tokens", "sum"), wall=("wall_time_s", "first")).reset_index()
    out = per_batch.groupby(KEYS + ["process"], dropna=False).agg(
        batches=("batch_id", "count"), new_tokens=("tokens", "sum"), wall_time_s=("wall", "sum")).reset_index()
    return out.assign(throughput=out.new_tokens / out.wall_time_s)


def flag_out_of_range(out: pd.DataFrame) -> pd.DataFrame:
    """Blank the predicted and efficiency figures that fall outside their possible range, and say
    why in ``flagged``: a verify cost v < 1 (a (gamma + 1)-token pass timed faster than a one-token
    step) or an efficiency above EFFICIENCY_MAX (the measured step costs were off)."""
    out = out.copy()
    nan, flags = float("nan"), []
    for i, r in out.iterrows():
        why = []
        if r.verify_cost_v == r.verify_cost_v and r.verify_cost_v < 1:
            why.append(f"verify cost v {r.verify_cost_v:.2f} < 1")
            out.loc[i, ["predicted_verify", "efficiency_verify"]] = nan
        for col in ("efficiency", "efficiency_verify"):
            e = out.loc[i, col]
            if e == e and not 0 < e <= EFFICIENCY_MAX:
                why.append(f"{col} {e:.2f} outside (0, {EFFICIENCY_MAX}]")
                out.loc[i, col] = nan
        flags.append("; ".join(why))
    out["flagged"] = flags
    return out
