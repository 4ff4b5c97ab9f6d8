"""Measure one configuration: warm up, time each batch ``repeats`` times, keep the median run,
and return one raw row per sample."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, replace

from sampling import generate, pad_left
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

    def key(self) -> tuple:
        return (self.mode, self.batch, self.gamma, self.gamma_schedule, float(self.temperature),
                bool(self.sort_batch))


def run_config(cfg: RunConfig, prompts: list[list[int]], meta: list[dict], target, draft, tokenizer,
               repeats: int = 3, progress=None) -> list[dict]:
    """Raw rows (one per prompt) of one configuration. ``meta[i]`` carries sample and category."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(target.parameters()).device
    batches = batch_order(prompts, cfg.batch, cfg.sort_batch)

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
                       gamma_schedule=cfg.gamma_schedule)
        st = res.stats
        st["prompt_padding"] = 1.0 - mask.float().mean().item()
        if "rows" not in st:                              # ar: one target call per token
            st["rows"] = [dict(target_calls=len(t), accepted=0, drafted=0) for t in res.tokens]
        return res.tokens, st

    once(batches[0], 0, min(4, cfg.max_tokens))           # warm-up, not timed
    rows = []
    for bid, idx in enumerate(batches):
        runs = [once(idx, bid, cfg.max_tokens) for _ in range(repeats)]
        tokens, st = sorted(runs, key=lambda r: r[1]["wall_time_s"])[len(runs) // 2]
        trace = st.get("gamma_trace") or [cfg.gamma]
        for j, i in enumerate(idx):
            r = st["rows"][j]
            rows.append(dict(asdict(cfg), **meta[i], batch_id=bid, prompt_tokens=len(prompts[i]),
                             new_tokens=len(tokens[j]), wall_time_s=st["wall_time_s"],
                             ttft_s=st["ttft_s"], target_calls=r["target_calls"],
                             accepted=r["accepted"], drafted=r["drafted"],
                             padding_fraction=st.get("padding_fraction", st.get("prompt_padding", 0.0)),
                             prompt_padding=st.get("prompt_padding", 0.0),
                             mean_gamma=statistics.mean(trace) if cfg.mode not in ("ar", "hf") else 0.0,
                             tokens=" ".join(map(str, tokens[j]))))
        if progress is not None:
            progress.update(len(idx))
    return rows
