"""The host's work per decode step, outside the model passes: what a GPU waits on when the models
themselves are cheap (launch-bound), measured on any machine.

    python -m benchmark.host_cost --out results/host/after

The models are random-init copies of the embedded pair's architectures (their layers, heads and
vocabulary) shrunk to ``--hidden`` channels, so that their arithmetic is next to nothing and a
step's time is the host's: Python, the operator calls, the copies (``--hidden 0``: the embedded
pair itself, to see what the host's share is at this pair's size). Per configuration (mode, batch,
KV cache, drafter: the draft model, the embedded MLP speculator's or Medusa's heads, n-gram), greedy,
``--max_tokens`` new tokens after random prompts of ``--prompt_len`` tokens (the tree mode with its
default tree for that drafter):

* timed (every configuration warmed up first, then ``--repeats`` rounds in rotating order, the
  median kept): the generation's wall time and the time inside the two models' forward calls
  (forward hooks); the rest, per target pass, is ``host_ms_per_pass``;
* counted once (not timed): the ATen operators the loop runs outside the models per target pass,
  those that launch a kernel on a GPU (``kernels``, views excluded) and all of them, against the
  operators of the model passes (target, draft model, speculator heads: CUDA graphs turn each
  model pass into one launch, never the loop's own); and
  the points where a GPU's host would wait for the device (``syncs``: on a CPU those
  ``benchmark.virtual_device`` records, on CUDA those torch's sync debug mode reports, outside
  the models either way).

``--baseline DIR`` (a checkout of another version, e.g. ``git worktree add /tmp/old <commit>``)
runs that version's ``sampling`` package (its loop and its drafters) beside this one in the same
process, every configuration of both interleaved, so that the two are compared under the same machine
noise; the ratios of the two are also taken round by round (the two runs of a round are close in time) and their median
reported (``paired_*_ratio``, on the baseline's rows), which a drifting machine moves less.

Writes raw.csv (one row per timed run), summary.csv, table.md and env.json to ``--out``; the
counts feed ``benchmark.launch_model`` (a step's time on a launch-bound device from its operators).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

import sampling
from sampling.app.cli import Parser, run
from sampling.app.models import DEFAULT_CASCADE, DEFAULT_DRAFT, DEFAULT_TARGET, load_model
from sampling.generate import DEFAULTS, default_tree

from .console import fit_markdown
from .utils_io import env_info, write_csv, write_json, write_text
from .virtual_device import VirtualDevice

CONFIGS = ("ar:1", "ar:8", "google:1", "bass:1", "bass:8", "tree:1", "tree:8", "bass:8:static")
MODES = ("ar", "google", "deepmind", "bass", "tree", "cascade")   # cascade: draft_small -> draft -> target
DRAFTERS = ("model", "mlp", "medusa", "ngram")     # the draft model, speculator heads of each kind, n-gram
VIEWS = {"slice", "select", "unsqueeze", "squeeze", "expand", "view", "_unsafe_view", "alias", "detach", "t",
         "transpose", "permute", "as_strided", "unbind", "split", "split_with_sizes", "narrow", "lift_fresh",
         "_local_scalar_dense", "_reshape_alias", "sym_size", "sym_stride", "is_same_size", "to (no copy)"}


def shrunk(path, hidden: int, seed: int):
    """A random-init model of the config at ``path`` with ``hidden`` channels (its layers, heads,
    vocabulary kept; the head dim follows)."""
    cfg = AutoConfig.from_pretrained(path)
    heads = cfg.num_attention_heads
    cfg.hidden_size, cfg.intermediate_size = hidden, 3 * hidden
    cfg.head_dim = max(2, hidden // heads // 2 * 2)                # even: rotary embeddings split it in halves
    with torch.random.fork_rng():                                 # the caller's RNG state is left alone
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


class Clock:
    """Seconds spent inside the models' forward calls (forward hooks), and whether one is running.
    Every module of a model is hooked, not only the model: a draft's lean pass
    (``sampling.cache.backends.LeanBackend``) calls its modules in a loop of the toolkit's, and what
    that loop does between them is the loop's own work."""

    def __init__(self, *models):
        self.inside, self.depth, self._t0 = 0.0, 0, 0.0
        for m in models:
            for mod in m.modules():
                mod.register_forward_pre_hook(self._enter)
                mod.register_forward_hook(self._leave)

    def _enter(self, *_):
        if self.depth == 0:
            self._t0 = time.perf_counter()
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1
        if self.depth == 0:
            self.inside += time.perf_counter() - self._t0


