"""The refactor guard: the token ids every configuration of the toolkit produces on fixed inputs.

Every mode x drafter x cache x (greedy, seeded sampling), plus the options that take other code
paths (filters, per-row parameters, schedules, finished rows masked, presses, EOS, per-row budgets,
rows joining a running batch, other architectures), on tiny random-init float32 models, eager
passes, each with its own explicit gamma and schedule. ``tests/test_guard.py`` asserts that the
outputs equal those recorded in ``tests/fixtures/guard.json``: a change of structure must leave
every token where it was.

A change that alters outputs on purpose re-records them and says which configurations moved and why:

    python tests/guard.py --record        # rewrites tests/fixtures/guard.json (one thread, as the tests)
    python tests/guard.py --check         # lists the configurations whose outputs differ from the record
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from tiny import left_padded_batch, noisy_copy, tiny_model  # noqa: E402

import sampling  # noqa: E402

RECORD = os.path.join(HERE, "fixtures", "guard.json")
LENGTHS = (5, 9, 3, 7)             # a left-padded batch of mixed lengths
NEW = 10                           # new tokens per row
SEED = 1234
CACHES = ("dynamic", "static")
TEMPS = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, seed=SEED)}


@functools.cache
def models(arch: str = "llama"):
    """(target, draft, smaller draft) in float32: the drafts agree with the target part of the time."""
    target = tiny_model(arch, seed=0, dtype=torch.float32)
    return target, noisy_copy(target, 0.3, seed=1), noisy_copy(target, 0.6, seed=2)


def drafter(name: str, arch: str = "llama"):
    """What ``generate(draft_model=...)`` takes for a drafter name; heads are made afresh (seeded)."""
    target, draft, small = models(arch)
    if name == "model":
        return draft
    if name == "ngram":
        return sampling.NgramDrafter()
    if name in ("mlp", "medusa"):
        return sampling.new_speculator(target, name, n_heads=3, seed=5, noise=0.05)
    if name == "cascade":
        return [small, draft]
    return None


def configurations() -> dict[str, dict]:
    """Name -> the configuration: generate's keyword arguments plus drafter, arch and extras."""
    out = {}
    base = {"ar": [""], "google": ["model", "ngram", "mlp", "medusa"], "deepmind": ["model", "ngram", "mlp", "medusa"],
            "bass": ["model", "ngram", "mlp", "medusa"], "cascade": ["cascade"]}
    trees = {"model-static": ("model", "3,2,1"), "model-dynamic": ("model", "dynamic:8:3:2"),
             "mlp": ("mlp", "2,2,1"), "medusa": ("medusa", "3,1,1")}
    for cache in CACHES:
        for temp, kw in TEMPS.items():
            common = dict(kv_cache=cache, **kw)
            for mode, drafts in base.items():
                for d in drafts:
                    out[f"{mode}/{d or 'none'}/{cache}/{temp}"] = dict(common, mode=mode, drafter=d, gamma=3,
                                                                      gamma_schedule="constant")
            for name, (d, tree) in trees.items():
                out[f"tree/{name}/{cache}/{temp}"] = dict(common, mode="tree", drafter=d, tree=tree)
    sampled = TEMPS["sampled"]
    extras = {
        "bass/model/schedule-bass": dict(mode="bass", drafter="model", gamma=2, gamma_schedule="bass", **sampled),
        "bass/model/schedule-aimd": dict(mode="bass", drafter="model", gamma=5, gamma_schedule="aimd", **sampled),
        "google/model/schedule-bass": dict(mode="google", drafter="model", gamma=2, gamma_schedule="bass", **sampled),
        "bass/model/mask": dict(mode="bass", drafter="model", gamma=3, finished_rows="mask", **sampled),
        "tree/model/mask": dict(mode="tree", drafter="model", tree="dynamic:8:3:2", finished_rows="mask", **sampled),
        "bass/model/filters": dict(mode="bass", drafter="model", gamma=3, temperature=0.8, top_k=20, top_p=0.9,
                                   min_p=0.02, seed=SEED),
        "bass/model/repetition": dict(mode="bass", drafter="model", gamma=3, repetition_penalty=1.3, **sampled),
        "tree/model/repetition": dict(mode="tree", drafter="model", tree="2,2", repetition_penalty=1.3, **sampled),
        "tree/model-dynamic/repetition": dict(mode="tree", drafter="model", tree="dynamic:6:3:2",
                                              repetition_penalty=1.3, **sampled),
        "tree/mlp/repetition": dict(mode="tree", drafter="mlp", tree="2,1", repetition_penalty=1.3, **sampled),
        "ar/none/repetition-greedy": dict(mode="ar", drafter="", repetition_penalty=1.3, temperature=0.0),
        "tree/model/paths": dict(mode="tree", drafter="model", tree="paths:0,1,2,0.0,0.1,1.0,0.0.0", **sampled),
        "tree/model/sharpen": dict(mode="tree", drafter="model", tree="dynamic:8:3:3:2.5", **sampled),
        "cascade/cascade/gamma": dict(mode="cascade", drafter="cascade", gamma=4, cascade_gamma=2, **sampled),
        "cascade/cascade/schedule-aimd": dict(mode="cascade", drafter="cascade", gamma=4, gamma_schedule="aimd",
                                              **sampled),
        "bass/model/eos": dict(mode="bass", drafter="model", gamma=3, eos_token_id=7, **sampled),
        "tree/model/eos": dict(mode="tree", drafter="model", tree="dynamic:8:3:2", eos_token_id=7, **sampled),
        "ar/none/budgets": dict(mode="ar", drafter="", max_new_tokens=[3, 10, 1, 6], **sampled),
        "bass/model/budgets": dict(mode="bass", drafter="model", gamma=3, max_new_tokens=[3, 10, 1, 6], **sampled),
        "tree/model/budgets": dict(mode="tree", drafter="model", tree="3,2,1", max_new_tokens=[3, 10, 1, 6], **sampled),
        "google/model/budgets": dict(mode="google", drafter="model", gamma=3, max_new_tokens=[3, 10, 1, 6], **sampled),
    }
    mixed = dict(temperature=[0.0, 1.0, 0.7, 1.3], top_k=[0, 0, 5, 0], top_p=[1.0, 1.0, 1.0, 0.8], seed=SEED)
    for mode, d, extra in (("ar", "", {}), ("bass", "model", dict(gamma=3)), ("bass", "mlp", dict(gamma=3)),
                           ("google", "model", dict(gamma=3)), ("tree", "model", dict(tree="dynamic:8:3:2")),
                           ("tree", "medusa", dict(tree="2,2,1"))):
        extras[f"{mode}/{d or 'none'}/per-row"] = dict(mode=mode, drafter=d, **extra, **mixed)
    presses = {"knorm-draft": sampling.PressSpec("knorm", ratio=0.3, budget=8, on="draft"),
               "snapkv-target": sampling.PressSpec("snapkv", ratio=0.4, budget=10, on="target", window=3),
               "streaming-both": sampling.PressSpec("streaming", ratio=0.5, on="both", sinks=1),
               "hybrid-draft": sampling.PressSpec("hybrid", ratio=0.2, budget=9, on="draft", sinks=1, window=3)}
    for cache in CACHES:
        for name, press in presses.items():
            extras[f"bass/model/press-{name}/{cache}"] = dict(mode="bass", drafter="model", gamma=3, press=press,
                                                             kv_cache=cache, **sampled)
        extras[f"ar/none/press-knorm-target/{cache}"] = dict(mode="ar", drafter="", kv_cache=cache, **sampled,
                                                             press=sampling.PressSpec("knorm", 0.3, 8, "target"))
        extras[f"tree/model/press-hybrid-both/{cache}"] = dict(
            mode="tree", drafter="model", tree="dynamic:8:3:2", kv_cache=cache, **sampled,
            press=sampling.PressSpec("hybrid", 0.3, 10, "both", sinks=1, window=3))
        extras[f"google/model/press-knorm-draft/{cache}"] = dict(mode="google", drafter="model", gamma=3,
                                                                 kv_cache=cache, press=presses["knorm-draft"],
                                                                 **sampled)
    for arch in ("gpt2", "bloom", "opt", "gpt_neox"):
        for temp, kw in TEMPS.items():
            extras[f"bass/model/{arch}/{temp}"] = dict(mode="bass", drafter="model", gamma=3, arch=arch, **kw)
            extras[f"ar/none/{arch}/{temp}"] = dict(mode="ar", drafter="", arch=arch, **kw)
            if arch != "bloom":
                extras[f"tree/model/{arch}/{temp}"] = dict(mode="tree", drafter="model", tree="dynamic:8:3:2",
                                                           arch=arch, **kw)
                extras[f"tree/mlp/{arch}/{temp}"] = dict(mode="tree", drafter="mlp", tree="2,2,1", arch=arch, **kw)
    for mode, d in (("ar", ""), ("bass", "model"), ("bass", "ngram")):
        for temp, kw in TEMPS.items():
            extras[f"{mode}/{d or 'none'}/joining/{temp}"] = dict(mode=mode, drafter=d, gamma=3, joining=True, **kw)
    out.update(extras)
    return out


