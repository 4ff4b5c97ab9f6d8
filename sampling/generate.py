"""``sampling.generate``: the one entry point to every decoding mode."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .autoregressive_sampling import autoregressive_sampling
from .kvcache_model import CacheSpec
from .press import PressSpec
from .parts import is_drafter
from .rows import now
from .speculative_bass import bass_sampling, tree_sampling
from .tree import MAX_NODES, parse_tree
from .utils import RowParams, SamplingParams, row_params
from .utils_bass import GammaSchedule, ScheduleParams

MODES = ("ar", "google", "deepmind", "bass", "tree", "cascade")
FINISHED_ROWS = ("drop", "mask")   # bass: what becomes of a finished row (see speculative_bass)
SUM_STATS = ("new_tokens", "target_calls", "draft_calls", "drafted", "accepted")


@dataclass(frozen=True)
class Defaults:
    """The one home of every generation default (the CLIs and the benchmarks read theirs from here)."""
    mode: str = "google"          # generate(): ar | google | deepmind | bass | tree
    main_mode: str = "tree"       # main.py: the fastest lossless configuration at batch 1 on the embedded
                                  # pair, tree mode with the draft model (results/heads: 1.27x AR greedy)
    draft: str = "model"          # what drafts (the CLIs): model | ngram | mlp | medusa (sampling.cli.DRAFTS)
    tree: str = "dynamic:16:5:4:3"   # tree, draft model: the fastest at batch 1 on Dolly with the embedded pair (results/trees)
    heads_tree: str = "4,2,2,1"   # tree, speculator heads (static trees only): top-k per head (results/heads)
    max_new_tokens: int = 20      # new tokens per row
    gamma: int = 4                # draft length of the constant schedule
    gamma_init: int = 7           # starting draft length of the adaptive schedules (BASS paper)
    temperature: float = 1.0      # 0 is greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1.0: off
    min_p: float = 0.0            # 0: off
    repetition_penalty: float = 1.0   # 1.0: off
    gamma_schedule: str = "constant"  # constant | bass | aimd
    finished_rows: str = "drop"       # bass: drop finished rows from both caches, or keep them masked
    kv_cache: str = "dynamic"     # dynamic | static (sampling.kvcache_model; results/static: measured on this CPU)
    compile: bool = False         # static cache: decode passes through torch.compile (CUDA graphs on a GPU)


DEFAULTS = Defaults()


def default_tree(draft) -> str:
    """The tree of mode "tree" when none is given: heads draft static trees (cut to as many levels
    as they have heads), a draft model dynamic ones."""
    if is_drafter(draft):
        return str(parse_tree(DEFAULTS.heads_tree).truncated(getattr(draft, "n_heads", MAX_NODES)))
    return DEFAULTS.tree


def default_gamma(gamma_schedule: str) -> int:
    """The draft length a schedule starts from when none is given."""
    return DEFAULTS.gamma if gamma_schedule == "constant" else DEFAULTS.gamma_init


def resolve_schedule(gamma_schedule: str | None, schedule: ScheduleParams | None) -> ScheduleParams:
    """One schedule from ``gamma_schedule`` (the kind) and ``schedule`` (kind and constants); they
    may not disagree."""
    if schedule is None:
        return ScheduleParams(kind=gamma_schedule or DEFAULTS.gamma_schedule)
    if gamma_schedule is not None and gamma_schedule != schedule.kind:
        raise ValueError(f"gamma_schedule {gamma_schedule!r} disagrees with schedule.kind {schedule.kind!r}; "
                         f"give one of them")
    return schedule


@dataclass
class GenerationResult:
    tokens: list[list[int]]                     # new tokens of each row, EOS kept, nothing after it
    stats: dict = field(default_factory=dict)   # counts, rates and timings (see README)


def max_positions(model) -> int | None:
    """The longest sequence a model's position embeddings allow (None: no limit, e.g. ALiBi)."""
    return getattr(model.config, "max_position_embeddings", None)


def vocab_size(model) -> int:
    """Rows of the model's output embedding (may exceed its tokenizer's vocabulary: padding)."""
    return model.get_output_embeddings().weight.shape[0]


