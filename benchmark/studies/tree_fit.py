"""Fit draft trees to measured acceptance, as Sequoia does (Chen et al. 2024, arXiv 2402.12374).

1. Positional acceptance: along continuations the target writes itself on the dataset's prompts,
   r[j] = P(the j-th candidate a node draws is the one accepted). Greedy: the rank of the target's
   argmax in the draft's q. Sampling: tree_accept's rule (siblings without replacement), simulated
   ``--trials`` times per position with the exact p and q of that position.
2. Expected accepted tokens of a tree: the sum over its nodes of the product of r[rank] along the
   path (Sequoia's estimate; it takes acceptance to be the same at every depth and independent of
   the path). ``best_tree`` finds the tree of n nodes that maximises it (dynamic programming over
   how many nodes each child's subtree gets).
3. Cost: one target pass over k tokens and one draft pass over w tokens, measured on this machine;
   predicted speedup over AR = tokens per step x (one target pass) / (the step's passes).

4. Calibration for dynamic trees: the sharpening S (``dynamic:N:D:K:S``) for which the draft's
   top-1 probability, q ** S renormalised, averages the measured r[0].

Writes ranks.csv, costs.csv, fit.csv (the best tree for each n and temperature), expected.csv
(the given ``--shapes``), calibration.csv and fit.png under --out:

    python -m benchmark.studies.tree_fit --dataset_path ../shared/dolly/dolly-sample.jsonl --samples 24 \\
        --shapes "1,1,1,1;3,2,1" --out results/trees/fit
"""
from __future__ import annotations

import functools
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from sampling import generate  # noqa: E402
from sampling.app.cli import Parser, add_model_args, run  # noqa: E402
from sampling.params import SamplingParams, gumbel_keys, norm_logits  # noqa: E402
from sampling.tree_shapes import MAX_NODES, TreeShape, parse_tree  # noqa: E402
from sampling.verify.rules import max_fn

from ..runner import add_bench_args, prepare  # noqa: E402
from ..utils_io import env_info, save_figure, write_csv, write_json  # noqa: E402
from .tree_cost import pass_times  # noqa: E402


@torch.inference_mode()
def position_laws(target, draft, prompt: list[int], max_tokens: int, temperature: float, vocab, seed: int):
    """p [T, V] (target) and q [T, V] (draft; temperature 1 when greedy, the draft's ranking) at each
    position of a continuation the target writes itself, and the tokens it wrote [T]."""
    ids = torch.tensor([prompt])
    res = generate(target, ids, mode="ar", temperature=temperature, max_new_tokens=max_tokens, seed=seed,
                   vocab_size=vocab)
    cont = res.tokens[0]
    full = torch.tensor([prompt + cont])
    out = []
    for model, t in ((target, temperature), (draft, temperature or 1.0)):
        logits = model(input_ids=full).logits[0, len(prompt) - 1:-1]                # [T, V']
        logits = logits if vocab is None else logits[:, :vocab]
        out.append(norm_logits(logits.unsqueeze(0), SamplingParams(temperature=t))[0])  # [T, V]
    return out[0], out[1], torch.tensor(cont)


def greedy_ranks(p: torch.Tensor, q: torch.Tensor, K: int) -> torch.Tensor:
    """Counts [K] of the rank of the target's argmax among the draft's candidates."""
    best = p.argmax(-1, keepdim=True)                                               # [T, 1]
    rank = (q > q.gather(1, best)).sum(-1)                                          # [T]
    return torch.bincount(rank[rank < K], minlength=K)[:K].float()


def sampled_ranks(p: torch.Tensor, q: torch.Tensor, K: int, trials: int, gen) -> torch.Tensor:
    """Counts [K] (over positions x trials, divided by trials) of the rank accepted by tree_accept's
    rule when K siblings are drawn from q without replacement."""
    counts = torch.zeros(K)
    for p_t, q_t in zip(p, q):
        kids = gumbel_keys(q_t.expand(trials, -1), gen).topk(K, dim=-1).indices      # [M, K]
        r, qq = p_t.expand(trials, -1).clone(), q_t.expand(trials, -1).clone()      # [M, V]
        live = torch.ones(trials, dtype=torch.bool)
        for j in range(K):
            x = kids[:, j:j + 1]
            qx, rx = qq.gather(1, x).squeeze(1), r.gather(1, x).squeeze(1)          # [M]
            valid = qx > 0
            ok = live & valid & (torch.rand(trials, generator=gen) * qx < rx)
            counts[j] += ok.sum()
            live &= ~ok
            upd = (live & valid).unsqueeze(1)
            r = torch.where(upd, max_fn(r - qq, fallback=r), r)
            q_next = qq.scatter(1, x, 0.0)
            qq = torch.where(upd, q_next / q_next.sum(-1, keepdim=True).clamp(min=1e-30), qq)
    return counts / trials


