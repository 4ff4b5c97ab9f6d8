"""A cost model for speculative decoding at scales this machine cannot run: pass costs measured
against (batch, new tokens, cache length), acceptance measured on a real pair, tokens/s predicted.

    # check it where it can be checked: the embedded pair's costs replayed over a measured sweep
    python -m benchmark.cost_model --raw results/static/sweep/raw.csv --out results/cost_model/embedded
    # predict for a Llama-7B-sized target with a 160M draft (random weights: timing only)
    python -m benchmark.cost_model --raw results/static/sweep/raw.csv --target_config llama-7b \\
        --draft_config llama-160m --layers 8 --out results/cost_model/llama-7b

A pass's cost is measured through the toolkit's own KV wrapper (the model call and the filtered
softmax), warmed up, the grid points interleaved, the device synchronised, the median kept; then
interpolated linearly between the measured points in new tokens and in cache length (beyond
them, extended from the last two): a pass's cost is not linear in its tokens on every device (on
this CPU a 5-token pass of a 7B model costs about 3x a 1-token one, and 17 tokens hardly more than
5), so no straight line is fitted through them. A model too big for memory is measured with none and
with N of its layers (``--layers N``) and extrapolated linearly in the layer count: embeddings and
head are paid once, each layer alike.

The prediction replays the call structure a sweep recorded (raw.csv of ``run_experiment``): for
each batch, the prefill of target and draft, then step by step the rows still live (each row's
target passes), one verify pass of gamma + 1 tokens (a tree: its nodes + 1) and the draft's
passes (gamma single-token passes; a tree: one per level, as wide as the level it expands), at the
cache length reached. With the embedded pair's costs this predicts the sweep's own wall time (the
check); with another pair's costs it predicts that pair's tokens/s *if it accepted as often as
the measured pair*, which is the assumption to question.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from sampling.app.cli import Parser, add_model_args, run
from sampling.cache.spec import CacheSpec
from sampling.kvcache_model import KVCacheModel
from sampling.modes import MODES_TABLE
from sampling.params import SamplingParams
from sampling.tree_shapes import DynamicTree, parse_tree
from sampling.utils import now

from .console import fit_markdown
from .utils_io import save_figure, write_csv, write_text

# Llama-shaped configs by name (sizes of the published models; weights random, for timing)
PRESETS = {
    "llama-160m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
}
MODELED_DRAFTS = ("", "model")       # drafts whose passes the model knows (ar: none; the draft model)


@dataclass
class CostSettings:
    batches: tuple = (1, 8)           # batch sizes measured (others: interpolated between the nearest two)
    news: tuple = (1, 2, 5, 17)       # new tokens per pass: a step, a catch-up, gamma + 1, a tree's nodes + 1
    caches: tuple = (64, 256, 768)    # cached positions before the pass
    prefills: tuple = (32, 128, 512)  # prompt lengths of the prefill passes (3 or more: a quadratic fit)
    reps: int = 5                     # timed rounds after one warm-up round; the median is kept
    kv_cache: str = "dynamic"         # the wrapper's cache (sampling.kvcache_model.CACHES)


def build_model(name_or_path: str, layers: int | None, device, dtype):
    """A random-init model from a preset or a config.json folder, with ``layers`` of its layers
    (None: all): timing does not depend on the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(**PRESETS[name_or_path]) if name_or_path in PRESETS else AutoConfig.from_pretrained(name_or_path)
    if layers is not None:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def full_layers(name_or_path: str) -> int:
    from transformers import AutoConfig
    return PRESETS[name_or_path]["num_hidden_layers"] if name_or_path in PRESETS else \
        AutoConfig.from_pretrained(name_or_path).num_hidden_layers


@torch.inference_mode()
def random_cache(model, spec: CacheSpec, batch: int, length: int, generator: torch.Generator) -> KVCacheModel:
    """A wrapper whose cache holds ``length`` random keys and values per row, as if a prompt had been
    run: passes are timed against a cache length without paying its prefill. Built through the
    wrapper's backend (``sampling.cache.backends``) after a one-token prefill."""
    kv = KVCacheModel(model, SamplingParams(temperature=1.0), cache=spec)
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    p = next(model.parameters())
    one = torch.ones(batch, 1, dtype=torch.long, device=p.device)
    kv.prefill(one, one)                                                  # makes the backend
    kv.truncate(0)
    kv.backend.reserve(length)
    keys = torch.randn(batch, heads, length, dim, generator=generator, dtype=p.dtype).to(p.device)
    for i in range(len(kv.cache.layers)):
        kv.cache.update(keys, keys, i)
    kv.backend.filled = length
    kv.mask = torch.ones(batch, length, dtype=torch.long, device=p.device)
    return kv


