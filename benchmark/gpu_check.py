"""One GPU check, in at most about 6 minutes: exactness of every mode on the device, the warmed-up
speed table at batch 1, 8 and 32 for both KV caches (and the compiled static cache), the printed
speedups of main.py and eval_dolly.py against that table, and the cost curve, all in one folder.

    python -m benchmark.gpu_check --dataset_path ../shared/dolly/dolly-sample.jsonl --out results/gpu/check

On a machine without CUDA it runs the same steps on the CPU (``--device cpu``, smaller by
``--quick``), which is how its logic is tested. Each step writes its files before the next starts;
a step that would pass ``--budget_s`` is skipped and said so in ``steps.csv``.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import time

import pandas as pd
import torch

from sampling import generate, pad_left
from sampling.cli import Parser, add_model_args, load_pair, run

from .utils_io import env_info, write_csv, write_json, write_text

MODES = {                         # name: generate() keywords; every mode and both caches
    "ar": dict(mode="ar"), "google": dict(mode="google"), "deepmind": dict(mode="deepmind"),
    "bass": dict(mode="bass"), "bass-mask": dict(mode="bass", finished_rows="mask"),
    "tree": dict(mode="tree", tree="4,2,1,1"), "tree-dynamic": dict(mode="tree"),
}


def exactness(args, out: str) -> pd.DataFrame:
    """Greedy tokens of every mode and cache on the device against greedy AR on the same device."""
    target, drafts, tok, vocab = load_pair(args, drafts=["model"])
    draft = drafts["model"]
    from .runner import encode_records
    from .utils_io import load_dolly
    prompts, _ = encode_records(load_dolly(args.dataset_path), tok, None, args.max_tokens)
    ids, mask = pad_left(prompts[:args.exact_prompts], tok.pad_token_id, next(target.parameters()).device)
    kw = dict(draft_model=draft, max_new_tokens=args.max_tokens, temperature=0, vocab_size=vocab,
              eos_token_id=tok.eos_token_id)
    ref = generate(target, ids, mask, mode="ar", **kw).tokens
    rows = []
    for name, mkw in MODES.items():
        for kv in ("dynamic", "static"):
            res = generate(target, ids, mask, kv_cache=kv, **mkw, **kw)
            same = sum(a == b for a, b in zip(res.tokens, ref))
            rows.append(dict(mode=name, kv_cache=kv, compile=False, prompts=len(ref), equal_to_ar=same,
                             tokens_per_call=res.stats["mean_accepted_tokens"]))
    df = pd.DataFrame(rows)
    write_csv(os.path.join(out, "exactness.csv"), df)
    return df


def quiet(module: str, argv: list[str]) -> str:
    """Run a tool's main (``module.main(argv)``), keeping what it prints (returned)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        importlib.import_module(module).main(argv)
    return buf.getvalue()


def main(argv=None) -> None:
    args = parse(argv)
    t_start = time.monotonic()
    os.makedirs(args.out)
    write_json(os.path.join(args.out, "env.json"), dict(env_info(), argv=argv))
    models = ["--device", args.device, "--dtype", args.dtype] + \
        [x for flag in ("target_model_name", "approx_model_name") if getattr(args, flag)
         for x in ("--" + flag, getattr(args, flag))]
    common = models + ["--dataset_path", args.dataset_path, "--max_tokens", str(args.max_tokens)]
    batches = "1,8" if args.quick else "1,8,32"
    samples = str(8 if args.quick else 16)
    steps = [
        ("exactness", lambda: exactness(args, args.out)),
        ("speed", lambda: quiet("benchmark.run_experiment", common + [
            "--samples", samples, "--modes", "ar,google,bass,tree", "--batch_sizes", batches,
            "--kv_cache", "dynamic,static", "--temperatures", "0", "--repeats", "3",
            "--out", os.path.join(args.out, "speed")])),
        ("main.py", lambda: write_text(os.path.join(args.out, "main-compare.json"), quiet(
            "main", models + ["--input", "The quick brown fox", "--compare", "--temperature", "0",
                              "--max_tokens", str(args.max_tokens), "--json"]))),
        ("eval_dolly.py", lambda: quiet("eval_dolly", common + [
            "--samples", samples, "--modes", "ar,google,deepmind,bass", "--batch", "8", "--temperature", "0",
            "--out", os.path.join(args.out, "eval_dolly")])),
        ("cost_model", lambda: quiet("benchmark.cost_model", models + [
            "--raw", os.path.join(args.out, "speed", "raw.csv"), "--batches", batches, "--reps", "3",
            "--out", os.path.join(args.out, "cost_model")])),
        ("speed-compiled", lambda: quiet("benchmark.run_experiment", common + [
            "--samples", "8", "--modes", "ar,google", "--batch_sizes", "1", "--kv_cache", "static", "--compile",
            "--temperatures", "0", "--repeats", "3", "--out", os.path.join(args.out, "speed-compiled")])),
    ]
    log = []
    for name, fn in steps:
        if not args.compile and name == "speed-compiled":
            log.append(dict(step=name, status="skipped (--no_compile)", seconds=0.0))
            continue
        spent = time.monotonic() - t_start
        if spent > args.budget_s:
            log.append(dict(step=name, status=f"skipped: {spent:.0f} s spent of {args.budget_s}", seconds=0.0))
            continue
        t0 = time.monotonic()
        try:
            fn()
            status = "done"
        except Exception as e:             # one failed step must not lose the others' files
            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.append(dict(step=name, status=status, seconds=round(time.monotonic() - t0, 1)))
        write_csv(os.path.join(args.out, "steps.csv"), pd.DataFrame(log))
        print(f"{name}: {status} ({log[-1]['seconds']} s)", flush=True)
    write_csv(os.path.join(args.out, "steps.csv"), pd.DataFrame(log))
    agreement(args.out)
    compiled_exactness(args.out)


