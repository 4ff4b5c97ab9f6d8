"""Where the time goes with a press: a pass's cost against cache length, and the press's own cost.

    python -m benchmark.studies.press_cost --out results/kvpress/cost

For the target and the draft: the median ms of a cached pass of 1 and of gamma + 1 new tokens over
caches of each ``--caches`` length (``benchmark.cost_model.measure_passes``: random-filled caches,
warm-up, rotating order), and the ms one press takes to evict half of a cache of each length
(the prefill press of ratio 0.5). A press pays for itself in a generation of n tokens when n x
(pass at L - pass at L/2) exceeds its own cost.
"""
from __future__ import annotations

import os
import statistics

import pandas as pd
import torch

from sampling.app.cli import Parser, add_model_args, load_pair, run
from sampling.cache.press import PRESSES, Press, PressSpec
from sampling.kvcache_model import KVCacheModel
from sampling.params import SamplingParams
from sampling.utils import now

from ..console import fit_markdown
from ..cost_model import CostSettings, measure_passes
from ..utils_io import write_csv, write_text


@torch.inference_mode()
def press_ms(model, kind: str, length: int, reps: int) -> float:
    """Median ms of pressing a prompt of ``length`` tokens to half (after its prefill, not counted)."""
    device = next(model.parameters()).device
    V = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    times = []
    for rep in range(reps + 1):
        kv = KVCacheModel(model, SamplingParams(temperature=1.0))
        press = Press(PressSpec(kind, ratio=0.5, on="target"), model)
        ids = torch.randint(0, V, (1, length), generator=gen).to(device)
        with press.capturing():                                # the prefill unpressed (snapkv: its queries) ...
            kv.prefill(ids, torch.ones_like(ids))
        press.commit(kv.length)                                # ... its positions final, then the press alone
        t0 = now(device)
        press.evict(kv.backend, press.spec.prefill_keep(length), kv.mask)
        t1 = now(device)
        if rep:
            times.append(1000 * (t1 - t0))
    return statistics.median(times)


def main(argv=None) -> None:
    args = parse(argv)
    target, drafts, _, _ = load_pair(args, drafts=["model"])
    s = CostSettings(batches=(1,), news=(1, args.gamma + 1), caches=tuple(args.caches), prefills=(32, 128, 512),
                     reps=args.reps)
    passes = pd.concat([measure_passes(m, s).assign(model=role) for role, m in (("target", target),
                                                                               ("draft", drafts["model"]))])
    passes = passes[passes.kind == "step"].drop(columns=["kind", "batch"])
    presses = pd.DataFrame([dict(model=role, press=k, cache=L, ms=press_ms(m, k, L, args.reps))
                            for role, m in (("target", target), ("draft", drafts["model"]))
                            for k in PRESSES[1:] for L in args.caches])
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "passes.csv"), passes)
    write_csv(os.path.join(args.out, "presses.csv"), presses)
    table = markdown(passes, presses, args)
    write_text(os.path.join(args.out, "table.md"), table)
    print(fit_markdown(table, os.path.join(args.out, "table.md")))


def markdown(passes: pd.DataFrame, presses: pd.DataFrame, args) -> str:
    lines = ["| model | new tokens | " + " | ".join(f"cache {L}" for L in args.caches) + " |",
             "|---|---:|" + "---:|" * len(args.caches)]
    for (role, n), g in passes.groupby(["model", "new"], sort=False):
        by = g.set_index("cache").ms
        lines.append(f"| {role} | {n} | " + " | ".join(f"{by[L]:.2f}" for L in args.caches) + " |")
    lines += ["", "ms to press a cache of L tokens to L / 2:", "",
              "| model | press | " + " | ".join(f"L = {L}" for L in args.caches) + " |",
              "|---|---|" + "---:|" * len(args.caches)]
    for (role, k), g in presses.groupby(["model", "press"], sort=False):
        by = g.set_index("cache").ms
        lines.append(f"| {role} | {k} | " + " | ".join(f"{by[L]:.2f}" for L in args.caches) + " |")
    return "\n".join(lines) + "\n"


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--caches", default="128,256,400,512,800", help="cache lengths (comma list)")
    ap.add_argument("--gamma", type=int, default=4, help="the verify pass feeds gamma + 1 tokens")
    ap.add_argument("--reps", type=int, default=15, help="timed rounds after one warm-up")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        args.caches = [int(x) for x in args.caches.split(",") if x.strip()]
    except ValueError:
        args.caches = []
    if not args.caches or min(args.caches) < 8:
        raise ValueError(f"--caches takes a comma list of lengths >= 8, got {args.caches}")
    if args.gamma < 1 or args.reps < 1:
        raise ValueError("--gamma and --reps must be >= 1")
    if os.path.exists(os.path.join(args.out, "passes.csv")):
        raise ValueError(f"{args.out}/passes.csv exists: choose another --out")
    return args


if __name__ == "__main__":
    run(main)
