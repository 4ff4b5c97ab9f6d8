"""Sweep configurations on Dolly prompts; write raw.csv, summary.csv, config.json, env.json, plots.

    python -m benchmark.run_experiment --dataset_path ../shared/dolly/dolly-sample.jsonl \\
        --samples 140 --batch_sizes 1,2,4,8,16 --modes ar,google,deepmind,bass,hf,hf_assisted \\
        --temperatures 0,1 --max_tokens 32 --out results/dolly
"""
from __future__ import annotations

import itertools
import json
import os
import time

import pandas as pd
from tqdm import tqdm

from sampling import DEFAULTS, SCHEDULES, SamplingParams, check_args
from sampling.cli import Parser, add_model_args, run
from sampling.generate import FINISHED_ROWS
from sampling.utils_bass import ScheduleParams

from .analyzer import markdown_table, plot_all
from .metrics import KEYS, cost_key, summarise, upgrade_raw
from .runner import SEQUENTIAL_MODES, RunConfig, parse_modes, prepare, run_grid
from .runner_support import measure_cost
from .utils_io import env_info, write_csv, write_json, write_text


def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} takes a comma list of whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{name} values must be >= 1, got {text!r}")
    return values


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--dataset_path", default=None,
                    help="local Dolly jsonl (default: the hub dataset databricks/databricks-dolly-15k)")
    ap.add_argument("--skip_bad_lines", action="store_true", help="skip malformed lines with a warning")
    ap.add_argument("--samples", type=int, default=32, help="records from the top of the dataset")
    ap.add_argument("--batch_sizes", default="1,4", help="comma list of batch sizes for ar and bass")
    ap.add_argument("--modes", default="ar,google,bass",
                    help="comma list of ar, google, deepmind, bass, hf, hf_assisted")
    ap.add_argument("--gammas", default="4", help="comma list of draft lengths (start of adaptive schedules)")
    ap.add_argument("--gamma_schedule", default="constant",
                    help=f"comma list of schedules: {', '.join(SCHEDULES)}")
    ap.add_argument("--temperatures", default="0", help="comma list of temperatures (0 is greedy)")
    ap.add_argument("--top_k", type=int, default=0, help="top-k filter (0: off)")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus filter (1: off)")
    ap.add_argument("--max_tokens", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--sort_batch", default="off", choices=("off", "on", "both"),
                    help="sorted batching for the batched modes")
    ap.add_argument("--finished_rows", default=DEFAULTS.finished_rows,
                    help=f"comma list, bass only: what becomes of finished rows ({', '.join(FINISHED_ROWS)})")
    ap.add_argument("--repeats", type=int, default=3, help="time each batch this many times, keep the median")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first batch (batch i: seed + i)")
    ap.add_argument("--out", default=None, help="output folder (default results/<timestamp>/)")
    ap.add_argument("--resume", action="store_true", help="skip configurations already in <out>/raw.csv")
    args = ap.parse_args(argv)
    args.modes = parse_modes(args.modes)
    args.batch_sizes = int_list(args.batch_sizes, "batch_sizes")
    args.gammas = int_list(args.gammas, "gammas")
    args.schedules = [s.strip() for s in args.gamma_schedule.split(",") if s.strip()]
    args.finished = [f.strip() for f in args.finished_rows.split(",") if f.strip()]
    try:
        args.temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--temperatures takes a comma list of numbers, got {args.temperatures!r}") from None
    for name in ("samples", "repeats", "max_tokens"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for t, g, s, f in itertools.product(args.temperatures, args.gammas, args.schedules, args.finished or [""]):
        check_args("bass", args.max_tokens, g, SamplingParams(t, args.top_k, args.top_p), ScheduleParams(kind=s), f)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out: the folder of the sweep to continue")
    args.out = args.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
    return args


def configs(args) -> list[RunConfig]:
    """The grid; one-at-a-time modes run at batch 1 only, ar and hf need no gamma."""
    sorts = {"off": [False], "on": [True], "both": [False, True]}[args.sort_batch]
    out = []
    for temp, mode in itertools.product(args.temperatures, args.modes):
        batches = [1] if mode in SEQUENTIAL_MODES else args.batch_sizes
        gammas = [0] if mode in ("ar", "hf") else args.gammas
        schedules = ["constant"] if mode in ("ar", "hf", "hf_assisted") else args.schedules
        finished = args.finished if mode == "bass" else [DEFAULTS.finished_rows]
        for b, g, s, srt, f in itertools.product(batches, gammas, schedules, sorts, finished):
            out.append(RunConfig(mode=mode, batch=b, gamma=g, gamma_schedule=s, temperature=temp,
                                 sort_batch=srt and b > 1 and mode not in SEQUENTIAL_MODES,
                                 max_tokens=args.max_tokens, top_k=args.top_k, top_p=args.top_p,
                                 seed=args.seed, finished_rows=f))
    return list(dict.fromkeys(out))


def main(argv=None) -> None:
    args = parse(argv)
    prompts, meta, target, draft, tok = prepare(args)
    grid = configs(args)
    raw_path = os.path.join(args.out, "raw.csv")
    raw = upgrade_raw(pd.read_csv(raw_path)) if args.resume and os.path.exists(raw_path) else pd.DataFrame()
    done = set() if raw.empty else {tuple(k) for k in raw[KEYS].drop_duplicates().itertuples(index=False)}
    todo = [c for c in grid if c.key() not in done]
    print(f"{len(grid)} configurations, {len(grid) - len(todo)} already in {raw_path}, {len(prompts)} prompts")
    write_json(os.path.join(args.out, "config.json"), dict(vars(args), configurations=len(grid)))
    env_path = os.path.join(args.out, "env.json")
    old = json.load(open(env_path)) if args.resume and os.path.exists(env_path) else {}
    env = dict(env_info(), cost=old.get("cost", {}))    # a resumed sweep keeps its measured costs
    if draft is not None:                              # c and the verify cost at every batch and gamma
        for b, g in sorted({(c.batch, c.gamma) for c in grid if c.mode not in ("ar", "hf")}):
            if cost_key(b, g) not in env["cost"]:
                env["cost"][cost_key(b, g)] = measure_cost(target, draft, b, g)
    write_json(env_path, env)
    with tqdm(total=len(todo) * len(prompts), desc="sweep", dynamic_ncols=True) as bar:
        for group in run_grid(todo, prompts, meta, target, draft, tok, args.repeats, bar):
            rows = pd.DataFrame(group)
            raw = rows if raw.empty else pd.concat([raw, rows], ignore_index=True)
            write_csv(raw_path, raw)                   # an interrupted sweep keeps the groups that finished
    cost = env.get("cost", {})
    summary = summarise(raw, cost)
    write_csv(os.path.join(args.out, "summary.csv"), summary)
    plots = plot_all(summary, raw, args.out)
    write_text(os.path.join(args.out, "table.md"), markdown_table(summary))
    cols = KEYS + ["throughput", "latency_ms", "acceptance_rate", "alpha", "tokens_per_call", "speedup_vs_ar",
                   "decode_throughput", "decode_speedup_vs_ar"] + \
        (["predicted_speedup", "efficiency", "predicted_verify", "efficiency_verify"] if cost else [])
    print(summary[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(f"wrote {raw_path}, summary.csv, table.md, config.json, env.json and {len(plots)} plots in {args.out}")
    print(json.dumps({b: {k: round(v, 3) for k, v in c.items()} for b, c in cost.items()}))


if __name__ == "__main__":
    run(main)