def check_args(mode: str, max_new_tokens: int, gamma: int, params: SamplingParams | RowParams,
               schedule: ScheduleParams, finished_rows: str = DEFAULTS.finished_rows) -> None:
    """Checks that need no model: raise ValueError naming the bad value and the allowed range."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if finished_rows not in FINISHED_ROWS:
        raise ValueError(f"unknown finished_rows {finished_rows!r}; choose one of {', '.join(FINISHED_ROWS)}")
    params.validate()
    schedule.validate()
    if gamma <= 0:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    budgets = [max_new_tokens] if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if not budgets or min(budgets) <= 0:
        raise ValueError(f"max_new_tokens must be >= 1 (or a list of them, one per row), got {max_new_tokens}")


def check_inputs(target, draft, input_ids, attention_mask, mode, max_new_tokens, vocab) -> int | None:
    """Checks of the models and the batch, one-line ValueErrors. Returns the vocabulary every
    distribution is restricted to (None: the target's whole output embedding)."""
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a [B, T] tensor with B >= 1, got shape {tuple(input_ids.shape)}")
    lengths = attention_mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError("empty prompt: every row needs at least one token")
    longest = int(lengths.max()) + max_new_tokens     # drafts never pass this position
    if (mode == "cascade") != isinstance(draft, (list, tuple)):
        raise ValueError("mode 'cascade' takes draft_model=[smallest, ..., largest draft] (2 models or more); "
                         "the other modes one draft" if mode == "cascade" else
                         f"a list of drafts is a cascade: use mode 'cascade', not {mode!r}")
    drafts = list(draft) if mode == "cascade" else [draft]
    if mode == "cascade" and (len(drafts) < 2 or any(is_drafter(d) or d is None for d in drafts)):
        raise ValueError(f"mode 'cascade' takes 2 or more draft models, smallest first; got {len(drafts)} "
                         f"item(s) of types {', '.join(type(d).__name__ for d in drafts)}")
    draft = drafts[-1]
    needs_model = mode != "ar"
    if mode != "ar" and is_drafter(draft):            # a ready drafter: no positions or embeddings to check
        if mode == "tree" and not draft.supports_tree:
            raise ValueError(f"mode 'tree' needs a draft model or speculator heads; {type(draft).__name__} "
                             f"drafts chains (use google, deepmind or bass)")
        if hasattr(draft, "check_target"):
            draft.check_target(target)
        draft, drafts, needs_model = None, [], False
    for name, model in [("target", target)] + [("draft", d if mode != "ar" else None) for d in drafts]:
        limit = max_positions(model) if model is not None else None
        if limit is not None and longest > limit:
            raise ValueError(f"prompt of {int(lengths.max())} tokens + {max_new_tokens} new tokens exceeds"
                             f" the {name} model's maximum of {limit} positions")
    sizes = [vocab_size(target)] + ([vocab_size(d) for d in drafts] if mode != "ar" and draft is not None else [])
    if needs_model and draft is None:
        raise ValueError(f"mode {mode!r} needs a draft model")
    if vocab is not None:
        if not 1 <= vocab <= min(sizes):
            raise ValueError(f"vocab_size must be in [1, {min(sizes)}] (the models' output embeddings), got {vocab}")
        return vocab
    if len(set(sizes)) > 1:
        raise ValueError(f"draft output embedding ({sizes[1]} rows) differs from the target's ({sizes[0]}): "
                         f"pass vocab_size, the size of the tokenizer both share (sampling.models.shared_vocab "
                         f"checks that they do)")
    return None


def generate(target_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             draft_model=None, mode: str = DEFAULTS.mode, max_new_tokens: int | list[int] = DEFAULTS.max_new_tokens,
             gamma: int | None = None, temperature: float | list[float] = DEFAULTS.temperature,
             top_k: int | list[int] = DEFAULTS.top_k, top_p: float | list[float] = DEFAULTS.top_p,
             min_p: float | list[float] = DEFAULTS.min_p,
             repetition_penalty: float = DEFAULTS.repetition_penalty,
             eos_token_id: int | None = None, seed: int | None = None,
             gamma_schedule: str | None = None, schedule: ScheduleParams | None = None,
             finished_rows: str = DEFAULTS.finished_rows, vocab_size: int | None = None,
             streamer=None, tree=None, kv_cache: str = DEFAULTS.kv_cache,
             compile: bool = DEFAULTS.compile, cascade_gamma: int | None = None,
             press: PressSpec | None = None) -> GenerationResult:
    """Generate new tokens for a left-padded batch input_ids [B, T] (mask [B, T]).

    mode: "ar" (target alone), "google" (Leviathan et al.), "deepmind" (Chen et al.) or
    "bass" (batched speculative sampling). temperature 0 is greedy; top_k, top_p, min_p and
    repetition_penalty are transformers' logits processors, applied to target and draft alike,
    each verified position with its own prefix. ``gamma`` is the draft length, the starting one
    for the adaptive schedules "bass" and "aimd"; None picks ``default_gamma``. The schedule is
    ``gamma_schedule`` (a kind) or ``schedule`` (a kind and its constants), not both unless they agree.
    ``finished_rows`` (bass, tree): "drop" a finished row from both caches or keep it "mask"ed.
    ``tree`` (mode "tree"): branching factors per depth, "4,2,1,1" or (4, 2, 1, 1), or a dynamic tree
    "dynamic:N[:D[:K[:S]]]" (EAGLE-2: N draft tokens, D levels, K children per expanded node, ranked
    by q ** S; ``sampling.tree``); None: ``default_tree``. ``draft_model``: a model, or for google, deepmind and bass a ready
    drafter such as ``sampling.NgramDrafter()`` (prompt lookup, no model).
    ``vocab_size``: restrict every distribution to the first ids, for a pair that shares a tokenizer
    but pads its embeddings to different sizes. ``streamer`` (batch 1): a transformers streamer
    (``TextStreamer``) that is given the tokens as they are accepted. ``kv_cache``: "dynamic" or
    "static" (preallocated, rollback by position; ``sampling.kvcache_model``), ``compile`` (static
    only): decode passes through ``torch.compile(mode="reduce-overhead")``, CUDA graphs on a GPU;
    each new shape compiles once, so it pays over many generations, not one. Mode "cascade"
    (``sampling.cascade``): ``draft_model=[smallest, ..., largest draft]``, each model verifying the
    one below it by speculative sampling, row by row; ``gamma`` is the target's draft length,
    ``cascade_gamma`` (None: gamma) every lower level's, each adapted by its own schedule.
    ``max_new_tokens``: one budget, or one per row (a server's requests); so may ``temperature``,
    ``top_k``, ``top_p`` and ``min_p`` be (``sampling.utils.RowParams``: greedy and sampled rows share
    the batch, each keeping its own law). ``streamer`` may also be
    a row streamer (``put_row(row, tokens)``, ``stopped(row)``, ``end()``; ``sampling.rows.Rows``),
    for any batch: each row's tokens as they are accepted, and a row it stops leaves the batch; with
    ``admit(live) -> list[NewRow]`` it also hands in requests that join the running batch between
    steps (continuous batching; modes ar and bass, the dynamic cache, no press: ``check_admission``).
    ``press`` (``sampling.press.PressSpec``): KV-cache compression of the draft's cache (the output
    law stays the target's), the target's (a different model) or both; None: none.
    """
    schedule = resolve_schedule(gamma_schedule, schedule)
    if gamma is None:
        gamma = default_gamma(schedule.kind)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B = input_ids.shape[0]
    per_row = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    for name, v in per_row.items():
        if isinstance(v, (list, tuple)) and len(v) != B:
            raise ValueError(f"{name}: {len(v)} values for a batch of {B} rows (give one, or one per row)")
    each = {k: v if isinstance(v, (list, tuple)) else [v] * B for k, v in per_row.items() if k != "max_new_tokens"}
    params = row_params([SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=repetition_penalty)
                         for t, k, p, m in zip(each["temperature"], each["top_k"], each["top_p"], each["min_p"])])
    check_args(mode, max_new_tokens, gamma, params, schedule, finished_rows)
    shape = parse_tree(tree if tree is not None else default_tree(draft_model)) if mode == "tree" else None
    most = max_new_tokens if isinstance(max_new_tokens, int) else max(max_new_tokens)
    cache = CacheSpec(kv_cache, compile, room=most + 1 + (shape.cache_slots if shape else 0),
                      press=press or PressSpec())
    cache.validate()
    vocab = check_inputs(target_model, draft_model, input_ids, attention_mask, mode, most, vocab_size)
    if streamer is not None and input_ids.shape[0] != 1 and not hasattr(streamer, "put_row"):
        raise ValueError(f"a streamer takes one sequence; got a batch of {input_ids.shape[0]} (a row streamer, "
                         f"with put_row, takes any)")
    if hasattr(streamer, "admit"):
        check_admission(mode, draft_model, cache, finished_rows)
    device = input_ids.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    attention_mask = attention_mask.to(device)
    common = dict(params=params, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                  generator=generator, vocab=vocab, streamer=streamer, cache=cache)

    if mode == "ar":
        tokens, stats = autoregressive_sampling(target_model, input_ids, attention_mask, **common)
        return GenerationResult(tokens, stats)
    if mode == "tree":
        tokens, stats = tree_sampling(target_model, draft_model, input_ids, attention_mask, tree=shape,
                                      finished_rows=finished_rows, **common)
        return GenerationResult(tokens, stats)
    if cascade_gamma is not None and cascade_gamma <= 0:
        raise ValueError(f"cascade_gamma must be >= 1, got {cascade_gamma}")
    if mode == "bass":
        tokens, stats = bass_sampling(target_model, draft_model, input_ids, attention_mask,
                                      schedule=GammaSchedule(gamma, schedule), finished_rows=finished_rows,
                                      **common)
        return GenerationResult(tokens, stats)
    # google / deepmind / cascade: the same loop, one row at a time (rows accept different counts;
    # "bass" batches them); google and deepmind differ in how the acceptance test draws its uniforms
    t0, tokens, per_row = now(device), [], []
    budgets = [max_new_tokens] * len(input_ids) if isinstance(max_new_tokens, int) else max_new_tokens
    for i, (ids, m) in enumerate(zip(input_ids, attention_mask)):
        ids = ids[m.bool()].unsqueeze(0)                                  # [1, T_i], no padding
        row_kw = dict(common, max_new_tokens=budgets[i], params=params.row(i),
                      streamer=OneRow(streamer, i) if hasattr(streamer, "put_row") else streamer)
        row, stats = bass_sampling(target_model, draft_model, ids, torch.ones_like(ids),
                                   schedule=GammaSchedule(gamma, schedule), sequential=mode == "deepmind",
                                   cascade_gamma=cascade_gamma or gamma, **row_kw)
        tokens.append(row[0])
        per_row.append(stats)
    stats = {k: sum(s[k] for s in per_row) for k in SUM_STATS}
    passes = sum(s["rows"][0]["target_calls"] for s in per_row)
    stats.update(acceptance_rate=stats["accepted"] / max(1, stats["drafted"]),
                 mean_accepted_tokens=stats["new_tokens"] / max(1, passes),
                 wall_time_s=now(device) - t0, ttft_s=per_row[0]["ttft_s"], ttft_tokens=per_row[0]["ttft_tokens"],
                 gamma_trace=[g for s in per_row for g in s["gamma_trace"]],
                 accepted_hist=sum_hists([s["accepted_hist"] for s in per_row]),
                 rows=[s["rows"][0] for s in per_row])
    return GenerationResult(tokens, stats)


