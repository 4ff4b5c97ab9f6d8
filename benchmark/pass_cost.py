"""What one pass of each model costs on this machine, by dtype and thread count: the target's
one-token step, the draft's one-token step and the target's (gamma + 1)-token verify pass, batch 1,
through the toolkit's own KV wrapper (``runner_support.measure_cost``), and c = draft / target.

    python -m benchmark.pass_cost --out results/drafting/pass-cost
    python -m benchmark.pass_cost --dtypes float32 --threads 2 --drafts transformers,compiled \
        --out results/drafting/pass-cost-compiled

The configurations (dtype x threads x the draft's passes, ``--drafts``: transformers' model call,
the lean loop of ``sampling.cache.backends.LeanBackend``, either with the bfloat16 one-row copies
``load_model`` gives a float32 draft on the CPU (``sampling.skinny``), or compiled) run in
interleaved rounds, the order rotating, each round's figure the median of ``--reps`` passes
after two warm-up rounds; the table keeps the median round and the rounds' range. ``--dtype auto``
picks bfloat16 on a CPU only where it is native (``sampling.app.models.native_bf16``): this
table is the measurement behind that rule.
"""
from __future__ import annotations

import itertools
import os

import pandas as pd
import torch

from sampling.app.cli import Parser, add_model_args, run
from sampling.app.models import load_model, native_bf16
from sampling.cache.spec import CacheSpec
from sampling.skinny import SkinnyLinear, linear_path

from .console import fit_markdown
from .runner_support import measure_cost
from .utils_io import env_info, write_csv, write_json, write_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DRAFTS = {   # the draft's passes: its cache, and whether its linears keep their one-row copies
    "transformers": (CacheSpec(lean=False), False),
    "transformers+one-row": (CacheSpec(lean=False), True),
    "lean": (CacheSpec(lean=True), False),
    "lean+one-row": (CacheSpec(lean=True), True),      # what a float32 draft on the CPU runs by default
    "compiled": (CacheSpec("static", compile=True, lean=False), False),
}


def without_copies(model):
    """``model`` with its linears' one-row copies dropped (they compute from the weights alone)."""
    for m in model.modules():
        if isinstance(m, SkinnyLinear):
            m.one_row = None
    return model


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--dtypes", default="float32,bfloat16", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--threads", default="1,2", help="comma list of intra-op thread counts")
    ap.add_argument("--gamma", type=int, default=4, help="the verify pass feeds gamma + 1 tokens")
    ap.add_argument("--prompt_len", type=int, default=64, help="tokens in the cache before the passes")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--reps", type=int, default=40, help="passes of each kind per round (the median is kept)")
    ap.add_argument("--drafts", default="transformers,transformers+one-row,lean,lean+one-row",
                    help=f"comma list of the draft's passes to measure: {', '.join(DRAFTS)} (one-row: the "
                         f"bfloat16 copies of a float32 draft on the CPU; compiled: its own static cache, "
                         f"--compile draft, a few seconds to a minute to compile)")
    ap.add_argument("--out", required=True, help="output folder (must not exist)")
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - set(DTYPES):
        raise ValueError(f"--dtypes takes a comma list of {', '.join(DTYPES)}, got {args.dtypes!r}")
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise ValueError(f"--threads takes a comma list of integers >= 1, got {args.threads!r}")
    drafts = [d.strip() for d in args.drafts.split(",") if d.strip()]
    if not drafts or set(drafts) - set(DRAFTS):
        raise ValueError(f"--drafts takes a comma list of {', '.join(DRAFTS)}, got {args.drafts!r}")
    for name in ("gamma", "prompt_len", "rounds", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.dtype != "auto":
        raise ValueError(f"--dtype {args.dtype}: this tool measures each dtype of --dtypes; give them there")
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; pick another --out")
    models = {}
    for d in dtypes:
        target = load_model(args.target_model_name, "target", args.device, d)
        models[d, True] = target, load_model(args.approx_model_name, "draft", args.device, d)
        models[d, False] = target, without_copies(load_model(args.approx_model_name, "draft", args.device, d))
    # one-row copies exist only for float32 drafts on the CPU: elsewhere those variants would repeat the others
    configs = [(dt, n, d) for dt, n, d in itertools.product(dtypes, threads, drafts)
               if not DRAFTS[d][1] or "one-row" in linear_path(models[dt, True][1])]
    before = torch.get_num_threads()
    rows = []
    try:
        for r in range(args.rounds):
            for k in range(len(configs)):
                dtype, n, d = configs[(k + r) % len(configs)]
                torch.set_num_threads(n)
                cache, copies = DRAFTS[d]
                got = measure_cost(*models[dtype, copies], batch=1, gamma=args.gamma, prompt_len=args.prompt_len,
                                   reps=args.reps, draft_cache=cache)
                rows.append(dict(round=r, dtype=dtype, threads=n, draft=d, **{k: got[k] for k in (
                    "target_step_ms", "draft_step_ms", "verify_ms", "c", "verify_over_step")}))
    finally:
        torch.set_num_threads(before)
    raw = pd.DataFrame(rows)
    cols = ["target_step_ms", "draft_step_ms", "verify_ms", "c", "verify_over_step"]
    summary = raw.groupby(["dtype", "threads", "draft"], sort=False)[cols].median().reset_index()
    for col in cols[:3]:
        g = raw.groupby(["dtype", "threads", "draft"], sort=False)[col]
        summary[col + "_min"], summary[col + "_max"] = g.min().values, g.max().values
    os.makedirs(args.out)
    write_csv(os.path.join(args.out, "raw.csv"), raw)
    write_csv(os.path.join(args.out, "summary.csv"), summary)
    write_json(os.path.join(args.out, "env.json"), dict(env_info(), native_bf16=native_bf16(), args=vars(args)))
    lines = [f"native bfloat16 on this CPU: {native_bf16()}; batch 1, {args.prompt_len} tokens cached, median of "
             f"{args.rounds} interleaved rounds (each the median of {args.reps} passes; the rounds' range in "
             f"brackets)", "",
             f"| dtype | threads | draft passes | target, 1 token (ms) | draft, 1 token (ms) | "
             f"target, {args.gamma + 1} tokens (ms) | c = draft / target | verify / target step |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    def ms(s, col):
        return f"{s[col]:.2f} ({s[col + '_min']:.2f}-{s[col + '_max']:.2f})"
    for _, s in summary.iterrows():
        lines.append(f"| {s['dtype']} | {s.threads} | {s['draft']} | {ms(s, 'target_step_ms')} | "
                     f"{ms(s, 'draft_step_ms')} | {ms(s, 'verify_ms')} | {s.c:.3f} | {s.verify_over_step:.2f} |")
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(args.out, "table.md"), text)
    print(fit_markdown(text, os.path.join(args.out, "table.md")))
    print(f"median of each round's figure; rounds in {args.out}/raw.csv")


if __name__ == "__main__":
    run(main)
