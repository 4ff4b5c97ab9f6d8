"""The cost of tree attention on this machine: one tree-masked target pass over k draft tokens,
against a chain pass of the same k tokens and against k passes of one token each (verifying a
one-level tree of k candidates path by path). Writes tree_cost.csv and tree_cost.png.

    python -m benchmark.studies.tree_cost --batch_sizes 1,4,16 --prefixes 64,512,900 --tokens 4,16,64 \
        --out results/trees
"""
from __future__ import annotations

import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from sampling.app.cli import Parser, add_model_args, run  # noqa: E402
from sampling.cache.tree import TreeKVCacheModel  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402
from sampling.tree_shapes import TreeShape  # noqa: E402
from sampling.utils import now  # noqa: E402

from ..run_experiment import int_list  # noqa: E402
from ..utils_io import env_info, save_figure, write_csv, write_json  # noqa: E402


@torch.inference_mode()
def pass_times(target, batch: int, prefix: int, k: int, reps: int, gen, ways=("tree", "chain", "paths")) -> dict:
    """Median ms of the ways (of three) to verify k candidates after a prefix, interleaved per round."""
    device = next(target.parameters()).device
    V = target.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, V, (batch, prefix), generator=gen).to(device)
    mask = torch.ones_like(ids)
    kv = TreeKVCacheModel(target, SamplingParams(temperature=1.0))
    kv.prefill(ids, mask)
    wide = TreeShape.from_branching((k,))
    times = {name: [] for name in ways}

    def tree():
        kv.forward_tree(ids, mask, new, wide.ancestors, wide.depths)
        kv.keep_tree(new[:, :0], torch.zeros(batch, dtype=torch.long, device=device))

    def chain():
        seq = torch.cat([ids, new], 1)
        kv.catch_up(seq, torch.ones_like(seq))
        kv.rollback(prefix)

    def paths():
        for j in range(k):
            seq = torch.cat([ids, new[:, j:j + 1]], 1)
            kv.catch_up(seq, torch.ones_like(seq))
            kv.rollback(prefix)

    run_way = {"tree": tree, "chain": chain, "paths": paths}
    names = list(ways)
    for rep in range(reps + 1):                                  # round 0 is the warm-up
        for name in [names[(i + rep) % len(names)] for i in range(len(names))]:
            new = torch.randint(0, V, (batch, k), generator=gen).to(device)
            t0 = now(device)
            run_way[name]()
            if rep:
                times[name].append(1000 * (now(device) - t0))
    return {f"{n}_ms": statistics.median(t) for n, t in times.items()}


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--batch_sizes", default="1,4,16", help="comma list of batch sizes")
    ap.add_argument("--prefixes", default="64,512,900", help="comma list of prefix lengths")
    ap.add_argument("--tokens", default="4,16,64", help="comma list of draft tokens k")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds after one warm-up round (median kept)")
    ap.add_argument("--out", required=True, help="folder for tree_cost.csv and tree_cost.png")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing tree_cost.csv")
    args = ap.parse_args(argv)
    batches, prefixes, ks = (int_list(args.batch_sizes, "batch_sizes"), int_list(args.prefixes, "prefixes"),
                             int_list(args.tokens, "tokens"))
    if args.reps <= 0:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    path = os.path.join(args.out, "tree_cost.csv")
    if os.path.exists(path) and not args.overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it, or another --out")
    from sampling.app.models import load_model
    target = load_model(args.target_model_name, "target", args.device, args.dtype)
    limit = getattr(target.config, "max_position_embeddings", None)
    if limit is not None and max(prefixes) + max(ks) > limit:
        raise ValueError(f"prefix {max(prefixes)} + {max(ks)} tokens exceeds the target's {limit} positions")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in batches:
        for prefix in prefixes:
            for k in ks:
                rows.append(dict(batch=b, prefix=prefix, k=k, **pass_times(target, b, prefix, k, args.reps, gen)))
                print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    write_csv(path, df)
    write_json(os.path.join(args.out, "tree_cost_env.json"), env_info())
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.8), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for prefix in prefixes:
            part = df[(df.batch == b) & (df.prefix == prefix)]
            for way, style in (("tree", "-"), ("chain", "--"), ("paths", ":")):
                ax.plot(part.k, part[f"{way}_ms"], style, marker="o", label=f"{way}, prefix {prefix}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("draft tokens k")
        ax.set_ylabel("ms per verification")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6)
    save_figure(fig, os.path.join(args.out, "tree_cost.png"))
    print(f"wrote {path} and tree_cost.png")


if __name__ == "__main__":
    run(main)
