"""One GPU check: exactness of every mode with both KV caches on the device, the warmed-up eager
speed table (dynamic cache) at batch 1 (8 prompts) and at batch 8 and 32 (32 prompts), each mode
with the draft model and with the embedded MLP speculator's heads, the host's work per decode step
(``benchmark.host_cost`` on the embedded pair: operators and syncs outside the models) and the
launch-bound model fitted on the batch-1 sweep (``benchmark.launch_model``), the eager static cache
beside the dynamic one at batch 8 (AR, BASS and the tree with the heads), the compiled static
cache beside the eager one (AR and the heads' tree), the printed speedups of main.py and
eval_dolly.py against the same ratios in a sweep of their configurations (batch sizes interleaved
too, so that eval_dolly's google at batch 1 against AR at batch 8 is one run's ratio), the cost
curve and the predictions for big targets, and last how much of a decode the device is busy
(``device_busy.csv``, torch.profiler), eager and compiled, all in one folder.

    python -m benchmark.gpu_check --dataset_path ../shared/dolly/dolly-sample.jsonl --out results/gpu/check

Sized from two runs on an H200 (results/gpu/README.md): eager decode there is host-bound (an AR
step of the embedded pair costs 6 to 8 ms) and the whole check took 11 minutes in 2026-11's second
run (the compiled step 2.7 of them, mostly compiling), so the steps run in order of importance, a
step that would start after ``--budget_s`` is skipped and said so in ``steps.csv``, each step
writes its files (and the agreement table) before the next starts, and ``--continue_from`` finishes
a cut run in a second call. On a machine without CUDA it runs the same steps on the CPU
(``--device cpu``, smaller by ``--quick``), which is how its logic is tested.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import time
import traceback

import pandas as pd
import torch

from sampling import generate, pad_left
from sampling.app.cli import Parser, add_model_args, check_at_least_one, load_pair, run

from .utils_io import env_info, write_csv, write_json, write_text

DEFAULT_PREDICT = "llama-7b:llama-160m,llama-70b:llama-7b:8"   # 70B does not fit one GPU: 0 and 8 layers
MODES = {                         # name: generate() keywords; every mode and both caches
    "ar": dict(mode="ar"), "google": dict(mode="google"), "deepmind": dict(mode="deepmind"),
    "bass": dict(mode="bass"), "bass-mask": dict(mode="bass", finished_rows="mask"),
    "tree": dict(mode="tree", tree="4,2,1,1"), "tree-dynamic": dict(mode="tree"),
}


def exactness(args, out: str) -> pd.DataFrame:
    """Greedy tokens of every mode and cache on the device against greedy AR on the same device, in
    ``--exact_dtype`` (float32: in float16 a verify pass and a one-token step round differently, and
    a near tie can flip). A configuration that raises is a row with its error, not a lost step."""
    exact = argparse.Namespace(**{**vars(args), "dtype": args.exact_dtype})
    target, drafts, tok, vocab = load_pair(exact, drafts=["model"])
    modes = dict(MODES)
    if args.target_model_name is None:             # the embedded target: its cascade drafts are embedded too
        from sampling.app.models import load_cascade
        cascade, _ = load_cascade(None, tok, target, exact.device, exact.dtype)
        modes["cascade"] = dict(mode="cascade", draft_model=cascade)
    from sampling.app.dolly import load_dolly

    from .runner import encode_records
    prompts, _ = encode_records(load_dolly(args.dataset_path), tok, None, args.max_tokens)
    ids, mask = pad_left(prompts[:args.exact_prompts], tok.pad_token_id, next(target.parameters()).device)
    kw = dict(max_new_tokens=args.max_tokens, temperature=0, vocab_size=vocab, eos_token_id=tok.eos_token_id)
    ref = generate(target, ids, mask, mode="ar", **kw).tokens
    rows = []
    for name, mkw in modes.items():
        for kv in ("dynamic", "static"):
            row = dict(mode=name, kv_cache=kv, compile=False, dtype=args.exact_dtype, prompts=len(ref))
            try:
                res = generate(target, ids, mask, kv_cache=kv, **{"draft_model": drafts["model"], **mkw}, **kw)
                row.update(equal_to_ar=sum(a == b for a, b in zip(res.tokens, ref)),
                           tokens_per_call=res.stats["mean_accepted_tokens"], error="")
            except Exception as e:
                row.update(equal_to_ar=0, tokens_per_call=float("nan"), error=f"{type(e).__name__}: {e}"[:300])
                log_error(out, f"exactness {name} {kv}")
            rows.append(row)
    df = pd.DataFrame(rows)
    write_csv(os.path.join(out, "exactness.csv"), df)
    return df


def busy_us(events) -> float:
    """Microseconds covered by the union of the events' time ranges."""
    total, end = 0.0, float("-inf")
    for a, b in sorted((e.time_range.start, e.time_range.end) for e in events):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def device_busy(args, out: str) -> pd.DataFrame:
    """How much of a decode the device works (results/gpu: eager decode on an H100 left the GPU idle
    nine tenths of the time). Per configuration, one prompt: a warm-up generation (it compiles the
    compiled path's shapes), one timed, one under torch.profiler; the device's busy time is the
    union of its kernels' and copies' intervals, set against the profiled run's wall time (the
    profiler slows the host, so the fraction is a lower bound), with the number of device events.
    On a CPU the device columns are empty; the step then checks only its own logic."""
    from torch.profiler import ProfilerActivity, profile
    target, drafts, tok, vocab = load_pair(args, drafts=["model"])
    from sampling.app.dolly import load_dolly

    from .runner import encode_records
    prompts, _ = encode_records(load_dolly(args.dataset_path), tok, None, args.max_tokens)
    device = next(target.parameters()).device
    ids = torch.tensor([prompts[0]], device=device)
    cuda = device.type == "cuda"
    configs = [("ar", "dynamic", False), ("google", "dynamic", False), ("tree", "dynamic", False),
               ("ar", "static", True), ("google", "static", True)][:5 if args.compile else 3]
    rows = []
    for mode, kv, comp in configs:
        kw = dict(mode=mode, draft_model=drafts["model"], max_new_tokens=args.max_tokens, temperature=0,
                  vocab_size=vocab, eos_token_id=tok.eos_token_id, kv_cache=kv, compile=comp)
        generate(target, ids, **kw)                                       # warm-up: shapes, plans, graphs
        wall = generate(target, ids, **kw).stats["wall_time_s"]
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            res = generate(target, ids, **kw)
        dev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        profiled = res.stats["wall_time_s"]
        rows.append(dict(mode=mode, kv_cache=kv, compile=comp, new_tokens=res.stats["new_tokens"],
                         target_calls=res.stats["target_calls"], wall_ms=1000 * wall, profiled_wall_ms=1000 * profiled,
                         device_busy_ms=busy_us(dev) / 1000 if cuda else float("nan"),
                         busy_fraction=busy_us(dev) / 1e6 / profiled if cuda else float("nan"),
                         device_events=len(dev), host_ops=sum(e.device_type == torch.autograd.DeviceType.CPU
                                                              for e in prof.events())))
        write_csv(os.path.join(out, "device_busy.csv"), pd.DataFrame(rows))   # after each: a cut run keeps them
    return pd.DataFrame(rows)