@torch.inference_mode()
def measure_passes(model, s: CostSettings) -> pd.DataFrame:
    """Median ms of cached passes over the grid (batch, new, cache) and of prefills (batch, prompt):
    one warm-up round, then ``reps`` rounds with the points in rotating order. The caches are
    filled with random keys once (``random_cache``); each pass is rolled back."""
    device = next(model.parameters()).device
    V = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    spec = CacheSpec(s.kv_cache, room=max(s.news))
    caches = {}
    for b in s.batches:
        for L in s.caches:
            caches[b, L] = random_cache(model, spec, b, L, gen)
    fresh = KVCacheModel(model, SamplingParams(temperature=1.0), cache=spec)
    points = [("step", b, n, L) for b in s.batches for L in s.caches for n in s.news] + \
             [("prefill", b, T, 0) for b in s.batches for T in s.prefills]
    times = {p: [] for p in points}
    for rep in range(s.reps + 1):
        for i in range(len(points)):
            kind, b, n, L = p = points[(i + rep) % len(points)]
            seq = torch.randint(0, V, (b, L + n), generator=gen).to(device)
            if kind == "step":
                t0 = now(device)
                caches[b, L].catch_up(seq, torch.ones_like(seq))
                t1 = now(device)
                caches[b, L].rollback(L)
            else:
                t0 = now(device)
                fresh.prefill(seq, torch.ones_like(seq))
                t1 = now(device)
            if rep:
                times[p].append(1000 * (t1 - t0))
    return pd.DataFrame([dict(kind=k, batch=b, new=n, cache=L, ms=statistics.median(times[(k, b, n, L)]))
                         for k, b, n, L in points])


def extrapolate(none: pd.DataFrame, some: pd.DataFrame, measured: int, layers: int) -> pd.DataFrame:
    """Costs of the full model of ``layers`` layers from its versions with none and ``measured`` of
    them: none + layers / measured x (some - none)."""
    keys = ["kind", "batch", "new", "cache"]
    m = none.merge(some, on=keys, suffixes=("_0", "_n"))
    return m.assign(ms=m.ms_0 + layers / measured * (m.ms_n - m.ms_0))[keys + ["ms"]]


