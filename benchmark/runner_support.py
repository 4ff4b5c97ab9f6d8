"""Peer baselines (Hugging Face generate, assisted generation) and the cost-ratio measurement."""
from __future__ import annotations

import copy
import statistics

import torch

from sampling.kvcache_model import KVCacheModel
from sampling.params import SamplingParams
from sampling.utils import model_device, now

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


@torch.inference_mode()
def measure_cost(target, draft, batch: int, gamma: int, prompt_len: int = 64, reps: int = 15) -> dict:
    """Median wall times (ms) of a cached single-token step of each model and of the target's
    (gamma + 1)-token verify step, at the given batch size, through the toolkit's own wrapper.
    The three are measured in interleaved rounds (order rotating), after two warm-up rounds, so
    drift slows all three alike. c = draft step / target step; v = verify / target step."""
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    V = min(target.get_output_embeddings().weight.shape[0], draft.get_output_embeddings().weight.shape[0])
    device = model_device(target)
    prompt = torch.randint(0, V, (batch, prompt_len), generator=gen).to(device)
    steps = {"target_step": (target, 1), "draft_step": (draft, 1), "verify": (target, gamma + 1)}
    caches, times = {}, {k: [] for k in steps}
    for k, (model, _) in steps.items():
        caches[k] = KVCacheModel(model, params)
        caches[k].prefill(prompt, torch.ones_like(prompt))
    names = list(steps)
    for rep in range(reps + 2):                                  # the first two rounds are warm-up
        for k in [names[(i + rep) % len(names)] for i in range(len(names))]:
            new = torch.randint(0, V, (batch, steps[k][1]), generator=gen).to(device)
            seq = torch.cat([prompt, new], 1)
            t0 = now(device)
            caches[k].catch_up(seq, torch.ones_like(seq))
            times[k].append(now(device) - t0)
            caches[k].rollback(prompt_len)
    ms = {k: 1000 * statistics.median(v[2:]) for k, v in times.items()}
    return dict(batch=batch, gamma=gamma, target_step_ms=ms["target_step"], draft_step_ms=ms["draft_step"],
                verify_ms=ms["verify"], c=ms["draft_step"] / ms["target_step"],
                verify_over_step=ms["verify"] / ms["target_step"], reps=reps)