def log_error(out: str, what: str) -> None:
    """The whole traceback of the exception being handled, appended to errors.txt."""
    with open(os.path.join(out, "errors.txt"), "a") as f:
        f.write(f"--- {what}\n{traceback.format_exc()}\n")


def quiet(module: str, argv: list[str]) -> str:
    """Run a tool's main (``module.main(argv)``), keeping what it prints (returned)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        importlib.import_module(module).main(argv)
    return buf.getvalue()


def main(argv=None) -> None:
    args = parse(argv)
    t_start = time.monotonic()
    done = {}                                       # steps an earlier, cut run finished: name -> seconds
    if args.continue_from:
        shutil.copytree(args.continue_from, args.out)
        prev = os.path.join(args.continue_from, "steps.csv")
        if os.path.exists(prev):
            done = {r.step: r.seconds for r in pd.read_csv(prev, keep_default_na=False).itertuples()
                    if r.status.startswith("done")}
    else:
        os.makedirs(args.out)
    write_json(os.path.join(args.out, "env.json"), dict(env_info(), argv=argv))
    models = ["--device", args.device, "--dtype", args.dtype] + \
        [x for flag in ("target_model_name", "approx_model_name") if getattr(args, flag)
         for x in ("--" + flag, getattr(args, flag))]
    common = models + ["--dataset_path", args.dataset_path, "--max_tokens", str(args.max_tokens)]
    batched = "8" if args.quick else "8,32"
    samples = "8" if args.quick else "32"           # a full batch of 32
    from sampling.app.dolly import load_dolly, render_prompt
    inputs = [x for rec in load_dolly(args.dataset_path)[:args.main_prompts] for x in ("--input", render_prompt(rec))]
    raw_all = os.path.join(args.out, "speed-raw.csv")          # both sweeps' rows: the cost model's acceptance

    heads = args.target_model_name is None          # the embedded heads read the embedded target only
    drafters = "model,mlp" if heads else "model"

    def sweep(folder: str, n: str, modes: str, batch_sizes: str):
        quiet("benchmark.run_experiment", common + [
            "--samples", n, "--modes", modes, "--draft", drafters, "--batch_sizes", batch_sizes,
            "--kv_cache", "dynamic", "--temperatures", "0", "--repeats", "3", "--out", folder])
        parts = [os.path.join(args.out, d, "raw.csv") for d in SWEEPS]
        write_csv(raw_all, pd.concat([pd.read_csv(p, keep_default_na=False, na_values=[""])
                                      for p in parts if os.path.exists(p)], ignore_index=True))

    def cost(folder: str, extra: list[str]):
        quiet("benchmark.cost_model", models + ["--raw", raw_all, "--batches", "1," + batched, "--reps", "3",
                                                "--out", folder, *extra])

    steps = [     # (name, its folder or None, run(the folder's path)): by importance, a cut run keeps the first
        ("exactness", None, lambda _: exactness(args, args.out)),
        ("speed-b1", "speed-b1", lambda d: sweep(d, str(args.b1_prompts), "ar,google,tree", "1")),
        ("speed-batched", "speed-batched", lambda d: sweep(d, samples, "ar,bass,tree", batched)),
        ("host_cost", "host_cost", lambda d: quiet("benchmark.host_cost", [
            "--device", args.device, "--configs", HOST_CONFIGS, "--hidden", "16" if args.quick else "0",
            "--repeats", "1", "--max_tokens", str(args.max_tokens), "--out", d])),   # counts matter here, not time
        ("launch_model", "launch_model", lambda d: launch(args.out, d)),
        # both caches side by side at batch 8 (the static one moves a tree's path with one gather)
        ("speed-static", "speed-static", lambda d: quiet("benchmark.run_experiment", common + [
            "--samples", str(args.b1_prompts), "--modes", "ar,bass,tree", "--draft", "mlp" if heads else "model",
            "--batch_sizes", "8", "--kv_cache", "dynamic,static", "--temperatures", "0", "--repeats", "3",
            "--out", d])),
        ("speed-compiled", "speed-compiled", lambda d: quiet("benchmark.run_experiment", common + [
            "--samples", str(args.b1_prompts), "--batch_sizes", "1", "--kv_cache", "dynamic,static", "--compile",
            "--temperatures", "0", "--repeats", "3", "--out", d,
            # eager beside compiled: AR and the heads' tree (AR and google where the heads cannot read the target)
            *(("--modes", "ar,tree", "--draft", "mlp") if heads else ("--modes", "ar,google"))])),
        # the tools' configurations side by side, batch sizes too: the agreement's references
        ("speed-tools", "speed-tools", lambda d: quiet("benchmark.run_experiment", common + [
            "--samples", str(args.b1_prompts), "--modes", "ar,google,bass,tree", "--draft", "model",
            "--batch_sizes", "1,8", "--together", "--kv_cache", "dynamic", "--temperatures", "0", "--repeats", "3",
            "--out", d])),
        ("main.py", None, lambda _: write_text(os.path.join(args.out, "main-compare.json"), quiet(
            "main", models + inputs + ["--compare", "--temperature", "0", "--max_tokens", str(args.max_tokens),
                                       "--json"]))),
        ("eval_dolly.py", "eval_dolly", lambda d: quiet("eval_dolly", common + [
            "--samples", str(args.b1_prompts), "--modes", "ar,google,deepmind,bass", "--batch", "8",
            "--temperature", "0", "--out", d])),
        ("cost_model", "cost_model", lambda d: cost(d, [])),
    ] + [
        (f"cost_model {label(t)}", f"cost_{label(t)}", lambda d, t=t, dr=dr, k=k: cost(d, [
            "--target_config", t, "--draft_config", dr,
            "--calibration", os.path.join(args.out, "cost_model", "prediction.csv")] + (["--layers", k] if k else [])))
        for t, dr, k in args.predict
    ] + [
        ("device_busy", None, lambda _: device_busy(args, args.out)),
    ]
    log = []
    for name, folder, fn in steps:
        if name in done:
            log.append(dict(step=name, status="done (earlier run)", seconds=done[name]))
            continue
        path = os.path.join(args.out, folder) if folder else None
        if path and os.path.isdir(path):                                  # copied from a run cut inside this step
            shutil.rmtree(path)
        if not args.compile and name == "speed-compiled":
            log.append(dict(step=name, status="skipped (--no_compile)", seconds=0.0))
            continue
        spent = time.monotonic() - t_start
        if spent > args.budget_s:
            log.append(dict(step=name, status=f"skipped: {spent:.0f} s spent of {args.budget_s}", seconds=0.0))
            continue
        t0 = time.monotonic()
        try:
            fn(path)
            status = "done"
        except Exception as e:             # one failed step must not lose the others' files
            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log_error(args.out, name)
        log.append(dict(step=name, status=status, seconds=round(time.monotonic() - t0, 1)))
        write_csv(os.path.join(args.out, "steps.csv"), pd.DataFrame(log))
        agreement(args.out, args.main_prompts, args.b1_prompts)         # after every step: a cut run keeps it
        compiled_exactness(args.out)
        print(f"{name}: {status} ({log[-1]['seconds']} s)", flush=True)
    write_csv(os.path.join(args.out, "steps.csv"), pd.DataFrame(log))


SWEEPS = ("speed-b1", "speed-batched")            # the eager sweeps: batch 1, and batches 8 and 32
REFERENCES = ("speed-tools",) + SWEEPS     # the agreement's references, first choice first
SWEEP_MODE = {"deepmind": "google"}          # tools' modes the sweeps leave out: the same algorithm's figure
SWEEP_COLUMNS = ("sweep_speedup", "sweep_side_by_side")   # agreement.csv: sweep_speedup's two answers
# host_cost's configurations: the eager batch-1 sweep's (the launch model's fit) and the batched one's
HOST_CONFIGS = ("ar:1,google:1,tree:1,google:1:dynamic:mlp,tree:1:dynamic:mlp,"
                "ar:8,bass:8,tree:8,bass:8:dynamic:mlp,tree:8:dynamic:mlp")


def launch(out: str, folder: str) -> None:
    """The launch-bound model (``benchmark.launch_model``) fitted on this device's eager sweep at
    batch 1 (its configurations ran side by side; a pass's cost there does not depend on the batch)
    against host_cost's counts, predicting every counted configuration with both sweeps' acceptance."""
    counts = os.path.join(out, "host_cost", "summary.csv")
    quiet("benchmark.launch_model", ["--fit_sweep", os.path.join(out, "speed-b1", "raw.csv"),
                                     "--fit_counts", counts, "--counts", counts,
                                     "--acceptance", os.path.join(out, "speed-raw.csv"), "--out", folder])


def label(path_or_preset: str) -> str:
    return os.path.basename(path_or_preset.rstrip("/"))


def sweep_rates(out: str) -> pd.DataFrame:
    """Tokens/s of every (mode, batch, batch_id) of the reference sweeps with the draft model (what
    the tools run), from raw rows, with the sweep that ran it: the rows of one batch share its wall
    time. Each is the median run's."""
    raw = [pd.read_csv(p, keep_default_na=False, na_values=[""]).assign(sweep=d)
           for d, p in ((d, os.path.join(out, d, "raw.csv")) for d in REFERENCES) if os.path.exists(p)]
    if not raw:
        return pd.DataFrame(columns=["mode", "batch", "batch_id", "sweep", "first", "tokens", "wall"])
    r = pd.concat(raw, ignore_index=True)
    r = r[r["draft"].isin(["model"]) | r["draft"].isna()]
    return r.groupby(["mode", "batch", "batch_id", "sweep"]).agg(
        first=("sample", "min"), tokens=("new_tokens", "sum"), wall=("wall_time_s", "first")).reset_index()


def sweep_speedup(rates: pd.DataFrame, mode: str, batch: int, ar_batch: int, prompts: int) -> tuple[float, bool]:
    """The tokens/s of ``mode`` at ``batch`` over the batches of its first ``prompts`` records, over
    AR's at ``ar_batch`` on the same records, and whether the two were measured side by side: from
    the first of ``REFERENCES`` that ran both, else each from the first that ran it (runs minutes
    apart; nan where none did)."""
    def rate(m, b, sweep):
        g = rates[(rates["mode"] == m) & (rates.batch == b) & (rates["first"] < prompts) & (rates.sweep == sweep)]
        return g.tokens.sum() / g.wall.sum() if len(g) else float("nan")
    m = SWEEP_MODE.get(mode, mode)
    pairs = [(rate(m, batch, s), rate("ar", ar_batch, s)) for s in REFERENCES]
    both = [num / den for num, den in pairs if num == num and den == den]
    if both:
        return both[0], True
    first = [next((x[i] for x in pairs if x[i] == x[i]), float("nan")) for i in (0, 1)]
    return first[0] / first[1], False


def agreement(out: str, main_prompts: int, eval_prompts: int) -> None:
    """Each tool's printed speedup beside the same ratio in the warmed-up, interleaved sweeps (dynamic
    cache) on the same prompts, side by side where one sweep ran both (``speed-tools`` runs the
    tools' configurations, batch sizes interleaved): main.py's (batch 1, the first ``main_prompts``
    records) and eval_dolly's (each mode at its batch against AR at ``--batch``, the first
    ``eval_prompts``), with the lowest and highest of the tool's own speedups round by round, and
    whether the sweep's figure lies between them."""
    rates = sweep_rates(out)
    if rates.empty:
        return
    rows = []
    path = os.path.join(out, "main-compare.json")
    if os.path.exists(path):
        runs = json.loads(open(path).read())
        for mode, run_ in runs.items():
            spread = run_.get("round_speedups") or [float("nan")]
            rows.append(dict(tool="main.py --compare", mode=mode, batch=1, prompts=main_prompts,
                             sweep_mode=SWEEP_MODE.get(mode, mode),
                             tool_speedup=run_["stats"]["tokens_per_s"] / runs["ar"]["stats"]["tokens_per_s"],
                             tool_min_round=min(spread), tool_max_round=max(spread),
                             **dict(zip(SWEEP_COLUMNS, sweep_speedup(rates, mode, 1, 1, main_prompts)))))
    path = os.path.join(out, "eval_dolly", "summary.csv")
    if os.path.exists(path):
        e = pd.read_csv(path)
        ar_batch = int(e.loc[e["mode"] == "ar", "batch"].iloc[0]) if (e["mode"] == "ar").any() else 1
        for _, row in e.iterrows():
            rows.append(dict(tool="eval_dolly.py", mode=row["mode"], batch=row["batch"], prompts=eval_prompts,
                             sweep_mode=SWEEP_MODE.get(row["mode"], row["mode"]), tool_speedup=row["speedup_vs_ar"],
                             tool_min_round=row.get("speedup_min_round", float("nan")),
                             tool_max_round=row.get("speedup_max_round", float("nan")),
                             **dict(zip(SWEEP_COLUMNS, sweep_speedup(rates, row["mode"], row["batch"], ar_batch,
                                                                     eval_prompts)))))
    if rows:
        df = pd.DataFrame(rows)
        df["ratio"] = df.tool_speedup / df.sweep_speedup
        # the sweep's figure inside the range of the tool's rounds: the two differ by no more than the noise
        df["sweep_within_tool_rounds"] = df.sweep_speedup.between(df.tool_min_round, df.tool_max_round)
        write_csv(os.path.join(out, "agreement.csv"), df)


def compiled_exactness(out: str) -> None:
    """The compiled static cache's greedy tokens against the eager dynamic cache's of the same run,
    prompt by prompt."""
    path = os.path.join(out, "speed-compiled", "raw.csv")
    if not os.path.exists(path):
        return
    raw = pd.read_csv(path, keep_default_na=False)
    ref = raw[raw.kv_cache == "dynamic"].set_index(["mode", "draft", "sample"]).tokens
    comp = raw[raw.kv_cache == "static"]                                # the compiled rows
    rows = [dict(mode=m, draft=d, sample=s, equal=t == ref.get((m, d, s)))
            for m, d, s, t in zip(comp["mode"], comp["draft"], comp["sample"], comp.tokens)]
    write_csv(os.path.join(out, "exactness_compiled.csv"), pd.DataFrame(rows))


def parse_predict(text: str) -> list[tuple[str, str, str]]:
    """``target:draft[:layers]`` items, comma separated, checked: each model a preset or a folder
    with a config.json (what ``cost_model`` takes)."""
    from .cost_model import PRESETS
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        parts = item.split(":")
        known = [p in PRESETS or os.path.isfile(os.path.join(p, "config.json")) for p in parts[:2]]
        if len(parts) not in (2, 3) or not all(known) or \
                (len(parts) == 3 and not (parts[2].isdigit() and int(parts[2]) >= 1)):
            raise ValueError(f"--predict {item!r}: want target:draft[:layers], each a preset ({', '.join(PRESETS)}) "
                             "or a folder with config.json, layers >= 1")
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else ""))
    return out


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--dataset_path", required=True, help="Dolly-format jsonl (../shared/dolly/dolly-sample.jsonl)")
    ap.add_argument("--max_tokens", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--exact_prompts", type=int, default=8, help="prompts in the exactness check")
    ap.add_argument("--exact_dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="dtype of the exactness check (the timed steps use --dtype)")
    ap.add_argument("--b1_prompts", type=int, default=8,
                    help="records of the batch-1 sweeps and of eval_dolly (batch 8); the batched sweep takes 32")
    ap.add_argument("--main_prompts", type=int, default=4,
                    help="main.py --compare runs the first this many records at batch 1 (the sweep's first prompts)")
    ap.add_argument("--predict", default=DEFAULT_PREDICT,
                    help="targets to predict for from this device's pass costs: comma list of target:draft[:layers] "
                         "(presets or config folders; layers: measure none and this many and extrapolate); '' for none")
    ap.add_argument("--no_compile", dest="compile", action="store_false",
                    help="leave out the compiled static cache (its first passes compile for minutes on a CPU)")
    ap.add_argument("--quick", action="store_true", help="the batched sweep at batch 8 over 8 prompts: for the CPU")
    ap.add_argument("--budget_s", type=float, default=330.0, help="skip the steps that would start after this")
    ap.add_argument("--continue_from", default=None,
                    help="an earlier run's folder, cut short: copied into --out, the steps it finished not run again")
    ap.add_argument("--out", required=True, help="output folder (must not exist)")
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out} exists: choose a new folder")
    if args.continue_from is not None and not os.path.isfile(os.path.join(args.continue_from, "env.json")):
        raise ValueError(f"--continue_from {args.continue_from}: not a gpu_check folder (no env.json)")
    if not os.path.isfile(args.dataset_path):
        raise ValueError(f"--dataset_path {args.dataset_path}: no such file")
    check_at_least_one(args, "max_tokens", "exact_prompts", "main_prompts", "b1_prompts")
    args.predict = parse_predict(args.predict)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (use --device cpu --quick to try the steps)")
    return args


if __name__ == "__main__":
    run(main)
