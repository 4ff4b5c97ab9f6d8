"""Peer baselines (Hugging Face generate, assisted generation) and the cost-ratio measurement."""
from __future__ import annotations

import copy

import torch

from sampling.cache.spec import CacheSpec
from sampling.control import cached_wrapper, time_passes
from sampling.utils import now

HF_MODES = ("hf", "hf_assisted", "hf_prompt_lookup")


@torch.inference_mode()
def hf_generate(target, ids: torch.Tensor, cfg, eos_token_id: int, pad_token_id: int, draft=None):
    """``model.generate`` on one prompt ids [1, T] (with ``assistant_model=draft`` for hf_assisted,
    drafting exactly cfg.gamma tokens per step: constant schedule, no confidence early stop; with
    ``prompt_lookup_num_tokens=cfg.gamma`` for hf_prompt_lookup). Returns (new tokens, stats)."""
    kwargs = dict(max_new_tokens=cfg.max_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  do_sample=cfg.temperature > 0)
    if cfg.temperature > 0:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
                      min_p=cfg.min_p or None)
    if cfg.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = cfg.repetition_penalty
    if cfg.mode == "hf_prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = cfg.gamma
    saved = None
    if draft is not None:                   # assisted generation reads gamma from the draft's config
        saved, gc = draft.generation_config, copy.deepcopy(draft.generation_config)
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = cfg.gamma, "constant"
        gc.assistant_confidence_threshold = 0.0
        draft.generation_config = gc
        kwargs["assistant_model"] = draft
    try:
        t0 = now(ids.device)
        out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        wall = now(ids.device) - t0
    finally:
        if saved is not None:               # leave the caller's draft as it was
            draft.generation_config = saved
    new = out[0, ids.shape[1]:].tolist()
    if eos_token_id in new:
        new = new[:new.index(eos_token_id) + 1]
    return new, dict(wall_time_s=wall, ttft_s=float("nan"), target_calls=float("nan"))


def measure_cost(target, draft, batch: int, gamma: int, prompt_len: int = 64, reps: int = 15,
                 draft_cache: CacheSpec = CacheSpec()) -> dict:
    """Median wall times (ms) of a cached single-token step of each model and of the target's
    (gamma + 1)-token verify step, at the given batch size, through the toolkit's own wrapper.
    The three are measured in interleaved rounds (order rotating), after two warm-up rounds, so
    drift slows all three alike (``sampling.control.time_passes``). c = draft step / target step;
    v = verify / target step. ``draft_cache``: the draft's (a compiled static one: its compiled pass;
    ``lean`` unset: as a generation's draft, ``CacheSpec.for_role``)."""
    gen = torch.Generator().manual_seed(0)
    kv = {"t": cached_wrapper(target, batch, prompt_len, CacheSpec(), gen),
          "d": cached_wrapper(draft, batch, prompt_len, draft_cache.for_role("draft"), gen)}
    step, draft_step, verify = time_passes([(kv["t"], 1), (kv["d"], 1), (kv["t"], gamma + 1)], reps, gen)
    return dict(batch=batch, gamma=gamma, target_step_ms=step, draft_step_ms=draft_step, verify_ms=verify,
                c=draft_step / step, verify_over_step=verify / step, reps=reps)
