"""A decode step's time on a launch-bound device from its operators: fitted on one eager sweep of
that device, then predicted for any configuration ``benchmark.host_cost`` counted, with the
acceptance of any sweep of the same pair (acceptance does not depend on the device).

    # the operators of the code that ran the device's sweep, and of the configurations to predict
    python -m benchmark.host_cost --configs ar:1,google:1,... --repeats 1 --out COUNTS
    python -m benchmark.launch_model --fit_sweep results/gpu/h200-issue13/speed-b1/raw.csv \\
        --fit_counts COUNTS/summary.csv --counts COUNTS/summary.csv \\
        --acceptance results/heads/t0/raw.csv,results/static/sweep/raw.csv --out results/host/launch

When the models are as small as the embedded pair, an eager decode step on a GPU costs what the
host takes to issue its operators, not their arithmetic (results/gpu: the device busy a tenth of
the time). The model: the decode time per target pass is

    ms = a * (the models' kernels per pass) + b * (the loop's kernels per pass)

two costs per operator because a model's operators go through transformers' modules and the loop's
are bare calls. ``a`` and ``b`` are fitted (least squares, neither below zero) on the decode phase of a sweep run on
the device (``--fit_sweep``: wall less time to first token, per pass after the prefill), against the
counts of the code that ran it (``--fit_counts``, ``--fit_version``: host_cost's ``baseline`` rows
when it ran an older checkout beside this one); the residuals are the check. Then for every
configuration of ``--counts``: tokens per decode pass from ``--acceptance`` (the same mode,
drafter, draft length or tree and batch size, greedy), predicted decode tokens/s
and the speedup over AR at the same batch and cache. ``ceiling_vs_ar`` is what no loop can beat on
such a device: every model pass captured (CUDA graphs) with the loop's own work, and the device's
time per pass proportional to the models' kernels (tiny kernels each cost about the same).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from sampling.app.cli import Parser, run

from .console import fit_markdown
from .cost_model import markdown
from .metrics import upgrade_raw
from .utils_io import write_csv, write_json, write_text

CONFIG = ["mode", "draft", "batch", "kv_cache", "gamma", "tree"]      # what names a configuration here


def decode_passes(raw: pd.DataFrame) -> pd.DataFrame:
    """Per eager, greedy configuration of a sweep: decode ms per target pass (wall less time to first
    token, over the passes after it: AR's first token comes from the prefill, a speculative loop's
    after the prefill and its first verify; a batch's passes are its longest row's) and tokens per
    decode pass (the tokens the passes after the prefill gave, over those passes: every new token of
    a speculative loop, all but each row's first for AR)."""
    raw = upgrade_raw(raw)
    raw = raw[(raw.temperature == 0) & ~raw["compile"].astype(str).isin(["True", "true", "1", "draft"])
              & ~raw["mode"].str.startswith("hf") & (raw["dtype"] == "")]       # (--baseline_dtype's ar: another dtype)
    raw = raw.assign(draft=raw["draft"].where(raw["mode"] != "ar", ""),
                     gamma=raw.gamma.where(~raw["mode"].isin(["ar", "tree"]), 0).astype(int),
                     tree=raw["tree"].where(raw["mode"] == "tree", ""))
    per_batch = raw.groupby(CONFIG + ["batch_id"], dropna=False).agg(
        decode_s=("wall_time_s", "first"), ttft_s=("ttft_s", "first"), passes=("target_calls", "max"),
        tokens=("new_tokens", "sum"), rows=("new_tokens", "size")).reset_index()
    ar = per_batch["mode"] == "ar"
    per_batch = per_batch.assign(decode_s=per_batch.decode_s - per_batch.ttft_s,
                                 passes=per_batch.passes - 1 - (~ar),            # after the first hand-out
                                 token_passes=per_batch.passes - 1,              # after the prefill
                                 tokens=per_batch.tokens - per_batch.rows.where(ar, 0))
    return pool(per_batch)


def pool(rows: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: decode seconds, passes and tokens summed, then ms per pass (over the passes
    after the first hand-out) and tokens per pass (over the passes after the prefill)."""
    g = rows.groupby(CONFIG, dropna=False)[["decode_s", "passes", "tokens", "token_passes"]].sum().reset_index()
    g = g[(g.passes > 0) & (g.token_passes > 0)]
    return g.assign(ms_per_pass=1000 * g.decode_s / g.passes, tokens_per_pass=g.tokens / g.token_passes)


def read_counts(path: str, version: str, flag: str) -> pd.DataFrame:
    """host_cost's summary.csv, the rows of one version."""
    counts = pd.read_csv(path, keep_default_na=False)
    need = {"version", "model_kernels_per_pass", "kernels_per_pass", *CONFIG}
    if not need <= set(counts.columns):
        raise ValueError(f"--{flag} {path} is not a host_cost summary.csv with drafters "
                         f"(missing {', '.join(sorted(need - set(counts.columns)))})")
    counts = counts[counts.version == version]
    if counts.empty:
        raise ValueError(f"--{flag} {path} has no rows of version {version!r}")
    return counts.assign(draft=counts["draft"].astype(str), tree=counts["tree"].astype(str),
                         gamma=counts.gamma.astype(int))


def fit(sweep: pd.DataFrame, counts: pd.DataFrame) -> tuple[float, float, pd.DataFrame]:
    """(us per model kernel, us per loop kernel, the fitted rows with their residuals)."""
    m = sweep.merge(counts[CONFIG + ["model_kernels_per_pass", "kernels_per_pass"]], on=CONFIG)
    if len(m) < 3:
        raise ValueError(f"the sweep and the counts share {len(m)} configurations; the fit needs 3 or more "
                         f"(count the sweep's: the same mode, drafter, batch, cache, draft length and tree; a "
                         f"configuration needs passes after its first hand-out, i.e. generations longer than "
                         f"one speculative step)")
    A = m[["model_kernels_per_pass", "kernels_per_pass"]].to_numpy(float)
    a, b = nonnegative_fit(A, m.ms_per_pass.to_numpy(float))
    m = m.assign(fitted_ms_per_pass=A @ np.array([a, b]))
    return 1000 * a, 1000 * b, m.assign(error=m.fitted_ms_per_pass / m.ms_per_pass - 1)


def nonnegative_fit(A: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y ~ A @ (a, b) with a, b >= 0: a cost per operator is never negative (a sweep
    whose time does not follow its operators gets a zero, and its residuals show it)."""
    x = np.linalg.lstsq(A, y, rcond=None)[0]
    if (x >= 0).all():
        return float(x[0]), float(x[1])
    best = None
    for j in range(2):                                 # one cost at zero, the other fitted alone
        c = max(0.0, float(A[:, j] @ y / (A[:, j] @ A[:, j])))
        res = float(((A[:, j] * c - y) ** 2).sum())
        if best is None or res < best[0]:
            best = (res, (c, 0.0) if j == 0 else (0.0, c))
    return best[1]


def acceptance_for(counts: pd.DataFrame, acc: pd.DataFrame) -> pd.DataFrame:
    """Tokens per decode pass of each counted configuration: from the acceptance sweeps' rows of the
    same mode, drafter, draft length, tree and batch size (a batch's passes last as long as its
    slowest row, so another batch size's figure does not carry over), pooled over their caches and
    files; none there: NaN, and no prediction."""
    keys = ["mode", "draft", "gamma", "tree", "batch"]
    pooled = acc.groupby(keys)[["token_passes", "tokens"]].sum()
    tpp = [pooled.loc[k].tokens / pooled.loc[k].token_passes if k in pooled.index else np.nan
           for k in counts[keys].itertuples(index=False, name=None)]
    return counts.reset_index(drop=True).assign(tokens_per_pass=tpp)


def predict(counts: pd.DataFrame, acc: pd.DataFrame, a_us: float, b_us: float) -> pd.DataFrame:
    """Predicted decode ms per pass, tokens/s and speedup over AR (same batch and cache) for every
    counted configuration, with the ceiling of a fully captured step."""
    p = acceptance_for(counts, acc)
    ms = (a_us * p.model_kernels_per_pass + b_us * p.kernels_per_pass) / 1000
    p = p.assign(predicted_ms_per_pass=ms, predicted_decode_tps=1000 * p.tokens_per_pass / ms)
    ar = p[p["mode"] == "ar"].set_index(["batch", "kv_cache"])
    vs, ceiling = [], []
    for _, r in p.iterrows():
        base = ar.loc[(r.batch, r.kv_cache)] if (r.batch, r.kv_cache) in ar.index else None
        vs.append(r.predicted_decode_tps / base.predicted_decode_tps if base is not None else np.nan)
        ceiling.append(r.tokens_per_pass / r.model_kernels_per_pass * base.model_kernels_per_pass
                       / base.tokens_per_pass if base is not None else np.nan)
    return p.assign(predicted_vs_ar=vs, ceiling_vs_ar=ceiling)


def read_sweeps(text: str, flag: str) -> pd.DataFrame:
    """decode_passes of every raw.csv in a comma list, pooled."""
    frames = []
    for path in (x.strip() for x in text.split(",") if x.strip()):
        if not os.path.isfile(path):
            raise ValueError(f"--{flag} {path}: no such file")
        frames.append(decode_passes(pd.read_csv(path, keep_default_na=False, na_values=[""])))
    if not frames:
        raise ValueError(f"--{flag} is empty")
    return pool(pd.concat(frames, ignore_index=True))        # a configuration in several files: one row


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit_sweep", required=True, help="raw.csv of an eager sweep on the device to model")
    ap.add_argument("--fit_counts", required=True,
                    help="host_cost summary.csv of the code that ran --fit_sweep (its configurations counted)")
    ap.add_argument("--fit_version", default="current", choices=("current", "baseline"),
                    help="which rows of --fit_counts: host_cost's own code, or the --baseline checkout it ran beside")
    ap.add_argument("--counts", required=True, help="host_cost summary.csv of the configurations to predict")
    ap.add_argument("--acceptance", required=True, help="comma list of raw.csv sweeps of the same pair (any device)")
    ap.add_argument("--out", required=True, help="folder for fit.csv, prediction.csv, table.md (must not exist)")
    args = ap.parse_args(argv)
    for flag in ("fit_counts", "counts"):
        if not os.path.isfile(getattr(args, flag)):
            raise ValueError(f"--{flag} {getattr(args, flag)}: no such file")
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; pick another --out")
    sweep = read_sweeps(args.fit_sweep, "fit_sweep")
    a_us, b_us, fitted = fit(sweep, read_counts(args.fit_counts, args.fit_version, "fit_counts"))
    pred = predict(read_counts(args.counts, "current", "counts"), read_sweeps(args.acceptance, "acceptance"),
                   a_us, b_us)
    os.makedirs(args.out)
    write_csv(os.path.join(args.out, "fit.csv"), fitted)
    write_csv(os.path.join(args.out, "prediction.csv"), pred)
    write_json(os.path.join(args.out, "env.json"), dict(args=vars(args), us_per_model_kernel=a_us,
                                                       us_per_loop_kernel=b_us))
    fit_cols = ["mode", "draft", "batch", "kv_cache", "model_kernels_per_pass", "kernels_per_pass", "ms_per_pass",
                "fitted_ms_per_pass", "error"]
    pred_cols = ["mode", "draft", "batch", "kv_cache", "gamma", "tree", "model_kernels_per_pass", "kernels_per_pass",
                 "tokens_per_pass", "predicted_ms_per_pass", "predicted_decode_tps",
                 "predicted_vs_ar", "ceiling_vs_ar"]
    text = (f"# Launch-bound model: {a_us:.2f} us per model kernel, {b_us:.2f} us per loop kernel\n\n"
            f"Fitted on `{args.fit_sweep}` (decode ms per target pass) against `{args.fit_counts}` "
            f"({args.fit_version}):\n\n{markdown(fitted[fit_cols])}\n\nPredicted for `{args.counts}`, "
            f"acceptance from `{args.acceptance}`:\n\n{markdown(pred[pred_cols])}\n")
    write_text(os.path.join(args.out, "table.md"), text)
    print(fit_markdown(text, os.path.join(args.out, "table.md")))


if __name__ == "__main__":
    run(main)
