"""Autoregressive baseline: one target forward pass per new token, batched, with the KV cache."""
from __future__ import annotations

import time

import torch

from .kvcache_model import KVCacheModel
from .utils import SamplingParams, sample


@torch.inference_mode()
def autoregressive_sampling(target, input_ids: torch.Tensor, mask: torch.Tensor,
                            params: SamplingParams, max_new_tokens: int,
                            eos_token_id: int | None, generator: torch.Generator | None):
    """Sample up to ``max_new_tokens`` for each row of a left-padded batch [B, T].

    A row stops after its EOS and is dropped from the cache, so finished rows cost nothing.
    Returns (tokens: list[list[int]], stats: dict).
    """
    B = input_ids.shape[0]
    t0 = time.perf_counter()
    model = KVCacheModel(target, params)
    p = model.prefill(input_ids, mask)                                   # [B, V]
    out = [[] for _ in range(B)]
    rows = torch.arange(B)                                               # original index of live rows
    seq, ttft = input_ids, None
    for step in range(max_new_tokens):
        x = sample(p, generator, params.greedy)                          # [b]
        ttft = ttft if ttft is not None else time.perf_counter() - t0
        for r, tok in zip(rows.tolist(), x.tolist()):
            out[r].append(tok)
        if step == max_new_tokens - 1:
            break
        seq = torch.cat([seq, x.unsqueeze(1)], dim=1)                    # [b, T + step + 1]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        if eos_token_id is not None and (x == eos_token_id).any():
            live = (x != eos_token_id).nonzero().squeeze(1)              # drop finished rows
            if len(live) == 0:
                break
            rows, seq, mask = rows[live], seq[live], mask[live]
            model.select_rows(live)
        p = model.catch_up(seq, mask)                                    # [b, V]
    new_tokens = sum(map(len, out))
    stats = dict(new_tokens=new_tokens, target_calls=model.calls, draft_calls=0, drafted=0,
                 accepted=0, acceptance_rate=0.0, mean_accepted_tokens=1.0,  # one token per row per call
                 wall_time_s=time.perf_counter() - t0, ttft_s=ttft or 0.0)
    return out, stats
