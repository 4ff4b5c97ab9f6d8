"""Speculative sampling, one sequence at a time: Leviathan et al. 2023 ("google") and
Chen et al. 2023 ("deepmind"). Both keep the draft's and the target's KV caches and roll them
back after each verification; they differ only in how the acceptance test draws its uniforms
(see ``sampling.utils.accept_reject``). The output law is the target's, exactly.
"""
from __future__ import annotations

import time

import torch

from .kvcache_model import KVCacheModel
from .utils import SamplingParams, accept_reject, sample
from .utils_bass import GammaSchedule


@torch.inference_mode()
def speculative_sampling(target, draft, input_ids: torch.Tensor, params: SamplingParams,
                         max_new_tokens: int, schedule: GammaSchedule, eos_token_id: int | None,
                         generator: torch.Generator | None, variant: str = "google"):
    """Generate up to ``max_new_tokens`` after one prompt input_ids [1, T].

    Returns (tokens: list[int], stats: dict). The budget is never overshot: the last block drafts
    only as many tokens as still fit, and an EOS inside an accepted block ends the row there.
    """
    t0 = time.perf_counter()
    tgt, drf = KVCacheModel(target, params), KVCacheModel(draft, params)
    ones = torch.ones_like                                               # one row: no padding
    tgt.prefill(input_ids, ones(input_ids))
    drf.prefill(input_ids, ones(input_ids))
    T = input_ids.shape[1]
    seq, drafted, accepted, ttft = input_ids, 0, 0, None
    while seq.shape[1] - T < max_new_tokens:
        prefix = seq.shape[1]
        g = min(schedule.gamma, max_new_tokens - (prefix - T) - 1)      # drafts that still fit
        # 1. draft: g tokens from q, one cached step each
        for _ in range(g):
            x = sample(drf.catch_up(seq, ones(seq)), generator, params.greedy)  # [1]
            seq = torch.cat([seq, x.unsqueeze(1)], dim=1)
        q = drf.probs[:, drf.probs.shape[1] - g:]                        # [1, g, V]
        # 2. verify: one target pass over the g drafts (and the token before them)
        tgt.catch_up(seq, ones(seq))
        p = tgt.probs[:, -(g + 1):]                                      # [1, g + 1, V]
        # 3. accept a prefix of the drafts, then a correction or bonus token
        n, nxt = accept_reject(p, q, seq[:, prefix:], generator, sequential=variant == "deepmind",
                               greedy=params.greedy)
        schedule.update(n, g)
        n = int(n)
        drafted, accepted = drafted + g, accepted + n
        ttft = ttft if ttft is not None else time.perf_counter() - t0
        # 4. roll both caches back to the accepted prefix and append the new token
        tgt.rollback(prefix + n)
        drf.rollback(prefix + n)
        seq = torch.cat([seq[:, :prefix + n], nxt.view(1, 1)], dim=1)
        if eos_token_id is not None and (seq[0, prefix:] == eos_token_id).any():
            break
    out = seq[0, T:].tolist()
    if eos_token_id is not None and eos_token_id in out:
        out = out[:out.index(eos_token_id) + 1]                          # nothing after EOS
    stats = dict(new_tokens=len(out), target_calls=tgt.calls, draft_calls=drf.calls,
                 drafted=drafted, accepted=accepted,
                 acceptance_rate=accepted / drafted if drafted else 0.0,
                 mean_accepted_tokens=len(out) / max(1, tgt.calls),
                 wall_time_s=time.perf_counter() - t0, ttft_s=ttft or 0.0,
                 gamma_trace=schedule.trace)
    return out, stats
