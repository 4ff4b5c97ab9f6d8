"""Measure configurations: warm up, time each batch ``repeats`` times, keep the median run, and
return one raw row per sample; configurations that share a batching are interleaved."""
from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import asdict, dataclass

import torch

from sampling import DEFAULTS, PressSpec, generate, pad_left
from sampling.app.batching import batch_order
from sampling.app.cli import DRAFT_KINDS
from sampling.modes import MODES, MODES_TABLE
from sampling.utils import model_device

from .metrics import cost_key
from .runner_support import HF_MODES, hf_generate, measure_cost
from .shard import Shard

HF_OPTIONS = {"hf": (), "hf_assisted": ("gamma",), "hf_prompt_lookup": ("gamma",)}   # what transformers' modes read
ALL_MODES = MODES + HF_MODES
SEQUENTIAL_MODES = tuple(m for m in MODES if MODES_TABLE[m].one_row) + HF_MODES   # one prompt at a time: batch 1
DRAFTLESS_MODES = tuple(m for m in MODES if not MODES_TABLE[m].drafters) + ("hf", "hf_prompt_lookup")   # draft ""
REPEATS = 3          # timed runs of each batch under each configuration (the median is kept)
SAMPLES = 32         # records from the top of the dataset


def reads(mode: str, option: str) -> bool:
    """Whether a mode reads one of generate's options (gamma, schedule, tree, finished_rows,
    cascade_gamma): the table of modes (``sampling.modes``), or what transformers' modes take."""
    return option in (MODES_TABLE[mode].options if mode in MODES_TABLE else HF_OPTIONS[mode])


def compile_of(compile: bool | str, mode: str, kv: str) -> bool | str:
    """What a configuration compiles: --compile (all) with the static cache only; --compile draft in
    a mode with drafts (``Mode.compiles``; transformers' modes compile nothing here)."""
    if mode not in MODES_TABLE:
        return False
    return MODES_TABLE[mode].compiles(compile) if compile == "draft" else compile is True and kv == "static"


def drafts_of(mode: str, drafts: list[str]) -> list[str]:
    """The drafters (``RunConfig.draft``) a mode runs with, of the --draft names ``drafts``: "" for a
    mode without one, "model" for hf_assisted, "cascade" for mode cascade (its --cascade models),
    else those of ``drafts`` that can draft for it."""
    if mode in DRAFTLESS_MODES:
        return [""]
    if mode == "hf_assisted":
        return ["model"]
    if MODES_TABLE[mode].drafters == ("cascade",):
        return ["cascade"]
    return [d for d in drafts if DRAFT_KINDS[d] in MODES_TABLE[mode].drafters]


def parse_modes(text: str) -> list[str]:
    """A comma list of modes, case-insensitive, checked."""
    modes = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {', '.join(bad) or '(none)'}; choose from {', '.join(ALL_MODES)}")
    return list(dict.fromkeys(modes))


def add_bench_args(ap) -> None:
    """The flags eval_dolly and run_experiment share: the dataset, repeats, the output folder, the table."""
    ap.add_argument("--dataset_path", default=None,
                    help="local Dolly-format jsonl (instruction, context, response, category per line); "
                         "default: the hub dataset databricks/databricks-dolly-15k through `datasets`")
    ap.add_argument("--skip_bad_lines", action="store_true",
                    help="warn about malformed lines and skip them instead of stopping")
    ap.add_argument("--samples", type=int, default=SAMPLES, help="how many records, from the top of the file")
    ap.add_argument("--prompt_tokens", type=int, default=None,
                    help="long-context runs: every prompt exactly this many tokens, its record's prompt after the "
                         "text of the records that follow it in the file (default: each record's prompt as is)")
    ap.add_argument("--repeats", type=int, default=REPEATS,
                    help="timed runs of each batch per configuration after one warm-up; the median is kept")
    ap.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    ap.add_argument("--wide", action="store_true",
                    help="print the console table whole (by default it keeps the columns that fit 120 characters "
                         "and names the others, which summary.csv holds)")


def check_out(out: str | None, resume: bool, overwrite: bool) -> None:
    """Refuse to write over earlier results unless told to (--resume continues them, --overwrite replaces them)."""
    if out and os.path.exists(os.path.join(out, "raw.csv")) and not (resume or overwrite):
        raise ValueError(f"{out}/raw.csv exists; pass --resume to continue that run, --overwrite to replace "
                         f"it, or another --out")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")