def agreement(out: str) -> None:
    """Each tool's printed speedup beside the warmed-up, interleaved sweep's, same mode and batch."""
    summary = os.path.join(out, "speed", "summary.csv")
    if not os.path.exists(summary):
        return
    s = pd.read_csv(summary)
    s = s[s.kv_cache == "dynamic"].set_index(["mode", "batch"])["speedup_vs_ar"]
    rows = []
    path = os.path.join(out, "main-compare.json")
    if os.path.exists(path):
        runs = json.loads(open(path).read())
        for mode, r in runs.items():
            tool = r["stats"]["tokens_per_s"] / runs["ar"]["stats"]["tokens_per_s"]
            rows.append(dict(tool="main.py --compare", mode=mode, batch=1, tool_speedup=tool,
                             sweep_speedup=s.get((mode, 1), float("nan"))))
    path = os.path.join(out, "eval_dolly", "summary.csv")
    if os.path.exists(path):
        e = pd.read_csv(path)
        for _, r in e.iterrows():
            rows.append(dict(tool="eval_dolly.py", mode=r["mode"], batch=r["batch"], tool_speedup=r["speedup_vs_ar"],
                             sweep_speedup=s.get((r["mode"], r["batch"]), float("nan"))))
    if rows:
        df = pd.DataFrame(rows)
        df["ratio"] = df.tool_speedup / df.sweep_speedup
        write_csv(os.path.join(out, "agreement.csv"), df)


def compiled_exactness(out: str) -> None:
    """The compiled static cache's greedy tokens against the dynamic cache's, prompt by prompt."""
    paths = [os.path.join(out, d, "raw.csv") for d in ("speed", "speed-compiled")]
    if not all(map(os.path.exists, paths)):
        return
    ref, comp = (pd.read_csv(p, keep_default_na=False) for p in paths)
    ref = ref[(ref.kv_cache == "dynamic") & (ref.batch == 1)].set_index(["mode", "sample"]).tokens
    rows = [dict(mode=m, sample=s, equal=t == ref.get((m, s)))
            for m, s, t in zip(comp["mode"], comp["sample"], comp.tokens)]
    write_csv(os.path.join(out, "exactness_compiled.csv"), pd.DataFrame(rows))


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--dataset_path", required=True, help="Dolly-format jsonl (../shared/dolly/dolly-sample.jsonl)")
    ap.add_argument("--max_tokens", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--exact_prompts", type=int, default=8, help="prompts in the exactness check")
    ap.add_argument("--no_compile", dest="compile", action="store_false",
                    help="leave out the compiled static cache (its first passes compile for minutes on a CPU)")
    ap.add_argument("--quick", action="store_true", help="8 prompts, batches 1 and 8: for the CPU")
    ap.add_argument("--budget_s", type=float, default=330.0, help="skip the steps that would start after this")
    ap.add_argument("--out", required=True, help="output folder (must not exist)")
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out} exists: choose a new folder")
    if not os.path.isfile(args.dataset_path):
        raise ValueError(f"--dataset_path {args.dataset_path}: no such file")
    if args.max_tokens < 1 or args.exact_prompts < 1:
        raise ValueError("--max_tokens and --exact_prompts must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (use --device cpu --quick to try the steps)")
    return args


if __name__ == "__main__":
    run(main)
