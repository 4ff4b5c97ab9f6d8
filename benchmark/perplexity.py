"""What a press costs in quality: the target's perplexity on a text with each press at each ratio.

    python -m benchmark.perplexity --dataset_path ../shared/dolly/dolly-sample.jsonl --out results/kvpress/ppl

The text (``--text PATH``, or the Dolly records' instruction, context and response joined) is cut
into windows of each ``--windows`` length. In each window the first half is the context: it is
prefilled, then pressed at the ratio (``sampling.press``: the target's own cache, as
``--press_on target`` would), and the second half is scored in one pass over the compressed cache.
Ratio 0 is the plain model. The first scored token's law comes from the prefill, before the
press, in every configuration alike. Raw rows (one per window and configuration) go to raw.csv,
perplexity per press, ratio and window length to summary.csv, a plot to perplexity.png.
"""
from __future__ import annotations

import math
import os

import pandas as pd
import torch

from sampling.app.cli import Parser, add_model_args, check_at_least_one, run
from sampling.app.dolly import load_dolly
from sampling.cache.press import PRESSES, PressSpec
from sampling.cache.spec import CacheSpec
from sampling.kvcache_model import KVCacheModel
from sampling.params import SamplingParams

from .runner import filler_text
from .utils_io import save_figure, write_csv, write_text


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, press: PressSpec) -> torch.Tensor:
    """Summed negative log-likelihood of the second half of each window [N, W] given the first half
    in a cache pressed by ``press`` (its ratio applies at prefill) [N]."""
    W = windows.shape[1]
    C = W // 2
    kv = KVCacheModel(model, SamplingParams(temperature=1.0), cache=CacheSpec(press=press), role="target")
    mask = torch.ones_like(windows)
    kv.prefill(windows[:, :C], mask[:, :C])
    kv.catch_up(windows[:, :W - 1], mask[:, :W - 1])             # the continuation but its last token
    probs = kv.probs                                             # [N, W - C, V]: the law of tokens C .. W - 1
    p = probs.gather(2, windows[:, C:].unsqueeze(2)).squeeze(2)  # [N, W - C]
    return -p.double().clamp_min(1e-300).log().sum(1)


