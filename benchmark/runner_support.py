"""Peer baselines (Hugging Face generate, assisted generation) and the cost-ratio measurement."""
from __future__ import annotations

import copy
import statistics
import time

import torch

from sampling.kvcache_model import KVCacheModel
from sampling.utils import SamplingParams

HF_MODES = ("hf", "hf_assisted")


@torch.inference_mode()
def hf_generate(target, ids: torch.Tensor, cfg, eos_token_id: int, pad_token_id: int, draft=None):
    """``model.generate`` on one prompt ids [1, T] (with ``assistant_model=draft`` for hf_assisted,
    drafting exactly cfg.gamma tokens per step: constant schedule, no confidence early stop).
    Returns (new tokens, stats)."""
    kwargs = dict(max_new_tokens=cfg.max_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  do_sample=cfg.temperature > 0)
    if cfg.temperature > 0:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    saved = None
    if draft is not None:                   # assisted generation reads gamma from the draft's config
        saved, gc = draft.generation_config, copy.deepcopy(draft.generation_config)
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = cfg.gamma, "constant"
        gc.assistant_confidence_threshold = 0.0
        draft.generation_config = gc
        kwargs["assistant_model"] = draft
    try:
        t0 = time.perf_counter()
        out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        wall = time.perf_counter() - t0
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
    c = draft step / target step."""
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    V = target.get_output_embeddings().weight.shape[0]
    device = next(target.parameters()).device
    prompt = torch.randint(0, V, (batch, prompt_len), generator=gen).to(device)

    def step_ms(model, n_new):
        m = KVCacheModel(model, params)
        mask = torch.ones_like(prompt)
        m.prefill(prompt, mask)
        times = []
        for _ in range(reps + 2):                          # the first two are warm-up
            new = torch.randint(0, V, (batch, n_new), generator=gen).to(device)
            seq = torch.cat([prompt, new], 1)
            t0 = time.perf_counter()
            m.catch_up(seq, torch.ones_like(seq))
            times.append(time.perf_counter() - t0)
            m.rollback(prompt_len)
        return 1000 * statistics.median(times[2:])

    t1, d1, tv = step_ms(target, 1), step_ms(draft, 1), step_ms(target, gamma + 1)
    return dict(batch=batch, gamma=gamma, target_step_ms=t1, draft_step_ms=d1, verify_ms=tv,
                c=d1 / t1, verify_over_step=tv / t1)