def calibrate(q: torch.Tensor, r0: float) -> float:
    """The S for which the draft's top-1 probability after sharpening (q ** S, renormalised) is on
    average the measured first-candidate acceptance r0 (bisection on log S; q [T, V])."""
    logq = q.clamp(min=1e-30).log()
    lo, hi = math.log(0.05), math.log(50.0)
    for _ in range(40):
        mid = (lo + hi) / 2
        top1 = (logq * math.exp(mid)).softmax(-1).max(-1).values.mean().item()
        lo, hi = (mid, hi) if top1 < r0 else (lo, mid)
    return math.exp((lo + hi) / 2)


def expected_accepted(shape: TreeShape, r: list[float]) -> float:
    """Sum over nodes of the product of r[rank] along the path: expected accepted drafts per step."""
    value, total = {}, 0.0
    for path in shape.paths:
        v = (value[path[:-1]] if len(path) > 1 else 1.0) * (r[path[-1]] if path[-1] < len(r) else 0.0)
        value[path] = v
        total += v
    return total


def best_trees(r: list[float], sizes, max_depth: int) -> dict[int, tuple[float, TreeShape]]:
    """For each n in sizes, the tree of n nodes, at most max_depth deep, with the most expected
    accepted drafts, and that expectation."""

    @functools.cache
    def h(j: int, m: int, d: int):
        # m nodes under one parent, as children of ranks j, j+1, ... and their subtrees, d levels left
        if m == 0:
            return 0.0, ()
        if d == 0 or j >= len(r):
            return -math.inf, None
        best = (-math.inf, None)
        for s in range(1, m + 1):                    # the rank-j child and s - 1 nodes below it
            below, rest = h(0, s - 1, d - 1), h(j + 1, m - s, d)
            if below[1] is None or rest[1] is None:
                continue
            v = r[j] * (1 + below[0]) + rest[0]
            if v > best[0]:
                best = (v, (below[1],) + rest[1])
        return best

    def walk(prefix, children, paths):
        for rank, sub in enumerate(children):
            paths.append(prefix + (rank,))
            walk(prefix + (rank,), sub, paths)
        return paths

    out = {}
    for n in sizes:
        value, kids = h(0, n, max_depth)
        out[n] = (value, TreeShape.of_paths(walk((), kids, []), f"best tree of {n}"))
    return out


def step_ms(shape: TreeShape, target_ms: dict, draft_ms: dict) -> float:
    """One step's passes: the draft catches up and drafts each level but the last, the target runs
    the pending token and every node."""
    widths = [len(lvl) for lvl in shape.levels[:-1]]
    return draft_ms[1] + sum(draft_ms[w] for w in widths) + target_ms[shape.n + 1]


