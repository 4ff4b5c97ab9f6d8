"""Aggregation of raw per-sample rows, and the analytic expectation (Leviathan et al. 2023)."""
from __future__ import annotations

import pandas as pd

KEYS = ["mode", "batch", "gamma", "gamma_schedule", "temperature", "sort_batch"]


def expected_tokens_per_call(alpha: float, gamma: float) -> float:
    """E[tokens per target call] = (1 - a^(g+1)) / (1 - a)."""
    return gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def leviathan_speedup(alpha: float, gamma: float, c: float) -> float:
    """Predicted walltime speedup over AR: (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
    return expected_tokens_per_call(alpha, gamma) / (gamma * c + 1)


def summarise(raw: pd.DataFrame, cost: dict | None = None) -> pd.DataFrame:
    """One row per configuration from the per-sample rows.

    throughput: new tokens / the summed wall time of the config's batches; latency: the mean over
    sequences of (its batch's wall time / its new tokens); speedup: throughput over ``ar`` at the
    same batch size and temperature; predicted: Leviathan et al. from the measured acceptance,
    the mean draft length and the cost ratio c measured at that batch size (``cost``).
    """
    raw = raw.assign(latency_ms=1000 * raw.wall_time_s / raw.new_tokens.clip(lower=1))
    batches = raw.drop_duplicates(KEYS + ["batch_id"])
    g = raw.groupby(KEYS, dropna=False)
    out = g.agg(samples=("sample", "count"), new_tokens=("new_tokens", "sum"),
                prompt_tokens=("prompt_tokens", "mean"), accepted=("accepted", "sum"),
                drafted=("drafted", "sum"), target_calls=("target_calls", lambda s: s.sum(min_count=1)),
                latency_ms=("latency_ms", "mean"), mean_gamma=("mean_gamma", "mean")).reset_index()
    walls = batches.groupby(KEYS, dropna=False).agg(wall_time_s=("wall_time_s", "sum"),
                                                      ttft_s=("ttft_s", "mean"),
                                                      padding_fraction=("padding_fraction", "mean"),
                                                      prompt_padding=("prompt_padding", "mean")).reset_index()
    out = out.merge(walls, on=KEYS)
    out["throughput"] = out.new_tokens / out.wall_time_s
    out["acceptance_rate"] = (out.accepted / out.drafted).where(out.drafted > 0)
    out["tokens_per_call"] = (out.new_tokens / out.target_calls).where(out.target_calls > 0)
    ar = out[out["mode"] == "ar"].set_index(["batch", "temperature"])["throughput"]
    out["speedup_vs_ar"] = [t / ar.get((b, temp), float("nan")) for t, b, temp in
                            zip(out.throughput, out.batch, out.temperature)]
    if cost:
        out["cost_ratio_c"] = [cost.get(int(b), {}).get("c", float("nan")) if m not in ("ar", "hf") else float("nan")
                               for m, b in zip(out["mode"], out.batch)]
        out["predicted_speedup"] = [leviathan_speedup(a, g_, c) if a == a and c == c else float("nan")
                                    for a, g_, c in zip(out.acceptance_rate, out.mean_gamma, out.cost_ratio_c)]
        out["efficiency"] = out.speedup_vs_ar / out.predicted_speedup
    return out
