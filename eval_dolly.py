"""Batch evaluation on Dolly-15k: every mode on the same prompts, a table per mode.

    python eval_dolly.py --dataset_path ../shared/dolly/dolly-sample.jsonl --samples 16 \\
        --modes ar,google,bass --temperature 0 --batch 8
"""
from __future__ import annotations

import os
import random

import pandas as pd
from tqdm import tqdm

from benchmark.metrics import summarise
from benchmark.runner import SEQUENTIAL_MODES, RunConfig, parse_modes, prepare, run_grid
from benchmark.utils_io import write_csv
from sampling import SamplingParams, check_args
from sampling.cli import Parser, add_model_args, add_sampling_args, run, schedule_of
from sampling.generate import DEFAULTS

COLUMNS = {"mode": "mode", "samples": "samples", "new_tokens": "new tokens", "wall_time_s": "wall s",
           "throughput": "tokens/s", "latency_ms": "ms/token", "ttft_s": "TTFT s",
           "acceptance_rate": "accept", "tokens_per_call": "tok/call", "target_calls": "target calls",
           "speedup_vs_ar": "speedup"}


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--dataset_path", default=None,
                    help="local Dolly jsonl (default: the hub dataset databricks/databricks-dolly-15k)")
    ap.add_argument("--skip_bad_lines", action="store_true",
                    help="warn about malformed lines and skip them instead of stopping")
    ap.add_argument("--samples", type=int, default=32, help="how many records, from the top of the file")
    ap.add_argument("--batch", type=int, default=8,
                    help="batch size of ar and bass (google, deepmind, hf, hf_assisted run one at a time)")
    ap.add_argument("--modes", default="ar,google,deepmind,bass",
                    help="comma list of ar, google, deepmind, bass, hf, hf_assisted (case-insensitive)")
    add_sampling_args(ap, gamma_flag="--gamma_init", schedule_constants=False)
    ap.add_argument("--repeats", type=int, default=1, help="time each batch this many times, keep the median")
    ap.add_argument("--out", default=None, help="folder for raw.csv and summary.csv (default: write nothing)")
    args = ap.parse_args(argv)
    args.modes = parse_modes(args.modes)
    for name in ("samples", "batch", "repeats"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.gamma is None:
        args.gamma = DEFAULTS.gamma_init
    check_args("bass", args.max_tokens, args.gamma, SamplingParams(args.temperature, args.top_k, args.top_p),
               schedule_of(args), args.finished_rows)
    if args.seed is None:
        args.seed = random.randrange(2 ** 31)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    prompts, meta, target, draft, tok = prepare(args)
    rows = []
    with tqdm(total=len(prompts) * len(args.modes), desc="eval_dolly", dynamic_ncols=True) as bar:
        cfgs = [RunConfig(mode=mode, batch=1 if mode in SEQUENTIAL_MODES else args.batch,
                          gamma=0 if mode in ("ar", "hf") else args.gamma,
                          gamma_schedule=args.gamma_schedule, temperature=args.temperature,
                          sort_batch=args.sort_batch and mode not in SEQUENTIAL_MODES,
                          max_tokens=args.max_tokens, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, finished_rows=args.finished_rows) for mode in args.modes]
        for group in run_grid(cfgs, prompts, meta, target, draft, tok, args.repeats, progress=bar):
            rows += group
    raw = pd.DataFrame(rows)
    summary = summarise(raw)
    if "ar" in args.modes:                        # speedup over this run's ar, whatever its batch
        summary["speedup_vs_ar"] = summary.throughput / float(summary.loc[summary["mode"] == "ar", "throughput"].iloc[0])
    table = summary[list(COLUMNS)].rename(columns=COLUMNS)
    print(f"\n{len(prompts)} samples, {args.max_tokens} new tokens max, temperature {args.temperature}, "
          f"gamma {args.gamma} ({args.gamma_schedule}), seed {args.seed}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    if args.temperature == 0 and "ar" in args.modes:
        ref = raw[raw["mode"] == "ar"].set_index("sample")["tokens"]
        for mode in args.modes:
            if mode != "ar":
                out = raw[raw["mode"] == mode].set_index("sample")["tokens"]
                same = int((out == ref.loc[out.index]).sum())
                print(f"consistency: {mode} equals ar on {same}/{len(out)} outputs")
    if args.out:
        write_csv(os.path.join(args.out, "raw.csv"), raw)
        write_csv(os.path.join(args.out, "summary.csv"), summary)
        print(f"wrote {args.out}/raw.csv and summary.csv")


if __name__ == "__main__":
    run(main)
