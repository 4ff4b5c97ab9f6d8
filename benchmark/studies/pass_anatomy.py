"""Where a one-token pass of each embedded model goes on this machine: its wall time, the operators
torch's profiler finds in it, and how fast its linear layers read their weights against a plain read
of memory.

    python -m benchmark.studies.pass_anatomy --out results/drafting/pass-anatomy

Bare model calls (no toolkit wrapper), batch 1, dynamic cache, ``--prompt_len`` tokens cached,
eager, on the CPU, in ``--dtype``. Three parts, each written to ``--out``:

* ``passes.csv``: the median one-token pass of the target and the draft, rounds interleaved.
* ``operators.txt``: the profiler's table of each model's passes, by self time.
* ``linears.csv``: every distinct weight shape of the target's and the draft's linear layers, as
  many copies as the model has (the target's 117 MB cannot stay in the CPU's caches, as in its
  passes; the draft's groups of 0.3 to 4 MB partly can), run as ``F.linear(x, W)`` (what the model
  runs) and as ``x @ W.T`` with ``W.T`` stored contiguous, for 1, 2, 5 and 17 tokens.
* ``env.json``: the machine, the arguments, and the memory bandwidth a ``sum`` over 200 MB reaches.
"""
from __future__ import annotations

import os
import statistics
import time

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from sampling.app.cli import Parser, add_model_args, check_at_least_one, run
from sampling.app.models import load_model

from ..utils_io import env_info, write_csv, write_json, write_text


def one_token_passes(model, prompt_len: int, reps: int) -> list[float]:
    """Seconds of ``reps`` one-token passes after ``prompt_len`` cached tokens (the cache grows)."""
    ids = torch.randint(5, model.config.vocab_size - 1, (1, prompt_len))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    out = []
    for i in range(reps):
        t = time.perf_counter()
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True,
              position_ids=torch.tensor([[prompt_len + i]]), logits_to_keep=1)
        out.append(time.perf_counter() - t)
    return out


def linear_rates(models: dict, rounds: int, dtype: torch.dtype) -> pd.DataFrame:
    """Microseconds per weight of F.linear and of x @ W.T, each weight shape as many times as the
    model holds it, medians of ``rounds`` interleaved rounds."""
    rows = []
    for name, model in models.items():
        shapes: dict[tuple[int, int], int] = {}
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                shapes[tuple(mod.weight.shape)] = shapes.get(tuple(mod.weight.shape), 0) + 1
        for (n_out, n_in), count in shapes.items():
            ws = [torch.randn(n_out, n_in, dtype=dtype) for _ in range(count)]
            wts = [w.t().contiguous() for w in ws]                    # [in, out], rows contiguous
            for tokens in (1, 2, 5, 17):
                x = torch.randn(tokens, n_in, dtype=dtype)
                runs = {"linear": lambda x=x, ws=ws: [F.linear(x, w) for w in ws],
                        "x @ W.T stored": lambda x=x, wts=wts: [x @ w for w in wts]}
                times = {k: [] for k in runs}
                for f in runs.values():                                   # a warm-up call each
                    f()
                for _ in range(rounds):
                    for k, f in runs.items():
                        t = time.perf_counter()
                        f()
                        times[k].append((time.perf_counter() - t) / count)
                lin, tr = (statistics.median(times[k]) for k in runs)
                mb = n_out * n_in * ws[0].element_size() / 1e6
                rows.append(dict(model=name, weight=f"{n_out}x{n_in}", copies=count, tokens=tokens, weight_mb=mb,
                                 linear_us=lin * 1e6, transposed_us=tr * 1e6, linear_gb_s=mb / 1e3 / lin,
                                 transposed_gb_s=mb / 1e3 / tr))
    return pd.DataFrame(rows)


def read_rate(rounds: int) -> float:
    """GB/s of a sum over 200 MB (memory, not cache), the median of ``rounds``."""
    x = torch.randn(50_000_000)
    x.sum()                                                               # a warm-up read
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        out.append(x.numel() * x.element_size() / (time.perf_counter() - t) / 1e9)
    return statistics.median(out)


@torch.inference_mode()
def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    ap.add_argument("--prompt_len", type=int, default=64, help="tokens cached before the passes")
    ap.add_argument("--reps", type=int, default=40, help="passes per round (the first 5 are a warm-up)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--out", required=True, help="output folder (must not exist)")
    args = ap.parse_args(argv)
    check_at_least_one(args, "threads", "prompt_len", "rounds")
    if args.reps < 6:
        raise ValueError(f"--reps must be at least 6 (5 warm-up passes and one timed), got {args.reps}")
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out} exists; give a new folder")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        raise ValueError(f"--device {args.device}: this study times CPU passes (its profiler reads CPU operators); "
                         f"use --device cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"target": load_model(args.target_model_name, "target", "cpu", args.dtype),
              "draft": load_model(args.approx_model_name, "draft", "cpu", args.dtype)}
    times = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            times[k].append(statistics.median(one_token_passes(m, args.prompt_len, args.reps)[5:]) * 1e3)
    passes = pd.DataFrame([dict(model=k, ms=statistics.median(v), low=min(v), high=max(v)) for k, v in times.items()])
    tables = []
    for k, m in models.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            one_token_passes(m, args.prompt_len, args.reps)
        tables.append(f"{k}: the prefill and {args.reps} one-token passes\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20) + "\n")
    linears = linear_rates(models, args.rounds, models["target"].dtype)
    os.makedirs(args.out)
    write_csv(os.path.join(args.out, "passes.csv"), passes)
    write_text(os.path.join(args.out, "operators.txt"), "\n".join(tables))
    write_csv(os.path.join(args.out, "linears.csv"), linears)
    rate = read_rate(args.rounds)
    write_json(os.path.join(args.out, "env.json"), dict(env_info(), args=vars(args), sum_read_gb_s=rate))
    print(passes.round(2).to_string(index=False))
    ms = dict(zip(passes.model, passes.ms))
    print(f"c = draft / target: {ms['draft'] / ms['target']:.3f}; memory read by a sum: {rate:.1f} GB/s")
    print(linears.round(1).to_string(index=False))


if __name__ == "__main__":
    run(main)
