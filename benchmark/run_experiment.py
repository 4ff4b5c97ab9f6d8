"""Sweep configurations on Dolly prompts; write raw.csv, summary.csv, config.json, env.json, plots.

    python -m benchmark.run_experiment --dataset_path ../shared/dolly/dolly-sample.jsonl \\
        --samples 140 --batch_sizes 1,2,4,8,16 --modes ar,google,deepmind,bass,hf,hf_assisted \\
        --temperatures 0,1 --max_tokens 32 --out results/dolly
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from dataclasses import replace

import pandas as pd
from tqdm import tqdm

from sampling import DEFAULTS, SCHEDULES, PressSpec, SamplingParams, check_args
from sampling.app.cli import (
    Parser,
    add_cache_args,
    add_model_args,
    add_press_args,
    add_speculate_arg,
    check_at_least_one,
    check_speculator_flag,
    parse_caches,
    parse_drafts,
    presses_of,
    run,
)
from sampling.app.models import DTYPES, resolve_device, resolve_dtype
from sampling.control import check_speculate
from sampling.generate import default_tree
from sampling.modes import FINISHED_ROWS, MODES_TABLE
from sampling.tree_shapes import parse_tree
from sampling.utils_bass import ScheduleParams

from .analyzer import config_label, markdown_table, plot_all
from .console import fit_table, para, sweep_cols
from .metrics import process_throughput, spread_label, summarise, upgrade_raw
from .runner import (
    ALL_MODES,
    HF_MODES,
    SEQUENTIAL_MODES,
    RunConfig,
    add_bench_args,
    check_out,
    compile_of,
    drafts_of,
    normalise,
    parse_modes,
    prepare,
    reads,
    run_grid,
    units_of,
)
from .utils_io import env_info, peak_memory, write_csv, write_json, write_text


def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} takes a comma list of whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{name} values must be >= 1, got {text!r}")
    return values


IDENTITY = ("fingerprint", "dataset_path", "samples", "skip_bad_lines", "target_model_name", "approx_model_name",
            "device", "dtype", "speculator", "max_tokens", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
            "repeats", "together", "baseline_dtype")


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, many_drafts=True, placement=True)
    add_bench_args(ap)
    ap.add_argument("--batch_sizes", default="1,4", help="comma list of batch sizes for ar and bass")
    ap.add_argument("--modes", default="ar,google,bass",
                    help=f"comma list of {', '.join(ALL_MODES)}")
    ap.add_argument("--gammas", default=str(DEFAULTS.gamma),
                    help="comma list of draft lengths (start of adaptive schedules)")
    ap.add_argument("--gamma_schedule", default=DEFAULTS.gamma_schedule,
                    help=f"comma list of schedules: {', '.join(SCHEDULES)}")
    ap.add_argument("--temperatures", default="0", help="comma list of temperatures (0 is greedy)")
    ap.add_argument("--top_k", type=int, default=DEFAULTS.top_k, help="top-k filter (0: off)")
    ap.add_argument("--top_p", type=float, default=DEFAULTS.top_p, help="nucleus filter in (0, 1] (1: off)")
    ap.add_argument("--min_p", type=float, default=DEFAULTS.min_p, help="min-p filter in [0, 1) (0: off)")
    ap.add_argument("--repetition_penalty", type=float, default=DEFAULTS.repetition_penalty,
                    help="repetition penalty > 0 (1: off)")
    ap.add_argument("--max_tokens", type=int, default=DEFAULTS.max_new_tokens, help="new tokens per prompt")
    ap.add_argument("--together", action="store_true",
                    help="interleave the batch sizes too, round by round, so that ratios across batch sizes (bass "
                         "at 8 against ar at 1) are measured side by side; raw.csv is then written once every round "
                         "has run (default: one batch size after another, each written when it is done)")
    ap.add_argument("--sort_batch", default="off", choices=("off", "on", "both"),
                    help="sorted batching for the batched modes")
    ap.add_argument("--finished_rows", default=DEFAULTS.finished_rows,
                    help=f"comma list, bass and tree: what becomes of finished rows ({', '.join(FINISHED_ROWS)})")
    ap.add_argument("--trees", default=None,
                    help=f"mode tree: tree shapes separated by ';', each branching factors per depth or "
                         f"dynamic:N[:D[:K]] (4,2,1,1;2,2,2;dynamic:16); default {DEFAULTS.tree} for the draft model, "
                         f"{DEFAULTS.heads_tree} for heads")
    add_cache_args(ap, many=True)
    add_speculate_arg(ap, many=True)
    add_press_args(ap, many=True)
    ap.add_argument("--baseline_dtype", default=None, choices=tuple(DTYPES),
                    help="also time AR with the target in this dtype, interleaved with the sweep's configurations "
                         "at each batch size and temperature (needs ar among --modes); summary.csv's "
                         "speedup_vs_baseline (the console's 'vs baseline') is each one's tokens/s over it (default: "
                         "none)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first batch (batch i: seed + i)")
    ap.add_argument("--out", default=None, help="output folder (default: results/<timestamp>/)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the sweep in --out: skip configurations already in its raw.csv (every "
                         "setting that changes a row must match)")
    args = ap.parse_args(argv)
    args.modes = parse_modes(args.modes)
    args.drafts = parse_drafts(args.draft, many=True)
    check_speculator_flag(args.speculator, args.drafts)
    args.batch_sizes = int_list(args.batch_sizes, "batch_sizes")
    args.gammas = int_list(args.gammas, "gammas")
    args.schedules = [s.strip() for s in args.gamma_schedule.split(",") if s.strip()]
    args.finished = [f.strip() for f in args.finished_rows.split(",") if f.strip()]
    args.kv_caches = parse_caches(args.kv_cache, args.compile)
    args.speculates = [s.strip() for s in args.speculate.split(",") if s.strip()] or [args.speculate]
    for s in args.speculates:
        check_speculate(s)
    args.presses = [p.label() for p in presses_of(args, many=True)]
    args.tree_list = [str(parse_tree(t)) for t in (args.trees or "").split(";") if t.strip()]
    try:
        args.temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--temperatures takes a comma list of numbers, got {args.temperatures!r}") from None
    check_at_least_one(args, "samples", "repeats", "max_tokens")
    if args.baseline_dtype and "ar" not in args.modes:
        raise ValueError(f"--baseline_dtype {args.baseline_dtype} times AR beside the sweep's AR: add ar to --modes")
    if args.baseline_dtype and resolve_dtype(args.baseline_dtype, resolve_device(args.device)) == \
            resolve_dtype(args.dtype, resolve_device(args.device)):
        raise ValueError(f"--baseline_dtype {args.baseline_dtype} is the sweep's own dtype (--dtype {args.dtype}): "
                         f"its AR is the sweep's; name another dtype")
    for t, g, s, f in itertools.product(args.temperatures, args.gammas, args.schedules, args.finished or [""]):
        check_args("bass", args.max_tokens, g, SamplingParams(t, args.top_k, args.top_p, args.min_p,
                                                              args.repetition_penalty), ScheduleParams(kind=s), f)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out: the folder of the sweep to continue")
    args.out = args.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
    check_out(args.out, args.resume, args.overwrite)
    return args


def trees_of(args, mode: str, draft: str, loaded: dict) -> list[str]:
    """The trees a configuration runs: --trees (dynamic ones with the draft model only: heads draft
    static trees), or the default tree of its drafter as ``generate`` picks it (``loaded``: the
    drafters by name, so that raw.csv names the tree heads ran; heads' default cut to their depth);
    "" off mode tree."""
    if not reads(mode, "tree"):
        return [""]
    if not args.tree_list:
        return [default_tree(loaded.get(draft))]
    return [t for t in args.tree_list if draft == "model" or not t.startswith("dynamic")]


def name_heads_trees(raw: pd.DataFrame, loaded: dict) -> pd.DataFrame:
    """Rows of mode tree drafted by heads, written before raw.csv named the tree heads ran (empty), ran
    their drafter's default tree: name it, so that a resumed sweep knows them as done."""
    if raw.empty:
        return raw
    for draft, drafter in loaded.items():
        unnamed = (raw["mode"] == "tree") & (raw["draft"] == draft) & (raw["tree"] == "")
        if draft != "model" and unnamed.any():
            raw = raw.assign(tree=raw["tree"].where(~unnamed, default_tree(drafter)))
    return raw


def configs(args, loaded: dict) -> list[RunConfig]:
    """The grid; one-at-a-time modes run at batch 1 only, ar and hf need no gamma. ``loaded``: the
    drafters by name (their default trees)."""
    sorts = {"off": [False], "on": [True], "both": [False, True]}[args.sort_batch]
    out = []
    for temp, mode in itertools.product(args.temperatures, args.modes):
        batches = [1] if mode in SEQUENTIAL_MODES else args.batch_sizes
        gammas = args.gammas if reads(mode, "gamma") else [0]
        schedules = args.schedules if reads(mode, "schedule") else ["constant"]
        finished = args.finished if reads(mode, "finished_rows") else [DEFAULTS.finished_rows]
        drafts = drafts_of(mode, args.drafts)                            # those that can draft for it
        caches = [DEFAULTS.kv_cache] if mode in HF_MODES else args.kv_caches     # hf: its own cache
        presses = [""] if mode in HF_MODES else list(dict.fromkeys(   # ar: only a press on the target matters
            p if MODES_TABLE[mode].drafters or PressSpec.from_label(p).applies_to("target") else ""
            for p in args.presses))
        speculates = args.speculates if reads(mode, "speculate") else [""]
        for b, g, s, srt, f, d, kv, pr, sp in itertools.product(batches, gammas, schedules, sorts, finished, drafts,
                                                                caches, presses, speculates):
            for tree in trees_of(args, mode, d, loaded):
                out.append(RunConfig(mode=mode, batch=b, gamma=g, gamma_schedule=s, temperature=temp,
                                     sort_batch=srt and b > 1 and mode not in SEQUENTIAL_MODES,
                                     max_tokens=args.max_tokens, top_k=args.top_k, top_p=args.top_p,
                                     min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                     seed=args.seed, finished_rows=f, tree=tree, draft=d, kv_cache=kv,
                                     compile=compile_of(args.compile, mode, kv), press=pr, speculate=sp))
    if args.baseline_dtype:                              # AR in the baseline dtype beside each AR
        out += [replace(c, dtype=args.baseline_dtype) for c in out if c.mode == "ar" and not c.press]
    return list(dict.fromkeys(out))


def check_resume(config_path: str, identity: dict) -> None:
    """--resume only into a sweep whose every row-changing setting matches this one."""
    if not os.path.exists(config_path):
        raise ValueError(f"--resume: {config_path} is missing, so the earlier run's settings are unknown")
    with open(config_path) as f:
        saved = json.load(f)
    for k, v in identity.items():
        if k in saved and saved[k] != v:
            raise ValueError(f"--resume: {k} is {saved[k]!r} in {config_path} but {v!r} now; rerun with the same "
                             f"value or use another --out")


def interrupt_note(grid: list, todo: list, saved: int, together: bool, raw_path: str) -> str:
    """What an interrupted sweep kept and lost: ``saved`` groups of ``todo`` were written (``run_grid``
    yields them in ``units_of``'s order); the unit being measured is lost, the later ones never began."""
    units = [[len(cfgs) for _, cfgs in unit] for unit in units_of(todo, together)]
    sizes = [n for unit in units for n in unit]
    ends = list(itertools.accumulate(len(u) for u in units))        # groups yielded after each unit
    current = next((i for i, end in enumerate(ends) if end > saved), len(units))
    lost = sum(sizes[saved:ends[current]]) if current < len(units) else 0
    later = sum(sizes[ends[current]:]) if current < len(units) else 0
    held = len(grid) - len(todo) + sum(sizes[:saved])
    return (f"{raw_path} holds {held} of the sweep's {len(grid)} configurations ({len(grid) - len(todo)} from "
            f"earlier runs, {sum(sizes[:saved])} from this one); the {lost} being measured were lost and {later} "
            f"had not begun; to continue, run the same command with --resume")


def main(argv=None) -> None:
    args = parse(argv)
    data = prepare(args, args.modes, args.drafts)
    grid = configs(args, data.drafts)
    raw_path, config_path = os.path.join(args.out, "raw.csv"), os.path.join(args.out, "config.json")
    identity = {k: getattr(args, k, None) for k in IDENTITY if k != "fingerprint"}
    identity["fingerprint"] = data.fingerprint
    resuming = args.resume and os.path.exists(raw_path)
    if resuming:
        check_resume(config_path, identity)
    raw = upgrade_raw(pd.read_csv(raw_path, keep_default_na=False, na_values=[""])) if resuming else pd.DataFrame()
    raw = name_heads_trees(raw, data.drafts)
    fields = [f.name for f in dataclasses.fields(RunConfig)]       # in RunConfig.key()'s order
    done = set() if raw.empty else {tuple(normalise(v) for v in k)
                                    for k in raw[fields].drop_duplicates().itertuples(index=False)}
    todo = [c for c in grid if c.key() not in done]
    shard = data.shard
    shard.wait()                                        # every process has read raw.csv before it changes
    if not shard.main:                                  # the others measure their share and leave
        for _ in run_grid(todo, data, args.repeats, together=args.together):
            pass
        shard.close()
        return
    print(para(f"{len(grid)} configurations, {len(grid) - len(todo)} already in {raw_path}, {len(data.prompts)} "
               f"prompts, {shard.size} process(es)"))
    write_json(config_path, dict(vars(args), **identity, configurations=len(grid)))
    env_path = os.path.join(args.out, "env.json")
    old = json.load(open(env_path)) if resuming and os.path.exists(env_path) else {}
    env = dict(env_info(), cost=old.get("cost", {}), processes=shard.size)  # a resumed sweep keeps its costs
    saved, t0 = 0, time.perf_counter()
    try:
        with tqdm(total=len(todo) * len(data.prompts) * args.repeats, desc="sweep", dynamic_ncols=True) as bar:
            for group in run_grid(todo, data, args.repeats, bar, costs=env["cost"], together=args.together):
                rows = pd.DataFrame(group)
                raw = rows if raw.empty else pd.concat([raw, rows], ignore_index=True)
                write_csv(raw_path, raw)               # an interrupted sweep keeps the groups that finished
                saved += 1
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupt_note(grid, todo, saved, args.together, raw_path)) from None
    finally:
        env["sweep_wall_s"] = time.perf_counter() - t0   # this invocation's warm-ups and timed runs
        env["peak_memory"] = dict(peak_memory(), cuda_max_allocated_mib=float(raw["peak_mem_mib"].max())
                                  if "peak_mem_mib" in raw else None)
        write_json(env_path, env)
    cost = env["cost"]
    summary = summarise(raw, cost)
    write_csv(os.path.join(args.out, "summary.csv"), summary)
    write_csv(os.path.join(args.out, "processes.csv"), process_throughput(raw))
    plots = plot_all(summary, raw, args.out)
    write_text(os.path.join(args.out, "table.md"), markdown_table(summary))
    summary["label"] = [config_label(r) for _, r in summary.iterrows()]
    summary["rounds"] = [spread_label(lo, hi) for lo, hi in zip(summary.speedup_min_round, summary.speedup_max_round)]
    print(para(f"each figure: per batch, the median of {args.repeats} timed run(s) after one warm-up run, the "
               f"configurations of a batch size interleaved" + (", batch sizes too" if args.together else "")))
    keys = ["label", "batch", "temperature", "throughput", "speedup_vs_ar", "rounds"] + \
        (["speedup_vs_baseline"] if "speedup_vs_baseline" in summary else []) + ["tokens_per_call",
            "acceptance_rate", "latency_ms", "decode_speedup_vs_ar", "alpha"] + \
        (["predicted_speedup", "efficiency", "predicted_verify", "efficiency_verify", "flagged"] if cost else [])
    print(fit_table(summary, sweep_cols(*keys, processes=int(summary.processes.max())), wide=args.wide,
                    where="summary.csv and table.md"))
    print(f"sweep wall time {env['sweep_wall_s']:.1f} s on {shard.size} process(es)")
    print(para(f"wrote {raw_path}, summary.csv, processes.csv, table.md, config.json, env.json and {len(plots)} "
               f"plots in {args.out}"))
    if cost:
        print("measured step costs (ms; c = draft step / target step, v = verify pass / target step):")
        for key, c in cost.items():
            print(f"  batch x gamma {key}: target step {c['target_step_ms']:.2f}, draft step {c['draft_step_ms']:.2f}, "
                  f"verify {c['verify_ms']:.2f}, c {c['c']:.3f}, v {c['verify_over_step']:.2f}")
    shard.close()


if __name__ == "__main__":
    run(main)