class OpCount(TorchDispatchMode):
    """ATen operators run outside (and inside) the models, by name."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock, self.outside, self.inside = clock, Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "to" and args and out is args[0]:
            name = "to (no copy)"                                 # already of that dtype and device: no kernel
        (self.inside if self.clock.depth else self.outside)[name] += 1
        return out


def kernels(ops: Counter) -> int:
    return sum(v for k, v in ops.items() if k not in VIEWS)


def parse_config(text: str) -> tuple[str, int, str, str]:
    """mode:batch[:cache[:drafter]] -> (mode, batch, cache, drafter); ar's drafter is "" (none)."""
    parts = text.split(":")
    ok = 2 <= len(parts) <= 4 and parts[0] in MODES and parts[1].isdigit() and int(parts[1]) >= 1 and \
        (len(parts) < 3 or parts[2] in ("dynamic", "static")) and \
        (len(parts) < 4 or (parts[3] in DRAFTERS and parts[0] not in ("ar", "cascade")))
    if not ok:
        raise ValueError(f"bad config {text!r}: mode:batch[:cache[:drafter]], mode one of {', '.join(MODES)}, "
                         f"batch >= 1, cache dynamic or static, drafter one of {', '.join(DRAFTERS)} (not for ar or "
                         f"cascade)")
    cache = parts[2] if len(parts) >= 3 else "dynamic"
    if parts[0] == "cascade":
        return parts[0], int(parts[1]), cache, "cascade"                # its two drafts (an own drafter refused)
    return parts[0], int(parts[1]), cache, "" if parts[0] == "ar" else (parts[3] if len(parts) == 4 else "model")


def drafters(names: set, target, draft, hidden: int, package=sampling, small=None) -> dict:
    """The drafter of each name: the draft model; speculator heads bound to the target (the
    embedded ones with the embedded pair, random ones of the same kind and count on shrunk models);
    an n-gram drafter; the cascade's drafts (``small``, then the draft model). ``package``: the
    ``sampling`` package whose drafters these are (a baseline's loop runs with its own)."""
    from sampling.app.models import speculator_path
    out = {"": draft, "model": draft, "cascade": [small, draft]}
    for name in names & {"mlp", "medusa"}:
        embedded = speculator_path(None, name)
        if hidden:
            with open(os.path.join(embedded, "config.json")) as f:
                n_heads = json.load(f)["n_heads"]
            with torch.random.fork_rng():
                out[name] = package.new_speculator(target, name, n_heads, seed=2)
        else:
            out[name] = package.load_speculator(embedded, target)
    if "ngram" in names:
        out["ngram"] = package.NgramDrafter()
    return out


def drafter_modules(drafter) -> list:
    """The modules whose calls count as a model's (timed apart from the loop, their operators as the
    models'): a draft model; speculator heads' layers and the target's embedding and lm_head they call."""
    if isinstance(drafter, torch.nn.Module):
        return [drafter]
    if isinstance(drafter, list):                                 # a cascade's models
        return [m for m in drafter if m is not None]
    heads = getattr(drafter, "heads", None)
    if heads is None:
        return []                                                 # n-gram: all of it is the loop's
    leaves = [m for m in heads.modules() if not list(m.children())]
    return leaves + [drafter.embedding, drafter.lm_head]


def baseline_package(checkout: str, tmp: str):
    """The ``sampling`` package of another checkout, imported as ``sampling_baseline`` (a copy under
    ``tmp``: its imports are relative, so it stays apart from this one)."""
    src = os.path.join(checkout, "sampling")
    if not os.path.isfile(os.path.join(src, "__init__.py")):
        raise ValueError(f"--baseline {checkout}: no sampling/ package there")
    shutil.copytree(src, os.path.join(tmp, "sampling_baseline"))
    for name in [m for m in sys.modules if m.split(".")[0] == "sampling_baseline"]:
        del sys.modules[name]                                     # an earlier baseline of this process
    sys.path.insert(0, tmp)
    try:
        return importlib.import_module("sampling_baseline")
    finally:
        sys.path.remove(tmp)