def interp(x: float, xs, ys) -> float:
    """Piecewise-linear through (xs, ys) (xs sorted), extended beyond the ends along the nearest
    segment, never downwards (a pass costs no less for more tokens or a longer cache)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(xs) == 1:
        return float(ys[0])
    k = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    slope = (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
    if x < xs[0] or x > xs[-1]:
        slope = max(slope, 0.0)
        return float(ys[0] + slope * (x - xs[0])) if x < xs[0] else float(ys[-1] + slope * (x - xs[-1]))
    return float(ys[k] + slope * (x - xs[k]))


class PassCost:
    """ms of a pass: per measured batch size, steps interpolated in (new, cache) over the measured
    grid, prefills fitted as a + b*T + c*T^2 (linear when two lengths were measured or the square's
    coefficient comes out negative: prompts run longer than the measured ones); linear in the batch
    between the measured ones (beyond them, the nearest)."""

    def __init__(self, passes: pd.DataFrame):
        self.passes = passes
        self.step, self.pre = {}, {}
        for b, g in passes[passes.kind == "step"].groupby("batch"):
            self.step[int(b)] = g.pivot_table(index="new", columns="cache", values="ms").sort_index()
        for b, g in passes[passes.kind == "prefill"].groupby("batch"):
            cols = [np.ones(len(g)), g.new] + ([g.new ** 2] if g.new.nunique() >= 3 else [])
            c = np.linalg.lstsq(np.stack(cols, 1), g.ms.to_numpy(), rcond=None)[0]
            if len(c) == 3 and c[2] < 0:            # attention makes a prefill convex in T: noise, fit a line
                c = np.linalg.lstsq(np.stack(cols[:2], 1), g.ms.to_numpy(), rcond=None)[0]
            self.pre[int(b)] = np.append(c, [0.0, 0.0])[:3]

    @staticmethod
    def _between(table: dict, batch: float, f) -> float:
        bs = sorted(table)
        lo = max([b for b in bs if b <= batch], default=bs[0])
        hi = min([b for b in bs if b >= batch], default=bs[-1])
        if lo == hi:
            return f(table[lo])
        w = (batch - lo) / (hi - lo)
        return (1 - w) * f(table[lo]) + w * f(table[hi])

    @staticmethod
    def _grid(t: pd.DataFrame, new: float, cache: float) -> float:
        per_new = [interp(cache, t.columns, row) for _, row in t.iterrows()]     # [len(news)] at this cache
        return interp(new, t.index, per_new)

    def ms(self, batch: float, new: float, cache: float) -> float:
        return self._between(self.step, batch, lambda t: self._grid(t, new, cache))

    def prefill_ms(self, batch: float, tokens: float) -> float:
        return self._between(self.pre, batch, lambda c: max(0.0, c[0] + c[1] * tokens + c[2] * tokens ** 2))

    def fit_table(self) -> pd.DataFrame:
        """The prefill fits (the steps are the measured grid itself, in passes.csv)."""
        return pd.DataFrame([dict(batch=b, a_ms=c[0], per_token_ms=c[1], per_token_squared_us=1000 * c[2])
                             for b, c in sorted(self.pre.items())])


def draft_passes(cfg: pd.Series) -> list[int]:
    """Widths (tokens) of the draft's passes in one step: gamma passes of 1 token for a chain; one
    per level for a tree, as wide as the nodes it expands (a dynamic tree: K, the first level 1)."""
    mode = MODES_TABLE[cfg["mode"]]
    if mode.verifier == "tree":
        shape = parse_tree(cfg["tree"])
        if isinstance(shape, DynamicTree):
            return [1] + [shape.k] * (shape.depth - 1)
        return [1] + [int((shape.depths == d).sum()) for d in range(1, int(shape.depths.max()))]
    return [1] * int(round(cfg["mean_gamma"])) if mode.speculative else []


def verify_width(cfg: pd.Series) -> int:
    """Tokens of the target's pass in one step: a tree's nodes or a chain's drafts, and the pending token."""
    mode = MODES_TABLE[cfg["mode"]]
    if mode.verifier == "tree":
        return parse_tree(cfg["tree"]).n + 1
    return int(round(cfg["mean_gamma"])) + 1 if mode.speculative else 1


class BatchPasses(NamedTuple):
    """One measured batch replayed under pass costs (``predict_batch``)."""
    seconds: float             # all its model passes
    before_first: float        # those before its first hand-out: the prefills (a speculative loop's first step too)
    iterations: int            # loop steps after the prefill
    decode_iterations: int     # loop steps after the first hand-out


def predict_batch(rows: pd.DataFrame, target: PassCost, draft: PassCost | None) -> BatchPasses:
    """The model passes of one measured batch (its rows of raw.csv) under the given pass costs."""
    cfg = rows.iloc[0]
    B, T = len(rows), int(rows.prompt_tokens.max())
    steps = (rows.target_calls - 1).clip(lower=0).astype(int).tolist()    # passes after the prefill
    tokens_per_step = float(rows.new_tokens.sum()) / max(1, sum(steps) + B)
    q, widths = verify_width(cfg), draft_passes(cfg)
    use_draft = draft is not None and cfg["draft"] == "model"
    ms = pre = target.prefill_ms(B, T) + (draft.prefill_ms(B, T) if use_draft else 0.0)
    speculative = MODES_TABLE[cfg["mode"]].speculative   # its first hand-out follows its first step
    for s in range(1, max(steps, default=0) + 1):
        live = B if cfg["finished_rows"] == "mask" and speculative else sum(n >= s for n in steps)
        cache = T + s * tokens_per_step
        ms += target.ms(live, q, cache)
        if use_draft:
            ms += sum(draft.ms(live, w, cache) for w in widths)
        if s == 1 and speculative:
            pre = ms
    iterations = max(steps, default=0)
    return BatchPasses(ms / 1000, pre / 1000, iterations, max(0, iterations - speculative))