@dataclass
class Prepared:
    prompts: list[list[int]]    # token ids of each kept record's prompt
    meta: list[dict]            # sample (the record's index in the dataset) and category of each
    target: object
    drafts: dict                # drafter name (sampling.app.cli.DRAFTS) -> drafter; empty when no mode needs one
    tokenizer: object
    vocab: int | None           # the shared vocabulary (generate's vocab_size)
    fingerprint: str            # sha256 of the prompts' token ids: the same data, tokenizer and template
    shard: Shard = Shard()      # this process's share of an accelerate launch (one process: everything)
    baseline: object = None     # the target in --baseline_dtype (run_experiment), for AR beside the sweep

    @property
    def draft(self):
        """The draft model (None when not loaded): hf_assisted's assistant and the step costs."""
        return self.drafts.get("model")


def prepare(args, modes, drafts: list[str]) -> Prepared:
    """Dataset, models, drafters and encoded prompts for eval_dolly and run_experiment (their shared
    flags). The draft model's tokenizer is checked before any mode runs, hf_assisted included."""
    from sampling.app.cli import load_pair, placement_of
    from sampling.app.dolly import load_dolly
    from sampling.utils import max_positions
    shard = Shard.launched(args)                                 # before loading: the process's GPU
    records = all_records = load_dolly(args.dataset_path, args.skip_bad_lines)
    if args.samples > len(records) and shard.main:
        print(f"note: --samples {args.samples} is more than the {len(records)} records; using all of them")
    records = records[:args.samples]
    drafts = [d for d in drafts if any(drafts_of(m, [d]) == [d] for m in modes)]
    if "hf_assisted" in modes and "model" not in drafts:
        drafts.append("model")                                  # the assistant
    target, loaded, tok, vocab = load_pair(args, need_draft=bool(drafts), drafts=drafts or None)
    loaded = loaded or {}
    if "cascade" in modes:                                      # its drafts, smallest first (--cascade)
        from sampling.app.models import load_cascade
        loaded["cascade"], cascade_vocab = load_cascade(args.cascade, tok, target, args.device, args.dtype,
                                                       placement_of(args))
        vocab = vocab or cascade_vocab
    length = getattr(args, "prompt_tokens", None)              # (add_bench_args; the profilers lack it)
    if length is not None:
        if length < 1:
            raise ValueError(f"--prompt_tokens must be >= 1, got {length}")
        records = [dict(r, filler=filler_text(all_records, i + 1)) for i, r in enumerate(records)]
    prompts, meta = encode_records(records, tok, max_positions(target), args.max_tokens, length=length,
                                   warn=print if shard.main else lambda _: None)
    if not prompts:
        raise ValueError("no record fits the model's positions")
    fingerprint = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    baseline = None
    if getattr(args, "baseline_dtype", None):                   # (run_experiment's flag)
        from sampling.app.models import load_model
        baseline = load_model(args.target_model_name, "target", args.device, args.baseline_dtype, placement_of(args))
    return Prepared(prompts, meta, target, loaded, tok, vocab, fingerprint, shard, baseline)


def filler_text(records: list[dict], start: int, chars: int = 20_000) -> str:
    """Text of the records from ``start`` on (wrapping round), to stand before a long prompt."""
    parts, n, i = [], 0, start
    while n < chars and len(parts) < len(records):
        r = records[i % len(records)]
        parts.append("\n\n".join(x for x in (r["instruction"], r.get("context", ""), r.get("response", "")) if x))
        n, i = n + len(parts[-1]), i + 1
    return "\n\n".join(parts) + "\n\n"