def cuda_syncs(fn, clock: Clock) -> int:
    """Run fn; count the synchronising CUDA calls outside the models (torch.cuda's sync debug mode
    warns at each)."""
    count = 0

    def record(message, category, *args, **kwargs):
        nonlocal count
        count += "synchroniz" in str(message).lower() and not clock.depth

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return count


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma list of mode:batch[:cache[:drafter]] (cache: dynamic | static; drafter: "
                         f"{' | '.join(DRAFTERS)}, the draft model by default)")
    ap.add_argument("--hidden", type=int, default=64,
                    help="channels of the shrunk models (their arithmetic ~ nil); 0: the embedded pair itself")
    ap.add_argument("--max_tokens", type=int, default=64, help="new tokens per row")
    ap.add_argument("--prompt_len", type=int, default=32, help="tokens of each random prompt")
    ap.add_argument("--gamma", type=int, default=4, help="draft length of the chain modes")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (median kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the host's own pace)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the shrunk models run")
    ap.add_argument("--baseline", default=None,
                    help="a checkout of another version whose loop runs beside this one, interleaved (default: none)")
    ap.add_argument("--out", required=True, help="folder for raw.csv, summary.csv, table.md, env.json (must not exist)")
    args = ap.parse_args(argv)
    configs = [parse_config(c.strip()) for c in args.configs.split(",") if c.strip()]
    if args.hidden != 0 and args.hidden < 8:
        raise ValueError(f"--hidden must be 0 (the embedded pair) or >= 8, got {args.hidden}")
    for name, value, low in (("max_tokens", args.max_tokens, 2),
                             ("prompt_len", args.prompt_len, 1), ("gamma", args.gamma, 1),
                             ("repeats", args.repeats, 1), ("threads", args.threads, 1)):
        if value < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}")
    if not configs:
        raise ValueError("--configs is empty")
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; pick another --out")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        collect(args, configs)
    finally:                              # run in-process (gpu_check): the caller's steps keep their threads
        torch.set_num_threads(before)


def collect(args, configs: list) -> None:
    """Build the models, measure every configuration of every version, write the folder."""
    if args.hidden:
        target = shrunk(DEFAULT_TARGET, args.hidden, 0).to(args.device)
        draft = shrunk(DEFAULT_DRAFT, args.hidden, 1).to(args.device)
    else:
        target, draft = (load_model(None, role, args.device, "float32") for role in ("target", "draft"))
    small = None
    if any(mode == "cascade" for mode, *_ in configs):          # the cascade's smallest draft
        small = shrunk(DEFAULT_CASCADE[0], args.hidden, 3).to(args.device) if args.hidden else \
            load_model(str(DEFAULT_CASCADE[0]), "draft", args.device, "float32")
    V = target.config.vocab_size
    prompts = {b: torch.randint(1, V, (b, args.prompt_len), generator=torch.Generator().manual_seed(b)).to(args.device)
               for _, b, _, _ in configs}                         # a batch size's prompts: the same in any --configs
    names = {d for *_, d in configs}
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"current": sampling}
        if args.baseline:
            versions["baseline"] = baseline_package(args.baseline, tmp)
        if args.baseline and names - {"", "model"}:              # the baseline drafts with its own drafters
            missing = [n for n in ("new_speculator", "load_speculator", "NgramDrafter")
                       if not hasattr(versions["baseline"], n)]
            if missing:
                raise ValueError(f"--baseline {args.baseline}: its sampling package has no {', '.join(missing)}; "
                                 f"drop the configs' drafter")
        parts = {v: drafters(names, target, draft, args.hidden, package, small) for v, package in versions.items()}
        modules = {id(m): m for p in parts.values() for d in p.values() for m in drafter_modules(d)}
        clock = Clock(target, *modules.values())
        raw, summary = measure(args, configs, versions, target, parts, clock, prompts)
    os.makedirs(args.out)
    write_csv(os.path.join(args.out, "raw.csv"), raw)
    write_csv(os.path.join(args.out, "summary.csv"), summary)
    write_json(os.path.join(args.out, "env.json"), dict(env_info(), args=vars(args), tree=DEFAULTS.tree,
                                                       target_layers=target.config.num_hidden_layers,
                                                       draft_layers=draft.config.num_hidden_layers,
                                                       device=torch.cuda.get_device_name() if args.device == "cuda"
                                                       else "cpu"))
    text = table(summary)
    write_text(os.path.join(args.out, "table.md"), text + "\n")
    print(fit_markdown(text, os.path.join(args.out, "table.md")))


