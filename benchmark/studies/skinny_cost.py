"""What each embedded model's cached pass costs against the tokens it feeds, with transformers' own
``nn.Linear`` layers and with ``sampling.skinny.SkinnyLinear`` (``W @ x.T`` for 2 to 32 rows),
side by side in one process.

    python -m benchmark.studies.skinny_cost --out results/drafting/skinny-cost

Each model is loaded once (float32, CPU: ``load_model`` swaps its linears) and a copy of it gets
plain ``nn.Linear`` layers (tied weights stay tied in the copy). Each round measures both with the controller's own
measurement (``sampling.control.measure_curve``: one row of n tokens after 64 cached ones, the
fastest of nine timed passes per point after two warm-up rounds), the order alternating between
rounds; the table keeps the median round and the rounds' range. Written to ``--out``:
``passes.csv`` (every round), ``table.md`` and ``env.json``.
"""
from __future__ import annotations

import copy
import os

import pandas as pd
import torch
import torch.nn as nn

from sampling.app.cli import Parser, add_model_args, check_at_least_one, run
from sampling.app.models import load_model
from sampling.cache.spec import CacheSpec
from sampling.control import measure_curve
from sampling.skinny import SkinnyLinear, is_skinny

from ..utils_io import env_info, write_csv, write_json, write_text


def plain_copy(model):
    """A copy of ``model`` (its own weights, equal values) whose linear layers are plain ``nn.Linear``."""
    plain = copy.deepcopy(model)
    for name, m in list(plain.named_modules()):
        if isinstance(m, SkinnyLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
            lin.weight, lin.bias = m.weight, m.bias
            plain.set_submodule(name, lin)
    return plain


@torch.inference_mode()
def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--out", required=True, help="output folder (must not exist)")
    args = ap.parse_args(argv)
    check_at_least_one(args, "threads", "rounds")
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out} exists; give a new folder")
    torch.set_num_threads(args.threads)
    rows = []
    for role, name in (("target", args.target_model_name), ("draft", args.approx_model_name)):
        skinny = load_model(name, role, "cpu", "float32")
        for m in skinny.modules():              # W @ x.T against F.linear alone: no draft's one-row copies
            if isinstance(m, SkinnyLinear):
                m.one_row = None
        if not is_skinny(skinny):
            raise ValueError(f"the {role} model has no nn.Linear layers to swap: nothing to compare")
        variants = {"nn.Linear": plain_copy(skinny), "SkinnyLinear": skinny}
        for r in range(args.rounds):
            for variant in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                curve = measure_curve(variants[variant], CacheSpec())
                rows += [dict(model=role, linear=variant, round=r, tokens=n, ms=ms)
                         for n, ms in zip(curve.tokens, curve.ms)]
    raw = pd.DataFrame(rows)
    table = raw.groupby(["model", "tokens", "linear"])["ms"].agg(
        ms="median", low="min", high="max").reset_index()
    wide = table.pivot(index=["model", "tokens"], columns="linear", values="ms").reset_index()
    wide["SkinnyLinear / nn.Linear"] = wide["SkinnyLinear"] / wide["nn.Linear"]
    os.makedirs(args.out)
    write_csv(os.path.join(args.out, "passes.csv"), raw)
    lines = ["| model | tokens | nn.Linear (ms) | SkinnyLinear (ms) | ratio | ranges |",
             "|---|---:|---:|---:|---:|---|"]
    for _, w in wide.iterrows():
        rng = table[(table.model == w.model) & (table.tokens == w.tokens)]
        spread = "; ".join(f"{t.linear} {t.low:.1f}-{t.high:.1f}" for t in rng.itertuples())
        lines.append(f"| {w.model} | {w.tokens} | {w['nn.Linear']:.2f} | {w['SkinnyLinear']:.2f} | "
                     f"{w['SkinnyLinear / nn.Linear']:.2f} | {spread} |")
    write_text(os.path.join(args.out, "table.md"), "\n".join(lines) + "\n")
    write_json(os.path.join(args.out, "env.json"), dict(env_info(), args=vars(args)))
    print("\n".join(lines))


if __name__ == "__main__":
    run(main)