def check_admission(mode: str, draft_model, cache: CacheSpec, finished_rows: str) -> None:
    """Rows join a running batch (a row streamer with ``admit``) in the batched chain loops, with a
    draft model or the n-gram drafter, the dynamic cache without a press, finished rows dropped."""
    why = [f"mode {mode} (ar or bass)" if mode not in ("ar", "bass") else "",
           f"the {cache.kind} cache (dynamic)" if cache.kind != "dynamic" else "",
           "a press" if cache.press.active else "",
           f"finished_rows={finished_rows} (drop)" if finished_rows != "drop" else "",
           "this drafter (a draft model or NgramDrafter)" if mode == "bass" and is_drafter(draft_model)
           and not hasattr(draft_model, "admit") else ""]
    why = [w for w in why if w]
    if why:
        raise ValueError(f"rows cannot join a running batch with {', '.join(why)}")


class OneRow:
    """Row ``i`` of a row streamer, for the loops that decode one row at a time (its row 0); the
    end of the whole generation is the caller's, not each row's."""

    def __init__(self, streamer, i: int):
        self.streamer, self.i = streamer, i

    def put_row(self, row: int, tokens: list[int]) -> None:
        self.streamer.put_row(self.i, tokens)

    def stopped(self, row: int) -> bool:
        return self.streamer.stopped(self.i)

    def end(self) -> None:
        pass


def sum_hists(hists: list[list[int]]) -> list[int]:
    """Element-wise sum of histograms of different lengths."""
    out = [0] * max(map(len, hists), default=0)
    for h in hists:
        for i, c in enumerate(h):
            out[i] += c
    return out