def modeled(raw: pd.DataFrame, kv_cache: str) -> pd.DataFrame:
    """The rows of a sweep the model can replay: ar or the draft model, eager, with this cache, in the
    sweep's dtype (not run_experiment --baseline_dtype's ar)."""
    from .metrics import upgrade_raw
    raw = upgrade_raw(raw)
    return raw[raw["draft"].isin(MODELED_DRAFTS) & ~raw["mode"].str.startswith("hf") & (raw.kv_cache == kv_cache)
               & ~raw["compile"].astype(str).isin(["True", "true", "1", "draft"]) & (raw["dtype"] == "")]


CALIBRATION_KEY = ["mode", "batch", "tree"]     # the host work per loop iteration is calibrated per these


def replay(raw: pd.DataFrame, target: PassCost, draft: PassCost | None, kv_cache: str,
           overhead: dict | None = None) -> pd.DataFrame:
    """Measured and predicted tokens/s of every configuration of a sweep (draft model or none) that
    ran with the cache the costs were measured with.

    A step is its model passes plus the loop's host work (sampling, the rule, bookkeeping), which
    the pass costs do not hold. ``overhead`` None: each configuration's host work per iteration,
    measured decode time (wall - TTFT) less the predicted passes after the first hand-out, per
    iteration after it (a speculative loop's first step is in TTFT), is
    calibrated leave-one-out: each batch is predicted with the host work of the configuration's
    other batches (its own when it has one), so no batch checks its own calibration;
    ``overhead_ms`` reports the mean over all batches. A dict {(mode, batch, tree): ms}: used as
    given, on every batch (another model's costs, the embedded pair's host work).
    """
    from .metrics import KEYS, decode_tokens
    raw = modeled(raw, kv_cache)
    keys = [k for k in KEYS if k in raw.columns]
    out = []
    for key, g in raw.groupby(keys, dropna=False):
        cfg = dict(zip(keys, key))
        walls = g.groupby("batch_id").wall_time_s.first()
        ttfts = g.groupby("batch_id").ttft_s.first()
        passes = {bid: predict_batch(b, target, draft) for bid, b in g.groupby("batch_id")}
        ids = sorted(passes)

        def host_work(cal, walls=walls, ttfts=ttfts, passes=passes):   # seconds per decode iteration not
            return sum(walls[i] - ttfts[i] - passes[i].seconds + passes[i].before_first    # spent in the
                       for i in cal) / max(1, sum(passes[i].decode_iterations for i in cal))   # predicted passes

        if overhead is None:
            ov = {i: host_work([j for j in ids if j != i] or ids) for i in ids}
            mean_ov = host_work(ids)
        else:
            mean_ov = overhead.get(tuple(str(cfg[k]) for k in CALIBRATION_KEY), 0.0) / 1000
            ov = {i: mean_ov for i in ids}
        tokens, later = g.new_tokens.sum(), decode_tokens(g, "batch_id").sum()
        out.append(dict(cfg, new_tokens=tokens, tokens_per_call=tokens / g.target_calls.sum(),
                        batches=len(ids), overhead_ms=1000 * mean_ov,
                        measured_tps=tokens / walls.sum(),
                        predicted_tps=tokens / sum(passes[i].seconds + ov[i] * passes[i].iterations for i in ids),
                        passes_only_tps=tokens / sum(passes[i].seconds for i in ids),
                        measured_decode_tps=later / (walls - ttfts).sum(),
                        predicted_decode_tps=later / sum(passes[i].seconds - passes[i].before_first
                                                         + ov[i] * passes[i].decode_iterations for i in ids)))
    df = pd.DataFrame(out)
    return df.assign(error=df.predicted_tps / df.measured_tps - 1,
                     error_decode=df.predicted_decode_tps / df.measured_decode_tps - 1,
                     error_passes_only=df.passes_only_tps / df.measured_tps - 1)


def read_calibration(path: str) -> dict:
    """{(mode, batch, tree): host ms per iteration} from the prediction.csv of a checked run."""
    cal = pd.read_csv(path, keep_default_na=False)
    if "overhead_ms" not in cal.columns:
        raise ValueError(f"--calibration {path} is not a cost model's prediction.csv (no overhead_ms column)")
    return {tuple(str(r[k]) for k in CALIBRATION_KEY): float(r.overhead_ms) for _, r in cal.iterrows()}


