"""Profile speculative steps with cProfile: where a step's time goes, model work against the rest.

    python -m benchmark.profile_step --dataset_path ../shared/dolly/dolly-sample.jsonl --draft mlp \\
        --mode google --samples 8 --out results/heads/profile_mlp.txt

Each prompt runs once untimed (warm-up), then once under cProfile. The summary splits the
profiled time into the prefills, the target's verify passes, the drafter's propose (its own model
passes or heads inside it), the accept/reject rule, the caches' bookkeeping (commit), and the rest
of the loop; then cProfile's top functions by cumulative time. ``--both_caches`` profiles the
dynamic and the static KV cache, prompt by prompt in alternating order with a profiler each, so
that a machine that drifts slows both alike (absolute times of separate runs differ by tens of
percent on a noisy machine).
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats

import torch

from sampling import generate
from sampling.app.cli import (
    Parser,
    add_model_args,
    add_sampling_args,
    check_mode_draft,
    check_speculator_flag,
    generate_kwargs,
    needs_draft,
    parse_drafts,
    run,
)
from sampling.modes import MODES_TABLE

from .runner import prepare
from .utils_io import write_text

# phase -> the functions whose cumulative time it is (file suffix, function name)
DRAFTERS = ("drafters/model.py", "drafters/tree.py", "drafters/heads.py", "drafters/ngram.py")
VERIFIERS = ("verify/chain.py", "verify/tree.py")
PHASES = {
    "prefill (target and drafter)": [(f, "prefill") for f in VERIFIERS + DRAFTERS],
    "target verify pass": [(f, "verify") for f in VERIFIERS],                  # less the rule, below
    "drafter propose": [(f, "propose") for f in DRAFTERS],
    "accept / reject rule": [("verify/rules.py", "accept_reject"), ("verify/rules.py", "tree_accept")],
    "commit (caches keep what was accepted)": [(f, "commit") for f in VERIFIERS + DRAFTERS],
    "rows: hand out tokens, finished rows": [("rows.py", "hand_out"), ("rows.py", "drop_finished"),
                                             ("rows.py", "done_mask")],
}


def phase_times(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each phase's functions (a phase's functions never call each other)."""
    out = {k: 0.0 for k in PHASES}
    for (path, _, name), (_, _, _, cum, _) in stats.stats.items():
        for phase, funcs in PHASES.items():
            if any(path.endswith(f) and name == n for f, n in funcs):
                out[phase] += cum
    out["target verify pass"] -= out["accept / reject rule"]        # verify calls the rule
    return out


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--dataset_path", default=None, help="local Dolly-format jsonl (default: the hub dataset)")
    ap.add_argument("--skip_bad_lines", action="store_true", help="skip malformed lines instead of stopping")
    ap.add_argument("--samples", type=int, default=8, help="prompts profiled, from the top of the file")
    ap.add_argument("--mode", default="google", help="speculative mode, with --draft's drafter",
                    choices=[m for m, spec in MODES_TABLE.items() if spec.speculative and needs_draft(m)])
    add_sampling_args(ap)
    ap.add_argument("--top", type=int, default=25, help="cProfile functions listed")
    ap.add_argument("--both_caches", action="store_true",
                    help="profile the dynamic and the static KV cache side by side, interleaved prompt by prompt "
                         "(--kv_cache is then ignored)")
    ap.add_argument("--out", default=None, help="text file for the summary (refused if it exists)")
    args = ap.parse_args(argv)
    if args.samples <= 0:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.out and os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; remove it or pick another --out")
    drafts = parse_drafts(args.draft)
    check_speculator_flag(args.speculator, drafts)
    check_mode_draft(args.mode, drafts[0])
    data = prepare(args, [args.mode], drafts)
    draft = data.drafts[drafts[0]]
    kw = generate_kwargs(args, data.tokenizer, data.vocab)
    kw["seed"] = 0 if kw["seed"] is None else kw["seed"]
    prompts = [torch.tensor([p], device=next(data.target.parameters()).device) for p in data.prompts]
    caches = ["dynamic", "static"] if args.both_caches else [args.kv_cache]
    for ids in prompts:                                                  # warm-up, not profiled
        for kv in caches:
            generate(data.target, ids, draft_model=draft, mode=args.mode, **dict(kw, kv_cache=kv))
    profs, stats_all = {kv: cProfile.Profile() for kv in caches}, {kv: [] for kv in caches}
    for i, ids in enumerate(prompts):
        for kv in caches[i % len(caches):] + caches[:i % len(caches)]:   # the order alternates
            profs[kv].enable()
            stats_all[kv].append(generate(data.target, ids, draft_model=draft, mode=args.mode,
                                          **dict(kw, kv_cache=kv)).stats)
            profs[kv].disable()
    lines = []
    for kv in caches:
        lines += summary(profs[kv], stats_all[kv], args, drafts[0], kv, len(prompts)) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text(args.out, text)


def summary(prof, stats_all: list[dict], args, draft: str, kv: str, n: int) -> list[str]:
    """The phase table and the top functions of one configuration's profile."""
    stream = io.StringIO()
    st = pstats.Stats(prof, stream=stream)
    total = sum(s["wall_time_s"] for s in stats_all)
    tokens = sum(s["new_tokens"] for s in stats_all)
    calls = sum(s["target_calls"] for s in stats_all)
    lines = [f"# profile: --draft {draft} --mode {args.mode} --kv_cache {kv}, temperature {args.temperature}, "
             f"{n} Dolly prompts, {args.max_tokens} new tokens each",
             f"generate wall time (under cProfile, which slows Python-heavy code): {total:.3f} s, {tokens} tokens, "
             f"{calls} target passes, {tokens / max(1, calls):.2f} tokens per pass",
             "", "| phase | seconds | share of generate |", "|---|---:|---:|"]
    times = phase_times(st)
    for phase, sec in times.items():
        lines.append(f"| {phase} | {sec:.3f} | {sec / total:.1%} |")
    rest = total - sum(times.values())
    lines += [f"| the loop's own work (the rest) | {rest:.3f} | {rest / total:.1%} |", "",
              f"cProfile, top {args.top} by cumulative time:", "```"]
    st.sort_stats("cumulative").print_stats(args.top)
    body = [ln for ln in stream.getvalue().splitlines() if ln.strip()]
    return lines + body[body.index(next(ln for ln in body if "ncalls" in ln)):] + ["```"]


if __name__ == "__main__":
    run(main)