class Joining:
    """A row streamer that admits two requests at step 2 and one at step 4 (continuous batching)."""

    def __init__(self, prompts: list[list[int]], temperature: float):
        from sampling.rows import NewRow
        params = sampling.SamplingParams(temperature=temperature)
        self.later = {2: [NewRow(prompts[0], 8, params), NewRow(prompts[1], 5, params)],
                      4: [NewRow(prompts[2], 6, params)]}
        self.step = 0

    def put_row(self, row, tokens):
        pass

    def stopped(self, row):
        return False

    def end(self):
        pass

    def admit(self, live):
        self.step += 1
        return self.later.pop(self.step, [])


def run(cfg: dict) -> list[list[int]]:
    """The token ids of one configuration."""
    cfg = dict(cfg)
    arch, d, joining = cfg.pop("arch", "llama"), cfg.pop("drafter"), cfg.pop("joining", False)
    target = models(arch)[0]
    ids, mask = left_padded_batch(97, LENGTHS, seed=3)
    cfg.setdefault("max_new_tokens", NEW)
    if joining:
        extra, extra_mask = left_padded_batch(97, (11, 2, 6), seed=4)
        prompts = [row[m.bool()].tolist() for row, m in zip(extra, extra_mask)]
        cfg["streamer"] = Joining(prompts, cfg["temperature"])
    with torch.random.fork_rng():
        res = sampling.generate(target, ids, mask, draft_model=drafter(d, arch), **cfg)
    return res.tokens


def record_all() -> dict[str, list[list[int]]]:
    torch.set_num_threads(1)
    return {name: run(cfg) for name, cfg in configurations().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help=f"rewrite {os.path.relpath(RECORD)}")
    ap.add_argument("--check", action="store_true", help="list the configurations that differ from the record")
    args = ap.parse_args()
    if args.record == args.check:
        ap.error("give --record or --check")
    got = record_all()
    if args.record:
        with open(RECORD, "w") as f:
            json.dump(got, f, indent=0, sort_keys=True)
            f.write("\n")
        print(f"recorded {len(got)} configurations in {RECORD}")
        return
    with open(RECORD) as f:
        want = json.load(f)
    moved = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    print("\n".join(moved) if moved else f"all {len(got)} configurations as recorded")
    sys.exit(1 if moved else 0)


if __name__ == "__main__":
    main()