def encode_records(records: list[dict], tokenizer, limit: int | None, reserve: int, warn=print,
                   length: int | None = None):
    """Token ids and meta (sample, category) of each record's prompt; records whose prompt plus
    ``reserve`` positions exceed the model's ``limit`` are skipped and counted. ``length``: every
    prompt cut to exactly that many tokens from the left, after its record's ``filler`` text."""
    from sampling.app.dolly import render_prompt
    prompts, meta, skipped = [], [], 0
    for i, rec in enumerate(records):
        ids = tokenizer(render_prompt(rec))["input_ids"]
        if length is not None:
            ids = (tokenizer(rec.get("filler", ""), verbose=False)["input_ids"] + ids)[-length:]
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
    mode: str                 # ar | google | deepmind | bass | tree | hf | hf_assisted | hf_prompt_lookup
    batch: int                # prompts per batch (1 for the one-at-a-time modes)
    gamma: int                # draft length (the start of adaptive schedules); 0 for ar / hf
    gamma_schedule: str       # constant | bass | aimd
    temperature: float        # 0 is greedy
    sort_batch: bool          # group prompts of similar length
    max_tokens: int           # new tokens per prompt
    top_k: int = DEFAULTS.top_k                  # 0: off
    top_p: float = DEFAULTS.top_p                # 1.0: off
    min_p: float = DEFAULTS.min_p                # 0: off
    repetition_penalty: float = DEFAULTS.repetition_penalty   # 1.0: off
    seed: int = 0             # seed of batch i is seed + i, the same in every repeat
    finished_rows: str = DEFAULTS.finished_rows  # bass, tree: drop finished rows or keep them masked
    tree: str = ""            # tree: branching factors per depth ("" for the other modes)
    draft: str = "model"      # the drafter (--draft's names; "cascade" for mode cascade); "" for modes without one
    kv_cache: str = DEFAULTS.kv_cache   # dynamic | static (the hf modes: their own cache)
    compile: bool | str = DEFAULTS.compile   # static cache: decode passes compiled; "draft": the draft's only
    press: str = ""           # KV-cache press, PressSpec.label() ("" none; sampling.press)
    speculate: str = DEFAULTS.speculate   # auto: the controller picks each step's draft length; always: off;
                                          # "" for modes without drafts
    dtype: str = ""           # "": the run's --dtype; else AR's target in run_experiment's --baseline_dtype

    def key(self) -> tuple:
        """Every field: a raw row is reused (--resume) only by the very same configuration."""
        return tuple(normalise(v) for v in asdict(self).values())


