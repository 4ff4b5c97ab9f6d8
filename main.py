"""Generate from one or more prompts with any decoding mode of the toolkit.

    python main.py --input "The quick brown fox"                  # embedded default pair
    python main.py --input "The quick brown fox" --compare        # every mode side by side
    python main.py --input "Hello" --bass --batch 8 -v            # batched speculative sampling
"""
from __future__ import annotations

import json
import sys

from sampling import MODES, SamplingParams, check_args, generate_many
from sampling.cli import Parser, add_model_args, add_sampling_args, generate_kwargs, load_pair, run, schedule_of
from sampling.generate import DEFAULTS


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", action="append", default=None,
                    help="a prompt (repeat the flag for several)")
    add_model_args(ap)
    ap.add_argument("--mode", default="google", choices=MODES, help="decoding mode")
    ap.add_argument("--bass", action="store_true", help="shorthand for --mode bass")
    ap.add_argument("--batch", type=int, default=1,
                    help="batch size; fewer prompts than this are repeated to fill one batch")
    ap.add_argument("--compare", action="store_true",
                    help="run every mode on the same input and print a side-by-side table")
    add_sampling_args(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    ap.add_argument("-v", "--verbose", action="store_true", help="print statistics and the gamma trace")
    args = ap.parse_args(argv)
    if args.bass:
        args.mode = "bass"
    if not args.input or any(not p.strip() for p in args.input):
        raise ValueError("empty prompt: give a non-empty --input")
    if args.batch <= 0:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    gamma = args.gamma if args.gamma is not None else DEFAULTS.gamma
    check_args(args.mode, args.max_tokens, gamma, SamplingParams(args.temperature, args.top_k, args.top_p),
               schedule_of(args), args.finished_rows)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    modes = MODES if args.compare else (args.mode,)
    target, draft, tok = load_pair(args, need_draft=any(m != "ar" for m in modes))
    prompts = list(args.input)
    while len(prompts) < args.batch:                       # fill one batch with copies
        prompts.append(args.input[len(prompts) % len(args.input)])
    ids = [tok(p)["input_ids"] for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise ValueError("empty prompt: a prompt encodes to no tokens")
    runs = {}
    for mode in modes:
        res, per_batch = generate_many(target, ids, batch_size=args.batch, pad_id=tok.pad_token_id,
                                       sort_batch=args.sort_batch, draft_model=draft, mode=mode,
                                       **generate_kwargs(args, tok))
        runs[mode] = (res, per_batch)
    if args.json:
        out = {m: dict(outputs=[tok.decode(t) for t in r.tokens], tokens=r.tokens, stats=r.stats)
               for m, (r, _) in runs.items()}
        print(json.dumps(out if args.compare else out[args.mode]))
        return
    if args.compare:
        print_table(runs, tok)
        return
    res, per_batch = runs[args.mode]
    for prompt, toks in zip(prompts, res.tokens):
        print(f"{prompt}{tok.decode(toks)}")
        print("-" * 40)
    s = res.stats
    print(f"[{args.mode}] {s['new_tokens']} tokens in {s['wall_time_s']:.2f}s = {s['tokens_per_s']:.1f} tokens/s;"
          f" acceptance {s['acceptance_rate']:.2f}, {s['mean_accepted_tokens']:.2f} tokens per target call",
          file=sys.stderr)
    if args.verbose:
        for k, v in s.items():
            print(f"  {k}: {v}", file=sys.stderr)


def print_table(runs, tok) -> None:
    base = runs["ar"][0].stats["tokens_per_s"]
    print(f"{'mode':<9} {'tokens/s':>9} {'speedup':>8} {'accept':>7} {'tok/call':>9}  text")
    for mode, (res, _) in runs.items():
        s = res.stats
        text = "".join(c if c.isprintable() else " " for c in tok.decode(res.tokens[0]))[:60]
        print(f"{mode:<9} {s['tokens_per_s']:>9.1f} {s['tokens_per_s'] / base:>7.2f}x "
              f"{s['acceptance_rate']:>7.2f} {s['mean_accepted_tokens']:>9.2f}  {text}")


if __name__ == "__main__":
    run(main)