def main(argv=None) -> None:
    args = parse(argv)
    from sampling.app.models import load_model, load_tokenizer
    tok = load_tokenizer(args.target_model_name)
    model = load_model(args.target_model_name, "target", args.device, args.dtype)
    device = next(model.parameters()).device
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        records = load_dolly(args.dataset_path)
        text = filler_text(records, 0, chars=10 ** 9)
    ids = tok(text, verbose=False)["input_ids"]
    limit = getattr(model.config, "max_position_embeddings", None) or max(args.windows)
    rows = []
    for W in args.windows:
        if W > limit:
            raise ValueError(f"--windows {W} is longer than the model's {limit} positions")
        n = min(len(ids) // W, args.max_windows)
        if n == 0:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {W}")
        windows = torch.tensor(ids[:n * W], device=device).view(n, W)
        configs = [PressSpec()] + [PressSpec(k, r, None, "target", args.press_sinks, args.press_window)
                                   for k in args.presses for r in args.ratios if r > 0]
        for spec in configs:
            for start in range(0, n, args.batch):
                nll = window_nll(model, windows[start:start + args.batch], spec)
                for j, v in enumerate(nll.tolist()):
                    rows.append(dict(window_tokens=W, window=start + j, press=spec.kind if spec.active else "none",
                                     ratio=spec.ratio, nll=v, scored=W - W // 2))
            print(f"window {W}: {spec.kind if spec.active else 'none'} ratio {spec.ratio:g} done", flush=True)
    raw = pd.DataFrame(rows)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "raw.csv"), raw)
    summary = summarise(raw)
    write_csv(os.path.join(args.out, "summary.csv"), summary)
    write_text(os.path.join(args.out, "table.md"), markdown(summary))
    plot(summary, os.path.join(args.out, "perplexity.png"))
    print(markdown(summary))
    print(f"wrote raw.csv, summary.csv, table.md and perplexity.png in {args.out}")


def summarise(raw: pd.DataFrame) -> pd.DataFrame:
    """Perplexity = exp(total NLL / scored tokens) per window length, press and ratio; each beside
    the plain model's at that length."""
    s = raw.groupby(["window_tokens", "press", "ratio"]).agg(windows=("window", "size"), nll=("nll", "sum"),
                                                              scored=("scored", "sum")).reset_index()
    s["perplexity"] = [math.exp(a / b) for a, b in zip(s.nll, s.scored)]
    base = s[s.press == "none"].set_index("window_tokens").perplexity
    s["vs_plain"] = s.perplexity / s.window_tokens.map(base)
    return s


def markdown(s: pd.DataFrame) -> str:
    lines = []
    for W, g in s.groupby("window_tokens"):
        ratios = sorted(r for r in g.ratio.unique() if r > 0)
        plain = g[g.press == "none"].perplexity.iloc[0]
        lines += [f"**windows of {W} tokens** ({int(g.windows.iloc[0])} windows, the last {W - W // 2} tokens "
                  f"of each scored; plain model {plain:.2f})", "",
                  "| press | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
                  "|---|" + "---:|" * len(ratios)]
        for press, h in g[g.press != "none"].groupby("press"):
            by = h.set_index("ratio").perplexity
            lines.append(f"| {press} | " + " | ".join(f"{by.get(r, float('nan')):.2f}" for r in ratios) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(s: pd.DataFrame, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = sorted(s.window_tokens.unique())
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, W in zip(axes[0], lengths):
        g = s[s.window_tokens == W]
        plain = g[g.press == "none"].perplexity.iloc[0]
        for press, h in g[g.press != "none"].groupby("press"):
            h = h.sort_values("ratio")
            ax.plot([0] + list(h.ratio), [plain] + list(h.perplexity), marker="o", label=press)
        ax.set(title=f"windows of {W} tokens", xlabel="compression ratio (of the context)", ylabel="perplexity")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--text", default=None, help="a UTF-8 text file to score (default: the Dolly records)")
    ap.add_argument("--dataset_path", default=None, help="Dolly-format jsonl, when no --text")
    ap.add_argument("--windows", default="256,1024", help="comma list of window lengths in tokens")
    ap.add_argument("--max_windows", type=int, default=32, help="at most this many windows per length")
    ap.add_argument("--presses", default="streaming,knorm,snapkv,hybrid", help="comma list of presses")
    ap.add_argument("--ratios", default="0.25,0.5,0.75", help="comma list of ratios in (0, 1)")
    s = PressSpec()
    ap.add_argument("--press_sinks", type=int, default=s.sinks, help="streaming, hybrid: first tokens always kept")
    ap.add_argument("--press_window", type=int, default=s.window,
                    help="hybrid: recent tokens kept; snapkv: the observation window")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--out", required=True, help="output folder (must not hold a raw.csv)")
    args = ap.parse_args(argv)
    if args.text is None and args.dataset_path is None:
        raise ValueError("give --text PATH or --dataset_path (Dolly jsonl)")
    if args.text is not None and not os.path.isfile(args.text):
        raise ValueError(f"--text {args.text}: no such file")
    try:
        args.windows = [int(x) for x in args.windows.split(",") if x.strip()]
        args.ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    except ValueError:
        raise ValueError("--windows takes integers and --ratios numbers, comma separated") from None
    if not args.windows or min(args.windows) < 4:
        raise ValueError(f"--windows must be lengths >= 4, got {args.windows}")
    args.presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    for p in args.presses:
        if p == "none":
            raise ValueError("--presses lists presses (the plain model is always measured); "
                             f"choose from {', '.join(PRESSES[1:])}")
        for r in args.ratios:
            PressSpec(p, r, None, "target", args.press_sinks, args.press_window).validate()
    check_at_least_one(args, "max_windows", "batch")
    if os.path.exists(os.path.join(args.out, "raw.csv")):
        raise ValueError(f"{args.out}/raw.csv exists: choose another --out")
    return args


if __name__ == "__main__":
    run(main)
