"""``sampling.generate``: the one entry point to every decoding mode."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .autoregressive_sampling import autoregressive_sampling
from .speculative_bass import bass_sampling
from .speculative_sampling import speculative_sampling
from .utils import SamplingParams
from .utils_bass import GammaSchedule, ScheduleParams

MODES = ("ar", "google", "deepmind", "bass")
FINISHED_ROWS = ("drop", "mask")   # bass: what becomes of a finished row (see speculative_bass)
SUM_STATS = ("new_tokens", "target_calls", "draft_calls", "drafted", "accepted")


@dataclass(frozen=True)
class Defaults:
    """The one home of every generation default (the CLIs read theirs from here)."""
    max_new_tokens: int = 20      # new tokens per row
    gamma: int = 4                # draft length of the constant schedule
    gamma_init: int = 7           # starting draft length of the adaptive schedules (BASS paper)
    temperature: float = 1.0      # 0 is greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1.0: off
    gamma_schedule: str = "constant"  # constant | bass | aimd
    finished_rows: str = "drop"       # bass: drop finished rows from both caches, or keep them masked


DEFAULTS = Defaults()


@dataclass
class GenerationResult:
    tokens: list[list[int]]                     # new tokens of each row, EOS kept, nothing after it
    stats: dict = field(default_factory=dict)   # counts, rates and timings (see README)


def max_positions(model) -> int | None:
    """The longest sequence a model's position embeddings allow (None: no limit, e.g. ALiBi)."""
    return getattr(model.config, "max_position_embeddings", None)


def vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_args(mode: str, max_new_tokens: int, gamma: int, params: SamplingParams,
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
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def check_inputs(target, draft, input_ids, attention_mask, mode, max_new_tokens) -> None:
    """Checks of the models and the batch, one-line ValueErrors."""
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a [B, T] tensor with B >= 1, got shape {tuple(input_ids.shape)}")
    lengths = attention_mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError("empty prompt: every row needs at least one token")
    longest = int(lengths.max()) + max_new_tokens     # drafts never pass this position
    for name, model in (("target", target), ("draft", draft)):
        limit = max_positions(model) if model is not None else None
        if limit is not None and longest > limit:
            raise ValueError(f"prompt of {int(lengths.max())} tokens + {max_new_tokens} new tokens exceeds"
                             f" the {name} model's maximum of {limit} positions")
    if mode != "ar":
        if draft is None:
            raise ValueError(f"mode {mode!r} needs a draft model")
        if vocab_size(draft) != vocab_size(target):
            raise ValueError(f"draft vocabulary ({vocab_size(draft)} tokens) differs from the "
                             f"target's ({vocab_size(target)}): speculative decoding needs one vocabulary")


def generate(target_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             draft_model=None, mode: str = "ar", max_new_tokens: int = DEFAULTS.max_new_tokens,
             gamma: int | None = None, temperature: float = DEFAULTS.temperature,
             top_k: int = DEFAULTS.top_k, top_p: float = DEFAULTS.top_p,
             eos_token_id: int | None = None, seed: int | None = None,
             gamma_schedule: str = DEFAULTS.gamma_schedule, schedule: ScheduleParams | None = None,
             finished_rows: str = DEFAULTS.finished_rows) -> GenerationResult:
    """Generate new tokens for a left-padded batch input_ids [B, T] (mask [B, T]).

    mode: "ar" (target alone), "google" (Leviathan et al.), "deepmind" (Chen et al.) or
    "bass" (batched speculative sampling). temperature 0 is greedy. ``gamma`` is the draft
    length, the starting one for the adaptive ``gamma_schedule``s "bass" and "aimd" (whose
    constants ``schedule`` may override); None picks DEFAULTS.gamma or DEFAULTS.gamma_init.
    ``finished_rows`` (bass only): "drop" a finished row from both caches or keep it "mask"ed.
    """
    schedule = ScheduleParams(**{**(schedule.__dict__ if schedule else {}), "kind": gamma_schedule})
    if gamma is None:
        gamma = DEFAULTS.gamma if gamma_schedule == "constant" else DEFAULTS.gamma_init
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    check_args(mode, max_new_tokens, gamma, params, schedule, finished_rows)
    check_inputs(target_model, draft_model, input_ids, attention_mask, mode, max_new_tokens)
    device = input_ids.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    attention_mask = attention_mask.to(device)

    if mode == "ar":
        tokens, stats = autoregressive_sampling(target_model, input_ids, attention_mask, params,
                                                max_new_tokens, eos_token_id, generator)
        return GenerationResult(tokens, stats)
    if mode == "bass":
        tokens, stats = bass_sampling(target_model, draft_model, input_ids, attention_mask, params,
                                      max_new_tokens, GammaSchedule(gamma, schedule), eos_token_id,
                                      generator, finished_rows)
        return GenerationResult(tokens, stats)
    # google / deepmind: one row at a time (rows accept different counts; "bass" batches them)
    t0, tokens, per_row = time.perf_counter(), [], []
    for ids, m in zip(input_ids, attention_mask):
        row, stats = speculative_sampling(target_model, draft_model, ids[m.bool()].unsqueeze(0),
                                          params, max_new_tokens, GammaSchedule(gamma, schedule),
                                          eos_token_id, generator,
                                          variant=mode)
        tokens.append(row)
        per_row.append(stats)
    stats = {k: sum(s[k] for s in per_row) for k in SUM_STATS}
    stats.update(acceptance_rate=stats["accepted"] / max(1, stats["drafted"]),
                 mean_accepted_tokens=stats["new_tokens"] / max(1, stats["target_calls"]),
                 wall_time_s=time.perf_counter() - t0, ttft_s=per_row[0]["ttft_s"],
                 gamma_trace=[g for s in per_row for g in s["gamma_trace"]],
                 rows=[{k: s[k] for k in SUM_STATS} for s in per_row])
    return GenerationResult(tokens, stats)
