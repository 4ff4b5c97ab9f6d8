"""Batch evaluation on Dolly-15k: every mode on the same prompts, a table per mode.

    python eval_dolly.py --dataset_path ../shared/dolly/dolly-sample.jsonl --samples 16 \\
        --modes ar,google,bass --temperature 0 --batch 8 --show 2
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import replace

import pandas as pd
from tqdm import tqdm

from benchmark.console import fit_table, para, sweep_cols
from benchmark.metrics import process_throughput, round_spread, round_throughputs, spread_label, summarise, upgrade_raw
from benchmark.runner import (
    ALL_MODES,
    HF_MODES,
    SEQUENTIAL_MODES,
    RunConfig,
    add_bench_args,
    check_out,
    compile_of,
    drafts_of,
    parse_modes,
    prepare,
    reads,
    run_grid,
)
from benchmark.utils_io import write_csv
from sampling import MODES, check_args
from sampling.app.cli import (
    Parser,
    add_model_args,
    add_sampling_args,
    check_at_least_one,
    check_mode_draft,
    check_speculator_flag,
    params_of,
    parse_caches,
    parse_drafts,
    presses_of,
    run,
    schedule_of,
)
from sampling.generate import default_gamma
from sampling.tree_shapes import parse_tree

SPEEDUP_HERE = ("each mode's tok/s over ar's in this run, ar at --batch (google, deepmind, hf and hf_assisted "
                "run one at a time; tok/s from each batch's median timed run)")


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, placement=True)
    add_bench_args(ap)
    ap.add_argument("--batch", type=int, default=8,
                    help="batch size of ar and bass (google, deepmind, hf, hf_assisted run one at a time)")
    ap.add_argument("--modes", default="ar,google,deepmind,bass",
                    help=f"comma list of {', '.join(ALL_MODES)} (case-insensitive); the table keeps this order")
    add_sampling_args(ap, gamma_flag="--gamma_init", schedule_constants=False)
    ap.add_argument("--show", type=int, default=0, help="print the first N prompts and each mode's output")
    ap.add_argument("--out", default=None, help="folder for raw.csv and summary.csv (default: write nothing)")
    args = ap.parse_args(argv)
    args.modes = parse_modes(args.modes)
    args.drafts = parse_drafts(args.draft)
    check_speculator_flag(args.speculator, args.drafts)
    for mode in args.modes:
        if mode in MODES:
            check_mode_draft(mode, args.drafts[0])
    check_at_least_one(args, "samples", "batch", "repeats")
    if args.show < 0:
        raise ValueError(f"--show must be >= 0, got {args.show}")
    if args.gamma is None:
        args.gamma = default_gamma(args.gamma_schedule)
    check_args("bass", args.max_tokens, args.gamma, params_of(args), schedule_of(args), args.finished_rows)
    args.tree = str(parse_tree(args.tree)) if args.tree is not None else ""    # "": the drafter's default
    parse_caches(args.kv_cache, args.compile)
    args.press_label = presses_of(args)[0].label()
    check_out(args.out, False, args.overwrite)
    if args.seed is None:
        args.seed = random.randrange(2 ** 31)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    data = prepare(args, args.modes, args.drafts)
    args.seed = data.shard.agree(args.seed)           # one seed for every process of a launch
    rows = []
    cfgs = [RunConfig(mode=mode, batch=1 if mode in SEQUENTIAL_MODES else args.batch,
                      gamma=args.gamma if reads(mode, "gamma") else 0,
                      gamma_schedule=args.gamma_schedule, temperature=args.temperature,
                      sort_batch=args.sort_batch and mode not in SEQUENTIAL_MODES,
                      max_tokens=args.max_tokens, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                      repetition_penalty=args.repetition_penalty, seed=args.seed,
                      finished_rows=args.finished_rows, tree=args.tree if reads(mode, "tree") else "",
                      draft=drafts_of(mode, args.drafts)[0],
                      kv_cache=args.kv_cache, compile=compile_of(args.compile, mode, args.kv_cache),
                      speculate=args.speculate if reads(mode, "speculate") else "",
                      press=args.press_label if mode not in HF_MODES else "")
            for mode in args.modes]
    shard = data.shard
    t0 = time.perf_counter()
    with tqdm(total=len(data.prompts) * len(args.modes) * args.repeats, desc="eval_dolly", dynamic_ncols=True,
              disable=not shard.main) as bar:
        for group in run_grid(cfgs, data, args.repeats, progress=bar, together=True):
            rows += group
    wall = time.perf_counter() - t0
    if not shard.main:                            # the main process reports and writes
        shard.close()
        return
    raw = pd.DataFrame(rows)
    summary = summarise(raw)
    summary = summary.set_index("mode").loc[args.modes].reset_index()    # the order of --modes
    if "ar" in args.modes:                        # speedup over this run's ar, whatever its batch
        ar = float(summary.loc[summary["mode"] == "ar", "throughput"].iloc[0])
        summary["speedup_vs_ar"] = summary.throughput / ar
    else:
        summary["speedup_vs_ar"] = float("nan")
    # the same round by round (each round runs every mode over every batch, batch sizes interleaved)
    rounds = round_throughputs(upgrade_raw(raw)).set_index("mode").round_tps
    spreads = [round_spread(rounds[m], rounds.get("ar", [])) for m in summary["mode"]]
    summary["speedup_min_round"], summary["speedup_max_round"] = [s[0] for s in spreads], [s[1] for s in spreads]
    summary["rounds"] = [spread_label(*s) for s in spreads]
    print("\n" + para(f"{len(data.prompts)} samples, {args.max_tokens} new tokens max, temperature "
                      f"{args.temperature}, gamma {args.gamma} ({args.gamma_schedule}), seed {args.seed}; each batch "
                      f"timed {args.repeats} time(s) after a warm-up run, the median kept, modes and batch sizes "
                      f"interleaved round by round"))
    cols = sweep_cols("mode", "batch", "throughput", "speedup_vs_ar", "rounds", "tokens_per_call", "acceptance_rate",
                      "latency_ms", "ttft_s", "new_tokens", "target_calls", "wall_time_s", "samples",
                      processes=int(summary.processes.max()))
    cols = [replace(c, legend=SPEEDUP_HERE) if c.key == "speedup_vs_ar" else c for c in cols]
    print(fit_table(summary, cols, wide=args.wide, where=f"{args.out}/summary.csv" if args.out else "summary.csv "
                    "(--out)"))
    if args.temperature == 0 and "ar" in args.modes:
        ref = raw[raw["mode"] == "ar"].set_index("sample")["tokens"]
        for mode in args.modes:
            if mode != "ar":
                out = raw[raw["mode"] == mode].set_index("sample")["tokens"]
                same = int((out == ref.loc[out.index]).sum())
                print(f"consistency: {mode} equals ar on {same}/{len(out)} outputs")
    procs = process_throughput(raw)
    print(f"{shard.size} process(es), {wall:.1f} s wall for every mode's warm-up and timed runs")
    if shard.size > 1:
        print(para("tokens/s per process and in total (the processes ran side by side; \"tok/s 1 proc\" above "
                   "is their mean, every token over the summed wall time of every process's batches):"))
        table = procs.pivot_table(index="mode", columns="process", values="throughput").sort_index(axis=1)
        table["total"] = table.sum(axis=1)
        print(table.loc[args.modes].to_string(float_format=lambda x: f"{x:.1f}"))
    show(raw, data, args.modes, args.show)
    if args.out:
        write_csv(os.path.join(args.out, "raw.csv"), raw)
        write_csv(os.path.join(args.out, "summary.csv"), summary)
        write_csv(os.path.join(args.out, "processes.csv"), procs)
        print(f"wrote {args.out}/raw.csv, summary.csv and processes.csv")
    shard.close()


def show(raw: pd.DataFrame, data, modes: list[str], n: int) -> None:
    """The first n prompts and what each mode wrote after them."""
    for ids, meta in zip(data.prompts[:n], data.meta[:n]):
        print(f"\n=== sample {meta['sample']} ({meta['category']}) ===\n{data.tokenizer.decode(ids)}")
        for mode in modes:
            text = raw[(raw["mode"] == mode) & (raw["sample"] == meta["sample"])]["output"].iloc[0]
            print(f"--- {mode}: {text}")


if __name__ == "__main__":
    run(main)
