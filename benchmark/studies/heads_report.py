"""The drafter comparison of results/heads: draft cost, acceptance per draft position, tokens per
target call and speedup for every drafter (draft model, MLP speculator, Medusa heads, n-gram), from
run_experiment sweeps, plus the measured cost of one draft step of each drafter.

    python -m benchmark.studies.heads_report --runs results/heads/t0,results/heads/t1 --out results/heads

Per-position acceptance r_j = P(a step accepts >= j drafts | it accepted >= j - 1), from the
accepted-length histograms of the raw rows (chains and trees alike: a tree's j is the depth of
its accepted path). The draft cost is measured here, interleaved with a one-token target step
and a (gamma + 1)-token verify pass, medians of ``--reps`` after two warm-up rounds.
"""
from __future__ import annotations

import os
import statistics

import pandas as pd
import torch

from sampling.app.cli import Parser, add_model_args, load_pair, run
from sampling.cache.spec import CacheSpec
from sampling.drafters import build_drafter
from sampling.params import SamplingParams
from sampling.utils import now
from sampling.verify.chain import ChainVerifier

from ..analyzer import _save
from ..metrics import summarise, upgrade_raw
from ..utils_io import write_csv, write_text


@torch.inference_mode()
def draft_costs(target, drafters: dict, vocab, g: int, prompt_len: int = 64, reps: int = 15) -> pd.DataFrame:
    """Median ms of one propose of g tokens by each drafter at batch 1 (mid-generation: the pending
    bonus token first, so a draft model runs g passes), beside the target's one-token step and
    (g + 1)-token verify pass, all on the same random prompt."""
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    V = target.get_output_embeddings().weight.shape[0] if vocab is None else vocab
    dev = next(target.parameters()).device
    ids = torch.randint(3, V, (1, prompt_len), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    verifier = ChainVerifier(target, params, vocab)
    parts = {}
    for name, d in drafters.items():                     # as mid-generation: the prompt's last token is
        parts[name] = build_drafter(d, params, vocab, CacheSpec())    # the pending bonus token; heads read
        reader = ChainVerifier(target, params, vocab, hidden=parts[name].reads_target)   # the target's prefill
        parts[name].prefill(ids[:, :-1], mask[:, :-1], reader.prefill(ids[:, :-1], mask[:, :-1]))
        if hasattr(parts[name], "pending"):
            parts[name].pending = 1
    verifier.prefill(ids, mask)
    extra = torch.randint(3, V, (1, g + 1), generator=gen).to(dev)

    def target_pass(n):
        verifier.kv.catch_up(torch.cat([ids, extra[:, :n]], 1), torch.ones(1, prompt_len + n, dtype=mask.dtype,
                                                                            device=dev))
        verifier.kv.rollback(prompt_len)

    def propose(part):
        part.propose(ids, mask, g, gen)
        if hasattr(part, "kv"):                           # a draft model: back to its prefill
            part.kv.rollback(prompt_len - 1)
    jobs = {"target step (1 token)": lambda: target_pass(1), f"verify ({g + 1} tokens)": lambda: target_pass(g + 1)}
    jobs.update({f"draft {name} ({g} tokens)": (lambda p=p: propose(p)) for name, p in parts.items()})
    names, times = list(jobs), {k: [] for k in jobs}
    for rep in range(reps + 2):
        for k in [names[(i + rep) % len(names)] for i in range(len(names))]:
            t0 = now(dev)
            jobs[k]()
            times[k].append(1000 * (now(dev) - t0))
    step = statistics.median(times["target step (1 token)"][2:])
    return pd.DataFrame([dict(what=k, ms=statistics.median(v[2:]), over_target_step=statistics.median(v[2:]) / step)
                         for k, v in times.items()])


def positional_acceptance(hists: pd.Series, depth: int = 6) -> list[float]:
    """r_1..r_depth from the accepted-length histograms (space-separated counts) of raw rows; a
    batch's histogram is on each of its rows, so each batch is counted once by the caller."""
    total = [0] * (depth + 1)
    for h in hists:
        for n, c in enumerate(int(x) for x in str(h).split()):
            total[min(n, depth)] += c
    at_least = [sum(total[j:]) for j in range(depth + 1)]
    return [at_least[j] / at_least[j - 1] if at_least[j - 1] else float("nan") for j in range(1, depth + 1)]


def table(raw: pd.DataFrame, costs: pd.DataFrame | None) -> pd.DataFrame:
    summary = summarise(raw)
    rows = []
    for _, r in summary.iterrows():
        part = raw[(raw["mode"] == r["mode"]) & (raw["draft"] == r["draft"]) & (raw.gamma == r.gamma) &
                   (raw.temperature == r.temperature) & (raw.tree == r.tree)]
        pos = positional_acceptance(part.drop_duplicates("batch_id").accepted_hist, 4)
        cost = float("nan")
        if costs is not None and r["draft"]:
            hit = costs[costs.what.str.startswith(f"draft {r['draft']} ")]
            cost = float(hit.over_target_step.iloc[0]) if len(hit) else cost
        rows.append(dict(temperature=r.temperature, mode=r["mode"], draft=r["draft"] or "-",
                         shape=r.tree or ("default tree" if r["mode"] == "tree" else f"gamma {r.gamma}" if r.gamma
                                          else "-"),
                         tokens_per_s=r.throughput, speedup_vs_ar=r.speedup_vs_ar, tokens_per_call=r.tokens_per_call,
                         acceptance=r.acceptance_rate, r1=pos[0], r2=pos[1], r3=pos[2], r4=pos[3],
                         draft_cost_c=cost, samples=r.samples))
    return pd.DataFrame(rows).sort_values(["temperature", "speedup_vs_ar"], ascending=[True, False])


def plots(tab: pd.DataFrame, out: str) -> list[str]:
    import matplotlib.pyplot as plt
    written = []
    for temp, part in tab.groupby("temperature"):
        part = part.sort_values("speedup_vs_ar")
        labels = [f"{m} {d} {s}".replace(" - ", " ").replace("- ", "") for m, d, s in
                  zip(part["mode"], part.draft, part["shape"])]
        fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(part) + 1.5))
        axes[0].barh(labels, part.speedup_vs_ar, color="tab:blue")
        axes[0].axvline(1, color="gray", lw=0.8)
        axes[0].set_xlabel("speedup over AR (tokens/s ratio, same run)")
        axes[1].barh(labels, part.tokens_per_call, color="tab:green")
        axes[1].set_xlabel("tokens per target call")
        axes[1].set_yticklabels([])
        fig.suptitle(f"drafters at batch 1, temperature {temp:g}, embedded pair, Dolly prompts")
        path = os.path.join(out, f"speedup_t{temp:g}.png")
        _save(fig, path)
        written.append(path)
        spec = part[part.draft != "-"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for _, r in spec.iterrows():
            ax.plot([1, 2, 3, 4], [r.r1, r.r2, r.r3, r.r4], marker="o", label=f"{r['mode']} {r.draft} {r['shape']}")
        ax.set_xlabel("draft position j (tree: depth)")
        ax.set_ylabel("P(accept j | accepted j - 1)")
        ax.set_xticks([1, 2, 3, 4])
        ax.legend(fontsize=7)
        ax.set_title(f"acceptance per draft position, temperature {temp:g}")
        path = os.path.join(out, f"position_acceptance_t{temp:g}.png")
        _save(fig, path)
        written.append(path)
    return written


def markdown(tab: pd.DataFrame) -> str:
    def f(x, fmt):
        return "" if x != x else format(x, fmt)
    lines = []
    for temp, part in tab.groupby("temperature"):
        lines += [f"\n**temperature {temp:g}**\n",
                  "| mode | drafter | draft length / tree | tokens/s | speedup vs AR | tokens / target call "
                  "| acceptance | r1 | r2 | r3 | r4 | draft cost c (x target step) |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for _, r in part.iterrows():
            lines.append(f"| {r['mode']} | {r.draft} | {r['shape']} | {r.tokens_per_s:.1f} | "
                         f"{f(r.speedup_vs_ar, '.2f')}x"
                         f" | {f(r.tokens_per_call, '.2f')} | {f(r.acceptance, '.3f')} | {f(r.r1, '.2f')} |"
                         f" {f(r.r2, '.2f')} | {f(r.r3, '.2f')} | {f(r.r4, '.2f')} | {f(r.draft_cost_c, '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, many_drafts=True)
    ap.add_argument("--runs", required=True, help="comma list of run_experiment folders (raw.csv in each)")
    ap.add_argument("--out", required=True, help="folder for table.md, table.csv, costs.csv and the plots")
    ap.add_argument("--gamma", type=int, default=4, help="draft tokens per step for the cost measurement")
    ap.add_argument("--reps", type=int, default=15, help="timed rounds of the cost measurement")
    ap.add_argument("--overwrite", action="store_true", help="replace table.md and costs.csv in --out")
    args = ap.parse_args(argv)
    from sampling.app.cli import check_speculator_flag, parse_drafts
    drafts = parse_drafts(args.draft, many=True)
    check_speculator_flag(args.speculator, drafts)
    if os.path.exists(os.path.join(args.out, "table.md")) and not args.overwrite:
        raise ValueError(f"{args.out}/table.md exists; pass --overwrite to replace it")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for r in runs:
        if not os.path.isfile(os.path.join(r, "raw.csv")):
            raise ValueError(f"--runs: {r}/raw.csv does not exist")
    raw = pd.concat([upgrade_raw(pd.read_csv(os.path.join(r, "raw.csv"), keep_default_na=False, na_values=[""]))
                     for r in runs], ignore_index=True)
    target, loaded, _, vocab = load_pair(args, drafts=drafts)
    costs = draft_costs(target, loaded, vocab, args.gamma, reps=args.reps)
    tab = table(raw, costs)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "costs.csv"), costs)
    write_csv(os.path.join(args.out, "table.csv"), tab)
    write_text(os.path.join(args.out, "table.md"), markdown(tab))
    print(costs.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(markdown(tab))
    print(f"wrote {args.out}/table.md, table.csv, costs.csv and {len(plots(tab, args.out))} plots")


if __name__ == "__main__":
    run(main)