def versus_ar(df: pd.DataFrame, col: str) -> pd.Series:
    """col relative to ar at the same batch size and temperature."""
    ar = df[df["mode"] == "ar"].set_index(["batch", "temperature"])[col]
    return pd.Series([v / ar.get((b, t), np.nan) for v, b, t in zip(df[col], df.batch, df.temperature)], index=df.index)


def costs_of(name: str, model, measured: int | None, s: CostSettings, device, dtype, log) -> pd.DataFrame:
    """Pass costs of a loaded model, or of a preset / config measured whole or with none and
    ``measured`` of its layers."""
    if model is not None:
        log(f"measuring {name} ...")
        return measure_passes(model, s)
    layers = full_layers(name)
    if measured is None or measured >= layers:
        log(f"measuring {name} (random weights) ...")
        return measure_passes(build_model(name, None, device, dtype), s)
    parts = []
    for k in (0, measured):
        log(f"measuring {name} with {k} of its {layers} layers (random weights) ...")
        m = build_model(name, k, device, dtype)
        parts.append(measure_passes(m, s))
        del m
    return extrapolate(*parts, measured, layers)


def parse(argv=None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, drafters=False)
    ap.add_argument("--raw", required=True,
                    help="raw.csv of a run_experiment sweep, or a comma list of them: the acceptance to replay")
    ap.add_argument("--target_config", default=None,
                    help=f"a target to predict for: a preset ({', '.join(PRESETS)}) or a config.json folder "
                         "(default: the loaded target, which checks the model against the sweep)")
    ap.add_argument("--draft_config", default=None, help="its draft (preset or folder; default: the loaded draft)")
    ap.add_argument("--calibration", default=None,
                    help="prediction.csv of a run on the measured pair: its host work per loop iteration is "
                         "added to these passes (default: calibrated on half of --raw's batches, checked on the rest)")
    ap.add_argument("--passes", default=None,
                    help="passes.csv of an earlier run: predict from its pass costs instead of measuring again "
                         "(the model flags are then not used)")
    ap.add_argument("--layers", type=int, default=None,
                    help="measure --target_config / --draft_config with none and this many of their layers and "
                         "extrapolate to all of them (for models that do not fit in memory; default: whole)")
    s = CostSettings()
    ap.add_argument("--batches", default=",".join(map(str, s.batches)), help="batch sizes to measure")
    ap.add_argument("--news", default=",".join(map(str, s.news)), help="new tokens per pass to measure")
    ap.add_argument("--caches", default=",".join(map(str, s.caches)), help="cache lengths to measure")
    ap.add_argument("--prefills", default=",".join(map(str, s.prefills)), help="prompt lengths of the prefills")
    ap.add_argument("--reps", type=int, default=s.reps, help="timed rounds after one warm-up round")
    ap.add_argument("--kv_cache", default=s.kv_cache, choices=("dynamic", "static"), help="the wrapper's cache")
    ap.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    args = ap.parse_args(argv)
    for flag in ("raw", "calibration", "passes"):
        for path in (getattr(args, flag) or "").split(",") if flag == "raw" else [getattr(args, flag)]:
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"--{flag} {path}: no such file")
    for name in ("batches", "news", "caches", "prefills"):
        try:
            vals = tuple(int(x) for x in getattr(args, name).split(",") if x.strip())
        except ValueError:
            vals = ()
        if not vals or min(vals) < 1:
            raise ValueError(f"--{name} takes a comma list of integers >= 1, got {getattr(args, name)!r}")
        setattr(args, name, vals)
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    for flag in ("target_config", "draft_config"):
        v = getattr(args, flag)
        if v is not None and v not in PRESETS and not os.path.isfile(os.path.join(v, "config.json")):
            raise ValueError(f"--{flag} {v!r}: not a preset ({', '.join(PRESETS)}) nor a folder with config.json")
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not empty: choose a new folder")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    s = CostSettings(args.batches, args.news, args.caches, args.prefills, args.reps, args.kv_cache)
    raw = pd.concat([pd.read_csv(p, keep_default_na=False, na_values=[""]) for p in args.raw.split(",")],
                    ignore_index=True)
    if modeled(raw, s.kv_cache).empty:
        raise ValueError(f"--raw {args.raw} has no configuration of ar or the draft model with kv_cache {s.kv_cache}")
    from sampling.app.cli import load_pair
    if args.passes:
        costs = {role: g.drop(columns="model") for role, g in pd.read_csv(args.passes).groupby("model")}
        if set(costs) != {"target", "draft"}:
            raise ValueError(f"--passes {args.passes} is not a cost model's passes.csv (no target and draft rows)")
        report(args, s, raw, costs, where=f"pass costs from {args.passes}")
        return
    need = args.target_config is None or args.draft_config is None
    target_m, draft_m, _, _ = load_pair(args, need_draft=args.draft_config is None, drafts=["model"]) if need \
        else (None,) * 4
    draft_m = draft_m["model"] if draft_m else None
    device = next(target_m.parameters()).device if target_m is not None else torch.device(
        "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.float32 if device.type == "cpu" else torch.bfloat16, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    costs = {}
    for role, cfg, model in (("target", args.target_config, target_m if args.target_config is None else None),
                             ("draft", args.draft_config, draft_m if args.draft_config is None else None)):
        costs[role] = costs_of(cfg or role, model, args.layers, s, device, dtype, print)
    report(args, s, raw, costs, where=(f"target {args.target_config or args.target_model_name or 'embedded'}, draft "
                                       f"{args.draft_config or args.approx_model_name or 'embedded'}, {device.type}, "
                                       f"{dtype}"))


def report(args, s: CostSettings, raw: pd.DataFrame, costs: dict, where: str) -> None:
    """Replay the sweep under the pass costs {role: passes} and write the folder."""
    passes = pd.concat([c.assign(model=role) for role, c in costs.items()], ignore_index=True)
    target, draft = PassCost(costs["target"]), PassCost(costs["draft"])
    overhead = read_calibration(args.calibration) if args.calibration else None
    table = replay(raw, target, draft, s.kv_cache, overhead)
    table = table.assign(measured_vs_ar=versus_ar(table, "measured_tps"),
                         predicted_vs_ar=versus_ar(table, "predicted_tps"))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "passes.csv"), passes)
    fits = pd.concat([target.fit_table().assign(model="target"), draft.fit_table().assign(model="draft")])
    write_csv(os.path.join(args.out, "fit.csv"), fits)
    write_csv(os.path.join(args.out, "prediction.csv"), table)
    table = table.assign(passes_only_vs_ar=versus_ar(table, "passes_only_tps"),
                         predicted_decode_vs_ar=versus_ar(table, "predicted_decode_tps"))
    cols = ["mode", "draft", "batch", "tree", "kv_cache", "tokens_per_call", "overhead_ms", "measured_tps",
            "predicted_tps", "error", "passes_only_tps", "error_passes_only", "measured_decode_tps",
            "predicted_decode_tps", "measured_vs_ar", "predicted_vs_ar", "passes_only_vs_ar", "predicted_decode_vs_ar"]
    md = markdown(table[[c for c in cols if c in table.columns]])
    how = (f"host work per loop iteration (overhead_ms) from `{args.calibration}`" if args.calibration else
           "host work per loop iteration (overhead_ms) of each configuration, calibrated leave-one-out (each "
           "batch predicted with the host work of the others)")
    write_text(os.path.join(args.out, "table.md"),
               f"# Cost model: {where}\n\nAcceptance replayed from `{args.raw}`; measured_* are that sweep's "
               f"figures (the embedded pair), predicted_* these pass costs plus the {how}; passes_only_* leave "
               f"the host work out.\n\n{md}\n")
    plot_costs(passes, os.path.join(args.out, "costs.png"), where)
    print(fit_markdown(md, os.path.join(args.out, "table.md")))


def markdown(df: pd.DataFrame) -> str:
    """A plain markdown table, numbers to 3 significant digits."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def plot_costs(passes: pd.DataFrame, path: str, title: str) -> None:
    """ms of a pass against new tokens, per model, batch and cache length: the cost curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = passes[passes.kind == "step"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (model, g) in zip(axes, steps.groupby("model")):
        for (b, L), h in g.groupby(["batch", "cache"]):
            ax.plot(h.new, h.ms, marker="o", label=f"batch {b}, cache {L}")
        ax.set(xlabel="new tokens in the pass", ylabel="ms", title=model)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


if __name__ == "__main__":
    run(main)