def normalise(v):
    """A value as read back from raw.csv compares equal to the one written."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def batching_of(cfg: RunConfig) -> tuple[int, bool]:
    """Configurations with the same batching run the same batches of prompts."""
    return cfg.batch, cfg.sort_batch


def units_of(cfgs: list[RunConfig], together: bool = False) -> list[list[tuple[tuple, list[RunConfig]]]]:
    """What ``run_grid`` measures and yields at a time, in its order: each unit a list of (batching,
    its configurations) groups (one group, or every group with ``together``)."""
    groups: dict[tuple, list[RunConfig]] = {}
    for cfg in cfgs:
        groups.setdefault(batching_of(cfg), []).append(cfg)
    items = list(groups.items())
    return [items] if together else [[item] for item in items]


def run_grid(cfgs: list[RunConfig], data: Prepared, repeats: int = REPEATS, progress=None,
             costs: dict | None = None, together: bool = False):
    """Yield the raw rows (one per prompt and configuration) of each group of configurations that
    share a batching, one group at a time.

    Each configuration first runs the group's first batch untimed, at its full budget (warm-up on
    its shapes). Then the configurations are interleaved: each batch runs once under every
    configuration, ``repeats`` rounds (the order rotating per round), and each configuration keeps
    its median run per batch. Ratios within a group are so measured side by side, and a machine
    that drifts during a sweep slows every configuration of a group alike. ``together``: the
    groups too are interleaved, round by round (each round runs every group's batches, the groups'
    order rotating), so that ratios across batch sizes are also measured side by side; the rows
    then come once every round has run. ``costs`` (a dict): the step costs of the group's batch
    size and gammas are measured after its warm-up, beside it.
    Under ``accelerate launch`` (``data.shard``) each process times its share of the batches (the
    same batches, ids and seeds as one process) and every process gets the group's rows, in the
    order one process makes them; ``progress`` and ``costs`` are then the main process's.
    """
    shard = data.shard
    for unit in units_of(cfgs, together):
        plans = []                                       # per group: its configurations, batches, runners
        for (batch, sort_batch), group in unit:
            mine = shard.mine(list(enumerate(batch_order(data.prompts, batch, sort_batch))))
            runners = [_runner(cfg, data) for cfg in group]
            for once in runners:
                if mine:
                    once(mine[0][1], mine[0][0])         # warm-up on its shapes, not timed
            if costs is not None and data.draft is not None and shard.main:
                for g in sorted({c.gamma for c in group if c.draft == "model" and c.mode != "tree"}):
                    if cost_key(batch, g) not in costs:
                        costs[cost_key(batch, g)] = measure_cost(data.target, data.draft, batch, g)
            plans.append((group, mine, runners))
        runs: dict[tuple, list] = {}                     # (group, batch id, configuration) -> runs, round order
        for gi, bid, idx, k in schedule(plans, repeats, together):
            runs.setdefault((gi, bid, k), []).append(plans[gi][2][k](idx, bid))
            if progress is not None:                     # prompts x configurations x rounds
                progress.update(len(idx) * shard.size)   # the others keep about the same pace
        for gi, (group, mine, _) in enumerate(plans):
            rows = []                                    # (configuration, batch id, its raw rows)
            for bid, idx in mine:
                for k, cfg in enumerate(group):
                    cfg_runs = runs[gi, bid, k]
                    tokens, st = sorted(cfg_runs, key=lambda r: r[1]["wall_time_s"])[len(cfg_runs) // 2]
                    walls = [r[1]["wall_time_s"] for r in cfg_runs]             # round by round
                    rows.append((k, bid, _rows(cfg, idx, bid, tokens, st, data, walls)))
            rows = sorted(shard.gather(rows), key=lambda r: r[:2])
            yield [r for _, _, batch_rows in rows for r in batch_rows]


def schedule(plans: list, repeats: int, together: bool):
    """(group, batch id, prompt indices, configuration) in the order they run: one group alone, each
    batch's rounds back to back; groups together, round by round over every group's batches."""
    def rotated(n: int, rep: int) -> list[int]:
        return [(k + rep) % n for k in range(n)]
    if not together:
        for gi, (group, mine, _) in enumerate(plans):
            for bid, idx in mine:
                for rep in range(repeats):
                    for k in rotated(len(group), rep):
                        yield gi, bid, idx, k
        return
    for rep in range(repeats):
        for gi in rotated(len(plans), rep):
            group, mine, _ = plans[gi]
            for bid, idx in mine:
                for k in rotated(len(group), rep):
                    yield gi, bid, idx, k


def _runner(cfg: RunConfig, data: Prepared):
    """once(idx, bid) -> (tokens, stats): one timed generation of prompts[idx]."""
    tok, target, draft = data.tokenizer, data.baseline if cfg.dtype else data.target, data.drafts.get(cfg.draft)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    device = model_device(target)

    def once(idx, bid):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if cfg.mode in HF_MODES:
            ids = pad_left([data.prompts[idx[0]]], pad, device)[0]
            new, st = hf_generate(target, ids, cfg, eos, pad, draft if cfg.mode == "hf_assisted" else None)
            tokens, st = [new], dict(st, rows=[dict(target_calls=float("nan"), accepted=0, drafted=0)])
        else:
            ids, mask = pad_left([data.prompts[i] for i in idx], pad, device)
            res = generate(target, ids, mask, draft_model=draft, mode=cfg.mode, max_new_tokens=cfg.max_tokens,
                           gamma=cfg.gamma or None, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty,
                           eos_token_id=eos, seed=cfg.seed + bid, gamma_schedule=cfg.gamma_schedule,
                           finished_rows=cfg.finished_rows, vocab_size=data.vocab, tree=cfg.tree or None,
                           kv_cache=cfg.kv_cache, compile=cfg.compile, press=PressSpec.from_label(cfg.press),
                           **({"speculate": cfg.speculate} if cfg.speculate else {}))
            tokens, st = res.tokens, res.stats
            st["prompt_padding"] = 1.0 - mask.float().mean().item()
        st["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                              else float("nan"))
        return tokens, st
    return once


def _rows(cfg: RunConfig, idx, bid, tokens, st, data: Prepared, walls: list[float]) -> list[dict]:
    """The raw rows of one timed batch: the configuration, the record, the counts, ids and text, the
    median run's wall time and every round's (``round_walls``, in round order)."""
    trace = st.get("gamma_trace") or [cfg.gamma]
    out = []
    for j, i in enumerate(idx):
        r = st["rows"][j]
        out.append(dict(asdict(cfg), **data.meta[i], batch_id=bid, process=data.shard.rank,
                        prompt_tokens=len(data.prompts[i]),
                        new_tokens=len(tokens[j]), wall_time_s=st["wall_time_s"],
                        round_walls=" ".join(f"{w:.9g}" for w in walls),
                        ttft_s=st["ttft_s"], ttft_tokens=st.get("ttft_tokens", float("nan")),
                        target_calls=r["target_calls"],
                        accepted=r["accepted"], drafted=r["drafted"],
                        padding_fraction=st.get("padding_fraction", st.get("prompt_padding", 0.0)),
                        prompt_padding=st.get("prompt_padding", 0.0),
                        rows_verified=st.get("rows_verified", float("nan")),
                        mean_gamma=statistics.mean(trace) if cfg.mode not in DRAFTLESS_MODES else 0.0,
                        peak_mem_mib=st["peak_mem_mib"],
                        accepted_hist=" ".join(map(str, st.get("accepted_hist", []))),   # the batch's, per step
                        tokens=" ".join(map(str, tokens[j])),
                        output=data.tokenizer.decode(tokens[j]).replace("\x00", "\ufffd")))  # CSV holds no NUL
    return out