def plot(path: str, ks, target_ms: dict, draft_ms: dict, fit: pd.DataFrame, temps) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(ks, [target_ms[k] for k in ks], marker=".", label="target")
    axes[0].plot(ks, [draft_ms[k] for k in ks], marker=".", label="draft")
    axes[0].set_xlabel("tokens in the pass (batch 1)")
    axes[0].set_ylabel("ms per forward pass")
    for t in temps:
        part = fit[fit.temperature == t]
        axes[1].plot(part.n, part.tokens_per_call, marker=".", label=f"best tree, temperature {t:g}")
        axes[2].plot(part.n, part.predicted_speedup, marker=".", label=f"best tree, temperature {t:g}")
    axes[1].set_ylabel("expected tokens per target call")
    axes[2].set_ylabel("predicted speedup over AR")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.set_xlabel("draft tokens per step (tree nodes)")
    save_figure(fig, path)


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    add_bench_args(ap)
    ap.add_argument("--max_tokens", type=int, default=32, help="length of each continuation the target writes")
    ap.add_argument("--temperatures", default="0,1", help="comma list; 0 is greedy")
    ap.add_argument("--ranks", type=int, default=16, help="candidates per node the acceptance is measured for")
    ap.add_argument("--trials", type=int, default=32, help="sampling: simulated draws per position")
    ap.add_argument("--sizes", default="4,8,16,32,64", help="comma list of tree sizes n to fit")
    ap.add_argument("--max_depth", type=int, default=10, help="deepest tree the fit considers")
    ap.add_argument("--shapes", default="", help="trees separated by ';' whose expected acceptance is written too")
    ap.add_argument("--seed", type=int, default=0, help="seeds the continuations and the simulation")
    ap.add_argument("--out", required=True, help="folder for ranks.csv, costs.csv, fit.csv, expected.csv")
    args = ap.parse_args(argv)
    temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_NODES:
        raise ValueError(f"--sizes must be between 1 and {MAX_NODES}, got {args.sizes!r}")
    if min(temps, default=-1) < 0 or args.ranks < 1 or args.trials < 1 or args.max_depth < 1:
        raise ValueError("--temperatures must be >= 0; --ranks, --trials and --max_depth >= 1")
    shapes = [parse_tree(s) for s in args.shapes.split(";") if s.strip()]
    for s in shapes:
        if not isinstance(s, TreeShape):
            print(f"note: {s} changes every step; it has no expected length of its own (left out of expected.csv)")
    if os.path.exists(os.path.join(args.out, "fit.csv")) and not args.overwrite:
        raise ValueError(f"{args.out}/fit.csv exists; pass --overwrite to replace it, or another --out")
    data = prepare(args, ["tree"], ["model"])
    gen = torch.Generator().manual_seed(args.seed)

    # 1. positional acceptance per temperature
    ranks, calib = {}, []
    for t in temps:
        counts, qs = torch.zeros(args.ranks), []
        for i, prompt in enumerate(data.prompts):
            p, q, _ = position_laws(data.target, data.draft, prompt, args.max_tokens, t, data.vocab, args.seed + i)
            counts += greedy_ranks(p, q, args.ranks) if t == 0 else sampled_ranks(p, q, args.ranks, args.trials, gen)
            qs.append(q)
        q = torch.cat(qs)                                                           # [positions, V]
        ranks[t] = (counts / len(q)).tolist()
        calib.append(dict(temperature=t, mean_top1_q=q.max(-1).values.mean().item(), r0=ranks[t][0],
                          sharpen=calibrate(q, ranks[t][0])))
        print(f"temperature {t:g}: r = " + " ".join(f"{x:.3f}" for x in ranks[t][:8]) +
              f"; the draft's top-1 q averages {calib[-1]['mean_top1_q']:.3f}: dynamic trees rank best with "
              f"sharpen S = {calib[-1]['sharpen']:.2f} (dynamic:N:D:K:S)", flush=True)

    # 2. measured pass costs, batch 1, at the prompts' median length plus half a continuation
    prefix = sorted(map(len, data.prompts))[len(data.prompts) // 2] + args.max_tokens // 2
    ks = list(range(1, max([*sizes] + [s.n for s in shapes if isinstance(s, TreeShape)]) + 2))
    target_ms = {k: pass_times(data.target, 1, prefix, k, args.repeats, gen, ways=("tree",))["tree_ms"] for k in ks}
    draft_ms = {k: pass_times(data.draft, 1, prefix, k, args.repeats, gen, ways=("tree",))["tree_ms"] for k in ks}

    # 3. the best tree for each size, and the size with the best predicted speedup
    fit = []
    for t in temps:
        for n, (value, shape) in best_trees(ranks[t], range(1, max(sizes) + 1), args.max_depth).items():
            fit.append(dict(temperature=t, n=n, depth=shape.depth, expected_accepted=value,
                            tokens_per_call=1 + value, step_ms=step_ms(shape, target_ms, draft_ms),
                            tree=str(shape)))
            fit[-1]["predicted_speedup"] = fit[-1]["tokens_per_call"] * target_ms[1] / fit[-1]["step_ms"]
    fit = pd.DataFrame(fit)
    expected = []
    for s in shapes:
        for t in temps if isinstance(s, TreeShape) else ():
            e = expected_accepted(s, ranks[t])
            expected.append(dict(tree=str(s), n=s.n, temperature=t, expected_accepted=e, tokens_per_call=1 + e,
                                 predicted_speedup=(1 + e) * target_ms[1] / step_ms(s, target_ms, draft_ms)))
    expected = pd.DataFrame(expected)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "ranks.csv"),
              pd.DataFrame({"rank": range(args.ranks), **{f"r_t{t:g}": ranks[t] for t in temps}}))
    write_csv(os.path.join(args.out, "costs.csv"),
              pd.DataFrame({"tokens": ks, "target_ms": [target_ms[k] for k in ks],
                            "draft_ms": [draft_ms[k] for k in ks]}))
    write_csv(os.path.join(args.out, "fit.csv"), fit[fit.n.isin(sizes)])
    write_csv(os.path.join(args.out, "expected.csv"), expected)
    write_csv(os.path.join(args.out, "calibration.csv"), pd.DataFrame(calib))
    write_json(os.path.join(args.out, "env.json"), dict(env_info(), prefix=prefix, prompts=len(data.prompts)))
    plot(os.path.join(args.out, "fit.png"), ks, target_ms, draft_ms, fit, temps)
    for t in temps:
        part = fit[fit.temperature == t]
        top = part.loc[part.predicted_speedup.idxmax()]
        print(f"temperature {t:g}: best predicted n={top.n} depth={top.depth} tokens/call {top.tokens_per_call:.2f} "
              f"speedup {top.predicted_speedup:.2f}x: {top.tree}")
        for n in sizes:
            row = part[part.n == n].iloc[0]
            print(f"  n={n}: tokens/call {row.tokens_per_call:.2f}, predicted {row.predicted_speedup:.2f}x, {row.tree}")
    print(f"wrote {args.out}/ranks.csv, costs.csv, fit.csv, expected.csv, calibration.csv, fit.png")


if __name__ == "__main__":
    run(main)
