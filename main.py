"""Generate from one or more prompts with any decoding mode of the toolkit.

    python main.py --input "The quick brown fox"                  # embedded default pair, streamed
    python main.py --input "The quick brown fox" --compare        # every mode side by side, timed
    python main.py --input "Hello" --bass --batch 8 -v            # batched speculative sampling
"""
from __future__ import annotations

import sys
import time

from sampling import MODES, check_args, generate_many
from sampling.app.cli import (
    Parser,
    add_model_args,
    add_sampling_args,
    check_at_least_one,
    check_mode_draft,
    check_speculator_flag,
    generate_kwargs,
    load_pair,
    needs_draft,
    params_of,
    parse_caches,
    parse_drafts,
    placement_of,
    presses_of,
    run,
    schedule_of,
    takes_draft,
)
from sampling.app.models import resolve_device, resolve_dtype
from sampling.app.strict_json import dumps
from sampling.cache.spec import CacheSpec
from sampling.control import cost_tables
from sampling.generate import DEFAULTS, check_inputs, default_gamma, default_main_mode
from sampling.modes import get_mode
from sampling.tree_shapes import parse_tree
from sampling.utils import cache_dir


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", action="append", default=None,
                    help="a prompt (repeat the flag for several)")
    add_model_args(ap, placement=True)
    ap.add_argument("--mode", default=None, choices=MODES,
                    help=f"decoding mode (default: the fastest measured on the embedded pair at the temperature "
                         f"asked: {DEFAULTS.main_mode} greedy with the draft model ({DEFAULTS.main_mode_bfloat16} in "
                         f"bfloat16), {DEFAULTS.main_chain_mode} otherwise)")
    ap.add_argument("--bass", action="store_true", help="shorthand for --mode bass")
    ap.add_argument("--batch", type=int, default=1,
                    help="batch size; fewer prompts than this are repeated to fill one batch")
    ap.add_argument("--compare", action="store_true",
                    help="run every mode on the same input and print a side-by-side table of timed runs (cascade "
                         "with --cascade, or with the embedded target, whose cascade drafts are embedded too)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="--compare: timed runs per mode after one warm-up run, modes interleaved; "
                         "the table shows the median")
    add_sampling_args(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print every statistic: gamma trace, accepted-length histogram, per-row stats")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:                                           # nothing asked: say how to ask
        ap.print_usage(sys.stderr)
        sys.stderr.write("error: give at least one --input (python main.py -h lists every flag)\n")
        sys.exit(2)
    args = ap.parse_args(argv)
    if args.bass:
        args.mode = "bass"
    check_speculator_flag(args.speculator, [parse_drafts(args.draft)[0]])
    args.draft = parse_drafts(args.draft)[0]
    if args.mode is None:                                  # the fastest mode measured for this drafter
        dtype = resolve_dtype(args.dtype, resolve_device(args.device))   # the models' (auto: this machine's)
        args.mode = default_main_mode(args.temperature, args.draft, dtype)
    if not args.input or any(not p.strip() for p in args.input):
        raise ValueError("empty prompt: give a non-empty --input")
    check_at_least_one(args, "batch", "repeats")
    gamma = args.gamma if args.gamma is not None else default_gamma(args.gamma_schedule)
    check_args(args.mode, args.max_tokens, gamma, params_of(args), schedule_of(args), args.finished_rows)
    if args.tree is not None:
        parse_tree(args.tree)
    parse_caches(args.kv_cache, args.compile)
    presses_of(args)
    if args.cascade_gamma is not None and args.cascade_gamma <= 0:
        raise ValueError(f"--cascade_gamma must be >= 1, got {args.cascade_gamma}")
    if not args.compare:                                   # --compare runs the modes the drafter drafts for
        check_mode_draft(args.mode, args.draft)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    cascade = args.cascade is not None or args.target_model_name is None   # its drafts fit this target
    modes = tuple(m for m in MODES if takes_draft(m, args.draft) and (m != "cascade" or cascade)) \
        if args.compare else (args.mode,)
    target, draft, tok, vocab = load_pair(args, need_draft=any(needs_draft(m) for m in modes))
    prompts = list(args.input)
    while len(prompts) < args.batch:                       # fill one batch with copies
        prompts.append(args.input[len(prompts) % len(args.input)])
    ids = [tok(p)["input_ids"] for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise ValueError("empty prompt: a prompt encodes to no tokens")
    drafts = {m: draft if needs_draft(m) else None for m in modes}
    if "cascade" in modes:                                 # mode cascade drafts with its own models
        from sampling.app.models import load_cascade
        drafts["cascade"], cascade_vocab = load_cascade(args.cascade, tok, target, args.device, args.dtype,
                                                        placement_of(args))
        vocab = vocab or cascade_vocab
    kwargs = dict(batch_size=args.batch, pad_id=tok.pad_token_id, sort_batch=args.sort_batch,
                  **generate_kwargs(args, tok, vocab))
    for m in modes:                                        # every check of the request before anything is echoed
        check_inputs(target, drafts[m], max(map(len, ids)), get_mode(m), args.max_tokens, kwargs.get("vocab_size"))
    if args.speculate == "auto":                           # the controller's pass costs: measured once per machine,
        t0 = time.perf_counter()                           # before anything is timed
        for m in modes:
            if m != "ar":
                cost_tables(target, drafts[m], CacheSpec(kwargs["kv_cache"], kwargs["compile"]))
        spent = time.perf_counter() - t0
        if spent > 1:
            print(f"measured this machine's pass costs for the controller in {spent:.1f}s, once "
                  f"(kept in {cache_dir() / 'pass-costs.json'}; docs/speculate.md)", file=sys.stderr)
    if args.compare:
        runs, rounds = timed_runs(target, modes, ids, kwargs, drafts, args.repeats)
        if args.json:
            print(dumps({m: dict(outputs=[tok.decode(t) for t in r.tokens], tokens=r.tokens, stats=r.stats,
                                      round_speedups=rounds[m]) for m, r in runs.items()}))
        else:
            print_table(runs, rounds, tok, args.repeats)
        return
    stream = len(ids) == 1 and not args.json
    if stream:                                             # batch 1: print the text as it is accepted
        from transformers import TextStreamer
        print(prompts[0], end="", flush=True)
        kwargs["streamer"] = TextStreamer(tok)
    res, _ = generate_many(target, ids, mode=args.mode, draft_model=drafts[args.mode], **kwargs)
    if args.json:
        print(dumps(dict(outputs=[tok.decode(t) for t in res.tokens], tokens=res.tokens, stats=res.stats)))
        return
    if not stream:
        for prompt, toks in zip(prompts, res.tokens):
            print(f"{prompt}{tok.decode(toks)}")
            print("-" * 40)
    s = res.stats
    print(f"[{args.mode}] {s['new_tokens']} tokens in {s['wall_time_s']:.2f}s = {s['tokens_per_s']:.1f} tokens/s"
          f" (one run, no warm-up; --compare times runs properly); acceptance {s['acceptance_rate']:.2f},"
          f" {s['mean_accepted_tokens']:.2f} tokens per target call", file=sys.stderr)
    if args.verbose:
        for k, v in s.items():
            print(f"  {k}: {v}", file=sys.stderr)


def timed_runs(target, modes, ids, kwargs, drafts: dict, repeats: int) -> tuple[dict, dict]:
    """Each mode once untimed on the same shapes (warm-up), then ``repeats`` timed rounds with the
    modes interleaved (the order rotating); each mode keeps its median run by wall time (generate
    synchronises the device before reading the clock). Also each mode's speedup over ar round by
    round: the runs of a round are close in time, so their spread shows how far the machine's noise
    moves the speedup."""
    from tqdm import tqdm
    runs = {m: [] for m in modes}
    with tqdm(total=(repeats + 1) * len(modes), desc="--compare runs", unit="run", file=sys.stderr) as bar:
        for rep in range(repeats + 1):
            order = [modes[(k + rep) % len(modes)] for k in range(len(modes))]
            for mode in order:
                bar.set_postfix_str(f"{'warm-up' if rep == 0 else f'round {rep}/{repeats}'}: {mode}")
                kw = dict(kwargs, compile=get_mode(mode).compiles(kwargs["compile"])) if "compile" in kwargs \
                    else kwargs                            # compile "draft": where the mode has a draft
                res, _ = generate_many(target, ids, mode=mode, draft_model=drafts[mode], **kw)
                if rep:                                    # round 0 is the warm-up
                    runs[mode].append(res)
                bar.update()
    rounds = {m: [a.stats["tokens_per_s"] / b.stats["tokens_per_s"] for a, b in zip(r, runs["ar"])]
              for m, r in runs.items()}
    return {m: sorted(r, key=lambda x: x.stats["wall_time_s"])[len(r) // 2] for m, r in runs.items()}, rounds


def print_table(runs, rounds, tok, repeats: int) -> None:
    import pandas as pd

    from benchmark.console import SWEEP_COLS, Col, fit_table
    base = runs["ar"].stats["tokens_per_s"]
    rows = [dict(mode=mode, tps=r.stats["tokens_per_s"], speedup=r.stats["tokens_per_s"] / base,
                 rounds=f"{min(rounds[mode]):.2f}-{max(rounds[mode]):.2f}",
                 acceptance_rate=r.stats["acceptance_rate"], tokens_per_call=r.stats["mean_accepted_tokens"],
                 text="".join(c if c.isprintable() else " " for c in tok.decode(r.tokens[0]))[:48])
            for mode, r in runs.items()]
    print(f"each mode: the median of {repeats} timed run(s) after one warm-up run, modes interleaved")
    print(fit_table(pd.DataFrame(rows), [
        Col("mode", "mode"), Col("tps", "tok/s", ".1f", "new tokens / wall time of the mode's median run"),
        Col("speedup", "speedup", ".2f", "tok/s over ar's (each its median run)"),
        Col("rounds", "rounds", "", "lowest-highest of the same ratio within one round; the medians may come from "
            "different rounds, so the speedup can fall outside it"),
        SWEEP_COLS["acceptance_rate"], SWEEP_COLS["tokens_per_call"],
        Col("text", "text (first row)", left=True)]))


if __name__ == "__main__":
    run(main)
