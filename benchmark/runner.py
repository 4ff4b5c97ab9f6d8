"""Measure configurations: warm up, time each batch ``repeats`` times, keep the median run, and
return one raw row per sample; configurations that share a batching are interleaved."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, replace

from sampling import DEFAULTS, generate, pad_left
from sampling.batching import batch_order

from .runner_support import HF_MODES, hf_generate

SEQUENTIAL_MODES = ("google", "deepmind") + HF_MODES   # one prompt at a time: always batch 1
ALL_MODES = ("ar", "google", "deepmind", "bass") + HF_MODES


def parse_modes(text: str) -> list[str]:
    """A comma list of modes, case-insensitive, checked."""
    modes = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {', '.join(bad) or '(none)'}; choose from {', '.join(ALL_MODES)}")
    return list(dict.fromkeys(modes))


def prepare(args):
    """Dataset, models and encoded prompts for eval_dolly and run_experiment (their shared flags):
    (prompts, meta, target, draft, tokenizer)."""
    from sampling.cli import load_pair
    from sampling.generate import max_positions

    from .utils_io import load_dolly
    records = load_dolly(args.dataset_path, args.skip_bad_lines)
    if args.samples > len(records):
        print(f"note: --samples {args.samples} is more than the {len(records)} records; using all of them")
    records = records[:args.samples]
    target, draft, tok = load_pair(args, need_draft=any(m not in ("ar", "hf") for m in args.modes))
    prompts, meta = encode_records(records, tok, max_positions(target), args.max_tokens)
    if not prompts:
        raise ValueError("no record fits the model's positions")
    return prompts, meta, target, draft, tok


def encode_records(records: list[dict], tokenizer, limit: int | None, reserve: int, warn=print):
    """Token ids and meta (sample, category) of each record's prompt; records whose prompt plus
    ``reserve`` positions exceed the model's ``limit`` are skipped and counted."""
    from .utils_io import render_prompt
    prompts, meta, skipped = [], [], 0
    for i, rec in enumerate(records):
        ids = tokenizer(render_prompt(rec))["input_ids"]
        if limit is not None and len(ids) + reserve > limit:
            skipped += 1
            continue
        prompts.append(ids)
        meta.append(dict(sample=i, category=rec.get("category", "")))
    if skipped:
        warn(f"note: skipped {skipped} record(s) whose prompt + {reserve} tokens exceed {limit} positions")
    return prompts, meta


@dataclass(frozen=True)
class RunConfig:
    mode: str                 # ar | google | deepmind | bass | hf | hf_assisted
    batch: int                # prompts per batch (1 for the one-at-a-time modes)
    gamma: int                # draft length (the start of adaptive schedules); 0 for ar / hf
    gamma_schedule: str       # constant | bass | aimd
    temperature: float        # 0 is greedy
    sort_batch: bool          # group prompts of similar length
    max_tokens: int           # new tokens per prompt
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1.0: off
    seed: int = 0             # seed of batch i is seed + i, the same in every repeat
    finished_rows: str = DEFAULTS.finished_rows  # bass: drop finished rows or keep them masked

    def key(self) -> tuple:
        return (self.mode, self.batch, self.gamma, self.gamma_schedule, float(self.temperature),
                bool(self.sort_batch), self.finished_rows)


def batching_of(cfg: RunConfig) -> tuple[int, bool]:
    """Configurations with the same batching run the same batches of prompts."""
    return cfg.batch, cfg.sort_batch


def run_grid(cfgs: list[RunConfig], prompts: list[list[int]], meta: list[dict], target, draft, tokenizer,
             repeats: int = 3, progress=None):
    """Yield the raw rows (one per prompt and configuration) of each group of configurations that
    share a batching, one group at a time.

    Within a group the configurations are interleaved: each batch runs once under every
    configuration, ``repeats`` rounds (the order rotating per round), and each configuration keeps
    its median run per batch. Ratios within a group are so measured side by side, and a machine
    that drifts during a sweep slows every configuration of a group alike.
    """
    groups: dict[tuple, list[RunConfig]] = {}
    for cfg in cfgs:
        groups.setdefault(batching_of(cfg), []).append(cfg)
    for (batch, sort_batch), group in groups.items():
        batches = batch_order(prompts, batch, sort_batch)
        runners = [_runner(cfg, prompts, target, draft, tokenizer) for cfg in group]
        for cfg, once in zip(group, runners):
            once(batches[0], 0, min(4, cfg.max_tokens))   # warm-up, not timed
        rows = {cfg: [] for cfg in group}
        for bid, idx in enumerate(batches):
            runs = [[] for _ in group]
            for rep in range(repeats):
                for k in [(k + rep) % len(group) for k in range(len(group))]:
                    runs[k].append(runners[k](idx, bid, group[k].max_tokens))
            for cfg, cfg_runs in zip(group, runs):
                tokens, st = sorted(cfg_runs, key=lambda r: r[1]["wall_time_s"])[len(cfg_runs) // 2]
                rows[cfg] += _rows(cfg, idx, bid, tokens, st, prompts, meta)
            if progress is not None:
                progress.update(len(idx) * len(group))
        yield [r for cfg in group for r in rows[cfg]]


def _runner(cfg: RunConfig, prompts, target, draft, tokenizer):
    """once(idx, bid, max_tokens) -> (tokens, stats): one timed generation of prompts[idx]."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(target.parameters()).device

    def once(idx, bid, max_tokens):
        if cfg.mode in HF_MODES:
            ids = pad_left([prompts[idx[0]]], pad, device)[0]
            new, st = hf_generate(target, ids, replace(cfg, max_tokens=max_tokens),
                                  eos, pad, draft if cfg.mode == "hf_assisted" else None)
            return [new], dict(st, rows=[dict(target_calls=float("nan"), accepted=0, drafted=0)])
        ids, mask = pad_left([prompts[i] for i in idx], pad, device)
        res = generate(target, ids, mask, draft_model=draft, mode=cfg.mode, max_new_tokens=max_tokens,
                       gamma=cfg.gamma or None, temperature=cfg.temperature, top_k=cfg.top_k,
                       top_p=cfg.top_p, eos_token_id=eos, seed=cfg.seed + bid,
                       gamma_schedule=cfg.gamma_schedule, finished_rows=cfg.finished_rows)
        st = res.stats
        st["prompt_padding"] = 1.0 - mask.float().mean().item()
        if "rows" not in st:                              # ar: one target call per token
            st["rows"] = [dict(target_calls=len(t), accepted=0, drafted=0) for t in res.tokens]
        return res.tokens, st
    return once


def _rows(cfg: RunConfig, idx, bid, tokens, st, prompts, meta) -> list[dict]:
    """The raw rows of one timed batch."""
    trace = st.get("gamma_trace") or [cfg.gamma]
    out = []
    for j, i in enumerate(idx):
        r = st["rows"][j]
        out.append(dict(asdict(cfg), **meta[i], batch_id=bid, prompt_tokens=len(prompts[i]),
                        new_tokens=len(tokens[j]), wall_time_s=st["wall_time_s"],
                        ttft_s=st["ttft_s"], target_calls=r["target_calls"],
                        accepted=r["accepted"], drafted=r["drafted"],
                        padding_fraction=st.get("padding_fraction", st.get("prompt_padding", 0.0)),
                        prompt_padding=st.get("prompt_padding", 0.0),
                        rows_verified=st.get("rows_verified", float("nan")),
                        mean_gamma=statistics.mean(trace) if cfg.mode not in ("ar", "hf") else 0.0,
                        tokens=" ".join(map(str, tokens[j]))))
    return out
