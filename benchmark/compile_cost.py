"""What compiling the draft costs and when it pays back: the same prompts generated one after
another, batch 1, in three fresh processes run in turn: eager; ``compile="draft"`` with an empty
inductor cache (cold: every graph compiled); ``compile="draft"`` again, finding the first one's
kernels on disk (warm: a second process).

    python -m benchmark.compile_cost --dataset_path ../shared/dolly/dolly-sample.jsonl --samples 16 \\
        --out results/drafting/compile-cost

Each process times every generation (the models loaded before, not timed) and the report gives
the first generation's time (the compiling is paid there and in the next few, as new shapes come),
the steady time (the median of the generations after the first ``--settle``), the seconds compiling
added over the first ``--settle`` generations, and the generations after which the compiled runs
have paid that back. The draft length is the schedule's every step (``speculate="always"``), so
that the runs make the same passes. The compiled draft runs on a static cache (compiling needs
one) and the eager one on the default dynamic cache: the comparison is what a user switches
between; on this CPU the two eager caches tie at batch 1 (``results/static``).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import pandas as pd
import torch

from sampling import generate, load_model, load_tokenizer
from sampling.app.cli import Parser, add_model_args, run
from sampling.app.dolly import load_dolly, render_prompt
from sampling.utils import model_device, now

from .console import fit_markdown
from .utils_io import env_info, write_csv, write_json, write_text

RUNS = ("eager", "cold", "warm")     # in this order: warm reads the kernels cold wrote


def child(args) -> None:
    """One process: load, then generate every prompt in turn, printing each generation's seconds (JSON)."""
    target = load_model(args.target_model_name, "target", args.device, args.dtype)
    draft = load_model(args.approx_model_name, "draft", args.device, args.dtype)
    tok = load_tokenizer(args.target_model_name)
    records = load_dolly(args.dataset_path)[:args.samples]
    device = model_device(target)
    walls = []
    for rec in records:
        ids = torch.tensor([tok(render_prompt(rec))["input_ids"]], device=device)
        t0 = now(device)
        generate(target, ids, draft_model=draft, mode=args.mode, max_new_tokens=args.max_tokens, temperature=0,
                 eos_token_id=tok.eos_token_id, compile=False if args.child == "eager" else "draft",
                 speculate="always")
        walls.append(now(device) - t0)
    print(json.dumps(walls))


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--dataset_path", required=True, help="Dolly jsonl (prompts taken from the top)")
    ap.add_argument("--samples", type=int, default=16, help="prompts, generated one after another")
    ap.add_argument("--mode", default="tree", choices=("google", "bass", "tree"), help="the speculative mode")
    ap.add_argument("--max_tokens", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--settle", type=int, default=4, help="generations before the steady median")
    ap.add_argument("--out", default=None, help="output folder (must not exist)")
    ap.add_argument("--child", default=None, choices=RUNS, help="(internal) run one process's generations")
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    for name in ("samples", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.settle < args.samples:
        raise ValueError(f"--settle must be in [1, --samples - 1 = {args.samples - 1}], got {args.settle}")
    if not args.out:
        raise ValueError("--out is required (a folder that does not exist)")
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; pick another --out")
    flags = [f"--{k}={v}" for k, v in vars(args).items()
             if k not in ("out", "child") and v is not None and not isinstance(v, bool)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="inductor-") as kernels:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=kernels)         # empty for cold, cold's for warm
        for run_name in RUNS:
            done = subprocess.run([sys.executable, "-m", "benchmark.compile_cost", *flags, "--child", run_name],
                                  env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise RuntimeError(f"the {run_name} process failed: {last}")
            walls = json.loads(done.stdout.strip().splitlines()[-1])
            rows += [dict(run=run_name, generation=i, seconds=w) for i, w in enumerate(walls)]
    raw = pd.DataFrame(rows)
    report(args, raw)


def summarise(raw: pd.DataFrame, settle: int) -> pd.DataFrame:
    """Per run: first generation, the first ``settle`` together, the steady median after them."""
    out = []
    for name, g in raw.groupby("run", sort=False):
        s = g.sort_values("generation").seconds.tolist()
        out.append(dict(run=name, first_s=s[0], settling_s=sum(s[:settle]), steady_s=statistics.median(s[settle:])))
    df = pd.DataFrame(out).set_index("run")
    eager = df.loc["eager"]
    df["extra_s"] = df.settling_s - eager.settling_s               # what compiling added to the first generations
    df["saved_per_generation_s"] = eager.steady_s - df.steady_s
    # after G generations: settling + (G - settle) x steady, against eager's; equal at G =
    df["break_even_generations"] = [(settle + x / s if x > 0 else 0.0) if s > 0 else float("nan")
                                    for x, s in zip(df.extra_s, df.saved_per_generation_s)]
    df.loc["eager", "break_even_generations"] = float("nan")
    return df.reset_index()


def report(args, raw: pd.DataFrame) -> None:
    summary = summarise(raw, args.settle)
    os.makedirs(args.out)
    write_csv(os.path.join(args.out, "raw.csv"), raw)
    write_csv(os.path.join(args.out, "summary.csv"), summary)
    write_json(os.path.join(args.out, "env.json"), dict(env_info(), args=vars(args)))
    lines = [f"mode {args.mode}, batch 1, {args.samples} Dolly prompts one after another, {args.max_tokens} new "
             f"tokens, greedy, the draft compiled (--compile draft) or not; one process per row", "",
             f"| run | first generation (s) | first {args.settle} (s) | steady, median after them (s) | "
             f"first {args.settle}, over eager's (s) | saved per generation (s) | pays back after (generations) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for _, r in summary.iterrows():
        be = "" if r.run == "eager" else "never" if r.saved_per_generation_s <= 0 else \
            f"{r.break_even_generations:.0f}"
        lines.append(f"| {r.run} | {r.first_s:.2f} | {r.settling_s:.2f} | {r.steady_s:.3f} | {r.extra_s:.2f} | "
                     f"{r.saved_per_generation_s:+.3f} | {be} |")
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(args.out, "table.md"), text)
    print(fit_markdown(text, os.path.join(args.out, "table.md")))


if __name__ == "__main__":
    run(main)