def measure(args, configs, versions: dict, target, parts: dict, clock: Clock, prompts: dict):
    """Counts (untimed, after a warm-up) and timed rounds of every configuration of every version,
    interleaved; returns the raw rows and the summary. versions: name -> its ``sampling`` package;
    parts: version -> drafter name -> drafter."""
    def once(cfg, version):
        mode, b, kv, d = cfg
        generate = versions[version].generate
        # every step drafts the configured length (the controller off, where the version has one), so
        # versions run the same passes and their host work compares
        fixed = {"speculate": "always"} if "speculate" in inspect.signature(generate).parameters else {}
        return generate(target, prompts[b], draft_model=parts[version][d], mode=mode, max_new_tokens=args.max_tokens,
                        gamma=args.gamma, temperature=0, kv_cache=kv, **fixed).stats      # tree: the mode's default

    runs = [(cfg, v) for cfg in configs for v in versions]
    rows, counts = [], {}
    for one in runs:                                              # the counts (untimed), warmed up
        if args.device != "cuda":                                 # syncs on the virtual device, first: tree shapes
            package = versions[one[1]]                            # tree shapes made afresh inside, their host
            module = getattr(package, "tree_shapes", None) or getattr(package, "tree", None)   # tensors known as
            shapes = getattr(module, "_shape", None)              # such (test_devices); the warm-up below
            if shapes is not None:                                # rebuilds them for the timed runs (an earlier
                shapes.cache_clear()                              # version kept them in sampling.tree)
            with VirtualDevice(target, *drafter_modules(parts[one[1]]["cascade"])) as vd:   # the draft models
                once(*one)
            syncs = len(vd.syncs)
        once(*one)
        with OpCount(clock) as ops:
            stats = once(*one)
        if args.device == "cuda":
            syncs = cuda_syncs(lambda one=one: once(*one), clock)
        counts[one] = (ops, syncs, stats["target_calls"], stats.get("draft_calls", 0))
    for rep in range(args.repeats):                               # timed rounds, rotating order
        for cfg, v in runs[rep % len(runs):] + runs[:rep % len(runs)]:
            clock.inside = 0.0
            t0 = time.perf_counter()
            stats = once(cfg, v)
            wall = time.perf_counter() - t0
            rows.append(dict(version=v, mode=cfg[0], batch=cfg[1], kv_cache=cfg[2], draft=cfg[3], repeat=rep,
                             wall_s=wall, forward_s=clock.inside, new_tokens=stats["new_tokens"],
                             target_calls=stats["target_calls"], draft_calls=stats.get("draft_calls", 0)))
    raw = pd.DataFrame(rows)
    out = []
    for (cfg, v), (ops, syncs, calls, dcalls) in counts.items():
        mode, b, kv, d = cfg
        same = (raw["mode"] == mode) & (raw.batch == b) & (raw.kv_cache == kv) & (raw["draft"] == d)
        part = raw[(raw.version == v) & same]
        wall, host = statistics.median(part.wall_s), statistics.median(part.wall_s - part.forward_s)
        out.append(dict(version=v, mode=mode, batch=b, kv_cache=kv, draft=d,
                        tree=default_tree(parts[v][d]) if mode == "tree" else "",
                        gamma=0 if mode in ("ar", "tree") else args.gamma, target_calls=calls, draft_calls=dcalls,
                        new_tokens=int(part.new_tokens.iloc[0]), wall_ms=1000 * wall,
                        host_ms=1000 * host, host_ms_per_pass=1000 * host / calls, host_share=host / wall,
                        kernels_per_pass=kernels(ops.outside) / calls, ops_per_pass=sum(ops.outside.values()) / calls,
                        model_kernels_per_pass=kernels(ops.inside) / calls, syncs_per_pass=syncs / calls))
        if v == "baseline":                                       # round by round: the machine's drift cancels
            cur = raw[(raw.version == "current") & same]
            pair = cur.merge(part, on="repeat", suffixes=("", "_base"))
            out[-1].update(paired_wall_ratio=statistics.median(pair.wall_s / pair.wall_s_base),
                           paired_host_ratio=statistics.median((pair.wall_s - pair.forward_s)
                                                               / (pair.wall_s_base - pair.forward_s_base)))
    return raw, pd.DataFrame(out)


def table(summary: pd.DataFrame) -> str:
    """The summary as markdown; with a baseline, each figure of this version beside the baseline's."""
    cols = [("target passes", "target_calls", "{:.0f}"), ("draft passes", "draft_calls", "{:.0f}"),
            ("wall ms", "wall_ms", "{:.1f}"), ("host ms per target pass", "host_ms_per_pass", "{:.3f}"),
            ("host share of wall", "host_share", "{:.0%}"), ("loop kernels per pass", "kernels_per_pass", "{:.1f}"),
            ("models' kernels per pass", "model_kernels_per_pass", "{:.0f}"),
            ("syncs per pass", "syncs_per_pass", "{:.2f}")]
    cur = summary[summary.version == "current"].reset_index(drop=True)
    base = summary[summary.version == "baseline"].reset_index(drop=True)
    head = "| mode | drafter | batch | cache | " + \
        " | ".join(c[0] + (" (baseline -> current)" if len(base) else "") for c in cols) + " |"
    if len(base):
        head += " wall, current / baseline (median of rounds) | host ms, current / baseline (median of rounds) |"
    lines = [head, "|---|---|---:|---|" + "---:|" * (len(cols) + 2 * bool(len(base)))]
    for i, r in cur.iterrows():
        cells = [(f.format(base.loc[i, k]) + " -> " if len(base) else "") + f.format(r[k]) for _, k, f in cols]
        if len(base):
            cells += [f"{base.loc[i, 'paired_wall_ratio']:.3f}", f"{base.loc[i, 'paired_host_ratio']:.3f}"]
        lines.append(f"| {r['mode']} | {r['draft'] or '-'} | {r['batch']} | {r['kv_cache']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    run(main)
